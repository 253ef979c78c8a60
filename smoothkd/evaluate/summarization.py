"""Summarization faithfulness (the paper's Table 1): greedy summaries of test articles, scored
against the article (unsupported entities and numbers, lookback ratio, HHEM when given)
and the reference (ROUGE-L)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.faithfulness import score_pair
from smoothkd.evaluate.lookback import lookback_ratios

ARTICLE_FIELDS = ("document", "article")  # XSum, CNN/DailyMail
REFERENCE_FIELDS = ("summary", "highlights")
DEFAULT_INSTRUCTION = "Summarize the following article in one sentence."


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
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            text = next((row[f] for f in ARTICLE_FIELDS if isinstance(row.get(f), str)), None)
            if not text:
                raise InputError(f"{path}:{lineno}: no article text (expected a field {' or '.join(ARTICLE_FIELDS)})")
            ref = next((row[f] for f in REFERENCE_FIELDS if isinstance(row.get(f), str)), None)
            out.append(Article(str(row.get("id", lineno - 1)), text, ref, row))
    if not out:
        raise InputError(f"{path}: no articles")
    return out


def prompt_ids(tokenizer: Any, article: str, instruction: str, max_prompt_tokens: int) -> list[int]:
    """The chat-formatted prompt, the article cut (at the token level) to fit max_prompt_tokens."""
    def ids(text: str) -> list[int]:
        msg = [{"role": "user", "content": f"{instruction}\n\n{text}"}]
        rendered = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    full = ids(article)
    if len(full) <= max_prompt_tokens:
        return full
    article_ids = tokenizer(article, add_special_tokens=False)["input_ids"]
    keep = max(1, len(article_ids) - (len(full) - max_prompt_tokens))
    return ids(tokenizer.decode(article_ids[:keep]))


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations, cut after the first end-of-turn token."""
    from smoothkd.precompute.backends.hf import _stop_ids

    stop = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: new tokens line up at the end
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=sorted(stop), pad_token_id=pad)
    gens = []
    for row in out[:, width:].tolist():
        end = next((j for j, t in enumerate(row) if t in stop), None)
        gens.append(row if end is None else row[:end])  # the stop token is not part of the summary
    return gens


def load_fc_model(path: str | None) -> Callable[[list[tuple[str, str]]], list[float]] | None:
    """Vectara's HHEM factual-consistency classifier from a local copy of its weights."""
    if path is None:
        return None
    if not Path(path).is_dir():
        raise SmoothkdError(f"--fc-model {path}: no such directory; HHEM needs a local copy of "
                            "vectara/hallucination_evaluation_model (it is not downloaded at run time)")
    from transformers import AutoModelForSequenceClassification

    try:
        hhem = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    except (OSError, ValueError) as e:
        raise SmoothkdError(f"--fc-model {path}: cannot load HHEM ({e})") from e
    return lambda pairs: [float(x) for x in hhem.predict(pairs)]


def evaluate_summarization(model: Any, tokenizer: Any, articles: list[Article], max_new_tokens: int = 128,
                           batch_size: int = 4, instruction: str = DEFAULT_INSTRUCTION, max_prompt_tokens: int = 1536,
                           fc_model: str | None = None, lookback: bool = True,
                           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    hhem = load_fc_model(fc_model)
    prompts = [prompt_ids(tokenizer, a.text, instruction, max_prompt_tokens) for a in articles]
    examples = []
    for start in range(0, len(articles), batch_size):
        batch = list(range(start, min(start + batch_size, len(articles))))
        for i, gen in zip(batch, generate(model, tokenizer, [prompts[i] for i in batch], max_new_tokens)):
            a = articles[i]
            summary = tokenizer.decode(gen, skip_special_tokens=True).strip()
            row = {"id": a.id, "summary": summary, "reference": a.reference, "n_summary_tokens": len(gen),
                   **score_pair(a.text, summary, a.reference)}
            if lookback:
                ratios = lookback_ratios(model, prompts[i], gen)
                row["lookback_ratio"] = float(ratios.mean()) if ratios.numel() else None
            examples.append(row)
        if progress:
            progress(len(batch))
    if hhem is not None:
        for row, score in zip(examples, hhem([(a.text, r["summary"]) for a, r in zip(articles, examples)])):
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
        "summary_tokens": mean("n_summary_tokens"),
    }
    notes = [] if hhem is not None else ["hhem: not computed (no --fc-model given; HHEM weights are not available offline)"]
    return {"metrics": metrics, "examples": examples, "notes": notes}
