"""Conditional PMI of summary tokens: exact batching on the tiny random model, the real SmolLM2 on
hand-made summaries, and the faithfulness command's PMI fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.evaluate.pmi import (
    aggregate, cut_article, entity_token_mask, score_summaries, token_pmi,
)
from smoothkd.evaluate.config import DEFAULT_INSTRUCTION
from smoothkd.models import load_causal_lm, load_tokenizer
from smoothkd.tokens import instruction_prompt

runner = CliRunner()

ARTICLE = ("Barack Obama met 2,000 factory workers in Chicago on Tuesday. He promised new jobs in the car "
           "industry and said the plant would stay open until 2030. The workers cheered when he left.")
COPIED = "Obama met 2,000 factory workers in Chicago and promised new jobs in the car industry."
INSERTED_SENTENCE = " The Eiffel Tower is painted green every spring by volunteers from Norway."
INSERTED = "Obama met 2,000 factory workers in Chicago." + INSERTED_SENTENCE + " He promised new jobs."


def _plain_logprobs(model, prompt: list[int], summary: list[int]) -> np.ndarray:
    """log p(summary tokens | prompt) from one unpadded full-sequence forward, no cache: the reference."""
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([prompt + summary])).logits[0].float().log_softmax(-1)
    return logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(summary)[:, None])[:, 0].numpy()


def test_batched_equals_one_at_a_time_and_a_plain_forward(tiny_model):
    tok, model = load_tokenizer(str(tiny_model)), load_causal_lm(str(tiny_model))
    long_article = " ".join(["The river rose after the storm and the town closed the bridge."] * 30)
    pairs = [("A cat sat on the mat.", "The cat sat."), (long_article, "The bridge was closed after the storm."),
             ("A cat sat on the mat.", "A dog barked at the cat on the mat all night."),
             ("Short.", "x"), (long_article, ""), ("Rain fell in the city today.", "Rain fell.")]
    batched = token_pmi(model, tok, pairs, max_article_tokens=64, batch_size=4)
    alone = token_pmi(model, tok, pairs, max_article_tokens=64, batch_size=1)
    assert [len(b.ids) for b in batched] == [len(tok(s, add_special_tokens=False)["input_ids"]) for _, s in pairs]
    assert len(batched[4].ids) == 0 and len(batched[3].ids) == 1  # empty and one-token summaries
    for (article, summary), b, a in zip(pairs, batched, alone):
        np.testing.assert_allclose(b.logp_article, a.logp_article, atol=1e-4)
        np.testing.assert_allclose(b.logp_plain, a.logp_plain, atol=1e-4)
        if summary:
            cut = cut_article(tok, article, 64)
            with_article = instruction_prompt(tok, DEFAULT_INSTRUCTION, cut)
            np.testing.assert_allclose(b.logp_article, _plain_logprobs(model, with_article, b.ids), atol=1e-4)
            plain = instruction_prompt(tok, DEFAULT_INSTRUCTION)
            np.testing.assert_allclose(b.logp_plain, _plain_logprobs(model, plain, b.ids), atol=1e-4)
            np.testing.assert_allclose(b.pmi, b.logp_article - b.logp_plain)
    assert len(tok(cut_article(tok, long_article, 64), add_special_tokens=False)["input_ids"]) <= 66
    assert cut_article(tok, "A cat sat on the mat.", 64) == "A cat sat on the mat."


def test_aggregates_and_entity_tokens_by_character_offsets():
    offsets = [(0, 3), (3, 9), (9, 13), (13, 20)]  # "Ann| Smith| met| Parisians"
    assert entity_token_mask(offsets, [(0, 9)]).tolist() == [True, True, False, False]
    assert entity_token_mask(offsets, [(14, 20)]).tolist() == [False, False, False, True]
    pmi = np.array([2.0, 4.0, -1.0, 0.5])
    got = aggregate(pmi, np.array([True, True, False, False]), threshold=0.75)
    assert got == {"pmi_mean": 1.375, "pmi_min": -1.0, "pmi_low_share": 0.5, "pmi_entity_mean": 3.0}
    assert aggregate(pmi, np.zeros(4, bool), threshold=0.75)["pmi_entity_mean"] == 1.375  # none: all tokens
    assert set(aggregate(np.zeros(0), np.zeros(0, bool)).values()) == {None}


def test_smollm2_scores_a_copied_summary_above_one_with_an_unrelated_sentence(smollm2):
    tok, model = load_tokenizer(smollm2), load_causal_lm(smollm2)
    copied, inserted = token_pmi(model, tok, [(ARTICLE, COPIED), (ARTICLE, INSERTED)])
    start = INSERTED.index(INSERTED_SENTENCE) + 1  # the unrelated sentence's characters (not its leading space)
    end = start + len(INSERTED_SENTENCE) - 1
    unrelated = entity_token_mask(inserted.offsets, [(start, end)])
    assert unrelated.sum() >= 10
    # The article explains the copied tokens (PMI well above 0) and not the unrelated ones (at or below 0).
    assert inserted.pmi[unrelated].mean() < 0.5 < 2.0 < inserted.pmi[~unrelated].mean()
    assert copied.pmi.mean() > 2.0
    a, b = score_summaries(model, tok, [(ARTICLE, COPIED), (ARTICLE, INSERTED)])
    assert a["pmi_mean"] > b["pmi_mean"] + 1 and a["pmi_low_share"] < b["pmi_low_share"]
    assert a["pmi_faithful"] > b["pmi_faithful"]
    assert a["n_entity_tokens"] > 0  # Obama, 2,000, Chicago


def test_faithfulness_command_adds_pmi_scores_and_their_means(tmp_path, tiny_model):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"article": ARTICLE, "summary": COPIED, "system": "a"},
            {"article": ARTICLE, "summary": INSERTED, "system": "b"},
            {"article": "Rain fell in Paris.", "summary": "", "system": "c"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "o"),
                            "--scorer", str(tiny_model), "--max-article-tokens", "32", "--batch-size", "2"])
    assert r.exit_code == 0, r.output + r.stderr
    out = [json.loads(x) for x in (tmp_path / "o" / "examples.jsonl").read_text().splitlines()]
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [o["system"] for o in out] == ["a", "b", "c"]
    tok, model = load_tokenizer(str(tiny_model)), load_causal_lm(str(tiny_model))
    direct = score_summaries(model, tok, [(x["article"], x["summary"]) for x in rows], max_article_tokens=32)
    for o, d in zip(out, direct):
        for key in ("pmi_mean", "pmi_min", "pmi_low_share", "pmi_entity_mean", "pmi_faithful"):
            assert o[key] == pytest.approx(d[key], abs=1e-4) if d[key] is not None else o[key] is None
    assert out[2]["pmi_mean"] is None and 0 < out[0]["pmi_faithful"] < 1  # an empty summary has no tokens
    assert saved["metrics"]["pmi_mean"] == pytest.approx((out[0]["pmi_mean"] + out[1]["pmi_mean"]) / 2)
    assert saved["metrics"]["unsupported_rate"] is not None
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "off"),
                            "--no-pmi"])
    assert r.exit_code == 0, r.output + r.stderr
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert "pmi_mean" not in off["metrics"] and "pmi_mean" not in (tmp_path / "off" / "examples.jsonl").read_text()
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "bad"),
                            "--scorer", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.stderr
