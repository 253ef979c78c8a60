"""Run under torchrun by test_distill: an FSDP run, the same run killed mid-step 4 on every rank
and resumed, so the test can compare them (not a test module itself)."""

from __future__ import annotations

import sys

import torch

from conftest import dies_at_call
from smoothkd.distill import trainer
from smoothkd.distill.config import DistillConfig


def main(model: str, store: str, out: str) -> None:
    def cfg(name: str, resume: bool = False) -> DistillConfig:
        return DistillConfig(model=model, store=store, out=f"{out}/{name}", lr=1e-3, batch_size=2, grad_accum=2,
                             max_steps=6, save_every=2, alpha=0.5, fsdp=True, resume=resume)

    trainer.run(cfg("full"), show_progress=False)
    real = trainer.loss_step
    trainer.loss_step = dies_at_call(real, 8)  # two micro-batches a step: step 4's second
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
