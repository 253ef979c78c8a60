"""The arithmetic behind README's "When each mode pays off": store size and teacher GPU-hours.

Measured here: tokens per Dolly record (prompt and response, with the embedded model's
tokenizer and chat template) over the bundled sample. Taken from other benchmarks: bytes per
supervised token at k=64 (benchmarks/storage.py) and generated tokens per record with
--max-new-tokens 64 (benchmarks/vllm_backend.py). Assumed, and printed as such: 2 FLOPs per
parameter per scored token, at --mfu of an H100's 989 TFLOP/s bf16 peak.

    python benchmarks/scale.py [--bytes-per-token 148.7] [--greedy-tokens 59.2] [--mfu 0.4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smoothkd.models import load_tokenizer, resolve
from smoothkd.precompute.prompts import PromptFormatter
from smoothkd.precompute.records import load_records

REPO = Path(__file__).resolve().parents[1]
DOLLY_RECORDS = 15_011  # databricks-dolly-15k
H100_BF16_FLOPS = 989e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes-per-token", type=float, default=148.7, help="benchmarks/storage.py, k=64")
    ap.add_argument("--greedy-tokens", type=float, default=59.2, help="generated tokens per record (vllm_backend.py)")
    ap.add_argument("--mfu", type=float, default=0.4)
    args = ap.parse_args()

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    fmt = PromptFormatter(tok, {tok.eos_token_id})
    records = load_records(str(REPO / "data" / "dolly" / "dolly_sample.jsonl")).records
    prompt = response = 0
    for r in records:
        p = fmt.prompt_ids(r)
        prompt += len(p)
        response += len(fmt.response_ids(r, p, r.response))
    per_prompt, per_response = prompt / len(records), response / len(records)
    print(f"bundled Dolly sample: {len(records)} records, {per_prompt + per_response:.1f} tokens per record "
          f"({per_response:.1f} response)")

    rate = {n: H100_BF16_FLOPS * args.mfu / (2 * n) for n in (8e9, 70e9)}  # scored tokens/s per GPU
    print(f"assumed scoring rate per H100 at {args.mfu:.0%} MFU: 8B {rate[8e9]:,.0f} tok/s, 70B {rate[70e9]:,.0f} tok/s")
    rows = [
        ("Dolly 15k, original responses", DOLLY_RECORDS * (per_prompt + per_response), DOLLY_RECORDS * per_response),
        ("Dolly 15k + greedy responses", DOLLY_RECORDS * (2 * per_prompt + per_response + args.greedy_tokens),
         DOLLY_RECORDS * (per_response + args.greedy_tokens)),
        ("1 B supervised tokens (scored: 1 B)", 1e9, 1e9),
    ]
    print(f"{'corpus':40} {'scored tok':>12} {'supervised':>12} {'store GB':>9} {'8B GPU-h':>9} {'70B GPU-h':>10}")
    for name, scored, supervised in rows:
        print(f"{name:40} {scored:12,.0f} {supervised:12,.0f} {supervised * args.bytes_per_token / 1e9:9.2f} "
              f"{scored / rate[8e9] / 3600:9.2f} {scored / rate[70e9] / 3600:10.2f}")


if __name__ == "__main__":
    main()
