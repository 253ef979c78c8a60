"""The store contract on its own: round trip, atomic commit, format checks, verify faults."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from smoothkd.errors import StoreError
from smoothkd.storage_schemas import Manifest, PartBuilder, SoftLabelStore, StoreWriter, TopKLabels, verify_store
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.fsio import StoreLocation

V, K = 300, 8


def manifest(top_k: int = K, teacher: str = "w1", n_records: int = 4) -> Manifest:
    return Manifest(top_k=top_k, vocab_size=V, id_dtype=spec.id_dtype(V).name,
                    teacher={"name": "t", "path": "/x", "weights_sha256": teacher, "backend": "hf", "dtype": "float32"},
                    tokenizer={"fingerprint": "tok"}, dataset={"fingerprint": "d", "n_records": n_records},
                    build={"part_size": 4})


def random_sequences(n: int, seed: int):
    """(meta, tokens, prompt_len, labels) drawn from real softmax distributions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt, resp = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        tokens = rng.integers(0, V, prompt + resp)
        logits = rng.normal(size=(resp, V)) * 3
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :K]
        tokens[prompt] = ids[0, 1]  # one true token among the entries (the others mostly outside)
        vals = np.take_along_axis(lp, ids, 1).astype(np.float32)
        true = lp[np.arange(resp), tokens[prompt:]].astype(np.float32)
        tail = (1 - np.exp(vals.astype(np.float64)).sum(1)).astype(np.float32)
        meta = {"record_id": f"r{seed}-{i}", "source": "original", "split": "train", "category": "c",
                "truncated": False, "prompt": f"prompt {i}", "response": f"response {i}"}
        out.append((meta, tokens, prompt, TopKLabels(ids, vals, true, tail)))
    return out


def write(url: str, parts: dict[int, int], **kw) -> StoreWriter:
    """Parts {index: n_sequences}; the manifest expects parts up to the highest index unless told."""
    kw.setdefault("n_records", 4 * (max(parts) + 1))
    w = StoreWriter(url, manifest(**kw))
    for index, n in parts.items():
        b = PartBuilder(top_k=K)
        for seq in random_sequences(n, seed=index):
            b.add(*seq)
        w.write_part(index, b, {"record_start": index * 4})
    return w


@pytest.mark.parametrize("scheme", ["dir", "file", "memory"])
def test_round_trip_returns_what_was_written(tmp_path, scheme):
    url = {"dir": str(tmp_path / "s"), "file": f"file://{tmp_path}/s", "memory": f"memory://rt-{tmp_path.name}"}[scheme]
    write(url, {0: 3, 1: 4})
    store = SoftLabelStore(url)
    assert store.n_sequences == 7
    expected = random_sequences(3, 0) + random_sequences(4, 1)
    enc = store.manifest.encoding
    for seq, (meta, tokens, prompt, lab) in enumerate(expected):
        got = store.sequence(seq)
        assert got.row["record_id"] == meta["record_id"] and got.prompt_len == prompt
        assert np.array_equal(got.tokens, tokens)
        assert np.array_equal(got.labels.ids, lab.ids)
        assert np.abs(got.labels.logprobs - lab.logprobs).max() <= enc.max_error + 1e-6
        assert np.abs(got.labels.true_logprob - lab.true_logprob).max() <= enc.max_error + 1e-6
        assert np.abs(got.labels.tail / lab.tail - 1).max() <= store.manifest.tail.max_relative_error + 1e-6
    info = store.info()
    assert info.n_supervised_tokens == sum(len(x[3]) for x in expected)
    assert info.bytes_on_disk > 0 and info.bytes_per_supervised_token > 0
    assert verify_store(store).ok


