#!/usr/bin/env bash
# Stage one on the bundled Dolly sample with the embedded SmolLM2-135M-Instruct teacher.
# Run through `make demo`, which installs everything first. A few minutes on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out/store}
LIMIT=${LIMIT:-64}

smoothkd precompute teacher \
  --model smollm2-135m-instruct \
  --dataset data/dolly/dolly_sample.jsonl \
  --limit "$LIMIT" --top-k 64 --augment greedy --max-new-tokens 64 \
  --out "$OUT"
echo
smoothkd store verify "$OUT"
smoothkd store info "$OUT"
echo "the store is in $OUT"
