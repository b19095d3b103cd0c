"""early_exit (QUTE): the ensemble uncertainty by hand, exits and heads that learn separable layers, seeded
training, the cache, save/load and bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodguard import ModelOutputs, detectors
from oodguard.detectors.early_exit import EarlyExit, ensemble_uncertainty, pooled_cells

CLASSES, DIM = 3, 8
FAST = {"epochs": 300, "batch_size": 64}


def _outputs(n_per_class, seed, far=False):
    """Class c lights up channel c of a [4, 6, 6] map in its own quadrant and of a [5, 3] sequence, and feature
    block c; far rows light up channels and features that no class uses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    n = len(labels)
    maps = 0.3 * torch.randn(n, 4, 6, 6, generator=g)
    sequence = 0.3 * torch.randn(n, 5, 3, generator=g)
    features = (0.3 * torch.randn(n, DIM, generator=g)).abs()
    for c in range(CLASSES):
        rows = labels == c if not far else torch.zeros(n, dtype=torch.bool)
        maps[rows, c, (c % 2) * 3 : (c % 2) * 3 + 3, (c // 2) * 3 : (c // 2) * 3 + 3] += 2.0
        sequence[rows, c, :] += 2.0
        features[rows, 2 * c : 2 * c + 2] += 2.0
    if far:
        maps[:, 3] += 2.0
        sequence[:, 4] += 2.0
        features[:, 2 * CLASSES :] += 3.0
    layers = {"block1": maps, "block2": sequence}
    return ModelOutputs(features=features, labels=-torch.ones(n, dtype=torch.long) if far else labels, layers=layers)


@pytest.fixture(scope="module")
def fitted():
    fit = _outputs(60, seed=1)
    return fit, detectors.create("early_exit", **FAST).fit(fit)


def test_the_ensemble_uncertainty_is_the_formula_on_hand_set_probabilities():
    members = torch.tensor([[[0.7, 0.2, 0.1], [0.98, 0.01, 0.01]], [[0.1, 0.8, 0.1], [0.96, 0.02, 0.02]]])
    mean = members.double().mean(dim=0)  # [[0.4, 0.5, 0.1], [0.97, 0.015, 0.015]]
    confidence = ensemble_uncertainty(members.log(), "confidence")
    torch.testing.assert_close(confidence, torch.tensor([0.5, 0.03], dtype=torch.float64))
    entropy = ensemble_uncertainty(members.log(), "entropy")
    expected = [-sum(p * math.log(p) for p in row) for row in mean.tolist()]
    torch.testing.assert_close(entropy, torch.tensor(expected, dtype=torch.float64))
    # a member with a probability of exactly 0 adds 0 log 0 = 0, not NaN
    sure = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]]).log()
    assert ensemble_uncertainty(sure, "entropy").item() == 0.0 and ensemble_uncertainty(sure).item() == 0.0


def test_confidence_keeps_its_digits_where_the_top_probability_rounds_to_one():
    log_probs = torch.log_softmax(torch.tensor([[[60.0, 0.0, 0.0]], [[50.0, 0.0, 0.0]]], dtype=torch.float64), dim=2)
    expected = (2 * math.exp(-60) + 2 * math.exp(-50)) / 2  # 1 - max of the mean, to first order
    torch.testing.assert_close(ensemble_uncertainty(log_probs), torch.tensor([expected], dtype=torch.float64))


def test_the_detector_scores_its_heads_by_the_formula(fitted):
    """Heads set by hand: identity depthwise layers and constant logits, so head k predicts p_k on every row."""
    fit, detector = fitted
    hand = [torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.7, 0.1])]
    original = detector.state_
    state = dict(original)
    for k, p in enumerate(hand):
        state[f"net.depthwise.{k}.weight"] = torch.ones_like(state[f"net.depthwise.{k}.weight"])
        state[f"net.depthwise.{k}.bias"] = torch.zeros_like(state[f"net.depthwise.{k}.bias"])
        state[f"net.head_out.{k}.weight"] = torch.zeros_like(state[f"net.head_out.{k}.weight"])
        state[f"net.head_out.{k}.bias"] = p.log()
    detector.state_ = state
    try:
        test = _outputs(4, seed=2)
        # the weights are float32: log(p) keeps 7 digits
        torch.testing.assert_close(
            detector.member_probabilities(test), torch.stack(hand).double()[:, None].expand(2, 12, 3), rtol=1e-6, atol=0
        )
        mean = (hand[0] + hand[1]).double() / 2  # [0.4, 0.5, 0.1]
        np.testing.assert_allclose(detector.score(test).numpy(), np.full(12, 1 - 0.5), rtol=1e-6)
        detector.set_params(uncertainty="entropy")
        np.testing.assert_allclose(detector.score(test).numpy(), -(mean * mean.log()).sum().item(), rtol=1e-6)
    finally:
        detector.set_params(uncertainty="confidence")
        detector.state_ = original


def test_exits_and_heads_learn_separable_layers_and_far_rows_score_higher(fitted):
    fit, detector = fitted
    assert detector.meta_["layers"] == ["block1", "block2"] and detector.meta_["layer_shapes"] == [[4, 6, 6], [5, 3]]
    test = _outputs(30, seed=2)
    for probabilities in (detector.exit_probabilities(test), detector.member_probabilities(test)):
        assert probabilities.shape == (2, 90, CLASSES)
        torch.testing.assert_close(probabilities.sum(dim=2), torch.ones(2, 90, dtype=torch.float64))
        assert bool((probabilities.argmax(dim=2) == test.labels).all())
    id_scores, far_scores = detector.score(test), detector.score(_outputs(30, seed=3, far=True))
    auroc = (far_scores[:, None] > id_scores[None, :]).double().mean()
    assert float(auroc) > 0.95 and float(far_scores.mean()) > 2 * float(id_scores.mean())


