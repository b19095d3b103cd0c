"""DOS's absent-class score as a registered detector: known answer, direction, validation, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from oodguard import detectors


def test_absent_class_known_answer_is_log_odds_of_the_last_class():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.log(p[:, 2] / (1 - p[:, 2]))
    scores = detectors.create("absent-class", known_classes=2).score({"logits": logits})
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # strictly decreasing in the spec's S = 1 - p_{K+1}: same ranking
    assert np.array_equal(np.argsort(scores), np.argsort(-(1 - p[:, 2])))


def test_absent_class_does_not_saturate_and_orders_ood_higher():
    logits = np.array([[0.0, 0.0, -800.0], [0.0, 0.0, -790.0], [0.0, 0.0, 790.0], [0.0, 0.0, 800.0]])
    scores = detectors.create("absent-class", known_classes=2).score({"logits": logits})
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)


def test_absent_class_validates_known_classes_and_logit_width(tmp_path):
    with pytest.raises(ValueError, match="known_classes must be an integer"):
        detectors.create("absent-class", known_classes=1)
    detector = detectors.create("absent-class", known_classes=3)
    with pytest.raises(ValueError, match="4 columns"):
        detector.score({"logits": np.zeros((2, 3))})
    assert detectors.info("absent-class")["required_params"] == ["known_classes"]
    detector.save(tmp_path)
    loaded = detectors.load(tmp_path)
    logits = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_array_equal(loaded.score({"logits": logits}), detector.score({"logits": logits}))
