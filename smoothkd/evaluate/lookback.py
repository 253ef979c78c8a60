"""Lookback ratio (Chuang et al. 2024, "Lookback Lens"): how much a model looks at the
context, rather than at its own output, while it generates.

For generated token t, layer l, head h: LR = A_ctx / (A_ctx + A_new), where A_ctx is the
mean attention weight, at the step that produces t, on the context (prompt) tokens and
A_new the mean on the tokens generated so far (none for the first: LR = 1). Low ratios flag
tokens written from the model's own continuation rather than from the article.
"""

from __future__ import annotations

from typing import Any

import torch


def lookback_ratios(model: Any, prompt_ids: list[int], generated_ids: list[int]) -> torch.Tensor:
    """[n_generated, layers, heads] lookback ratios from one teacher-forced pass.

    Re-reading prompt + generation with attention weights returned gives the attention
    each generated token paid when it was produced (greedy decoding is deterministic), at
    one forward instead of weights kept at every decoding step. Needs eager attention.
    """
    n_ctx, n_gen = len(prompt_ids), len(generated_ids)
    if n_gen == 0:
        return torch.zeros(0, 0, 0)
    ids = torch.tensor([prompt_ids + generated_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        attentions = model(input_ids=ids, output_attentions=True).attentions  # layers x [1, H, T, T]
    if attentions is None or attentions[0] is None:
        raise ValueError("the model returned no attention weights; load it with attn_implementation='eager'")
    # rows: the positions that predict generated token j, i.e. n_ctx - 1 + j
    rows = torch.arange(n_ctx - 1, n_ctx - 1 + n_gen, device=ids.device)
    att = torch.stack([a[0][:, rows, :].transpose(0, 1).float() for a in attentions], dim=1)  # [n_gen, L, H, T]
    ctx = att[..., :n_ctx].mean(-1)  # [n_gen, L, H]
    new = torch.stack([att[j, :, :, n_ctx : n_ctx + j].mean(-1) if j else torch.zeros_like(ctx[0])
                       for j in range(n_gen)])  # generated tokens before this one; none for the first
    return (ctx / (ctx + new).clamp_min(1e-12)).cpu()


def summary_lookback(ratios: torch.Tensor) -> torch.Tensor:
    """Per (layer, head), the mean over a summary's tokens: [layers, heads].

    The first token has seen no generated token, so its ratio is 1 by construction; it is
    left out when there are others, so that short summaries are not pulled towards 1.
    """
    return (ratios[1:] if len(ratios) > 1 else ratios).mean(dim=0)
