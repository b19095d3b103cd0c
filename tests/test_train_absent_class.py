"""DOS's absent-class score: known answer, direction, no saturation, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.train import absent_class_score


def test_absent_class_known_answer_is_log_odds_of_the_last_class():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.log(p[:, 2] / (1 - p[:, 2]))
    scores = absent_class_score(logits)
    assert isinstance(scores, np.ndarray)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # strictly decreasing in the spec's S = 1 - p_{K+1}: the same ranking, reversed
    assert np.array_equal(np.argsort(scores), np.argsort(-(1 - p[:, 2])))
    torch.testing.assert_close(absent_class_score(torch.tensor(logits)), torch.tensor(expected))


def test_absent_class_does_not_saturate_and_orders_ood_higher():
    logits = np.array([[0.0, 0.0, -800.0], [0.0, 0.0, -790.0], [0.0, 0.0, 790.0], [0.0, 0.0, 800.0]])
    scores = absent_class_score(logits)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)


@pytest.mark.parametrize("logits", [np.zeros((2, 2)), np.zeros(3), np.array([[0.0, np.nan, 1.0]])])
def test_absent_class_refuses_bad_logits(logits):
    with pytest.raises(ValueError, match="logits"):
        absent_class_score(logits)
