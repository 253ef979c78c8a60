"""The `smoothkd evaluate` commands as functions of their configs: load what is named, evaluate,
write the evaluation directory (smoothkd/run_layout.py). The CLI and a sweep call these.

Modules that import torch are imported inside the functions that need them, so that `compare`
stays light.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from smoothkd.errors import SmoothkdError
from smoothkd.evaluate.compare import Comparison, compare as compare_runs
from smoothkd.evaluate.config import (
    CalibrationConfig, CompareConfig, FaithfulnessConfig, GeneralConfig, LookbackTrainConfig, SummarizationConfig,
    require,
)
from smoothkd.run_layout import EvalResult, resolve_eval_dir, write_eval

# (total, label) -> a context whose value advances the progress by n items.
Track = Callable[[int, str], ContextManager[Callable[[int], None]]]


@contextmanager
def no_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _result(kind: str, model: str, found: dict[str, Any], **extra: Any) -> EvalResult:
    """An evaluation function's dict (metrics, examples, notes, its own fields) as an EvalResult."""
    rest = {k: v for k, v in found.items() if k not in ("metrics", "examples", "notes")}
    return EvalResult(kind, model, found["metrics"], found.get("notes", []), found.get("examples", []),
                      {**rest, **extra})


def summarization(cfg: SummarizationConfig, track: Track = no_progress) -> EvalResult:
    """Greedy summaries, scored for ROUGE-L, unsupported entities/numbers, lookback ratio (and HHEM).

    With --backend vllm the engine starts before the transformers model loads (a failed start
    costs nothing more) and is stopped, its memory freed, before this returns, error or not."""
    from contextlib import nullcontext
    from functools import partial

    from smoothkd.evaluate.summarization import BATCH_SIZES, evaluate_summarization, generate_vllm, load_articles
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve
    from smoothkd.vllm_engine import Knobs, start_engine

    require(cfg)
    if cfg.backend not in BATCH_SIZES:
        raise SmoothkdError(f"--backend {cfg.backend!r} is not one of {', '.join(BATCH_SIZES)}")
    articles = load_articles(cfg.dataset, cfg.limit)
    target = resolve_eval_dir(cfg.model, "summarization", cfg.out)
    location = resolve(cfg.model)
    batch_size = cfg.batch_size or BATCH_SIZES[cfg.backend]
    tok = load_tokenizer(location)
    engine = start_engine(location, max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, batch_size=batch_size,
                          knobs=Knobs(length="--max-prompt-tokens or --max-new-tokens", kv_cache=None)
                          ) if cfg.backend == "vllm" else None
    with engine or nullcontext():
        needs_lm = engine is None or cfg.lookback
        lm = load_causal_lm(location, attn_implementation="eager" if cfg.lookback else None) if needs_lm else None
        with track(len(articles), f"summarizing ({cfg.backend})") as advance:
            found = evaluate_summarization(
                lm, tok, articles, max_new_tokens=cfg.max_new_tokens, batch_size=batch_size,
                instruction=cfg.instruction, max_prompt_tokens=cfg.max_prompt_tokens, fc_model=cfg.fc_model,
                lookback=cfg.lookback,
                lookback_classifier=cfg.lookback_classifier,
                summarize=partial(generate_vllm, engine) if engine else None, progress=advance)
    # what generated the summaries, and its cost: a vLLM engine's start-up counts in a model's
    found["generation"] = {"backend": cfg.backend, "batch_size": batch_size,
                           "engine_startup_s": engine.startup_s if engine else None, **found["generation"]}
    if cfg.pmi:
        # one fixed scorer for every model compared, on the article cut as it was validated
        scores = _pmi_scores(cfg.pmi_scorer, [(a.text, r["summary"]) for a, r in zip(articles, found["examples"])],
                             track)
        found["examples"] = [{**r, **s} for r, s in zip(found["examples"], scores)]
        from smoothkd.evaluate.pmi import mean_scores

        found["metrics"].update(mean_scores(scores))
        found["pmi"] = {"scorer": cfg.pmi_scorer}
    else:
        found["notes"].append("pmi: not computed (--no-pmi)")
    return write_eval(target, _result("summarization", cfg.model, found, dataset=cfg.dataset))


def _pmi_scores(scorer: str, pairs: list[tuple[str, str]], track: Track,
                max_article_tokens: int | None = None, batch_size: int = 8) -> list[dict[str, Any]]:
    from smoothkd.evaluate.pmi import DEFAULT_MAX_ARTICLE_TOKENS, score_summaries
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    location = resolve(scorer)
    tok, lm = load_tokenizer(location), load_causal_lm(location)
    with track(2 * len(pairs), "PMI (with, then without the article)") as advance:
        return score_summaries(lm, tok, pairs, max_article_tokens=max_article_tokens or DEFAULT_MAX_ARTICLE_TOKENS,
                               batch_size=batch_size,
                               progress=advance)


def lookback_train(cfg: LookbackTrainConfig, track: Track = no_progress) -> dict[str, Any]:
    """Train a Lookback Lens classifier for cfg.model and write it to cfg.out; the classifier."""
    from smoothkd.evaluate.lookback_classifier import train
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    require(cfg)
    pairs = Path(cfg.pairs)
    n = sum(1 for line in pairs.read_text().splitlines() if line.strip()) if pairs.is_file() else 0
    if not n:
        raise SmoothkdError(f"--pairs {pairs}: no such file, or empty")
    location = resolve(cfg.model)
    tok, lm = load_tokenizer(location), load_causal_lm(location, attn_implementation="eager")
    with track(n, "features") as advance:
        return train(lm, tok, pairs, Path(cfg.out), cfg.instruction, cfg.max_prompt_tokens, cfg.model,
                     progress=advance)


