"""`smoothkd precompute teacher`: run the teacher once over a dataset and write the store.

Records are cut into fixed blocks of `part_size` (part i = records [i*part_size, ...)),
so parts are the same whatever the shard count: shard i/n writes parts i, i+n, ...;
a re-run with the same arguments skips committed parts and rewrites torn ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from smoothkd import __version__
from smoothkd.errors import SmoothkdError
from smoothkd.models import resolve, text_sha256, tokenizer_fingerprint, weights_fingerprint
from smoothkd.precompute.backends import BACKENDS, TeacherBackend, load_backend
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.prompts import PromptFormatter, Sequence, user_message
from smoothkd.precompute.records import LoadedRecords, Record, load_records, split_of
from smoothkd.precompute.topk import keep_entries
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.writer import PartBuilder, StoreWriter

SPLIT_SALT = "smoothkd-heldout-v1"


@dataclass(frozen=True)
class PartCounts:
    """What building one part produced; a run's counts are the sum over its parts (and shards)."""

    sequences: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> sequences not written
    forward_seconds: float = 0.0

    def __add__(self, other: PartCounts) -> PartCounts:
        return PartCounts(
            sequences=self.sequences + other.sequences, tokens=self.tokens + other.tokens,
            supervised_tokens=self.supervised_tokens + other.supervised_tokens,
            truncated=self.truncated + other.truncated, dropped=self.dropped + other.dropped,
            forward_seconds=self.forward_seconds + other.forward_seconds,
        )


@dataclass(frozen=True)
class Summary(PartCounts):
    """A run's result: the summed counts of the parts it wrote, and what it skipped."""

    out: str = ""
    parts_written: int = 0
    parts_skipped: int = 0  # already committed by an earlier run
    invalid_records: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, counts: PartCounts, **run: Any) -> Summary:
        return cls(**{f.name: getattr(counts, f.name) for f in dataclasses.fields(PartCounts)}, **run)

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "dropped": dict(self.dropped)}


def build_manifest(cfg: PrecomputeConfig, teacher: TeacherBackend, location: str, loaded: LoadedRecords,
                   chat_template: str) -> spec.Manifest:
    sampled = cfg.labels == spec.LABEL_KIND_SAMPLED
    return spec.Manifest(
        config=dataclasses.asdict(cfg),
        label_kind=cfg.labels,
        # the most entries a position can hold: its draws, when they are all distinct
        top_k=cfg.samples if sampled else cfg.top_k,
        selection={"samples": cfg.samples, "seed": cfg.seed} if sampled else
        {"top_p": cfg.top_p, "min_prob": cfg.min_prob, "min_k": cfg.min_k},
        texts=cfg.texts,
        vocab_size=teacher.vocab_size,
        id_dtype=spec.id_dtype(teacher.vocab_size).name,
        teacher={"name": cfg.model, "path": location, "weights_sha256": weights_fingerprint(location),
                 "revision": teacher.revision, "backend": teacher.name, "dtype": teacher.dtype},
        tokenizer={"fingerprint": tokenizer_fingerprint(teacher.tokenizer),
                   "chat_template_sha256": text_sha256(chat_template),
                   "stop_ids": sorted(teacher.stop_ids)},
        dataset={"source": cfg.dataset, "fingerprint": loaded.fingerprint, "n_records": len(loaded.records),
                 "fields": dict(cfg.fields), "limit": cfg.limit},
        build={"max_length": cfg.max_length, "overlong": cfg.overlong, "augment": sorted(cfg.augment),
               "max_new_tokens": cfg.max_new_tokens if cfg.augment else None, "part_size": cfg.part_size,
               "heldout_fraction": cfg.heldout_fraction, "split_salt": SPLIT_SALT,
               "prompt": "chat template; user turn = instruction, blank line, context (when present)"},
    )


