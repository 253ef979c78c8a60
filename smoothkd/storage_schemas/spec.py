"""The soft-label store contract: version, layout, array specs and typed records.

FORMAT.md beside this file is the written spec; this module is its executable form.
Nothing here imports torch: the store is readable by any numpy/zarr/pyarrow program.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import Delta

from smoothkd.errors import StoreError

# The Delta filter is numcodecs.delta: zarr-python reads and writes it; FORMAT.md documents
# it for other readers. Its "not in the Zarr v3 specification" warning would fire on every
# part written or opened.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_NAME = "smoothkd-soft-labels"
SCHEMA_VERSION = 2  # what this smoothkd writes; version 1 stores stay readable
KNOWN_SCHEMA_VERSIONS = (1, 2)
MANIFEST_KEY = "smoothkd"  # key of the manifest inside the root group's attributes
LABEL_KIND_TOPK = "topk"  # the teacher's most probable ids with their log-probs and the tail
LABEL_KIND_SAMPLED = "sampled"  # ids drawn from the teacher's full distribution, with their counts (version 2)
LABEL_KINDS = (LABEL_KIND_TOPK, LABEL_KIND_SAMPLED)
PAD_ID = 0  # the id of a padding entry in decoded labels (its log-prob is -inf, its count 0)
SOURCES = ("original", "teacher_greedy")
SPLITS = ("train", "heldout")

PARTS_DIR = "parts"
TABLE_FILE = "sequences.parquet"
COMMIT_FILE = "commit.json"
# commit.json's record of every other file of the part: relative path -> {"bytes", "sha256"}.
# Parts written before it existed (by an older smoothkd) have no such key: readers cannot check their files.
FILES_KEY = "files"
# The keys every commit.json has (since the first version), with their types.
COMMIT_KEYS: dict[str, type] = {"part": int, "n_sequences": int, "n_tokens": int, "n_labels": int, "arrays": dict}

# Rows (supervised positions or tokens) per zarr chunk; a whole part array is one shard,
# so an object store sees one object per array per part.
CHUNK_ROWS = 4096


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of the vocabulary."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32")


@dataclass(frozen=True)
class LogprobEncoding:
    """Fixed-point log-probs: stored = round(-logprob * scale) as uint16.

    Log-probs are <= 0, so the stored value is >= 0; the absolute error is at most
    0.5 / scale nats (0.0078 at scale 64) over the range [-(65535 / scale), 0]; lower
    values are clipped to the bottom of the range. Sorted log-probs become
    non-decreasing integers with small steps, which the Delta filter turns into small
    numbers that compress well.
    """

    kind: str = "fixed_point"
    dtype: str = "uint16"
    scale: int = 64

    @property
    def max_error(self) -> float:
        return 0.5 / self.scale

    @property
    def min_logprob(self) -> float:
        return -float(np.iinfo(self.dtype).max) / self.scale

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        scaled = np.rint(-np.asarray(logprobs, dtype=np.float64) * self.scale)
        return np.clip(scaled, 0, np.iinfo(self.dtype).max).astype(self.dtype)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return (stored.astype(np.float32) / np.float32(-self.scale)).astype(np.float32)


@dataclass(frozen=True)
class TailEncoding:
    """The tail mass r in (0, 1] on a log scale: stored = round(-ln(r) * scale) as uint16, and
    ZERO for r == 0 (a top-k that holds the whole vocabulary).

    A relative error of at most expm1(0.5 / scale) (9.8e-4 at 512) over [e^-128, 1], which holds
    every positive float32 (the smallest is 1.4e-45); a tail of 1e-9 keeps its precision, where
    a fixed-point probability would round it to 0.
    """

    kind: str = "log_fixed_point"
    dtype: str = "uint16"
    scale: int = 512

    ZERO = 65535

    @property
    def max_relative_error(self) -> float:
        return float(np.expm1(0.5 / self.scale))

    def encode(self, tail: np.ndarray) -> np.ndarray:
        r = np.asarray(tail, dtype=np.float64)
        out = np.full(r.shape, self.ZERO, dtype=self.dtype)
        pos = r > 0
        out[pos] = np.clip(np.rint(-np.log(np.minimum(r[pos], 1.0)) * self.scale), 0, self.ZERO - 1)
        return out

    def decode(self, stored: np.ndarray) -> np.ndarray:
        r = np.exp(stored.astype(np.float64) / -self.scale)
        return np.where(stored == self.ZERO, 0.0, r).astype(np.float32)


def encode_ids(ids: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary-code top-k ids: (codes, table) with ids == table[codes].

    The table lists the part's distinct ids most frequent first, so frequent ids get small
    codes whose high byte is mostly zero: about 8% fewer bytes after compression than raw ids.
    """
    table, inverse, counts = np.unique(ids.ravel(), return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].reshape(ids.shape).astype(dtype), table[order].astype(dtype)


