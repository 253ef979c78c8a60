"""How well the offline faithfulness metrics separate summaries humans judged unfaithful.

Reads human-labelled factuality sets from --data-dir (default: the `shared/data` folder beside
the repository). These sets are NOT shipped with the package; each folder's SOURCE.md there says
where a file comes from and what its fields mean. Sets and the labels used:

  SummEval (CNN/DM)  summ_factuality_human/summeval_cnndm_expert_1600.jsonl: faithful when
                     `consistency` (mean of 3 experts, 1-5) is 5, i.e. every expert gave 5;
                     Spearman against the mean consistency.
  QAGS (CNN/DM)      qags_factuality/mturk_cnndm.jsonl: a sentence is factual when most of its 3
                     workers said "yes"; a summary (its sentences joined) is faithful when all its
                     sentences are; Spearman against the share of factual sentences.
  CLIFF (CNN/DM), CLIFF (XSum)
                     summ_factuality_human/cliff_cnndm_xsum_600.jsonl: binary `label` (1 = no
                     error annotated), split by `origin`; no graded label, so no Spearman.
  XSumFaith factual  xsum_hallucination_maynez2020/xsumfaith_with_docs_2500.jsonl: faithful by
                     `factual_majority` (> half of the workers' yes/no votes "yes"), Spearman against
                     `factual_score`; pairs without votes or without a document are skipped.
  XSumFaith halluc.  same file: `faithful_majority` (fewer than half of the workers marked a
                     hallucinated span), Spearman against the share of workers marking none.
                     Both XSumFaith sets leave out the reference system "Gold", as the literature
                     does (Maynez et al. 2020 collected factuality votes for model outputs only).

Metrics, each oriented so that higher = more faithful:
  -unsupported_rate  share of the summary's entities and numbers not found in the article, negated;
                     summaries with no claims count as rate 0 (nothing unsupported).
  rouge_l_article    ROUGE-L F of the summary against its article (overlap proxy).
  With --pmi, from the conditional PMI of each summary token (smoothkd/evaluate/pmi.py; scorer
  --scorer, default the embedded SmolLM2-135M-Instruct; articles cut to --max-article-tokens):
  pmi_mean, pmi_min  mean and minimum over the summary's tokens.
  pmi_entity_mean    mean over the tokens of spaCy's entities and numbers (all tokens when none).
  -pmi_low_share     share of tokens with PMI below a threshold, negated; the threshold is fitted
                     leave-one-set-out (below).
  pmi_faithful       logistic regression (L2 1.0, standardised features) on -unsupported_rate,
                     pmi_mean, pmi_min, -pmi_low_share, pmi_entity_mean: fitted leave-one-set-out.

Leave-one-set-out: whatever is fitted (the threshold, from a grid, by the mean AUC over the
training sets; the regression, on the training sets' pairs pooled) is fitted on the other sets
and reported on the held-out one. The two XSumFaith sets are the same summaries with two labels,
so each is held out together with the other. The fit on all sets together is printed last: those
are the constants pmi.py ships (LOW_PMI_THRESHOLD, COMBINATION) for `smoothkd evaluate`.

AUC is the Mann-Whitney probability that a faithful summary scores above an unfaithful one
(ties count half; 0.5 = chance), with a 95% percentile bootstrap interval (--resamples, seed 0)
that resamples articles, not pairs (a set's summaries of one article are not independent), the
same resamples for every metric. Spearman uses average ranks for ties. For orientation, ROUGE-style
overlap is known to sit near chance (~0.5-0.6 AUC) on these sets; entailment/QA metrics reach ~0.7-0.8.

Subset (--limit N): a set's articles in the order of the SHA-1 of their text (a fixed
pseudo-random order, blind to labels and scores), then the first N pairs in that order (a
set's pairs of one article stay together): the same rule, and N, for every set, and a larger N
extends a smaller one. PMI scores are cached per pair (keyed by a hash of article and summary)
in --cache, a small JSONL (token PMIs to 2 decimals, entity token positions), so the tables are
recomputed from it without the model; pairs missing from it are scored (and appended) first.

    python benchmarks/faithfulness_validation.py [--data-dir DIR] [--limit N] [--batch-size 64]
    python benchmarks/faithfulness_validation.py --pmi --limit 150 [--dtype bfloat16] [--cache FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smoothkd.evaluate import pmi
from smoothkd.evaluate.faithfulness import entity_spans_many, extract_claims_many, score_pair
from smoothkd.evaluate.lookback_classifier import fit_logistic

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).resolve().parent / "results" / "faithfulness_pmi_scores.jsonl"
# Sets holding the same summaries: held out together.
GROUP = {"XSumFaith factual": "XSumFaith", "XSumFaith halluc.": "XSumFaith"}
THRESHOLDS = np.round(np.arange(-3.0, 2.01, 0.25), 2)


@dataclass
class Item:
    article: str
    summary: str
    faithful: bool
    grade: float | None  # graded human score (higher = more faithful), where the set has one


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def summeval(data: Path) -> Iterator[Item]:
    for r in _jsonl(data / "summ_factuality_human" / "summeval_cnndm_expert_1600.jsonl"):
        # The mean of three integer ratings is 5 only when all three are 5; tolerance for float sums.
        yield Item(r["article"], r["summary"], r["consistency"] > 5 - 1e-6, r["consistency"])


def qags(data: Path) -> Iterator[Item]:
    for r in _jsonl(data / "qags_factuality" / "mturk_cnndm.jsonl"):
        factual = [
            2 * sum(v["response"] == "yes" for v in s["responses"]) > len(s["responses"])
            for s in r["summary_sentences"]
        ]
        summary = " ".join(s["sentence"] for s in r["summary_sentences"])
        yield Item(r["article"], summary, all(factual), sum(factual) / len(factual))


def cliff(origin: str) -> Callable[[Path], Iterator[Item]]:
    def load(data: Path) -> Iterator[Item]:
        for r in _jsonl(data / "summ_factuality_human" / "cliff_cnndm_xsum_600.jsonl"):
            if r["origin"] == origin:
                yield Item(r["article"], r["summary"], r["label"] == 1, None)

    return load


def xsumfaith(label: str) -> Callable[[Path], Iterator[Item]]:
    def load(data: Path) -> Iterator[Item]:
        for r in _jsonl(data / "xsum_hallucination_maynez2020" / "xsumfaith_with_docs_2500.jsonl"):
            if r["system"] == "Gold" or r["document"] is None:
                continue
            if label == "factual":
                if r["factual_majority"] is None:
                    continue
                yield Item(r["document"], r["summary"], r["factual_majority"] == 1, r["factual_score"])
            else:
                grade = 1 - r["n_workers_marking_hallucination"] / r["n_workers"]
                yield Item(r["document"], r["summary"], r["faithful_majority"] == 1, grade)

    return load


SETS: dict[str, Callable[[Path], Iterator[Item]]] = {
    "SummEval (CNN/DM)": summeval,
    "QAGS (CNN/DM)": qags,
    "CLIFF (CNN/DM)": cliff("cnndm"),
    "CLIFF (XSum)": cliff("xsum"),
    "XSumFaith factual": xsumfaith("factual"),
    "XSumFaith halluc.": xsumfaith("halluc"),
}


def rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    new_group = np.r_[True, sx[1:] != sx[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new_group) - 1]
    return ranks


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic: P(score of a positive > score of a negative)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = rank(scores)[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def subset(items: list[Item], n: int | None) -> list[Item]:
    """The first n pairs with the set's articles in SHA-1 order (file order within an article)."""
    def article_key(it: Item) -> str:
        return hashlib.sha1(it.article.encode()).hexdigest()

    ordered = sorted(items, key=article_key)  # stable: an article's pairs keep their file order
    return ordered[:n]


