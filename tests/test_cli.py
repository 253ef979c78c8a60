"""The CLI: store info/verify/show, and every bad input getting a clear message and losing nothing."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer.rich_utils
import zarr
from typer.testing import CliRunner

import smoothkd.distill.trainer
import smoothkd.precompute.run
from smoothkd.cli import app
from smoothkd.cli_options import flag
from smoothkd.distill.config import DistillConfig
from smoothkd.errors import SmoothkdError
from smoothkd.options import COMMA_LIST, EXISTING_FILE, default_of
from smoothkd.precompute.config import FIELD_MAP, PrecomputeConfig
from smoothkd.storage_schemas import SoftLabelStore

from conftest import write_jsonl
from test_store import recommit

runner = CliRunner()
DOLLY_ROW = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}


def precompute(model, dataset, out, *extra: str):
    args = ["precompute", "teacher", "--model", str(model), "--dataset", str(dataset), "--out", str(out),
            "--top-k", "8", "--part-size", "2", *extra]
    return runner.invoke(app, args)


def fails_with(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in message, (needle, result.stderr)


@pytest.fixture(scope="module")
def store(tiny_model, dolly, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "store"
    result = precompute(tiny_model, dolly, out, "--limit", "4")
    assert result.exit_code == 0, result.output + result.stderr
    assert "bytes per supervised token" in " ".join(result.output.split())
    return out


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == "smoothkd 0.1.0"


def test_store_info_json_reports_counts_and_size(store):
    result = runner.invoke(app, ["store", "info", str(store), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    s = SoftLabelStore(str(store))
    assert info["n_sequences"] == s.n_sequences == 4
    assert info["n_supervised_tokens"] == s.n_supervised_tokens > 0
    assert info["top_k"] == 8
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert info["bytes_per_supervised_token"] == pytest.approx(info["bytes_on_disk"] / info["n_supervised_tokens"])
    assert list(info) == [  # the keys scripts read: keep them
        "url", "format", "schema_version", "label_kind", "teacher", "top_k", "vocab_size", "id_dtype",
        "logprob_encoding", "n_parts", "n_uncommitted_parts", "n_expected_parts", "missing_parts", "complete",
        "n_sequences", "n_tokens", "n_supervised_tokens", "supervised_tokens_by_source", "supervised_tokens_by_split",
        "dropped_sequences", "truncated_sequences", "bytes_on_disk", "bytes_per_supervised_token", "dataset", "build",
        "tokenizer", "created", "tool", "selection"]
    assert info == s.info().to_json()
    text = runner.invoke(app, ["store", "info", str(store)])
    assert text.exit_code == 0 and "bytes / supervised token" in text.output and "top-k" in text.output


def test_store_show_json_gives_every_position(store, tiny_model):
    result = runner.invoke(app, ["store", "show", str(store), "--seq", "1", "--json"])
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    s = SoftLabelStore(str(store)).sequence(1)
    assert shown["tokens"] == s.tokens.tolist()
    assert len(shown["positions"]) == shown["n_labels"] == len(s.targets)
    first = shown["positions"][0]
    assert first["target"] == int(s.targets[0]) and len(first["topk_ids"]) == 8
    assert first["topk_logprobs"] == sorted(first["topk_logprobs"], reverse=True)
    table = runner.invoke(app, ["store", "show", str(store), "--seq", "1", "--tokenizer", str(tiny_model)])
    assert table.exit_code == 0 and "log p(target)" in table.output
    fails_with(runner.invoke(app, ["store", "show", str(store), "--seq", "99"]), "sequence 99 is out of range")


def test_store_verify_exit_code_follows_faults(store, tmp_path):
    ok = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"]
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    zarr.open_group(str(bad / "parts" / "part-000001"), mode="r+")["tail"][0] = 7  # a tail of e^(-7/512): ~0.99
    recommit(bad / "parts" / "part-000001")  # digests as a buggy writer would record them: the format check finds it
    result = runner.invoke(app, ["store", "verify", str(bad)])
    assert result.exit_code == 1
    assert "part-000001/tail" in result.stderr
    report = json.loads(runner.invoke(app, ["store", "verify", str(bad), "--json"]).stdout)
    assert list(report) == ["url", "ok", "faults", "warnings", "checked"] and not report["ok"]
    n_supervised = SoftLabelStore(str(bad)).n_supervised_tokens
    assert report["checked"] == {"parts": 2, "sequences": 4, "supervised_tokens": n_supervised}
    fault = next(f for f in report["faults"] if f["array"] == "tail")
    assert (fault["part"], fault["array"]) == ("part-000001", "tail")
    assert fault["message"].startswith("1 rows have top-k mass + tail off 1 by more than")


def test_malformed_jsonl_names_the_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW, DOLLY_ROW | {"response": "x"}, '{"instruction": "a", '])
    fails_with(precompute(tiny_model, data, tmp_path / "out"), "d.jsonl:3", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_missing_fields_and_empty_responses_are_listed_or_skipped(tiny_model, tmp_path):
    rows = [DOLLY_ROW, {"instruction": "no response"}, DOLLY_ROW | {"response": "   "}, DOLLY_ROW | {"id": 7}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    fails_with(precompute(tiny_model, data, tmp_path / "out"), "2 invalid record(s)",
               "d.jsonl:2: missing field 'response'", "d.jsonl:3: field 'response' is empty", "--skip-invalid")
    assert not (tmp_path / "out").exists()
    result = precompute(tiny_model, data, tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 0, result.stderr
    assert "skipped 2 invalid records" in result.output
    assert SoftLabelStore(str(tmp_path / "out")).n_sequences == 2


def test_field_mapping_reads_other_instruction_sets(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    fails_with(precompute(tiny_model, data, tmp_path / "o1"), "missing field 'instruction'", "--field instruction=")
    result = precompute(tiny_model, data, tmp_path / "o2", "--field", "instruction=question", "--field", "response=answer",
                        "--texts")
    assert result.exit_code == 0, result.stderr
    assert SoftLabelStore(str(tmp_path / "o2")).sequence(0).row["response"] == "Because."
    fails_with(precompute(tiny_model, data, tmp_path / "o3", "--field", "answer"), "--field 'answer'", "CANONICAL=COLUMN")


def test_parquet_datasets_are_read(tiny_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([DOLLY_ROW, DOLLY_ROW | {"response": "Red."}]), tmp_path / "d.parquet")
    result = precompute(tiny_model, tmp_path / "d.parquet", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert SoftLabelStore(str(tmp_path / "out")).n_sequences == 2


def test_out_holding_another_store_is_refused_unless_overwrite(tiny_model, dolly, store, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(store, out)
    before = SoftLabelStore(str(out)).info()
    fails_with(precompute(tiny_model, dolly, out, "--limit", "4", "--top-k", "4"),
               "built differently", "top_k: store has 8, this run has 4", "--overwrite")
    after = SoftLabelStore(str(out)).info()
    assert after.n_sequences == before.n_sequences and after.bytes_on_disk == before.bytes_on_disk
    result = precompute(tiny_model, dolly, out, "--limit", "4", "--top-k", "4", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert SoftLabelStore(str(out)).manifest.top_k == 4


def test_unreadable_model_path_and_top_k_beyond_vocabulary(tiny_model, dolly, tmp_path):
    fails_with(precompute(tmp_path / "no-such-model", dolly, tmp_path / "o"), "no-such-model does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(precompute(tmp_path / "empty", dolly, tmp_path / "o"), "not a transformers checkpoint")
    fails_with(precompute(tiny_model, dolly, tmp_path / "o", "--top-k", "100000"),
               "--top-k 100000 is larger than the teacher's vocabulary (384)")
    assert not (tmp_path / "o").exists()


def test_overwrite_is_refused_with_shards(tiny_model, dolly, tmp_path):
    fails_with(precompute(tiny_model, dolly, tmp_path / "o", "--shard", "1/2", "--overwrite"),
               "--overwrite cannot be combined with --shard")


def test_a_chat_template_that_breaks_prompts_fails_before_anything_is_written(tiny_model, dolly, tmp_path):
    bad = tmp_path / "t.jinja"  # the generation prompt differs from how the conversation continues
    bad.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant says]{% endif %}")
    fails_with(precompute(tiny_model, dolly, tmp_path / "o", "--chat-template", str(bad)),
               "does not write the prompt as a prefix")
    assert not (tmp_path / "o").exists()


def test_bad_options_are_reported_together(tiny_model, dolly, tmp_path):
    fails_with(precompute(tiny_model, dolly, tmp_path / "o", "--batch-size", "0", "--shard", "2/2",
                          "--overlong", "wrap", "--augment", "beam"),
               "--batch-size must be at least 1", "--shard '2/2'", "--overlong 'wrap'", "--augment beam")


def test_missing_dataset_file(tiny_model, tmp_path):
    fails_with(precompute(tiny_model, tmp_path / "nope.jsonl", tmp_path / "o"), "nope.jsonl: no such file")


def test_limit_stops_before_a_bad_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW, DOLLY_ROW | {"response": "Red."}, '{"broken": '])
    result = precompute(tiny_model, data, tmp_path / "out", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    assert SoftLabelStore(str(tmp_path / "out")).n_sequences == 2


# The commands whose options are generated from a config, and the module whose `run` they call.
CONFIG_COMMANDS = [(["precompute", "teacher"], PrecomputeConfig, smoothkd.precompute.run),
                   (["distill", "student"], DistillConfig, smoothkd.distill.trainer)]


@pytest.mark.parametrize("command, config, module", CONFIG_COMMANDS)
def test_help_lists_every_config_field_with_its_help_and_default(command, config, module, monkeypatch):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)  # one line per option
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for f in dataclasses.fields(config):
        name, form = flag(f), f.metadata["cli"]
        [line] = [x for x in lines if re.match(rf"[│\s*]*{name}\s", x)]  # the option's own row
        assert f.metadata["help"] + (form.note if form else "") in line, line
        shown = form.show(default_of(f)) if form else default_of(f)
        if f.metadata["required"]:
            assert "[required]" in line, line
        elif isinstance(shown, bool):
            assert f"[default: {'' if shown else 'no-'}{name[2:]}]" in line, line
        elif shown in (None, "", []):
            assert "[default:" not in line, line
        else:
            assert f"[default: {shown}]" in line, line


def _non_default(f: dataclasses.Field, tmp_path: Path) -> tuple[Any, list[str]]:
    """A value other than the field's default, and the command-line words that give it."""
    name, form, value = flag(f), f.metadata["cli"], default_of(f)
    if form is COMMA_LIST:
        return ["a", "b"], [name, "a, b"]
    if form is FIELD_MAP:
        return {"response": "answer"}, [name, "response=answer"]
    if form is EXISTING_FILE:
        (tmp_path / "template.jinja").write_text("{{ messages }}")
        return str(tmp_path / "template.jinja"), [name, str(tmp_path / "template.jinja")]
    assert form is None, f"no test value for {name}"
    if isinstance(value, bool):
        return not value, [f"--no-{name[2:]}" if value else name]
    if isinstance(value, list):
        return ["a", "b"], [name, "a", name, "b"]
    if isinstance(value, str):
        return f"x-{f.name}", [name, f"x-{f.name}"]
    new = value + 0.5 if isinstance(value, float) else (value or 1) + 1
    return new, [name, str(new)]


@pytest.mark.parametrize("command, config, module", CONFIG_COMMANDS)
def test_every_option_reaches_its_config_field(command, config, module, monkeypatch, tmp_path):
    expected, args = {}, []
    for f in dataclasses.fields(config):
        expected[f.name], words = _non_default(f, tmp_path)
        args += words
    seen = []

    def run(cfg: Any, **_: Any) -> None:
        seen.append(cfg)
        raise SmoothkdError("stopped before running")

    monkeypatch.setattr(module, "run", run)
    fails_with(runner.invoke(app, [*command, *args]), "stopped before running")
    assert seen == [config(**expected)]


def test_a_missing_chat_template_file_is_refused(tiny_model, dolly, tmp_path):
    fails_with(precompute(tiny_model, dolly, tmp_path / "o", "--chat-template", str(tmp_path / "none.jinja")),
               f"--chat-template {tmp_path / 'none.jinja'}: no such file")
    assert not (tmp_path / "o").exists()
