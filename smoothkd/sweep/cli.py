"""`smoothkd sweep run|status`: the experiment as one command, resumable, with a live table of steps."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from smoothkd.cli_options import friendly
from smoothkd.sweep import runner
from smoothkd.sweep.plan import REPORT_DIR, Plan, build_plan
from smoothkd.sweep.schema import load_sweep

sweep_app = typer.Typer(help="Experiments: a grid of runs from one store, evaluated and compared with a verdict.",
                        no_args_is_help=True)
out = Console()
err = Console(stderr=True)

_STYLE = {runner.DONE: "green", runner.RUNNING: "bold cyan", runner.PENDING: "dim", runner.PARTIAL: "yellow",
          runner.FAILED: "bold red", runner.BLOCKED: "red", runner.GONE: "green"}


def _load(path: Path) -> Plan:
    return build_plan(load_sweep(path))


def _table(plan: Plan, status: dict[str, str], rates: dict[str, float], title: str) -> Table:
    """Counts by status, the steps running or failed, and a time-left estimate from the tokens per
    second of this invocation's finished steps of the same kind."""
    counts = Counter(status.values())
    left, unknown = 0.0, 0
    for name, st in status.items():
        if st in (runner.PENDING, runner.RUNNING, runner.PARTIAL):
            kind = plan.steps[name].kind
            if kind in rates:
                left += plan.steps[name].cost_tokens / rates[kind]
            else:
                unknown += 1
    eta = f"{left / 60:.0f} min" + (f" + {unknown} step(s) not yet timed" if unknown else "") if left or unknown else "-"
    t = Table(title=f"{title}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; left ~{eta}",
              title_justify="left")
    t.add_column("step")
    t.add_column("kind")
    t.add_column("status")
    t.add_column("log")
    for name, st in status.items():
        if st in (runner.RUNNING, runner.FAILED, runner.BLOCKED):
            log = str(plan.dir(name) / runner.LOG_FILE) if st == runner.FAILED else ""
            t.add_row(name, plan.steps[name].kind, f"[{_STYLE[st]}]{st}[/]", log)
    return t


@sweep_app.command("run")
@friendly
def run(
    sweep_file: Path = typer.Argument(..., help="The sweep's YAML file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (steps, done or pending, cost) and stop."),
    only: Optional[str] = typer.Option(None, help="Run only the steps matching this glob (and the steps they need)."),
    ray: bool = typer.Option(False, "--ray", help="Run the steps as Ray tasks (RAY_ADDRESS, else a local cluster)."),
    max_parallel: int = typer.Option(1, min=1, help="Steps run at once on this machine (without --ray)."),
    overwrite: bool = typer.Option(False, help="Take over an out directory that holds a sweep built differently."),
) -> None:
    """Run (or resume) every step of a sweep: teacher fine-tune, store, runs, evaluations, report."""
    plan = _load(sweep_file)
    steps = runner.select(plan, only)
    if dry_run:
        _print_plan(plan, steps)
        return
    runner.prepare(plan, overwrite=overwrite)
    started: dict[str, float] = {}
    rates: dict[str, float] = {}
    seen: dict[str, str] = {}

    def timed(status: dict[str, str]) -> None:
        now = time.perf_counter()
        for name, st in status.items():
            if st == runner.RUNNING and seen.get(name) != runner.RUNNING:
                started[name] = now
                if not err.is_terminal:  # a log file: one line per step started (the live table is for terminals)
                    err.print(f"{time.strftime('%H:%M:%S')} running: {name}", highlight=False)
            if st == runner.DONE and seen.get(name) == runner.RUNNING:
                s = plan.steps[name]
                rate = s.cost_tokens / max(now - started[name], 1e-3)
                rates[s.kind] = rate if s.kind not in rates else (rates[s.kind] + rate) / 2
            if st != seen.get(name) and st in (runner.DONE, runner.FAILED, runner.BLOCKED):
                err.print(f"{time.strftime('%H:%M:%S')} {st}: {name}" + (f"  (log: {plan.dir(name) / runner.LOG_FILE})"
                                              if st == runner.FAILED else ""), highlight=False)
        seen.update(status)

    with Live(console=err, refresh_per_second=1, transient=False) as live:
        def update(status: dict[str, str]) -> None:
            timed(status)
            live.update(_table(plan, status, rates, f"sweep {plan.sweep.file.name}"))

        final = runner.run_plan(plan, steps, max_parallel=max_parallel, use_ray=ray, on_change=update)
    bad = {n: s for n, s in final.items() if s != runner.DONE}
    if bad:
        for n, s in bad.items():
            err.print(f"[bold red]{s}[/]: {n} (log: {plan.dir(n) / runner.LOG_FILE})", highlight=False)
        raise typer.Exit(1)
    out.print(f"[bold green]all {len(final)} steps done[/]; report: {plan.out / REPORT_DIR / 'report.html'}",
              highlight=False)


@sweep_app.command("status")
@friendly
def status(
    sweep_file: Path = typer.Argument(..., help="The sweep's YAML file."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every step of the sweep and whether it is done, partial (resumable), failed or pending."""
    plan = _load(sweep_file)
    rows = runner.states(plan)
    if json_:
        print(json.dumps({"out": str(plan.out), "steps": [asdict(r) for r in rows]}, indent=2))
        return
    _print_plan(plan, list(plan.steps.values()))


def _print_plan(plan: Plan, steps: list) -> None:
    t = Table(title=f"sweep {plan.sweep.file.name} in {plan.out}", title_justify="left")
    for c in ("step", "kind", "status", "~tokens", "needs"):
        t.add_column(c)
    counts: Counter[str] = Counter()
    total = 0
    for s in steps:
        st = runner.step_state(plan, s)
        counts[st.status] += 1
        total += s.cost_tokens if st.status not in (runner.DONE, runner.GONE) else 0
        t.add_row(s.name, s.kind, f"[{_STYLE[st.status]}]{st.status}[/]", f"{s.cost_tokens:,}",
                  ", ".join(s.needs) if len(s.needs) <= 2 else f"{len(s.needs)} steps")
    out.print(t, highlight=False)
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; ~{total:,} tokens to process "
              "(a rough estimate: characters / 4)", highlight=False)
