"""Top-k extraction against a direct float64 computation."""

import numpy as np
import torch

from smoothkd.precompute.topk import topk_labels


def test_topk_labels_match_dense_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(50, 300) * 4
    targets = torch.randint(0, 300, (50,))
    lab = topk_labels(logits.clone(), targets, k=16)  # topk_labels overwrites its input
    ref = torch.log_softmax(logits.double(), -1)
    ref_vals, ref_ids = ref.topk(16, -1)
    assert np.array_equal(lab.ids, ref_ids.numpy())
    np.testing.assert_allclose(lab.logprobs, ref_vals.numpy(), atol=1e-5)
    np.testing.assert_allclose(lab.true_logprob, ref.gather(-1, targets[:, None])[:, 0].numpy(), atol=1e-5)
    ref_tail = 1 - ref_vals.exp().sum(-1)
    np.testing.assert_allclose(lab.tail, ref_tail.numpy(), atol=1e-6)
    assert (np.diff(lab.logprobs, axis=1) <= 0).all()


def test_tail_is_zero_when_k_is_the_vocabulary_and_small_tails_keep_precision():
    torch.manual_seed(1)
    logits = torch.randn(8, 64)
    lab = topk_labels(logits, torch.zeros(8, dtype=torch.long), k=64)
    assert np.abs(lab.tail).max() < 1e-5
    # A very peaked distribution: the tail is ~1e-9, far below float32's 1 - x resolution.
    peaked = torch.full((1, 64), -30.0)
    peaked[0, :4] = 0.0
    lab = topk_labels(peaked, torch.zeros(1, dtype=torch.long), k=4)
    expected = 60 * np.exp(-30.0) / (4 + 60 * np.exp(-30.0))
    np.testing.assert_allclose(lab.tail, [expected], rtol=1e-3)
