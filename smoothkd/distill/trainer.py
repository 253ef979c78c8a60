"""`smoothkd distill student`: train a student from a store, no live teacher.

The step (`loss_step`) is pure; data order, logging, checkpoints and distribution live in the
phases of `run` (setup, resume, train, finish). Multi-process runs use torch.distributed
(`torchrun --nproc_per_node N -m smoothkd.cli distill student ...` or `accelerate launch`):
each rank reads its own slice of the store, DDP (or FSDP2 with --fsdp) averages gradients,
and a rank with one batch fewer pads its epoch with a zero-weight micro-batch, so that every
rank takes the same steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from smoothkd import __version__
from smoothkd.batches import Batch, StoreDataset
from smoothkd.distill import checkpoint
from smoothkd.distill.config import DistillConfig, _layer_range
from smoothkd.distill.losses import LOSS_LABELS, LOSSES, losses_from_hidden, losses_from_logits
from smoothkd.errors import SmoothkdError
from smoothkd.models import load_causal_lm, load_tokenizer, resolve, resolve_device_dtype, tokenizer_fingerprint
from smoothkd.run_layout import LOSS_LOG, RUN_FILE
from smoothkd.storage_schemas import SoftLabelStore
from smoothkd.tokens import pad_id



def loss_step(model: Any, batch: Batch, cfg: DistillConfig, n_step_tokens: float,
              keep_positions: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """L = (CE(hard) + alpha * KD) summed over the batch's supervised tokens / the step's count.

    With cfg.loss_chunk_tokens (and a model that takes logits_to_keep) the losses start from the
    final hidden states and run cfg.loss_chunk_tokens positions at a time: [chunk, V] float32, never
    [n, V]. Otherwise from the model's logits, [n, V] at once."""
    kd_loss = LOSSES[cfg.loss] if cfg.alpha > 0 else None
    if cfg.loss_chunk_tokens and keep_positions:
        hidden, weight, bias = _supervised_hidden_states(model, batch)  # [n, H], [V, H], [V] or None
        loss, ce, kd = losses_from_hidden(hidden, weight, bias, batch.targets, batch.teacher, kd_loss, cfg.alpha,
                                          cfg.temperature, cfg.loss_chunk_tokens)
    else:
        kwargs, supervised = {}, batch.supervised  # [b, L]
        if keep_positions:  # logits only where a response token is predicted
            keep = supervised.any(dim=0).nonzero().squeeze(-1)  # [K]
            kwargs["logits_to_keep"] = keep
            supervised = supervised[:, keep]  # [b, K]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs).logits
        logits = logits[supervised]  # [n, V], rows in the order of batch.targets
        ce, kd = losses_from_logits(logits, batch.targets, batch.teacher, kd_loss, cfg.temperature)
        loss = ce + cfg.alpha * kd
    n = max(batch.n_supervised, 1)
    return loss / n_step_tokens, {"ce": ce.item() / n, "kd": kd.item() / n}


