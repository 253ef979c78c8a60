"""The configuration of `smoothkd precompute teacher`: one frozen dataclass, documented once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from smoothkd.errors import SmoothkdError
from smoothkd.models import DEFAULT_MODEL

AUGMENTS = ("greedy",)
OVERLONG = ("skip", "truncate")


def doc(cls: type, name: str) -> str:
    """The help text of a config field (the CLI's --help comes from here)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrecomputeConfig:
    dataset: str = _f("", "Instruction records: a .jsonl or .parquet file, or a Hugging Face dataset id.")
    out: str = _f("", "Store to write: a directory or any fsspec URL (s3://, gs://, memory://).")
    model: str = _f(DEFAULT_MODEL, "Teacher: an embedded model name, a local checkpoint directory, or a hub id.")
    top_k: int = _f(64, "Teacher log-probs kept per supervised token.")
    backend: str = _f("hf", "Teacher backend.")
    augment: list[str] = _f([], "Extra sources: 'greedy' adds the teacher's own greedy responses (sequence-level KD).")
    max_new_tokens: int = _f(256, "Longest greedy response (with --augment greedy).")
    limit: int | None = _f(None, "Use only the first N records.")
    max_length: int = _f(1024, "Longest sequence, prompt + response, in tokens.")
    overlong: str = _f("skip", "Sequences longer than --max-length: 'skip' them, or 'truncate' the response.")
    batch_size: int = _f(8, "Sequences per teacher forward pass.")
    part_size: int = _f(256, "Records per store part (the unit of commit, resume and sharding).")
    shard: str = _f("0/1", "Write only parts i, i+n, i+2n, ... of n ('i/n'), for several workers.")
    heldout_fraction: float = _f(0.05, "Share of records marked 'heldout' (by record id) for later evaluation.")
    fields: dict[str, str] = _f({}, "Column names of another instruction set, e.g. response=answer.")
    dataset_split: str = _f("train", "Split to read when --dataset is a hub id.")
    chat_template: str | None = _f(None, "A Jinja chat template file, for tokenizers without one.")
    skip_invalid: bool = _f(False, "Skip (and count) records with missing fields or empty responses instead of failing.")
    overwrite: bool = _f(False, "Replace an existing store at --out that was built differently.")
    dtype: str = _f("auto", "Teacher dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    device: str = _f("auto", "Teacher device: auto, cpu, cuda, cuda:1, ...")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, _, n = self.shard.partition("/")
        return int(i), int(n)

    def validate(self, backends: tuple[str, ...]) -> None:
        """Every problem at once, each saying what to set."""
        problems = []
        if not self.dataset:
            problems.append("--dataset is required")
        if not self.out:
            problems.append("--out is required")
        for name in ("top_k", "batch_size", "part_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 2:
            problems.append(f"--max-length must be at least 2, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1, got {self.limit}")
        if not 0 <= self.heldout_fraction < 1:
            problems.append(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.backend not in backends:
            problems.append(f"--backend {self.backend!r} is not one of {', '.join(backends)}")
        if self.overlong not in OVERLONG:
            problems.append(f"--overlong {self.overlong!r} is not one of {', '.join(OVERLONG)}")
        bad = [a for a in self.augment if a not in AUGMENTS]
        if bad:
            problems.append(f"--augment {', '.join(bad)} is not one of {', '.join(AUGMENTS)}")
        i, sep, n = self.shard.partition("/")
        if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            problems.append(f"--shard {self.shard!r} must be i/n with 0 <= i < n, e.g. 0/4")
        elif self.overwrite and int(n) > 1:
            # Each shard would delete the parts the others already wrote.
            problems.append("--overwrite cannot be combined with --shard i/n for n > 1: delete the old store "
                            "(or run --overwrite once without --shard), then start the shards")
        if problems:
            raise SmoothkdError("invalid options:\n  " + "\n  ".join(problems))
