"""process_docs for the task configs beside this file: they turn the local files' schemas into what
lm-eval's own task definitions read. Called by lm-eval with a `datasets.Dataset`."""

from __future__ import annotations

from typing import Any

from smoothkd.evaluate.general import split_hellaswag_ctx


def hellaswag(dataset: Any) -> Any:
    """lm-eval's hellaswag process_docs, after recovering ctx_a/ctx_b in files that kept only `ctx`
    (as smoothkd's own reader does: smoothkd.evaluate.general.split_hellaswag_ctx)."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    if "ctx_a" not in dataset.column_names:
        dataset = dataset.map(lambda doc: dict(zip(("ctx_a", "ctx_b"), split_hellaswag_ctx(doc["ctx"]))))
    return process_docs(dataset)


def openbookqa(dataset: Any) -> Any:
    """llm-foundry's records (query, choices, gold) in the Hugging Face allenai/openbookqa schema
    (question_stem, choices {text, label}, answerKey)."""

    def to_hf(doc: dict) -> dict:
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        return {"question_stem": doc["query"], "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]]}

    return dataset.map(to_hf, remove_columns=dataset.column_names)
