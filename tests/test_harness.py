"""The general tasks through the real lm-evaluation-harness (the `lm-eval` extra): its task configs are
lm-eval's own definitions on local files, it reads the file and items the user names, offline, and it
agrees with the builtin scorer on the bundled items, example for example."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.config import GENERAL_TASKS
from smoothkd.evaluate.general import choice_logliks, evaluate_general, load_task
from smoothkd.evaluate.harness import TASK_CONFIGS, evaluate_lm_eval, write_task_configs

from conftest import REPO, need, write_jsonl

DATA = REPO / "data" / "general"
TASKS = list(GENERAL_TASKS)


@pytest.fixture(scope="module")
def lm_eval():
    return need("lm_eval")


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def read_yaml(path: Path) -> dict:
    """A task YAML with its includes merged, `!function x.y` kept as the string "x.y"."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        cfg = {**read_yaml(path.parent / cfg.pop("include")), **cfg}
    return cfg


def lm_eval_tasks(tasks: list[str], data_dir: Path, tmp: Path) -> dict:
    """lm-eval's Task objects for our configs on data_dir's files, as the harness builds them."""
    from lm_eval.tasks import TaskManager

    write_task_configs(tasks, data_dir, tmp)
    return TaskManager(include_path=str(tmp), include_defaults=False).load(tasks)["tasks"]


# --- the task configs -----------------------------------------------------------------------------

LM_EVAL_YAML = {"arc_challenge": "arc/arc_challenge.yaml", "arc_easy": "arc/arc_easy.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_are_lm_evals_own_definitions(lm_eval, task):
    ours = read_yaml(TASK_CONFIGS / f"{task}.yaml")
    theirs = read_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[task])
    # prompt, target, choices, delimiters and metrics as lm-eval ships them; only the data source differs
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                "fewshot_delimiter", "metric_list", "metadata"):
        assert ours.get(key) == theirs.get(key), key
    assert ours["dataset_path"] == "json" and ours["num_fewshot"] == 0
    # lm-eval's hellaswag process_docs runs inside ours; OpenBookQA's file needs its schema converted
    assert ours.get("process_docs") == (None if task.startswith("arc") else f"smoothkd.evaluate.lm_eval_tasks.docs.{task}")


def test_configs_read_the_file_task_file_finds(lm_eval, tmp_path):
    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    shutil.copy(DATA / "arc_easy.jsonl", data / "arc_easy" / "arc_easy_test.jsonl")  # the shared layout
    shutil.copy(DATA / "hellaswag.jsonl", data / "hellaswag_val.jsonl")
    (tmp_path / "cfg").mkdir()
    files = write_task_configs(["arc_easy", "hellaswag"], data, tmp_path / "cfg")
    assert files == {"arc_easy": data / "arc_easy" / "arc_easy_test.jsonl", "hellaswag": data / "hellaswag_val.jsonl"}
    cfg = yaml.safe_load((tmp_path / "cfg" / "arc_easy.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(files["arc_easy"])}
    tasks = lm_eval_tasks(["arc_easy", "hellaswag"], data, tmp_path / "cfg")
    assert [d["id"] for d in tasks["arc_easy"].eval_docs] == [i.id for i in load_task("arc_easy", DATA)]
    assert len(tasks["hellaswag"].eval_docs) == 40


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_builds_the_builtin_prompts_choices_and_gold(lm_eval, task, tmp_path):
    # Every bundled item: lm-eval's context, choices and gold are the builtin loader's (HellaSwag's
    # ctx_b recovery and preprocessing, ARC's numeric labels, OpenBookQA's llm-foundry schema).
    lm_task = lm_eval_tasks([task], DATA, tmp_path)[task]
    items = load_task(task, DATA)
    docs = list(lm_task.eval_docs)
    assert len(docs) == len(items) == 40
    for doc, item in zip(docs, items):
        assert lm_task.doc_to_text(doc) == item.context, item.id
        assert lm_task.doc_to_choice(doc) == item.choices, item.id
        assert lm_task.doc_to_target(doc) == item.gold, item.id
    assert lm_task.config.target_delimiter == " "


# --- scoring --------------------------------------------------------------------------------------

def test_lm_eval_agrees_with_builtin_example_for_example(lm_eval, lm):
    model, tokenizer = lm
    ours = evaluate_general(model, tokenizer, TASKS, DATA, limit=12, batch_size=8)
    theirs = evaluate_lm_eval(model, tokenizer, TASKS, DATA, limit=12, batch_size=8)
    json.dumps(theirs)  # plain numbers only
    assert len(theirs["examples"]) == len(ours["examples"]) == 48
    for a, b in zip(theirs["examples"], ours["examples"]):
        assert a.keys() == b.keys()
        assert (a["task"], a["id"], a["gold"]) == (b["task"], b["id"], b["gold"])
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4), a["id"]
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"]), a["id"]
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-4)
    for task in TASKS:
        t, o = theirs["tasks"][task], ours["tasks"][task]
        assert t["n"] == o["n"] == 12
        assert abs(t["acc_norm"] - o["acc_norm"]) <= 0.005 and abs(t["acc"] - o["acc"]) <= 0.005
        mine = [e for e in theirs["examples"] if e["task"] == task]
        assert t["acc_norm"] == pytest.approx(np.mean([e["pred_norm"] == e["gold"] for e in mine]))
        assert t["confidence_on_wrong"] == pytest.approx(o["confidence_on_wrong"], abs=1e-4)
    # the random model tells the choices apart, so agreement is not a tie everywhere
    assert len({e["pred_norm"] for e in theirs["examples"]}) > 1