def count_dtype(largest: int) -> np.dtype:
    """Smallest unsigned integer type that holds 0..largest (entries per position, ranks, counts)."""
    return id_dtype(largest + 1)


@dataclass(frozen=True)
class ArraySpec:
    """One per-part zarr array: its axis, row shape and codecs."""

    name: str
    # "tokens": a row per token; "labels": a row per supervised position; "table": id_table;
    # "entries": a row per stored entry (version 2: every position's entries, end to end);
    # "outside": a row per position whose true token is not among its entries
    axis: str
    # "ids" (the store's id dtype), "logprob" (the log-prob encoding's), "tail" (the tail encoding's),
    # "rank" (holds 0..top_k), "count" (holds 0..samples) or a numpy dtype
    dtype: str
    per_k: bool = False  # rows are [top_k] wide (version 1)
    delta: bool = False  # Delta filter along the flattened chunk (sorted rows)
    rank_major: bool = False  # entries: every position's first, then every second, ... (else position by position)
    doc: str = ""

    def numpy_dtype(self, m: Manifest) -> np.dtype:
        named = {"ids": lambda: m.ids, "logprob": lambda: np.dtype(m.encoding.dtype),
                 "tail": lambda: np.dtype(m.tail.dtype), "rank": lambda: count_dtype(m.top_k),
                 "count": lambda: count_dtype(int(m.selection.get("samples", 1)))}
        return named[self.dtype]() if self.dtype in named else np.dtype(self.dtype)

    def row_shape(self, top_k: int) -> tuple[int, ...]:
        return (top_k,) if self.per_k else ()

    def codecs(self, dtype: np.dtype) -> dict[str, Any]:
        # clevel 9: writing is a negligible share of precompute time, the store is read many times.
        compressor = BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=dtype.itemsize)
        filters = [Delta(dtype=dtype.str)] if self.delta else []
        # The crc32c after compression checksums each chunk's payload on every read (zarr's
        # sharding codec checksums only its index by default): a flipped byte raises, not decodes.
        return {"filters": filters, "compressors": [compressor, Crc32cCodec()]}


_TOKENS = ArraySpec("tokens", "tokens", "ids", doc="token ids of every sequence, concatenated")
_ID_TABLE = ArraySpec("id_table", "table", "ids", doc="the distinct label ids of this part, most frequent first")

# Version 1: top_k entries at every position, [n_labels, top_k] arrays.
ARRAYS_V1: tuple[ArraySpec, ...] = (
    _TOKENS, _ID_TABLE,
    ArraySpec("topk_codes", "labels", "ids", per_k=True,
              doc="teacher top-k ids as positions in id_table (ids = id_table[topk_codes]), most probable first"),
    ArraySpec("topk_logprobs", "labels", "logprob", per_k=True, delta=True,
              doc="teacher log-probs of the top-k ids (fixed point, see LogprobEncoding)"),
    ArraySpec("true_logprob", "labels", "logprob", doc="teacher log-prob of the token that actually follows"),
    ArraySpec("tail", "labels", "float32",
              doc="probability mass outside the top-k, summed over the full vocabulary before rounding"),
)
# Version 2: each position holds its own number of entries (n_entries), stored end to end:
# codes position by position, log-prob steps rank-major (every position's first entry, then every
# second entry of the positions that have one, ...), where entries of one rank are alike and
# compress better side by side (30.4 B/token against 33.9 at k = 64; codes 99.2 against 98.9).
_N_ENTRIES = ArraySpec("n_entries", "labels", "rank", doc="entries kept at each position (1..top_k)")
_ENTRY_CODES = ArraySpec("entry_codes", "entries", "ids",
                         doc="each entry's id as its position in id_table, position by position")
