"""Run under torchrun by test_distill: an FSDP run, the same run killed in step 4 on every rank
and resumed, so the test can compare them (not a test module itself)."""

from __future__ import annotations

import sys

import torch

from smoothkd.distill import trainer
from smoothkd.distill.config import DistillConfig


def main(model: str, store: str, out: str) -> None:
    def cfg(name: str, resume: bool = False) -> DistillConfig:
        return DistillConfig(model=model, store=store, out=f"{out}/{name}", lr=1e-3, batch_size=2, grad_accum=2,
                             max_steps=6, save_every=2, alpha=0.5, fsdp=True, resume=resume)

    trainer.run(cfg("full"), show_progress=False)
    real, calls = trainer.loss_step, {"n": 0}

    def dies_in_step_four(*args, **kwargs):  # two micro-batches per step: call 7 is in step 4
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    trainer.loss_step = dies_in_step_four
    try:
        trainer.run(cfg("cut"), show_progress=False)
        raise SystemExit("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    trainer.loss_step = real
    trainer.run(cfg("cut", resume=True), show_progress=False)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
