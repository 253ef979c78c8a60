"""`smoothkd evaluate compare`: runs grouped by their config, mean +- std per metric, plots.

A run is a `distill` run directory (its evaluations under `evals/<kind>/metrics.json`) or
any evaluation directory holding a `metrics.json`. Runs are grouped by (alpha, loss,
sources, temperature) only, so that seeds, learning rates and batch sizes of one config
form a group as in the paper's tables; compare runs of one student and one store at a time.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothkd.errors import InputError

GROUP_KEYS = ("alpha", "loss", "sources", "temperature")
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
    config: dict[str, Any]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        if not self.config:
            return f"{self.path} (not a distill run)"
        c = self.config
        sources = "+".join(sorted(c.get("sources") or []))
        if not c.get("alpha"):  # at alpha 0 the KD loss and temperature play no part
            return f"alpha=0 (SFT) {sources}"
        return f"alpha={c.get('alpha')} {c.get('loss')} {sources} T={c.get('temperature')}"

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, ev in self.evals.items():
            for k, v in ev.get("metrics", {}).items():
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
    record = path / "smoothkd_run.json"
    config = json.loads(record.read_text())["config"] if record.exists() else {}
    run = Run(path.name, path, {k: config.get(k) for k in GROUP_KEYS} if config else {})
    found = sorted(path.glob("evals/*/metrics.json")) + ([path / "metrics.json"] if (path / "metrics.json").exists() else [])
    if not found:
        raise InputError(f"{path}: no evaluations (no evals/*/metrics.json or metrics.json); run `smoothkd evaluate ...` "
                         "with --model on this run first")
    for m in found:
        data = json.loads(m.read_text())
        kind = data.get("kind", m.parent.name)
        run.evals[kind] = data
        ex = m.parent / "examples.jsonl"
        if ex.exists():
            run.examples[kind] = [json.loads(line) for line in ex.read_text().splitlines() if line.strip()]
    return run


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

    calib = [(r.group, r.evals["calibration"]["reliability"]) for r in runs if "calibration" in r.evals]
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

    lookback = [(r.group, [e["lookback_ratio"] for e in r.examples.get("summarization", [])
                           if e.get("lookback_ratio") is not None]) for r in runs]
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


def compare(paths: list[Path], out: Path) -> dict[str, Any]:
    runs = [load_run(p) for p in paths]
    groups = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, groups, out)
    names = sorted({n for g in groups.values() for n in g["metrics"]})
    order = sorted(groups, key=lambda g: (groups[g]["alpha"] is None, groups[g]["alpha"] or 0, g))
    notes = sorted({n for r in runs for ev in r.evals.values() for n in ev.get("notes", [])})

    md = ["# smoothkd comparison", "", f"{len(runs)} runs in {len(groups)} groups (mean +- std over a group's runs).", ""]
    md += ["| metric | " + " | ".join(f"{g} (n={len(groups[g]['runs'])})" for g in order) + " |",
           "|---|" + "---|" * len(order)]
    for n in names:
        md.append(f"| {n} | " + " | ".join(_fmt(groups[g]["metrics"].get(n), n) for g in order) + " |")
    md += ["", "Runs per group:", ""] + [f"- {g}: {', '.join(groups[g]['runs'])}" for g in order]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md += [""] + [f"![{cap}]({file})\n\n{cap}\n" for file, cap in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")

    rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{_fmt(groups[g]['metrics'].get(n), n)}</td>"
                                                                for g in order) + "</tr>" for n in names)
    head = "".join(f"<th>{html.escape(g)} (n={len(groups[g]['runs'])})</th>" for g in order)
    imgs = "".join(f"<figure><img src='{f}'><figcaption>{html.escape(c)}</figcaption></figure>" for f, c in plots)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>smoothkd comparison</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;font-size:13px}figure{display:inline-block;margin:1em}</style>"
        f"<h1>smoothkd comparison</h1><p>{len(runs)} runs in {len(groups)} groups (mean &plusmn; std).</p>"
        f"<table><tr><th>metric</th>{head}</tr>{rows}</table><ul>{note_html}</ul>{imgs}")
    summary = {"groups": groups, "plots": [f for f, _ in plots], "notes": notes}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
