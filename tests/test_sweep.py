"""`smoothkd sweep`: the schema's errors, the plan's hashing, and whole sweeps on the tiny model
(killed and resumed, extended by one alpha, a failing step, the Ray path)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.errors import InputError
from smoothkd.sweep import runner
from smoothkd.sweep.plan import build_plan
from smoothkd.sweep.schema import load_sweep
from smoothkd.batches import StoreDataset
from smoothkd.storage_schemas import SoftLabelStore
from smoothkd.sweep.worker import run_in_this_process

from conftest import REPO, need, write_jsonl

XSUM = REPO / "data" / "xsum" / "xsum_sample.jsonl"
GENERAL = REPO / "data" / "general"


def sweep_file(tmp_path: Path, model: Path, dolly: Path, **changes) -> Path:
    doc = {
        "name": "tiny",
        "out": str(tmp_path / "out"),
        "dataset": {"path": str(dolly), "limit": 24},
        "teacher": {"model": str(model)},
        "student": {"model": str(model)},
        "store": {"top_k": 8, "max_length": 256, "heldout_fraction": 0.25, "part_size": 12},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3},
        "grid": {"alpha": [0, 0.5], "seed": [0, 1]},
        "evaluate": {"summarization": [{"dataset": str(XSUM), "limit": 2, "max_new_tokens": 8,
                                         "max_prompt_tokens": 128, "pmi_scorer": str(model)}],
                     "general": {"data_dir": str(GENERAL), "limit": 4}, "calibration": {}},
    }
    for k, v in changes.items():
        doc[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def killed_at(n: int):
    """run_in_this_process, but the n-th step is killed after it started (its step.json written)."""
    calls = {"n": 0}

    def execute(step_dir: Path) -> bool:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return run_in_this_process(step_dir)

    return execute


def test_schema_reports_every_problem_with_its_line(tmp_path, tiny_model, dolly):
    path = tmp_path / "bad.yaml"
    path.write_text(f"""name: x
out: o
dataset:
  path: {dolly}
  limt: 3
teacher: {{model: {tiny_model}}}
student: {{model: {tmp_path / 'missing'}}}
store: {{top_k: sixty}}
train:
  epochz: 2
grid:
  alpha: [0, 0.1]
evaluate:
  summarization:
    - {{dataset: {XSUM}, max_new_tokenz: 8}}
