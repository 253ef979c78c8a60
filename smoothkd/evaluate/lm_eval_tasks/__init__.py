"""lm-evaluation-harness task configs for `smoothkd evaluate general --harness lm-eval`: lm-eval's own
ARC, HellaSwag and OpenBookQA definitions, read from local JSONL files (smoothkd.evaluate.harness
points them at the files given at run time)."""