def _supervised_hidden_states(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The final hidden states at the supervised positions [n, H] (rows in the order of
    batch.targets) and the output layer's weight [V, H] and bias, from a forward pass that
    computes logits at one position only.

    The call goes through `model` itself, so DDP's gradient hooks, FSDP's unsharding (the root
    unit, which holds the output layer, stays unsharded until backward) and peft's wrapper all
    run. That one position's logits check that this model's logits are its output layer applied
    to its last hidden states (not, e.g., soft-capped or scaled as Gemma 2 or Granite do)."""
    keep = batch.supervised.any(dim=0).nonzero().squeeze(-1)[:1]  # [1], or [0] when nothing is supervised
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                logits_to_keep=keep, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # [b, L, H], after the final norm (transformers ties it to last_hidden_state)
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = base.get_output_embeddings()
    plain = isinstance(head, torch.nn.Linear)
    if plain:
        with torch.no_grad():
            plain = torch.allclose(F.linear(hidden[:, keep], head.weight, head.bias), out.logits, rtol=1e-4, atol=1e-6)
    if not plain:
        raise SmoothkdError(f"--loss-chunk-tokens: the logits of {type(base).__name__} are not its output layer "
                            f"({type(head).__name__}) applied to its last hidden states (soft-capped or scaled?); "
                            "set --loss-chunk-tokens 0")
    return hidden[batch.supervised], head.weight, head.bias


def _freeze(model: Any, groups: list[str]) -> None:
    """Freeze named parameter groups (Llama-style names; tied embeddings freeze lm_head too)."""
    patterns = {"embed": ("embed_tokens",), "attn": ("self_attn.",), "mlp": (".mlp.",),
                "norm": ("norm.",), "lm_head": ("lm_head.",)}
    for group in groups:
        layers = _layer_range(group)
        keys = tuple(f"layers.{i}." for i in layers) if layers else patterns[group]
        # remove_duplicate=False: a tied lm_head.weight is listed under its own name too
        hit = [p for n, p in model.named_parameters(remove_duplicate=False) if any(k in n for k in keys)]
        if not hit:
            raise SmoothkdError(f"--freeze {group}: no parameter of this model matches {keys}")
        for p in hit:
            p.requires_grad_(False)


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _fsdp_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _shard(model: Any, device: str) -> None:
    """FSDP2: each transformer block is one unit of sharding (HF names them in _no_split_modules),
    the rest (embeddings, final norm, head, tied or not) the root unit. The shards land on
    `device`'s type (fully_shard moves a CPU-loaded module there)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise SmoothkdError(f"--fsdp: {type(model).__name__} names no transformer block class (_no_split_modules)")
    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    for m in units:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _training_state(model: Any, opt: Any, fsdp: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable weights and optimizer state, whole, on the CPU. With FSDP every rank must call
    this (it gathers the shards); rank 0 gets the result, the others empty dicts."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        params, optim = get_state_dict(model, opt, options=_fsdp_options())
        return {n: v for n, v in params.items() if n in trainable}, optim
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in trainable}, opt.state_dict()


def _load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, fsdp: bool) -> dict[str, Any]:
    """Load the checkpoint at `path` into the model, optimizer, schedule and random state; its trainer state."""
    saved = checkpoint.load(path)
    if fsdp:  # every rank reads the files; set_state_dict scatters each its shards
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, opt, model_state_dict=saved.params, optim_state_dict=saved.optimizer,
                       options=_fsdp_options(strict=False))
    else:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        bad = sorted(set(params) ^ set(saved.params)) + [
            n for n, v in saved.params.items() if n in params and v.shape != params[n].shape]
        if bad:
            raise SmoothkdError(f"{path}: its weights do not fit this student's trainable parameters "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        with torch.no_grad():
            for name, value in saved.params.items():
                params[name].copy_(value)
        try:
            opt.load_state_dict(saved.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SmoothkdError(f"{path}: its optimizer state does not fit this student ({e})") from e
    sched.load_state_dict(saved.scheduler)
    torch.set_rng_state(saved.rng)
    return saved.trainer


def _store_identity(store: SoftLabelStore) -> dict[str, Any]:
    m = store.manifest
    return {"url": store.url, "schema_version": m.schema_version, "label_kind": m.label_kind,
            "selection": m.selection, "teacher": m.teacher, "top_k": m.top_k,
            "tokenizer": m.tokenizer, "dataset": m.dataset, "created": m.created}


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun / accelerate launch; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, local


# What a resumed run must share with the run it continues: every option not marked resume=False.
_RESUME_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.metadata["resume"])


def _run_identity(cfg: DistillConfig, world: int) -> dict[str, Any]:
    return {**{k: getattr(cfg, k) for k in _RESUME_KEYS}, "world_size": world}


@dataclasses.dataclass(frozen=True)
class DistillResult:
    """What one call of `run` did."""

    steps: int  # optimizer steps the run has reached, those of the run it resumed included
    epochs_started: int
    seconds: float  # of this call's training loop
    supervised_tokens: int  # trained on in this call, by this process
    last: dict[str, Any]  # the last step's log record less its sequence ids; {} when no step ran


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases of one run share (built by `_setup`)."""

    cfg: DistillConfig
    out: Path
    log_path: Path  # this process's training log
    rank: int
    world: int
    store: SoftLabelStore
    tokenizer: Any
    model: Any  # the student: peft-wrapped with --lora, sharded in place with --fsdp
    device: torch.device
    keep_positions: bool  # the model can compute logits at the supervised positions only
    data: StoreDataset
    rank0_batches: int  # micro-batches per epoch on every rank: rank 0 has the most, the others pad
    total: int  # optimizer steps of the whole run
    trainable: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR


def run(cfg: DistillConfig, show_progress: bool = True, log: Callable[[str], None] = print) -> DistillResult:
    """Train the student on the store's soft labels into cfg.out (with --resume: on from its last checkpoint)."""
    cfg.validate(tuple(LOSSES))
    rank, world, local_rank = _distributed()
    store = _open_store(cfg)
    if rank == 0:  # a swap that a kill interrupted, finished or rolled back before any rank reads it
        with checkpoint.writing(Path(cfg.out)):
            checkpoint.recover(Path(cfg.out))
    if world > 1:
        torch.distributed.barrier()
    identity = _run_identity(cfg, world)
    resume_from = _checkpoint_to_resume(cfg, identity)
    r = _setup(cfg, store, rank, world, local_rank)
    state = _resume(r, resume_from, identity, log)
    result = _train(r, state, show_progress)
    _finish(r, result)
    return result


def _open_store(cfg: DistillConfig) -> SoftLabelStore:
    store = SoftLabelStore(cfg.store)
    store.check()  # a damaged store is refused before anything loads (its chunks are checked as read)
    if store.missing_parts and not cfg.allow_incomplete_store:
        raise SmoothkdError(f"{cfg.store} is incomplete ({len(store.missing_parts)} of {store.expected_parts} parts "
                            "missing); finish the precompute run, or pass --allow-incomplete-store")
    kind = store.manifest.label_kind
    if cfg.alpha > 0 and LOSS_LABELS[cfg.loss] != kind:
        fits = [name for name, k in LOSS_LABELS.items() if k == kind]
        raise SmoothkdError(f"--loss {cfg.loss} reads {LOSS_LABELS[cfg.loss]} labels; {cfg.store} holds {kind} labels: "
                            f"pass --loss {' or --loss '.join(fits)}")
    if cfg.alpha > 0 and kind == "sampled" and cfg.temperature != 1.0:
        raise SmoothkdError(f"--temperature {cfg.temperature}: sampled labels are draws from the teacher at "
                            "temperature 1 and estimate nothing else; leave --temperature at 1")
    return store


def _checkpoint_to_resume(cfg: DistillConfig, identity: dict[str, Any]) -> Path | None:
    """The checkpoint --resume continues, checked before anything loads: a changed option can
    change the saved state's layout."""
    out = Path(cfg.out)
    found = checkpoint.latest(out)
    if ((out / RUN_FILE).exists() or found is not None) and not cfg.resume:
        raise SmoothkdError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if found is None or not cfg.resume:
        return None
    saved = checkpoint.read_trainer_state(found)["run"]
    # An option added since that run was saved had its default then.
    saved = {**dataclasses.asdict(DistillConfig()), **saved}
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise SmoothkdError(f"--resume with options that differ from the run in {out}:\n  " + "\n  ".join(changed))
    return found


def _load_student(cfg: DistillConfig, store: SoftLabelStore, world: int,
                  local_rank: int) -> tuple[Any, Any, str, bool]:
    """(tokenizer, model with its groups frozen or its LoRA adapters, device name, whether the model
    takes logits_to_keep), after checking that the student fits the store's labels."""
    location = resolve(cfg.model)
    tokenizer = load_tokenizer(location)
    want, have = store.manifest.tokenizer.get("fingerprint"), tokenizer_fingerprint(tokenizer)
    if want != have:
        raise SmoothkdError(f"the student's tokenizer ({cfg.model}) differs from the one the store was built with "
                            f"(fingerprint {have[:12]} vs {want[:12]}); soft labels are per token id, so the student "
                            "must share the teacher's tokenizer")
    torch.manual_seed(cfg.seed)
    device_name = cfg.device
    if world > 1 and device_name == "auto" and torch.cuda.is_available():
        device_name = f"cuda:{local_rank}"  # one GPU per process
    device_name, dtype = resolve_device_dtype(device_name, cfg.dtype)
    # FSDP: each rank loads the whole student into host memory and fully_shard moves only its
    # shards to the GPU, one block at a time, so the student need not fit one GPU.
    model = load_causal_lm(location, dtype=dtype, device="cpu" if cfg.fsdp else device_name)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < store.manifest.vocab_size:
        raise SmoothkdError(f"the student's vocabulary ({vocab}) is smaller than the store's ({store.manifest.vocab_size})")
    keep_positions = "logits_to_keep" in inspect.signature(model.forward).parameters  # before peft wraps forward
    _freeze(model, cfg.freeze)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return tokenizer, model, device_name, keep_positions


def _setup(cfg: DistillConfig, store: SoftLabelStore, rank: int, world: int, local_rank: int) -> _Run:
    """The student, its data and its optimizer, in a fixed order (the seed's draws, LoRA's
    initialisation, come before a resumed run restores the random state)."""
    tokenizer, model, device_name, keep_positions = _load_student(cfg, store, world, local_rank)
    data = StoreDataset(store, list(cfg.sources), pad_id=pad_id(tokenizer))
    # Rank 0 has the most batches; a rank with one fewer pads its epoch with a zero-weight
    # micro-batch, so that every rank takes the same steps and DDP's all-reduces pair up.
    rank0_batches = len(data.batches(0, cfg.seed, cfg.batch_size, 0, world, cfg.group_by_length))
    if len(data) < world:
        raise SmoothkdError(f"{len(data)} sequences cannot be spread over {world} processes")
    total = cfg.max_steps or cfg.epochs * math.ceil(rank0_batches / cfg.grad_accum)
    if not any(p.requires_grad for p in model.parameters()):
        raise SmoothkdError("--freeze left no parameter to train")
    if cfg.fsdp:
        if world < 2:
            raise SmoothkdError("--fsdp shards the student over processes: start it under torchrun or "
                                "accelerate launch with 2 or more")
        _shard(model, device_name)  # before the optimizer: it must hold the sharded parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup_steps))
    out = Path(cfg.out)
    return _Run(cfg=cfg, out=out, log_path=out / (LOSS_LOG if rank == 0 else f"log-rank{rank}.jsonl"), rank=rank,
                world=world, store=store, tokenizer=tokenizer, model=model, device=torch.device(device_name),
                keep_positions=keep_positions, data=data, rank0_batches=rank0_batches, total=total,
                trainable=trainable, opt=opt, sched=sched)


def _resume(r: _Run, resume_from: Path | None, identity: dict[str, Any],
            log: Callable[[str], None]) -> dict[str, Any]:
    """The trainer state to start from: a fresh one, or the checkpoint's (its weights, optimizer,
    schedule and random state loaded into r's)."""
    state = {"step": 0, "epoch": 0, "batches_done": 0, "run": identity}
    if resume_from is not None:
        state = _load_checkpoint(resume_from, r.model, r.opt, r.sched, r.cfg.fsdp)
        log(f"resuming {r.out} at step {state['step']} (epoch {state['epoch']}, batch {state['batches_done']})")
    with checkpoint.writing(r.out):
        r.out.mkdir(parents=True, exist_ok=True)
        _trim_log(r.log_path, state["step"])
    return state


def _trim_log(path: Path, step: int) -> None:
    """Make the log hold exactly the steps the weights have seen: steps a killed run logged after its
    checkpoint are dropped (and run again), as is a last line the kill cut short. The new log
    replaces the old in one rename, so a kill here loses no earlier step's line."""
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines):
                break
            raise SmoothkdError(f"{path}:{i}: not a training log record ({e}); the log is damaged: remove the "
                                "line, or start a new run") from e
        if logged <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        checkpoint.write_atomic(path, "".join(kept).encode())


