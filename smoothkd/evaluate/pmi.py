"""How much the article explains each summary token: conditional pointwise mutual information
from a local causal LM used as a scorer (van der Poel et al. 2022, "Mutual Information Alleviates
Hallucinations in Abstractive Summarization"). Nothing is downloaded: the default scorer is the
embedded SmolLM2-135M-Instruct.

Per summary token y_t:  PMI_t = log p(y_t | article, y_<t) - log p(y_t | y_<t).
A token the article makes likelier (a name, a number copied from it) has high PMI; a token the
model would write as readily without the article (fluent filler) has PMI near 0; a token the
article makes *less* likely than the summary alone does (a detail the article contradicts or
never mentions) has negative PMI.

Prompt format (both conditions share the scorer's chat template and the summary's token ids):

* with the article: the user turn "{instruction}\\n\\n{article}", then the assistant turn that
  starts the summary, exactly as `evaluate summarization` prompts the model it evaluates;
* without: the same user turn with the instruction alone (the prefix minus the article).

The summary is tokenized on its own (no special tokens) and appended to each prompt, so both
conditions score the same tokens. Articles are cut to their first `max_article_tokens` tokens
(default 512) so that one long article cannot dominate the cost.

Batching: the prompts of a batch (its distinct articles, or the one article-free prompt) are read
in one left-padded pass whose key/value cache is then shared by that prompt's summaries, read in
one right-padded pass: an article with many summaries is read once. Explicit position ids and the
attention mask make every row's result what it is alone (tests check batched = one at a time and
= a plain full-sequence forward, within 1e-4).

Per-summary aggregates (see `aggregate`), all but `pmi_low_share` higher = more faithful:
``pmi_mean``, ``pmi_min``, ``pmi_low_share`` (share of tokens with PMI below `LOW_PMI_THRESHOLD`),
``pmi_entity_mean`` (mean over the tokens of spaCy's named entities and numbers; the mean over all
tokens when the summary has none), and ``pmi_faithful``: a logistic regression on those and the
unsupported-entity rate (`COMBINATION`), the probability that the summary is faithful.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from smoothkd.evaluate.config import DEFAULT_INSTRUCTION, FaithfulnessConfig
from smoothkd.tokens import instruction_prompt, pad_batch, pad_id

DEFAULT_SCORER = FaithfulnessConfig.scorer
DEFAULT_MAX_ARTICLE_TOKENS = FaithfulnessConfig.max_article_tokens
# A token whose PMI is below this (nats) counts as unexplained by the article. This and COMBINATION
# were fitted on the six human-labelled validation subsets together (75 pairs each, bfloat16 scorer:
# benchmarks/faithfulness_validation.py --pmi --limit 75 prints them); the validation itself
# reports only leave-one-set-out fits. Small data: treat them as a starting point, not a tuned model.
LOW_PMI_THRESHOLD = 0.75
# Logistic regression of "faithful" on standardised features: feature -> (mean, std, weight).
COMBINATION_FEATURES = ("neg_unsupported_rate", "pmi_mean", "pmi_min", "neg_pmi_low_share", "pmi_entity_mean")
COMBINATION: dict[str, tuple[float, float, float]] = {
    "neg_unsupported_rate": (-0.2221, 0.3502, 0.6638),
    "pmi_mean": (1.7639, 1.0936, -0.0360),
    "pmi_min": (-3.4877, 1.7054, -0.0533),
    "neg_pmi_low_share": (-0.4686, 0.1750, 0.8194),
    "pmi_entity_mean": (2.0938, 1.8010, 0.1539),
}
COMBINATION_BIAS = -0.3595


@dataclass(frozen=True)
class TokenScores:
    """One summary's tokens and their log-probabilities under both conditions."""

    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the summary
    logp_article: np.ndarray  # [n] log p(token | article, summary so far)
    logp_plain: np.ndarray  # [n] log p(token | summary so far)

    @property
    def pmi(self) -> np.ndarray:  # [n]
        return self.logp_article - self.logp_plain


