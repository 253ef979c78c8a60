"""General-ability tasks: lm-eval's prompt formats, acc / acc_norm, batched log-likelihoods on a
tiny random Llama checked against a one-sequence-at-a-time computation, and clear input errors."""

from __future__ import annotations

import json
import math
import random
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.general import (
    TASKS, MCItem, choice_logliks, evaluate_general, hellaswag_preprocess, load_task, predictions, split_hellaswag_ctx,
)

from conftest import REPO, write_jsonl

DATA = REPO / "data" / "general"


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


# --- acc / acc_norm -------------------------------------------------------------------------------

def test_predictions_acc_and_acc_norm_disagree():
    # acc: -4 > -6 -> 0; acc_norm: -4/2 = -2.0 < -6/10 = -0.6 -> 1
    assert predictions([-4.0, -6.0], ["ab", "abcdefghij"]) == (0, 1)
    # acc: -9 is the largest -> 2; acc_norm: -10/5=-2, -12/20=-0.6, -9/3=-3, -30/40=-0.75 -> 1
    assert predictions([-10.0, -12.0, -9.0, -30.0], ["a" * 5, "b" * 20, "c" * 3, "d" * 40]) == (2, 1)


def test_predictions_length_is_characters_of_the_choice_text():
    # " b" would be 2 characters with the target delimiter; lm-eval divides by len(choice) = 1.
    # -3/1 = -3 < -5/2 = -2.5 -> 1 (with the space: -3/2 = -1.5 > -5/3 -> 0)
    assert predictions([-3.0, -5.0], ["b", "cc"]) == (0, 1)


def test_predictions_ties_go_to_the_first_choice():
    assert predictions([-3.0, -3.0], ["abc", "xyz"]) == (0, 0)
    # acc: -2 > -4 -> 1; acc_norm: -4/2 = -2/1 = -2.0, a tie -> 0
    assert predictions([-4.0, -2.0], ["ab", "a"]) == (1, 0)


def test_predictions_match_numpy_argmax_as_lm_eval_computes_it():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 5)
        lls = [round(rng.uniform(-30, -1), 1) for _ in range(n)]  # rounded: ties happen
        choices = ["x" * rng.randint(1, 6) for _ in range(n)]
        lens = np.array([float(len(c)) for c in choices])
        assert predictions(lls, choices) == (int(np.argmax(lls)), int(np.argmax(np.array(lls) / lens)))


# --- log-likelihoods ------------------------------------------------------------------------------

