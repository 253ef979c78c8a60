"""A Lookback Lens classifier for your own model: logistic regression on lookback ratios.

Chuang et al. (2024) train one per model, since the features are that model's heads.
Features of a summary: its lookback ratios averaged over tokens, one per (layer, head).
Labels: 1 = faithful, 0 = hallucinated, e.g. from the human-labelled sets of XSumFaith or
CLIFF. The paper classifies spans of 8 tokens; here the unit is the whole summary, as the
labels of those sets are. The fit is a few lines of Newton's method on an L2-penalised
log-likelihood: scikit-learn would be a large dependency for one small convex problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.lookback import lookback_ratios, summary_lookback
from smoothkd.jsonl import read_jsonl
from smoothkd.tokens import document_prompt


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias maximising sum log p(y | x) - l2/2 |w|^2 (bias unpenalised)."""
    X = np.hstack([x, np.ones((len(x), 1))])  # [n, d + 1]
    w = np.zeros(X.shape[1])
    penalty = np.full(X.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + penalty * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def summary_features(model: Any, tokenizer: Any, article: str, summary: str, instruction: str,
                     max_prompt_tokens: int) -> np.ndarray:
    """Mean lookback ratio per (layer, head) while the model reads `summary` as its answer: [L * H]."""
    prompt, _ = document_prompt(tokenizer, article, instruction, max_prompt_tokens)
    summary_ids = list(tokenizer(summary, add_special_tokens=False)["input_ids"])
    return summary_lookback(lookback_ratios(model, prompt, summary_ids)).flatten().numpy()


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney), ties counted half."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for s in np.unique(score):  # average ranks over ties
        ranks[score == s] = ranks[score == s].mean()
    pos = label == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(model: Any, tokenizer: Any, pairs_path: Path, out: Path, instruction: str, max_prompt_tokens: int,
          model_name: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    rows = []
    for lineno, r in read_jsonl(pairs_path):
        if not isinstance(r.get("article"), str) or not isinstance(r.get("summary"), str) or r.get("label") not in (0, 1):
            raise InputError(f"{pairs_path}:{lineno}: needs string `article` and `summary` and `label` 0 or 1 "
                             "(1 = faithful)")
        rows.append(r)
    labels = np.array([r["label"] for r in rows])
    if len(set(labels.tolist())) < 2:
        raise InputError(f"{pairs_path}: needs both faithful (1) and hallucinated (0) examples")
    feats = []
    for r in rows:
        feats.append(summary_features(model, tokenizer, r["article"], r["summary"], instruction, max_prompt_tokens))
        if progress:
            progress(1)
    x = np.stack(feats)
    w, b = fit_logistic(x, labels)
    clf = {"kind": "lookback-lens", "model": model_name, "n_features": int(x.shape[1]),
           "instruction": instruction, "max_prompt_tokens": max_prompt_tokens,
           "weights": w.tolist(), "bias": b, "n": len(rows), "n_faithful": int(labels.sum()),
           "train_auc": auc(x @ w + b, labels)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clf, indent=2))
    return clf


def load(path: str | None, n_features: int) -> Callable[[np.ndarray], float] | None:
    """The classifier's probability of `faithful` for a feature vector."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SmoothkdError(f"--lookback-classifier {path}: no such file (train one with `smoothkd evaluate lookback-train`)")
    clf = json.loads(p.read_text())
    if clf.get("n_features") != n_features:
        raise SmoothkdError(f"--lookback-classifier {path} was trained on {clf.get('n_features')} features "
                            f"(layers x heads of {clf.get('model')}); this model has {n_features}")
    w, b = np.array(clf["weights"]), float(clf["bias"])
    return lambda x: float(1 / (1 + np.exp(-(x @ w + b))))