""")
    with pytest.raises(InputError) as e:
        load_sweep(path)
    msg = str(e.value)
    # an evaluation's keys are its command's options
    assert f"{path}:15: unknown key evaluate.summarization.0.max_new_tokenz" in msg and "max_new_tokens" in msg
    assert f"{path}:5: unknown key dataset.limt; valid keys here: limit, path" in msg
    assert f"{path}:8: store.top_k" in msg
    assert f"{path}:10: unknown key train.epochz" in msg and "epochs" in msg
    # the schema is fine once the typos are fixed; then the missing student directory is named
    path.write_text(path.read_text().replace("limt", "limit").replace("sixty", "8").replace("epochz", "epochs")
                    .replace("tokenz", "tokens"))
    with pytest.raises(InputError, match=r"bad.yaml:7: student.model: .*missing"):
        load_sweep(path)


def test_grid_and_train_cannot_both_set_an_option(tmp_path, tiny_model, dolly):
    path = sweep_file(tmp_path, tiny_model, dolly, train={"lr": 1e-3}, grid={"lr": [1e-3, 1e-4]})
    with pytest.raises(InputError, match="grid.lr is also set in train"):
        load_sweep(path)


def test_plan_adds_sft_and_shares_it_and_an_added_alpha_adds_only_its_steps(tmp_path, tiny_model, dolly):
    base = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly,
                                            grid={"alpha": [0.5], "loss": ["topk_tail", "topk_renorm"]})))
    runs = [s for s in base.steps.values() if s.kind == "distill"]
    # alpha 0 added once: its loss plays no part, so both losses share one SFT run
    assert sorted((s.role["grid"]["alpha"], s.role["grid"]["loss"]) for s in runs) == [
        (0.0, "topk_tail"), (0.5, "topk_renorm"), (0.5, "topk_tail")]
    more = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly,
                                            grid={"alpha": [0.5, 2.0], "loss": ["topk_tail", "topk_renorm"]})))
    new = set(more.steps) - set(base.steps)
    assert set(base.steps) - set(more.steps) == {n for n in base.steps if n.startswith("report-")}
    new_runs = [n for n in new if n.startswith("run-")]
    assert len(new_runs) == 2 and all(n.startswith("run-a2-") for n in new_runs)
    assert all(n.startswith(("run-a2-", "report-")) or "run-a2-" in n for n in new)


def test_two_sweeps_with_other_teachers_share_their_sft_runs_which_see_the_kd_runs_batches(tmp_path, tiny_model, dolly):
    """SFT reads the student's k = 1 tokens store: named by the token stream alone, so sweeps of
    other teachers sharing a steps_dir share it, its SFT runs and the start model's evaluations;
    and its batches are the ones a KD run sees in the teacher's store (greedy responses and all)."""
    store = {"top_k": 8, "max_length": 256, "heldout_fraction": 0.25, "part_size": 12, "augment": ["greedy"],
             "max_new_tokens": 6}
    steps = str(tmp_path / "steps")
    a = build_plan(load_sweep(sweep_file(tmp_path / "a", tiny_model, dolly, store=store, steps_dir=steps)))
    b = build_plan(load_sweep(sweep_file(tmp_path / "b", tiny_model, dolly, steps_dir=steps,
                                         store={**store, "top_k": 4, "augment": []},
                                         teacher={"model": str(tiny_model), "finetune": {"max_steps": 1}},
                                         grid={"alpha": [0, 1.0], "seed": [0, 1]})))
    shared = set(a.steps) & set(b.steps)
    prefixes = sorted(re.sub(r"-[0-9a-f]{1,8}(?=-[0-9a-f]{8}$|$)|-[0-9a-f]{8}$", "", n) for n in shared)  # hashes, whole or cut
    sft = ["run-a0-bs2-lr0.001", "run-a0-bs2-lr0.001-s1"]  # named by their own options, not by the grid's others
    assert prefixes == sorted(["tokens", *sft, "summ0-start", "general-start", "calib-start",
                               *[f"{kind}-{run}" for kind in ("summ0", "general", "calib") for run in sft]])
    assert a.dir(next(iter(shared))).parent == b.dir(next(iter(shared))).parent == Path(steps)
    # b's teacher is fine-tuned on the same tokens store
    assert next(s for s in b.steps.values() if s.name.startswith("teacher-")).needs == (
        next(n for n in shared if n.startswith("tokens-")),)

    tokens, kd = (next(n for n in a.steps if n.startswith(p)) for p in ("tokens-", "store-"))
    runner.prepare(a)
    assert set(runner.run_plan(a, [a.steps[tokens], a.steps[kd]], execute=run_in_this_process).values()) == {"done"}
    sft = [StoreDataset(SoftLabelStore(str(a.dir(n) / "store")), ["original"]) for n in (tokens, kd)]
    assert len(StoreDataset(SoftLabelStore(str(a.dir(kd) / "store")), ["original", "teacher_greedy"])) > len(sft[1])
    for seed in (0, 1):
        order = [d.batches(epoch=0, seed=seed, batch_size=2) for d in sft]
        assert [b.tolist() for b in order[0]] == [b.tolist() for b in order[1]]
        for positions in order[0]:
            x, y = (d.load(positions) for d in sft)
            assert x.input_ids.equal(y.input_ids) and x.targets.equal(y.targets) and x.supervised.equal(y.supervised)