def reference_logliks(model, tokenizer, item: MCItem) -> list[float]:
    """One sequence at a time, no padding, float64."""
    out = []
    for choice in item.choices:
        ctx = tokenizer(item.context)["input_ids"]
        cont = tokenizer(item.context + " " + choice)["input_ids"][len(ctx):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
        logp = logits.log_softmax(-1)
        out.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    return out


def test_choice_logliks_match_one_sequence_at_a_time(lm):
    model, tokenizer = lm
    items = load_task("arc_easy", DATA, limit=3) + load_task("hellaswag", DATA, limit=2) + \
        load_task("openbookqa", DATA, limit=2)
    got = choice_logliks(model, tokenizer, items, batch_size=3)  # 28 sequences: uneven batches, padding
    assert [len(g) for g in got] == [len(i.choices) for i in items]
    for item, lls in zip(items, got):
        ref = reference_logliks(model, tokenizer, item)
        assert lls == pytest.approx(ref, abs=1e-4), item.id
        assert all(ll < 0 for ll in lls)
    assert len({round(ll, 3) for lls in got for ll in lls}) > 20  # the model tells choices apart


def test_choice_logliks_move_a_trailing_context_space_onto_the_continuation(lm):
    model, tokenizer = lm
    spaced = MCItem("t", "a", "Question: What colour is the sky?\nAnswer: ", ["blue", "green"], 0)
    moved = MCItem("t", "b", "Question: What colour is the sky?\nAnswer:", [" blue", " green"], 0)
    a, b = choice_logliks(model, tokenizer, [spaced, moved])
    assert a == pytest.approx(b, abs=1e-5)


# --- loaders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_bundled_samples_parse(task):
    items = load_task(task, DATA)
    assert len(items) == 40
    assert len({i.id for i in items}) == 40
    for item in items:
        assert item.task == task and len(item.choices) == 4 and 0 <= item.gold < 4
        assert item.context and all(item.choices) and item.context == item.context.strip()
    assert len(load_task(task, DATA, limit=5)) == 5
    assert len({i.gold for i in items}) > 1


def test_arc_format():
    item = load_task("arc_challenge", DATA, limit=1)[0]
    assert item.id == "Mercury_7175875"
    assert item.context == ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                            "Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert item.choices[item.gold] == "Planetary days will become shorter."
    # numeric labels: gold = choices.label.index(answerKey), "2" -> 1
    easy = {i.id: i for i in load_task("arc_easy", DATA)}["NYSEDREGENTS_2015_8_28"]
    assert easy.context == "Question: All living and nonliving material is composed of\nAnswer:"
    assert easy.choices == ["air", "elements", "water", "soil"] and easy.gold == 1


def test_hellaswag_format():
    # as lm-eval requests them: ('Roof shingle removal: A man is sitting on a roof. He', ' is using wrap ...')
    first, second = load_task("hellaswag", DATA, limit=2)
    assert first.id == "0" and first.gold == 3
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices == ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    assert second.context == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"


def test_hellaswag_official_schema_gives_the_same_item(tmp_path):
    official = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
                "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}
    write_jsonl(tmp_path / "hellaswag.jsonl", [official])
    item = load_task("hellaswag", tmp_path)[0]
    bundled = load_task("hellaswag", DATA, limit=1)[0]
    assert item.id == "24" and (item.context, item.choices, item.gold) == (bundled.context, bundled.choices, 3)


def test_hellaswag_wikihow_items_are_preprocessed_and_not_recapitalised(tmp_path):
    # val 3505 (the llama.cpp dump left this [...] link in); the endings are made up to carry artefacts
    ctx = ("How to entertain a toddler. Ask the toddler what he or she would like to do instead of doing what you "
           "would like to do.. Visit a site like [www.kiddio.org] to find loads of creative activities for toddlers "
           "and preschoolers.. Choose small, simple games like candy land or chutes and ladders.")
    write_jsonl(tmp_path / "hellaswag.jsonl", [{"val_index": 3505, "activity_label": "Family Life", "ctx": ctx,
                                                "endings": ["Visit [www.kiddio.org] now.", " Keep  calm. ", "a", "b"],
                                                "label": 1}])
    item = load_task("hellaswag", tmp_path)[0]
    assert item.context == ("Family Life: How to entertain a toddler. Ask the toddler what he or she would like to do "
                            "instead of doing what you would like to do.. Visit a site like to find loads of creative "
                            "activities for toddlers and preschoolers.. Choose small, simple games like candy land or "
                            "chutes and ladders.")
    assert item.choices == ["Visit now.", "Keep calm.", "a", "b"] and item.gold == 1 and item.id == "3505"


def test_split_hellaswag_ctx_finds_the_lower_case_ctx_b():
    assert split_hellaswag_ctx("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_ctx("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    assert split_hellaswag_ctx("How to x. Do y.") == ("How to x. Do y.", "")  # WikiHow: no ctx_b
    assert split_hellaswag_ctx("He runs. 3 dogs") == ("He runs. 3 dogs", "")


def test_hellaswag_preprocess_as_lm_eval():
    # strip; " [title]" -> ". "; drop [...]; one pass of double space -> single
    assert hellaswag_preprocess(" [header] How to x [title] Buy y. [step] Do z.  ") == " How to x. Buy y. Do z."
    assert hellaswag_preprocess("Visit a site like [www.kiddio.org] to find") == "Visit a site like to find"


def test_openbookqa_format():
    item = load_task("openbookqa", DATA, limit=3)[2]
    assert item.id == "2"  # no id in llm-foundry's file: the record index
    assert item.context == "Predators eat"
    assert item.choices == ["lions", "humans", "bunnies", "grass"] and item.gold == 2


def test_shared_layouts_are_found(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    shutil.copy(DATA / "arc_easy.jsonl", tmp_path / "arc_easy" / "arc_easy_test.jsonl")
    shutil.copy(DATA / "hellaswag.jsonl", tmp_path / "hellaswag_val.jsonl")
    assert load_task("arc_easy", tmp_path) == load_task("arc_easy", DATA)
    assert load_task("hellaswag", tmp_path, limit=3) == load_task("hellaswag", DATA, limit=3)


# --- evaluate_general -----------------------------------------------------------------------------

def test_evaluate_general_is_consistent(lm):
    model, tokenizer = lm
    seen = []
    result = evaluate_general(model, tokenizer, ["arc_easy", "openbookqa"], DATA, limit=5, batch_size=2,
                              progress=seen.append)
    assert sum(seen) == 10 and set(result["tasks"]) == {"arc_easy", "openbookqa"}
    json.dumps(result)  # plain numbers only: the CLI writes it as JSON
    for task, metrics in result["tasks"].items():
        items = load_task(task, DATA, limit=5)
        examples = [e for e in result["examples"] if e["task"] == task]
        assert metrics["n"] == 5 == len(examples)
        assert [e["id"] for e in examples] == [i.id for i in items]
        for item, e, lls in zip(items, examples, choice_logliks(model, tokenizer, items)):
            assert e["logliks"] == pytest.approx(lls, abs=1e-5)
            assert e["gold"] == item.gold
            assert (e["pred"], e["pred_norm"]) == predictions(e["logliks"], item.choices)
            assert sum(e["probs"]) == pytest.approx(1.0)
            assert e["probs"] == pytest.approx(torch.tensor(e["logliks"]).double().softmax(0).tolist())
            assert e["pred"] == int(np.argmax(e["probs"]))
        assert metrics["acc"] == pytest.approx(np.mean([e["pred"] == e["gold"] for e in examples]))
        assert metrics["acc_norm"] == pytest.approx(np.mean([e["pred_norm"] == e["gold"] for e in examples]))
        wrong = [max(e["probs"]) for e in examples if e["pred_norm"] != e["gold"]]
        if wrong:
            assert metrics["confidence_on_wrong"] == pytest.approx(float(np.mean(wrong)))
            assert 0.25 <= metrics["confidence_on_wrong"] <= 1.0
        else:
            assert metrics["confidence_on_wrong"] is None


def test_general_command_writes_per_task_metrics_and_their_mean(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from smoothkd.cli import app
    from smoothkd.run_layout import read_eval

    r = CliRunner().invoke(app, ["evaluate", "general", "--model", str(tiny_model), "--tasks", "arc_easy, openbookqa",
                                 "--data-dir", str(DATA), "--limit", "4", "--out", str(tmp_path / "ev"),
                                 "--harness", "builtin"])  # lm-eval's own: tests/test_harness.py
    assert r.exit_code == 0, r.output + r.stderr
    ev = read_eval(tmp_path / "ev")
    assert ev.kind == "general" and ev.model == str(tiny_model) and len(ev.examples) == 8
    assert ev.extra == {"harness": "builtin"} and ev.notes == []
    per_task = [ev.metrics[t]["acc_norm"] for t in ("arc_easy", "openbookqa")]
    for t in ("arc_easy", "openbookqa"):
        mine = [e for e in ev.examples if e["task"] == t]
        assert ev.metrics[t]["acc_norm"] == np.mean([e["pred_norm"] == e["gold"] for e in mine])
    assert ev.metrics["mean_acc_norm"] == pytest.approx(np.mean(per_task))
    assert "mean_acc_norm" in r.output


def test_mean_acc_norm_weighs_tasks_equally():
    from smoothkd.evaluate.general import mean_acc_norm

    assert mean_acc_norm({"a": {"n": 100, "acc_norm": 0.5}, "b": {"n": 4, "acc_norm": 1.0}}) == 0.75


def test_confidence_on_wrong_is_none_when_nothing_is_wrong(lm, tmp_path):
    model, tokenizer = lm
    # One choice per question: the prediction is always right.
    write_jsonl(tmp_path / "openbookqa.jsonl", [{"query": "Predators eat", "choices": ["bunnies"], "gold": 0}])
    result = evaluate_general(model, tokenizer, ["openbookqa"], tmp_path)
    assert result["tasks"]["openbookqa"] == {"n": 1, "acc": 1.0, "acc_norm": 1.0, "confidence_on_wrong": None}
    assert result["examples"][0]["probs"] == [1.0]


# --- errors ---------------------------------------------------------------------------------------

def test_malformed_line_names_file_and_line(tmp_path):
    good = (DATA / "arc_easy.jsonl").read_text().splitlines()[0]
    path = write_jsonl(tmp_path / "arc_easy.jsonl", [good, '{"id": "x", "question": '])
    with pytest.raises(InputError, match=re.escape(f"{path}:2: not valid JSON")):
        load_task("arc_easy", tmp_path)
    assert len(load_task("arc_easy", tmp_path, limit=1)) == 1  # a limit stops before the bad line


@pytest.mark.parametrize("task, record, message", [
    ("arc_easy", {"id": "x", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
     "missing field 'question'"),
    ("arc_easy", {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
     "gold answerKey 'E' is not one of the labels"),
    ("hellaswag", {"activity_label": "a", "ctx": "b", "endings": ["c", "d"], "label": 4},
     "gold index 4 is out of range for 2 choices"),
    ("hellaswag", {"activity_label": "a", "ctx": "b", "endings": ["c", "d"]}, "missing field 'label'"),
    ("openbookqa", {"query": "q", "choices": ["a", "b"], "gold": "1"}, "field 'gold' is not an integer"),
    ("openbookqa", {"query": "q", "choices": ["a", ""], "gold": 0}, "choice 1 is empty"),
    ("openbookqa", ["not", "an", "object"], "not a JSON object"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, task, record, message):
    path = write_jsonl(tmp_path / f"{task}.jsonl", [record])
    with pytest.raises(InputError, match=re.escape(f"{path}:1: ") + ".*" + re.escape(message)):
        load_task(task, tmp_path)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(SmoothkdError, match="unknown task 'piqa'; known tasks: arc_challenge, arc_easy, hellaswag, "
                                            "openbookqa"):
        load_task("piqa", DATA)
    # every task is checked before any scoring: no model is needed to fail
    with pytest.raises(SmoothkdError, match="unknown task 'piqa'"):
        evaluate_general(None, None, ["arc_easy", "piqa"], DATA)


def test_missing_file_says_which_paths_were_tried(tmp_path):
    with pytest.raises(InputError) as e:
        load_task("openbookqa", tmp_path)
    message = str(e.value)
    for tried in ("openbookqa.jsonl", "openbookqa*.jsonl", "openbookqa/*.jsonl"):
        assert str(tmp_path / tried) in message


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "openbookqa.jsonl", ["", "  "])
    with pytest.raises(InputError, match=re.escape(f"{path}: no records")):
        load_task("openbookqa", tmp_path)


def test_softmax_of_very_negative_logliks_is_finite(lm, tmp_path):
    model, tokenizer = lm
    # Long choices sum to log-likelihoods below -745, where exp() underflows to 0: no 0/0.
    choices = [" ".join(["roofing"] * 60), " ".join(["sky blue"] * 60)]
    write_jsonl(tmp_path / "openbookqa.jsonl", [{"query": "Predators eat", "choices": choices, "gold": 0}])
    e = evaluate_general(model, tokenizer, ["openbookqa"], tmp_path)["examples"][0]
    assert max(e["logliks"]) < -745
    assert all(math.isfinite(p) for p in e["probs"]) and sum(e["probs"]) == pytest.approx(1.0)
