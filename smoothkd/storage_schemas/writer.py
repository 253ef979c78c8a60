"""Writing a store: create or check the manifest, then write immutable parts.

On local disks a part is written under a temporary name and committed by renaming it to its
final name, commit.json inside; on object stores it is written under its final name and
committed by writing its commit.json last. A killed writer leaves at most temporary files or
an uncommitted part, which readers ignore and the next run removes and rewrites.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from smoothkd import __version__
from smoothkd.errors import StoreError
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.fsio import PARTIAL, StoreLocation, partial_name
from smoothkd.storage_schemas.reader import list_parts, read_manifest


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    """A Zarr v3 group's zarr.json, written by the writer itself where it must control the write."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def _padded(rows: list[np.ndarray], width: int, fill: Any, dtype: Any) -> np.ndarray:
    """[n, k] rows of several widths, end to end, padded on the right to `width`."""
    out = np.full((sum(len(r) for r in rows), width), fill, dtype=dtype)
    start = 0
    for r in rows:
        out[start : start + len(r), : r.shape[1]] = r
        start += len(r)
    return out


def _entries(grid: np.ndarray, valid: np.ndarray, array: spec.ArraySpec) -> np.ndarray:
    """The valid entries of a [n, k] grid in the array's order: row by row, or rank-major (every
    row's first, then every second, ...; FORMAT.md)."""
    return grid.T[valid.T] if array.rank_major else grid[valid]


@dataclass
class PartBuilder:
    """Accumulates the sequences of one part in memory, computing offsets as it goes."""

    top_k: int  # the most entries a position may keep (for sampled labels: the draws per position)
    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    labels: list[spec.Labels] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    n_tokens: int = 0
    n_labels: int = 0

    def add(self, meta: dict[str, Any], tokens: np.ndarray, prompt_tokens: int, labels: spec.Labels) -> None:
        n_labels = len(tokens) - prompt_tokens
        where = f"record {meta.get('record_id')} ({meta.get('source')})"
        sampled = isinstance(labels, spec.SampledLabels)
        for name in ("true_logprob",) if sampled else ("logprobs", "true_logprob", "tail"):
            values = getattr(labels, name)
            if np.isnan(values).any() or (values == np.inf).any() or (name != "logprobs" and np.isinf(values).any()):
                raise StoreError(f"{where}: the teacher's {name} holds NaN or infinity; refusing to store it "
                                 "(check the teacher's dtype)")
        if len(labels) != n_labels or labels.ids.ndim != 2 or not 1 <= labels.ids.shape[1] <= self.top_k:
            raise ValueError(f"{where}: {len(labels)} label rows of width {labels.ids.shape[1:]} "
                             f"for {n_labels} supervised tokens at top-k {self.top_k}")
        valid = labels.counts > 0 if sampled else np.isfinite(labels.logprobs)
        n = valid.sum(axis=1)
        if (n < 1).any() or (valid != (np.arange(valid.shape[1]) < n[:, None])).any():
            raise ValueError(f"{where}: every position needs at least one entry, padding only after them")
        self.rows.append({
            **meta,
            "token_offset": self.n_tokens,
            "n_tokens": len(tokens),
            "prompt_tokens": prompt_tokens,
            "label_offset": self.n_labels,
            "n_labels": n_labels,
        })
        self.tokens.append(tokens)
        self.labels.append(labels)
        self.targets.append(np.asarray(tokens[prompt_tokens:], dtype=np.int64))
        self.n_tokens += len(tokens)
        self.n_labels += n_labels

    def arrays(self, manifest: spec.Manifest) -> dict[str, np.ndarray]:
        """The part's arrays in their stored dtypes (log-probs rounded here, once)."""
        ids_dtype, enc, k = manifest.ids, manifest.encoding, self.top_k
        specs = {a.name: a for a in manifest.arrays}

        def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        ids = _padded([lab.ids for lab in self.labels], k, spec.PAD_ID, np.int64)
        true_logprob = cat([lab.true_logprob for lab in self.labels], np.float32)
        rank = spec.count_dtype(k)
        if manifest.label_kind == spec.LABEL_KIND_SAMPLED:
            counts = _padded([lab.counts for lab in self.labels], k, 0, np.int64)  # type: ignore[union-attr]
            valid = counts > 0
            codes, table = spec.encode_ids(_entries(ids, valid, specs["entry_codes"]), ids_dtype)
            return {
                "tokens": cat(self.tokens, ids_dtype), "id_table": table,
                "n_entries": valid.sum(axis=1).astype(rank), "entry_codes": codes,
                "entry_counts": _entries(counts, valid, specs["entry_counts"]).astype(spec.count_dtype(int(manifest.selection["samples"]))),
                "true_logprob": enc.encode(true_logprob),
            }
        logprobs = _padded([lab.logprobs for lab in self.labels], k, -np.inf, np.float32)  # type: ignore[union-attr]
        valid = np.isfinite(logprobs)
        fixed = np.where(valid, enc.encode(np.where(valid, logprobs, 0)), 0).astype(np.int64)
        steps = np.diff(fixed, axis=1, prepend=0)  # >= 0: sorted log-probs, most probable first
        codes, table = spec.encode_ids(_entries(ids, valid, specs["entry_codes"]), ids_dtype)
        hit = (ids == cat(self.targets, np.int64)[:, None]) & valid
        inside = hit.any(axis=1)
        return {
            "tokens": cat(self.tokens, ids_dtype), "id_table": table,
            "n_entries": valid.sum(axis=1).astype(rank), "entry_codes": codes,
            "entry_logprobs": _entries(steps, valid, specs["entry_logprobs"]).astype(enc.dtype),
            "true_rank": np.where(inside, hit.argmax(axis=1), k).astype(rank),
            "true_outside": enc.encode(true_logprob[~inside]),
            "tail": manifest.tail.encode(cat([lab.tail for lab in self.labels], np.float32)),  # type: ignore[union-attr]
        }

    def table(self, manifest: spec.Manifest) -> pa.Table:
        columns = {
            name: pa.array([r[name] for r in self.rows], type=pa.type_for_alias(t))
            for name, t in manifest.table_columns.items()
        }
        return pa.table(columns)


