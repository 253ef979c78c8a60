"""Writing a store: create or check the manifest, then write immutable parts.

A part is written under its final name and becomes visible only when its commit.json is
written, last and atomically. A killed writer therefore leaves at most an uncommitted
part directory, which readers ignore and the next run deletes and rewrites.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.errors import ContainsGroupError

from smoothkd import __version__
from smoothkd.errors import StoreError
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.fsio import StoreLocation
from smoothkd.storage_schemas.reader import list_parts, read_manifest

# How long a writer waits for a concurrent shard's manifest before calling a directory foreign.
CREATE_WAIT_POLLS = 5
CREATE_WAIT_SECONDS = 0.4


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PartBuilder:
    """Accumulates the sequences of one part in memory, computing offsets as it goes."""

    top_k: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logprobs: list[np.ndarray] = field(default_factory=list)
    true_logprob: list[np.ndarray] = field(default_factory=list)
    tail: list[np.ndarray] = field(default_factory=list)
    n_tokens: int = 0
    n_labels: int = 0

    def add(self, meta: dict[str, Any], tokens: np.ndarray, prompt_tokens: int, labels: spec.TopKLabels) -> None:
        n_labels = len(tokens) - prompt_tokens
        for name in ("logprobs", "true_logprob", "tail"):
            if not np.isfinite(getattr(labels, name)).all():
                raise StoreError(f"record {meta.get('record_id')} ({meta.get('source')}): the teacher's {name} "
                                 "holds NaN or infinity; refusing to store it (check the teacher's dtype)")
        if len(labels) != n_labels or labels.ids.shape[1:] != (self.top_k,):
            raise ValueError(
                f"record {meta.get('record_id')}: {len(labels)} label rows of width {labels.ids.shape[1:]} "
                f"for {n_labels} supervised tokens at top-k {self.top_k}"
            )
        self.rows.append({
            **meta,
            "token_offset": self.n_tokens,
            "n_tokens": len(tokens),
            "prompt_tokens": prompt_tokens,
            "label_offset": self.n_labels,
            "n_labels": n_labels,
        })
        self.tokens.append(tokens)
        self.topk_ids.append(labels.ids)
        self.topk_logprobs.append(labels.logprobs)
        self.true_logprob.append(labels.true_logprob)
        self.tail.append(labels.tail)
        self.n_tokens += len(tokens)
        self.n_labels += n_labels

    def arrays(self, manifest: spec.Manifest) -> dict[str, np.ndarray]:
        """The part's arrays in their stored dtypes (log-probs rounded here, once)."""
        ids, enc, k = manifest.ids, manifest.encoding, self.top_k

        def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(shape, dtype)

        codes, table = spec.encode_ids(cat(self.topk_ids, (0, k), np.int64), ids)
        return {
            "tokens": cat(self.tokens, (0,), ids),
            "id_table": table,
            "topk_codes": codes,
            "topk_logprobs": enc.encode(cat(self.topk_logprobs, (0, k), np.float32)),
            "true_logprob": enc.encode(cat(self.true_logprob, (0,), np.float32)),
            "tail": cat(self.tail, (0,), np.float32),
        }

    def table(self) -> pa.Table:
        columns = {
            name: pa.array([r[name] for r in self.rows], type=pa.type_for_alias(t))
            for name, t in spec.TABLE_COLUMNS.items()
        }
        return pa.table(columns)


