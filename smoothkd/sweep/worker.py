"""One step of a sweep, run in its own process (`python -m smoothkd.sweep.worker STEP_DIR`, or as a
Ray task): read the step's resolved config, call its stage's `run(cfg)`, mark it done.

A process per step keeps one step's memory, threads and failure away from the others. A step
that is run again resumes as its stage does: a store from its committed parts, a training run
from its last checkpoint; an evaluation starts over (it writes its files only at the end).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from smoothkd.run_layout import CHECKPOINT, LOSS_LOG, RUN_FILE
from smoothkd.sweep.layout import DONE_FILE, FAILED_FILE, LOG_FILE, read_step, write_json_atomic


def execute_step(step_dir: str | Path) -> dict[str, Any]:
    """Run the step in `step_dir` (its step.json written by the planner); its done record."""
    from smoothkd.sweep import plan as p

    step_dir = Path(step_dir)
    step = read_step(step_dir)
    kind, cfg = step["kind"], step["config"]
    (step_dir / FAILED_FILE).unlink(missing_ok=True)
    # a gone step run again (its output was not kept): its first digest, to check the rebuild against
    done_file = step_dir / DONE_FILE
    before = json.loads(done_file.read_text()).get("output_digest") if done_file.exists() else None
    started = time.perf_counter()
    if kind == p.PRECOMPUTE:
        from smoothkd.precompute.config import PrecomputeConfig
        from smoothkd.precompute.run import run

        if step["role"].get("ray_shards"):
            from smoothkd.precompute.ray_shards import run_on_ray

            run_on_ray(PrecomputeConfig(**cfg), step["role"]["ray_shards"], log=print)
        else:
            run(PrecomputeConfig(**cfg), show_progress=False, log=print)
    elif kind == p.DISTILL:
        from smoothkd.distill.config import DistillConfig
        from smoothkd.distill.trainer import run as train

        train(DistillConfig(**cfg), show_progress=False, log=print)
    elif kind in p.EVAL_KINDS:
        from smoothkd.evaluate import config as ec, run as er

        config_cls = {p.SUMMARIZATION: ec.SummarizationConfig, p.GENERAL: ec.GeneralConfig,
                      p.CALIBRATION: ec.CalibrationConfig}[kind]
        getattr(er, kind)(config_cls(**cfg))
    elif kind == p.REPORT:
        from smoothkd.sweep.report import write_report

        write_report(step_dir.parent, cfg)
    else:
        raise ValueError(f"{step_dir}: unknown step kind {kind!r}")
    done: dict[str, Any] = {"seconds": time.perf_counter() - started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(cfg["out"])
    digest = output_digest(kind, out)
    if digest:
        done["output_digest"] = digest
    if before and digest != before:
        # the steps that read the first output are not re-run: say that they read another one
        done["rebuilt_from"] = before
        print(f"warning: {step_dir.name} was rebuilt and its output differs from the first build's "
              f"({digest[:12]} vs {before[:12]}); steps that finished earlier read the first one")
    if kind == p.DISTILL and out != step_dir:  # the run's small files beside the step's, for the report and git
        for name in (RUN_FILE, LOSS_LOG):
            shutil.copyfile(out / name, step_dir / name)
    write_json_atomic(step_dir / DONE_FILE, done)
    if kind == p.DISTILL and step["role"].get("drop_checkpoint"):
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)  # after done.json: a kill before it can resume
    return done


def output_digest(kind: str, out: Path) -> str | None:
    """sha256 of a step's heavy output: a store's part digests (its commit.json files), a model's weights."""
    from smoothkd.sweep import plan as p

    h = hashlib.sha256()
    if kind == p.PRECOMPUTE:
        commits = sorted(out.glob("parts/*/commit.json"))
        for c in commits:
            h.update(c.parent.name.encode())
            h.update(json.dumps(json.loads(c.read_text()).get("files"), sort_keys=True).encode())
        return h.hexdigest() if commits else None
    if kind == p.DISTILL:
        weights = sorted(out.glob("*.safetensors"))
        for w in weights:
            with open(w, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest() if weights else None
    return None


def main(argv: list[str]) -> int:
    from smoothkd.errors import SmoothkdError

    step_dir = Path(argv[0])
    try:
        execute_step(step_dir)
    except SmoothkdError as e:  # a user error: one line in the log, no traceback
        print(f"error: {e}", file=sys.stderr)
        write_json_atomic(step_dir / FAILED_FILE, {"error": str(e)})
        return 2
    except Exception as e:
        write_json_atomic(step_dir / FAILED_FILE, {"error": f"{type(e).__name__}: {e}"})
        raise
    return 0


def _log_header(log: Any) -> None:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    log.flush()


def run_in_subprocess(step_dir: Path) -> bool:
    """The step in a fresh Python process, its output appended to the step's log; whether it finished."""
    import subprocess

    with open(step_dir / LOG_FILE, "a") as log:
        _log_header(log)
        # unbuffered, so that the log follows a long step as it goes
        proc = subprocess.run([sys.executable, "-m", "smoothkd.sweep.worker", str(step_dir)], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 and not (step_dir / FAILED_FILE).exists():  # killed: it left no record
        write_json_atomic(step_dir / FAILED_FILE, {"error": f"exit code {proc.returncode}"})
    return proc.returncode == 0 and (step_dir / DONE_FILE).exists()


def run_in_this_process(step_dir: Path) -> bool:
    """The step in the calling process (a Ray worker of its own, or a test), its output in the log."""
    import contextlib
    import traceback

    with open(step_dir / LOG_FILE, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        _log_header(log)
        try:
            return main([str(step_dir)]) == 0
        except Exception:
            traceback.print_exc(file=log)
            return False


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()
    sys.exit(main(sys.argv[1:]))
