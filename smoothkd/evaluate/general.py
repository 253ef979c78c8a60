"""General ability (the paper's Table 2): ARC-Challenge, ARC-Easy, HellaSwag and OpenBookQA,
zero-shot, scored as lm-evaluation-harness scores its `multiple_choice` tasks.

Each choice is a continuation " {choice}" of the task's context (no chat template). Its score
is the summed log-probability of the continuation's tokens. acc takes the argmax of those
scores; acc_norm the argmax of score / len(choice) (characters of the choice text, without
the leading space, as lm-eval's `completion_len`). Ties go to the first choice (np.argmax).

This is the builtin scorer (`--harness builtin`); smoothkd.evaluate.harness has lm-eval itself score
the same items (`--harness lm-eval`), and both write their examples through `score_task`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from smoothkd.jsonl import read_jsonl
from smoothkd.errors import InputError, SmoothkdError
from smoothkd.tokens import pad_batch, pad_id

TARGET_DELIMITER = " "  # lm-eval puts this between the context and each choice


@dataclass(frozen=True)
class MCItem:
    task: str
    id: str
    context: str
    choices: list[str]  # choice texts; the continuation scored is TARGET_DELIMITER + choice
    gold: int


_KINDS = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _get(record: dict, key: str, kind: type) -> Any:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is not {_KINDS[kind]}")
    return value


def _strings(record: dict, key: str) -> list[str]:
    values = _get(record, key, list)
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"field {key!r} is not a non-empty list of strings")
    return values


def _gold(gold: int, choices: list[str]) -> int:
    if not all(choices):  # acc_norm divides by each choice's length
        raise ValueError(f"choice {choices.index('')} is empty")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is out of range for {len(choices)} choices")
    return gold


def _arc(task: str) -> Callable[[dict], MCItem]:
    """HF `allenai/ai2_arc` schema; lm-eval `arc_easy.yaml` / `arc_challenge.yaml`."""

    def parse(record: dict) -> MCItem:
        choices = _get(record, "choices", dict)
        texts, labels = _strings(choices, "text"), _strings(choices, "label")
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} choice texts but {len(labels)} labels")
        answer = _get(record, "answerKey", str)
        if answer not in labels:
            raise ValueError(f"gold answerKey {answer!r} is not one of the labels {labels}")
        return MCItem(task, _get(record, "id", str), f"Question: {_get(record, 'question', str)}\nAnswer:",
                      texts, _gold(labels.index(answer), texts))

    return parse


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's `hellaswag/utils.py` preprocess: WikiHow bracket artefacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# In ActivityNet items `ctx` = ctx_a + " " + ctx_b, where ctx_b is the lower-case start of the
# next sentence ("... on a roof. he"). lm-eval capitalises ctx_b; files that kept only `ctx`
# (llama.cpp's dump) lost the split, so take the trailing lower-case fragment after the last
# sentence end as ctx_b. On the full val split this finds 3236 of the 3243 ActivityNet items
# and no WikiHow item (their ctx_b is empty); the other 7 start with a digit or quote, which
# capitalize() leaves alone anyway.
_TRAILING_CTX_B = re.compile(r"(?<=[.!?]) ([a-z][^.!?]*)$")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a `ctx` whose split was lost; ctx_b is "" where none is found."""
    m = _TRAILING_CTX_B.search(ctx)
    return (ctx, "") if m is None else (ctx[: m.start()], m.group(1))


def _hellaswag_ctx(record: dict) -> str:
    if "ctx_a" in record:
        return _get(record, "ctx_a", str) + " " + _get(record, "ctx_b", str).capitalize()
    ctx_a, ctx_b = split_hellaswag_ctx(_get(record, "ctx", str))
    return ctx_a + " " + ctx_b.capitalize() if ctx_b else ctx_a


def _hellaswag(record: dict) -> MCItem:
    """Official / HF schema (ctx_a, ctx_b) or ctx only; lm-eval `hellaswag.yaml` + `utils.process_docs`."""
    label = record.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the HF copy stores it as a string
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError("missing field 'label'" if label is None else "field 'label' is not an integer")
    query = hellaswag_preprocess(_get(record, "activity_label", str) + ": " + _hellaswag_ctx(record))
    choices = [hellaswag_preprocess(e) for e in _strings(record, "endings")]
    item_id = next((str(record[k]) for k in ("val_index", "ind") if k in record), "")
    return MCItem("hellaswag", item_id, query, choices, _gold(label, choices))


def _openbookqa(record: dict) -> MCItem:
    """llm-foundry schema (query = question_stem, choices, gold); lm-eval `openbookqa.yaml`."""
    choices = _strings(record, "choices")
    return MCItem("openbookqa", str(record.get("id", "")), _get(record, "query", str), choices,
                  _gold(_get(record, "gold", int), choices))


TASKS: dict[str, Callable[[dict], MCItem]] = {
    "arc_challenge": _arc("arc_challenge"),
    "arc_easy": _arc("arc_easy"),
    "hellaswag": _hellaswag,
    "openbookqa": _openbookqa,
}


def task_file(task: str, data_dir: Path) -> Path:
    """data_dir/{task}.jsonl, else the first data_dir/{task}*.jsonl, else the first data_dir/{task}/*.jsonl."""
    if task not in TASKS:
        raise SmoothkdError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    data_dir = Path(data_dir)
    exact = data_dir / f"{task}.jsonl"
    if exact.is_file():
        return exact
    patterns = (f"{task}*.jsonl", f"{task}/*.jsonl")
    for pattern in patterns:
        found = sorted(p for p in data_dir.glob(pattern) if p.is_file())
        if found:
            return found[0]
    tried = ", ".join(str(p) for p in (exact, *(data_dir / q for q in patterns)))
    raise InputError(f"no data file for task {task}: tried {tried}")