def _train(r: _Run, state: dict[str, Any], show_progress: bool) -> DistillResult:
    """Optimizer steps from `state` to the run's total: each logged, a checkpoint every save_every."""
    step_model = r.model
    if r.world > 1 and not r.cfg.fsdp:  # DDP wraps the weights _resume loaded
        step_model = torch.nn.parallel.DistributedDataParallel(
            r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress or r.rank != 0)
    started, tokens_seen, last = time.perf_counter(), 0, {}
    r.model.train()
    with checkpoint.writing(r.log_path):
        log_file = open(r.log_path, "a")
    with progress, log_file:
        task = progress.add_task("distill", total=r.total, completed=state["step"], info="")
        while state["step"] < r.total:
            for group in _rest_of_epoch(r, state):
                t0 = time.perf_counter()
                micro = [(r.data.load(b).to(r.device), w) for b, w in group]
                sums, n_tok = _gradients(r, step_model, micro)
                if not _finite_on_every_rank(r, sums["loss"]):  # before the update: the weights stay finite
                    raise SmoothkdError(_non_finite_loss(r, state["step"] + 1, sums["loss"]))
                _update(r)
                state["step"] += 1
                state["batches_done"] += len(micro)
                tokens_seen += n_tok
                last = {"step": state["step"], "epoch": state["epoch"], **sums, "lr": r.sched.get_last_lr()[0],
                        "supervised_tokens": n_tok, "tokens_per_s": n_tok / (time.perf_counter() - t0),
                        "seqs": [s for b, w in micro if w for s in b.seqs]}
                with checkpoint.writing(r.log_path):
                    log_file.write(json.dumps(last) + "\n")
                    log_file.flush()
                progress.update(task, advance=1, info=f"loss {sums['loss']:.3f} ce {sums['ce']:.3f} "
                                                      f"kd {sums['kd']:.3f} {last['tokens_per_s']:,.0f} tok/s")
                if state["step"] % r.cfg.save_every == 0 or state["step"] == r.total:
                    with checkpoint.writing(r.log_path):
                        os.fsync(log_file.fileno())  # the steps the checkpoint holds are logged for good
                    _checkpoint(r, state)
                if state["step"] >= r.total:
                    break
            else:
                state["epoch"] += 1
                state["batches_done"] = 0
    return DistillResult(steps=state["step"], epochs_started=state["epoch"] + 1, seconds=time.perf_counter() - started,
                         supervised_tokens=tokens_seen, last={k: v for k, v in last.items() if k != "seqs"})