def teacher_positions(location: str) -> tuple[str, int] | None:
    """The longest sequence the teacher's position embeddings cover, and the config field that
    says so (None when its config does not)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location).get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return name, value
    return None


def check_max_length(cfg: PrecomputeConfig, location: str) -> None:
    """Refuse a --max-length beyond the teacher's context before a model loads or a file is written:
    the positions past it would be scored, silently, by weights never trained on them."""
    found = teacher_positions(location)
    if found is None:
        return
    field, n = found
    # The vllm backend starts its engine for --max-length + 1 tokens (room for one output token).
    longest = n - 1 if cfg.backend == "vllm" else n
    if cfg.max_length > longest:
        extra = ", and the vllm backend needs one more than --max-length" if cfg.backend == "vllm" else ""
        raise SmoothkdError(f"--max-length {cfg.max_length} is beyond the teacher's context: {cfg.model} has {n} "
                            f"positions ({field} in its config){extra}; set --max-length {longest} or less")


def draw_seed(seed: int, record_id: str, source: str) -> int:
    """The seed of one sequence's draws (--labels sampled): fixed by the run's seed and the sequence,
    whatever the batch, shard or part it is drawn in."""
    digest = hashlib.sha256(f"smoothkd-draws:{seed}:{record_id}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds are below 2^63


class PartPipeline:
    """Turns one block of records into a filled PartBuilder and its counts."""

    def __init__(self, cfg: PrecomputeConfig, teacher: TeacherBackend, formatter: PromptFormatter,
                 advance: Callable[[str, int, int], None]):
        self.cfg, self.teacher, self.formatter = cfg, teacher, formatter
        self.advance = advance  # (phase, units of work done, supervised tokens done)
        self.batch_size = cfg.batch_size or teacher.default_batch_size
        self.n_sources = 1 + ("greedy" in cfg.augment)  # sequences per record: the original (+ the teacher's)

    def work(self, n_records: int) -> int:
        """Units of work (what `advance` counts) in a block: every sequence to score, every prompt to answer."""
        return n_records * (2 * self.n_sources - 1)

    def _fit(self, record: Record, source: str, prompt: list[int], response: list[int], text: str,
             truncated: bool) -> Sequence | str:
        """Apply --max-length and --overlong: the sequence, or why it is dropped."""
        room = self.cfg.max_length - len(prompt)
        if room < 1:
            return f"{source}: prompt longer than --max-length"
        if len(response) > room:
            if self.cfg.overlong == "skip":
                return f"{source}: longer than --max-length (--overlong skip)"
            response, truncated = response[:room], True
            text = self.teacher.tokenizer.decode(response, skip_special_tokens=True)
        if not response:
            return f"{source}: no response tokens"
        return Sequence(record, source, prompt, response, text, truncated)

    def sequences(self, records: list[Record]) -> tuple[list[Sequence], Counter[str]]:
        """The sequences to score, and how many were dropped for each reason."""
        prompts = [self.formatter.prompt_ids(r) for r in records]
        out = [self._fit(r, "original", p, self.formatter.response_ids(r, p, r.response), r.response, False)
               for r, p in zip(records, prompts)]
        if "greedy" in self.cfg.augment:
            greedy = self._greedy(records, prompts)
            # original then teacher_greedy for each record, in record order
            out = [s for pair in zip(out, greedy) for s in pair]
        return [s for s in out if isinstance(s, Sequence)], Counter(s for s in out if isinstance(s, str))

    def _greedy(self, records: list[Record], prompts: list[list[int]]) -> list[Sequence | str]:
        """The teacher's greedy responses, cut at --max-new-tokens or --max-length (and marked truncated)."""
        room = [self.cfg.max_length - len(p) for p in prompts]
        out: list[Sequence | str] = ["teacher_greedy: prompt longer than --max-length"] * len(records)
        order = sorted((i for i in range(len(records)) if room[i] >= 1), key=lambda i: len(prompts[i]))
        self.advance("generating", len(records) - len(order), 0)  # no room to answer: nothing to generate
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]  # similar prompt lengths: little padding
            max_new = min(self.cfg.max_new_tokens, max(room[i] for i in batch))
            for i, g in zip(batch, self.teacher.generate([prompts[i] for i in batch], max_new, self.cfg.top_k)):
                ids = g.ids[: room[i]]
                text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
                out[i] = Sequence(records[i], "teacher_greedy", prompts[i], ids, text,
                                  truncated=not g.finished or len(ids) < len(g.ids),
                                  labels=None if g.labels is None else g.labels.head(len(ids)))
            self.advance("generating", len(batch), 0)
        return out

    def _label(self, batch: list[Sequence]) -> list[spec.Labels]:
        """The labels of a batch of sequences, as the store keeps them."""
        pairs = [(s.tokens, len(s.prompt_ids)) for s in batch]
        cfg = self.cfg
        if cfg.labels == spec.LABEL_KIND_SAMPLED:
            seeds = [draw_seed(cfg.seed, s.record.record_id, s.source) for s in batch]
            return self.teacher.sample(pairs, cfg.samples, seeds)  # type: ignore[attr-defined]
        return [keep_entries(lab, cfg.top_p, cfg.min_prob, cfg.min_k) for lab in self.teacher.score(pairs, cfg.top_k)]

    def score(self, seqs: list[Sequence]) -> tuple[list[spec.Labels], float]:
        """Labels for every sequence, and the seconds spent in the teacher's forward passes; those
        that came with labels from generation are not rescored."""
        labels: list[spec.Labels | None] = [
            None if s.labels is None else keep_entries(s.labels, self.cfg.top_p, self.cfg.min_prob, self.cfg.min_k)
            for s in seqs]
        kept = [i for i in range(len(seqs)) if labels[i] is not None]
        self.advance("scoring", len(kept), sum(len(seqs[i].response_ids) for i in kept))
        todo = sorted((i for i in range(len(seqs)) if labels[i] is None), key=lambda i: -len(seqs[i].tokens))
        forward = 0.0
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b : b + self.batch_size]  # similar lengths share a batch
            t0 = time.perf_counter()
            scored = self._label([seqs[i] for i in batch])
            forward += time.perf_counter() - t0
            for i, lab in zip(batch, scored):
                labels[i] = lab
            self.advance("scoring", len(batch), sum(len(seqs[i].response_ids) for i in batch))
        return labels, forward  # type: ignore[return-value]

    def build(self, records: list[Record]) -> tuple[PartBuilder, PartCounts]:
        seqs, dropped = self.sequences(records)
        self.advance("scoring", len(records) * self.n_sources - len(seqs), 0)  # dropped: nothing to score
        labels, forward_seconds = self.score(seqs)
        part = PartBuilder(top_k=self.cfg.samples if self.cfg.labels == spec.LABEL_KIND_SAMPLED else self.cfg.top_k)
        for s, lab in zip(seqs, labels):
            part.add(
                {"record_id": s.record.record_id, "source": s.source,
                 "split": split_of(s.record.record_id, self.cfg.heldout_fraction, SPLIT_SALT),
                 "category": s.record.category, "truncated": s.truncated,
                 "prompt": user_message(s.record), "response": s.response_text},
                np.asarray(s.tokens, dtype=np.int64), len(s.prompt_ids), lab,
            )
        return part, PartCounts(sequences=len(part.rows), tokens=part.n_tokens, supervised_tokens=part.n_labels,
                                truncated=sum(s.truncated for s in seqs), dropped=dropped,
                                forward_seconds=forward_seconds)


