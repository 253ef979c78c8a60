"""Summarization faithfulness (the paper's Table 1): greedy summaries of test articles, scored
against the article (unsupported entities and numbers, lookback ratio, HHEM when given)
and the reference (ROUGE-L).

Summaries come from transformers (`generate`, the default) or a vLLM engine (`generate_vllm`):
the same chat-template prompts as token ids, greedy, the same stop ids, the stop token cut off.
The lookback ratio is one teacher-forced transformers pass over each summary either way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate import lookback_classifier as lens
from smoothkd.evaluate.config import DEFAULT_INSTRUCTION
from smoothkd.evaluate.faithfulness import score_pair
from smoothkd.evaluate.lookback import lookback_ratios, summary_lookback
from smoothkd.generation import Generation, greedy, stop_ids
from smoothkd.jsonl import read_jsonl
from smoothkd.tokens import document_prompt, pad_id

if TYPE_CHECKING:
    from smoothkd.vllm_engine import Engine

ARTICLE_FIELDS = ("document", "article")  # XSum, CNN/DailyMail
REFERENCE_FIELDS = ("summary", "highlights")
# Articles per generation call by backend (--batch-size's default): vLLM schedules a call's
# sequences itself and gains from many at once; transformers pads a batch to its longest prompt.
BATCH_SIZES = {"hf": 4, "vllm": 64}
# (prompts' token ids, max_new_tokens) -> each summary's token ids, without the stop token
Summarize = Callable[[list[list[int]], int], list[list[int]]]


@dataclass(frozen=True)
class Article:
    id: str
    text: str
    reference: str | None
    extra: dict[str, Any]


def load_articles(path: str, limit: int | None = None) -> list[Article]:
    """JSONL with an article (`document` or `article`), optional reference (`summary` or `highlights`)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    out = []
    for lineno, row in read_jsonl(p):
        text = next((row[f] for f in ARTICLE_FIELDS if isinstance(row.get(f), str)), None)
        if not text:
            raise InputError(f"{path}:{lineno}: no article text (expected a field {' or '.join(ARTICLE_FIELDS)})")
        ref = next((row[f] for f in REFERENCE_FIELDS if isinstance(row.get(f), str)), None)
        out.append(Article(str(row.get("id", lineno - 1)), text, ref, row))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{path}: no articles")
    return out


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations; the stop token is not part of the summary."""
    stops = stop_ids(tokenizer, model.generation_config)
    return [g.content for g in greedy(model, prompts, max_new_tokens, stops, pad_id(tokenizer))]


def generate_vllm(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`generate` on a vLLM engine over the same model directory (its stop ids are read from the
    directory as transformers reads them)."""
    return [Generation(list(o.token_ids), o.finish_reason == "stop").content
            for o in engine.greedy(prompts, max_new_tokens)]


def load_fc_model(path: str | None) -> Callable[[list[tuple[str, str]]], list[float]] | None:
    """Vectara's HHEM-2.1-open factual-consistency classifier from a local copy of its files, loaded by
    smoothkd's own code (smoothkd/evaluate/hhem.py): nothing from the directory runs."""
    if path is None:
        return None
    from smoothkd.evaluate import hhem

    try:
        return hhem.load(path)
    except SmoothkdError as e:
        raise SmoothkdError(f"--fc-model: {e}") from e


def evaluate_summarization(model: Any, tokenizer: Any, articles: list[Article], max_new_tokens: int = 128,
                           batch_size: int = 4, instruction: str = DEFAULT_INSTRUCTION, max_prompt_tokens: int = 1536,
                           fc_model: str | None = None, lookback: bool = True,
                           lookback_classifier: str | None = None, summarize: Summarize | None = None,
                           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Summaries of `articles` by `summarize` (default: `generate` with `model`), scored. `model`
    (transformers, eager attention) gives the lookback ratios; it may be None with `summarize`
    and no lookback. The result's `generation` says how long summarizing took."""
    summarize = summarize or partial(generate, model, tokenizer)
    if lookback_classifier and not lookback:
        raise SmoothkdError("--lookback-classifier needs the lookback ratios: drop --no-lookback")
    hhem = load_fc_model(fc_model)
    classify = None
    if lookback_classifier:
        n_features = model.config.num_hidden_layers * model.config.num_attention_heads
        classify = lens.load(lookback_classifier, n_features)
    prompts, seen = zip(*[document_prompt(tokenizer, a.text, instruction, max_prompt_tokens) for a in articles])
    examples = []
    generating = 0.0  # seconds in `summarize`, for summaries/s
    for start in range(0, len(articles), batch_size):
        batch = list(range(start, min(start + batch_size, len(articles))))
        t0 = time.perf_counter()
        summaries = summarize([prompts[i] for i in batch], max_new_tokens)
        generating += time.perf_counter() - t0
        for i, gen in zip(batch, summaries):
            a = articles[i]
            summary = tokenizer.decode(gen, skip_special_tokens=True).strip()
            row = {"id": a.id, "summary": summary, "reference": a.reference, "n_summary_tokens": len(gen),
                   "article_cut": len(seen[i]) < len(a.text), **score_pair(seen[i], summary, a.reference)}
            if lookback and gen:
                per_head = summary_lookback(lookback_ratios(model, prompts[i], gen))  # [layers, heads]
                row["lookback_ratio"] = float(per_head.mean())
                if classify is not None:
                    row["lookback_factual_prob"] = classify(per_head.flatten().numpy())
            examples.append(row)
        if progress:
            progress(len(batch))
    if hhem is not None:
        for row, score in zip(examples, hhem([(text, r["summary"]) for text, r in zip(seen, examples)])):
            row["hhem"] = score

    def mean(key: str) -> float | None:
        values = [r[key] for r in examples if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    metrics = {
        "n": len(examples),
        "rouge_l": mean("rouge_l_reference"),
        "unsupported_rate": mean("unsupported_rate"),
        "share_with_unsupported": float(np.mean([len(r["unsupported"]) > 0 for r in examples])),
        "lookback_ratio": mean("lookback_ratio"),
        "hhem": mean("hhem") if hhem is not None else None,
        "lookback_factual_rate": (float(np.mean([r["lookback_factual_prob"] > 0.5 for r in examples
                                                 if "lookback_factual_prob" in r]))
                                  if classify is not None else None),
        "summary_tokens": mean("n_summary_tokens"),
    }
    notes = [] if hhem is not None else ["hhem: not computed (no --fc-model given; HHEM weights are not available offline)"]
    if classify is None:
        notes.append("lookback_factual_rate: not computed (no --lookback-classifier for this model)")
    return {"metrics": metrics, "examples": examples, "notes": notes,
            "generation": {"seconds": generating, "summaries_per_s": len(examples) / generating if generating else None}}
