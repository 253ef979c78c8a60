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
SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_KEY = "smoothkd"  # key of the manifest inside the root group's attributes
LABEL_KIND_TOPK = "topk"  # the only kind written today; "sampled" (ids + counts) is reserved
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


@dataclass(frozen=True)
class ArraySpec:
    """One per-part zarr array: its axis, row shape and codecs."""

    name: str
    axis: str  # "tokens": a row per token; "labels": a row per supervised position; "table": id_table
    dtype: str  # "ids" (the store's id dtype), "logprob" (the encoding's dtype) or a numpy dtype
    per_k: bool  # rows are [top_k] wide
    delta: bool = False  # Delta filter along the flattened chunk (sorted rows)
    doc: str = ""

    def numpy_dtype(self, ids: np.dtype, encoding: LogprobEncoding) -> np.dtype:
        if self.dtype == "ids":
            return ids
        if self.dtype == "logprob":
            return np.dtype(encoding.dtype)
        return np.dtype(self.dtype)

    def row_shape(self, top_k: int) -> tuple[int, ...]:
        return (top_k,) if self.per_k else ()

    def codecs(self, dtype: np.dtype) -> dict[str, Any]:
        # clevel 9: writing is a negligible share of precompute time, the store is read many times.
        compressor = BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=dtype.itemsize)
        filters = [Delta(dtype=dtype.str)] if self.delta else []
        # The crc32c after compression checksums each chunk's payload on every read (zarr's
        # sharding codec checksums only its index by default): a flipped byte raises, not decodes.
        return {"filters": filters, "compressors": [compressor, Crc32cCodec()]}


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("tokens", "tokens", "ids", per_k=False, doc="token ids of every sequence, concatenated"),
    ArraySpec("id_table", "table", "ids", per_k=False,
              doc="the distinct top-k ids of this part, most frequent first"),
    ArraySpec("topk_codes", "labels", "ids", per_k=True,
              doc="teacher top-k ids as positions in id_table (ids = id_table[topk_codes]), most probable first"),
    ArraySpec("topk_logprobs", "labels", "logprob", per_k=True, delta=True,
              doc="teacher log-probs of the top-k ids (fixed point, see LogprobEncoding)"),
    ArraySpec("true_logprob", "labels", "logprob", per_k=False,
              doc="teacher log-prob of the token that actually follows"),
    ArraySpec("tail", "labels", "float32", per_k=False,
              doc="probability mass outside the top-k, summed over the full vocabulary before rounding"),
)
ARRAY_NAMES = tuple(a.name for a in ARRAYS)
ARRAY_SPECS = {a.name: a for a in ARRAYS}

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
    "prompt": "string",  # the user turn, as given to the chat template
    "response": "string",  # the response text (dataset's, or the teacher's greedy decode)
}


@dataclass(frozen=True)
class TopKLabels:
    """Teacher soft labels for n supervised positions; what crosses from store to trainer.

    Row j is the teacher's distribution over the token at position prompt_len + j, given
    the tokens before it. Log-probs are a log-softmax over the full vocabulary at
    temperature 1, so any training temperature can be applied exactly within the top-k.
    """

    ids: np.ndarray  # [n, k] int64, most probable first
    logprobs: np.ndarray  # [n, k] float32, non-increasing along k
    true_logprob: np.ndarray  # [n] float32
    tail: np.ndarray  # [n] float32, mass outside the top-k

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def head(self, n: int) -> TopKLabels:
        """The first n rows (labels of a response cut to n tokens)."""
        return TopKLabels(**{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class SequenceLabels:
    """One stored sequence: its tokens, its table row and its soft labels."""

    seq: int  # index in the whole store (parts in order, rows in order)
    part: str
    row: dict[str, Any]  # the sequences.parquet row
    tokens: np.ndarray  # [n_tokens] int64
    labels: TopKLabels

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
    def ids(self) -> np.dtype:
        return np.dtype(self.id_dtype)

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
