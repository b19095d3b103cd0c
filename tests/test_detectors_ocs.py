"""ocs: the optimal constant solution of cross-entropy and the KL of the prediction to it, against hand values."""

import doctest
import math
import warnings

import numpy as np
import pytest
import torch

from oodguard import detectors
from oodguard.detectors import ocs as ocs_module
from oodguard.detectors.ocs import optimal_constant_solution
from oodguard.outputs import ModelOutputs


def _fit_outputs(counts, seed=0):
    """Logits of any value with labels drawn exactly ``counts[k]`` times for class ``k``."""
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    logits = torch.randn(len(labels), len(counts), generator=torch.Generator().manual_seed(seed))
    return ModelOutputs(logits=logits, labels=labels)


def test_doctests():
    failures, attempted = doctest.testmod(ocs_module)
    assert attempted and not failures


def test_the_ocs_is_the_label_distribution_of_the_fit_set():
    detector = detectors.create("ocs").fit(_fit_outputs([2, 1, 1]))
    assert detector.state_["ocs"].tolist() == [0.5, 0.25, 0.25]
    assert optimal_constant_solution(torch.tensor([1, 1, 1, 0]), 2).tolist() == [0.25, 0.75]


def test_score_is_minus_the_kl_of_the_prediction_to_the_ocs_worked_by_hand():
    detector = detectors.create("ocs").fit(_fit_outputs([2, 1, 1]))  # OCS = (1/2, 1/4, 1/4)
    logits = np.array([[math.log(3), 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    # row 0: p = (3/5, 1/5, 1/5), KL = 0.6 ln(0.6 / 0.5) + 2 * 0.2 ln(0.2 / 0.25)
    # row 1: p = (1/2, 1/4, 1/4) = OCS, KL = 0; rows 2-3: p uniform, KL = 1/3 ln(2/3) + 2/3 ln(4/3)
    uniform = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3
    expected = [-(0.6 * math.log(1.2) + 0.4 * math.log(0.8)), 0.0, -uniform, -uniform]
    np.testing.assert_allclose(detector.score(logits), expected, rtol=1e-12, atol=1e-15)


def test_predictions_near_the_ocs_score_higher_than_confident_ones():
    detector = detectors.create("ocs").fit(_fit_outputs([30, 30, 30, 30]))
    confident = torch.eye(4).repeat(5, 1) * 8.0
    flat = torch.randn(20, 4, generator=torch.Generator().manual_seed(1)) * 0.1
    assert detector.score(flat).min() > detector.score(confident).max()
    assert detector.score(flat).max() <= 0.0


def test_a_class_without_fit_labels_is_warned_about_and_scores_stay_finite():
    with pytest.warns(UserWarning, match=r"class\(es\) 1 have no fit labels"):
        detector = detectors.create("ocs").fit(_fit_outputs([3, 0, 2]))
    scores = detector.score(np.array([[0.0, 10.0, 0.0], [0.0, 0.0, 0.0]]))
    assert np.isfinite(scores).all() and scores[0] < scores[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detectors.create("ocs").fit(_fit_outputs([3, 1, 2]))  # every class present: no warning


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="ocs: fit needs labels"):
        detectors.create("ocs").fit({"logits": np.zeros((5, 3), dtype=np.float32)})
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        detectors.create("ocs").fit(ModelOutputs(logits=torch.zeros(4, 3), labels=torch.tensor([0, 1, 2, 3])))
    with pytest.raises(ValueError, match="1-D array of class indices"):
        optimal_constant_solution(torch.tensor([0.5, 1.0]), 2)


def test_balanced_labels_make_ocs_the_entropy_minus_log_k():
    # a uniform OCS: -KL(p || 1/K) = H(p) - log K; entropy returns log H (why the two digits rows are identical)
    logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    outputs = ModelOutputs(logits=logits, labels=torch.arange(400) % 10)
    ocs = np.asarray(detectors.create("ocs").fit(outputs).score(outputs))
    log_entropy = np.asarray(detectors.create("entropy").score(outputs))
    np.testing.assert_allclose(ocs + math.log(10), np.exp(log_entropy), rtol=1e-10)
