"""Checkpoints of a distill run: data, not code, and recoverable from a kill at every write step.

The runs here train the tiny model on a store of short sequences (64 tokens), so that a sweep
over every kill point takes seconds."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pathlib
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from smoothkd.distill import checkpoint, trainer
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import run
from smoothkd.errors import SmoothkdError
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run as precompute

from conftest import dies_at_call

WRITE_STEPS = ("_mkdir", "_write", "_write_tensors", "_rename", "_rmtree")
SWAP = ("checkpoint", "checkpoint.tmp", "checkpoint.old")


@pytest.fixture(scope="module")
def short_store(tiny_model, dolly, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoint") / "store"
    precompute(PrecomputeConfig(model=str(tiny_model), dataset=str(dolly), out=str(out), top_k=4, limit=8,
                                part_size=4, max_length=64, overlong="truncate", heldout_fraction=0.0),
               show_progress=False)
    return out


def cfg(tiny_model: Path, store: Path, out: Path, **kw: Any) -> DistillConfig:
    # Saves at steps 2 and 3: a first swap (no checkpoint yet) and one that replaces a checkpoint.
    base = dict(model=str(tiny_model), store=str(store), out=str(out), lr=1e-2, batch_size=2, max_steps=3,
                save_every=2, alpha=0.5)
    return DistillConfig(**{**base, **kw})


def outcome(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The final weights and the log, less its one timing field."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return load_file(out / "model.safetensors"), [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def same(a: tuple[dict[str, torch.Tensor], list[dict]], b: tuple[dict[str, torch.Tensor], list[dict]]) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


@pytest.fixture(scope="module")
def reference(tiny_model, short_store, tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(cfg(tiny_model, short_store, out), show_progress=False)
    return outcome(out)


class Killer:
    """The n-th of checkpoint's write steps that `where(step, path)` selects raises KeyboardInterrupt:
    before it starts, or (torn) half done, as a kill could leave it: a file cut to half its bytes,
    a directory tree with one file removed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, torn: bool = False,
                 where: Callable[[str, Path], bool] = lambda step, path: True):
        self.n, self.torn, self.where, self.calls = n, torn, where, 0
        for name in WRITE_STEPS:
            monkeypatch.setattr(checkpoint, name, self._wrap(name, getattr(checkpoint, name)))

    def _wrap(self, name: str, real: Callable[..., None]) -> Callable[..., None]:
        def step(path: Path, *args: Any) -> None:
            if self.where(name, path):
                self.calls += 1
                if self.calls == self.n:
                    if self.torn and name in ("_write", "_write_tensors"):
                        real(path, *args)
                        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                    elif self.torn and name == "_rmtree":
                        sorted(p for p in path.rglob("*") if p.is_file())[0].unlink()
                    raise KeyboardInterrupt
            real(path, *args)

        return step


def swap_state(out: Path) -> frozenset[str]:
    return frozenset(name for name in SWAP if (out / name).exists())


@pytest.mark.parametrize("torn", [False, True], ids=["before-step", "torn-step"])
def test_a_kill_at_every_write_step_of_the_checkpoint_swap_resumes_to_the_uninterrupted_run(
        tiny_model, short_store, reference, tmp_path, monkeypatch, torn):
    seen = set()
    for n in itertools.count(1):
        out = tmp_path / f"kill-{n}"
        with monkeypatch.context() as m:
            Killer(m, n, torn)
            try:
                run(cfg(tiny_model, short_store, out), show_progress=False)
                break  # n is past the run's last write step
            except KeyboardInterrupt:
                seen.add(swap_state(out))
        logged = len((out / "log.jsonl").read_text().splitlines())  # the step whose save was killed
        said: list[str] = []
        run(cfg(tiny_model, short_store, out, resume=True), show_progress=False, log=said.append)
        resumed_at = int(re.search(r"at step (\d+)", said[0]).group(1)) if said else 0
        # finished or rolled back: the killed save's step, or the save before it (steps 2, 3)
        assert (2 if logged == 3 else 0) <= resumed_at <= logged, f"killed at write step {n}: {said}"
        assert same(outcome(out), reference), f"killed at write step {n}"
        assert swap_state(out) == {"checkpoint"}
    # The kills landed in every state of a swap: between its renames (no checkpoint in place)
    # and after them (the old one still there), the first swap's half-written tmp included.
    assert {frozenset({"checkpoint.tmp", "checkpoint.old"}), frozenset({"checkpoint", "checkpoint.old"}),
            frozenset({"checkpoint.tmp"})} <= seen, seen
    assert n > 12


