"""Running a plan: finished steps skipped, the rest in dependency order, each in its own process.

Locally, up to --max-parallel steps run at once as subprocesses; with --ray every step is a Ray
task whose arguments are the tasks it depends on, so Ray orders and places them (one GPU each
where the cluster has GPUs). A failed step is named with its log; the steps that do not depend
on it go on, the ones that do are reported as blocked.

A finished step whose heavy output is not here (a fresh checkout of a sweep whose small files were
committed, stores and model weights not) is `gone`: it counts as done, and runs again only when a
step still to run needs its output. The rebuilt output's digest is checked against the first one.
"""

from __future__ import annotations

import fnmatch
import json
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from smoothkd.errors import InputError
from smoothkd.sweep.plan import REPORT, Plan, Step, output_present
from smoothkd.sweep.layout import DONE_FILE, FAILED_FILE, LOG_FILE, STEP_FILE, write_json_atomic
from smoothkd.sweep.worker import run_in_subprocess, run_in_this_process

SWEEP_FILE = "sweep.json"
DONE, RUNNING, PENDING, PARTIAL, FAILED, BLOCKED, GONE = (
    "done", "running", "pending", "partial", "failed", "blocked", "gone")


@dataclass(frozen=True)
class StepState:
    name: str
    kind: str
    status: str  # done, gone (done, output not here), pending (nothing written), partial (started, resumable),
    # failed, running, blocked
    seconds: float | None  # of the finished step
    cost_tokens: int
    log: str


def step_state(plan: Plan, step: Step) -> StepState:
    d = plan.dir(step.name)
    status, seconds = PENDING, None
    if (d / DONE_FILE).exists():
        status = DONE if output_present(step) else GONE
        seconds = json.loads((d / DONE_FILE).read_text()).get("seconds")
    elif (d / FAILED_FILE).exists():
        status = FAILED
    elif (d / STEP_FILE).exists():
        status = PARTIAL
    return StepState(step.name, step.kind, status, seconds, step.cost_tokens, str(d / LOG_FILE))


def states(plan: Plan) -> list[StepState]:
    return [step_state(plan, s) for s in plan.steps.values()]


def prepare(plan: Plan, overwrite: bool = False) -> None:
    """Claim the sweep directory: refuse one that holds a sweep built from other inputs."""
    identity = _identity(plan)
    record = plan.out / SWEEP_FILE
    if record.exists() and not overwrite:
        saved = json.loads(record.read_text()).get("identity")
        if saved != identity:
            changed = sorted(k for k in set(saved or {}) | set(identity) if (saved or {}).get(k) != identity.get(k))
            raise InputError(f"{plan.out} holds a sweep built differently ({', '.join(changed)} changed); choose "
                             "another out, or pass --overwrite to take the directory over (finished steps whose "
                             "inputs are unchanged are kept, being named by them)")
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"identity": identity, "steps": list(plan.steps)})


def _identity(plan: Plan) -> dict[str, Any]:
    """What makes two sweeps the same experiment: everything but the grid and the evaluations
    (adding a grid value or an evaluation extends a sweep)."""
    f = plan.sweep.file
    return {"name": f.name, "dataset": f.dataset.model_dump(), "teacher": f.teacher.model_dump(),
            "student": f.student.model_dump(), "store": plan.sweep.store, "train": plan.sweep.train}


def select(plan: Plan, only: str | None) -> list[Step]:
    """The steps to run: all, or those matching the glob and every step they need."""
    if only is None:
        return list(plan.steps.values())
    chosen: set[str] = set()
    todo = [n for n in plan.steps if fnmatch.fnmatch(n, only)]
    if not todo:
        raise InputError(f"--only {only!r} matches no step; steps are named like {', '.join(list(plan.steps)[:3])}")
    while todo:
        n = todo.pop()
        if n not in chosen:
            chosen.add(n)
            todo.extend(plan.steps[n].needs)
    return [s for s in plan.steps.values() if s.name in chosen]


def _write_step(plan: Plan, step: Step) -> Path:
    d = plan.dir(step.name)
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / STEP_FILE, {"name": step.name, **{k: v for k, v in asdict(step).items() if k != "name"}})
    return d


