"""Reading a store: check the format on open, list committed parts, return typed records."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from smoothkd.errors import StoreError
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.fsio import StoreLocation


def read_manifest(loc: StoreLocation, missing_ok: bool = False) -> spec.Manifest | None:
    """The store's manifest, after checking that this code knows its format."""
    if not loc.exists("zarr.json"):
        if missing_ok:
            return None
        raise StoreError(f"{loc.url} is not a smoothkd store (no zarr.json at its root)")
    try:
        attrs = json.loads(loc.fs.cat_file(loc.path("zarr.json"))).get("attributes", {})
    except (json.JSONDecodeError, OSError) as e:
        raise StoreError(f"{loc.url}/zarr.json is unreadable: {e}") from e
    data = attrs.get(spec.MANIFEST_KEY)
    if data is None:
        if missing_ok and not attrs:
            return None
        raise StoreError(f"{loc.url} is a zarr group but not a smoothkd store (no '{spec.MANIFEST_KEY}' attribute)")
    if data.get("format") != spec.FORMAT_NAME:
        raise StoreError(f"{loc.url}: format {data.get('format')!r} is not {spec.FORMAT_NAME!r}")
    version = data.get("schema_version")
    if version not in spec.KNOWN_SCHEMA_VERSIONS:
        raise StoreError(
            f"{loc.url}: schema version {version} is not one this smoothkd reads "
            f"({', '.join(map(str, spec.KNOWN_SCHEMA_VERSIONS))}); upgrade smoothkd"
        )
    if data.get("label_kind") != spec.LABEL_KIND_TOPK:
        raise StoreError(f"{loc.url}: label kind {data.get('label_kind')!r} is not supported by this smoothkd")
    return spec.Manifest.from_json(data)


@dataclass(frozen=True)
class PartInfo:
    index: int
    name: str
    committed: bool
    commit: dict[str, Any] | None


def list_parts(loc: StoreLocation) -> list[PartInfo]:
    """Every part directory, committed or not, in index order."""
    out = []
    for name in loc.listdir(spec.PARTS_DIR):
        if not name.startswith("part-") or not name[5:].isdigit():
            continue
        commit = None
        if loc.exists(spec.PARTS_DIR, name, spec.COMMIT_FILE):
            try:
                commit = loc.read_json(spec.PARTS_DIR, name, spec.COMMIT_FILE)
            except (json.JSONDecodeError, OSError):
                commit = None  # a torn commit file means the part never committed
        out.append(PartInfo(int(name[5:]), name, commit is not None, commit))
    return out


class PartArrays:
    """Rows of one part's arrays (all of them by default), each read on first use and kept as
    stored: ids as codes, log-probs in fixed point, a third of their decoded size. The methods
    decode the label rows a caller asks for (a slice or row indices): a run usually selects a
    subset of a part (one split, one source), and a trainer never needs `true_logprob`, so it
    is never read for one."""

    def __init__(self, store: SoftLabelStore, part: str, tokens: slice = slice(None), labels: slice = slice(None)):
        self._store, self._part, self._token_rows, self._label_rows = store, part, tokens, labels
        self._stored: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._stored:
            self._stored[name] = self._store.array(self._part, name)[self._label_rows]
        return self._stored[name]

    @cached_property
    def tokens(self) -> np.ndarray:
        """[n_tokens] int64."""
        return self._store.array(self._part, "tokens")[self._token_rows].astype(np.int64)

    def ids(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n, k] int64, most probable first."""
        return self._store.id_table(self._part)[self._array("topk_codes")[rows]]

    def logprobs(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n, k] float32."""
        return self._store.manifest.encoding.decode(self._array("topk_logprobs")[rows])

    def true_logprob(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n] float32."""
        return self._store.manifest.encoding.decode(self._array("true_logprob")[rows])

    def tail(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n] float32."""
        return np.asarray(self._array("tail")[rows], dtype=np.float32)

    def labels(self, rows: slice | np.ndarray = slice(None)) -> spec.TopKLabels:
        """These label rows, decoded: what `SoftLabelStore.sequence` returns too."""
        return spec.TopKLabels(ids=self.ids(rows), logprobs=self.logprobs(rows),
                               true_logprob=self.true_logprob(rows), tail=self.tail(rows))


