"""The base machinery: lazy finalisation after partial fits, shared state on disk, numerics helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors.base import OutputDetector, class_counts, percentile, symmetric_pinv


class CountingMean(OutputDetector):
    """Distance to the fit mean; counts how often the state is finalised (not registered)."""

    name = "counting-mean"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})
    state_reductions = {"sum": "sum", "count": "sum"}

    def __init__(self, **params):
        super().__init__(**params)
        self.finalized = 0

    def _statistics(self, outputs):
        z = outputs.features.to(torch.float64)
        return {"sum": z.sum(0), "count": torch.tensor(float(len(z)), dtype=torch.float64)}

    def _finalize(self, stats):
        self.finalized += 1
        return {"mean": stats["sum"] / stats["count"]}

    def _score(self, outputs):
        return (outputs.features.to(torch.float64) - self.state(outputs.features.device)["mean"]).norm(dim=1)


def test_partial_fit_finalises_once_on_first_use():
    detector = CountingMean()
    data = np.arange(40.0).reshape(20, 2)
    for start in range(0, 20, 2):
        detector.partial_fit({"features": data[start : start + 2]})
    assert detector.finalized == 0 and detector.is_fitted
    scores = detector.score({"features": data})
    assert detector.finalized == 1
    np.testing.assert_allclose(scores, np.linalg.norm(data - data.mean(0), axis=1))
    detector.score({"features": data})
    assert detector.finalized == 1


def test_knn_bank_is_stored_once(tmp_path):
    features = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    knn = detectors.create("knn", k=3).fit({"features": features})
    assert knn.state_["bank"] is knn.stats_["bank"]
    knn.save(tmp_path)
    size = (tmp_path / "detector.safetensors").stat().st_size
    assert size < 1.2 * features.nbytes  # one copy of the bank, not two
    loaded = detectors.load(tmp_path)
    np.testing.assert_array_equal(loaded.score({"features": features[:5]}), knn.score({"features": features[:5]}))


def test_class_counts_refuses_small_and_out_of_range_classes():
    with pytest.raises(ValueError, match="class 1: 1"):
        class_counts(torch.tensor([0, 0, 1]), 2, "x")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        class_counts(torch.tensor([0, 2]), 2, "x")


def test_symmetric_pinv_of_singular_matrix_is_finite_and_a_pseudo_inverse():
    a = torch.randn(3, 6, dtype=torch.float64)
    cov = a.T @ a  # rank 3 of 6
    pinv = symmetric_pinv(cov)
    assert torch.isfinite(pinv).all()
    np.testing.assert_allclose(pinv.numpy(), np.linalg.pinv(cov.numpy(), rcond=1e-10, hermitian=True), atol=1e-8)


def test_percentile_matches_numpy_on_small_and_large_inputs():
    small = torch.randn(1000)
    assert float(percentile(small, 90)) == pytest.approx(np.percentile(small.numpy(), 90), rel=1e-12)
    large = torch.rand(16_000_001)
    assert float(percentile(large, 85)) == pytest.approx(np.percentile(large.numpy(), 85), rel=1e-6)


def test_required_params_are_listed_in_info():
    assert detectors.info("mos")["required_params"] == ["group_sizes"]
    with pytest.raises(ValueError, match="group_sizes"):
        detectors.create("mos")


def test_merge_refuses_other_kinds_and_params():
    a = detectors.create("dice").fit(_head_outputs())
    with pytest.raises(ValueError, match="same parameters"):
        a.merge(detectors.create("dice", percentile=70).fit(_head_outputs()))
    with pytest.raises(ValueError, match="same parameters"):
        a.merge(detectors.create("fdbd").fit(_head_outputs()))


def _head_outputs() -> ModelOutputs:
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(3, 5)), np.zeros(3)
    features = np.abs(rng.normal(size=(30, 5)))
    return ModelOutputs(features=features, logits=features @ weight.T, head=(weight, bias))


def test_a_plain_array_is_the_one_field_a_detector_reads():
    from oodguard.detectors import create

    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    energy = create("energy").fit({"logits": logits})
    assert torch.equal(energy.score(logits[:5]), energy.score({"logits": logits[:5]}))
    np.testing.assert_array_equal(energy.score(logits[:5].numpy()), energy.score({"logits": logits[:5].numpy()}))
    mcm = create("mcm", label_embeddings=torch.randn(3, 8))
    assert mcm.score(torch.randn(2, 8)).shape == (2,)
    she = create("she")  # reads logits and features: one array cannot say which
    with pytest.raises(ValueError, match=r"she: score reads features, logits; pass them as a dict"):
        she.score(torch.randn(2, 8))
