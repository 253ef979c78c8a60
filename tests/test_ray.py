"""Precompute shards as Ray tasks on a local Ray cluster of 2 workers (the `ray` extra),
and a store on a non-local fsspec filesystem read by stage two."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import need
from smoothkd.cli import app
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import run as distill
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.ray_shards import run_on_ray
from smoothkd.precompute.run import run
from smoothkd.errors import SmoothkdError
from smoothkd.storage_schemas import SoftLabelStore, verify_store
from smoothkd.storage_schemas.fsio import StoreLocation
from test_precompute import contents

runner = CliRunner()


def cfg(tiny_model, dolly, out, **kw) -> PrecomputeConfig:
    base = dict(model=str(tiny_model), dataset=str(dolly), out=str(out), top_k=16, limit=14, part_size=3,
                batch_size=2, max_length=2048, heldout_fraction=0.25)
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ray_cluster():
    ray = need("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # 2 worker slots, one per shard
    yield ray
    ray.shutdown()


def test_ray_shards_write_one_store_equal_to_a_single_run(ray_cluster, tiny_model, dolly, tmp_path):
    one = tmp_path / "one"
    run(cfg(tiny_model, dolly, one), show_progress=False)
    url = f"file://{tmp_path}/ray"
    logged: list[str] = []
    summary = run_on_ray(cfg(tiny_model, dolly, url), 2, log=logged.append)
    assert summary.parts_written == 5 and summary.sequences == 14
    store = SoftLabelStore(url)
    assert [p.index for p in store.parts] == [0, 1, 2, 3, 4] and not store.missing_parts
    assert {p.commit["shard"] for p in store.parts} == {"0/2", "1/2"}
    assert verify_store(store).ok
    assert contents(url) == contents(str(one))  # nothing to merge: the parts read as one store
    assert sum("done" in m for m in logged) == 2

    again = run_on_ray(cfg(tiny_model, dolly, url), 2, log=logged.append)  # resume: all committed
    assert again.parts_written == 0 and again.parts_skipped == 5


def test_ray_shards_from_the_cli_and_refusals(ray_cluster, tiny_model, dolly, tmp_path):
    out = tmp_path / "s"
    base = ["precompute", "teacher", "--model", str(tiny_model), "--dataset", str(dolly), "--limit", "6",
            "--part-size", "2", "--top-k", "8", "--out", str(out)]
    r = runner.invoke(app, [*base, "--ray-shards", "2", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads(r.stdout)["summary"]["parts_written"] == 3
    r = runner.invoke(app, [*base, "--ray-shards", "2", "--shard", "0/2"])
    assert r.exit_code == 2 and "do not pass --shard" in r.stderr
    with pytest.raises(SmoothkdError, match="at least 1"):
        run_on_ray(cfg(tiny_model, dolly, tmp_path / "x"), 0)


def test_a_failing_shard_names_itself(ray_cluster, tiny_model, dolly, tmp_path):
    out = tmp_path / "s"
    run(cfg(tiny_model, dolly, out, top_k=8), show_progress=False)  # a store built differently
    with pytest.raises(SmoothkdError, match=r"shard \d/2 failed.*built differently"):
        run_on_ray(cfg(tiny_model, dolly, out), 2)


def test_stage_two_reads_a_store_on_a_non_local_filesystem(tiny_model, dolly, tmp_path):
    """memory:// is an fsspec filesystem with no local path, like s3:// or gs://."""
    url = f"memory://ray-test-{tmp_path.name}/store"
    run(cfg(tiny_model, dolly, url, limit=8, part_size=4), show_progress=False)
    assert not StoreLocation(url).is_local
    local = tmp_path / "local"
    run(cfg(tiny_model, dolly, local, limit=8, part_size=4), show_progress=False)
    logs = []
    for name, store in (("remote", url), ("local", str(local))):
        distill(DistillConfig(model=str(tiny_model), store=store, out=str(tmp_path / name), lr=1e-3, batch_size=2,
                              max_steps=3, alpha=0.5), show_progress=False)
        logs.append([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]] and len(logs[0]) == 3