ARRAYS_TOPK: tuple[ArraySpec, ...] = (
    _TOKENS, _ID_TABLE, _N_ENTRIES, _ENTRY_CODES,
    ArraySpec("entry_logprobs", "entries", "logprob", rank_major=True,
              doc="fixed-point log-probs as steps down from the entry before (the first entry: its own value)"),
    ArraySpec("true_rank", "labels", "rank",
              doc="the true next token's rank among the position's entries; top_k when it is not one of them"),
    ArraySpec("true_outside", "outside", "logprob",
              doc="the true token's log-prob at the positions where it is not among the entries, in order"),
    ArraySpec("tail", "labels", "tail", doc="probability mass outside the entries (log scale, see TailEncoding)"),
)
ARRAYS_SAMPLED: tuple[ArraySpec, ...] = (
    _TOKENS, _ID_TABLE, _N_ENTRIES, _ENTRY_CODES,
    ArraySpec("entry_counts", "entries", "count", rank_major=True, doc="how many of the position's draws gave the entry's id"),
    ArraySpec("true_logprob", "labels", "logprob", doc="teacher log-prob of the token that actually follows"),
)


def arrays_of(schema_version: int, label_kind: str) -> tuple[ArraySpec, ...]:
    """The arrays of every part of a store of this version and label kind."""
    if schema_version == 1:
        return ARRAYS_V1
    return ARRAYS_SAMPLED if label_kind == LABEL_KIND_SAMPLED else ARRAYS_TOPK


# Columns of each part's sequences.parquet, in order.
TABLE_COLUMNS: dict[str, str] = {
    "record_id": "string",  # id of the dataset record (explicit id field, else its 0-based index)
    "source": "string",  # "original" (dataset response) or "teacher_greedy"
    "split": "string",  # "train" or "heldout" (deterministic by record_id)
    "category": "string",  # dataset category when present, else ""
    "token_offset": "int64",  # first row of this sequence in `tokens`
    "n_tokens": "int32",  # prompt + response tokens
    "prompt_tokens": "int32",  # tokens of the chat-formatted prompt
    "label_offset": "int64",  # first row of this sequence in the label arrays
    "n_labels": "int32",  # supervised positions = n_tokens - prompt_tokens
    "truncated": "bool",  # response cut to fit --max-length (or greedy hit --max-new-tokens)
    "prompt": "string",  # the user turn, as given to the chat template (only with texts)
    "response": "string",  # the response text (dataset's, or the teacher's greedy decode) (only with texts)
}
TEXT_COLUMNS = ("prompt", "response")  # left out of stores written without texts (manifest "texts")


