"""`smoothkd precompute teacher --ray-shards N`: the N shards of `--shard i/N` as Ray tasks.

Each task is an ordinary precompute run of one shard (parts i, i+N, ...), so resume, the
store contract and the result are those of N hand-started shards: the parts land in one
store that reads as a whole, nothing to merge. Ray connects to RAY_ADDRESS when set (a
cluster: the store must then be shared storage, s3:// or gs:// or a network file system),
else starts a local cluster. On a cluster with GPUs each task takes --tensor-parallel-size
GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from smoothkd.errors import SmoothkdError
from smoothkd.precompute.backends import BACKENDS
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import PartCounts, Summary


def _run_shard(cfg: PrecomputeConfig) -> Summary:
    from smoothkd.precompute.run import run

    return run(cfg, show_progress=False, log=lambda m: print(f"[shard {cfg.shard}] {m}", flush=True))


def run_on_ray(cfg: PrecomputeConfig, n_shards: int, log: Callable[[str], None] = print) -> Summary:
    """Run every shard as a Ray task; their summaries added up (seconds: the wall time of all)."""
    if n_shards < 1:
        raise SmoothkdError(f"--ray-shards must be at least 1, got {n_shards}")
    if cfg.shard != "0/1":
        raise SmoothkdError("--ray-shards runs every shard itself; do not pass --shard with it")
    if cfg.overwrite and n_shards > 1:
        raise SmoothkdError("--overwrite cannot be combined with --ray-shards N > 1: delete the old store first")
    cfg.validate(tuple(BACKENDS))
    try:
        import ray
    except ImportError as e:
        raise SmoothkdError(f"--ray-shards needs Ray: pip install 'smoothkd[ray]' ({e})") from e

    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    try:
        gpus_per_shard = float(cfg.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) else 0.0
        task = ray.remote(num_gpus=gpus_per_shard, num_cpus=1, max_retries=0)(_run_shard)
        refs = {task.remote(dataclasses.replace(cfg, shard=f"{i}/{n_shards}")): i for i in range(n_shards)}
        log(f"ray: {n_shards} shard task(s), {gpus_per_shard:g} GPU each, writing {cfg.out}")
        results: dict[int, Summary] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayError as e:  # the task raised, or its worker died (OOM, crash)
                cause = getattr(e, "cause", None)
                cause = cause if isinstance(cause, SmoothkdError) else e
                raise SmoothkdError(f"shard {i}/{n_shards} failed (the other shards' committed parts stay; "
                                    f"re-run the same command to finish): {cause}") from e
            log(f"ray: shard {i}/{n_shards} done ({len(results)} of {n_shards}): "
                f"{results[i].parts_written} part(s) written, {results[i].parts_skipped} already committed")
        return _add_up(cfg.out, [results[i] for i in range(n_shards)], time.perf_counter() - t0)
    finally:
        if started_here:
            ray.shutdown()


def _add_up(out: str, shards: list[Summary], seconds: float) -> Summary:
    return Summary.of(sum(shards, PartCounts()), out=out, seconds=seconds,
                      parts_written=sum(s.parts_written for s in shards),
                      parts_skipped=sum(s.parts_skipped for s in shards),
                      invalid_records=shards[0].invalid_records)  # every shard reads (and checks) all records
