"""HHEM-2.1-open loaded by smoothkd's own code (smoothkd/evaluate/hhem.py).

HHEM's real weights cannot be downloaded here, so most tests use a stand-in for them: a tiny
random T5ForTokenClassification (the class HHEM wraps) with a Unigram tokenizer trained here,
saved in HHEM's directory layout and key names, its config.json as published, and its own .py
files replaced by ones that leave a marker if anything imports them. Scores are checked against
an independent computation: HHEM's predict() as its code does it, with transformers' classes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.errors import SmoothkdError
from smoothkd.evaluate import hhem
from smoothkd.evaluate.config import DEFAULT_INSTRUCTION
from smoothkd.evaluate.summarization import load_articles, load_fc_model
from smoothkd.tokens import document_prompt

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO / "data" / "dolly" / "dolly_sample.jsonl"
XSUM = REPO / "data" / "xsum" / "xsum_sample.jsonl"
PROMPT = "<pad> Determine if the hypothesis is true given the premise?\n\nPremise: {text1}\n\nHypothesis: {text2}"
PAIRS = [
    ("The capital of France is Berlin.", "The capital of France is Paris."),
    ("I am in California", "I am in United States."),
    ("I am in United States", "I am in California."),
    ("A person on a horse jumps over a broken down airplane. " * 6, "A person is outdoors, on a horse."),
    ("Mark Wahlberg was a fan of Manny.", "Manny was a fan of Mark Wahlberg."),
]


def _t5_tokenizer(path: Path) -> None:
    """A T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, `</s>` appended) trained on the Dolly sample."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = [v for line in DOLLY.read_text().splitlines() for v in json.loads(line).values() if isinstance(v, str)]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                          unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path))


def build_hhem_standin(path: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A stand-in for HHEM-2.1-open's real weights, in its layout; also the model it holds, in memory."""
    from transformers import T5Config, T5ForTokenClassification

    foundation = path / hhem.FOUNDATION
    foundation.mkdir(parents=True)
    _t5_tokenizer(foundation / "tokenizer.json")
    # flan-t5-base's architecture (gated-gelu, untied lm head, dropout 0.1), shrunk.
    config = T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=0.1, architectures=["T5ForConditionalGeneration"])
    config.to_json_file(foundation / "config.json")
    torch.manual_seed(seed)
    model = T5ForTokenClassification(config).eval()
    with torch.no_grad():  # spread the random scores well away from 0.5, so that a mismatch shows
        model.classifier.weight.mul_(30)
    # As HHEM's file (saved by transformers 4): `t5.` names, the encoder's tied embedding left out.
    save_file({"t5." + k: v.clone() for k, v in model.state_dict().items() if k not in hhem.ALIASES},
              path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["HHEMv2ForSequenceClassification"],
        "auto_map": {"AutoConfig": "configuration_hhem_v2.HHEMv2Config",
                     "AutoModelForSequenceClassification": "modeling_hhem_v2.HHEMv2ForSequenceClassification"},
        "foundation": "google/flan-t5-base", "model_type": "HHEMv2Config", "prompt": PROMPT,
        "torch_dtype": "float32", "transformers_version": "4.39.3"}, indent=2))
    for name in ("configuration_hhem_v2.py", "modeling_hhem_v2.py"):
        (path / name).write_text(f"import pathlib\npathlib.Path({str(path / 'code-ran')!r}).touch()\n")
    return path, model


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return build_hhem_standin(tmp_path_factory.mktemp("hhem") / "hhem")


def _copy(standin: tuple[Path, torch.nn.Module], tmp_path: Path) -> Path:
    return Path(shutil.copytree(standin[0], tmp_path / "hhem"))


