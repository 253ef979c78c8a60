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

AUC is the Mann-Whitney probability that a faithful summary scores above an unfaithful one
(ties count half; 0.5 = chance). Spearman uses average ranks for ties. For orientation, ROUGE-style
overlap is known to sit near chance (~0.5-0.6 AUC) on these sets; entailment/QA metrics reach ~0.7-0.8.

    python benchmarks/faithfulness_validation.py [--data-dir DIR] [--limit N] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoothkd.evaluate.faithfulness import extract_claims_many, score_pair

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--limit", type=int, default=None, help="first N usable items of each set")
    ap.add_argument("--batch-size", type=int, default=64, help="spaCy nlp.pipe batch size")
    args = ap.parse_args()

    rows: list[str] = []
    coverage: list[str] = []
    for name, load in SETS.items():
        t0 = time.perf_counter()
        items = list(load(args.data_dir))[: args.limit]
        claims = extract_claims_many((it.summary for it in items), batch_size=args.batch_size)
        scored = [score_pair(it.article, it.summary, claims=c) for it, c in zip(items, claims)]
        faithful = np.array([it.faithful for it in items])
        grades = [it.grade for it in items]
        metrics = {
            # No claims = nothing unsupported, so rate 0 (the most faithful score), not dropped.
            "-unsupported_rate": np.array([-(s["unsupported_rate"] or 0.0) for s in scored]),
            "rouge_l_article": np.array([s["rouge_l_article"] for s in scored]),
        }
        n = f"{len(items)} ({int(faithful.sum())}/{int((~faithful).sum())})"
        for metric, values in metrics.items():
            rho = spearman(values, np.array(grades, dtype=float)) if grades[0] is not None else None
            rho_text = "-" if rho is None else f"{rho:.3f}"
            rows.append(f"| {name} | {n} | {metric} | {auc(values, faithful):.3f} | {rho_text} |")
        with_claims = sum(s["n_claims"] > 0 for s in scored)
        n_claims = sum(s["n_claims"] for s in scored)
        n_unsup = sum(len(s["unsupported"]) for s in scored)
        coverage.append(
            f"| {name} | {with_claims}/{len(items)} | {n_claims / len(items):.2f} | {n_unsup / max(n_claims, 1):.3f} |"
        )
        print(f"{name}: {len(items)} items in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    print("| set | n (faithful/unfaithful) | metric | AUC | Spearman |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| set | summaries with >= 1 claim | claims per summary | unsupported share of claims |")
    print("|---|---|---|---|")
    print("\n".join(coverage))


if __name__ == "__main__":
    main()
