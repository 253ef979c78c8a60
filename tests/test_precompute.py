"""Stage one end to end on a tiny random Llama: exactness, resume, shards, fsspec URLs."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from smoothkd.errors import SmoothkdError
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run
from smoothkd.storage_schemas import SoftLabelStore, verify_store
from smoothkd.storage_schemas.fsio import StoreLocation

K = 16


def cfg(tiny_model, dolly, out, **kw) -> PrecomputeConfig:
    base = dict(model=str(tiny_model), dataset=str(dolly), out=str(out), top_k=K, limit=12, part_size=4,
                batch_size=3, max_length=2048, heldout_fraction=0.25)
    return PrecomputeConfig(**{**base, **kw})


def contents(url: str) -> list[tuple]:
    """Everything a reader can see, sequence by sequence."""
    store = SoftLabelStore(url)
    out = []
    for i in range(store.n_sequences):
        s = store.sequence(i)
        row = {k: v for k, v in s.row.items()}
        out.append((json.dumps(row, sort_keys=True), s.tokens.tolist(),
                    *(getattr(s.labels, f.name).tolist() for f in dataclasses.fields(s.labels))))
    return out


@pytest.fixture(scope="module")
def tiny_store(tiny_model, dolly, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "full"
    summary = run(cfg(tiny_model, dolly, out), show_progress=False)
    return out, summary


def test_store_matches_a_direct_float32_forward(tiny_model, tiny_store):
    out, summary = tiny_store
    store = SoftLabelStore(str(out))
    assert summary.parts_written == 3 and store.n_sequences == 12
    assert verify_store(store).ok
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tol = store.manifest.encoding.max_error + 1e-4  # fixed-point rounding + batching noise
    for i in range(store.n_sequences):
        s = store.sequence(i)
        with torch.no_grad():  # one sequence, no padding: the reference
            lp = torch.log_softmax(model(torch.from_numpy(s.tokens)[None]).logits[0].float(), -1)
        ref = lp[s.prompt_len - 1 : -1]  # [n_labels, V]: position t predicts token t + 1
        ref_vals, ref_ids = ref.topk(K, -1)
        lab = s.labels
        assert len(lab) == len(s.targets) == s.row["n_labels"]
        np.testing.assert_allclose(lab.logprobs, ref_vals.numpy(), atol=tol)
        # ids agree except where two log-probs tie within the batching noise
        gathered = ref.gather(-1, torch.from_numpy(lab.ids)).numpy()
        np.testing.assert_allclose(gathered, ref_vals.numpy(), atol=1e-4)
        np.testing.assert_allclose(lab.true_logprob, ref.gather(-1, torch.from_numpy(s.targets)[:, None])[:, 0],
                                   atol=tol)
        mass = np.exp(ref_vals.double().numpy()).sum(1)
        # the tail's log-scale encoding keeps its relative precision (FORMAT.md)
        np.testing.assert_allclose(lab.tail, 1 - mass, rtol=store.manifest.tail.max_relative_error, atol=1e-5)


def test_sequences_are_chat_formatted_with_supervised_responses(tiny_model, tiny_store, dolly, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert "prompt" not in SoftLabelStore(str(tiny_store[0])).table().column_names  # texts only when asked
    run(cfg(tiny_model, dolly, tmp_path / "texts", texts=True, limit=4), show_progress=False)
    store = SoftLabelStore(str(tmp_path / "texts"))
    assert verify_store(store).ok
    s = store.sequence(0)
    prompt = tok.decode(s.tokens[: s.prompt_len].tolist())
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert s.row["prompt"] in prompt
    response = tok.decode(s.targets.tolist())
    assert response == s.row["response"] + "<|im_end|>"  # the end-of-turn token is supervised
    splits = set(store.table()["split"].to_pylist())
    assert splits == {"train", "heldout"}


def test_heldout_split_is_a_function_of_the_record_id(tiny_model, tmp_path):
    """The same record is held out whatever else is in the dataset, and in whatever order."""
    from conftest import write_jsonl

    rows = [{"id": f"rec-{i}", "instruction": f"Say {i}.", "response": f"{i}."} for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", rows[::-1][:25] + [{"id": "new", "instruction": "x", "response": "y"}])
    splits = []
    for name in ("a", "b"):
        run(PrecomputeConfig(model=str(tiny_model), dataset=str(tmp_path / f"{name}.jsonl"), out=str(tmp_path / name),
                             top_k=4, heldout_fraction=0.3), show_progress=False)
        t = SoftLabelStore(str(tmp_path / name)).table()
        splits.append(dict(zip(t["record_id"].to_pylist(), t["split"].to_pylist())))
    a, b = splits
    assert 0 < list(a.values()).count("heldout") < 40
    assert all(a[k] == v for k, v in b.items() if k != "new")


def test_rerun_resumes_and_interrupted_run_equals_uninterrupted(tiny_model, dolly, tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real_commit = StoreLocation.write_json_atomic
    calls = {"n": 0}

    def dying_commit(self, data, *parts):
        if parts and parts[-1] == "commit.json":
            calls["n"] += 1
            if calls["n"] == 2:  # killed after writing part 1's arrays, before its commit
                raise KeyboardInterrupt
        return real_commit(self, data, *parts)

    monkeypatch.setattr(StoreLocation, "write_json_atomic", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny_model, dolly, out), show_progress=False)
    monkeypatch.setattr(StoreLocation, "write_json_atomic", real_commit)

    partial = SoftLabelStore(str(out))
    assert [p.name for p in partial.parts] == ["part-000000"]
    # part 1 was written under a staging name that readers do not list, and is redone on resume
    assert not partial.uncommitted and [p for p in (out / "parts").iterdir() if p.name.startswith("part-000001.")]

    summary = run(cfg(tiny_model, dolly, out), show_progress=False)
    assert summary.parts_skipped == 1 and summary.parts_written == 2
    assert contents(str(out)) == contents(str(tiny_store[0]))
    again = run(cfg(tiny_model, dolly, out), show_progress=False)
    assert again.parts_written == 0 and again.parts_skipped == 3


def test_shards_write_disjoint_parts_that_together_equal_one_run(tiny_model, dolly, tiny_store, tmp_path):
    out = tmp_path / "s"
    a = run(cfg(tiny_model, dolly, out, shard="0/2"), show_progress=False)
    assert a.parts_written == 2  # parts 0 and 2
    assert [p.index for p in SoftLabelStore(str(out)).parts] == [0, 2]
    b = run(cfg(tiny_model, dolly, out, shard="1/2"), show_progress=False)
    assert b.parts_written == 1
    assert contents(str(out)) == contents(str(tiny_store[0]))


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls_work_as_out(tiny_model, dolly, tiny_store, tmp_path, scheme):
    url = f"memory://precompute-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path}/s"
    run(cfg(tiny_model, dolly, url), show_progress=False)
    assert contents(url) == contents(str(tiny_store[0]))
    assert verify_store(SoftLabelStore(url)).ok


def test_greedy_augmentation_adds_teacher_responses(tiny_model, dolly, tmp_path):
    out = tmp_path / "s"
    summary = run(cfg(tiny_model, dolly, out, limit=4, augment=["greedy"], max_new_tokens=12), show_progress=False)
    store = SoftLabelStore(str(out))
    table = store.table()
    assert table["source"].to_pylist() == ["original", "teacher_greedy"] * 4
    assert summary.sequences == 8
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for i in (1, 3):
        s = store.sequence(i)
        prompt = torch.from_numpy(s.tokens[: s.prompt_len])[None]
        with torch.no_grad():  # the stored response is the teacher's own greedy decode
            ref = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        generated = ref[0, s.prompt_len :].tolist()
        assert s.targets.tolist() == generated[: len(s.targets)]
        assert s.row["truncated"] == (2 not in generated)
        # and it is scored like the original response: the top-1 is the greedy token
        assert (s.labels.ids[:, 0] == s.targets).all()
    assert verify_store(store).ok


def test_overlong_sequences_are_skipped_or_truncated_and_counted(tiny_model, dolly, tmp_path):
    skipped = run(cfg(tiny_model, dolly, tmp_path / "a", max_length=200), show_progress=False)
    kept = SoftLabelStore(str(tmp_path / "a"))
    assert sum(skipped.dropped.values()) > 0
    assert kept.n_sequences == 12 - sum(skipped.dropped.values())
    assert max(kept.table()["n_tokens"].to_pylist()) <= 200
    # the run's counts are its parts' counts, summed: what each commit.json says
    assert sum((Counter(p.commit["dropped"]) for p in kept.parts), Counter()) == skipped.dropped
    assert (skipped.sequences, skipped.tokens, skipped.supervised_tokens) == \
        (kept.n_sequences, kept.n_tokens, kept.n_supervised_tokens)
    assert set(skipped.to_json()) == {"out", "parts_written", "parts_skipped", "sequences", "supervised_tokens", "tokens",
                                      "dropped", "truncated", "invalid_records", "seconds", "forward_seconds"}

    truncated = run(cfg(tiny_model, dolly, tmp_path / "b", max_length=200, overlong="truncate"), show_progress=False)
    store = SoftLabelStore(str(tmp_path / "b"))
    table = store.table()
    assert truncated.truncated == sum(table["truncated"].to_pylist()) > 0
    assert truncated.truncated == sum(p.commit["truncated"] for p in store.parts)
    assert max(table["n_tokens"].to_pylist()) == 200
    prompt_dropped = sum(v for k, v in truncated.dropped.items() if "prompt" in k)
    assert store.n_sequences == 12 - prompt_dropped
    assert verify_store(store).ok


def test_greedy_responses_are_cut_at_max_length(tiny_model, dolly, tmp_path):
    summary = run(cfg(tiny_model, dolly, tmp_path / "s", limit=6, augment=["greedy"], max_new_tokens=64,
                      max_length=60, overlong="truncate"), show_progress=False)
    table = SoftLabelStore(str(tmp_path / "s")).table()
    greedy = [r for r in table.to_pylist() if r["source"] == "teacher_greedy"]
    assert greedy and max(r["n_tokens"] for r in greedy) <= 60
    cut = [r for r in greedy if r["n_tokens"] == 60]  # stopped by --max-length, not by max_new_tokens (64)
    assert cut and all(r["truncated"] for r in cut)
    assert summary.dropped["teacher_greedy: prompt longer than --max-length"] == 6 - len(greedy)
    assert verify_store(SoftLabelStore(str(tmp_path / "s"))).ok


def test_adaptive_k_keeps_a_prefix_and_moves_the_rest_to_the_tail(tiny_model, tiny_store, dolly, tmp_path):
    """--top-p / --min-prob with --min-k: each position keeps the fewest entries its rule asks for,
    and the top-k mass it leaves out is in the tail; the kept entries are the full store's."""
    out = tmp_path / "adaptive"
    run(cfg(tiny_model, dolly, out, top_p=0.3, min_prob=0.01, min_k=2), show_progress=False)
    full, adaptive = SoftLabelStore(str(tiny_store[0])), SoftLabelStore(str(out))
    assert verify_store(adaptive).ok and adaptive.manifest.selection == {"top_p": 0.3, "min_prob": 0.01, "min_k": 2}
    kept = []
    for i in range(full.n_sequences):
        a, b = full.sequence(i).labels, adaptive.sequence(i).labels
        n = b.n_entries
        kept += n.tolist()
        p = np.exp(a.logprobs.astype(np.float64))
        before = np.cumsum(p, 1) - p
        want = np.maximum(((before < 0.3) & (p >= 0.01)).sum(1), 2)
        # the rule ran on float32 values; these are decoded ones (1/128 nats off): a border case may differ by one
        assert np.abs(n - want).max() <= 1 and (n != want).mean() < 0.05
        for j in range(len(n)):
            assert np.array_equal(b.ids[j, : n[j]], a.ids[j, : n[j]])
            assert np.array_equal(b.logprobs[j, : n[j]], a.logprobs[j, : n[j]])
            assert np.isneginf(b.logprobs[j, n[j]:]).all()
        moved = np.where(np.arange(K) < n[:, None], 0, p).sum(1)
        # against the full store's decoded values: its tail's rounding, and its log-probs' (1/128 nats) on the moved mass
        assert np.all(np.abs(b.tail - (a.tail + moved)) <= 2e-3 * (a.tail + moved) + np.expm1(1 / 128) * moved + 1e-6)
        np.testing.assert_array_equal(b.true_logprob, a.true_logprob)
    assert 2 <= np.mean(kept) < K  # the rule cut something, and kept at least min_k
    assert adaptive.info().bytes_on_disk < full.info().bytes_on_disk


