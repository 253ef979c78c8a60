"""Summarization faithfulness (the paper's Table 1): greedy summaries of test articles, scored
against the article (unsupported entities and numbers, lookback ratio, HHEM when given)
and the reference (ROUGE-L)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate import lookback_classifier as lens
from smoothkd.evaluate.config import DEFAULT_INSTRUCTION
from smoothkd.evaluate.faithfulness import score_pair
from smoothkd.evaluate.lookback import lookback_ratios, summary_lookback
from smoothkd.generation import greedy, stop_ids
from smoothkd.jsonl import read_jsonl
from smoothkd.tokens import document_prompt, pad_id

ARTICLE_FIELDS = ("document", "article")  # XSum, CNN/DailyMail
REFERENCE_FIELDS = ("summary", "highlights")


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
    return [g.ids[:-1] if g.finished else g.ids
            for g in greedy(model, prompts, max_new_tokens, stops, pad_id(tokenizer))]


def load_fc_model(path: str | None,
                  trust_remote_code: bool = False) -> Callable[[list[tuple[str, str]]], list[float]] | None:
    """Vectara's HHEM factual-consistency classifier from a local copy of its weights. HHEM's
    directory ships its own model code: transformers runs it only with `trust_remote_code`."""
    if path is None:
        return None
    if not Path(path).is_dir():
        raise SmoothkdError(f"--fc-model {path}: no such directory; HHEM needs a local copy of "
                            "vectara/hallucination_evaluation_model (it is not downloaded at run time)")
    from transformers import AutoModelForSequenceClassification

    try:
        hhem = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError) as e:
        # transformers' refusal to run a directory's code without trust_remote_code is a ValueError naming it
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise SmoothkdError(f"--fc-model {path}: loading it runs Python code from that directory (its "
                                "config.json names its own model class); pass --trust-remote-code if you "
                                "trust this copy") from e
        raise SmoothkdError(f"--fc-model {path}: cannot load HHEM ({e})") from e
    return lambda pairs: [float(x) for x in hhem.predict(pairs)]


def evaluate_summarization(model: Any, tokenizer: Any, articles: list[Article], max_new_tokens: int = 128,
                           batch_size: int = 4, instruction: str = DEFAULT_INSTRUCTION, max_prompt_tokens: int = 1536,
                           fc_model: str | None = None, trust_remote_code: bool = False, lookback: bool = True,
                           lookback_classifier: str | None = None,
                           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    if lookback_classifier and not lookback:
        raise SmoothkdError("--lookback-classifier needs the lookback ratios: drop --no-lookback")
    hhem = load_fc_model(fc_model, trust_remote_code)
    classify = None
    if lookback_classifier:
        n_features = model.config.num_hidden_layers * model.config.num_attention_heads
        classify = lens.load(lookback_classifier, n_features)
    prompts, seen = zip(*[document_prompt(tokenizer, a.text, instruction, max_prompt_tokens) for a in articles])
    examples = []
    for start in range(0, len(articles), batch_size):
        batch = list(range(start, min(start + batch_size, len(articles))))
        for i, gen in zip(batch, generate(model, tokenizer, [prompts[i] for i in batch], max_new_tokens)):
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
    return {"metrics": metrics, "examples": examples, "notes": notes}