def _killed_before_its_last_checkpoint(tiny_model: Path, store: Path, out: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed as it starts the step-3 swap: its log holds step 3, its checkpoint step 2."""
    with monkeypatch.context() as m:
        Killer(m, 2, where=lambda step, path: step == "_mkdir" and path.name == "checkpoint.tmp")
        with pytest.raises(KeyboardInterrupt):
            run(cfg(tiny_model, store, out), show_progress=False)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert checkpoint.read_trainer_state(out / "checkpoint")["step"] == 2


@pytest.mark.parametrize("torn", [False, True], ids=["before-step", "torn-step"])
def test_a_kill_at_every_write_step_of_the_log_trim_loses_no_earlier_line(
        tiny_model, short_store, reference, tmp_path, monkeypatch, torn):
    base = tmp_path / "base"
    _killed_before_its_last_checkpoint(tiny_model, short_store, base, monkeypatch)
    for n in itertools.count(1):
        out = tmp_path / f"kill-{n}"
        shutil.copytree(base, out)
        with monkeypatch.context() as m:
            Killer(m, n, torn, where=lambda step, path: path.name.startswith("log"))
            try:
                run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
                break  # n is past the trim's last write step
            except KeyboardInterrupt:
                pass
        lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines][:2] == [1, 2], f"killed at trim step {n}"
        run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
        assert same(outcome(out), reference), f"killed at trim step {n}"
    assert n > 2  # the temporary log's write and its rename


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tiny_model, short_store, reference, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "run"
    _killed_before_its_last_checkpoint(tiny_model, short_store, out, monkeypatch)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "epo')
    run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert same(outcome(out), reference)
    with open(out / "log.jsonl", "a") as f:  # a damaged line before the last is refused, named
        f.write('{"step": 4, "epo\n{"step": 5}\n')
    with pytest.raises(SmoothkdError, match=r"log\.jsonl:4: not a training log record"):
        run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)


def test_a_checkpoint_left_half_removed_by_an_earlier_smoothkd_is_cleaned_up(tiny_model, short_store, reference,
                                                                            tmp_path, monkeypatch):
    """The issue's case: killed after checkpoint.old/state.pt was removed, every later save failed
    with 'Directory not empty'."""
    out = tmp_path / "run"
    _killed_before_its_last_checkpoint(tiny_model, short_store, out, monkeypatch)
    old = out / "checkpoint.old"
    old.mkdir()
    (old / "trainer_state.json").write_text((out / "checkpoint" / "trainer_state.json").read_text())
    run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert same(outcome(out), reference) and not old.exists()


class _Payload:
    """Unpickling this creates `marker`: code that a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant(file: Path, marker: Path) -> None:
    torch.save({"params": _Payload(marker)}, file)


def test_the_planted_pickle_runs_code_when_unpickled_unsafely(tmp_path):
    """The payload the next tests plant is live: torch.load(weights_only=False) runs it."""
    _plant(tmp_path / "state.pt", tmp_path / "ran")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_pickle_planted_as_an_old_format_checkpoint_is_refused_not_run(tiny_model, short_store, tmp_path,
                                                                        monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "ran"
    _killed_before_its_last_checkpoint(tiny_model, short_store, out, monkeypatch)
    ck = out / "checkpoint"
    for name in (checkpoint.PARAMS, checkpoint.TENSORS, checkpoint.STATE):  # as an earlier smoothkd left it
        (ck / name).unlink()
    _plant(ck / "state.pt", marker)
    with pytest.raises(SmoothkdError, match=r"checkpoint/state\.pt: a checkpoint of an earlier smoothkd that "
                                            r"cannot be loaded safely"):
        run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert not marker.exists()


def test_a_pickle_planted_beside_a_checkpoint_is_never_read(tiny_model, short_store, reference, tmp_path,
                                                           monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "ran"
    _killed_before_its_last_checkpoint(tiny_model, short_store, out, monkeypatch)
    _plant(out / "checkpoint" / "state.pt", marker)
    run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert not marker.exists() and same(outcome(out), reference)


def test_an_old_format_checkpoint_of_tensors_loads_with_the_weights_only_unpickler(tiny_model, short_store,
                                                                                   reference, tmp_path):
    """A checkpoint as smoothkd wrote it before format 2 (one torch.save pickle of tensors and
    plain containers) resumes to the same weights."""
    out = tmp_path / "run"
    real = trainer.loss_step
    trainer.loss_step = dies_at_call(real, 3)  # in step 3, after the step-2 checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg(tiny_model, short_store, out), show_progress=False)
    finally:
        trainer.loss_step = real
    ck = out / "checkpoint"
    c = checkpoint.load(ck)
    torch.save({"params": c.params, "optimizer": c.optimizer, "scheduler": c.scheduler, "rng": c.rng},
               ck / checkpoint.LEGACY)
    for name in (checkpoint.PARAMS, checkpoint.TENSORS, checkpoint.STATE):
        (ck / name).unlink()
    run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert same(outcome(out), reference)
    assert not (ck / checkpoint.LEGACY).exists()  # the checkpoint at step 3 was written in format 2


@pytest.mark.parametrize("name,damage", [
    (checkpoint.PARAMS, lambda f: f.write_bytes(f.read_bytes()[:-10])),
    (checkpoint.TENSORS, lambda f: f.write_bytes(b"garbage")),
    (checkpoint.STATE, lambda f: f.write_text("{")),
    (checkpoint.STATE, lambda f: f.write_text(f.read_text().replace('"format": 2', '"format": 9'))),
    (checkpoint.STATE, lambda f: f.write_text(f.read_text().replace("exp_avg_sq\"\n", "nothing\"\n", 1))),
    (checkpoint.TRAINER, lambda f: f.write_bytes(b"\xff\xfe")),
    (checkpoint.TRAINER, lambda f: f.write_text('{"step": 2}')),
], ids=["params-truncated", "tensors-garbage", "state-json", "state-format", "state-dangling-tensor",
        "trainer-utf8", "trainer-fields"])
def test_a_damaged_checkpoint_file_is_refused_naming_it(tiny_model, short_store, tmp_path, monkeypatch, name,
                                                        damage):
    out = tmp_path / "run"
    _killed_before_its_last_checkpoint(tiny_model, short_store, out, monkeypatch)
    damage(out / "checkpoint" / name)
    with pytest.raises(SmoothkdError, match=rf"checkpoint/{name}"):
        run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)


def test_state_round_trips_through_safetensors_and_json(tmp_path):
    """Tuples, int keys, scalar tensors and an FSDP-style state keyed by name come back as they were."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(3)).sum().backward()
    opt.step()
    named = {"state": {"w.weight": {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 3)}},
             "param_groups": [{"params": ["w.weight"], "betas": (0.9, 0.99), "foreach": None}]}
    c = checkpoint.Checkpoint({"weight": model.weight.detach().clone()}, opt.state_dict(), named,
                              torch.get_rng_state(), {"step": 1, "epoch": 0, "batches_done": 1, "run": {}})
    checkpoint.save(tmp_path, c)
    back = checkpoint.load(tmp_path / "checkpoint")
    assert back.scheduler["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back.optimizer["param_groups"] == opt.state_dict()["param_groups"]
    for k, state in opt.state_dict()["state"].items():
        assert all(torch.equal(v, back.optimizer["state"][k][name]) for name, v in state.items())
    assert torch.equal(back.rng, c.rng) and torch.equal(back.params["weight"], c.params["weight"])
    with pytest.raises(TypeError, match="cannot hold object"):
        checkpoint.save(tmp_path, checkpoint.Checkpoint({}, {"x": object()}, {}, c.rng, c.trainer))


def test_a_full_disk_while_saving_a_checkpoint_is_a_clear_error_and_keeps_the_last_one(
        tiny_model, short_store, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = checkpoint.save_file, []

    def full_at_the_second_save(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) > 2:  # two files a save
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_second_save)
    with pytest.raises(SmoothkdError, match=r"cannot write .*checkpoint\.tmp: .*StorageFull.*free space"):
        run(cfg(tiny_model, short_store, out), show_progress=False)
    assert swap_state(out) == {"checkpoint"}  # the half-written one gave its space back
    assert checkpoint.read_trainer_state(out / "checkpoint")["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    run(cfg(tiny_model, short_store, out, resume=True), show_progress=False)
    assert same(outcome(out), reference)


def test_a_full_disk_while_saving_the_model_is_a_clear_error_naming_the_file(tiny_model, short_store, tmp_path,
                                                                           monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "run"

    def no_space(self: Any, path: Path, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(SmoothkdError, match=rf"cannot write {out}/model\.safetensors: No space left on device"):
        run(cfg(tiny_model, short_store, out), show_progress=False)
    assert not (out / "smoothkd_run.json").exists()


def test_a_read_only_out_is_a_clear_error_simulated_by_a_raising_mkdir_as_root_ignores_chmod(
        tiny_model, short_store, tmp_path, monkeypatch):
    out = tmp_path / "read-only" / "run"
    real = pathlib.Path.mkdir

    def read_only(self: Path, *args: Any, **kw: Any) -> None:
        if str(self).startswith(str(out.parent)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real(self, *args, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    with pytest.raises(SmoothkdError, match=rf"cannot write {out}: Read-only file system"):
        run(cfg(tiny_model, short_store, out), show_progress=False)


def test_a_non_finite_loss_stops_the_run_at_its_step_naming_the_last_checkpoint(tiny_model, short_store, tmp_path,
                                                                              monkeypatch):
    real, calls = trainer.loss_step, []

    def nan_from_step_3(*args: Any, **kw: Any) -> tuple[torch.Tensor, dict[str, float]]:
        calls.append(None)
        loss, stats = real(*args, **kw)
        return (loss * float("nan") if len(calls) >= 3 else loss), stats

    monkeypatch.setattr(trainer, "loss_step", nan_from_step_3)
    out = tmp_path / "run"
    with pytest.raises(SmoothkdError, match=rf"step 3: the loss is not finite .* The last good checkpoint is "
                                            rf"{out}/checkpoint \(step 2\)"):
        run(cfg(tiny_model, short_store, out, max_steps=4), show_progress=False)
    assert not (out / "model.safetensors").exists() and not (out / "smoothkd_run.json").exists()
    assert checkpoint.read_trainer_state(out / "checkpoint")["step"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_a_temperature_that_overflows_the_logits_stops_the_run_at_step_1(tiny_model, short_store, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SmoothkdError, match="step 1: the loss is not finite .* No checkpoint was saved before it"):
        run(cfg(tiny_model, short_store, out, temperature=1e-38), show_progress=False)
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