@dataclass(frozen=True)
class StoreInfo:
    """A store at a glance: `smoothkd store info` prints it, `--json` prints `to_json()`."""

    url: str
    format: str
    schema_version: int
    label_kind: str
    teacher: dict[str, Any]  # as in the manifest
    top_k: int
    vocab_size: int
    id_dtype: str
    logprob_encoding: dict[str, Any]
    n_parts: int  # committed
    n_uncommitted_parts: int  # interrupted writes, ignored by readers
    n_expected_parts: int  # in the finished store
    missing_parts: list[str]  # names of the expected parts not committed yet
    complete: bool
    n_sequences: int
    n_tokens: int
    n_supervised_tokens: int
    supervised_tokens_by_source: dict[str, int]
    supervised_tokens_by_split: dict[str, int]
    dropped_sequences: dict[str, int]  # reason -> sequences precompute did not write
    truncated_sequences: int
    bytes_on_disk: int
    bytes_per_supervised_token: float | None  # None for an empty store
    dataset: dict[str, Any]
    build: dict[str, Any]
    tokenizer: dict[str, Any]
    created: str
    tool: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SoftLabelStore:
    """Read access to a committed store. Only committed parts are visible."""

    def __init__(self, url: str):
        self.loc = StoreLocation(url)
        self.url = url
        manifest = read_manifest(self.loc)
        assert manifest is not None
        self.manifest = manifest
        all_parts = list_parts(self.loc)
        self.parts = [p for p in all_parts if p.committed]
        self.uncommitted = [p for p in all_parts if not p.committed]
        self._id_tables: dict[str, np.ndarray] = {}
        self._group = zarr.open_group(self.loc.zarr_store(read_only=True), mode="r")
        counts = np.array([p.commit["n_sequences"] for p in self.parts], dtype=np.int64)
        self._seq_starts = np.concatenate([[0], np.cumsum(counts)])

    @property
    def expected_parts(self) -> int:
        """How many parts the finished store has: one per block of part_size records."""
        n, size = self.manifest.dataset.get("n_records"), self.manifest.build.get("part_size")
        return -(-int(n) // int(size)) if n and size else len(self.parts)

    @property
    def missing_parts(self) -> list[int]:
        """Parts of the dataset not committed yet (a run still going, killed, or a shard not run)."""
        done = {p.index for p in self.parts}
        return [i for i in range(self.expected_parts) if i not in done]

    @property
    def n_sequences(self) -> int:
        return int(self._seq_starts[-1])

    @property
    def n_supervised_tokens(self) -> int:
        return sum(int(p.commit["n_labels"]) for p in self.parts)

    @property
    def n_tokens(self) -> int:
        return sum(int(p.commit["n_tokens"]) for p in self.parts)

    def array(self, part: str, name: str) -> zarr.Array:
        return self._group[f"{spec.PARTS_DIR}/{part}/{name}"]

    def id_table(self, part: str) -> np.ndarray:
        """The part's code -> id table (small; read once per part)."""
        if part not in self._id_tables:
            self._id_tables[part] = self.array(part, "id_table")[...].astype(np.int64)
        return self._id_tables[part]

    def part_table(self, part: str) -> pa.Table:
        return pq.read_table(self.loc.path(spec.PARTS_DIR, part, spec.TABLE_FILE), filesystem=self.loc.fs)

    @cached_property
    def _tables(self) -> dict[str, pa.Table]:
        return {p.name: self.part_table(p.name) for p in self.parts}

    def table(self) -> pa.Table:
        """All sequence rows, in store order, with `seq` and `part` columns added."""
        tables = [
            t.append_column("part", pa.array([name] * t.num_rows, pa.string()))
            for name, t in self._tables.items()
        ]
        if not tables:
            return pa.table({})
        table = pa.concat_tables(tables)
        return table.add_column(0, "seq", pa.array(np.arange(table.num_rows, dtype=np.int64)))

    def locate(self, seq: int) -> tuple[PartInfo, int]:
        if not 0 <= seq < self.n_sequences:
            raise StoreError(f"sequence {seq} is out of range: {self.url} holds {self.n_sequences} sequences")
        i = int(np.searchsorted(self._seq_starts, seq, side="right") - 1)
        return self.parts[i], seq - int(self._seq_starts[i])

    def sequence(self, seq: int) -> spec.SequenceLabels:
        part, row_index = self.locate(seq)
        row = self._tables[part.name].slice(row_index, 1).to_pylist()[0]
        t0, nt = row["token_offset"], row["n_tokens"]
        l0, nl = row["label_offset"], row["n_labels"]
        rows = PartArrays(self, part.name, slice(t0, t0 + nt), slice(l0, l0 + nl))
        return spec.SequenceLabels(
            seq=seq,
            part=part.name,
            row=row,
            tokens=rows.tokens,
            labels=rows.labels(),
        )

    def read_part(self, part: str) -> PartArrays:
        """A whole part, one read per array: for readers that use many of its sequences."""
        return PartArrays(self, part)

    def bytes_on_disk(self) -> int:
        return self.loc.bytes_on_disk()

    def info(self) -> StoreInfo:
        """Summary counts; what `smoothkd store info` prints."""
        table = self.table()
        by_source: dict[str, int] = {}
        by_split: dict[str, int] = {}
        if table.num_rows:
            for src, split, n in zip(
                table["source"].to_pylist(), table["split"].to_pylist(), table["n_labels"].to_pylist()
            ):
                by_source[src] = by_source.get(src, 0) + n
                by_split[split] = by_split.get(split, 0) + n
        dropped: dict[str, int] = {}
        for p in self.parts:
            for reason, n in (p.commit.get("dropped") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + int(n)
        missing = self.missing_parts
        size = self.bytes_on_disk()
        n_sup = self.n_supervised_tokens
        m = self.manifest
        return StoreInfo(
            url=self.url,
            format=m.format,
            schema_version=m.schema_version,
            label_kind=m.label_kind,
            teacher=m.teacher,
            top_k=m.top_k,
            vocab_size=m.vocab_size,
            id_dtype=m.id_dtype,
            logprob_encoding=m.logprob_encoding,
            n_parts=len(self.parts),
            n_uncommitted_parts=len(self.uncommitted),
            n_expected_parts=self.expected_parts,
            missing_parts=[spec.part_name(i) for i in missing],
            complete=not missing,
            n_sequences=self.n_sequences,
            n_tokens=self.n_tokens,
            n_supervised_tokens=n_sup,
            supervised_tokens_by_source=by_source,
            supervised_tokens_by_split=by_split,
            dropped_sequences=dropped,
            truncated_sequences=sum(int(p.commit.get("truncated", 0)) for p in self.parts),
            bytes_on_disk=size,
            bytes_per_supervised_token=(size / n_sup) if n_sup else None,
            dataset=m.dataset,
            build=m.build,
            tokenizer=m.tokenizer,
            created=m.created,
            tool=m.tool,
        )
