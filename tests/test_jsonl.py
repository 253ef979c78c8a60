"""JSONL input that is not UTF-8: one clear error naming file and line, or, with
--skip-invalid, the line skipped and counted like any other invalid record."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.errors import InputError
from smoothkd.jsonl import read_jsonl
from smoothkd.precompute.records import load_records
from smoothkd.storage_schemas import SoftLabelStore

ROW = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}


@pytest.fixture
def latin1(tmp_path):
    """Line 2 was saved as Latin-1 ('café' with a bare 0xe9 byte); line 4 is not JSON."""
    lines = [json.dumps(ROW | {"id": "a"}).encode(),
             json.dumps(ROW | {"id": "b", "response": "cafe"}).encode().replace(b"cafe", b"caf\xe9"),
             b"",
             b'{"instruction": "x", ',
             json.dumps(ROW | {"id": "c", "response": "Grün."}, ensure_ascii=False).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_line_that_is_not_utf8_is_an_error_naming_file_and_line(latin1):
    rows = read_jsonl(latin1)
    assert next(rows)[0] == 1
    with pytest.raises(InputError, match=rf"^{latin1}:2: not valid UTF-8 \(byte 0xe9 at byte \d+ of the line\)"):
        next(rows)


def test_keep_invalid_yields_each_bad_line_as_its_error_and_reads_on(latin1):
    rows = list(read_jsonl(latin1, keep_invalid=True))
    assert [n for n, _ in rows] == [1, 2, 4, 5]  # the blank line 3 is no row
    assert isinstance(rows[1][1], InputError) and f"{latin1}:2: not valid UTF-8" in str(rows[1][1])
    assert isinstance(rows[2][1], InputError) and f"{latin1}:4: not valid JSON" in str(rows[2][1])
    assert rows[3][1]["response"] == "Grün."  # real UTF-8 beyond ASCII still reads


def test_records_list_the_undecodable_line_or_skip_and_count_it(latin1):
    with pytest.raises(InputError) as e:
        load_records(str(latin1))
    assert "2 invalid record(s)" in str(e.value) and "--skip-invalid" in str(e.value)
    assert f"{latin1}:2: not valid UTF-8" in str(e.value) and f"{latin1}:4: not valid JSON" in str(e.value)
    loaded = load_records(str(latin1), skip_invalid=True)
    assert [r.record_id for r in loaded.records] == ["a", "c"]
    assert len(loaded.skipped) == 2 and "d.jsonl:2: not valid UTF-8" in loaded.skipped[0]


def test_precompute_skips_and_counts_the_undecodable_line(tiny_model, latin1, tmp_path):
    runner = CliRunner()
    args = ["precompute", "teacher", "--model", str(tiny_model), "--dataset", str(latin1), "--top-k", "8"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert r.exit_code == 2 and "d.jsonl:2: not valid UTF-8" in " ".join(r.stderr.split())
    assert "Traceback" not in r.output + r.stderr and not (tmp_path / "refused").exists()
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "s"), "--skip-invalid", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads(r.stdout)["summary"]["invalid_records"] == 2
    assert SoftLabelStore(str(tmp_path / "s")).n_sequences == 2
