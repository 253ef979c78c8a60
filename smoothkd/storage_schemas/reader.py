"""Reading a store: check the format on open, list committed parts, return typed records.

Nothing damaged is returned as data: an array is checked against its part's commit.json
(shape, files present, sizes, metadata digest) before any chunk of it is read, every chunk
against its crc32c as it is read, and a table against its digest (FORMAT.md, "Integrity").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
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
    except (ValueError, OSError, AttributeError) as e:  # bad JSON or UTF-8 (ValueErrors), not an object
        raise StoreError(f"{loc.url}/zarr.json is unreadable: {e}") from e
    data = attrs.get(spec.MANIFEST_KEY) if isinstance(attrs, dict) else None
    if not isinstance(data, dict):
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
    kind = data.get("label_kind")
    if kind not in spec.LABEL_KINDS or (version == 1 and kind != spec.LABEL_KIND_TOPK):
        raise StoreError(f"{loc.url}: label kind {kind!r} is not supported by this smoothkd (format {version})")
    return spec.Manifest.from_json(data, where=f"{loc.url}/zarr.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shard_keys(arr: zarr.Array) -> list[str]:
    """The chunk files (one shard each) that an array's metadata says exist."""
    grid = [-(-n // c) for n, c in zip(arr.shape, arr.metadata.chunk_grid.chunk_shape)]  # shards per axis
    return [arr.metadata.encode_chunk_key(c) for c in itertools.product(*map(range, grid))]


@dataclass(frozen=True)
class Fault:
    """One thing wrong with a store: its part, the array (or file of the part) and what."""

    part: str
    array: str
    message: str  # names the file at fault, when one is
    file: str = ""  # that file, relative to the store's root

    def __str__(self) -> str:
        return f"{self.part}/{self.array}: {self.message}"


@dataclass(frozen=True)
class PartInfo:
    index: int
    name: str
    committed: bool
    commit: dict[str, Any] | None
    problem: str = ""  # why a commit.json that exists is no commit (cannot be parsed, lacks a count)


def _commit_problem(commit: Any, names: tuple[str, ...]) -> str:
    """What makes a parsed commit.json unusable ("" when nothing does)."""
    if not isinstance(commit, dict):
        return "is not a JSON object"
    bad = [k for k, kind in spec.COMMIT_KEYS.items() if not isinstance(commit.get(k), kind)]
    if bad:
        return f"lacks {', '.join(bad)} (or holds the wrong type)"
    shapes = commit["arrays"]
    bad = [n for n in names
           if not isinstance(shapes.get(n), list) or not all(isinstance(d, int) and d >= 0 for d in shapes[n])]
    return f"has no valid shape for {', '.join(bad)}" if bad else ""


def list_parts(loc: StoreLocation, manifest: spec.Manifest) -> list[PartInfo]:
    """Every part directory, committed or not, in index order."""
    out = []
    for name in loc.listdir(spec.PARTS_DIR):
        if not name.startswith("part-") or not name[5:].isdigit():
            continue
        commit, problem = None, ""
        if loc.exists(spec.PARTS_DIR, name, spec.COMMIT_FILE):
            try:
                commit = loc.read_json(spec.PARTS_DIR, name, spec.COMMIT_FILE)
                problem = _commit_problem(commit, manifest.array_names)
            except (ValueError, OSError) as e:  # bad JSON or UTF-8: torn (by an older smoothkd) or damaged
                problem = f"cannot be parsed ({e})"
            if problem:
                commit = None  # not a commit: the part is not committed, and check() and verify say why
        out.append(PartInfo(int(name[5:]), name, commit is not None, commit, problem))
    return out


class ArrayFault(StoreError):
    """Arrays of a part that do not fit together (found while decoding them)."""

    def __init__(self, array: str, message: str, text: str):
        super().__init__(text)
        self.array, self.message = array, message


class PartArrays:
    """Rows of one part's arrays (all of them by default), each read on first use and kept as
    stored: ids as codes, log-probs in fixed point, a third of their decoded size. The methods
    decode the label rows a caller asks for (a slice or row indices): a run usually selects a
    subset of a part (one split, one source), and a trainer never needs `true_logprob`, so it
    is never read for one.

    Version 2 entries (stored end to end, rank-major) are kept as a padded [n_labels, k] grid
    of stored values, the layout of version 1; decoded rows are as wide as their widest position.
    """

    def __init__(self, store: SoftLabelStore, part: str, tokens: slice = slice(None), labels: slice = slice(None)):
        self._store, self._part, self._token_rows, self._label_rows = store, part, tokens, labels
        self._stored: dict[str, np.ndarray] = {}
        m = store.manifest
        self._v1, self._sampled = m.schema_version == 1, m.label_kind == spec.LABEL_KIND_SAMPLED

    def _array(self, name: str) -> np.ndarray:
        if name not in self._stored:
            rows = self._label_rows if self._store.array_spec(name).axis == "labels" else slice(None)
            self._stored[name] = self._store.read(self._part, name, rows)
        return self._stored[name]

    def _fault(self, array: str, message: str) -> ArrayFault:
        return ArrayFault(array, message, f"{self._store.url}: {self._part}/{array}: {message}: the part is damaged; "
                                          f"`smoothkd store verify {self._store.url}` lists every fault")

    @cached_property
    def n_entries(self) -> np.ndarray:
        """[n_labels] entries at each position (top_k everywhere in a version 1 store)."""
        if self._v1:
            return np.full(len(self._array("tail")), self._store.manifest.top_k, dtype=np.int64)
        n = self._array("n_entries").astype(np.int64)
        if n.size and (n.min() < 1 or n.max() > self._store.manifest.top_k):
            raise self._fault("n_entries", f"values outside 1..{self._store.manifest.top_k}")
        return n

    def _grid(self, name: str) -> np.ndarray:
        """A per-entry array as a padded [n_labels, k] grid of stored values (0 at padding)."""
        key = f"{name}:grid"
        if key not in self._stored:
            if self._v1:
                self._stored[key] = self._array(name)
            else:
                if self._label_rows != slice(None):
                    raise ValueError("version 2 entries are read for whole parts (read_part)")
                flat, n = self._array(name), self.n_entries
                if int(n.sum()) != len(flat):
                    raise self._fault(name, f"{len(flat)} entries where n_entries sums to {int(n.sum())}")
                valid = np.arange(int(n.max()) if n.size else 0) < n[:, None]
                grid = np.zeros(valid.shape, dtype=flat.dtype)
                if self._store.array_spec(name).rank_major:
                    grid.T[valid.T] = flat  # the transposed grid's entries, in order
                else:
                    grid[valid] = flat
                self._stored[key] = grid
        return self._stored[key]

    def _width(self, rows: slice | np.ndarray) -> int:
        """Columns that decoded `rows` need: their widest position's entries."""
        n = self.n_entries[rows]
        return int(n.max()) if n.size else 0

    def _valid(self, rows: slice | np.ndarray, width: int) -> np.ndarray:
        return np.arange(width) < self.n_entries[rows][:, None]

    @cached_property
    def tokens(self) -> np.ndarray:
        """[n_tokens] int64."""
        return self._store.read(self._part, "tokens", self._token_rows).astype(np.int64)

    def ids(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n, k] int64, most probable (or most drawn) first; PAD_ID at padding."""
        name = "topk_codes" if self._v1 else "entry_codes"
        w = self._width(rows)
        codes = self._grid(name)[rows, :w]
        table = self._store.id_table(self._part)
        if codes.size and codes.max() >= len(table):
            raise self._fault(name, f"codes up to {codes.max()} for an id_table of {len(table)} entries")
        return np.where(self._valid(rows, w), table[codes], spec.PAD_ID)

    def _fixed_logprobs(self, rows: slice | np.ndarray) -> np.ndarray:
        """[n, k] the stored fixed-point log-probs of the entries (0 at padding)."""
        w = self._width(rows)
        if self._v1:
            return self._grid("topk_logprobs")[rows, :w]
        steps = self._grid("entry_logprobs")[rows, :w]
        return np.cumsum(steps, axis=1, dtype=np.int64)  # steps down from the entry before

    def logprobs(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n, k] float32; -inf at padding."""
        fixed = self._fixed_logprobs(rows)
        if fixed.size and fixed.max() > np.iinfo(self._store.manifest.encoding.dtype).max:
            raise self._fault("entry_logprobs", "log-prob steps add up beyond the encoding's range")
        decoded = self._store.manifest.encoding.decode(fixed)
        return np.where(self._valid(rows, fixed.shape[1]), decoded, np.float32(-np.inf))

    def counts(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n, m] int32 draws of each entry's id (sampled labels); 0 at padding."""
        return self._grid("entry_counts")[rows, : self._width(rows)].astype(np.int32)

    @cached_property
    def _true_logprob(self) -> np.ndarray:
        """[n_labels] float32, for a version 2 top-k part: from the entry of the true token's rank, or
        from true_outside where it is not among the entries."""
        rank = self._array("true_rank").astype(np.int64)
        outside = rank == self._store.manifest.top_k
        values = self._array("true_outside")
        if int(outside.sum()) != len(values):
            raise self._fault("true_outside", f"{len(values)} values for {int(outside.sum())} positions "
                                              "whose true token is not among the entries")
        inside = np.flatnonzero(~outside)
        if inside.size and (rank[inside] >= self.n_entries[inside]).any():
            raise self._fault("true_rank", "ranks beyond the position's entries")
        fixed = np.zeros(len(rank), dtype=np.int64)
        fixed[outside] = values
        fixed[inside] = self._fixed_logprobs(inside)[np.arange(inside.size), rank[inside]]
        return self._store.manifest.encoding.decode(fixed)

    def true_logprob(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n] float32."""
        if self._v1 or self._sampled:
            return self._store.manifest.encoding.decode(self._array("true_logprob")[rows])
        return self._true_logprob[rows]

    def tail(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[n] float32."""
        stored = self._array("tail")[rows]
        return np.asarray(stored, dtype=np.float32) if self._v1 else self._store.manifest.tail.decode(stored)

    def labels(self, rows: slice | np.ndarray = slice(None), with_true: bool = True) -> spec.Labels:
        """These label rows, decoded: what `SoftLabelStore.sequence` returns too. A trainer never needs
        the true token's log-prob: without it (with_true False; NaN in its place) its arrays are not read."""
        if with_true:
            true = self.true_logprob(rows)
        else:
            true = np.full(len(self.n_entries[rows]), np.nan, dtype=np.float32)
        if self._sampled:
            return spec.SampledLabels(ids=self.ids(rows), counts=self.counts(rows), true_logprob=true)
        return spec.TopKLabels(ids=self.ids(rows), logprobs=self.logprobs(rows), true_logprob=true, tail=self.tail(rows))


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
    selection: dict[str, Any]  # which entries a position keeps (adaptive k), or the draws (sampled labels)

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
        self._specs = {a.name: a for a in manifest.arrays}
        all_parts = list_parts(self.loc, manifest)
        self.parts = [p for p in all_parts if p.committed]
        self.uncommitted = [p for p in all_parts if not p.committed]
        self._commits = {p.name: p.commit for p in self.parts}
        self._id_tables: dict[str, np.ndarray] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}  # opened and checked, metadata only
        self._files: dict[str, dict[str, int]] = {}  # part -> its files (relative path -> bytes)
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

    def array_spec(self, name: str) -> spec.ArraySpec:
        """The spec of one of this store's arrays."""
        return self._specs[name]

    def array(self, part: str, name: str) -> zarr.Array:
        """One array of a committed part, checked (see `part_faults`) before any chunk of it is
        read: a damaged one raises StoreError, and a shape its metadata overstates is never read."""
        if (part, name) not in self._arrays:
            arr, faults = self._open_array(part, name)
            if faults:
                raise self._damaged(faults)
            self._arrays[part, name] = arr
        return self._arrays[part, name]

    def read(self, part: str, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of one array, as stored. Each chunk read is checked against its crc32c."""
        arr = self.array(part, name)
        try:
            return arr[rows]
        except (ValueError, RuntimeError, OSError) as e:  # a checksum mismatch, a torn shard, a codec failure
            files = ", ".join(self._path(part, f"{name}/{key}") for key in _shard_keys(arr))
            raise StoreError(f"{self.url}: {part}/{name}: {files} cannot be read ({e}): the file is damaged; "
                             f"`smoothkd store verify {self.url}` lists every fault") from e

    def id_table(self, part: str) -> np.ndarray:
        """The part's code -> id table (small; read once per part)."""
        if part not in self._id_tables:
            self._id_tables[part] = self.read(part, "id_table").astype(np.int64)
        return self._id_tables[part]

    def part_table(self, part: str) -> pa.Table:
        """A part's sequences.parquet, checked against its digest in commit.json."""
        path = self._path(part, spec.TABLE_FILE)
        try:
            data = self.loc.fs.cat_file(self.loc.path(path))
        except OSError as e:
            raise StoreError(f"{self.url}: {part}/{spec.TABLE_FILE}: {path} cannot be read: {e}") from e
        recorded = self.recorded_files(part)
        if recorded and spec.TABLE_FILE in recorded and _sha256(data) != recorded[spec.TABLE_FILE]["sha256"]:
            raise StoreError(f"{self.url}: {part}/{spec.TABLE_FILE}: {path} differs from the sha256 commit.json "
                             "records for it: the file is damaged; "
                             f"`smoothkd store verify {self.url}` lists every fault")
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise StoreError(f"{self.url}: {part}/{spec.TABLE_FILE}: {path} is not a readable Parquet file "
                             f"({e}): the file is damaged") from e

    # --- integrity: FORMAT.md, "Integrity" ---------------------------------------------------------

    def _path(self, part: str, rel: str) -> str:
        """A file of a part, relative to the store's root: how faults name it."""
        return f"{spec.PARTS_DIR}/{part}/{rel}"

    def recorded_files(self, part: str) -> dict[str, dict[str, Any]] | None:
        """The part's files as commit.json records them; None for parts written before digests."""
        return (self._commits.get(part) or {}).get(spec.FILES_KEY)

    def part_files(self, part: str) -> dict[str, int]:
        """Every file of a part (relative path -> bytes), from one listing, kept."""
        if part not in self._files:
            base = self.loc.path(spec.PARTS_DIR, part)
            found = self.loc.fs.find(base, detail=True)
            self._files[part] = {p[len(base):].lstrip("/"): int(e["size"]) for p, e in found.items()}
        return self._files[part]

    def has_digests(self, part: str) -> bool:
        """Whether the part was written with file digests and chunk checksums (not by an older smoothkd)."""
        return self.recorded_files(part) is not None

    def _file_faults(self, part: str, array: str, rels: list[str]) -> list[Fault]:
        """Files of a part missing, or of another size than commit.json records."""
        files, recorded = self.part_files(part), self.recorded_files(part) or {}
        faults = []
        for rel in rels:
            path = self._path(part, rel)
            if rel not in files:
                faults.append(Fault(part, array, f"{path} is missing", path))
            elif rel in recorded and files[rel] != recorded[rel]["bytes"]:
                faults.append(Fault(part, array, f"{path} is {files[rel]} bytes, commit.json records "
                                                 f"{recorded[rel]['bytes']} (truncated or replaced)", path))
        return faults

    def _open_array(self, part: str, name: str) -> tuple[zarr.Array | None, list[Fault]]:
        """Open one array's metadata and check it, reading no chunk: its files (present, sizes,
        metadata digest) and its dtype and shape against the manifest and commit.json."""
        spec_ = self._specs[name]
        recorded = self.recorded_files(part)
        meta = f"{name}/zarr.json"
        meta_path = self._path(part, meta)
        faults = self._file_faults(part, name, [meta])
        resized = bool(faults)
        faults += self._file_faults(part, name, sorted(r for r in recorded or {} if r.startswith(f"{name}/")
                                                       and r != meta))
        if meta not in self.part_files(part):
            return None, faults
        if recorded and meta in recorded and not resized \
                and _sha256(self.loc.fs.cat_file(self.loc.path(meta_path))) != recorded[meta]["sha256"]:
            faults.append(Fault(part, name, f"{meta_path} differs from the sha256 commit.json records "
                                            "for it (damaged or edited)", meta_path))
        try:
            arr = self._group[f"{spec.PARTS_DIR}/{part}/{name}"]
        except Exception as e:  # noqa: BLE001 - any failure to open is a fault to report
            faults.append(Fault(part, name, f"{meta_path} cannot be opened: {e}", meta_path))
            return None, faults
        m = self.manifest
        want_dtype = spec_.numpy_dtype(m)
        if arr.dtype != want_dtype:
            faults.append(Fault(part, name, f"dtype {arr.dtype}, expected {want_dtype}"))
        want_shape = list(self._commits[part]["arrays"][name])
        if list(arr.shape) != want_shape:
            faults.append(Fault(part, name, f"shape {list(arr.shape)}, commit.json says {want_shape}", meta_path))
        elif list(arr.shape[1:]) != list(spec_.row_shape(m.top_k)):
            faults.append(Fault(part, name, f"rows of shape {list(arr.shape[1:])}, "
                                            f"expected {list(spec_.row_shape(m.top_k))}"))
        elif recorded is None:  # no list of files: the chunk files its (now bounded) metadata implies
            faults += self._file_faults(part, name, [f"{name}/{key}" for key in _shard_keys(arr)])
        return arr, faults

    def part_faults(self, part: str) -> list[Fault]:
        """What can be found wrong with a committed part without reading a chunk: files missing or
        resized, metadata that is not what was committed, dtypes and shapes. A listing and the
        small metadata files; arrays found sound are kept open for the reads that follow."""
        faults = []
        for name in self.manifest.array_names:
            arr, found = self._open_array(part, name)
            if arr is not None and not found:
                self._arrays[part, name] = arr
            faults += found
        others = [r for r in self.recorded_files(part) or {} if r.split("/")[0] not in self._specs]
        for rel in sorted(set(others) | {spec.TABLE_FILE}):
            faults += self._file_faults(part, rel, [rel])
        return faults

    def store_faults(self) -> list[Fault]:
        """Faults of the set of parts, from their commit.json files: a part outside the store's
        parts, a part directory holding another part's commit (a copy), a commit.json that exists
        but is no commit."""
        faults = []
        n, size = self.manifest.dataset.get("n_records"), self.manifest.build.get("part_size")
        for p in self.parts:
            commit_file = self._path(p.name, spec.COMMIT_FILE)
            if n and size and p.index >= self.expected_parts:
                faults.append(Fault(p.name, spec.PARTS_DIR, (
                    f"{spec.PARTS_DIR}/{p.name} is not one of the store's {self.expected_parts} parts "
                    f"({spec.part_name(0)} to {spec.part_name(self.expected_parts - 1)}): a stray or copied "
                    "directory; remove it"), f"{spec.PARTS_DIR}/{p.name}"))
            start = p.commit.get("record_start")
            if p.commit["part"] != p.index or (size and start is not None and start != p.index * int(size)):
                faults.append(Fault(p.name, spec.COMMIT_FILE, (
                    f"{commit_file} is the commit of part {p.commit['part']} (records from {start}): this "
                    "directory is a copy of another part; remove it and rerun the precompute command"), commit_file))
        for p in self.uncommitted:
            if p.problem:
                commit_file = self._path(p.name, spec.COMMIT_FILE)
                faults.append(Fault(p.name, spec.COMMIT_FILE, (
                    f"{commit_file} {p.problem}: damaged (or torn by an older smoothkd killed while committing); "
                    "rerun the precompute command to rewrite the part"), commit_file))
        return faults

    def check(self) -> None:
        """Refuse a damaged store before a run reads it (StoreError naming part, array and file):
        `store_faults` and every committed part's `part_faults`. Reads no chunk: chunks are checked
        against their checksums as a run reads them."""
        faults = self.store_faults()
        for p in self.parts:
            faults += self.part_faults(p.name)
        if faults:
            raise self._damaged(faults)

    def _damaged(self, faults: list[Fault]) -> StoreError:
        shown = [str(f) for f in faults[:10]] + ([f"... and {len(faults) - 10} more"] if len(faults) > 10 else [])
        return StoreError(f"{self.url} is damaged; refusing to read it (`smoothkd store verify {self.url}` "
                          "checks every chunk):\n  " + "\n  ".join(shown))

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
        if self.manifest.schema_version == 1:  # rows of a part's arrays
            arrays, labels = PartArrays(self, part.name, slice(t0, t0 + nt), slice(l0, l0 + nl)), slice(None)
            tokens = arrays.tokens
        else:  # version 2 entries are stored rank-major: the whole part is read
            arrays, labels = PartArrays(self, part.name), slice(l0, l0 + nl)
            tokens = arrays.tokens[t0 : t0 + nt]
        return spec.SequenceLabels(seq=seq, part=part.name, row=row, tokens=tokens, labels=arrays.labels(labels))

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
            selection=m.selection,
        )