def test_lm_eval_limit_takes_the_first_items_of_a_full_layout(lm_eval, lm, tmp_path):
    model, tokenizer = lm
    (tmp_path / "hellaswag").mkdir()
    shutil.copy(DATA / "hellaswag.jsonl", tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    found = evaluate_lm_eval(model, tokenizer, ["hellaswag"], tmp_path, limit=3, batch_size=4)
    assert [e["id"] for e in found["examples"]] == ["0", "1", "2"] and found["tasks"]["hellaswag"]["n"] == 3
    items = load_task("hellaswag", DATA, limit=3)
    for e, lls in zip(found["examples"], choice_logliks(model, tokenizer, items)):
        assert e["logliks"] == pytest.approx(lls, abs=1e-4)


def test_lm_eval_runs_with_the_network_refused(lm_eval, lm, monkeypatch):
    model, tokenizer = lm

    def refuse(*args, **kwargs):
        raise OSError("network access during an offline evaluation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    found = evaluate_lm_eval(model, tokenizer, ["openbookqa", "arc_challenge"], DATA, limit=2, batch_size=4)
    assert [e["id"] for e in found["examples"]] == ["0", "1", "Mercury_7175875", "Mercury_SC_409171"]


def test_lm_eval_items_tokenised_like_running_text(lm_eval, lm, tmp_path):
    # A context ending in a space: lm-eval moves it onto the continuation, as the builtin does.
    model, tokenizer = lm
    write_jsonl(tmp_path / "openbookqa.jsonl", [{"query": "Predators eat ", "choices": ["lions", "bunnies"], "gold": 1}])
    a = evaluate_lm_eval(model, tokenizer, ["openbookqa"], tmp_path)["examples"][0]
    b = evaluate_general(model, tokenizer, ["openbookqa"], tmp_path)["examples"][0]
    assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4)


# --- errors ---------------------------------------------------------------------------------------

def test_bad_line_is_named_before_lm_eval_starts(lm_eval, tmp_path):
    good = (DATA / "arc_easy.jsonl").read_text().splitlines()[0]
    path = write_jsonl(tmp_path / "arc_easy.jsonl", [good, '{"id": "x", "question": "q"}'])
    with pytest.raises(InputError, match=re.escape(f"{path}:2: arc_easy: missing field 'choices'")):
        evaluate_lm_eval(None, None, ["arc_easy"], tmp_path)  # no model needed to fail


def test_unknown_task_fails_before_anything_runs(lm_eval):
    with pytest.raises(SmoothkdError, match="unknown task 'piqa'"):
        evaluate_lm_eval(None, None, ["arc_easy", "piqa"], DATA)


# --- the command ----------------------------------------------------------------------------------

def general(model, out, *extra):
    from typer.testing import CliRunner

    from smoothkd.cli import app

    r = CliRunner().invoke(app, ["evaluate", "general", "--model", str(model), "--tasks", "arc_easy,hellaswag",
                                 "--data-dir", str(DATA), "--limit", "4", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output + r.stderr
    return r


def test_command_records_the_harness_and_forgetting_reads_either(lm_eval, tiny_model, tmp_path):
    from smoothkd.evaluate.run import forgetting_by_task
    from smoothkd.run_layout import read_eval

    general(tiny_model, tmp_path / "auto")  # lm-eval is installed: the default
    general(tiny_model, tmp_path / "builtin", "--harness", "builtin")
    general(tiny_model, tmp_path / "ref", "--harness", "lm-eval", "--reference", str(tiny_model))
    auto, builtin, ref = (read_eval(tmp_path / d) for d in ("auto", "builtin", "ref"))
    head = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert head["harness"] == "lm-eval" and head["lm_eval_version"] == lm_eval.__version__ and head["notes"] == []
    assert builtin.extra == {"harness": "builtin"}
    assert [e.keys() for e in auto.examples] == [e.keys() for e in builtin.examples]
    assert [(e["id"], e["pred_norm"]) for e in auto.examples] == [(e["id"], e["pred_norm"]) for e in builtin.examples]
    for task in ("arc_easy", "hellaswag"):
        assert auto.metrics[task]["acc_norm"] == builtin.metrics[task]["acc_norm"]
    # forgetting across harnesses: the same model, so nothing forgotten or learned
    assert all(f["forgotten"] in (0.0, None) and f["learned"] in (0.0, None)
               for f in forgetting_by_task(builtin.examples, auto.examples).values())
    assert ref.extra["harness"] == "lm-eval" and ref.metrics["forgetting"]["all"]["forgotten"] in (0.0, None)


def test_auto_without_lm_eval_fake_uninstalled_falls_back_with_a_note(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an interpreter without the package sees
    r = general(tiny_model, tmp_path / "ev")
    head = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert head["harness"] == "builtin" and "lm_eval_version" not in head
    assert len(head["notes"]) == 1 and "pip install 'smoothkd[lm-eval]'" in head["notes"][0]
    assert "note: lm-evaluation-harness is not installed (pip install 'smoothkd[lm-eval]')" in r.output


def test_lm_eval_harness_fake_uninstalled_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smoothkd.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    r = CliRunner().invoke(app, ["evaluate", "general", "--model", str(tiny_model), "--data-dir", str(DATA),
                                 "--harness", "lm-eval", "--out", str(tmp_path / "ev")])
    assert r.exit_code != 0 and "pip install 'smoothkd[lm-eval]'" in r.output + r.stderr


def test_unknown_harness_is_refused(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from smoothkd.cli import app

    r = CliRunner().invoke(app, ["evaluate", "general", "--model", str(tiny_model), "--data-dir", str(DATA),
                                 "--harness", "lmeval", "--out", str(tmp_path / "ev")])
    assert r.exit_code != 0 and "--harness 'lmeval' is not one of lm-eval, builtin, auto" in r.output + r.stderr
    assert not (tmp_path / "ev").exists()


def test_smollm2_harnesses_agree_on_bundled_items(lm_eval, smollm2):
    # The real embedded model, 2 items of each task (benchmarks/general_harness.py does all 40): the
    # same log-likelihoods up to float32 batching noise, hence the same predictions and acc_norm.
    from smoothkd.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(smollm2), load_tokenizer(smollm2)
    ours = evaluate_general(model, tokenizer, TASKS, DATA, limit=2)
    theirs = evaluate_lm_eval(model, tokenizer, TASKS, DATA, limit=2)
    assert len(theirs["examples"]) == len(ours["examples"]) == 8
    for a, b in zip(theirs["examples"], ours["examples"]):
        assert a["logliks"] == pytest.approx(b["logliks"], abs=2e-3), (a["task"], a["id"])
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"]), (a["task"], a["id"])
    for task in TASKS:
        assert abs(theirs["tasks"][task]["acc_norm"] - ours["tasks"][task]["acc_norm"]) <= 0.005