def test_a_grid_of_several_products_is_their_union(tmp_path, tiny_model, dolly):
    """Kaplan et al.'s comparison is no product: SFT, KD at two alphas, and SFT with a group frozen."""
    plan = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly, grid=[
        {"alpha": [1.0, 10.0], "seed": [0, 1]}, {"alpha": [0], "freeze": [["mlp"]], "seed": [0, 1]}])))
    runs = {re.sub(r"-[0-9a-f]{8}$", "", s.name): s for s in plan.steps.values() if s.kind == "distill"}
    assert sorted(runs) == sorted(f"run-a{a}-bs2{fz}-lr0.001{s}" for a, fz in (("0", ""), ("1", ""), ("10", ""),
                                  ("0", "-fzmlp")) for s in ("", "-s1"))
    assert runs["run-a0-bs2-fzmlp-lr0.001"].config["freeze"] == ["mlp"]
    # SFT, frozen or not, reads the tokens store; KD the teacher's
    assert {r.needs[0].split("-")[0] for n, r in runs.items() if n.startswith("run-a0-")} == {"tokens"}
    assert {r.needs[0].split("-")[0] for n, r in runs.items() if not n.startswith("run-a0-")} == {"store"}
    bad = sweep_file(tmp_path, tiny_model, dolly, grid=[{"alpha": [1.0]}, {"alpha": [0], "frezee": [["mlp"]]},
                                                        {"seed": []}])
    with pytest.raises(InputError) as e:
        load_sweep(bad)
    assert "unknown key grid.1.frezee" in str(e.value) and "grid[2].seed is empty" in str(e.value)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model, dolly):
    path = sweep_file(tmp_path, tiny_model, dolly)
    result = CliRunner().invoke(app, ["sweep", "run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pending" in result.output and "store-" in result.output and "tokens" in result.output
    assert not (tmp_path / "out").exists()


def test_sweep_killed_and_rerun_ends_with_the_uninterrupted_report(tmp_path, tiny_model, dolly):
    whole = build_plan(load_sweep(sweep_file(tmp_path / "a", tiny_model, dolly)))
    runner.prepare(whole)
    final = runner.run_plan(whole, list(whole.steps.values()), execute=run_in_this_process)
    assert set(final.values()) == {runner.DONE}, final

    # b keeps its stores and weights apart from its steps (artifacts_dir), as a sweep committed to git does
    artifacts = tmp_path / "heavy"
    path = sweep_file(tmp_path / "b", tiny_model, dolly, artifacts_dir=str(artifacts))
    plan = build_plan(load_sweep(path))
    runner.prepare(plan)
    with pytest.raises(KeyboardInterrupt):
        runner.run_plan(plan, list(plan.steps.values()), execute=killed_at(6))
    before = {s.name: s.status for s in runner.states(plan)}
    done = [n for n, st in before.items() if st == runner.DONE]
    assert len(done) == 5 and list(before.values()).count(runner.PARTIAL) == 1
    stamps = {n: (plan.dir(n) / "done.json").stat().st_mtime_ns for n in done}
    executed = []

    def record(d: Path) -> bool:
        executed.append(d.name)
        return run_in_this_process(d)

    final = runner.run_plan(plan, list(plan.steps.values()), execute=record)
    assert set(final.values()) == {runner.DONE}
    assert not set(executed) & set(done)  # finished steps were skipped
    assert all((plan.dir(n) / "done.json").stat().st_mtime_ns == stamps[n] for n in done)

    def report(p) -> dict:
        return json.loads((p.out / "report" / "metrics.json").read_text())

    a, b = report(whole), report(plan)
    # (the tiny model's summaries name no entities, so unsupported_rate has no values to pair)
    assert {"rouge_l", "acc_norm", "nll", "kl_from_reference"} <= {v["metric"] for v in a["verdicts"]}
    assert a["forgetting"]
    assert a["verdicts"] == b["verdicts"] and a["forgetting"] == b["forgetting"]
    assert {g: v["metrics"] for g, v in a["groups"].items()} == {g: v["metrics"] for g, v in b["groups"].items()}
    assert {"start model", "alpha=0 (SFT) original"} <= set(a["groups"])
    md = (p := plan.out / "report") / "report.md"
    assert md.read_text().index("## Verdict") < md.read_text().index("## All metrics")
    assert (p / "report.html").exists() and list(p.glob("forest_*.png"))

    # one more alpha: only its run, that run's evaluations and the report are new
    grown = build_plan(load_sweep(sweep_file(tmp_path / "b", tiny_model, dolly, artifacts_dir=str(artifacts),
                                             grid={"alpha": [0, 0.5, 2.0], "seed": [0, 1]})))
    pending = [s.name for s in runner.states(grown) if s.status != runner.DONE]
    assert len(pending) == 2 + 2 * 3 + 1 and all("a2-" in n or n.startswith("report-") for n in pending)
    # a finished run keeps its model, not its resume checkpoint; its record and losses are copied to its step
    runs = [s for s in plan.steps.values() if s.kind == "distill"]
    assert all(not (artifacts / s.name / "checkpoint").exists() and list((artifacts / s.name).glob("*.safetensors"))
               and (plan.dir(s.name) / "smoothkd_run.json").is_file() and (plan.dir(s.name) / "log.jsonl").is_file()
               for s in runs)
    assert not [f for f in plan.steps_root.rglob("*") if f.suffix == ".safetensors" or f.name == "zarr.json"]

    # a fresh checkout of the sweep: its small files, no stores, no weights
    shutil.rmtree(artifacts)
    assert {s.status for s in runner.states(plan) if s.kind in ("precompute", "distill")} == {runner.GONE}
    executed.clear()
    assert set(runner.run_plan(plan, list(plan.steps.values()), execute=record).values()) == {runner.DONE}
    assert not executed  # nothing to run needs what is gone
    # the new alpha's runs need the teacher's store, their calibrations the tokens store: both rebuilt, the
    # same as before; the finished runs are not
    final = runner.run_plan(grown, list(grown.steps.values()), execute=record)
    assert set(final.values()) == {runner.DONE}
    assert sorted(n.split("-")[0] for n in executed) == sorted(
        ["store", "tokens"] + ["run"] * 2 + ["summ0", "general", "calib"] * 2 + ["report"])
    for name in (n for n in executed if n.startswith(("store-", "tokens-"))):
        done = json.loads((grown.dir(name) / "done.json").read_text())
        assert done["output_digest"] and "rebuilt_from" not in done, name


def test_cli_sweep_names_a_failed_step_and_goes_on(tmp_path, tiny_model, dolly):
    """The real path: each step a subprocess. A broken article file fails both summarization
    steps; the training run does not depend on them and finishes; the exit code says not all did."""
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"document": "fine"}', "{not json"])
    path = sweep_file(tmp_path, tiny_model, dolly, grid={"alpha": [0]},
                      evaluate={"summarization": [{"dataset": str(broken), "max_new_tokens": 4}]})
    result = CliRunner().invoke(app, ["sweep", "run", str(path)])
    assert result.exit_code == 1
    plan = build_plan(load_sweep(path))
    by_kind = {}
    for s in runner.states(plan):
        by_kind.setdefault(s.kind, set()).add(s.status)
    # the report needs the failed steps: it never started
    assert by_kind == {"precompute": {"done"}, "distill": {"done"}, "summarization": {"failed"}, "report": {"pending"}}
    failed = [s for s in runner.states(plan) if s.status == runner.FAILED]
    assert failed and all("broken.jsonl:2" in Path(s.log).read_text() for s in failed)
    assert all(s.log in result.output.replace("\n", "") for s in failed)
    status = CliRunner().invoke(app, ["sweep", "status", str(path), "--json"])
    assert status.exit_code == 0 and {s["status"] for s in json.loads(status.output)["steps"]} >= {"done", "failed"}


def test_sweep_steps_as_ray_tasks_on_two_local_workers(tmp_path, tiny_model, dolly):
    ray = need("ray")
    # few steps: each Ray task is a fresh worker process that imports torch
    path = sweep_file(tmp_path, tiny_model, dolly, ray_shards=2, grid={"alpha": [0, 0.5]},
                      evaluate={"general": {"data_dir": str(GENERAL), "limit": 2, "tasks": ["arc_easy"]}})
    plan = build_plan(load_sweep(path))
    runner.prepare(plan)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        final = runner.run_plan(plan, list(plan.steps.values()), use_ray=True, execute=run_in_this_process)
    finally:
        ray.shutdown()
    assert set(final.values()) == {runner.DONE}, final
    assert all((plan.dir(s.name) / "done.json").exists() for s in plan.steps.values())
    store = next(s for s in plan.steps.values() if s.kind == "precompute")
    assert "ray: 2 shard task(s)" in (plan.dir(store.name) / "log.txt").read_text()
    parts = sorted(p.name for p in (plan.dir(store.name) / "store" / "parts").iterdir() if p.name.startswith("part-"))
    assert parts == ["part-000000", "part-000001"]


def test_a_sweep_built_differently_is_refused_in_the_same_out(tmp_path, tiny_model, dolly):
    plan = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly)))
    runner.prepare(plan)
    other = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly, store={"top_k": 4})))
    with pytest.raises(InputError, match="built differently .*store"):
        runner.prepare(other)
    runner.prepare(other, overwrite=True)
    # a grid value added is the same experiment, extended
    grown = build_plan(load_sweep(sweep_file(tmp_path, tiny_model, dolly, store={"top_k": 4},
                                             grid={"alpha": [0, 0.5, 1.0]})))
    runner.prepare(grown)
