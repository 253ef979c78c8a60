"""End to end on the real embedded teacher, SmolLM2-135M-Instruct, on a handful of Dolly records."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.storage_schemas import SoftLabelStore

runner = CliRunner()


def test_precompute_on_smollm2_with_greedy_augmentation(smollm2, dolly, tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(app, [
        "precompute", "teacher", "--model", "smollm2-135m-instruct", "--dataset", str(dolly), "--limit", "3",
        "--top-k", "64", "--augment", "greedy", "--max-new-tokens", "24", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output + result.stderr
    verify = runner.invoke(app, ["store", "verify", str(out), "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"]
    info = json.loads(runner.invoke(app, ["store", "info", str(out), "--json"]).stdout)
    assert info["vocab_size"] == 49152 and info["id_dtype"] == "uint16" and info["top_k"] == 64
    assert info["n_sequences"] == 6
    assert set(info["supervised_tokens_by_source"]) == {"original", "teacher_greedy"}

    store = SoftLabelStore(str(out))
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tol = store.manifest.encoding.max_error + 1e-4
    for seq in (0, 1):  # record 0's Dolly response, then the teacher's own greedy response
        s = store.sequence(seq)
        ended = tok.decode(s.targets.tolist()).endswith("<|im_end|>")
        assert ended != s.row["truncated"]  # a greedy response cut at --max-new-tokens is marked truncated
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(s.tokens)[None]).logits[0].float(), -1)
        ref = lp[s.prompt_len - 1 : -1]
        np.testing.assert_allclose(s.labels.logprobs, ref.topk(64, -1).values.numpy(), atol=tol)
        np.testing.assert_allclose(s.labels.true_logprob, ref.gather(-1, torch.from_numpy(s.targets)[:, None])[:, 0],
                                   atol=tol)
    greedy = store.sequence(1)
    assert greedy.row["source"] == "teacher_greedy"
    assert (greedy.labels.ids[:, 0] == greedy.targets).all()  # greedy tokens are the teacher's top-1


def test_distill_smollm2_from_its_own_store_then_generate(smollm2, dolly, tmp_path):
    """Self-distillation on the real model: precompute, train a few steps, load and generate."""
    store, run_dir = tmp_path / "store", tmp_path / "kd"
    r = runner.invoke(app, ["precompute", "teacher", "--model", "smollm2-135m-instruct", "--dataset", str(dolly),
                            "--limit", "4", "--top-k", "16", "--max-length", "256", "--out", str(store)])
    assert r.exit_code == 0, r.output + r.stderr
    r = runner.invoke(app, ["distill", "student", "--model", "smollm2-135m-instruct", "--store", str(store),
                            "--out", str(run_dir), "--alpha", "0.1", "--max-steps", "2", "--batch-size", "1",
                            "--lr", "1e-5", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and summary["last"]["kd"] > 0
    tok = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


def test_summarize_two_xsum_articles_with_smollm2(smollm2, tmp_path):
    from pathlib import Path

    xsum = Path(__file__).resolve().parents[1] / "data" / "xsum" / "xsum_sample.jsonl"
    r = runner.invoke(app, ["evaluate", "summarization", "--model", "smollm2-135m-instruct", "--dataset", str(xsum),
                            "--limit", "2", "--max-new-tokens", "40", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output + r.stderr
    examples = [json.loads(x) for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 2
    for e in examples:
        assert len(e["summary"].split()) >= 3  # a real sentence, not an empty or degenerate output
        assert 0 <= e["rouge_l_reference"] <= 1 and 0 < e["lookback_ratio"] <= 1
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert metrics["n"] == 2 and metrics["rouge_l"] > 0