def cut_article(tokenizer: Any, article: str, max_tokens: int) -> str:
    """The article's first `max_tokens` tokens, as text."""
    ids = tokenizer(article, add_special_tokens=False)["input_ids"]
    return article if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _batch_logprobs(model: Any, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                    summaries: Sequence[Sequence[int]], pad: int) -> list[np.ndarray]:
    """log p(summary token | prompt, summary so far) for each summary; summary i follows prompts[rows[i]].

    Two passes: the distinct prompts left-padded (so each ends at the last column and the first
    summary token's distribution is the last position's), then the summaries right-padded behind a
    copy of their prompt's cache."""
    device = next(model.parameters()).device
    p_ids, p_mask = pad_batch(prompts, pad, left=True, device=device)  # [u, P]
    out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)  # [u, V]
    idx = torch.tensor(list(rows), device=device)
    first_ids = torch.tensor([s[0] for s in summaries], device=device)
    logps = [first[idx, first_ids][:, None]]  # [b, 1]
    width = max(len(s) for s in summaries)
    if width > 1:
        cache = out.past_key_values
        cache.batch_select_indices(idx)  # one cache row per summary
        s_ids, s_mask = pad_batch(summaries, pad, device=device)  # [b, S]
        mask = torch.cat([p_mask[idx], s_mask], dim=1)
        positions = p_mask.sum(-1)[idx, None] + torch.arange(width, device=device)  # [b, S]
        logits = model(input_ids=s_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, :-1].float()  # [b, S - 1, V]: position j predicts token j + 1
        target = s_ids[:, 1:, None]
        logps.append((logits.gather(-1, target)[..., 0] - logits.logsumexp(-1)))  # [b, S - 1]
    logp = torch.cat(logps, dim=1).cpu().numpy()  # [b, S]
    return [logp[i, : len(s)].astype(np.float64) for i, s in enumerate(summaries)]


