"""The configuration of `smoothkd distill student`: one frozen dataclass, documented once."""

from __future__ import annotations

from dataclasses import dataclass

from smoothkd.checks import count, number
from smoothkd.errors import SmoothkdError
from smoothkd.models import DEFAULT_MODEL
from smoothkd.options import COMMA_LIST, opt
from smoothkd.storage_schemas.spec import SOURCES

FREEZE_GROUPS = ("embed", "attn", "mlp", "norm", "lm_head")  # and layers:A-B


@dataclass(frozen=True)
class DistillConfig:
    """resume=False marks what a resumed run may change; the rest fixes its data order, schedule or trained parameters."""

    store: str = opt("", "Soft-label store written by `smoothkd precompute teacher`.", required=True)
    out: str = opt("", "Run directory: the checkpoint, its config, the training log.", required=True, resume=False)
    model: str = opt(DEFAULT_MODEL, "Student: an embedded model name, a local checkpoint directory, or a hub id.")
    alpha: float = opt(0.1, "Weight of the KD term: L = CE(hard) + alpha * KD. 0 is the SFT baseline, on the same batches.")
    loss: str = opt("topk_tail", "KD loss: topk_tail (teacher top-k plus its tail bucket) or topk_renorm; sampled "
                                 "for a store of sampled labels (precompute --labels sampled).")
    temperature: float = opt(1.0, "Softmax temperature of the KD term (teacher re-tempered within its top-k; KD x tau^2).")
    lr: float = opt(1e-5, "Peak learning rate (AdamW; linear warm-up, then linear decay to 0).")
    warmup_steps: int = opt(0, "Optimizer steps of linear warm-up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0: no clipping).")
    batch_size: int = opt(8, "Sequences per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    epochs: int = opt(1, "Passes over the selected sequences.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).")
    sources: list[str] = opt(["original"], "Store sources to train on: original (word-level KD), teacher_greedy "
                                           "(sequence-level KD), or both.", cli=COMMA_LIST)
    group_by_length: bool = opt(False, "Batch sequences of similar length together (windows of 32 batches sorted "
                                       "by length, the batches then shuffled): less padding, faster steps; the "
                                       "same sequences every epoch, in another order.")
    seed: int = opt(0, "Seed of the data order and of initialisation (LoRA).")
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights; the adapter is saved, plus a merged model.")
    lora_rank: int = opt(16, "LoRA rank (with --lora).")
    freeze: list[str] = opt([], "Parameter groups to freeze: embed, attn, mlp, norm, lm_head, layers:A-B (A..B inclusive).",
                             cli=COMMA_LIST)
    fsdp: bool = opt(False, "Shard parameters, gradients and optimizer state over the processes (FSDP2), for "
                            "students that do not fit one GPU; under torchrun or accelerate launch. Default: DDP.")
    save_every: int = opt(50, "Write a resumable checkpoint every N optimizer steps (and at the end).", resume=False)
    resume: bool = opt(False, "Continue from the run directory's last checkpoint.", resume=False)
    allow_incomplete_store: bool = opt(False, "Train on a store that still misses parts (see `store info`).",
                                       resume=False)
    loss_chunk_tokens: int = opt(1024, "Compute the loss this many supervised tokens at a time from the final hidden "
                                       "states, so that [tokens, vocabulary] float32 never exists whole (0: all at once, "
                                       "from the model's logits).", resume=False)
    dtype: str = opt("auto", "Student dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16.", resume=False)
    device: str = opt("auto", "Student device: auto, cpu, cuda, ...", resume=False)

    def validate(self, losses: tuple[str, ...]) -> None:
        problems = []
        if not self.store:
            problems.append("--store is required")
        if not self.out:
            problems.append("--out is required")
        problems += filter(None, [
            number("--alpha", self.alpha, 0, note=" (0 is plain SFT)"),
            number("--temperature", self.temperature, 0, low_open=True),
            number("--lr", self.lr, 0, 1, low_open=True, note=" (AdamW moves each weight by about lr a step)"),
            number("--weight-decay", self.weight_decay, 0),
            number("--max-grad-norm", self.max_grad_norm, 0, note=" (0: no clipping)"),
            count("--warmup-steps", self.warmup_steps, 0),
            count("--max-steps", self.max_steps),
            count("--seed", self.seed, 0),
            count("--loss-chunk-tokens", self.loss_chunk_tokens, 0),
            *(count(f"--{name.replace('_', '-')}", getattr(self, name))
              for name in ("batch_size", "grad_accum", "epochs", "save_every", "lora_rank")),
        ])
        if self.loss not in losses:
            problems.append(f"--loss {self.loss!r} is not one of {', '.join(losses)}")
        if not self.sources:
            problems.append(f"--sources selects nothing; choose from {', '.join(SOURCES)}")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            problems.append(f"--sources {', '.join(bad)}: not one of {', '.join(SOURCES)}")
        for group in self.freeze:
            if group not in FREEZE_GROUPS and not _layer_range(group):
                problems.append(f"--freeze {group!r}: not one of {', '.join(FREEZE_GROUPS)} or layers:A-B")
        if self.fsdp and self.lora:
            problems.append("--fsdp with --lora is not supported: LoRA students are small, use DDP (the default)")
        if self.lora and self.freeze:
            problems.append("--freeze has no effect with --lora (only the adapters train); use one or the other")
        if problems:
            raise SmoothkdError("invalid options:\n  " + "\n  ".join(problems))


def _layer_range(group: str) -> range | None:
    name, _, span = group.partition(":")
    a, _, b = span.partition("-")
    if name != "layers" or not a.isdigit() or not (b or a).isdigit():
        return None
    return range(int(a), int(b or a) + 1)
