"""GROOD: known answers from a per-row numpy computation and from autograd, the OOD prototype's choices, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.detectors import create
from oodguard.detectors.prototype_gradient import prototype_gradients


def _data(seed=0, n=60, d=6, c=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    centres = rng.normal(size=(c, d)) * 3.0
    features = centres[labels] + rng.normal(size=(n, d))
    weight = centres - centres.mean(0)
    logits = features @ weight.T
    return features, logits, labels


def _expected(features, logits, labels, queries, ood_prototype=None):
    """Per row, by the formula: class prototypes, the OOD prototype, the gradient, the nearest bank gradient."""
    classes = int(labels.max()) + 1
    prototypes = np.stack([features[labels == c].mean(0) for c in range(classes)])
    ood = prototypes.mean(0) if ood_prototype is None else ood_prototype

    def gradient(z):
        distances = [np.linalg.norm(z - p) for p in prototypes] + [np.linalg.norm(z - ood)]
        weights = np.exp(-np.array(distances))
        return weights[-1] / weights.sum() * (z - ood) / np.linalg.norm(z - ood)

    bank = [gradient(z) for z, f, y in zip(features, logits, labels, strict=True) if np.argmax(f) == y]
    return np.array([min(np.sum((gradient(q) - b) ** 2) for b in bank) for q in queries])


def test_grood_known_answer_with_the_mean_prototype():
    features, logits, labels = _data()
    logits[:5] = -logits[:5]  # misclassified rows stay out of the bank
    queries = np.random.default_rng(1).normal(size=(8, 6)) * 4.0
    detector = create("grood").fit({"features": features, "logits": logits, "labels": labels})
    assert detector.state_["bank"].shape[0] < len(features)
    np.testing.assert_allclose(detector.score(queries), _expected(features, logits, labels, queries), rtol=1e-9)


def test_grood_known_answer_with_ood_features():
    features, logits, labels = _data(seed=2)
    ood = np.random.default_rng(3).normal(size=(10, 6)) + 8.0
    queries = np.random.default_rng(4).normal(size=(5, 6)) * 4.0
    detector = create("grood", ood_features=ood).fit({"features": features, "logits": logits, "labels": labels})
    expected = _expected(features, logits, labels, queries, ood_prototype=ood.mean(0))
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-9)


def test_prototype_gradient_equals_autograd_of_the_loss():
    rng = np.random.default_rng(5)
    z = torch.as_tensor(rng.normal(size=(4, 3)))
    prototypes = torch.as_tensor(rng.normal(size=(2, 3)))
    ood = torch.as_tensor(rng.normal(size=3)).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 0])
    for row in range(4):
        scores = -torch.linalg.vector_norm(z[row] - torch.cat([prototypes, ood[None]]), dim=1)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(scores[None], labels[row : row + 1]), ood)
        closed = prototype_gradients(z[row : row + 1], prototypes, ood.detach())[0]
        torch.testing.assert_close(closed, grad, rtol=1e-12, atol=1e-12)


def test_grood_refuses_bad_input():
    features, logits, labels = _data()
    with pytest.raises(ValueError, match="classified correctly"):
        wrong = np.eye(3)[(labels + 1) % 3]  # every row predicted as the next class
        create("grood").fit({"features": features, "logits": wrong, "labels": labels})
    with pytest.raises(ValueError, match="D=2 columns"):
        create("grood", ood_features=np.ones((3, 2))).fit({"features": features, "logits": logits, "labels": labels})
    with pytest.raises(ValueError, match="ood_features"):
        create("grood", ood_features=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        create("grood", ood_features=np.full((2, 6), np.nan))
    with pytest.raises(ValueError, match="at least 1"):
        two = labels < 2  # the logits still have 3 classes: class 2 has no fit row
        create("grood").fit({"features": features[two], "logits": logits[two], "labels": labels[two]})


def test_grood_save_load_keeps_the_ood_features(tmp_path):
    from oodguard.detectors import load

    features, logits, labels = _data(seed=6)
    ood = np.random.default_rng(7).normal(size=(4, 6)).astype(np.float32)
    detector = create("grood", ood_features=ood).fit({"features": features, "logits": logits, "labels": labels})
    detector.save(tmp_path / "grood")
    loaded = load(tmp_path / "grood")
    np.testing.assert_array_equal(loaded.ood_features, ood)
    np.testing.assert_array_equal(loaded.score(features[:7]), detector.score(features[:7]))


def test_grood_refuses_prototypes_that_coincide_with_the_ood_prototype():
    _, logits, labels = _data()
    constant = np.full((len(labels), 6), 1.5)  # every input would score (1/(C+1))^2 = 1/16
    with pytest.raises(ValueError, match="every class prototype coincides with the OOD prototype"):
        create("grood").fit({"features": constant, "logits": logits, "labels": labels})
    detector = create("grood", ood_features=np.zeros((2, 6))).fit(
        {"features": constant, "logits": logits, "labels": labels}
    )  # an OOD prototype of its own: the gradient direction still varies
    assert np.isfinite(detector.score(np.random.default_rng(1).normal(size=(4, 6)))).all()