def pair_key(it: Item) -> str:
    return hashlib.sha1(f"{it.article}\0{it.summary}".encode()).hexdigest()[:16]


def read_cache(path: Path, identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cached token scores by pair key; refuses a cache written with another scorer or cut."""
    found: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return found
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if {k: row.get(k) for k in identity} != identity:
            sys.exit(f"{path}:{lineno}: scored with {({k: row.get(k) for k in identity})}, not {identity}: "
                     "pass another --cache")
        found[row["key"]] = row
    return found


def score_missing(items: list[Item], cache: dict[str, dict[str, Any]], path: Path, identity: dict[str, Any],
                  args: argparse.Namespace) -> None:
    """Score the pairs the cache lacks, appending each chunk as it is done (a killed run resumes)."""
    todo = list({pair_key(it): it for it in items if pair_key(it) not in cache}.values())
    if not todo:
        return
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    location = resolve(args.scorer)
    tok, model = load_tokenizer(location), load_causal_lm(location, dtype=args.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0, done = time.perf_counter(), 0
    chunk = 4 * args.pmi_batch_size
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        scored = pmi.token_pmi(model, tok, [(it.article, it.summary) for it in part],
                               max_article_tokens=args.max_article_tokens, batch_size=args.pmi_batch_size)
        spans = entity_spans_many(it.summary for it in part)
        with path.open("a", encoding="utf-8") as f:
            for it, ts, sp in zip(part, scored, spans):
                row = {"key": pair_key(it), **identity, "pmi": [round(float(x), 2) for x in ts.pmi],
                       "entity": np.flatnonzero(pmi.entity_token_mask(ts.offsets, sp)).tolist()}
                cache[row["key"]] = row
                f.write(json.dumps(row) + "\n")
        done += len(part)
        print(f"scored {done}/{len(todo)} pairs, {(time.perf_counter() - t0) / done:.2f} s/pair", file=sys.stderr)


def bootstrap_auc(values: dict[str, np.ndarray], faithful: np.ndarray, clusters: np.ndarray, resamples: int,
                  seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each metric's AUC, resampling clusters (articles) with replacement;
    the same resamples for every metric (paired)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    draws: dict[str, list[float]] = {m: [] for m in values}
    for _ in range(resamples):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(ids), len(ids))])
        if faithful[rows].all() or not faithful[rows].any():
            continue  # a resample with one class has no AUC
        for m, v in values.items():
            draws[m].append(auc(v[rows], faithful[rows]))
    return {m: (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if d else (np.nan, np.nan)
            for m, d in draws.items()}


@dataclass
class Scored:
    """One set's pairs with everything the metrics need."""

    items: list[Item]
    base: list[dict[str, Any]]  # score_pair's dict per pair
    tokens: list[dict[str, Any]] | None  # cached PMI rows per pair (with --pmi)

    def faithful(self) -> np.ndarray:
        return np.array([it.faithful for it in self.items])

    def pmi_rows(self, threshold: float) -> list[dict[str, Any]]:
        assert self.tokens is not None
        return [{**pmi.aggregate(np.array(t["pmi"]), np.isin(np.arange(len(t["pmi"])), t["entity"]), threshold),
                 "unsupported_rate": b["unsupported_rate"]} for t, b in zip(self.tokens, self.base)]

    def features(self, threshold: float) -> np.ndarray:
        """[n, 5] combination features; an empty summary (no tokens) gets the set's column means."""
        rows = [pmi.combination_features(r) for r in self.pmi_rows(threshold)]
        x = np.array([r if r is not None else np.full(len(pmi.COMBINATION_FEATURES), np.nan) for r in rows])
        return np.where(np.isnan(x), np.nanmean(x, axis=0), x)


def fit_threshold(train: list[Scored]) -> float:
    """The grid threshold whose -pmi_low_share has the best mean AUC over the training sets."""
    k = pmi.COMBINATION_FEATURES.index("neg_pmi_low_share")
    mean_auc = [np.nanmean([auc(s.features(t)[:, k], s.faithful()) for s in train]) for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.argmax(mean_auc))])


