"""Cost of the KD term, of online KD, and the store reader's headroom, measured in one run.

On the embedded SmolLM2-135M-Instruct (student, and teacher of its own store):
  kd overhead   median step time with alpha=0.1 / with alpha=0 on the same batches,
                steps alternating so that drift hits both; peak memory of each in its own
                process (peak RSS on CPU, max allocated on GPU) and their ratio;
  online KD     the same step with the teacher run live (forward, top-k of its logits),
                as online distillation does, / the offline step that reads the store;
  reader        supervised tokens per second the store reader delivers (decode and
                collate the epoch's batches) / tokens per second the trainer consumes.

    python benchmarks/distill.py [--records 32] [--steps 8] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smoothkd.batches import Batch, StoreDataset, TeacherTopK
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import loss_step
from smoothkd.models import load_causal_lm, resolve
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run as precompute
from smoothkd.precompute.topk import topk_labels
from smoothkd.storage_schemas import SoftLabelStore

REPO = Path(__file__).resolve().parents[1]


def timed_step(model, batch: Batch, cfg: DistillConfig, opt) -> float:
    t0 = time.perf_counter()
    loss, _ = loss_step(model, batch, cfg, batch.n_supervised, keep_positions=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def online_batch(teacher, batch: Batch, k: int) -> Batch:
    """The batch's soft labels recomputed by a live teacher, as online KD does every step."""
    with torch.inference_mode():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lab = topk_labels(logits[batch.supervised], batch.targets, k)
    dev = batch.input_ids.device
    t = TeacherTopK(torch.from_numpy(lab.ids).to(dev), torch.from_numpy(lab.logprobs).to(dev),
                    torch.from_numpy(lab.tail).to(dev))
    return Batch(batch.seqs, batch.input_ids, batch.attention_mask, batch.supervised, batch.targets, t)


def peak_memory(store: str, alpha: float, steps: int, batch_size: int, model: str) -> int:
    """Peak memory of a short training run in a fresh process (bytes)."""
    code = f"""
import resource, torch, json
from smoothkd.distill.config import DistillConfig
from smoothkd.batches import StoreDataset
from smoothkd.distill.trainer import loss_step
from smoothkd.models import load_causal_lm, resolve
from smoothkd.storage_schemas import SoftLabelStore
cfg = DistillConfig(alpha={alpha})
model = load_causal_lm(resolve({model!r}))
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
data = StoreDataset(SoftLabelStore({store!r}), ["original"])
dev = next(model.parameters()).device
for b in data.batches(0, 0, {batch_size})[:{steps}]:
    batch = data.load(b).to(dev)
    loss, _ = loss_step(model, batch, cfg, batch.n_supervised, keep_positions=True)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(peak))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store_url = str(Path(tmp) / "store")
        precompute(PrecomputeConfig(model=args.model, dataset=str(REPO / "data/dolly/dolly_sample.jsonl"),
                                    out=store_url, top_k=args.top_k, limit=args.records, max_length=512),
                   show_progress=False)
        data = StoreDataset(SoftLabelStore(store_url), ["original"])
        batch_ids = data.batches(0, 0, args.batch_size)

        # Reader: decode + collate every batch of the epoch, twice (a cold and a warm pass).
        t0 = time.perf_counter()
        for _ in range(2):
            n_read = sum(data.load(b).n_supervised for b in batch_ids)
        read_rate = 2 * n_read / (time.perf_counter() - t0)

        student = load_causal_lm(resolve(args.model))
        teacher = load_causal_lm(resolve(args.model)).eval()
        device = next(student.parameters()).device
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        sft, kd, online = DistillConfig(alpha=0.0), DistillConfig(alpha=0.1), DistillConfig(alpha=0.1)
        times: dict[str, list[float]] = {"sft": [], "kd": [], "online": []}
        tokens = 0
        timed_step(student, data.load(batch_ids[0]).to(device), kd, opt)  # warm-up
        for i in range(args.steps):
            batch = data.load(batch_ids[1 + i % (len(batch_ids) - 1)]).to(device)
            tokens += batch.n_supervised
            # alternate which goes first: the first step on a new batch pays its allocations
            for name in (("sft", "kd") if i % 2 == 0 else ("kd", "sft")):
                times[name].append(timed_step(student, batch, sft if name == "sft" else kd, opt))
            t0 = time.perf_counter()
            live = online_batch(teacher, batch, args.top_k)
            times["online"].append(time.perf_counter() - t0 + timed_step(student, live, online, opt))
        train_rate = tokens / sum(times["kd"])
        mem_sft = peak_memory(store_url, 0.0, 3, args.batch_size, args.model)
        mem_kd = peak_memory(store_url, 0.1, 3, args.batch_size, args.model)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.steps} steps per setting, batch {args.batch_size}, top-k {args.top_k}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"median step: alpha=0 {med['sft']:.3f} s, alpha=0.1 {med['kd']:.3f} s, online KD {med['online']:.3f} s")
    print(f"KD overhead, step time alpha=0.1 / alpha=0 = {med['kd'] / med['sft']:.3f}  (target <= 1.05)")
    print(f"KD overhead, peak memory alpha=0.1 / alpha=0 = {mem_kd / mem_sft:.3f}  "
          f"({mem_kd / 2**20:,.0f} / {mem_sft / 2**20:,.0f} MiB; target <= 1.10)")
    print(f"online / offline step time (same teacher run live) = {med['online'] / med['kd']:.3f}")
    print(f"reader {read_rate:,.0f} supervised tok/s vs trainer {train_rate:,.0f} tok/s: "
          f"{read_rate / train_rate:,.0f}x  (target >= 20)")


if __name__ == "__main__":
    main()
