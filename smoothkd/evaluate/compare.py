"""`smoothkd evaluate compare`: runs grouped by their config, mean +- std per metric, plots.

A run is a `distill` run directory (its evaluations under `evals/<kind>/`, see
smoothkd/run_layout.py) or any evaluation directory holding a `metrics.json`. Runs are grouped by (alpha, loss,
sources, temperature) only, so that seeds, learning rates and batch sizes of one config
form a group as in the paper's tables; compare runs of one student and one store at a time.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothkd.errors import InputError
from smoothkd.evaluate.stats import RESAMPLING
from smoothkd.evaluate.verdict import GroupForgetting, Verdict, group_forgetting, verdicts
from smoothkd.run_layout import EVALS_DIR, METRICS_FILE, EvalResult, find_evals, read_run_config

GROUP_KEYS = ("alpha", "loss", "sources", "temperature", "freeze")
# Metrics plotted against alpha, when present: (flat name, label, lower is better)
PLOTTED = (
    ("summarization.rouge_l", "ROUGE-L", False),
    ("summarization.unsupported_rate", "unsupported entities and numbers", True),
    ("summarization.lookback_ratio", "lookback ratio", False),
    ("summarization.hhem", "HHEM factual consistency", False),
    ("calibration.ece", "ECE (held-out tokens)", True),
    ("calibration.nll", "NLL (held-out tokens)", True),
    ("general.mean_acc_norm", "mean acc_norm, general tasks", False),
)


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]  # the run's GROUP_KEYS; empty when the directory is not a distill run
    evals: dict[str, EvalResult] = field(default_factory=dict)  # kind -> evaluation
    label: str = ""  # a reference row's name (the start model, the teacher); runs are named by their group

    @property
    def group(self) -> str:
        if self.label:
            return self.label
        if not self.config:
            return f"{self.path} (not a distill run)"
        c = self.config
        sources = "+".join(sorted(c.get("sources") or []))
        frozen = f" freeze={'+'.join(c['freeze'])}" if c.get("freeze") else ""
        if not c.get("alpha"):  # at alpha 0 the KD loss and temperature play no part
            return f"alpha=0 (SFT) {sources}{frozen}"
        return f"alpha={c.get('alpha')} {c.get('loss')} {sources} T={c.get('temperature')}{frozen}"

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, ev in self.evals.items():
            for k, v in ev.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{kind}.{k}"] = float(v)
                elif isinstance(v, dict):  # general: per task
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                            out[f"{kind}.{k}.{kk}"] = float(vv)
        return out


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise InputError(f"{path}: not a directory")
    config = read_run_config(path)
    evals = find_evals(path)
    if not evals:
        raise InputError(f"{path}: no evaluations (no {EVALS_DIR}/*/{METRICS_FILE} or {METRICS_FILE}); run "
                         "`smoothkd evaluate ...` with --model on this run first")
    return Run(path.name, path, {k: config.get(k) for k in GROUP_KEYS} if config else {}, evals)


def aggregate(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """group -> {"runs": [...], "alpha": ..., "metrics": {name: {"mean", "std", "n"}}}."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    out = {}
    for g, members in groups.items():
        names = sorted({k for r in members for k in r.flat()})
        metrics = {}
        for n in names:
            vals = np.array([r.flat()[n] for r in members if n in r.flat()])
            metrics[n] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                          "n": int(len(vals))}
        out[g] = {"runs": [r.name for r in members], "alpha": members[0].config.get("alpha"),
                  "config": members[0].config, "metrics": metrics}
    return out


