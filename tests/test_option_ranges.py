"""Every numeric option finite and in range, checked by its config's validation, every problem in one
message (a NaN passes a check that only compares, such as `x < 0`)."""

from __future__ import annotations

from typing import Any

import pytest

from smoothkd.distill.config import DistillConfig
from smoothkd.errors import SmoothkdError
from smoothkd.evaluate.config import CalibrationConfig, GeneralConfig, LookbackTrainConfig, SummarizationConfig, require
from smoothkd.precompute.config import PrecomputeConfig

NAN, INF = float("nan"), float("inf")


def problems(make: Any, **kw: Any) -> str:
    with pytest.raises(SmoothkdError, match="invalid options") as e:
        make(**kw)
    return str(e.value)


def distill(**kw: Any) -> None:
    DistillConfig(store="s", out="o", **kw).validate(("topk_tail",))


def precompute(**kw: Any) -> None:
    PrecomputeConfig(dataset="d", out="o", **kw).validate(("hf",))


@pytest.mark.parametrize("field,value", [
    ("alpha", NAN), ("alpha", INF), ("alpha", -0.5), ("temperature", INF), ("temperature", NAN), ("temperature", 0.0),
    ("lr", NAN), ("lr", INF), ("lr", 0.0), ("lr", 2.0), ("weight_decay", NAN), ("weight_decay", -1.0),
    ("max_grad_norm", NAN), ("max_grad_norm", INF), ("max_grad_norm", -1.0), ("warmup_steps", -1),
    ("batch_size", 0), ("batch_size", NAN), ("grad_accum", 0), ("epochs", 0), ("max_steps", 0), ("save_every", 0),
    ("lora_rank", 0), ("seed", -1),
])
def test_distill_refuses(field, value):
    assert f"--{field.replace('_', '-')} must be" in problems(distill, **{field: value})


@pytest.mark.parametrize("field,value", [
    ("heldout_fraction", NAN), ("heldout_fraction", INF), ("heldout_fraction", 1.0), ("heldout_fraction", -0.1),
    ("top_k", 0), ("top_k", NAN), ("part_size", 0), ("max_new_tokens", 0), ("batch_size", 0), ("limit", 0),
    ("max_length", 1), ("tensor_parallel_size", 0),
])
def test_precompute_refuses(field, value):
    assert f"--{field.replace('_', '-')} must be" in problems(precompute, **{field: value})


@pytest.mark.parametrize("config,field", [
    (SummarizationConfig, "limit"), (SummarizationConfig, "max_new_tokens"), (SummarizationConfig, "batch_size"),
    (SummarizationConfig, "max_prompt_tokens"), (LookbackTrainConfig, "max_prompt_tokens"),
    (GeneralConfig, "limit"), (GeneralConfig, "batch_size"), (CalibrationConfig, "batch_size"),
])
@pytest.mark.parametrize("value", [0, NAN])
def test_evaluate_refuses(config, field, value):
    required = {"dataset": "d", "pairs": "p", "out": "o", "data_dir": "d", "store": "s"}
    names = {f for f in config.__dataclass_fields__}
    cfg = config(**{k: v for k, v in required.items() if k in names}, **{field: value})
    assert f"--{field.replace('_', '-')} must be at least 1, got {value!r}" in problems(require, cfg=cfg)


def test_every_problem_is_reported_in_one_message():
    message = problems(distill, alpha=NAN, temperature=INF, lr=NAN, weight_decay=NAN, max_grad_norm=INF)
    for flag in ("--alpha", "--temperature", "--lr", "--weight-decay", "--max-grad-norm"):
        assert f"{flag} must be a finite number" in message
    message = problems(precompute, heldout_fraction=NAN, top_k=0)
    assert "--heldout-fraction must be a finite number in [0, 1), got nan" in message and "--top-k" in message


def test_the_defaults_and_edges_pass():
    distill()
    distill(alpha=0.0, max_grad_norm=0.0, weight_decay=0.0, lr=1.0, warmup_steps=0, seed=0)
    precompute()
    precompute(heldout_fraction=0.0, max_length=2)
    require(SummarizationConfig(dataset="d"))
