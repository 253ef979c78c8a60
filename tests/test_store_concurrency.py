"""Store writers under races and kills: the creation race replayed, two identical writers
interleaved, a kill at every file-system write of the manifest, a part and --overwrite, and
fsync before every rename."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from smoothkd.errors import StoreError
from smoothkd.precompute.backends import load_backend
from smoothkd.precompute.run import run
from smoothkd.storage_schemas import PartBuilder, SoftLabelStore, StoreWriter, verify_store
from smoothkd.storage_schemas.fsio import PARTIAL, StoreLocation
from test_precompute import cfg, contents
from test_store import K, manifest, random_sequences


def builder(index: int) -> PartBuilder:
    b = PartBuilder(top_k=K)
    for seq in random_sequences(3, seed=index):
        b.add(*seq)
    return b


def write_part(w: StoreWriter, index: int) -> dict | None:
    return w.write_part(index, builder(index), {"record_start": index * 4})


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{PARTIAL}"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple]:
    """What readers see of parts 0 and 1 written by one writer with nothing in its way."""
    url = str(tmp_path_factory.mktemp("ref") / "s")
    w = StoreWriter(url, manifest(n_records=8))
    for i in (0, 1):
        write_part(w, i)
    return contents(url)


# --- a kill at the n-th file-system write ------------------------------------------------------

class Killed(Exception):
    """A kill, simulated. Not KeyboardInterrupt: that would end zarr's I/O thread, not the write."""


