"""Storage cost and precision of the store's label formats, measured in one run.

Runs `precompute teacher` (the product's own code) with the embedded SmolLM2-135M-Instruct teacher
(vocabulary 49,152) over the bundled Dolly sample once per format: format 2 top-k at k=64, adaptive
k (--min-prob / --top-p, capped at 64) and sampled labels (--samples 50). The teacher's logits are
computed once per sequence, alone (no padding: the float32 reference), and shared by every store.
For each store it prints bytes on disk per supervised token (every file counted, split by array),
and for top-k stores the largest difference between stored and float32 log-probs, the teacher mass
moved from kept entries to the tail, and how far the stored labels move the KD loss from the
full-distribution cross-entropy on held-out records (the teacher as its own student: the full loss
is its entropy). With --v1-store, the breakdown of a format 1 store of the same records beside it:

    git worktree add /tmp/v1 ef84010
    PYTHONPATH=/tmp/v1 smoothkd precompute teacher --dataset data/dolly/dolly_sample.jsonl --out /tmp/v1store --top-k 64
    python benchmarks/storage.py [--v1-store /tmp/v1store] [--limit 338]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from smoothkd.distill.losses import sampled as sampled_loss
from smoothkd.distill.losses import topk_tail
from smoothkd.batches import TeacherSampled, TeacherTopK
from smoothkd.models import resolve
from smoothkd.precompute.backends.hf import HFTeacher
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run
from smoothkd.precompute.topk import sampled_labels, topk_labels
from smoothkd.storage_schemas import SoftLabelStore, verify_store

REPO = Path(__file__).resolve().parents[1]


class CachedTeacher(HFTeacher):
    """The hf backend, scoring one sequence at a time (no padding) and keeping its float32 logits,
    so that every store of the run gets the same teacher and the reference is exact."""

    def __init__(self, location: str):
        super().__init__(location, dtype="float32", device="cpu")
        self.logits: dict[tuple[int, ...], torch.Tensor] = {}

    def _logits(self, tokens: list[int], prompt_len: int) -> torch.Tensor:
        key = tuple(tokens)
        if key not in self.logits:
            logits, rows = self.forward_logits([(tokens, prompt_len)])
            self.logits[key] = logits[0, rows[0]].float().clone()  # [n_labels, V]
        return self.logits[key]

    def score(self, sequences, top_k):
        return [topk_labels(self._logits(t, p).clone(), torch.tensor(t[p:]), top_k) for t, p in sequences]

    def sample(self, sequences, n_samples, seeds):
        return [sampled_labels(self._logits(t, p), torch.tensor(t[p:]), n_samples,
                               torch.Generator().manual_seed(seed)) for (t, p), seed in zip(sequences, seeds)]


def breakdown(out: Path) -> dict[str, int]:
    """Bytes on disk by array (every file of a part under its array), the tables, and the metadata."""
    by_kind: dict[str, int] = defaultdict(int)
    for f in out.rglob("*"):
        if f.is_file():
            rel = f.relative_to(out).parts
            kind = rel[2] if len(rel) > 3 else ("sequences.parquet" if rel[-1].endswith(".parquet") else "metadata")
            by_kind[kind] += f.stat().st_size
    return dict(by_kind)


def label_quality(store: SoftLabelStore, teacher: CachedTeacher) -> dict[str, float]:
    """Precision against float32, the mass moved to the tail, and the KD loss's distance from the
    full-distribution cross-entropy (held-out sequences; the teacher as student)."""
    worst = moved = n = 0.0
    diffs, full = [], []
    for i in range(store.n_sequences):
        s = store.sequence(i)
        logp = torch.log_softmax(teacher._logits(s.tokens.tolist(), s.prompt_len), -1)  # [n, V] float32
        lab = s.labels
        entropy = -(logp.exp() * logp).sum(-1)  # the full-distribution KD loss of the teacher as student
        if hasattr(lab, "logprobs"):
            valid = np.isfinite(lab.logprobs)
            exact = logp.gather(-1, torch.from_numpy(lab.ids)).numpy()
            worst = max(worst, float(np.abs(np.where(valid, lab.logprobs - exact, 0)).max()),
                        float(np.abs(lab.true_logprob - logp.gather(-1, torch.from_numpy(s.targets)[:, None])[:, 0]
                                     .numpy()).max()))
            top64 = logp.topk(valid.shape[1], -1).values.double().exp().sum(-1).numpy()
            moved += float((top64 - np.where(valid, np.exp(exact.astype(np.float64)), 0).sum(1)).sum())
            teacher_t = TeacherTopK(torch.from_numpy(lab.ids), torch.from_numpy(lab.logprobs), torch.from_numpy(lab.tail))
            kd = topk_tail(logp, teacher_t)
        else:
            teacher_t = TeacherSampled(torch.from_numpy(lab.ids), torch.from_numpy(lab.counts).float())
            kd = sampled_loss(logp, teacher_t)
        n += len(lab)
        if s.row["split"] == "heldout":
            diffs.append((kd - entropy).double().numpy())
            full.append(entropy.double().numpy())
    d = np.concatenate(diffs)
    return {"max_error": worst, "mass_moved": moved / n, "kd_minus_full": float(d.mean()),
            "kd_abs_error": float(np.abs(d).mean()), "full_kd": float(np.concatenate(full).mean()),
            "mean_entries": float(np.mean([store.read_part(p.name).n_entries.mean() for p in store.parts]))}


def report(name: str, out: Path, n_sup: int, quality: dict[str, float] | None, rows: list[dict]) -> None:
    sizes = breakdown(out)
    total = sum(sizes.values())
    print(f"\n{name}: {total / n_sup:.1f} B/token ({total:,} bytes, {n_sup:,} supervised tokens)")
    for kind, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20}{size / n_sup:>8.2f}")
    row = {"store": name, "bytes_per_token": total / n_sup, **(quality or {})}
    if quality:
        print("  " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))
    rows.append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=338, help="Dolly records (the bundled sample has 338)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--v1-store", type=Path, help="a format 1 store of the same records (see above)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    location = resolve(args.model)
    teacher = CachedTeacher(location)
    base = PrecomputeConfig(model=args.model, dataset=str(REPO / "data/dolly/dolly_sample.jsonl"), out="",
                            top_k=args.top_k, limit=args.limit, heldout_fraction=0.2)
    variants = [("format 2, top-k", {})]
    variants += [(f"adaptive, min-prob {p:g}", {"min_prob": p}) for p in (1e-4, 2e-4, 5e-4, 1e-3)]
    variants += [(f"adaptive, top-p {p:g}", {"top_p": p}) for p in (0.999, 0.99)]
    variants += [(f"sampled, {args.samples} draws", {"labels": "sampled", "samples": args.samples})]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, opts) in enumerate(variants):
            out = Path(tmp) / f"s{i}"
            run(dataclasses.replace(base, out=str(out), **opts), show_progress=i == 0, teacher=teacher)
            store = SoftLabelStore(str(out))
            assert verify_store(store).ok, name
            n_sup = store.n_supervised_tokens
            report(name, out, n_sup, label_quality(store, teacher), rows)
        if args.v1_store:
            old = SoftLabelStore(str(args.v1_store))
            assert old.manifest.schema_version == 1 and old.n_supervised_tokens == n_sup, \
                "--v1-store must hold the same records (format 1, --top-k as here)"
            report("format 1, top-k", args.v1_store, n_sup, None, rows)

    print(f"\n{'store':<28}{'B/token':>9}{'mean k':>8}{'mass moved':>12}{'KD - full':>11}{'|KD - full|':>12}"
          f"{'max err':>9}")
    for r in rows:
        print(f"{r['store']:<28}{r['bytes_per_token']:>9.1f}" + ("".join(
            f"{r[k]:>{w}.{p}}" for k, w, p in (("mean_entries", 8, "3g"), ("mass_moved", 12, "2e"),
                                               ("kd_minus_full", 11, "3e"), ("kd_abs_error", 12, "3e"),
                                               ("max_error", 9, "4f"))) if "mean_entries" in r else ""))
    print(f"full-distribution KD loss (held-out mean): {rows[0]['full_kd']:.4f} nats; goals: format 2 <= 135 B/token "
          "with every log-prob within 0.01 nats; adaptive <= 100 B/token with <= 1e-3 mass moved; sampled <= 30")


if __name__ == "__main__":
    main()