@dataclass(frozen=True)
class TopKLabels:
    """Teacher soft labels for n supervised positions; what crosses from store to trainer.

    Row j is the teacher's distribution over the token at position prompt_len + j, given
    the tokens before it. Log-probs are a log-softmax over the full vocabulary at
    temperature 1, so any training temperature can be applied exactly within the entries.
    A row may keep fewer than k entries (adaptive k): the rest of it is padding, id PAD_ID
    with log-prob -inf (probability 0), and its mass is in the tail.
    """

    ids: np.ndarray  # [n, k] int64, most probable first
    logprobs: np.ndarray  # [n, k] float32, non-increasing along k; -inf at padding
    true_logprob: np.ndarray  # [n] float32
    tail: np.ndarray  # [n] float32, mass outside the kept entries

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_entries(self) -> np.ndarray:
        """[n] entries kept at each position (the rest of the row is padding)."""
        return np.isfinite(self.logprobs).sum(axis=1)

    def head(self, n: int) -> TopKLabels:
        """The first n rows (labels of a response cut to n tokens)."""
        return TopKLabels(**{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class SampledLabels:
    """Ids drawn from the teacher's full distribution at n supervised positions (random-sampling
    KD, Anshumann et al. 2025): each row's distinct ids with how many of the draws gave them,
    most drawn first; padding has count 0. counts / samples is an unbiased estimate of the
    teacher's distribution."""

    ids: np.ndarray  # [n, m] int64
    counts: np.ndarray  # [n, m] int32, 0 at padding; every row sums to the store's `samples`
    true_logprob: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_entries(self) -> np.ndarray:
        return (self.counts > 0).sum(axis=1)

    def head(self, n: int) -> SampledLabels:
        return SampledLabels(**{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)})


Labels = TopKLabels | SampledLabels


@dataclass(frozen=True)
class SequenceLabels:
    """One stored sequence: its tokens, its table row and its soft labels."""

    seq: int  # index in the whole store (parts in order, rows in order)
    part: str
    row: dict[str, Any]  # the sequences.parquet row
    tokens: np.ndarray  # [n_tokens] int64
    labels: Labels

    @property
    def prompt_len(self) -> int:
        return int(self.row["prompt_tokens"])

    @property
    def targets(self) -> np.ndarray:
        """The supervised tokens, one per label row."""
        return self.tokens[self.prompt_len :]


@dataclass(frozen=True)
class Manifest:
    """Store-level identity, written once in the root group's attributes.

    Every field but those in NON_IDENTITY is identity: a run that would write a store
    with a different identity into an existing one is refused (unless --overwrite).
    """

    top_k: int
    vocab_size: int
    teacher: dict[str, Any]  # name, path, weights_sha256 (local) or revision (hub), backend, dtype
    tokenizer: dict[str, Any]  # fingerprint, chat_template_sha256, stop_ids
    dataset: dict[str, Any]  # source, fingerprint, n_records, field mapping
    build: dict[str, Any]  # max_length, overlong, augment, max_new_tokens, part_size, split
    logprob_encoding: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(LogprobEncoding()))
    label_kind: str = LABEL_KIND_TOPK
    # which entries a position keeps: top-k {"top_p", "min_prob", "min_k"} (adaptive k; none: all k),
    # sampled {"samples", "seed"}
    selection: dict[str, Any] = field(default_factory=dict)
    tail_encoding: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(TailEncoding()))  # version 2
    texts: bool = True  # sequences.parquet has the prompt and response columns
    id_dtype: str = ""
    format: str = FORMAT_NAME
    schema_version: int = SCHEMA_VERSION
    tool: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the writer's resolved options, as run

    # Where things were found is not what they are: the same weights under another path,
    # or the same records in a moved file, are the same store. How it was run (batch size,
    # device, shard) is recorded in `config` but does not change what is stored.
    NON_IDENTITY = ("created", "tool", "config", "teacher.name", "teacher.path", "dataset.source")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        data = self.to_json()
        # A hub teacher has no local weights to hash: then its name (and revision) is its identity.
        hashed = bool(data["teacher"].get("weights_sha256"))
        for dotted in self.NON_IDENTITY if hashed else [d for d in self.NON_IDENTITY if d != "teacher.name"]:
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.get(key, {})
            node.pop(leaf, None)
        return data

    @property
    def encoding(self) -> LogprobEncoding:
        return LogprobEncoding(**self.logprob_encoding)

    @property
    def tail(self) -> TailEncoding:
        return TailEncoding(**self.tail_encoding)

    @property
    def ids(self) -> np.dtype:
        return np.dtype(self.id_dtype)

    @property
    def arrays(self) -> tuple[ArraySpec, ...]:
        return arrays_of(self.schema_version, self.label_kind)

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)

    @property
    def table_columns(self) -> dict[str, str]:
        return {c: t for c, t in TABLE_COLUMNS.items() if self.texts or c not in TEXT_COLUMNS}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "the manifest") -> Manifest:
        """The manifest from its JSON; `where` names its file in the error for a field missing."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise StoreError(f"{where}: the manifest ('{MANIFEST_KEY}' attribute) lacks {', '.join(missing)}; "
                             "the file is damaged or was edited")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in data.items() if k in names})


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two identities."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: store has {a!r}, this run has {b!r}")
    return out
