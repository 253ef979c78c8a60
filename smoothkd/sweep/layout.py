"""What a sweep step's directory holds, for the planner, the runner, the worker and the report.

    <out>/steps/<name>/step.json    the step: kind, resolved config, the steps it needs, its role
    <out>/steps/<name>/log.txt      everything it printed, run after run
    <out>/steps/<name>/done.json    written last, atomically: the step finished (and in how long)
    <out>/steps/<name>/failed.json  its last attempt failed, and why
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STEP_FILE = "step.json"
DONE_FILE = "done.json"
FAILED_FILE = "failed.json"
LOG_FILE = "log.txt"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_step(step_dir: Path) -> dict[str, Any]:
    return json.loads((step_dir / STEP_FILE).read_text())