def hhem_predict(model: torch.nn.Module, tokenizer_json: Path, pairs: list[tuple[str, str]]) -> list[float]:
    """HHEM's predict() as its modeling_hhem_v2.py does it: the foundation's fast tokenizer, one padded
    batch, T5ForTokenClassification, softmax of the first position, class 1."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    inputs = tokenizer([PROMPT.format(text1=p, text2=h) for p, h in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0, :]
    return torch.softmax(logits, dim=-1)[:, 1].tolist()


def test_standin_scores_equal_hhems_own_computation(standin):
    path, model = standin
    scorer = hhem.load(path, device="cpu")
    expected = hhem_predict(model, path / "foundation" / "tokenizer.json", PAIRS)
    assert scorer(PAIRS) == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.1  # the scores differ, so a mix-up would show
    # the prompt's leading "<pad>" is the special token, and `</s>` ends the input, as in HHEM
    ids = scorer.tokenizer.encode(PROMPT.format(text1="a", text2="b")).ids
    assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:]
    assert not (path / "code-ran").exists()  # nothing from the directory was imported


def test_scores_do_not_depend_on_batching_or_padding(standin):
    path, _ = standin
    one_by_one = hhem.load(path, batch_size=1, device="cpu")(PAIRS)
    assert hhem.load(path, batch_size=3, device="cpu")(PAIRS) == pytest.approx(one_by_one, abs=1e-5)
    assert hhem.load(path, batch_size=64, device="cpu")(PAIRS[::-1]) == pytest.approx(one_by_one[::-1], abs=1e-5)
    assert hhem.load(path, device="cpu")([]) == []


def test_long_inputs_are_not_truncated(standin):
    """HHEM-2.1 has no 512-token limit: a premise far past it still changes the score."""
    path, model = standin
    scorer = hhem.load(path, device="cpu")
    long = [("A person is outdoors. " * 80 + "The horse is brown.", "The horse is brown."),
            ("A person is outdoors. " * 80 + "The horse is black.", "The horse is brown.")]
    assert len(scorer.tokenizer.encode(PROMPT.format(text1=long[0][0], text2=long[0][1])).ids) > 600
    scores = scorer(long)
    assert scores == pytest.approx(hhem_predict(model, path / "foundation" / "tokenizer.json", long), abs=1e-5)
    assert scores[0] != scores[1]


def test_a_file_with_the_tied_embedding_too_loads_the_same(standin, tmp_path):
    path = _copy(standin, tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["t5.transformer.encoder.embed_tokens.weight"] = weights["t5.transformer.shared.weight"].clone()
    save_file(weights, path / "model.safetensors")
    assert hhem.load(path, device="cpu")(PAIRS) == pytest.approx(hhem.load(standin[0], device="cpu")(PAIRS), abs=1e-6)
    weights["t5.transformer.encoder.embed_tokens.weight"] += 1
    save_file(weights, path / "model.safetensors")
    with pytest.raises(SmoothkdError, match="encoder.embed_tokens.weight differs from t5.transformer.shared"):
        hhem.load(path, device="cpu")


def test_model_type_as_its_config_class_declares_it_is_accepted(standin, tmp_path):
    path = _copy(standin, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "HHEMv2"}))
    assert hhem.load(path, device="cpu")(PAIRS[:1]) == pytest.approx(hhem.load(standin[0], device="cpu")(PAIRS[:1]))


def test_missing_files_name_the_file_and_how_to_fetch_it(standin, tmp_path):
    with pytest.raises(SmoothkdError, match=r"HHEM needs a local copy of vectara/hallucination_evaluation_model.*"
                                            r"hf download vectara/hallucination_evaluation_model"):
        hhem.load(tmp_path / "nowhere")
    path = _copy(standin, tmp_path)
    (path / "foundation" / "tokenizer.json").unlink()
    with pytest.raises(SmoothkdError, match=r"foundation/tokenizer.json: missing; .*`hf download google/flan-t5-base "
                                            r"config.json tokenizer.json --local-dir .*hhem/foundation`"):
        hhem.load(path)
    shutil.rmtree(path / "foundation")
    with pytest.raises(SmoothkdError, match=r"foundation/config.json: missing"):
        hhem.load(path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    (path / "config.json").unlink()
    with pytest.raises(SmoothkdError, match=r"hhem/config.json: missing; .*hf download vectara/hallucination_evaluation"
                                            r"_model config.json model.safetensors --local-dir"):
        hhem.load(path)


def test_pickled_weights_are_refused(standin, tmp_path):
    path = _copy(standin, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(SmoothkdError, match=r"model.safetensors: missing \(pytorch_model.bin is a pickle, which "
                                            r"smoothkd does not load\)"):
        hhem.load(path)


def test_a_directory_that_is_not_hhem_is_refused(standin, tmp_path):
    path = _copy(standin, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(SmoothkdError, match=r"config.json: model_type 't5', expected one of HHEMv2, HHEMv2Config"):
        hhem.load(path)
    (path / "config.json").write_text(json.dumps({**config, "prompt": "Premise: {text1}", "foundation": ""}))
    with pytest.raises(SmoothkdError, match=r"not a template with exactly the fields \{text1\} and \{text2\}; "
                                            r"foundation '' is not a model name"):
        hhem.load(path)


def test_unexpected_missing_and_misshapen_weights_are_named(standin, tmp_path):
    path = _copy(standin, tmp_path)
    weights = load_file(path / "model.safetensors")
    extra = {**weights, "t5.transformer.decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32),
             "classifier.weight": torch.zeros(2, 32)}
    save_file(extra, path / "model.safetensors")
    with pytest.raises(SmoothkdError, match=r"2 unexpected keys: classifier.weight, "
                                            r"t5.transformer.decoder.block.0.layer.0.SelfAttention.q.weight"):
        hhem.load(path)
    save_file({k: v for k, v in weights.items() if k != "t5.classifier.bias"}, path / "model.safetensors")
    with pytest.raises(SmoothkdError, match=r"1 missing keys: t5.classifier.bias$"):
        hhem.load(path)
    save_file(weights, path / "model.safetensors")
    foundation = json.loads((path / "foundation" / "config.json").read_text())
    (path / "foundation" / "config.json").write_text(json.dumps({**foundation, "d_ff": 48}))
    with pytest.raises(SmoothkdError, match=r"tensors of the wrong shape: t5.transformer.encoder.block.0.layer.1."
                                            r"DenseReluDense.wi_0.weight \(64, 32\) \(expected \(48, 32\)\)"):
        hhem.load(path)


def test_load_fc_model_runs_no_code(standin):
    path, model = standin
    score = load_fc_model(str(path))
    assert score is not None and score(PAIRS[:2]) == pytest.approx(
        hhem_predict(model, path / "foundation" / "tokenizer.json", PAIRS[:2]), abs=1e-5)
    with pytest.raises(SmoothkdError, match=r"^--fc-model: .*nowhere: no such directory"):
        load_fc_model(str(path / "nowhere"))
    assert not (path / "code-ran").exists()


def test_evaluate_summarization_reports_the_standins_scores(standin, tiny_model, tmp_path):
    path, model = standin
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", "summarization", "--model", str(tiny_model), "--dataset", str(XSUM),
                                 "--limit", "2", "--max-new-tokens", "6", "--max-prompt-tokens", "300",
                                 "--no-lookback", "--fc-model", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    examples = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    # scored against the article as the model saw it (cut to fit), in HHEM's (premise, hypothesis) order
    tok = AutoTokenizer.from_pretrained(tiny_model)
    seen = [document_prompt(tok, a.text, DEFAULT_INSTRUCTION, 300)[1] for a in load_articles(str(XSUM), 2)]
    expected = hhem_predict(model, path / "foundation" / "tokenizer.json",
                            [(text, e["summary"]) for text, e in zip(seen, examples)])
    assert [e["hhem"] for e in examples] == pytest.approx(expected, abs=1e-5)
    assert metrics["metrics"]["hhem"] == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert not any("hhem" in n for n in metrics["notes"])


@pytest.mark.skipif(not os.environ.get("SMOOTHKD_HHEM_DIR"),
                    reason="the real HHEM-2.1-open files are not here: set SMOOTHKD_HHEM_DIR to a copy laid out as "
                           "smoothkd/evaluate/hhem.py says")
def test_real_hhem_gives_its_published_scores():
    """The scores that the test of HHEM's port to transformers (models/hhemv2 on a huggingface/transformers
    branch, tests/models/hhemv2) expects of the published weights for these pairs, to 4 decimals."""
    pairs = [PAIRS[0], PAIRS[1], PAIRS[2],
             ("A person on a horse jumps over a broken down airplane.", "A person is outdoors, on a horse."),
             ("A boy is jumping on skateboard in the middle of a red bridge.",
              "The boy skates down the sidewalk on a red bridge"),
             ("A man with blond-hair, and a brown shirt drinking out of a public water fountain.",
              "A blond man wearing a brown shirt is reading a book."),
             PAIRS[4]]
    scores = hhem.load(os.environ["SMOOTHKD_HHEM_DIR"])(pairs)
    assert [round(s, 4) for s in scores] == [0.0111, 0.6474, 0.1290, 0.8969, 0.1846, 0.0050, 0.0543]
