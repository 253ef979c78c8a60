"""Resumable checkpoints of a distill run: data, not code.

A checkpoint is a directory, RUN/checkpoint:

    params.safetensors   the trainable weights, by parameter name
    state.safetensors    the optimizer's tensors and the random state, by their place in state.json
    state.json           the rest of the optimizer's and the schedule's state, {"__tensor__": KEY} where
                         a tensor was, {"__tuple__": [...]} and {"__int_keys__": {...}} where JSON has no form
    trainer_state.json   step, epoch, batches done, the run's options; written last, so a directory
                         without it (or with one that does not parse) is not a finished checkpoint

Nothing is unpickled on --resume, so a checkpoint someone hands you cannot run code. Checkpoints
of earlier versions (one pickle, state.pt) load through torch's weights-only unpickler, which
admits tensors and plain containers only, or are refused.

`save` swaps a new checkpoint in: it writes checkpoint.tmp, renames checkpoint to checkpoint.old
and checkpoint.tmp to checkpoint, and removes checkpoint.old. Every file and directory is flushed
to disk (fsync) before the rename that depends on it, so a swap survives a power loss, not only a
kill; `recover`, run at every start and before every save, finishes or rolls back a swap a kill
interrupted.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smoothkd.errors import SmoothkdError
from smoothkd.run_layout import CHECKPOINT
from smoothkd.storage_schemas.fsio import fsync_path

T = TypeVar("T")

PARAMS, TENSORS, STATE, TRAINER = "params.safetensors", "state.safetensors", "state.json", "trainer_state.json"
LEGACY = "state.pt"  # smoothkd before checkpoint format 2: one pickle
FORMAT = 2
_TENSOR, _TUPLE, _INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


@dataclass(frozen=True)
class Checkpoint:
    params: dict[str, torch.Tensor]  # trainable weights, whole, on the CPU
    optimizer: dict[str, Any]  # optimizer.state_dict() (or FSDP's gathered equivalent)
    scheduler: dict[str, Any]  # lr_scheduler.state_dict()
    rng: torch.Tensor  # torch.get_rng_state()
    trainer: dict[str, Any]  # step, epoch, batches_done, run


def _swap_paths(out: Path) -> tuple[Path, Path, Path]:
    return out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.old"


# The write steps (module functions, so that tests can kill a run at each in turn).

def _mkdir(path: Path) -> None:
    path.mkdir()
    fsync_path(path.parent)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    fsync_path(path)


def _rename(src: Path, dst: Path) -> None:
    fsync_path(src)  # its contents (a file's data, a directory's entries) before the name that commits them
    os.rename(src, dst)
    fsync_path(dst.parent)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, data)
    _rename(tmp, path)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An operating-system error while writing a run (a full disk, a read-only --out) as one clear
    error naming the file. safetensors reports its own I/O errors as SafetensorError."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        where = getattr(e, "filename", None) or path
        reason = getattr(e, "strerror", None) or str(e)
        raise SmoothkdError(f"cannot write {where}: {reason}; free space on its disk, or choose a writable "
                            "--out") from e


def _complete(path: Path) -> bool:
    """A finished checkpoint: its trainer state, written last, is there and parses."""
    try:
        return isinstance(json.loads((path / TRAINER).read_text()), dict)
    except (OSError, ValueError):
        return False


def _discard(path: Path) -> None:
    if path.exists():
        _rmtree(path)


def recover(out: Path) -> None:
    """Finish or roll back a swap that a kill interrupted: with no checkpoint in place, the new one
    if it was written whole, else the old one; then drop what is left of either."""
    tmp, final, old = _swap_paths(out)
    if not final.exists():
        for candidate in (tmp, old):  # newer first: killed between the two renames
            if _complete(candidate):
                _rename(candidate, final)
                break
    _discard(tmp)
    _discard(old)


def latest(out: Path) -> Path | None:
    """The checkpoint to resume from (after `recover`)."""
    final = out / CHECKPOINT
    return final if final.exists() else None


def save(out: Path, c: Checkpoint) -> None:
    """Write `c` as out's checkpoint, swapped in atomically (a kill at any point leaves the previous
    checkpoint or this one, once `recover` has run)."""
    tmp, final, old = _swap_paths(out)
    with writing(tmp):
        recover(out)
        _mkdir(tmp)
        try:
            _write_tensors(tmp / PARAMS, c.params)
            tensors: dict[str, torch.Tensor] = {}
            rest = _encode({"format": FORMAT, "optimizer": c.optimizer, "scheduler": c.scheduler, "rng": c.rng},
                           "", tensors)
            _write_tensors(tmp / TENSORS, tensors)
            _write(tmp / STATE, json.dumps(rest, indent=1).encode())
            _write(tmp / TRAINER, json.dumps(c.trainer, indent=2).encode())
        except (OSError, SafetensorError):
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give its space back
            raise
        if final.exists():
            _rename(final, old)
        _rename(tmp, final)
        _discard(old)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of the checkpoint at `path`, checked for the fields resume reads."""
    file = path / TRAINER
    state = _parse(file, lambda f: json.loads(f.read_text()))
    ints = ("step", "epoch", "batches_done")
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ints)
            and isinstance(state.get("run"), dict)):
        raise SmoothkdError(f"{file}: not a smoothkd trainer state (expected {', '.join(ints)} and run); "
                            "the checkpoint is damaged: start a new run, or restore it")
    return state