def test_a_whole_part_read_holds_every_sequence_as_read_one_by_one(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 3, 1: 4})
    store = SoftLabelStore(url)
    table = store.table()
    for part in store.parts:
        whole = store.read_part(part.name)
        labels = whole.labels()
        rows = [r for r in table.to_pylist() if r["part"] == part.name]
        assert whole.tokens.dtype == np.int64 and labels.ids.dtype == np.int64
        assert labels.logprobs.dtype == labels.true_logprob.dtype == labels.tail.dtype == np.float32
        assert len(whole.tokens) == part.commit["n_tokens"] and len(labels) == part.commit["n_labels"]
        for r in rows:
            one = store.sequence(r["seq"])
            t0, l0 = r["token_offset"], r["label_offset"]
            assert np.array_equal(whole.tokens[t0 : t0 + r["n_tokens"]], one.tokens)
            picked = whole.labels(np.arange(l0, l0 + r["n_labels"]))  # row indices, as batches ask
            for field in ("ids", "logprobs", "true_logprob", "tail"):
                assert np.array_equal(getattr(labels, field)[l0 : l0 + r["n_labels"]], getattr(one.labels, field))
                assert np.array_equal(getattr(picked, field), getattr(one.labels, field))


def test_uncommitted_part_is_invisible_and_the_store_incomplete(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 3, 1: 2})
    StoreLocation(url).remove(spec.PARTS_DIR, spec.part_name(1), spec.COMMIT_FILE)  # as if killed before commit
    store = SoftLabelStore(url)
    assert [p.index for p in store.parts] == [0]
    assert store.n_sequences == 3
    info = store.info()
    assert info.missing_parts == ["part-000001"] and not info.complete
    report = verify_store(store)
    assert "part-000001" in report.warnings[0]
    assert not report.ok and "incomplete: 1 of 2 parts" in report.faults[0].message


def test_a_part_that_never_started_makes_the_store_incomplete(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 3}, n_records=12)  # 3 parts expected, only part 0 written (say, shard 0/3 alone)
    report = verify_store(SoftLabelStore(url))
    assert not report.warnings
    assert [f.array for f in report.faults] == ["parts"] and "2 of 3 parts" in report.faults[0].message


def test_nan_from_the_teacher_is_refused_before_commit():
    meta, tokens, prompt, lab = random_sequences(1, 0)[0]
    lab.logprobs[0, 3] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        PartBuilder(top_k=K).add(meta, tokens, prompt, lab)


def test_torn_commit_file_counts_as_uncommitted(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 2})
    (tmp_path / "s" / "parts" / "part-000000" / "commit.json").write_text('{"part": 0, "n_seq')
    assert SoftLabelStore(url).n_sequences == 0


def test_reader_refuses_unknown_schema_version_and_non_stores(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 1})
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["smoothkd"]["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 99"):
        SoftLabelStore(url)
    with pytest.raises(StoreError, match="not a smoothkd store"):
        SoftLabelStore(str(tmp_path / "nothing"))


def test_writer_refuses_another_teacher_or_top_k_and_keeps_the_store(tmp_path):
    url = str(tmp_path / "s")
    write(url, {0: 2})
    with pytest.raises(StoreError, match=r"top_k: store has 8, this run has 4"):
        StoreWriter(url, manifest(top_k=4))
    with pytest.raises(StoreError, match=r"teacher.weights_sha256"):
        StoreWriter(url, manifest(teacher="other"))
    assert SoftLabelStore(url).n_sequences == 2  # nothing lost
    StoreWriter(url, manifest(teacher="other"), overwrite=True)
    assert SoftLabelStore(url).n_sequences == 0


