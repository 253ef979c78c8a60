#!/usr/bin/env bash
# The pipeline on the bundled samples with the embedded SmolLM2-135M-Instruct: stage one
# (teacher soft labels), an SFT run and a KD run from the same store, both evaluated
# (XSum summaries, held-out calibration) and compared in a report.
# Run through `make demo`, which installs everything first. A few minutes on a laptop CPU.
# Re-running it resumes: committed store parts and finished runs are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
LIMIT=${LIMIT:-64}
STEPS=${STEPS:-4}

smoothkd precompute teacher \
  --model smollm2-135m-instruct \
  --dataset data/dolly/dolly_sample.jsonl \
  --limit "$LIMIT" --top-k 64 --augment greedy --max-new-tokens 64 --heldout-fraction 0.2 \
  --out "$OUT/store"
echo
smoothkd store verify "$OUT/store"
smoothkd store info "$OUT/store"
echo
# alpha 0 is the SFT baseline: the same batches in the same order as the KD run.
for alpha in 0 0.1; do
  smoothkd distill student --model smollm2-135m-instruct --store "$OUT/store" --alpha "$alpha" \
    --sources original,teacher_greedy --max-steps "$STEPS" --batch-size 2 --lr 1e-5 --resume \
    --out "$OUT/runs/alpha-$alpha"
done
for alpha in 0 0.1; do
  run="$OUT/runs/alpha-$alpha"
  smoothkd evaluate summarization --model "$run" --dataset data/xsum/xsum_sample.jsonl \
    --limit "${ARTICLES:-3}" --max-new-tokens 48
  smoothkd evaluate calibration --model "$run" --store "$OUT/store"
  smoothkd evaluate general --model "$run" --data-dir data/general --limit "${ITEMS:-10}"
done
smoothkd evaluate compare "$OUT/runs/alpha-0" "$OUT/runs/alpha-0.1" --out "$OUT/report"
echo
echo "store: $OUT/store; checkpoints: $OUT/runs/alpha-0 (SFT), $OUT/runs/alpha-0.1 (KD); report: $OUT/report/report.html"