def run(cfg: PrecomputeConfig, show_progress: bool = True, log: Callable[[str], None] = print,
        teacher: TeacherBackend | None = None) -> Summary:
    """Write the parts of `cfg.shard` not yet committed. `teacher`: an already started backend
    for cfg.model (so that several runs share one engine), else one is loaded."""
    cfg.validate(tuple(BACKENDS))
    started = time.perf_counter()
    loaded = load_records(cfg.dataset, cfg.fields, cfg.limit, cfg.skip_invalid, cfg.dataset_split)
    location = resolve(cfg.model)
    check_max_length(cfg, location)
    if teacher is None:
        teacher = load_backend(location, cfg)
    elif teacher.name != cfg.backend:
        raise SmoothkdError(f"run(): a {teacher.name!r} teacher was given for --backend {cfg.backend}")
    if cfg.labels == spec.LABEL_KIND_TOPK and cfg.top_k > teacher.vocab_size:
        raise SmoothkdError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size})")
    template = open(cfg.chat_template).read() if cfg.chat_template else None
    formatter = PromptFormatter(teacher.tokenizer, teacher.stop_ids, template)
    first = loaded.records[0]  # template problems surface here, before anything is written
    formatter.response_ids(first, formatter.prompt_ids(first), first.response)
    manifest = build_manifest(cfg, teacher, location, loaded, formatter.tokenizer.chat_template)
    writer = StoreWriter(cfg.out, manifest, overwrite=cfg.overwrite)

    records = loaded.records
    n_parts = math.ceil(len(records) / cfg.part_size)
    shard, n_shards = cfg.shard_index
    mine = [p for p in range(n_parts) if p % n_shards == shard]
    committed = writer.committed_parts()
    blocks = {p: records[p * cfg.part_size : (p + 1) * cfg.part_size] for p in mine if p not in committed}
    for reason in loaded.skipped[:5]:
        log(f"skipped invalid record: {reason}")
    if len(blocks) < len(mine):
        log(f"resuming: {len(mine) - len(blocks)} of {len(mine)} parts already committed in {cfg.out}")

    progress = Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tok]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress,
    )
    supervised_done = 0

    def advance(phase: str, n_units: int, n_tokens: int) -> None:
        nonlocal supervised_done
        supervised_done += n_tokens
        rate = supervised_done / max(time.perf_counter() - started, 1e-9)
        progress.update(task, description=phase, advance=n_units,
                        tok=f"{supervised_done:,} supervised tok ({rate:,.0f}/s)")

    pipeline = PartPipeline(cfg, teacher, formatter, advance)
    counts = PartCounts()
    with progress:
        task = progress.add_task("teacher", total=sum(pipeline.work(len(b)) for b in blocks.values()), tok="")
        written = 0
        for p, block in blocks.items():
            if p in writer.committed_parts():  # another writer of this store committed it meanwhile
                continue
            part, part_counts = pipeline.build(block)
            if writer.write_part(p, part, {
                "record_start": p * cfg.part_size,
                "record_end": p * cfg.part_size + len(block),
                "dropped": dict(part_counts.dropped),
                "truncated": part_counts.truncated,
                "shard": cfg.shard,
                "tool_version": __version__,
            }) is None:
                continue  # the other writer's commit came first: its copy is the part
            counts += part_counts
            written += 1
    return Summary.of(counts, out=cfg.out, parts_written=written, parts_skipped=len(mine) - written,
                      invalid_records=len(loaded.skipped), seconds=time.perf_counter() - started)