def load(path: Path) -> Checkpoint:
    """The checkpoint at `path`; a file that does not parse is refused, naming it."""
    trainer = read_trainer_state(path)
    if not (path / STATE).exists() and (path / LEGACY).exists():
        return _load_legacy(path / LEGACY, trainer)
    params = _parse(path / PARAMS, load_file)
    tensors = _parse(path / TENSORS, load_file)
    encoded = _parse(path / STATE, lambda f: json.loads(f.read_text()))
    try:
        rest = _decode(encoded, tensors)
        if rest["format"] != FORMAT:
            raise ValueError(f"checkpoint format {rest['format']!r}, this smoothkd reads {FORMAT}")
        return Checkpoint(params, rest["optimizer"], rest["scheduler"], rest["rng"], trainer)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SmoothkdError(f"{path / STATE}: not a checkpoint state this smoothkd can read ({e!r}); the "
                            "checkpoint is damaged or from another version: start a new run") from e


def _load_legacy(file: Path, trainer: dict[str, Any]) -> Checkpoint:
    """A checkpoint of smoothkd before format 2, through torch's weights-only unpickler: a pickle
    that names anything but tensors and plain containers is refused, not run."""
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        return Checkpoint(blob["params"], blob["optimizer"], blob["scheduler"], blob["rng"], trainer)
    # A damaged file fails in many ways; none of them runs code.
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise SmoothkdError(f"{file}: a checkpoint of an earlier smoothkd that cannot be loaded safely (its pickle "
                            f"holds more than tensors and plain containers, or is damaged: {e}); start a new run, "
                            "or resume it with the smoothkd version that wrote it if you trust the file") from e


def _parse(file: Path, read: Callable[[Path], T]) -> T:
    try:
        return read(file)
    except (OSError, ValueError, SafetensorError) as e:  # ValueError: JSON, UTF-8
        raise SmoothkdError(f"{file}: the checkpoint file cannot be read ({e}); the checkpoint is damaged: "
                            "start a new run, or restore it") from e


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON, each tensor moved to `tensors` under its path in `obj` ("optimizer/state/0/exp_avg")."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict) and not obj.keys() & {_TENSOR, _TUPLE, _INT_KEYS}:
        if all(isinstance(k, str) and "/" not in k for k in obj):
            return {k: _encode(v, f"{key}/{k}".lstrip("/"), tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):  # torch's optimizer state: by index
            return {_INT_KEYS: {str(k): _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}}
    elif isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__} {obj!r:.80} at {key or 'its root'}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _INT_KEYS in obj:
        return {int(k): _decode(v, tensors) for k, v in obj[_INT_KEYS].items()}
    return {k: _decode(v, tensors) for k, v in obj.items()}