def test_score_reads_only_the_features(fitted):
    fit, detector = fitted
    test = _outputs(5, seed=2)
    torch.testing.assert_close(detector.score(ModelOutputs(features=test.features)), detector.score(test))


def test_the_exit_pooling_grid():
    maps = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    torch.testing.assert_close(pooled_cells(maps, 4), F.adaptive_avg_pool2d(maps, 4).flatten(2))
    assert pooled_cells(maps, 1).shape == (2, 3, 1)  # global average pooling
    torch.testing.assert_close(pooled_cells(maps, 1)[..., 0], maps.mean(dim=(2, 3)))
    assert pooled_cells(torch.randn(2, 3, 2, 9), 4).shape == (2, 3, 8)  # a short axis keeps its size
    assert pooled_cells(torch.randn(2, 3, 7), 4).shape == (2, 3, 4)
    assert pooled_cells(torch.randn(2, 3), 4).shape == (2, 3, 1)


def test_training_is_seeded(fitted):
    fit, detector = fitted
    test = _outputs(10, seed=2)
    assert torch.equal(detectors.create("early_exit", **FAST).fit(fit).score(test), detector.score(test))
    other = detectors.create("early_exit", seed=1, **FAST).fit(fit)
    assert not torch.equal(other.score(test), detector.score(test))


def test_layers_choose_the_exits_and_their_order(fitted):
    fit, _ = fitted
    one = detectors.create("early_exit", layers=["block2"], **FAST).fit(fit)
    assert one.meta_["layers"] == ["block2"] and one.member_probabilities(fit).shape[0] == 1
    both = detectors.create("early_exit", layers=["block2", "block1"], **FAST).fit(fit)
    assert both.meta_["layers"] == ["block2", "block1"]


def test_save_and_load_give_the_same_scores_and_exits(tmp_path, fitted):
    fit, detector = fitted
    test = ModelOutputs.concat([_outputs(5, seed=2), _outputs(5, seed=3, far=True)])
    detector.save(tmp_path / "ee")
    loaded = detectors.load(tmp_path / "ee")
    assert isinstance(loaded, EarlyExit) and loaded.meta_["layers"] == ["block1", "block2"]
    assert torch.equal(loaded.score(test), detector.score(test))
    assert torch.equal(loaded.exit_probabilities(test), detector.exit_probabilities(test))


def test_the_fitted_state_is_cached_by_rows_and_parameters(tmp_path, fitted, monkeypatch):
    fit, detector = fitted
    first = detectors.create("early_exit", cache_dir=str(tmp_path), **FAST).fit(fit)
    assert len(list(tmp_path.glob("early_exit-*.safetensors"))) == 1
    test = _outputs(5, seed=2)
    assert torch.equal(first.score(test), detector.score(test))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(EarlyExit, "_train_state", no_training)
    again = detectors.create("early_exit", cache_dir=str(tmp_path), **FAST).fit(fit)
    assert again.meta_["layers"] == ["block1", "block2"] and torch.equal(again.score(test), first.score(test))
    with pytest.raises(AssertionError, match="trained again"):  # other exit layers: other rows, other key
        detectors.create("early_exit", cache_dir=str(tmp_path), layers=["block1"], **FAST).fit(fit)


def test_bad_input_is_refused_with_the_fix(fitted):
    fit, detector = fitted
    with pytest.raises(ValueError, match=r"\['block9'\] are missing from the outputs at fit.*'block1', 'block2'.*"
                       r"extract them with extract\(model, data, layers=\[\.\.\.\]\)"):  # fmt: skip
        detectors.create("early_exit", layers=["block1", "block9"]).fit(fit)
    with pytest.raises(ValueError, match="fit needs labels.*pass the true class of each fit row as labels"):
        detectors.create("early_exit").fit(fit.with_fields(labels=None))
    with pytest.raises(ValueError, match="fit needs layers"):
        detectors.create("early_exit").fit(fit.with_fields(layers=None))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        detectors.create("early_exit").fit(fit.with_fields(logits=torch.zeros(len(fit), 3), labels=fit.labels + 1))
    deep = fit.with_fields(layers={"block1": torch.zeros(len(fit), 2, 2, 2, 2, 2)})
    with pytest.raises(ValueError, match=r"at most 3 spatial axes: reshape it"):
        detectors.create("early_exit").fit(deep)
    other = _outputs(2, seed=2).with_fields(layers={"block1": torch.zeros(6, 4, 8, 8), "block2": torch.zeros(6, 5, 3)})
    with pytest.raises(ValueError, match=r"\[4, 8, 8\] at score but \[4, 6, 6\] at fit"):
        detector.exit_probabilities(other)
    with pytest.raises(ValueError, match="D=9"):
        detector.score(ModelOutputs(features=torch.zeros(2, DIM + 1)))
    with pytest.raises(ValueError, match="parameter 'uncertainty' must be"):
        detectors.create("early_exit", uncertainty="variance")
    with pytest.raises(ValueError, match="distinct layer names"):
        detectors.create("early_exit", layers=["block1", "block1"])
    with pytest.raises(ValueError, match="measure must be one of confidence, entropy"):
        ensemble_uncertainty(torch.zeros(1, 2, 3), "variance")


def test_defaults_are_the_papers_recipe():
    assert EarlyExit().get_params() == {
        "layers": None, "uncertainty": "confidence", "pool": 4, "epochs": 20, "lr": 1e-3, "batch_size": 256,
        "seed": 0, "cache_dir": None,
    }  # fmt: skip
    meta = detectors.info("early_exit")
    assert meta["requires"] == ["features"] and meta["fit_requires"] == ["features", "labels", "layers"]
