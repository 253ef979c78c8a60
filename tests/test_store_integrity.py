"""A damaged store is found, named and refused: every array's chunks flipped, truncated and
deleted; stray, copied and shape-lying parts; unreadable metadata and tables; through `store
verify` and through `distill student`. Old stores (before checksums) still read. And precompute
refuses a --max-length beyond the teacher's context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.errors import SmoothkdError, StoreError
from smoothkd.precompute.run import run as precompute
from smoothkd.storage_schemas import SoftLabelStore, spec, verify_store
from smoothkd.storage_schemas.reader import PartArrays
from conftest import DOLLY
from test_precompute import cfg as precompute_cfg
from test_store import recommit

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "store-v1"  # written by smoothkd at 921a7f8 (make_store_v1.py)
FIXTURE_V1_CHECKED = Path(__file__).parent / "fixtures" / "store-v1-checked"  # the last format 1, at ef84010
PART = "part-000001"
TRUE_TOKEN_ARRAYS = ("true_rank", "true_outside")  # the teacher's log-prob of the true token: never read by distill


@pytest.fixture(scope="module")
def pristine(tiny_model, dolly, tmp_path_factory) -> Path:
    """A real store: 3 parts of 4 records each, by precompute from the tiny model."""
    out = tmp_path_factory.mktemp("integrity") / "store"
    precompute(precompute_cfg(tiny_model, dolly, out), show_progress=False)
    assert verify_store(SoftLabelStore(str(out))).ok
    return out


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A copy of the pristine store, for one test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "store"))


def shard(store: Path, array: str) -> Path:
    """The one shard file of an array of PART (tokens/c/0, topk_codes/c/0/0, ...)."""
    (path,) = (p for p in (store / "parts" / PART / array / "c").rglob("*") if p.is_file())
    return path


def flip_mid_chunk(path: Path, array: zarr.Array) -> None:
    """Flip one bit in the middle of the shard's first chunk, located through the shard index
    (at the end: an (offset, nbytes) pair of uint64 per chunk, then its crc32c)."""
    n_chunks = int(np.prod(np.array(array.shards) // np.array(array.chunks)))
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * n_chunks + 4):-4]), dtype="<u8").reshape(n_chunks, 2)
    offset, nbytes = (int(x) for x in index[0])
    data[offset + nbytes // 2] ^= 0x10
    path.write_bytes(bytes(data))


def damage(store: Path, array: str, how: str) -> str:
    """Damage one array of PART; the damaged file, relative to the store."""
    path = shard(store, array)
    if how == "flip":
        flip_mid_chunk(path, zarr.open_group(str(store), mode="r")[f"parts/{PART}/{array}"])
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    return str(path.relative_to(store))


def distill(tiny_model: Path, store: Path, out: Path):
    return CliRunner().invoke(app, ["distill", "student", "--model", str(tiny_model), "--store", str(store),
                                    "--out", str(out), "--batch-size", "2", "--max-steps", "20",
                                    "--lr", "1e-3"])


def said(result) -> str:
    return " ".join(result.stderr.split())


def faults_of(store: Path) -> list:
    report = verify_store(SoftLabelStore(str(store)))
    assert not report.ok
    return report.faults


# --- chunks of every array: flipped, truncated, deleted ---------------------------------------

@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("array", [a.name for a in spec.ARRAYS_TOPK])
def test_verify_names_the_damaged_file_and_nothing_else(store, array, how):
    file = damage(store, array, how)
    faults = faults_of(store)
    # the file itself, not symptoms in other arrays (a deleted tokens chunk once showed as offsets)
    assert {(f.part, f.array, f.file) for f in faults} == {(PART, array, file)}, faults
    word = {"flip": "differs from the sha256", "truncate": "truncated", "delete": "is missing"}[how]
    assert word in faults[0].message and file in str(faults[0])


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("array", [a.name for a in spec.ARRAYS_TOPK if a.name not in TRUE_TOKEN_ARRAYS])
def test_distill_refuses_a_damaged_chunk_naming_part_array_and_file(tiny_model, store, tmp_path, array, how):
    file = damage(store, array, how)
    result = distill(tiny_model, store, tmp_path / "run")
    assert result.exit_code == 2, result.output
    message = said(result)
    assert f"{PART}/{array}" in message and file in message, message
    assert "checksum" in message if how == "flip" else "damaged; refusing to read it" in message
    if how != "flip":  # found at open, from the listing alone: before a model loads or a run directory exists
        assert not (tmp_path / "run").exists()


def test_a_flipped_byte_is_refused_by_every_read_not_decoded(store):
    """Without chunk checksums a flip like this one decoded to other values (issue 10: a tail 0.2081 -> 0.2089)."""
    damage(store, "tail", "flip")
    arrays = SoftLabelStore(str(store)).read_part(PART)
    with pytest.raises(StoreError, match=f"{PART}/tail: parts/{PART}/tail/c/0 cannot be read.*checksum"):
        arrays.tail()


@pytest.mark.parametrize("array", TRUE_TOKEN_ARRAYS)
def test_the_teacher_true_logprob_is_not_read_by_distill_and_checked_by_verify(tiny_model, store, tmp_path, array):
    """The trainer never reads the true token's log-prob: a flipped byte there cannot reach a model
    (and a truncated or deleted file is refused at open, above), while verify reads and names it."""
    file = damage(store, array, "flip")
    assert file in str(faults_of(store)[0])
    assert distill(tiny_model, store, tmp_path / "run").exit_code == 0
    for how in ("truncate", "delete"):
        again = Path(shutil.copytree(store, tmp_path / how))
        damage(again, array, how)
        with pytest.raises(StoreError, match=f"{PART}/{array}"):
            SoftLabelStore(str(again)).check()


# --- parts: stray, copied, shape lies ------------------------------------------------------------

def test_a_part_outside_the_store_or_copied_over_another_is_refused(tiny_model, store, tmp_path):
    parts = store / "parts"
    shutil.copytree(parts / "part-000000", parts / "part-000003")  # an extra part: the store has 3
    faults = {(f.part, f.array) for f in faults_of(store)}
    assert ("part-000003", "parts") in faults and ("part-000003", "commit.json") in faults
    result = distill(tiny_model, store, tmp_path / "run")
    assert result.exit_code == 2 and "part-000003 is not one of the store's 3 parts" in said(result), said(result)

    shutil.rmtree(parts / "part-000003")
    shutil.rmtree(parts / "part-000002")
    shutil.copytree(parts / "part-000000", parts / "part-000002")  # a duplicated part, under another's name
    faults = faults_of(store)
    assert [(f.part, f.array) for f in faults] == [("part-000002", "commit.json")]
    assert "is the commit of part 0" in faults[0].message
    result = distill(tiny_model, store, tmp_path / "run")
    assert result.exit_code == 2 and "parts/part-000002/commit.json is the commit of part 0" in said(result)


@pytest.fixture
def v1(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE_V1, tmp_path / "v1"))


@pytest.mark.parametrize("which", ["digested", "v1"])
def test_a_shape_lie_is_found_from_the_metadata_without_reading_the_array(store, v1, monkeypatch, which):
    root = store if which == "digested" else v1
    part = PART if which == "digested" else "part-000000"
    meta_path = root / "parts" / part / "tail" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    committed = meta["shape"]
    meta["shape"] = [500_000_000]  # 2 GB of float32 the commit never held
    meta_path.write_text(json.dumps(meta))
    reads: list[tuple[str, str]] = []
    real = SoftLabelStore.read
    monkeypatch.setattr(SoftLabelStore, "read", lambda self, p, name, rows=slice(None):
                        reads.append((p, name)) or real(self, p, name, rows))
    faults = faults_of(root)
    assert {f.array for f in faults} == {"tail"} and (part, "tail") not in reads
    assert any(f"shape [500000000], commit.json says {committed}" in f.message for f in faults), faults
    with pytest.raises(StoreError, match=f"{part}/tail: shape \\[500000000\\]"):
        SoftLabelStore(str(root)).check()
    with pytest.raises(StoreError, match="commit.json says"):  # any read path checks first, not only check()
        SoftLabelStore(str(root)).read_part(part).tail()


# --- old stores ------------------------------------------------------------------------------------

def test_a_store_written_before_checksums_reads_and_verifies_with_a_warning(tiny_model, v1, tmp_path):
    store = SoftLabelStore(str(v1))
    store.check()
    assert store.n_sequences == 3 and not store.has_digests("part-000000")
    report = verify_store(store)
    assert report.ok and report.checked.supervised_tokens == 139
    (warning,) = report.warnings
    assert "2 of 2 parts" in warning and "without chunk checksums or file digests" in warning
    s = store.sequence(2)  # the truncated one: 128 tokens, 106 labels
    assert (s.row["n_tokens"], len(s.labels), s.row["truncated"]) == (128, 106, True)
    assert np.all(np.diff(s.labels.logprobs, axis=1) <= 0) and np.all((s.labels.tail >= 0) & (s.labels.tail <= 1))
    # and a run trains on it (the fixture's tokenizer is conftest's tiny model's)
    result = distill(tiny_model, v1, tmp_path / "run")
    assert result.exit_code == 0, said(result)


def test_a_format_1_store_reads_as_the_same_labels_as_format_2_of_the_same_run(tiny_model, tmp_path):
    """tests/fixtures/store-v1-checked: make_store_v1.py's run by the last smoothkd that wrote format 1;
    the same run now writes format 2, and both read back as the same labels."""
    old = SoftLabelStore(str(FIXTURE_V1_CHECKED))
    assert old.manifest.schema_version == 1
    report = verify_store(old)
    assert report.ok and not report.warnings
    dataset = tmp_path / "short.jsonl"
    rows = DOLLY.read_text().splitlines()
    dataset.write_text("".join(rows[i] + "\n" for i in (9, 13, 10)))
    new = tmp_path / "v2"
    precompute(precompute_cfg(tiny_model, dataset, new, top_k=4, part_size=2, max_length=128, overlong="truncate",
                              heldout_fraction=0.34, batch_size=None), show_progress=False)
    new_store = SoftLabelStore(str(new))
    assert new_store.manifest.schema_version == 2 and verify_store(new_store).ok
    assert old.n_sequences == new_store.n_sequences == 3
    for i in range(3):
        a, b = old.sequence(i), new_store.sequence(i)
        assert np.array_equal(a.tokens, b.tokens) and a.row["n_labels"] == b.row["n_labels"]
        assert np.array_equal(a.labels.ids, b.labels.ids)
        assert np.array_equal(a.labels.logprobs, b.labels.logprobs)
        assert np.array_equal(a.labels.true_logprob, b.labels.true_logprob)
        assert np.allclose(a.labels.tail, b.labels.tail, rtol=new_store.manifest.tail.max_relative_error, atol=0)


def test_a_deleted_chunk_of_an_old_store_is_found_from_its_metadata(v1):
    (v1 / "parts" / "part-000000" / "topk_codes" / "c" / "0" / "0").unlink()
    faults = faults_of(v1)
    assert [(f.part, f.array, f.file) for f in faults] == [("part-000000", "topk_codes",
                                                             "parts/part-000000/topk_codes/c/0/0")]
    with pytest.raises(StoreError, match="topk_codes/c/0/0 is missing"):
        SoftLabelStore(str(v1)).check()


# --- unreadable files: clear errors naming the file -----------------------------------------------

def _corrupt_utf8(path: Path, old: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, old[:-2] + b"\xff\"", 1))


def test_a_root_zarr_json_with_invalid_utf8_or_a_manifest_key_removed_is_named(store):
    root = store / "zarr.json"
    good = root.read_bytes()
    _corrupt_utf8(root, b'"hf"')
    with pytest.raises(StoreError, match=f"{store}/zarr.json is unreadable: .*utf-8"):
        SoftLabelStore(str(store))
    meta = json.loads(good)
    del meta["attributes"]["smoothkd"]["top_k"]
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"{store}/zarr.json: the manifest .* lacks top_k"):
        SoftLabelStore(str(store))


def test_a_commit_json_with_invalid_utf8_or_a_count_removed_is_a_named_fault(tiny_model, store, tmp_path):
    commit = store / "parts" / PART / "commit.json"
    _corrupt_utf8(commit, b'"0/1"')  # the shard
    message = f"parts/{PART}/commit.json cannot be parsed"
    assert any(message in f.message for f in faults_of(store))
    result = distill(tiny_model, store, tmp_path / "run")
    assert result.exit_code == 2 and message in said(result), said(result)
    good = json.loads(commit.read_bytes().replace(b"\xff", b"x"))
    del good["n_labels"]
    commit.write_text(json.dumps(good))
    with pytest.raises(StoreError, match=f"parts/{PART}/commit.json lacks n_labels"):
        SoftLabelStore(str(store)).check()


@pytest.mark.parametrize("which", ["digested", "recommitted", "v1"])
def test_an_unreadable_parquet_table_is_named(store, v1, which):
    root = v1 if which == "v1" else store
    part = "part-000000" if which == "v1" else PART
    table = root / "parts" / part / spec.TABLE_FILE
    table.write_bytes(b"\0" * table.stat().st_size)  # its size kept: only the digest can tell
    if which == "recommitted":
        recommit(table.parent)  # the digest matches: the parse fails
    needle = "differs from the sha256" if which == "digested" else "is not a readable Parquet file"
    with pytest.raises(StoreError, match=f"{part}/{spec.TABLE_FILE}: parts/{part}/{spec.TABLE_FILE} {needle}"):
        SoftLabelStore(str(root)).table()
    assert any(f.array == spec.TABLE_FILE and needle in f.message for f in faults_of(root))


# --- the batch path costs what it did ------------------------------------------------------------

def test_a_checked_store_keeps_its_arrays_open_for_the_reads_that_follow(store, monkeypatch):
    s = SoftLabelStore(str(store))
    s.check()
    opened: list[str] = []
    monkeypatch.setattr(SoftLabelStore, "_open_array", lambda self, p, name: opened.append(name))
    labels = PartArrays(s, PART).labels()
    assert len(labels) == s.parts[1].commit["n_labels"] and opened == []


# --- --max-length and the teacher's context --------------------------------------------------------

@pytest.mark.parametrize("backend, longest", [("hf", 2048), ("vllm", 2047)])
def test_max_length_beyond_the_teacher_context_is_refused_before_anything_is_written(tiny_model, dolly, tmp_path,
                                                                                    backend, longest):
    out = tmp_path / "s"
    with pytest.raises(SmoothkdError, match=f"--max-length {longest + 1} is beyond the teacher's context: .* 2048 "
                                            f"positions .*set --max-length {longest} or less"):
        precompute(precompute_cfg(tiny_model, dolly, out, max_length=longest + 1, backend=backend),
                   show_progress=False)
    assert not out.exists()