class _Faults:
    """Raises Killed at the n-th write under `root`: a file opened for writing, a rename,
    link, removal, or new directory, in any thread. Python's audit hooks see each one (they
    cannot be removed: one hook for the session, armed by `kill_at`)."""

    root: str = ""
    left: int = 0
    installed = False
    lock = threading.Lock()  # zarr writes from several threads

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.left <= 0 or not cls._is_write(event, args):
            return
        with cls.lock:
            cls.left -= 1
            fire = cls.left == 0
        if fire:
            raise Killed(f"killed at {event}{args[:2]}")

    @classmethod
    def _is_write(cls, event: str, args: tuple) -> bool:
        if event == "open":
            path, mode, flags = args
            if mode is None:  # os.open
                writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            else:
                writes = any(c in mode for c in "wax+")
            return bool(writes) and isinstance(path, (str, bytes, os.PathLike)) and cls._under(path)
        if event in ("os.rename", "os.link", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
            path, dir_fd = args[0], args[-1]
            return dir_fd is not None or cls._under(path)  # dir_fd: rmtree's removals, relative to a directory
        return False

    @classmethod
    def _under(cls, path) -> bool:
        path = os.fsdecode(os.fspath(path))
        return os.path.abspath(path).startswith(cls.root)


def kill_at(root: Path, n: int) -> None:
    """Arm a kill at the n-th write under root (0 disarms)."""
    if not _Faults.installed:
        sys.addaudithook(_Faults.hook)
        _Faults.installed = True
    _Faults.root, _Faults.left = str(root), n


@pytest.fixture
def no_fsync(monkeypatch):
    """fsync is no write step and costs most of a small part's write time on some disks: off in
    the tests that write a store dozens of times (one test below checks it)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def killed(action, root: Path, n: int) -> bool:
    """Run action with a kill armed at the n-th write: whether the kill came before it finished."""
    kill_at(root, n)
    try:
        action()
    except Killed:
        return True
    finally:
        kill_at(root, 0)
    return False


# --- creation ---------------------------------------------------------------------------------

def _another_writer_creates_first(monkeypatch, other):
    """Replay the race: `other()` creates the store between this writer's look and its create."""
    real = StoreLocation.create_json
    state = {"replayed": False}

    def create_json(self, data, *parts):
        if parts == ("zarr.json",) and not state["replayed"]:
            state["replayed"] = True
            state["other"] = other()
        return real(self, data, *parts)

    monkeypatch.setattr(StoreLocation, "create_json", create_json)
    return state


def test_creation_race_replayed_the_late_writer_joins_the_store(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    # shard 0/2 creates the store while shard 1/2, having found none, is about to
    state = _another_writer_creates_first(monkeypatch, lambda: StoreWriter(url, manifest(n_records=8)))
    late = StoreWriter(url, manifest(n_records=8))
    first = state["other"]
    assert late.manifest == first.manifest and late.manifest.created  # the winner's creation record
    write_part(first, 0)
    write_part(late, 1)
    store = SoftLabelStore(url)
    assert [p.index for p in store.parts] == [0, 1] and verify_store(store).ok
    assert leftovers(tmp_path) == []


def test_creation_race_replayed_with_a_run_built_differently_is_refused(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    _another_writer_creates_first(monkeypatch, lambda: StoreWriter(url, manifest(teacher="other")))
    with pytest.raises(StoreError, match="created at the same moment by a run built differently"):
        StoreWriter(url, manifest())
    assert SoftLabelStore(url).manifest.teacher["weights_sha256"] == "other"  # the winner's store is intact


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_store_whose_manifest_write_was_killed_is_created_by_the_rerun(tmp_path, overwrite):
    """What a kill during zarr's own root write left (before writers created the manifest themselves)."""
    root = tmp_path / "s"
    root.mkdir()
    (root / "zarr.1f0c2d3e4b5a69788796a5b4c3d2e1f0.partial").write_text('{"zarr_format": 3, "node_')
    w = StoreWriter(str(root), manifest(), overwrite=overwrite)
    write_part(w, 0)
    assert SoftLabelStore(str(root)).n_sequences == 3


def test_a_kill_at_every_write_of_the_manifest_is_recoverable(tmp_path, no_fsync):
    n = 0
    while True:
        n += 1
        root = tmp_path / f"s{n}"
        died = killed(lambda: StoreWriter(str(root), manifest(n_records=8)), root, n)
        assert not (root / "zarr.json").exists() or SoftLabelStore(str(root)).manifest  # whole, or absent
        w = StoreWriter(str(root), manifest(n_records=8))  # the rerun
        for i in (0, 1):
            write_part(w, i)
        assert verify_store(SoftLabelStore(str(root))).ok
        if not died:
            break
    assert n > 3  # the kill landed on each write: directory, temporary file, link, its removal


def test_a_kill_at_every_write_of_overwrite_is_recoverable(tmp_path, reference, no_fsync):
    old = tmp_path / "old"
    write_part(StoreWriter(str(old), manifest(teacher="old", n_records=8)), 0)
    n = 0
    while True:
        n += 1
        root = tmp_path / f"s{n}"
        shutil.copytree(old, root)
        died = killed(lambda: StoreWriter(str(root), manifest(n_records=8), overwrite=True), root, n)
        if died:
            try:  # without --overwrite: the old store, refused as such; or the new one, resumed
                StoreWriter(str(root), manifest(n_records=8))
            except StoreError as e:
                assert "built differently" in str(e)
            store = SoftLabelStore(str(root))
            # whatever is still committed is whole: a kill never leaves a committed part half-deleted
            assert not [f for f in verify_store(store).faults if f.array != "parts"]
        w = StoreWriter(str(root), manifest(n_records=8), overwrite=True)
        for i in (0, 1):
            write_part(w, i)
        assert contents(str(root)) == reference
        if not died:
            break
    assert n > 20  # every file of the old store removed, one at a time


# --- parts -------------------------------------------------------------------------------------

def test_a_kill_at_every_write_of_a_part_is_recoverable(tmp_path, reference, no_fsync):
    first = tmp_path / "first"  # part 0 committed; the kills land in part 1
    write_part(StoreWriter(str(first), manifest(n_records=8)), 0)
    n = 0
    while True:
        n += 1
        root = tmp_path / f"s{n}"
        shutil.copytree(first, root)
        w = StoreWriter(str(root), manifest(n_records=8))
        died = killed(lambda: write_part(w, 1), root, n)
        store = SoftLabelStore(str(root))
        assert [p.index for p in store.parts] == ([0] if died else [0, 1])
        assert not [f for f in verify_store(store).faults if f.array != "parts"]  # only "incomplete"
        write_part(StoreWriter(str(root), manifest(n_records=8)), 1)  # the rerun
        assert contents(str(root)) == reference
        assert leftovers(root) == []  # the killed run's staging copy removed with the commit
        if not died:
            break
    assert n > 50  # every directory, temporary file and rename of six arrays, the table and the commit


def test_a_second_writer_committing_first_keeps_its_part_and_the_first_discards_its_copy(tmp_path, reference,
                                                                                          monkeypatch, no_fsync):
    """Two identical runs into one --out, replayed: B writes and commits part 0 while A is about
    to commit its own copy (A's rename), then the same with B in the middle of A's files."""
    for where in ("commit", "files"):
        url = str(tmp_path / where)
        a, b = StoreWriter(url, manifest(n_records=8)), StoreWriter(url, manifest(n_records=8))
        results = {}
        target = (StoreLocation, "rename_to_new") if where == "commit" else (pq, "write_table")
        real = getattr(*target)

        def b_goes_first(*args, **kwargs):
            if not results:
                results["b"] = None  # B's own call passes straight through
                results["b"] = write_part(b, 0)
            return real(*args, **kwargs)

        monkeypatch.setattr(*target, b_goes_first)
        results["a"] = write_part(a, 0)
        monkeypatch.setattr(*target, real)
        assert results["b"] is not None and results["a"] is None  # B's commit kept, A's copy discarded
        write_part(a, 1)
        assert contents(url) == reference and verify_store(SoftLabelStore(url)).ok
        assert leftovers(Path(url)) == []


def test_a_part_under_its_final_name_but_uncommitted_is_replaced(tmp_path, reference):
    """An older smoothkd wrote parts in place: its killed write is an uncommitted final-name directory."""
    url = str(tmp_path / "s")
    w = StoreWriter(url, manifest(n_records=8))
    write_part(w, 0)
    write_part(w, 1)
    (tmp_path / "s" / "parts" / "part-000001" / "commit.json").unlink()
    assert [p.index for p in SoftLabelStore(url).parts] == [0]
    write_part(StoreWriter(url, manifest(n_records=8)), 1)
    assert contents(url) == reference and leftovers(tmp_path) == []


def test_two_identical_precompute_runs_into_one_out_both_finish_with_one_store(tiny_model, dolly, tmp_path):
    out = tmp_path / "s"
    errors: list[BaseException] = []
    # One teacher for both threads: transformers' model loading is not thread-safe, its forward is.
    teacher = load_backend(str(tiny_model), cfg(tiny_model, dolly, out))

    def one_run() -> None:
        try:
            run(cfg(tiny_model, dolly, out, part_size=2), show_progress=False, teacher=teacher)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    alone = tmp_path / "alone"
    run(cfg(tiny_model, dolly, alone, part_size=2), show_progress=False, teacher=teacher)
    store = SoftLabelStore(str(out))
    assert [p.index for p in store.parts] == list(range(6)) and verify_store(store).ok
    assert contents(str(out)) == contents(str(alone)) and leftovers(out) == []


# --- durability --------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="names fsync's file through /proc")
def test_what_a_rename_or_link_makes_visible_is_on_disk_first(tmp_path, monkeypatch):
    """Every rename or link to a visible name (not a temporary one) comes after an fsync of all
    it makes visible, and before an fsync of the directory that gains the name."""
    log: list[tuple[str, str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "link")}

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        return real["fsync"](fd)

    def mover(name):
        def move(src, dst, *args, **kwargs):
            log.append(("move", os.path.realpath(src), os.path.realpath(dst)))
            return real[name](src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("rename", "replace", "link"):
        monkeypatch.setattr(os, name, mover(name))
    write_part(StoreWriter(str(tmp_path / "s"), manifest()), 0)
    monkeypatch.undo()

    visible = [(i, src, dst) for i, (kind, src, dst) in enumerate(log) if kind == "move" and PARTIAL not in dst]
    root = os.path.realpath(tmp_path / "s")
    assert {dst for _, _, dst in visible} == {f"{root}/zarr.json", f"{root}/parts/zarr.json",
                                               f"{root}/parts/part-000000"}
    for i, src, dst in visible:
        before = {path for kind, path, _ in log[:i] if kind == "fsync"}
        after = {path for kind, path, _ in log[i + 1:] if kind == "fsync"}
        # the staging directory: every file and directory in it (tokens/c/0, commit.json, ...)
        moved = [src] if not os.path.isdir(dst) else \
            [os.path.join(d, f).replace(dst, src, 1) for d, ds, fs in os.walk(dst) for f in fs + ds] + [src]
        assert len(moved) > 10 or not os.path.isdir(dst)
        assert not [m for m in moved if m not in before], (dst, sorted(set(moved) - before))
        assert os.path.dirname(dst) in after