def test_sampled_labels_are_reproducible_draws_that_train(tiny_model, dolly, tmp_path):
    """--labels sampled: N draws per position from the teacher, as distinct ids and counts; the same
    seed gives the same store whatever the batch size; a KD run reads it with --loss sampled only."""
    from typer.testing import CliRunner

    from smoothkd.cli import app

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(cfg(tiny_model, dolly, a, labels="sampled", samples=20, limit=4), show_progress=False)
    run(cfg(tiny_model, dolly, b, labels="sampled", samples=20, limit=4, batch_size=1), show_progress=False)
    run(cfg(tiny_model, dolly, c, labels="sampled", samples=20, limit=4, seed=1), show_progress=False)
    sa, sb, sc = (SoftLabelStore(str(x)) for x in (a, b, c))
    assert verify_store(sa).ok and sa.manifest.label_kind == "sampled" and sa.manifest.top_k == 20
    assert contents(str(a)) == contents(str(b))
    la, lc = sa.sequence(0).labels, sc.sequence(0).labels
    assert (la.counts.sum(1) == 20).all() and np.all(np.diff(la.counts, axis=1) <= 0)
    assert not np.array_equal(la.ids, lc.ids) or not np.array_equal(la.counts, lc.counts)  # another seed, other draws
    # the most drawn id is mostly the teacher's most probable one
    top = SoftLabelStore(str(tmp_path / "a")).sequence(0)
    assert 1 <= la.n_entries.mean() <= 20 and np.isfinite(top.labels.true_logprob).all()

    runner = CliRunner()
    base = ["distill", "student", "--model", str(tiny_model), "--store", str(a), "--max-steps", "2", "--batch-size", "2"]
    wrong = runner.invoke(app, [*base, "--out", str(tmp_path / "r0")])
    assert wrong.exit_code == 2 and "--loss sampled" in " ".join(wrong.stderr.split())
    hot = runner.invoke(app, [*base, "--out", str(tmp_path / "r1"), "--loss", "sampled", "--temperature", "2"])
    assert hot.exit_code == 2 and "temperature 1" in " ".join(hot.stderr.split())
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "r2"), "--loss", "sampled", "--alpha", "1"])
    assert ok.exit_code == 0, ok.stderr


def test_sampled_labels_and_adaptive_k_are_refused_where_they_cannot_run(tiny_model, dolly, tmp_path):
    for kw, message in [(dict(labels="sampled", backend="vllm"), "--labels sampled needs --backend hf"),
                        (dict(labels="sampled", top_p=0.9), "not for --labels sampled"),
                        (dict(min_k=K + 1), "--min-k"), (dict(top_p=1.5), "--top-p"), (dict(labels="x"), "--labels")]:
        with pytest.raises(SmoothkdError, match=message):
            cfg(tiny_model, dolly, tmp_path / "x", **kw).validate(("hf", "vllm"))