def _rest_of_epoch(r: _Run, state: dict[str, Any]) -> list[list[tuple[Any, float]]]:
    """This rank's micro-batches from state's place in its epoch, grouped by optimizer step;
    weight 0 marks the padding of a rank with fewer batches than rank 0."""
    mine = r.data.batches(state["epoch"], r.cfg.seed, r.cfg.batch_size, r.rank, r.world, r.cfg.group_by_length)
    padded = [(b, 1.0) for b in mine] + [(mine[-1], 0.0)] * (r.rank0_batches - len(mine))
    rest = padded[state["batches_done"] :]
    return [rest[i : i + r.cfg.grad_accum] for i in range(0, len(rest), r.cfg.grad_accum)]


def _gradients(r: _Run, step_model: Any, micro: list[tuple[Batch, float]]) -> tuple[dict[str, float], int]:
    """One optimizer step's gradients over weighted micro-batches: (ce, kd and loss per supervised
    token of this rank, that token count)."""
    n_tok = sum(b.n_supervised for b, w in micro if w)
    # DDP averages gradients over ranks: scale by world / global count, so the step's
    # gradient is that of the token mean over every rank's supervised tokens.
    n_global = torch.tensor(float(n_tok))
    if r.world > 1:
        n_global = n_global.to(r.device)
        torch.distributed.all_reduce(n_global)
    denom = float(n_global) / r.world
    sums = {"ce": 0.0, "kd": 0.0, "loss": 0.0}
    for b, w in micro:
        loss, stats = loss_step(step_model, b, r.cfg, denom, r.keep_positions)
        (loss * w).backward()
        if w:
            sums["loss"] += loss.item() * denom / max(n_tok, 1)
            for k in ("ce", "kd"):
                sums[k] += stats[k] * b.n_supervised / max(n_tok, 1)
    return sums, n_tok