def faithfulness(cfg: FaithfulnessConfig, track: Track = no_progress) -> EvalResult:
    """Score given (article, summary) pairs, no generation; with cfg.pmi, also by token PMI under cfg.scorer."""
    from smoothkd.evaluate.faithfulness import score_pairs

    require(cfg)
    metrics, rows = score_pairs(cfg.pairs)
    extra: dict[str, Any] = {"pairs": cfg.pairs}
    notes = []
    if cfg.pmi:
        from smoothkd.evaluate.pmi import mean_scores

        scores = _pmi_scores(cfg.scorer, [(r["article"], r["summary"]) for r in rows], track,
                             cfg.max_article_tokens, cfg.batch_size)
        rows = [{**r, **s} for r, s in zip(rows, scores)]
        metrics.update(mean_scores(scores))
        extra["pmi"] = {"scorer": cfg.scorer, "max_article_tokens": cfg.max_article_tokens}
    else:
        notes.append("pmi: not computed (--no-pmi)")
    return write_eval(cfg.out, EvalResult("faithfulness", "", metrics, notes, rows, extra))


def general(cfg: GeneralConfig) -> EvalResult:
    """Multiple-choice accuracy (acc, acc_norm as lm-evaluation-harness defines them) by log-likelihood,
    scored by lm-eval itself or by smoothkd's builtin scorer (cfg.harness)."""
    from smoothkd.evaluate.general import evaluate_general, mean_acc_norm
    from smoothkd.evaluate.harness import evaluate_lm_eval, lm_eval_version
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    require(cfg)
    version = lm_eval_version()
    harness, notes = cfg.harness, []
    if harness == "auto":
        harness = "lm-eval" if version else "builtin"
        if not version:
            notes.append("lm-evaluation-harness is not installed (pip install 'smoothkd[lm-eval]'): scored by "
                         "smoothkd's builtin scorer, which follows lm-eval's definitions")
    if harness not in ("lm-eval", "builtin"):
        raise SmoothkdError(f"--harness {cfg.harness!r} is not one of lm-eval, builtin, auto")
    if harness == "lm-eval" and not version:  # before any model is loaded
        raise SmoothkdError("--harness lm-eval needs lm-evaluation-harness: pip install 'smoothkd[lm-eval]'")
    score = evaluate_lm_eval if harness == "lm-eval" else evaluate_general
    target = resolve_eval_dir(cfg.model, "general", cfg.out)

    def run(model: str) -> dict[str, Any]:
        location = resolve(model)
        return score(load_causal_lm(location), load_tokenizer(location), cfg.tasks, Path(cfg.data_dir),
                     limit=cfg.limit, batch_size=cfg.batch_size)

    found = run(cfg.model)
    metrics: dict[str, Any] = {**found["tasks"], "mean_acc_norm": mean_acc_norm(found["tasks"])}
    examples = found["examples"]
    extra: dict[str, Any] = {"harness": harness, **({"lm_eval_version": version} if harness == "lm-eval" else {})}
    if cfg.reference:
        ref = run(cfg.reference)
        metrics["forgetting"] = forgetting_by_task(ref["examples"], examples)
        examples = [{**e, "reference_pred_norm": r["pred_norm"]} for e, r in zip(examples, ref["examples"])]
        extra["reference"] = cfg.reference
    return write_eval(target, EvalResult("general", cfg.model, metrics, notes, examples, extra))


def forgetting_by_task(reference: list[dict[str, Any]], model: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task (and "all"): forgotten and learned shares of acc_norm outcomes, with 95% Wilson intervals."""
    import numpy as np

    from smoothkd.evaluate.stats import forgetting

    tasks = [e["task"] for e in model]
    was = np.array([r["pred_norm"] == r["gold"] for r in reference])
    now = np.array([e["pred_norm"] == e["gold"] for e in model])
    out = {}
    for task in [*dict.fromkeys(tasks), "all"]:
        m = np.ones(len(tasks), bool) if task == "all" else np.array(tasks) == task
        f = forgetting(was[m], now[m])

        def share(p: Any) -> dict[str, Any]:  # None where the reference had no such items (JSON has no NaN)
            return {"rate": p.rate, "ci": [p.ci_low, p.ci_high]} if p.n else {"rate": None, "ci": None}

        got, learned = share(f.forgotten), share(f.learned)
        out[task] = {"forgotten": got["rate"], "forgotten_ci": got["ci"], "learned": learned["rate"],
                     "learned_ci": learned["ci"], "n_reference_correct": f.forgotten.n}
    return out


def calibration(cfg: CalibrationConfig) -> EvalResult:
    """NLL, entropy, accuracy and expected calibration error (15 bins) of next-token predictions."""
    from smoothkd.evaluate.calibration import evaluate_calibration
    from smoothkd.models import load_causal_lm, resolve

    require(cfg)
    target = resolve_eval_dir(cfg.model, "calibration", cfg.out)
    lm = load_causal_lm(resolve(cfg.model))
    reference = load_causal_lm(resolve(cfg.reference)) if cfg.reference else None
    found = evaluate_calibration(lm, cfg.store, split=cfg.split, batch_size=cfg.batch_size, reference=reference,
                                 fit_temperature=cfg.fit_temperature)
    return write_eval(target, _result("calibration", cfg.model, found))


def compare(cfg: CompareConfig) -> Comparison:
    """Group runs by config; mean +- std per metric; the report and its plots in cfg.out."""
    require(cfg)
    return compare_runs([Path(r) for r in cfg.runs], Path(cfg.out), Path(cfg.reference) if cfg.reference else None)
