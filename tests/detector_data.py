"""Synthetic model outputs shared by the detector tests.

Classes are clusters of non-negative (post-ReLU-like) features, each class active on its own block of
units; the head is a linear classifier aligned with the class means, so logits are confident on ID data.
The far-away OOD cluster is made of weak activations on the class units plus strong activations on the
units no class uses: low logits, far from every class mean, and outside the subspace ID data spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs
from oodguard.detectors import Detector, create, load

NUM_CLASSES = 6
FEATURE_DIM = 32
MOS_GROUP_SIZES = [2, 2, 2]

# Parameters for detectors whose defaults need more data than these small sets hold.
SMALL_DATA_PARAMS = {
    "knn": {"k": 2},
    "nnguide": {"bank_ratio": 1.0, "k": 2},
    "openmax": {"tailsize": 2},
    "sage": {"k": 5},
    "ae_mahalanobis": {"latent_dim": 8},  # 18 rows less the 10 % held out must exceed the latent size
}


def head(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = np.zeros((NUM_CLASSES, FEATURE_DIM))
    block = FEATURE_DIM // NUM_CLASSES
    for c in range(NUM_CLASSES):
        weight[c, c * block : (c + 1) * block] = 1.0
    weight = weight + 0.05 * rng.normal(size=weight.shape)
    return weight.astype(np.float32), (0.1 * rng.normal(size=NUM_CLASSES)).astype(np.float32)


def class_features(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    block = FEATURE_DIM // NUM_CLASSES
    means = np.full((NUM_CLASSES, FEATURE_DIM), 0.3)
    for c in range(NUM_CLASSES):
        means[c, c * block : (c + 1) * block] = 2.0
    return np.maximum(means[labels] + 0.4 * rng.normal(size=(len(labels), FEATURE_DIM)), 0).astype(np.float32)


def grouped_logits(class_logits: np.ndarray) -> np.ndarray:
    """MOS-style logits: each group's "others" entry is the log-sum-exp of the classes outside the group."""
    parts, start = [], 0
    for size in MOS_GROUP_SIZES:
        inside = class_logits[:, start : start + size]
        outside = np.delete(class_logits, np.s_[start : start + size], axis=1)
        others = np.log(np.exp(outside).sum(axis=1, keepdims=True))
        parts.append(np.concatenate([others, inside], axis=1))
        start += size
    return np.concatenate(parts, axis=1).astype(np.float32)


def outputs_from_features(features: np.ndarray, labels: np.ndarray | None, detector: str = "") -> ModelOutputs:
    weight, bias = head()
    logits = features @ weight.T + bias
    if detector == "mos":
        return ModelOutputs(logits=grouped_logits(logits), features=features, labels=labels)
    # Gram and the early exits read intermediate layers: the features stand in for one ([N, D] activations)
    layers = {"penultimate": features} if detector in ("gram", "early_exit") else None
    return ModelOutputs(logits=logits, features=features, labels=labels, head=(weight, bias), layers=layers)


def id_outputs(n_per_class: int, seed: int, detector: str = "") -> ModelOutputs:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    return outputs_from_features(class_features(labels, rng), labels, detector)


def far_outputs(n: int, seed: int, detector: str = "") -> ModelOutputs:
    rng = np.random.default_rng(seed)
    features = np.abs(0.4 * rng.normal(size=(n, FEATURE_DIM)))
    features[:, NUM_CLASSES * (FEATURE_DIM // NUM_CLASSES) :] += 3.0  # units that no class uses
    features = features.astype(np.float32)
    return outputs_from_features(features, -np.ones(n, dtype=np.int64), detector)


# The official NNGuide bank is 1 % of the fit set, too small for k=10 on these few hundred rows.
CONTRACT_PARAMS = {
    "mos": {"group_sizes": MOS_GROUP_SIZES},
    "nnguide": {"bank_ratio": 0.1},
    # detectors that train a network: fewer epochs and a smaller mixture search keep the contract tests quick
    "ae_mahalanobis": {"epochs": 10},
    "sage": {"epochs": 10},
    "msma": {"epochs": 10, "hidden": 64, "components": (2,)},
    # 600 fit rows are 3 batches an epoch: the paper's 20 epochs (of 60,000 MNIST rows) leave the heads untrained
    "early_exit": {"epochs": 100},
    # VOS learns these class weights in training; any positive weights exercise the contract
    "webo": {"weights": np.linspace(0.5, 1.5, NUM_CLASSES)},
    # the class clusters span C - 1 = 5 directions (the simplex of neural collapse); the 90 % variance rule
    # counts the isotropic within-class noise of these synthetic features too
    "neco": {"dim": NUM_CLASSES - 1},
    # a row's 32 feature values cannot fill WeiPer's 100 bins: 20 bins, smoothed over 4 (the defaults' ratio)
    "weiper": {"n_bins": 20, "smoothing": 4, "smoothing_perturbed": 4},
}


def detector_params(name: str) -> dict:
    return dict(CONTRACT_PARAMS.get(name, {}))


def head_data(
    n: int, d: int, c: int, seed: int, *, loc: float, query_scale: float, queries: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(features [n, d], weight [c, d], bias [c], queries [queries, d])`` for the head-shaping tests: post-ReLU
    features centred at ``loc`` (with a little positive jitter), a random head, non-negative queries."""
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(loc, 1.0, size=(n, d)), 0) + 0.01 * rng.random((n, d))
    weight = rng.normal(size=(c, d))
    bias = rng.normal(size=c)
    query_rows = np.abs(rng.normal(loc, query_scale, size=(queries, d)))
    return features, weight, bias, query_rows


def neg_energy_by_hand(logits) -> float:
    """``-LSE(logits)`` of one row by a Python loop (stable: shifted by the max)."""
    m = max(logits)
    return -(m + np.log(sum(np.exp(v - m) for v in logits)))


def fit_with_head(name: str, features: np.ndarray, weight: np.ndarray, bias: np.ndarray, **params) -> Detector:
    """Detector ``name`` fitted on ``features`` with the head ``(weight, bias)``."""
    return create(name, **params).fit({"features": features, "head": (weight, bias)})


def assert_model_round_trip(detector: Detector, model: Any, x: Any, directory: Path, **close: Any) -> None:
    """``detector`` (attached to ``model``) saved to ``directory`` loads with the same params, refuses to score until
    attached again, and then scores ``x`` as before (``close``: tolerances for ``torch.testing.assert_close``)."""
    before = detector.score(x)
    detector.save(directory)
    loaded = load(directory)
    assert loaded.params == detector.params
    with pytest.raises(RuntimeError, match="attach"):
        loaded.score(x)
    torch.testing.assert_close(loaded.attach(model).score(x), before, **close)


def confidence_probe() -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-input, 3-class linear model (bias 0) and three inputs: confident ``[8, 0]``, flat ``[0, 0]`` and almost
    flat ``[0.05, 0]``; an ODIN-style score ranks them confident < almost flat < flat."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    return model, torch.tensor([[8.0, 0.0], [0.0, 0.0], [0.05, 0.0]])