def _update(r: _Run) -> None:
    if r.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(r.trainable, r.cfg.max_grad_norm)
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)


def _finite_on_every_rank(r: _Run, loss: float) -> bool:
    """Whether every rank's loss is finite (all ranks must agree to stop, or the others would hang)."""
    bad = torch.tensor(float(not math.isfinite(loss)))
    if r.world > 1:
        bad = bad.to(r.device)
        torch.distributed.all_reduce(bad)
    return not bad.item()


def _non_finite_loss(r: _Run, step: int, loss: float) -> str:
    found = checkpoint.latest(r.out)
    last = (f"The last good checkpoint is {found} (step {checkpoint.read_trainer_state(found)['step']})"
            if found else "No checkpoint was saved before it")
    return (f"step {step}: the loss is not finite (this process's: {loss}); the run stopped before updating the "
            f"weights and saved no model. {last}. Start a new run with other options: a lower --lr, a "
            "--temperature nearer 1, a --max-grad-norm")


def _checkpoint(r: _Run, state: dict[str, Any]) -> None:
    if r.cfg.fsdp or r.rank == 0:  # FSDP gathers on every rank
        params, optim = _training_state(r.model, r.opt, r.cfg.fsdp)
    if r.rank == 0:
        checkpoint.save(r.out, checkpoint.Checkpoint(params, optim, r.sched.state_dict(), torch.get_rng_state(),
                                                     state))