class StoreWriter:
    """Opens (creating or checking) a store for writing parts."""

    def __init__(self, url: str, manifest: spec.Manifest, overwrite: bool = False):
        self.loc = StoreLocation(url)
        self.manifest = manifest
        self._open(overwrite)

    def _open(self, overwrite: bool) -> None:
        # Shards started together (Ray, a job array) create the store at the same moment: a
        # directory without a manifest may be another shard's, about to write it, and a create
        # can lose the race to one. Both are looked at again before anything is refused.
        for attempt in range(CREATE_WAIT_POLLS):
            last = attempt == CREATE_WAIT_POLLS - 1
            existing = read_manifest(self.loc, missing_ok=True)
            if existing is None and self.loc.fs.exists(self.loc.root) and self.loc.listdir():
                if not last:
                    time.sleep(CREATE_WAIT_SECONDS)
                    continue
                raise StoreError(
                    f"{self.loc.url} exists and is not a smoothkd store; choose an empty or new --out "
                    "(--overwrite only replaces smoothkd stores)"
                )
            if existing is not None:
                diff = spec.identity_diff(existing.identity(), self.manifest.identity())
                if not diff:
                    self.manifest = existing  # resume: keep the original creation record
                    return
                if not overwrite:
                    raise StoreError(
                        f"{self.loc.url} holds a store built differently; refusing to mix them "
                        "(pass --overwrite to replace it, or choose another --out):\n  " + "\n  ".join(diff)
                    )
                self.loc.remove()
            try:
                self._create()
            except ContainsGroupError:  # another writer created it between our look and our write
                if last:
                    raise StoreError(f"{self.loc.url}: another writer keeps creating the store; try again")
                time.sleep(CREATE_WAIT_SECONDS)
                continue
            # zarr's "w-" checks, then writes: two writers can both pass the check, and the last
            # write wins. Read back what won and refuse if it is another build.
            won = read_manifest(self.loc)
            diff = spec.identity_diff(won.identity(), self.manifest.identity())
            if diff:
                raise StoreError(f"{self.loc.url} was created at the same moment by a run built differently; "
                                 "refusing to mix them:\n  " + "\n  ".join(diff))
            self.manifest = won
            return

    def _create(self) -> None:
        manifest = spec.Manifest.from_json({
            **self.manifest.to_json(),
            "created": _now(),
            "tool": {"name": "smoothkd", "version": __version__},
        })
        # One write of the root metadata, manifest included: a concurrent shard never sees a
        # root group without its manifest. "w-": fail if one is already there.
        zarr.open_group(self.loc.zarr_store(), mode="w-", zarr_format=3,
                        attributes={spec.MANIFEST_KEY: manifest.to_json()})
        self.manifest = manifest

    def committed_parts(self) -> set[int]:
        return {p.index for p in list_parts(self.loc) if p.committed}

    def write_part(self, index: int, part: PartBuilder, info: dict[str, Any]) -> dict[str, Any]:
        """Write one part and commit it; returns its commit record."""
        name = spec.part_name(index)
        self.loc.remove(spec.PARTS_DIR, name)  # leftovers of a killed run
        group = zarr.open_group(self.loc.zarr_store(), mode="a", zarr_format=3, path=f"{spec.PARTS_DIR}/{name}")
        arrays = part.arrays(self.manifest)
        for a in spec.ARRAYS:
            data = arrays[a.name]
            rows = max(1, data.shape[0])
            chunk_rows = min(spec.CHUNK_ROWS, rows)
            shard_rows = math.ceil(rows / chunk_rows) * chunk_rows
            group.create_array(
                a.name,
                data=data,
                chunks=(chunk_rows, *data.shape[1:]),
                shards=(shard_rows, *data.shape[1:]),
                **a.codecs(data.dtype),
            )
        pq.write_table(
            part.table(),
            self.loc.path(spec.PARTS_DIR, name, spec.TABLE_FILE),
            filesystem=self.loc.fs,
            compression="zstd",
        )
        commit = {
            "part": index,
            "n_sequences": len(part.rows),
            "n_tokens": part.n_tokens,
            "n_labels": part.n_labels,
            "arrays": {n: list(arrays[n].shape) for n in spec.ARRAY_NAMES},
            "created": _now(),
            **info,
        }
        self.loc.write_json_atomic(commit, spec.PARTS_DIR, name, spec.COMMIT_FILE)
        return commit
