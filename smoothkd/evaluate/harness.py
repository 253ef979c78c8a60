"""The general tasks through EleutherAI's lm-evaluation-harness (PyPI `lm_eval`, the `lm-eval` extra).

lm-eval scores the loaded model itself (`HFLM(pretrained=model, tokenizer=tokenizer)`, then
`lm_eval.evaluator.evaluate`) on the task configs in smoothkd/evaluate/lm_eval_tasks/: lm-eval's own
definitions of ARC, HellaSwag and OpenBookQA, read from local JSONL files. For each run a temporary
folder holds one YAML per task that includes the shipped config and points `dataset_kwargs.data_files`
at the file `task_file` finds under --data-dir; lm-eval's `limit` keeps the first N items. The
per-sample log (`log_samples`) gives every item's choice log-likelihoods, written to examples.jsonl
with the same fields as the builtin scorer's (smoothkd.evaluate.general.score_task).

The items are also read by smoothkd's own loader first: a malformed line fails with its file and line
before lm-eval starts, the ids are the builtin's, and each lm-eval sample is checked against its item.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.general import MCItem, load_task, predictions, score_task, task_file

TASK_CONFIGS = Path(__file__).parent / "lm_eval_tasks"
# What a doc carries as its id, where it carries one (smoothkd's loader uses the same fields).
_DOC_ID = {"arc_challenge": ("id",), "arc_easy": ("id",), "hellaswag": ("val_index", "ind"), "openbookqa": ()}


def lm_eval_version() -> str | None:
    """The installed lm_eval's version, None when it is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    return importlib.metadata.version("lm_eval")


def write_task_configs(tasks: list[str], data_dir: Path, out: Path) -> dict[str, Path]:
    """One YAML per task in `out`: the shipped config, reading the task's file under data_dir into a
    datasets cache inside `out`. task -> the data file it reads."""
    files = {task: task_file(task, data_dir).resolve() for task in tasks}
    for task, path in files.items():
        config = {"include": str(TASK_CONFIGS / f"{task}.yaml"), "task": task,
                  "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(out / "datasets")}}
        (out / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return files


@contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """No hub look-ups (the data files are local, and nothing may download at run time), and neither
    lm-eval's INFO and WARNING lines (e.g. that --limit is for testing) nor datasets' progress bars on
    the user's terminal; lm-eval's own progress bar stays."""
    # datasets and huggingface_hub read these when first imported, so set them before the imports
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    import datasets

    log = logging.getLogger("lm_eval")
    level, bars_off = log.level, datasets.are_progress_bars_disabled()
    log.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_lm_eval(model: Any, tokenizer: Any, tasks: list[str], data_dir: Path, limit: int | None = None,
                     batch_size: int = 8) -> dict[str, Any]:
    """As smoothkd.evaluate.general.evaluate_general (per task metrics, and every scored item), with
    lm-eval computing the log-likelihoods and acc / acc_norm."""
    if lm_eval_version() is None:
        raise SmoothkdError("--harness lm-eval needs lm-evaluation-harness: pip install 'smoothkd[lm-eval]'")
    # Every task read first, so a bad file fails before lm-eval loads anything.
    items = {task: load_task(task, data_dir, limit) for task in tasks}
    with _offline_and_quiet(), tempfile.TemporaryDirectory(prefix="smoothkd-lm-eval-") as tmp:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        files = write_task_configs(tasks, Path(data_dir), Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        loaded = {}
        for task in tasks:  # one at a time, so that an unreadable file is named
            try:
                loaded[task] = manager.load([task])["tasks"][task]
            except Exception as e:  # datasets' and pyarrow's errors have no common base
                raise InputError(f"{files[task]}: lm-eval cannot read it as {task}: {e}") from e
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm, {"tasks": loaded, "groups": {}}, limit=limit, bootstrap_iters=0, log_samples=True)
    results: dict[str, Any] = {"tasks": {}, "examples": []}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        if len(samples) != len(items[task]):
            raise SmoothkdError(f"{files[task]}: lm-eval scored {len(samples)} items of {task}, smoothkd's reader "
                                f"found {len(items[task])}")
        scored = [_item(task, loaded[task], s, items[task]) for s in samples]
        metrics, examples = score_task([item for item, _ in scored], [lls for _, lls in scored])
        # lm-eval's own aggregates; score_task's agree, since _item checked each sample's outcomes
        metrics.update(acc=out["results"][task]["acc,none"], acc_norm=out["results"][task]["acc_norm,none"])
        results["tasks"][task] = metrics
        results["examples"] += examples
    return results


def _item(task: str, lm_task: Any, sample: dict[str, Any], items: list[MCItem]) -> tuple[MCItem, list[float]]:
    """The item lm-eval scored in this logged sample (its prompt, choices and gold), and its choices'
    log-likelihoods; checked against smoothkd's reading of the same line."""
    doc, ours = sample["doc"], items[sample["doc_id"]]
    lls = [float(ll) for ll, _greedy in sample["filtered_resps"]]
    item = MCItem(task, ours.id, sample["arguments"][0][0], list(lm_task.doc_to_choice(doc)), int(sample["target"]))
    doc_id = next((str(doc[k]) for k in _DOC_ID[task] if k in doc), ours.id)
    pred, pred_norm = predictions(lls, item.choices)
    problems = [what for what, bad in (
        (f"id {doc_id}", doc_id != ours.id), (f"gold {item.gold} (smoothkd: {ours.gold})", item.gold != ours.gold),
        ("acc", float(pred == item.gold) != sample["acc"]),
        ("acc_norm", float(pred_norm == item.gold) != sample["acc_norm"])) if bad]
    if problems:
        raise SmoothkdError(f"{task} item {ours.id} (record {sample['doc_id']}): lm-eval's sample disagrees with "
                            f"smoothkd on {', '.join(problems)}")
    return item, lls