def _condition_logprobs(model: Any, prompts: list[list[int]], prompt_of: list[int], summaries: list[list[int]],
                        batch_size: int, pad: int, progress: Callable[[int], None] | None) -> list[np.ndarray]:
    """Summary log-probs under one condition; pairs sharing a prompt go in the same batch, prompts of
    similar length together (less padding). Empty summaries get empty arrays."""
    found: list[np.ndarray] = [np.zeros(0) for _ in summaries]
    order = sorted((i for i, s in enumerate(summaries) if s), key=lambda i: (len(prompts[prompt_of[i]]), prompt_of[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            distinct = list(dict.fromkeys(prompt_of[i] for i in batch))
            rows = [distinct.index(prompt_of[i]) for i in batch]
            for i, lp in zip(batch, _batch_logprobs(model, [prompts[p] for p in distinct], rows,
                                                    [summaries[i] for i in batch], pad)):
                found[i] = lp
            if progress:
                progress(len(batch))
    return found


def token_pmi(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], instruction: str = DEFAULT_INSTRUCTION,
              max_article_tokens: int = DEFAULT_MAX_ARTICLE_TOKENS, batch_size: int = 8,
              progress: Callable[[int], None] | None = None) -> list[TokenScores]:
    """Per-token scores of each (article, summary) pair, in input order. `progress` is told the
    number of pairs done in each condition (so 2 x len(pairs) in all)."""
    pad = pad_id(tokenizer)
    encoded = [tokenizer(s, add_special_tokens=False, return_offsets_mapping=True) for _, s in pairs]
    summaries = [list(e["input_ids"]) for e in encoded]
    articles = list(dict.fromkeys(a for a, _ in pairs))
    with_article = [instruction_prompt(tokenizer, instruction, cut_article(tokenizer, a, max_article_tokens))
                    for a in articles]
    article_of = {a: k for k, a in enumerate(articles)}
    lp_article = _condition_logprobs(model, with_article, [article_of[a] for a, _ in pairs], summaries, batch_size,
                                     pad, progress)
    lp_plain = _condition_logprobs(model, [instruction_prompt(tokenizer, instruction)], [0] * len(pairs), summaries,
                                   batch_size, pad, progress)
    return [TokenScores(s, [tuple(o) for o in e["offset_mapping"]], a, p)
            for s, e, a, p in zip(summaries, encoded, lp_article, lp_plain)]


def entity_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """[n] whether each token overlaps one of the character spans."""
    return np.array([any(s < e_end and e > e_start for e_start, e_end in spans) for s, e in offsets], dtype=bool)


def aggregate(pmi: np.ndarray, entity: np.ndarray, threshold: float = LOW_PMI_THRESHOLD) -> dict[str, float | None]:
    """One summary's PMI aggregates (None for an empty summary): see the module docstring."""
    if len(pmi) == 0:
        return {"pmi_mean": None, "pmi_min": None, "pmi_low_share": None, "pmi_entity_mean": None}
    return {
        "pmi_mean": float(pmi.mean()),
        "pmi_min": float(pmi.min()),
        "pmi_low_share": float((pmi < threshold).mean()),
        # Summaries without entities fall back to all tokens, so every summary has a value to rank.
        "pmi_entity_mean": float(pmi[entity].mean() if entity.any() else pmi.mean()),
    }


def combination_features(scores: dict[str, Any]) -> np.ndarray | None:
    """The combination's features of a per-summary dict, oriented higher = more faithful (None:
    empty summary). No claims counts as nothing unsupported (rate 0)."""
    if scores["pmi_mean"] is None:
        return None
    values = {"neg_unsupported_rate": -(scores["unsupported_rate"] or 0.0),
              "neg_pmi_low_share": -scores["pmi_low_share"],
              **{k: scores[k] for k in ("pmi_mean", "pmi_min", "pmi_entity_mean")}}
    return np.array([values[f] for f in COMBINATION_FEATURES])


def combine(features: np.ndarray, weights: dict[str, tuple[float, float, float]] = COMBINATION,
            bias: float = COMBINATION_BIAS) -> float:
    """The logistic regression's probability that the summary is faithful."""
    mean, std, w = (np.array([weights[f][k] for f in COMBINATION_FEATURES]) for k in range(3))
    return float(1 / (1 + np.exp(-(((features - mean) / std) @ w + bias))))


def score_summaries(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                    instruction: str = DEFAULT_INSTRUCTION, max_article_tokens: int = DEFAULT_MAX_ARTICLE_TOKENS,
                    batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """For each (article as the summarizer saw it, summary): the PMI aggregates, ``pmi_faithful``
    and ``n_entity_tokens`` (None values for an empty summary). The scorer is any causal LM with a
    chat template; it need not be the model that wrote the summaries."""
    from smoothkd.evaluate.faithfulness import entity_spans_many, extract_claims_many, unsupported_claims

    scored = token_pmi(model, tokenizer, pairs, instruction, max_article_tokens, batch_size, progress)
    summaries = [s for _, s in pairs]
    out = []
    for (article, summary), ts, spans, claims in zip(pairs, scored, entity_spans_many(summaries),
                                                     extract_claims_many(summaries)):
        entity = entity_token_mask(ts.offsets, spans)
        row: dict[str, Any] = {**aggregate(ts.pmi, entity), "n_entity_tokens": int(entity.sum())}
        rate = unsupported_claims(summary, article, claims)["rate"]
        features = combination_features({**row, "unsupported_rate": rate})
        row["pmi_faithful"] = None if features is None else combine(features)
        out.append(row)
    return out


MEAN_KEYS = ("pmi_mean", "pmi_min", "pmi_low_share", "pmi_entity_mean", "pmi_faithful")


def mean_scores(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each per-summary score over the summaries that have one (None: none has)."""
    out: dict[str, float | None] = {}
    for key in MEAN_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
