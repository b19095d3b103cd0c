"""benchmarks/peer_parity.py: its metrics against scikit-learn and scipy, and its oodguard side on small inputs.

The pytorch-ood side needs its own environment (``make peer-venv``) and is not run here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from oodguard.detectors import available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("peer_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_parity"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_auroc_and_spearman_match_sklearn_and_scipy_with_ties(parity):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    other = scores + rng.integers(0, 3, 200)
    is_ood = rng.random(200) < 0.4
    assert parity.auroc(scores, is_ood) == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12)
    assert parity.spearman(scores, other) == pytest.approx(spearmanr(scores, other).statistic, abs=1e-12)
    assert np.isnan(parity.spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="both ID and OOD"):
        parity.auroc(scores, np.zeros(200, dtype=bool))


def test_compare_aligns_the_peer_sign_and_the_verdict_reads_both_precisions(parity):
    is_ood = np.array([False, False, True, True])
    ours = np.array([0.1, 0.2, 0.8, 0.9])
    result = parity.compare(ours, -ours, is_ood, peer_sign=-1)
    assert result == {"oodguard": 1.0, "pytorch_ood": 1.0, "difference": 0.0, "spearman": pytest.approx(1.0)}
    assert parity.verdict(result, None) == "same"
    off = {"difference": 2e-4, "spearman": 1.0}
    assert parity.verdict(off, result) == "same in float64"
    assert parity.verdict(off, None) == parity.verdict(off, off) == "differs"
    with pytest.raises(ValueError, match="shapes differ"):
        parity.compare(ours, ours[:3], is_ood)


def test_tied_fraction_and_temperature_nll(parity):
    assert parity.tied_fraction(np.array([1.0, 1.0, 2.0, 3.0])) == 0.5
    logits = np.random.default_rng(1).normal(size=(50, 4)) * 5
    labels = np.arange(50) % 4
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits) / 1.7, torch.from_numpy(labels))
    assert parity.temperature_nll(logits, labels, 1.7) == pytest.approx(float(expected), rel=1e-12)


def test_every_registered_pair_scores_on_the_oodguard_side(parity):
    inputs = parity.synthetic_inputs(seed=0, classes=4, dim=16, per_class=60)
    registered = set(available())
    pairs = [pair for pair in parity.PAIRS if pair.oodguard in registered and not pair.model]
    assert {"msp", "energy", "knn", "openmax"} <= {pair.oodguard for pair in pairs}
    assert len({parity.pair_key(pair) for pair in parity.PAIRS}) == len(parity.PAIRS)
    for pair in pairs:
        scores, fitted = parity.oodguard_scores(pair, inputs)
        assert scores.shape == (len(inputs["is_ood"]),) and np.isfinite(scores).all(), pair
        assert (fitted is not None) == bool(pair.fitted)


def test_dropout_network_reloads_identically_and_its_pairs_score(parity, tmp_path):
    inputs = parity.synthetic_inputs(seed=0, classes=4, dim=16, per_class=60)
    model = parity.train_dropout_mlp(inputs, tmp_path / "mlp.pt", steps=20)
    # the peer side builds the same network and loads the saved weights: the same logits in eval mode
    rebuilt = parity.dropout_mlp(16, 4)
    rebuilt.load_state_dict(torch.load(tmp_path / "mlp.pt", weights_only=True))
    x = torch.from_numpy(inputs["test_features"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    pairs = [pair for pair in parity.PAIRS if pair.network == "dropout" and pair.oodguard in set(available())]
    assert pairs
    for pair in pairs:
        scores, _ = parity.oodguard_scores(pair, inputs, model)
        assert scores.shape == (len(inputs["is_ood"]),) and np.isfinite(scores).all(), pair
