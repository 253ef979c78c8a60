"""File-system access for stores: local paths and any fsspec URL (s3://, gs://, memory://).

Writers put files and directories that are not done yet under names ending in `PARTIAL`
(zarr's LocalStore uses the same suffix for its own temporary files): readers never open
them, and a directory holding nothing else counts as empty.

On local disks every file is flushed to the disk (fsync) before the rename or link that
makes it visible, and the directory after it, so that what a commit made visible survives a
power loss, not only a kill.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

PARTIAL = ".partial"


def partial_name(name: str) -> str:
    """A unique temporary name for `name`, e.g. `part-000003.<uuid>.partial`."""
    return f"{name}.{uuid.uuid4().hex}{PARTIAL}"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's entries: the renames and links made in it)."""
    fd = os.open(path, os.O_RDONLY)  # a directory too: that makes its entries (renames, links) durable
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a filesystem that cannot sync directories
            raise
    finally:
        os.close(fd)


def _makedirs(path: str) -> None:
    """os.makedirs, with each new directory's entry in its parent flushed to disk."""
    new = []
    while not os.path.isdir(path):
        new.append(path)
        path = os.path.dirname(path)
    for d in reversed(new):
        os.makedirs(d, exist_ok=True)
        fsync_path(os.path.dirname(d))


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


class StoreLocation:
    """A store root: the fsspec filesystem, the path inside it, and its zarr store."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def zarr_store(self, *parts: str, read_only: bool = False) -> zarr.abc.store.Store:
        """The zarr store at the root, or at a directory under it (zarr then leaves the rest alone)."""
        if self.is_local:
            return LocalStore(self.path(*parts), read_only=read_only)
        return FsspecStore.from_url("/".join([self.url.rstrip("/"), *parts]), read_only=read_only)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(*parts)))

    def _local_temp(self, target: str, payload: bytes) -> str:
        """`payload` written and flushed to disk under a temporary name beside `target`."""
        _makedirs(os.path.dirname(target))
        tmp = partial_name(target)
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_json_atomic(self, data: Any, *parts: str) -> None:
        """Write (or replace) a small JSON file so that readers see all of it or none of it.

        Local files go through a temporary name, flushed to disk, and a rename (atomic on
        POSIX); on object stores a single PUT is already atomic.
        """
        target = self.path(*parts)
        if self.is_local:
            os.replace(self._local_temp(target, _json(data)), target)
            fsync_path(os.path.dirname(target))
        else:
            self.fs.pipe_file(target, _json(data))

    def create_json(self, data: Any, *parts: str) -> bool:
        """Create a small JSON file unless the name is taken: False if it was. Readers see all
        of the file or none of it.

        Local: written under a temporary name, then hard-linked to its name (link(2) refuses a
        name that exists, atomically). Elsewhere: fsspec's create mode, a conditional write
        where the filesystem implements one (s3fs: If-None-Match), else a look, then a write.
        """
        target = self.path(*parts)
        if not self.is_local:
            try:
                self.fs.pipe_file(target, _json(data), mode="create")
            except FileExistsError:
                return False
            return True
        tmp = self._local_temp(target, _json(data))
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_path(os.path.dirname(target))
        return True

    def sync(self, *parts: str) -> None:
        """Local: flush a directory and everything under it to disk (elsewhere a no-op: a PUT is
        durable once it returns)."""
        if not self.is_local:
            return
        for d, _, files in os.walk(self.path(*parts), topdown=False):
            for name in files:
                fsync_path(os.path.join(d, name))
            fsync_path(d)

    def rename_to_new(self, src: tuple[str, ...], dst: tuple[str, ...]) -> bool:
        """Local: rename a directory to a name no directory with contents holds: False if one does.

        rename(2) refuses to replace a directory that is not empty, atomically: of writers
        renaming onto one name, exactly one succeeds.
        """
        target = self.path(*dst)
        try:
            os.rename(self.path(*src), target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        fsync_path(os.path.dirname(target))
        return True

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        try:
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)
        except FileNotFoundError:  # another writer removed it (or some of it) first
            pass

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
