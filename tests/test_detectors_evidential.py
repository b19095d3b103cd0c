"""evidential: the subjective-logic measures against hand values and brute force, the trained heads, save/load."""

import doctest
import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from oodguard import detectors
from oodguard.detectors import evidential
from oodguard.detectors.evidential import _kl_to_flat_dirichlet, dirichlet_measures, plausibility_measures
from oodguard.outputs import ModelOutputs

from detector_data import far_outputs, id_outputs


def _outputs(n, seed, shift=0.0, classes=4, dim=12, between=None):
    """Gaussian class clusters; ``between=(a, b)`` puts every row half-way between the centres of a and b."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    middle = centres[labels] if between is None else (centres[between[0]] + centres[between[1]]).expand(n, -1) / 2
    features = middle + 0.5 * torch.randn(n, dim, generator=g) + shift
    return ModelOutputs(features=features, labels=labels)


def test_doctests():
    failures, attempted = doctest.testmod(evidential)
    assert attempted and not failures


# ---------------------------------------------------------------------------------------------- Dirichlet measures
def _dissonance_by_loops(alpha):
    """The subjective-logic dissonance written out term by term (Python loops over classes)."""
    s = sum(alpha)
    b = [(a - 1) / s for a in alpha]
    total = 0.0
    for k, bk in enumerate(b):
        others = [j for j in range(len(b)) if j != k]
        mass = sum(b[j] for j in others)
        if mass == 0:
            continue
        balanced = sum(b[j] * (1 - abs(b[j] - bk) / (b[j] + bk)) for j in others if b[j] > 0 and bk > 0)
        total += bk * balanced / mass
    return total


def test_no_evidence_is_full_vacuity_and_no_dissonance():
    m = dirichlet_measures(torch.ones(2, 5))
    assert m["vacuity"].tolist() == [1.0, 1.0]
    assert m["dissonance"].tolist() == [0.0, 0.0]
    assert m["belief"].abs().max() == 0
    torch.testing.assert_close(m["expected_probability"], torch.full((2, 5), 0.2, dtype=torch.float64))


def test_one_dominant_class_has_no_vacuity_and_no_dissonance():
    m = dirichlet_measures(torch.tensor([[1e6 + 1, 1.0, 1.0, 1.0]]))
    assert m["vacuity"].item() == pytest.approx(4 / (1e6 + 4), rel=1e-12)
    assert m["dissonance"].item() == 0.0  # all the evidence is on one class: nothing conflicts
    assert m["belief"][0, 0].item() == pytest.approx(1e6 / (1e6 + 4), rel=1e-12)


def test_two_equal_strong_classes_are_fully_dissonant():
    for evidence in (1.0, 100.0, 1e6):
        m = dirichlet_measures(torch.tensor([[evidence + 1, evidence + 1, 1.0]]))
        # b_1 = b_2 = E / (2E + 3), Bal = 1: each class is fully balanced by the other, dissonance = b_1 + b_2
        assert m["dissonance"].item() == pytest.approx(2 * evidence / (2 * evidence + 3), rel=1e-12)
        assert m["vacuity"].item() == pytest.approx(3 / (2 * evidence + 3), rel=1e-12)
    assert dirichlet_measures(torch.tensor([[1e9, 1e9, 1.0]]))["dissonance"].item() > 0.999999


def test_dissonance_of_unequal_beliefs_worked_by_hand():
    # evidence (2, 1, 0), S = 6: b = (1/3, 1/6, 0), u = 1/2; Bal(1/3, 1/6) = 1 - (1/6)/(1/2) = 2/3
    # k = 1: b_1 * (b_2 Bal) / b_2 = (1/3)(2/3) = 2/9; k = 2: (1/6)(2/3) = 1/9; k = 3: b_3 = 0
    m = dirichlet_measures(torch.tensor([[3.0, 2.0, 1.0]]))
    assert m["vacuity"].item() == pytest.approx(0.5)
    assert m["dissonance"].item() == pytest.approx(1 / 3, rel=1e-12)
    torch.testing.assert_close(m["belief"], torch.tensor([[1 / 3, 1 / 6, 0.0]], dtype=torch.float64))


def test_dissonance_matches_a_loop_over_classes_on_random_opinions():
    rng = np.random.default_rng(0)
    evidence = rng.gamma(0.6, 8.0, size=(40, 6)) * (rng.random((40, 6)) < 0.7)  # sparse, with exact zeros
    alpha = evidence + 1
    got = dirichlet_measures(torch.from_numpy(alpha))
    np.testing.assert_allclose(got["dissonance"].numpy(), [_dissonance_by_loops(list(a)) for a in alpha], rtol=1e-12)
    np.testing.assert_allclose(got["vacuity"].numpy(), 6 / alpha.sum(1), rtol=1e-14)
    np.testing.assert_allclose(got["belief"].sum(1).numpy() + got["vacuity"].numpy(), 1.0, rtol=1e-14)


def test_dissonance_chunks_rows_without_changing_values(monkeypatch):
    alpha = torch.from_numpy(np.random.default_rng(1).gamma(1.0, 5.0, size=(25, 4)) + 1)
    whole = dirichlet_measures(alpha)["dissonance"]
    monkeypatch.setattr(evidential, "_PAIR_BUDGET", 16 * 3)  # 3 rows per chunk
    torch.testing.assert_close(dirichlet_measures(alpha)["dissonance"], whole, rtol=0, atol=0)


def test_bad_dirichlet_parameters_are_refused():
    with pytest.raises(ValueError, match=">= 1"):
        dirichlet_measures(torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        dirichlet_measures(torch.tensor([[float("nan"), 2.0]]))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        dirichlet_measures(torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------- plausibility measures
def _masses_by_enumeration(pl):
    """Mass of every subset A of the classes: prod_{i in A} pl_i prod_{j not in A} (1 - pl_j) (Fan et al., Eq. 7)."""
    k = len(pl)
    masses = {}
    for members in itertools.product((0, 1), repeat=k):
        masses[members] = math.prod(p if m else 1 - p for p, m in zip(pl, members, strict=True))
    return masses


def test_two_classes_worked_by_hand():
    m = plausibility_measures(torch.tensor([[0.8, 0.3]], dtype=torch.float64))
    np.testing.assert_allclose(m["belief"][0], [0.8 * 0.7, 0.3 * 0.2], rtol=1e-12)
    assert m["ignorance"].item() == pytest.approx(0.2 * 0.7)
    assert m["confusion"].item() == pytest.approx(0.8 * 0.3)  # both classes claim the input
    u = 0.2 * 0.7 + 0.8 * 0.3
    assert m["uncertainty"].item() == pytest.approx(u)
    np.testing.assert_allclose(m["alpha"][0], [2 * 0.56 / u + 1, 2 * 0.06 / u + 1], rtol=1e-12)
    np.testing.assert_allclose(m["class_confusion"][0], [0.8 - 0.56, 0.3 - 0.06], rtol=1e-12)


def test_plausibility_measures_match_the_enumeration_of_all_subsets():
    rng = np.random.default_rng(2)
    pl = rng.random((30, 5))
    pl[0] = [1.0, 0.0, 0.3, 1.0, 0.5]  # exact 0 and 1: products with a zero factor, no division by 1 - pl
    pl[1] = 0.0
    pl[2] = 1.0
    got = plausibility_measures(torch.from_numpy(pl))
    for row, p in enumerate(pl):
        masses = _masses_by_enumeration(list(p))
        singletons = [masses[tuple(int(j == i) for j in range(5))] for i in range(5)]
        confusion = sum(mass for members, mass in masses.items() if sum(members) >= 2)
        class_confusion = [sum(mass for m, mass in masses.items() if sum(m) >= 2 and m[i]) for i in range(5)]
        np.testing.assert_allclose(got["belief"][row].numpy(), singletons, rtol=1e-12, atol=1e-15)
        assert got["ignorance"][row].item() == pytest.approx(masses[(0,) * 5], rel=1e-12, abs=1e-15)
        assert got["confusion"][row].item() == pytest.approx(confusion, rel=1e-10, abs=1e-14)
        np.testing.assert_allclose(got["class_confusion"][row].numpy(), class_confusion, rtol=1e-10, atol=1e-14)
    assert got["ignorance"][1].item() == 1.0 and got["confusion"][2].item() == pytest.approx(1.0)
    for value in got.values():
        assert torch.isfinite(value).all()


def test_bad_plausibilities_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plausibility_measures(torch.tensor([[1.2, 0.1]]))


def test_kl_regulariser_is_the_dirichlet_kl_to_the_flat_dirichlet():
    alpha = torch.from_numpy(np.random.default_rng(3).gamma(1.0, 3.0, size=(10, 4)) + 1)
    expected = kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones_like(alpha)))
    torch.testing.assert_close(_kl_to_flat_dirichlet(alpha), expected)


def test_training_loss_is_the_papers_formula():
    f = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -12.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    onehot = torch.nn.functional.one_hot(y, 3).double()
    # Dirichlet head, exp evidence (clamped at 10): mean of log S - log alpha_y plus w * KL(Dir(alpha~) || Dir(1))
    alpha = torch.exp(f.clamp(-10, 10)) + 1
    likelihood = torch.log(alpha.sum(1)) - torch.log(alpha[torch.arange(2), y])
    tilde = onehot + (1 - onehot) * alpha
    kl = kl_divergence(Dirichlet(tilde), Dirichlet(torch.ones_like(tilde)))
    got = detectors.create("evidential")._loss(f, onehot, 0.3)
    torch.testing.assert_close(got, likelihood.mean() + 0.3 * kl.mean())
    # plausibility head: alpha_i = K b_i / U + 1 from pl = sigmoid(f), plus (pl_y - (1 - I))^2
    pl = torch.sigmoid(f)
    masses = [_masses_by_enumeration(row.tolist()) for row in pl]
    b = torch.tensor([[m[tuple(int(j == i) for j in range(3))] for i in range(3)] for m in masses], dtype=f.dtype)
    ignorance = torch.tensor([m[(0, 0, 0)] for m in masses], dtype=f.dtype)
    alpha = 3 * b / (1 - b.sum(1, keepdim=True)) + 1
    likelihood = torch.log(alpha.sum(1)) - torch.log(alpha[torch.arange(2), y])
    tilde = onehot + (1 - onehot) * alpha
    kl = kl_divergence(Dirichlet(tilde), Dirichlet(torch.ones_like(tilde)))
    reg = (pl[torch.arange(2), y] - (1 - ignorance)) ** 2
    got = detectors.create("evidential", measure="ignorance", reg_weight=2.0)._loss(f, onehot, 0.05)
    torch.testing.assert_close(got, likelihood.mean() + 0.05 * kl.mean() + 2.0 * reg.mean())


# ---------------------------------------------------------------------------------------------- the detector
@pytest.fixture(scope="module")
def fitted():
    fit = _outputs(600, 1)
    return fit, {m: detectors.create("evidential", measure=m).fit(fit) for m in ("vacuity", "ignorance")}


@pytest.mark.parametrize("measure", ["vacuity", "ignorance"])
def test_far_features_get_more_vacuity_or_ignorance_than_the_fit_rows(measure):
    # post-ReLU-like clusters; the far rows are weak on every class's units and strong on units no class uses
    fit = id_outputs(100, seed=1)
    detector = detectors.create("evidential", measure=measure).fit(fit)
    near, far = detector.score(fit), detector.score(far_outputs(300, seed=3))
    assert float((far > np.quantile(near, 0.9)).mean()) > 0.9
    assert float(np.median(near)) < 0.1  # the fit rows are classified with evidence


@pytest.mark.parametrize("measure, head", [("dissonance", "vacuity"), ("confusion", "ignorance")])
def test_inputs_between_two_classes_are_more_dissonant_or_confused(fitted, measure, head):
    fit, by_head = fitted
    detector = by_head[head]
    detector.set_params(measure=measure)  # the same head serves both measures: no refit
    try:
        inside, between = np.asarray(detector.score(fit)), np.asarray(detector.score(_outputs(300, 4, between=(0, 1))))
    finally:
        detector.set_params(measure=head)
    assert float(np.median(between)) > float(np.quantile(inside, 0.9))


def test_measures_of_each_head(fitted):
    fit, by_head = fitted
    dirichlet = by_head["vacuity"].measures(fit)
    assert {"vacuity", "dissonance", "belief", "alpha"} <= set(dirichlet) and "ignorance" not in dirichlet
    plausibility = by_head["ignorance"].measures(fit)
    assert set(evidential.MEASURES) <= set(plausibility)
    # the plausibility head's Dirichlet has vacuity K / S = U, its total uncertainty I + C
    torch.testing.assert_close(plausibility["vacuity"], plausibility["uncertainty"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(plausibility["uncertainty"], plausibility["ignorance"] + plausibility["confusion"])
    assert float((plausibility["alpha"].argmax(1) == fit.labels).double().mean()) > 0.95


def test_a_measure_of_the_other_head_needs_a_refit(fitted):
    fit, by_head = fitted
    detector = detectors.clone(by_head["vacuity"])
    detector.state_ = by_head["vacuity"].state_
    detector.set_params(measure="ignorance")
    with pytest.raises(ValueError, match="fitted with the Dirichlet head; fit again"):
        detector.score(fit)


def test_training_is_seeded_and_a_saved_detector_scores_the_same(tmp_path, fitted):
    fit, by_head = fitted
    test = _outputs(200, 5, shift=1.0)
    for measure, detector in by_head.items():
        again = detectors.create("evidential", measure=measure).fit(fit)
        assert torch.equal(again.score(test), detector.score(test))
        detector.save(tmp_path / measure)
        assert torch.equal(detectors.load(tmp_path / measure).score(test), detector.score(test))
    other_seed = detectors.create("evidential", seed=1).fit(fit)
    assert not torch.equal(other_seed.score(test), by_head["vacuity"].score(test))
    assert torch.get_num_threads() >= 1  # the training restored the thread count it changed


@pytest.mark.parametrize("evidence", ["softplus", "relu"])
def test_other_evidence_activations_train_and_score_in_range(evidence):
    fit = _outputs(400, 1)
    scores = detectors.create("evidential", evidence=evidence).fit(fit).score(_outputs(100, 2))
    assert bool(torch.isfinite(scores).all()) and scores.min() > 0 and scores.max() <= 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="evidential: fit needs labels"):
        detectors.create("evidential").fit({"features": np.zeros((50, 3), dtype=np.float32)})
    one_row = _outputs(1, 1)
    with pytest.raises(ValueError, match="N=1 row.*at least 2 classes"):
        detectors.create("evidential").fit(one_row)
    single_class = ModelOutputs(features=torch.randn(20, 3), labels=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="labels of 1 class"):
        detectors.create("evidential").fit(single_class)
    with pytest.raises(ValueError, match="measure"):
        detectors.create("evidential", measure="entropy")
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        outputs = ModelOutputs(features=torch.randn(6, 3), logits=torch.randn(6, 3), labels=torch.arange(6))
        detectors.create("evidential").fit(outputs)