def _finish(r: _Run, result: DistillResult) -> None:
    """The final weights and run record; a finished run resumed (no step ran) keeps its record."""
    if result.last or not (r.out / RUN_FILE).exists():
        full = _gathered_weights(r.model) if r.cfg.fsdp else None  # gathered on every rank, saved by rank 0
        if r.rank == 0:
            with checkpoint.writing(r.out):
                _save_final(r.out, r.model, r.tokenizer, r.cfg, r.store, result, full)
    if r.world > 1:
        torch.distributed.barrier()


def _gathered_weights(model: Any) -> dict[str, torch.Tensor]:
    """A sharded (FSDP) model's whole weights; every rank must call this."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_fsdp_options())
    # Tied weights come back as separate copies under each name: keep one, as HF does.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in full.items() if k not in aliases}


def _save_final(out: Path, model: Any, tokenizer: Any, cfg: DistillConfig, store: SoftLabelStore,
                result: DistillResult, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A normal Hugging Face checkpoint in `out` (merged, with --lora), plus the run record.
    `state_dict`: the gathered weights of a sharded (FSDP) model."""
    if cfg.lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    record = {"config": dataclasses.asdict(cfg), "store": _store_identity(store),
              "summary": dataclasses.asdict(result), "tool": {"name": "smoothkd", "version": __version__}}
    # Written last and in one rename: a run whose record is there has its whole final model.
    checkpoint.write_atomic(out / RUN_FILE, json.dumps(record, indent=2, default=str).encode())