def _plots(runs: list[Run], groups: dict[str, dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    by_alpha = {g: v for g, v in groups.items() if v["alpha"] is not None}
    for name, label, lower_better in PLOTTED:
        series = defaultdict(list)  # "loss sources T" -> [(alpha, mean, std)]
        sft = {}  # sources -> the SFT point, which starts every KD curve on the same sources
        for v in by_alpha.values():
            if name in v["metrics"]:
                c, m = v["config"], v["metrics"][name]
                point = (float(v["alpha"]), m["mean"], m["std"])
                sources = "+".join(sorted(c.get("sources") or []))
                if point[0] == 0:
                    sft[sources] = point
                else:
                    series[f"{c.get('loss')} {sources} T={c.get('temperature')}"].append(point)
        for sources, point in sft.items():
            keys = [k for k in series if k.split(" ")[1] == sources] or [f"SFT {sources}"]
            for k in keys:
                series[k].append(point)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, pts in sorted(series.items()):
            pts.sort()
            a = np.array(pts)
            # alpha 0 (SFT) cannot sit on a log axis: plot alphas on a symlog axis
            ax.errorbar(a[:, 0], a[:, 1], yerr=a[:, 2], marker="o", capsize=3, label=key)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel("alpha (0 = SFT)")
        ax.set_ylabel(label + (" (lower is better)" if lower_better else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = f"{name.replace('.', '_')}.png"
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        made.append((file, f"{label} per alpha (mean +- std over the runs of a group)"))

    calib = [(r.group, r.evals["calibration"].extra["reliability"]) for r in runs if "calibration" in r.evals]
    if calib:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
        seen = set()
        for group, bins in calib:
            if group in seen:
                continue
            seen.add(group)
            pts = [(b["confidence"], b["accuracy"]) for b in bins if b["count"]]
            ax.plot(*zip(*pts), marker="o", ms=3, label=group)
        ax.set_xlabel("confidence (top-1)")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability, held-out tokens", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "reliability.png", dpi=120)
        plt.close(fig)
        made.append(("reliability.png", "reliability diagram (first run of each group): points under the "
                                         "diagonal are overconfident"))

    lookback = [(r.group, [e["lookback_ratio"] for e in r.evals["summarization"].examples
                           if e.get("lookback_ratio") is not None]) for r in runs if "summarization" in r.evals]
    lookback = [(g, v) for g, v in lookback if v]
    if lookback:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        merged: dict[str, list[float]] = defaultdict(list)
        for g, v in lookback:
            merged[g] += v
        ax.boxplot(list(merged.values()), tick_labels=[g.replace(" ", "\n", 1) for g in merged], vert=True)
        ax.set_ylabel("mean lookback ratio per summary")
        ax.tick_params(axis="x", labelsize=6)
        fig.tight_layout()
        fig.savefig(out / "lookback.png", dpi=120)
        plt.close(fig)
        made.append(("lookback.png", "lookback ratio per summary, by group (higher: more attention on the article)"))
    return made


def _is_count(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "n" or leaf.startswith("n_")


def _fmt(m: dict[str, Any] | None, name: str) -> str:
    if m is None:
        return "-"
    if _is_count(name) and m["std"] == 0:
        return f"{int(m['mean'])}"
    return f"{m['mean']:.4f} +- {m['std']:.4f}" if m["n"] > 1 else f"{m['mean']:.4f}"


@dataclass(frozen=True)
class Comparison:
    """What `compare` wrote; its metrics.json is `to_json()`."""

    groups: dict[str, dict[str, Any]]  # group -> runs, alpha, config, metrics: {name: {mean, std, n}} (`aggregate`)
    plots: list[str]  # image files in the report directory
    notes: list[str]  # the evaluations' notes, deduplicated
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # group vs SFT per metric (verdict.Verdict)
    forgetting: list[dict[str, Any]] = field(default_factory=list)  # per group and task, against the start model

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(paths: list[Path], out: Path, reference: Path | None = None) -> Comparison:
    """The report over run directories; `reference` (the student's starting model, evaluated on the
    same items) adds its row and forgetting."""
    refs = [dataclasses.replace(load_run(reference), label=REFERENCE_LABEL)] if reference else []
    return report([load_run(p) for p in paths], out, refs)


REFERENCE_LABEL = "start model"


def report(runs: list[Run], out: Path, references: list[Run] = ()) -> Comparison:
    """report.md, report.html, metrics.json and plots in `out`. References (label set) are rows of
    the tables; the one labelled REFERENCE_LABEL is forgetting's baseline."""
    everything = [*references, *runs]
    groups = aggregate(everything)
    out.mkdir(parents=True, exist_ok=True)
    found = verdicts(runs)
    start = next((r for r in references if r.label == REFERENCE_LABEL), None)
    forgot = group_forgetting(runs, start.evals["general"]) if start and "general" in start.evals else []
    plots = _plots(runs, groups, out) + _forest(found, out)
    names = sorted({n for g in groups.values() for n in g["metrics"]})
    order = [r.label for r in references] + sorted(
        {r.group for r in runs}, key=lambda g: (groups[g]["alpha"] is None, groups[g]["alpha"] or 0, g))
    notes = sorted({n for r in everything for ev in r.evals.values() for n in ev.notes})

    sections = [_verdict_section(found), _forgetting_section(forgot, start), _temperature_section(groups, order)]
    md = ["# smoothkd comparison", "", f"{len(runs)} runs in {len(order) - len(references)} groups"
          + (f", {len(references)} reference rows" if references else "") + "."]
    for title, intro, header, rows in sections:
        if rows:
            md += ["", f"## {title}", "", intro, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## All metrics (mean +- std over a group's runs)", ""]
    md += ["| metric | " + " | ".join(f"{g} (n={len(groups[g]['runs'])})" for g in order) + " |",
           "|---|" + "---|" * len(order)]
    for n in names:
        md.append(f"| {n} | " + " | ".join(_fmt(groups[g]["metrics"].get(n), n) for g in order) + " |")
    md += ["", "Runs per group:", ""] + [f"- {g}: {', '.join(groups[g]['runs'])}" for g in order]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md += [""] + [f"![{cap}]({file})\n\n{cap}\n" for file, cap in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def table(header: list[str], rows: list[list[str]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>")

    body = "".join(f"<h2>{html.escape(t)}</h2><p>{html.escape(i)}</p>{table(h, r)}" for t, i, h, r in sections if r)
    all_rows = [[n] + [_fmt(groups[g]["metrics"].get(n), n) for g in order] for n in names]
    body += "<h2>All metrics (mean &plusmn; std over a group's runs)</h2>" + table(
        ["metric"] + [f"{g} (n={len(groups[g]['runs'])})" for g in order], all_rows)
    body += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    body += "".join(f"<figure><img src='{f}'><figcaption>{html.escape(c)}</figcaption></figure>" for f, c in plots)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>smoothkd comparison</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}figure{display:inline-block;margin:1em}"
        ".better{color:#060}.worse{color:#a00}</style>"
        f"<h1>smoothkd comparison</h1><p>{len(runs)} runs.</p>{body}")
    result = Comparison(groups, [f for f, _ in plots], notes, [_verdict_json(v) for v in found],
                        [_forgetting_json(f) for f in forgot])
    (out / "metrics.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {"group": v.group, "baseline": v.baseline, "eval": v.eval, "metric": v.metric, "n_runs": v.n_runs,
            "n_baseline_runs": v.n_baseline_runs, **asdict(v.stats)}


def _forgetting_json(f: GroupForgetting) -> dict[str, Any]:
    return {"group": f.group, "task": f.task, "n_runs": f.n_runs, "forgotten": asdict(f.result.forgotten),
            "learned": asdict(f.result.learned)}


Section = tuple[str, str, list[str], list[list[str]]]


def _verdict_section(found: list[Verdict]) -> Section:
    rows = []
    for v in found:
        c = v.stats
        rows.append([v.group, v.eval, v.label, "higher" if c.higher_is_better else "lower", str(c.n),
                     f"{c.kd_mean:.4f}", f"{c.sft_mean:.4f}", f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]",
                     f"{c.p_value:.3g}", c.verdict])
    return ("Verdict: each group against SFT on the same examples",
            f"Paired per example; {RESAMPLING}; p from a two-sided paired permutation test (9,999 sign flips, "
            "seed 0). A verdict of better or worse needs the interval to exclude 0 and p < 0.05.",
            ["group", "evaluation", "metric", "better", "examples", "group mean", "SFT mean",
             "difference [95% CI]", "p", "verdict"], rows)


def _forgetting_section(found: list[GroupForgetting], start: Run | None) -> Section:
    rows = [[f.group, f.task, f"{f.result.forgotten.rate:.3f} [{f.result.forgotten.ci_low:.3f}, "
             f"{f.result.forgotten.ci_high:.3f}] ({f.result.forgotten.k}/{f.result.forgotten.n})",
             f"{f.result.learned.rate:.3f} [{f.result.learned.ci_low:.3f}, {f.result.learned.ci_high:.3f}] "
             f"({f.result.learned.k}/{f.result.learned.n})"] for f in found]
    return ("Forgetting against the start model (general tasks, acc_norm)",
            f"Forgotten: of the items {start.group if start else 'the start model'} answered right, the share now "
            "wrong; learned: the reverse. Items pooled over a group's runs; 95% Wilson intervals.",
            ["group", "task", "forgotten [95% CI] (k/n)", "learned [95% CI] (k/n)"], rows)


def _temperature_section(groups: dict[str, dict[str, Any]], order: list[str]) -> Section:
    rows = []
    for g in order:
        m = groups[g]["metrics"]
        if "calibration.ece" not in m:
            continue
        cells = [_fmt(m.get(k), k) for k in ("calibration.ece", "calibration.nll", "calibration.temperature",
                                               "calibration.ece_scaled", "calibration.nll_scaled")]
        rows.append([g, *cells])
    return ("Calibration, and the post-hoc fix it must beat",
            "Temperature scaling after training: one temperature per run fitted on the held-out tokens (NLL, "
            "bounded scalar search) and applied to them. KD's calibration gain is worth more than SFT + temperature "
            "only if KD's ECE is below the scaled SFT ECE. (Fitted and scored on the same tokens: optimistic for "
            "the scaled baseline.)",
            ["group", "ECE", "NLL", "fitted T", "ECE scaled", "NLL scaled"], rows)


def _forest(found: list[Verdict], out: Path) -> list[tuple[str, str]]:
    """Per metric, group minus SFT with its 95% interval against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_metric: dict[tuple[str, str], list[Verdict]] = defaultdict(list)
    for v in found:
        by_metric[(v.eval, v.metric)].append(v)
    made = []
    for (ev, metric), vs in sorted(by_metric.items()):
        fig, ax = plt.subplots(figsize=(7, 1.1 + 0.35 * len(vs)))
        ys = np.arange(len(vs))
        d = np.array([v.stats.diff for v in vs])
        err = np.array([[v.stats.diff - v.stats.ci_low for v in vs], [v.stats.ci_high - v.stats.diff for v in vs]])
        ax.errorbar(d, ys, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, c="grey", lw=1, ls="--")
        ax.set_yticks(ys, [v.group for v in vs], fontsize=7)
        better = "higher" if vs[0].stats.higher_is_better else "lower"
        ax.set_xlabel(f"{vs[0].label}\ngroup - SFT, 95% CI ({better} is better)", fontsize=8)
        fig.tight_layout()
        file = f"forest_{ev}_{metric}.png".replace("/", "_")
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        made.append((file, f"{vs[0].label} ({ev}): each group minus SFT, 95% CI"))
    return made