def load_task(task: str, data_dir: Path, limit: int | None = None) -> list[MCItem]:
    """The first `limit` records (all when None) of the task's JSONL file, as MCItems."""
    path = task_file(task, data_dir)
    parse = TASKS[task]
    items: list[MCItem] = []
    for lineno, record in read_jsonl(path):
        try:
            item = parse(record)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {task}: {e}") from e
        # Files without an id (llm-foundry's OpenBookQA) get their 0-based line number.
        items.append(item if item.id else replace(item, id=str(lineno - 1)))
        if limit is not None and len(items) >= limit:  # stop before reading (and judging) more lines
            break
    if not items:
        raise InputError(f"{path}: no records")
    return items


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: continuation tokens are the tail of tok(context + continuation)
    beyond len(tok(context)), so BPE merges across the boundary are tokenised as in running text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # a trailing space belongs to the continuation's first token in BPE vocabularies
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(tokenizer(context + continuation)["input_ids"])
    context_ids = list(tokenizer(context)["input_ids"])
    return context_ids, whole[len(context_ids):]


def choice_logliks(model: Any, tokenizer: Any, items: list[MCItem], batch_size: int = 8) -> list[list[float]]:
    """Per item, per choice: the summed log-prob of the continuation tokens given the context.
    batch_size counts sequences (context + one choice) per forward pass."""
    requests = []  # (item index, choice index, context ids, continuation ids)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ctx, cont = _encode_pair(tokenizer, item.context, TARGET_DELIMITER + choice)
            if not ctx or not cont:
                raise SmoothkdError(f"{item.task} {item.id}: choice {j} gives an empty "
                                    f"{'context' if not ctx else 'continuation'} after tokenisation")
            requests.append((i, j, ctx, cont))
    # Longest first, so each batch pads little; scores do not depend on the order.
    requests.sort(key=lambda r: -(len(r[2]) + len(r[3])))
    out = [[0.0] * len(item.choices) for item in items]
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            # The last token is never an input: nothing after it is scored. Right padding:
            # real tokens keep positions 0..n-1.
            ids, mask = pad_batch([ctx + cont[:-1] for _, _, ctx, cont in chunk], pad, device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, (i, j, ctx, cont) in enumerate(chunk):
                # logits at position p predict token p + 1: the continuation starts at len(ctx).
                scored = logits[row, len(ctx) - 1:len(ctx) - 1 + len(cont)].float().log_softmax(-1)
                target = torch.tensor(cont, device=scored.device)
                out[i][j] = float(scored.gather(-1, target[:, None]).sum())
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # first of equal maxima, as np.argmax


def predictions(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of the log-likelihoods, and of the
    log-likelihoods divided by each choice's length in characters."""
    return _argmax(logliks), _argmax([ll / len(c) for ll, c in zip(logliks, choices, strict=True)])


def _softmax(logliks: list[float]) -> list[float]:
    top = max(logliks)
    weights = [math.exp(ll - top) for ll in logliks]
    total = sum(weights)
    return [w / total for w in weights]


def evaluate_general(model: Any, tokenizer: Any, tasks: list[str], data_dir: Path, limit: int | None = None,
                     batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """acc, acc_norm and confidence_on_wrong per task, and every scored item.

    confidence_on_wrong: mean over the items acc_norm gets wrong of max(probs), probs being the
    softmax over the choices' summed log-likelihoods (the paper's Appendix A: how sure the
    model is when it is wrong). progress is called with the number of items just scored.
    """
    # Read every task first, so a bad file fails before any scoring.
    loaded = {task: load_task(task, data_dir, limit) for task in tasks}
    results: dict[str, Any] = {"tasks": {}, "examples": []}
    for task, items in loaded.items():
        logliks: list[list[float]] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            logliks += choice_logliks(model, tokenizer, chunk, batch_size)
            if progress:
                progress(len(chunk))
        results["tasks"][task], examples = score_task(items, logliks)
        results["examples"] += examples
    return results


def score_task(items: list[MCItem], logliks: list[list[float]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One task's metrics (n, acc, acc_norm, confidence_on_wrong) and its examples, one per item, from the
    choices' log-likelihoods. Both harnesses write their examples through this, so they carry the same fields."""
    correct = correct_norm = 0
    wrong_confidence = []
    examples = []
    for item, lls in zip(items, logliks, strict=True):
        pred, pred_norm = predictions(lls, item.choices)
        probs = _softmax(lls)
        correct += pred == item.gold
        correct_norm += pred_norm == item.gold
        if pred_norm != item.gold:
            wrong_confidence.append(max(probs))
        examples.append({"task": item.task, "id": item.id, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                         "logliks": lls, "probs": probs})
    metrics = {
        "n": len(items),
        "acc": correct / len(items),
        "acc_norm": correct_norm / len(items),
        "confidence_on_wrong": sum(wrong_confidence) / len(wrong_confidence) if wrong_confidence else None,
    }
    return metrics, examples


def mean_acc_norm(tasks: dict[str, dict[str, Any]]) -> float:
    """The unweighted mean of the tasks' acc_norm (per task: `evaluate_general(...)["tasks"]`)."""
    return sum(t["acc_norm"] for t in tasks.values()) / len(tasks)
