"""Each KD group against the SFT group of the same student, store and items: paired differences
per example with a 95% interval, a p-value and a verdict; forgetting against a reference model.

A group's baseline is the plain SFT group (alpha 0, nothing frozen) on the same sources. Runs
of a group are averaged per example (stats.paired_comparison), so a verdict is about these
articles, items and held-out tokens; the spread over seeds is in the report's mean +- std.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from smoothkd.evaluate.stats import Forgetting, PairedComparison, forgetting, paired_comparison
from smoothkd.run_layout import EvalResult

Row = dict[str, Any]


@dataclass(frozen=True)
class PairedMetric:
    kind: str  # the evaluation it comes from
    name: str
    label: str
    higher_is_better: bool
    value: Callable[[Row], float | None]  # the example's value (None: not scored)
    key: Callable[[Row], str]  # what pairs an example across runs


def _field(name: str) -> Callable[[Row], float | None]:
    return lambda r: None if r.get(name) is None else float(r[name])


def _item(r: Row) -> str:
    return f"{r.get('task')}/{r.get('id')}"


PAIRED_METRICS = (
    PairedMetric("summarization", "rouge_l", "ROUGE-L against the reference", True, _field("rouge_l_reference"),
                 lambda r: str(r["id"])),
    PairedMetric("summarization", "unsupported_rate", "unsupported entities and numbers", False,
                 _field("unsupported_rate"), lambda r: str(r["id"])),
    PairedMetric("summarization", "lookback_ratio", "lookback ratio", True, _field("lookback_ratio"),
                 lambda r: str(r["id"])),
    PairedMetric("summarization", "hhem", "HHEM factual consistency", True, _field("hhem"), lambda r: str(r["id"])),
    PairedMetric("summarization", "pmi_faithful", "PMI faithfulness (article-explained tokens, with entities)", True,
                 _field("pmi_faithful"), lambda r: str(r["id"])),
    PairedMetric("summarization", "pmi_mean", "mean token PMI with the article", True, _field("pmi_mean"),
                 lambda r: str(r["id"])),
    PairedMetric("general", "acc_norm", "acc_norm (all tasks' items)", True,
                 lambda r: float(r["pred_norm"] == r["gold"]), _item),
    PairedMetric("calibration", "nll", "NLL per held-out sequence", False, _field("nll"), lambda r: str(r["seq"])),
    PairedMetric("calibration", "accuracy", "top-1 accuracy per held-out sequence", True, _field("accuracy"),
                 lambda r: str(r["seq"])),
    PairedMetric("calibration", "kl_from_reference", "KL from the start model per held-out sequence", False,
                 _field("kl_from_reference"), lambda r: str(r["seq"])),
)


class RunLike(Protocol):
    name: str
    config: dict[str, Any]
    evals: dict[str, EvalResult]

    @property
    def group(self) -> str: ...


@dataclass(frozen=True)
class Verdict:
    group: str
    baseline: str
    eval: str  # the evaluation's name in the report (its kind, or kind:dataset)
    metric: str
    label: str
    stats: PairedComparison
    n_runs: int
    n_baseline_runs: int


def is_baseline(config: dict[str, Any]) -> bool:
    return not config.get("alpha") and not config.get("freeze")


def baseline_of(config: dict[str, Any], groups: dict[str, list[RunLike]]) -> str | None:
    """The plain SFT group on the same sources, if the comparison has one."""
    sources = sorted(config.get("sources") or [])
    for g, members in groups.items():
        c = members[0].config
        if c and is_baseline(c) and sorted(c.get("sources") or []) == sources:
            return g
    return None


def _per_example(runs: list[RunLike], eval_name: str, m: PairedMetric) -> dict[str, list[float]]:
    """example key -> one value per run (examples missing in a run are dropped later)."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        ev = r.evals.get(eval_name)
        if ev is None or ev.kind != m.kind:
            continue
        for row in ev.examples:
            v = m.value(row)
            if v is not None:
                out[m.key(row)].append(v)
    return out


def verdicts(runs: list[RunLike]) -> list[Verdict]:
    groups: dict[str, list[RunLike]] = defaultdict(list)
    for r in runs:
        if r.config:
            groups[r.group].append(r)
    found = []
    for g, members in groups.items():
        c = members[0].config
        base = baseline_of(c, groups)
        if is_baseline(c) or base is None:
            continue
        sft = groups[base]
        evals = sorted({e for r in members for e in r.evals} & {e for r in sft for e in r.evals})
        for eval_name in evals:
            for m in PAIRED_METRICS:
                a, b = _per_example(members, eval_name, m), _per_example(sft, eval_name, m)
                # examples every run of both groups scored, in a fixed order
                keys = sorted(k for k in a if k in b and len(a[k]) == len(members) and len(b[k]) == len(sft))
                if not keys:
                    continue
                kd = np.array([a[k] for k in keys]).T  # [runs, n]
                base_v = np.array([b[k] for k in keys]).T
                found.append(Verdict(g, base, eval_name, m.name, m.label,
                                     paired_comparison(kd, base_v, m.higher_is_better), len(members), len(sft)))
    return found


@dataclass(frozen=True)
class GroupForgetting:
    group: str
    task: str  # a task name, or "all"
    result: Forgetting
    n_runs: int


def group_forgetting(runs: list[RunLike], reference: EvalResult, eval_name: str = "general") -> list[GroupForgetting]:
    """Per group and task: items the reference answered right (acc_norm) that a run gets wrong, and
    the reverse; counts pooled over the group's runs (each run's items counted once per run)."""
    ref = {_item(r): r["pred_norm"] == r["gold"] for r in reference.examples}
    groups: dict[str, list[RunLike]] = defaultdict(list)
    for r in runs:
        if eval_name in r.evals:
            groups[r.group].append(r)
    out = []
    for g, members in groups.items():
        pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
        for r in members:
            for row in r.evals[eval_name].examples:
                k = _item(row)
                if k in ref:
                    pairs[str(row.get("task"))].append((ref[k], row["pred_norm"] == row["gold"]))
        pairs["all"] = [p for task in list(pairs) for p in pairs[task]]
        for task, ps in sorted(pairs.items()):
            if ps:
                was, now = np.array(ps).T
                out.append(GroupForgetting(g, task, forgetting(was, now), len(members)))
    return out