def test_writer_refuses_a_directory_that_is_not_a_store_even_with_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not a smoothkd store"):
        StoreWriter(str(tmp_path / "mine"), manifest(), overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def _part_group(tmp_path):
    return zarr.open_group(str(tmp_path / "s" / "parts" / "part-000000"), mode="r+")


def recommit(part: Path) -> None:
    """Record a part's files in its commit.json as they are now: what a writer with a bug would
    commit, so that verify's format checks, not the digests, must find what is wrong."""
    commit = json.loads((part / "commit.json").read_text())
    commit["files"] = {str(f.relative_to(part)): {"bytes": f.stat().st_size,
                                                  "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                       for f in sorted(part.rglob("*")) if f.is_file() and f.name != "commit.json"}
    (part / "commit.json").write_text(json.dumps(commit))


def _faults(tmp_path):
    report = verify_store(SoftLabelStore(str(tmp_path / "s")))
    assert not report.ok
    return [(f.part, f.array, f.message) for f in report.faults]


@pytest.mark.parametrize("corrupt, array, message", [
    (lambda g: g["id_table"].__setitem__(0, V + 5), "id_table", "ids >= vocabulary"),
    (lambda g: g["entry_codes"].__setitem__(0, 60000), "entry_codes", "for an id_table of"),
    (lambda g: g["tokens"].__setitem__(1, V), "tokens", "ids >= vocabulary"),
    (lambda g: g["entry_codes"].__setitem__(1, g["entry_codes"][0]), "entry_codes", "repeat an id"),
    (lambda g: g["entry_logprobs"].__setitem__(0, 0), "tail", "mass + tail"),  # sorted by construction: steps
    (lambda g: g["entry_logprobs"].__setitem__(0, 65535), "entry_logprobs", "beyond the encoding's range"),
    (lambda g: g["tail"].__setitem__(2, 0), "tail", "mass + tail"),
    (lambda g: g["n_entries"].__setitem__(0, K + 1), "n_entries", "values outside 1.."),
    (lambda g: g["true_rank"].__setitem__(0, K - 1), "true_rank", "do not point at the true token"),
    (lambda g: g["true_outside"].__setitem__(0, 0), "true_logprob", "is more probable than the k-th"),
])
def test_verify_names_the_part_and_array_at_fault(tmp_path, corrupt, array, message):
    write(str(tmp_path / "s"), {0: 4})
    assert verify_store(SoftLabelStore(str(tmp_path / "s"))).ok
    corrupt(_part_group(tmp_path))
    recommit(tmp_path / "s" / "parts" / "part-000000")
    faults = _faults(tmp_path)
    assert any(p == "part-000000" and a == array and message in m for p, a, m in faults), faults


def test_verify_catches_inconsistent_offsets_and_shapes(tmp_path):
    write(str(tmp_path / "s"), {0: 4})
    table_path = tmp_path / "s" / "parts" / "part-000000" / "sequences.parquet"
    table = pq.read_table(table_path)
    offsets = table["label_offset"].to_numpy().copy()
    offsets[2] += 1
    pq.write_table(table.set_column(table.schema.get_field_index("label_offset"), "label_offset",
                                    pa.array(offsets)), table_path)
    recommit(table_path.parent)
    assert ("part-000000", "sequences.parquet", "label_offset is not the running sum of n_labels") in _faults(tmp_path)

    commit_path = tmp_path / "s" / "parts" / "part-000000" / "commit.json"
    commit = json.loads(commit_path.read_text())
    commit["arrays"]["tail"] = [999]
    commit_path.write_text(json.dumps(commit))
    assert any(a == "tail" and "commit.json says [999]" in m for _, a, m in _faults(tmp_path))


def test_ids_use_the_smallest_integer_type():
    assert spec.id_dtype(256) == np.uint8
    assert spec.id_dtype(49152) == np.uint16
    assert spec.id_dtype(128256) == np.uint32


def test_logprob_encoding_error_is_within_its_bound():
    enc = spec.LogprobEncoding()
    x = -np.random.default_rng(0).exponential(5, size=100000).astype(np.float32)
    back = enc.decode(enc.encode(x))
    assert np.abs(back - x).max() <= enc.max_error + 1e-6
    assert enc.max_error < 0.01
    assert enc.decode(enc.encode(np.array([-5000.0])))[0] == pytest.approx(enc.min_logprob)
