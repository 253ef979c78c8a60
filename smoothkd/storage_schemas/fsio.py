"""File-system access for stores: local paths and any fsspec URL (s3://, gs://, memory://)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore


class StoreLocation:
    """A store root: the fsspec filesystem, the path inside it, and its zarr store."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, read_only=read_only)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(*parts)))

    def write_json_atomic(self, data: Any, *parts: str) -> None:
        """Write a small JSON file so that readers see all of it or none of it.

        Local files go through a temporary name and a rename (atomic on POSIX); on object
        stores a single PUT is already atomic.
        """
        target = self.path(*parts)
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        if self.is_local:
            self.fs.makedirs(self.fs._parent(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            self.fs.pipe_file(tmp, payload)
            self.fs.mv(tmp, target)
        else:
            self.fs.pipe_file(target, payload)

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def listdir(self, *parts: str) -> list[str]:
        p = self.path(*parts)
        if not self.fs.exists(p):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(p, detail=False))

    def bytes_on_disk(self) -> int:
        """Every file under the root, metadata included."""
        if not self.fs.exists(self.root):
            return 0
        return int(sum(self.fs.du(self.root, total=False).values()))