def fit_combination(train: list[Scored], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, std, weights and bias of the logistic regression on the training sets' pairs pooled."""
    x = np.vstack([s.features(threshold) for s in train])
    y = np.concatenate([s.faithful() for s in train]).astype(float)
    mean, std = x.mean(0), x.std(0) + 1e-12
    w, b = fit_logistic((x - mean) / std, y, l2=1.0)
    return mean, std, w, b


def pmi_metrics(sets: dict[str, Scored]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Per set, the PMI metrics (fitted parts leave-one-set-out), and each held-out set's threshold."""
    out: dict[str, dict[str, np.ndarray]] = {}
    thresholds: dict[str, float] = {}
    names = pmi.COMBINATION_FEATURES
    for name, s in sets.items():
        train = [o for n, o in sets.items() if GROUP.get(n, n) != GROUP.get(name, name)]
        t = fit_threshold(train)
        mean, std, w, b = fit_combination(train, t)
        x = s.features(t)
        out[name] = {"pmi_mean": x[:, names.index("pmi_mean")], "pmi_min": x[:, names.index("pmi_min")],
                     "-pmi_low_share": x[:, names.index("neg_pmi_low_share")],
                     "pmi_entity_mean": x[:, names.index("pmi_entity_mean")],
                     "pmi_faithful": ((x - mean) / std) @ w + b}
        thresholds[name] = t
    return out, thresholds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--limit", type=int, default=None, help="the subset's N pairs per set (see above); all without")
    ap.add_argument("--batch-size", type=int, default=64, help="spaCy nlp.pipe batch size")
    ap.add_argument("--pmi", action="store_true", help="add the PMI metrics (scores missing pairs with the scorer)")
    ap.add_argument("--scorer", default=pmi.DEFAULT_SCORER, help="causal LM for PMI: embedded name or directory")
    ap.add_argument("--dtype", default="auto", help="scorer dtype: auto (float32 on CPU), float32, bfloat16")
    ap.add_argument("--max-article-tokens", type=int, default=pmi.DEFAULT_MAX_ARTICLE_TOKENS)
    ap.add_argument("--pmi-batch-size", type=int, default=8, help="pairs per scorer forward pass")
    ap.add_argument("--cache", type=Path, default=CACHE, help="per-pair PMI scores (JSONL)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the AUC intervals")
    ap.add_argument("--score-only", action="store_true", help="fill the cache, print no tables")
    args = ap.parse_args()

    loaded = {name: subset(list(load(args.data_dir)), args.limit) for name, load in SETS.items()}
    identity = {"scorer": args.scorer, "dtype": args.dtype, "max_article_tokens": args.max_article_tokens}
    cache = read_cache(args.cache, identity) if args.pmi else {}
    if args.pmi:
        # Sets in rounds of growing prefixes, so that an interrupted run has scored every set alike.
        step = 25
        rounds = range(step, max(len(v) for v in loaded.values()) + step, step)
        order = [it for n in rounds for items in loaded.values() for it in items[n - step : n]]
        score_missing(order, cache, args.cache, identity, args)
        if args.score_only:
            return

    sets: dict[str, Scored] = {}
    for name, items in loaded.items():
        claims = extract_claims_many((it.summary for it in items), batch_size=args.batch_size)
        base = [score_pair(it.article, it.summary, claims=c) for it, c in zip(items, claims)]
        sets[name] = Scored(items, base, [cache[pair_key(it)] for it in items] if args.pmi else None)
    fitted, thresholds = pmi_metrics(sets) if args.pmi else ({}, {})

    rows: list[str] = []
    pivot: dict[str, dict[str, str]] = {}
    coverage: list[str] = []
    for name, s in sets.items():
        faithful = s.faithful()
        grades = [it.grade for it in s.items]
        metrics = {
            # No claims = nothing unsupported, so rate 0 (the most faithful score), not dropped.
            "-unsupported_rate": np.array([-(b["unsupported_rate"] or 0.0) for b in s.base]),
            "rouge_l_article": np.array([b["rouge_l_article"] for b in s.base]),
            **fitted.get(name, {}),
        }
        clusters = np.unique([it.article for it in s.items], return_inverse=True)[1]
        ci = bootstrap_auc(metrics, faithful, clusters, args.resamples)
        n = f"{len(s.items)} ({int(faithful.sum())}/{int((~faithful).sum())})"
        for metric, values in metrics.items():
            rho = spearman(values, np.array(grades, dtype=float)) if grades[0] is not None else None
            rho_text = "-" if rho is None else f"{rho:.3f}"
            a, (lo, hi) = auc(values, faithful), ci[metric]
            rows.append(f"| {name} | {n} | {clusters.max() + 1} | {metric} | {a:.3f} [{lo:.2f}, {hi:.2f}] | "
                        f"{rho_text} |")
            pivot.setdefault(metric, {})[name] = f"{a:.2f} [{lo:.2f}, {hi:.2f}]"
        with_claims = sum(b["n_claims"] > 0 for b in s.base)
        n_claims = sum(b["n_claims"] for b in s.base)
        n_unsup = sum(len(b["unsupported"]) for b in s.base)
        coverage.append(f"| {name} | {with_claims}/{len(s.items)} | {n_claims / len(s.items):.2f} | "
                        f"{n_unsup / max(n_claims, 1):.3f} |")

    print("| set | n (faithful/unfaithful) | articles | metric | AUC [95% CI] | Spearman |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| metric | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for metric, by_set in pivot.items():
        print(f"| {metric} | " + " | ".join(by_set[n] for n in sets) + " |")
    print()
    print("| set | summaries with >= 1 claim | claims per summary | unsupported share of claims |")
    print("|---|---|---|---|")
    print("\n".join(coverage))
    if args.pmi:
        print()
        print("leave-one-set-out thresholds: " + ", ".join(f"{n}: {t}" for n, t in thresholds.items()))
        everything = list(sets.values())
        t = fit_threshold(everything)
        mean, std, w, b = fit_combination(everything, t)
        print(f"fitted on all sets (pmi.py's constants): LOW_PMI_THRESHOLD = {t}")
        lines = [f'    "{f}": ({m:.4f}, {sd:.4f}, {wt:.4f}),' for f, m, sd, wt in
                 zip(pmi.COMBINATION_FEATURES, mean, std, w)]
        print("COMBINATION = {\n" + "\n".join(lines) + f"\n}}\nCOMBINATION_BIAS = {b:.4f}")


if __name__ == "__main__":
    main()
