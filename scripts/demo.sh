#!/usr/bin/env bash
# The whole experiment loop on the bundled samples with the embedded SmolLM2-135M-Instruct, as one
# sweep (examples/demo-sweep.yaml): the teacher fine-tuned briefly, its store with greedy
# responses, an SFT and a KD run from that store on the same batches, every run and the start
# model evaluated (XSum summaries, general tasks, held-out calibration), and the report with
# paired verdicts. Run through `make demo`, which installs everything first.
# Re-running it resumes: finished steps are skipped, a killed step resumes where it left off.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-examples/demo-sweep.yaml}

smoothkd sweep run "$SWEEP" --dry-run
smoothkd sweep run "$SWEEP"
echo
store=$(ls -d demo-out/sweep/steps/store-*/store | head -1)
smoothkd store verify "$store"
smoothkd store info "$store"
echo
echo "steps: demo-out/sweep/steps/ (each with step.json and log.txt); report: $(ls -d demo-out/sweep/steps/report-*)/report.html"