class StoreWriter:
    """Opens (creating or checking) a store for writing parts.

    Safe with other writers into the same store (shards, or one run started twice): the
    manifest is created exclusively, and a part is committed once; a writer that finds a part
    committed by another discards its own copy (FORMAT.md, "Concurrent writers").
    """

    def __init__(self, url: str, manifest: spec.Manifest, overwrite: bool = False):
        self.loc = StoreLocation(url)
        self.manifest = manifest
        self._open(overwrite)

    def _open(self, overwrite: bool) -> None:
        existing = read_manifest(self.loc, missing_ok=True)
        # Temporary files (of a writer killed while creating the manifest, or creating it now)
        # do not make a directory someone else's. The manifest is the first name a writer makes
        # visible: one seen by listdir after a look that found none is another writer's new
        # store, so look again before calling the directory foreign.
        if existing is None and any(not name.endswith(PARTIAL) for name in self.loc.listdir()):
            existing = read_manifest(self.loc, missing_ok=True)
        if existing is None and any(not name.endswith(PARTIAL) for name in self.loc.listdir()):
            raise StoreError(
                f"{self.loc.url} exists and is not a smoothkd store; choose an empty or new --out "
                "(--overwrite only replaces smoothkd stores)"
            )
        diff = spec.identity_diff(existing.identity(), self.manifest.identity()) if existing else []
        if diff:
            if not overwrite:
                raise StoreError(
                    f"{self.loc.url} holds a store built differently; refusing to mix them "
                    "(pass --overwrite to replace it, or choose another --out):\n  " + "\n  ".join(diff)
                )
            self._remove_store()
            existing = None
        if existing is None:
            self.loc.create_json(self._root_metadata(), "zarr.json")
            # Ours, or the manifest of a writer that created the store between our look and our create.
            existing = read_manifest(self.loc)
            diff = spec.identity_diff(existing.identity(), self.manifest.identity())
            if diff:
                raise StoreError(f"{self.loc.url} was created at the same moment by a run built differently; "
                                 "refusing to mix them:\n  " + "\n  ".join(diff))
        self.manifest = existing  # on resume, the original creation record

    def _root_metadata(self) -> dict[str, Any]:
        """The root group's zarr.json, manifest included: one file, so a store never lacks its manifest."""
        manifest = {**self.manifest.to_json(), "created": _now(), "tool": {"name": "smoothkd", "version": __version__}}
        return _group_metadata({spec.MANIFEST_KEY: manifest})

    def _remove_store(self) -> None:
        """Delete the store for --overwrite in an order that leaves, wherever a kill stops it, a store
        (the manifest goes last) whose every committed part is whole (commits go first)."""
        for name in self.loc.listdir(spec.PARTS_DIR):
            self.loc.remove(spec.PARTS_DIR, name, spec.COMMIT_FILE)
        for name in self.loc.listdir():
            if name != "zarr.json":
                self.loc.remove(name)
        self.loc.remove("zarr.json")

    def committed_parts(self) -> set[int]:
        return {p.index for p in list_parts(self.loc, self.manifest) if p.committed}

    def _committed(self, *parts: str) -> bool:
        """Whether a part directory holds a readable commit.json (what readers call committed)."""
        try:
            self.loc.read_json(*parts, spec.COMMIT_FILE)
        except (OSError, ValueError):  # missing, or torn by an older writer (ValueError: bad JSON or UTF-8)
            return False
        return True

    def write_part(self, index: int, part: PartBuilder, info: dict[str, Any]) -> dict[str, Any] | None:
        """Write one part and commit it: its commit record, or None when another writer into this
        store committed the part first (then this copy is discarded and theirs kept)."""
        name = spec.part_name(index)
        if self._committed(spec.PARTS_DIR, name):
            return None
        arrays = part.arrays(self.manifest)
        commit = {
            "part": index,
            "n_sequences": len(part.rows),
            "n_tokens": part.n_tokens,
            "n_labels": part.n_labels,
            "arrays": {n: list(arrays[n].shape) for n in self.manifest.array_names},
            "created": _now(),
            **info,
        }
        if not self.loc.exists(spec.PARTS_DIR, "zarr.json"):  # the parts group, on disk before any part in it
            self.loc.write_json_atomic(_group_metadata({}), spec.PARTS_DIR, "zarr.json")
        if not self.loc.is_local:
            # No atomic rename on object stores: the part is written under its final name and the
            # commit is created exclusively (first one wins where the filesystem has conditional writes).
            self.loc.remove(spec.PARTS_DIR, name)  # leftovers of a killed run
            self._write_files(name, part, arrays)
            commit[spec.FILES_KEY] = self._digests(name)
            return commit if self.loc.create_json(commit, spec.PARTS_DIR, name, spec.COMMIT_FILE) else None
        if self.loc.exists(spec.PARTS_DIR, name):
            self._set_aside(name)
        staging = partial_name(name)
        try:
            self._write_files(staging, part, arrays)
            commit[spec.FILES_KEY] = self._digests(staging)
            self.loc.write_json_atomic(commit, spec.PARTS_DIR, staging, spec.COMMIT_FILE)
            self.loc.sync(spec.PARTS_DIR, staging)
            kept = self.loc.rename_to_new((spec.PARTS_DIR, staging), (spec.PARTS_DIR, name))
        except OSError:
            # Another writer committed this part and removed our staging copy below, mid-write.
            if not self._committed(spec.PARTS_DIR, name):
                raise
            kept = False
        # Staging copies of this part (ours when another writer won; those of killed writers):
        # any writer still filling one can no longer commit it, since the final name is taken.
        for leftover in self.loc.listdir(spec.PARTS_DIR):
            if leftover.startswith(f"{name}.") and leftover.endswith(PARTIAL):
                try:
                    self.loc.remove(spec.PARTS_DIR, leftover)
                except OSError:  # a writer still adding files to it: it removes it on finding the part committed
                    pass
        return commit if kept else None

    def _set_aside(self, name: str) -> None:
        """Move an uncommitted directory under a part's final name (an older smoothkd's killed
        write) out of the way, to be removed with the staging copies. Moved, not deleted in
        place: a part another writer commits meanwhile is put back, not lost."""
        aside = partial_name(name)
        try:
            self.loc.rename_to_new((spec.PARTS_DIR, name), (spec.PARTS_DIR, aside))
        except FileNotFoundError:  # another writer moved it first
            return
        if self._committed(spec.PARTS_DIR, aside):
            self.loc.rename_to_new((spec.PARTS_DIR, aside), (spec.PARTS_DIR, name))

    def _digests(self, directory: str) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file written under parts/<directory>/, read back: what readers
        check the part against (FORMAT.md, "Integrity")."""
        base = self.loc.path(spec.PARTS_DIR, directory)
        out = {}
        for path, entry in self.loc.fs.find(base, detail=True).items():
            rel = path[len(base):].lstrip("/")
            out[rel] = {"bytes": int(entry["size"]), "sha256": hashlib.sha256(self.loc.fs.cat_file(path)).hexdigest()}
        return dict(sorted(out.items()))

    def _write_files(self, directory: str, part: PartBuilder, arrays: dict[str, np.ndarray]) -> None:
        """The part's arrays and table under parts/<directory>/, everything but its commit."""
        # A store rooted at the part: zarr would otherwise rewrite (or try to) the groups above it.
        group = zarr.open_group(self.loc.zarr_store(spec.PARTS_DIR, directory), mode="w-", zarr_format=3)
        for a in self.manifest.arrays:
            data = arrays[a.name]
            rows = max(1, data.shape[0])
            # a chunk of entries holds as many as CHUNK_ROWS positions do (version 1's [4096, top_k]):
            # small chunks compress worse (entry codes 105.8 B/token in chunks of 4,096, against 98.9)
            per_chunk = spec.CHUNK_ROWS * (self.manifest.top_k if a.axis == "entries" else 1)
            chunk_rows = min(per_chunk, rows)
            shard_rows = math.ceil(rows / chunk_rows) * chunk_rows
            group.create_array(
                a.name,
                data=data,
                chunks=(chunk_rows, *data.shape[1:]),
                shards=(shard_rows, *data.shape[1:]),
                # Every chunk stored, all-zero ones too: a chunk absent from a shard is then damage,
                # never zarr's shorthand for fill values.
                config={"write_empty_chunks": True},
                **a.codecs(data.dtype),
            )
        pq.write_table(
            part.table(self.manifest),
            self.loc.path(spec.PARTS_DIR, directory, spec.TABLE_FILE),
            filesystem=self.loc.fs,
            compression="zstd",
        )