def run_plan(plan: Plan, steps: list[Step], max_parallel: int = 1, use_ray: bool = False,
             on_change: Callable[[dict[str, str]], None] = lambda s: None,
             execute: Callable[[Path], bool] = run_in_subprocess) -> dict[str, str]:
    """Run the steps not yet done; name -> final status. `execute` runs one step directory and says
    whether it finished (a subprocess each by default; Ray tasks with use_ray)."""
    status = _to_run(steps, {s.name: step_state(plan, s).status for s in steps})
    on_change(status)
    if use_ray:
        return _run_ray(plan, steps, status, on_change, execute)
    by_name = {s.name: s for s in steps}
    running: dict[Future[bool], str] = {}
    with ThreadPoolExecutor(max_workers=max_parallel) as pool:
        while True:
            for name, st in status.items():
                if st != PENDING:
                    continue
                needs = [status.get(n, DONE) for n in by_name[name].needs]
                if any(x in (FAILED, BLOCKED) for x in needs):
                    status[name] = BLOCKED
                elif all(x == DONE for x in needs) and len(running) < max_parallel:
                    status[name] = RUNNING
                    running[pool.submit(execute, _write_step(plan, by_name[name]))] = name
            on_change(status)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                status[name] = DONE if fut.result() else FAILED
    return status


def _to_run(steps: list[Step], found: dict[str, str]) -> dict[str, str]:
    """done or pending per step: a gone step is done unless a step still to run needs its output
    (a report reads only the small files a run keeps)."""
    by_name = {s.name: s for s in steps}
    rebuild: set[str] = set()
    todo = [n for n, st in found.items() if st not in (DONE, GONE) and by_name[n].kind != REPORT]
    while todo:
        for need in by_name[todo.pop()].needs:
            if found.get(need) == GONE and need not in rebuild:
                rebuild.add(need)
                todo.append(need)
    return {n: DONE if st in (DONE, GONE) and n not in rebuild else PENDING for n, st in found.items()}


def _run_ray(plan: Plan, steps: list[Step], status: dict[str, str], on_change: Callable[[dict[str, str]], None],
             execute: Callable[[Path], bool]) -> dict[str, str]:
    """Every pending step a Ray task taking its dependencies' tasks as arguments: Ray runs each
    once its inputs exist. Precompute steps (the stores) run first, one at a time, on the driver's
    node, as everything else reads them."""
    try:
        import ray
    except ImportError as e:
        raise InputError("--ray needs Ray: pip install 'smoothkd[ray]'") from e
    from smoothkd.sweep.plan import PRECOMPUTE

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    # a store's own --ray-shards tasks, started from a step's process, join this cluster
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # max_calls=1: a fresh worker process per step, so one step's memory is not the next one's
    task = ray.remote(num_gpus=gpus, max_calls=1, max_retries=0)(_ray_step)
    refs: dict[str, Any] = {}
    for s in steps:
        if status[s.name] == DONE:
            continue
        deps = [refs[n] for n in s.needs if n in refs]
        if s.kind == PRECOMPUTE:  # on the driver: Ray shards of a store are the precompute's own --ray-shards
            ray.get(deps)  # the steps it needs (a fine-tuned teacher) have finished
            status[s.name] = RUNNING
            on_change(status)
            status[s.name] = DONE if execute(_write_step(plan, s)) else FAILED
            on_change(status)
            if status[s.name] == FAILED:
                continue
            refs[s.name] = ray.put(True)
            continue
        if any(status.get(n) in (FAILED, BLOCKED) for n in s.needs):
            status[s.name] = BLOCKED
            continue
        refs[s.name] = task.remote(str(_write_step(plan, s)), *deps)
        status[s.name] = RUNNING
    on_change(status)
    pending = {ref: name for name, ref in refs.items() if status[name] == RUNNING}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            status[name] = DONE if ray.get(ready[0]) else FAILED
        except ray.exceptions.RayError:  # the step failed, or one it needs did
            failed_self = (plan.dir(name) / FAILED_FILE).exists()
            status[name] = FAILED if failed_self else BLOCKED
        on_change(status)
    return status


def _ray_step(step_dir: str, *needs: bool) -> bool:
    """A Ray task: the step in the task's own worker process (max_calls=1), its log in its folder."""
    if not all(needs):
        return False
    ok = run_in_this_process(Path(step_dir))
    if not ok:
        raise RuntimeError(f"step failed: see {Path(step_dir) / LOG_FILE}")
    return ok
