"""sdm: q on hand-made neighbour lists, the activation against its formula, and the whole score against a plain
loop reference written from the paper's definitions."""

import math
import warnings

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors import NotFittedError
from oodguard.detectors.sdm import class_sorted_table, distance_quantile, sdm_activation, sdm_log_odds, similarity_q


def test_q_counts_the_leading_matches_and_stops_at_the_first_miss():
    matches = torch.tensor(
        [
            [True, True, False, True],  # the fourth match comes after a miss: not counted
            [False, True, True, True],  # the nearest neighbour already misses
            [True, True, True, True],
        ]
    )
    assert similarity_q(matches).tolist() == [2, 0, 4]


#: Six training rows on a line with unequal gaps (no ties). Row 2 is misclassified (true 0, predicted 1), row 3
#: is class 1: the support classes by row are 0, 0, none, 1, 0, 0.
LINE = [0.0, 1.0, 3.0, 6.0, 10.0, 15.0]


def _line_outputs():
    features = torch.tensor([[x, 0.0] for x in LINE], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    predicted = torch.tensor([0, 0, 1, 1, 0, 0])
    logits = torch.nn.functional.one_hot(predicted, 2).double() * 2.0
    return ModelOutputs(features=features, logits=logits, labels=labels)


def _queries(positions, predicted):
    features = torch.tensor([[p, 0.0] for p in positions], dtype=torch.float64)
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), 2).double() * 2.0
    return ModelOutputs(features=features, logits=logits)


def test_q_and_the_nearest_distance_on_a_hand_made_neighbour_list():
    with pytest.warns(RuntimeWarning, match="class.es. 1 have no calibration row"):
        detector = detectors.create("sdm").fit(_line_outputs())
    parts = detector.components(_queries([-0.5, 16.0, 3.2, 6.4, 9.0], [0, 0, 1, 1, 0]))
    # -0.5 (class 0): rows 0, 1 match, then row 2 is misclassified -> q = 2
    # 16 (class 0): rows 5, 4 match, then row 3 is class 1 -> q = 2
    # 3.2 (class 1): the nearest, row 2, is misclassified -> q = 0
    # 6.4 (class 1): row 3 matches, then row 2 (3.4 away; row 4 is 3.6) is misclassified -> q = 1
    # 9 (class 0): row 4 matches, then row 3 is class 1 -> q = 1
    assert parts["q"].tolist() == [2, 2, 0, 1, 1]
    np.testing.assert_allclose(parts["nearest_distance"].numpy(), [0.5, 1.0, 0.2, 0.4, 1.0], atol=1e-12)


def test_fit_rows_leave_themselves_out_on_the_hand_made_line():
    with pytest.warns(RuntimeWarning):
        detector = detectors.create("sdm").fit(_line_outputs())
    # Each fit row against the other five: row 0 -> row 1 matches, then row 2 misses: q 1, d0 1 (true class 0);
    # row 1 -> row 0 matches (1 away), then row 2: q 1, d0 1; row 2 (predicted 1) -> row 1 is class 0: q 0;
    # row 3 -> row 2 is misclassified: q 0; row 4 -> row 3 is class 1: q 0; row 5 -> row 4 matches (5 away): q 1.
    # Class 0's calibration distances are those of the rows with q > 0: 1, 1, 5; class 1 has none.
    state = detector.state_
    assert state["distance_counts"].tolist() == [3, 0]
    np.testing.assert_allclose(state["distance_table"][0].numpy(), [1.0, 1.0, 5.0], rtol=1e-12)
    assert detector.meta_["calibration"].startswith("fit rows")


def test_distance_quantile_is_the_fraction_of_calibration_distances_at_or_above():
    table, counts = class_sorted_table(
        torch.tensor([3.0, 1.0, 4.0, 2.0, 5.0, 0.5]), torch.tensor([0, 0, 0, 0, 1, 1]), num_classes=3
    )
    assert counts.tolist() == [4, 2, 0]
    assert table[0].tolist() == [1.0, 2.0, 3.0, 4.0] and table[1, :2].tolist() == [0.5, 5.0]
    nearest = torch.tensor([2.5, 0.7, 6.0, 2.0, 0.1])
    # class 0: 2/4, 4/4, 0/4, 3/4 (2.0 itself counts as at or above), 4/4; class 1: 1/2, 1/2, 0/2, 1/2, 2/2;
    # class 2 has no calibration distance and is left out of the minimum
    np.testing.assert_allclose(distance_quantile(nearest, table, counts).numpy(), [0.5, 0.5, 0.0, 0.5, 1.0])
    predicted = torch.tensor([0, 0, 1, 2, 1])
    np.testing.assert_allclose(distance_quantile(nearest, table, counts, predicted).numpy(), [0.5, 1.0, 0.0, 0.0, 1.0])


def test_the_activation_is_the_formula_and_reduces_to_softmax():
    z = np.array([[2.0, 1.0, -1.0], [0.3, 0.2, 0.1], [5.0, -2.0, 1.0]])
    q = np.array([3.0, 0.0, 10.0])
    d = np.array([0.5, 1.0, 0.0])
    powers = (2.0 + q[:, None]) ** (d[:, None] * z)  # (2 + q)^(d z_k), straight from the paper
    expected = powers / powers.sum(axis=1, keepdims=True)
    got = sdm_activation(torch.tensor(z), torch.tensor(q), torch.tensor(d)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    softmax = sdm_activation(torch.tensor(z), torch.full((3,), math.e - 2), torch.ones(3))
    torch.testing.assert_close(softmax, torch.softmax(torch.tensor(z), dim=1))
    log_odds = sdm_log_odds(torch.tensor(z), torch.tensor(q), torch.tensor(d)).numpy()
    top = expected.max(axis=1)
    np.testing.assert_allclose(log_odds, np.log((1 - top) / top), rtol=1e-12)
    assert log_odds[2] == pytest.approx(math.log(2))  # d = 0: flat over C = 3 classes


def test_log_odds_stay_finite_and_ordered_where_the_probability_saturates():
    z = torch.tensor([[400.0, 0.0], [300.0, 0.0]], dtype=torch.float64)
    q, d = torch.tensor([50.0, 50.0]), torch.tensor([1.0, 1.0])
    assert (sdm_activation(z, q, d)[:, 0] == 1.0).all()  # saturated: 1 - p ties at 0
    scores = sdm_log_odds(z, q, d)
    assert torch.isfinite(scores).all() and scores[0] < scores[1]


# ---------------------------------------------------------------------- the whole score against a plain loop
def _blobs(n, seed, classes=3, dim=4, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 2.5
    labels = torch.randint(0, classes, (n,), generator=g)
    features = centres[labels] + torch.randn(n, dim, generator=g) + shift
    logits = -torch.cdist(features, centres) + 0.3 * torch.randn(n, classes, generator=g)  # a few mistakes
    return ModelOutputs(features=features, logits=logits, labels=labels)


def _reference(fit, calibration, test, max_q):
    """q, d0, d and the log-odds score by plain loops over rows, from the definitions (numpy, float64)."""
    support = fit.features.double().numpy()
    support_class = np.where(fit.logits.argmax(1) == fit.labels, fit.logits.argmax(1), -1)

    def q_and_d0(rows, predicted):
        out = []
        for row, label in zip(rows, predicted, strict=True):
            distances = np.sqrt(((support - row) ** 2).sum(axis=1))
            order = np.argsort(distances, kind="stable")[: min(max_q, len(support))]
            q = 0
            for index in order:
                if support_class[index] != label:
                    break
                q += 1
            out.append((q, distances[order[0]]))
        return np.array(out)

    cal = q_and_d0(calibration.features.double().numpy(), calibration.logits.argmax(1).numpy())
    per_class = {}
    for (q, d0), label in zip(cal, calibration.labels.numpy(), strict=True):
        if q > 0:
            per_class.setdefault(int(label), []).append(d0)
    scores, qs, ds = [], [], []
    z = test.logits.double().numpy()
    for (q, d0), logits in zip(q_and_d0(test.features.double().numpy(), z.argmax(1)), z, strict=True):
        d = min(np.mean(np.asarray(values) >= d0) for values in per_class.values())
        powers = (2.0 + q) ** (d * (logits - logits.max()))  # the predicted class's power is 1
        scores.append(np.log(np.delete(powers, logits.argmax()).sum()))  # (1 - p) / p, without cancelling in 1 - p
        qs.append(q)
        ds.append(d)
    return np.array(scores), np.array(qs), np.array(ds)


@pytest.mark.parametrize("max_q", [1000, 3])
def test_score_matches_a_plain_loop_reference_after_calibration(max_q):
    fit, calibration, test = _blobs(300, 1), _blobs(120, 2), _blobs(80, 3, shift=0.7)
    detector = detectors.create("sdm", max_q=max_q).fit(fit).calibrate(calibration)
    expected, q, d = _reference(fit, calibration, test, max_q)
    parts = detector.components(test)
    np.testing.assert_array_equal(parts["q"].numpy(), q)
    np.testing.assert_allclose(parts["d"].numpy(), d, atol=1e-12)
    np.testing.assert_allclose(np.asarray(detector.score(test)), expected, rtol=1e-9, atol=1e-12)
    assert q.max() <= max_q and (q > 0).any() and (d > 0).any() and (d < 1).any()
    assert detector.meta_["calibration"] == "held-out rows" and detector.meta_["calibration_rows"] == 120


def test_the_fit_rows_calibrate_by_leaving_themselves_out():
    fit, test = _blobs(200, 1), _blobs(50, 3)
    detector = detectors.create("sdm").fit(fit)
    # the same tables as calibrating on the fit rows against the other 199: drop row i from the support for row i
    state = detector.state_
    support_class = np.where(fit.logits.argmax(1) == fit.labels, fit.logits.argmax(1), -1)
    x = fit.features.double().numpy()
    expected = {}
    for i in range(len(x)):
        distances = np.sqrt(((x - x[i]) ** 2).sum(axis=1))
        distances[i] = np.inf
        order = np.argsort(distances, kind="stable")
        if support_class[order[0]] == int(fit.logits[i].argmax()):
            expected.setdefault(int(fit.labels[i]), []).append(distances[order[0]])
    for label, values in expected.items():
        count = int(state["distance_counts"][label])
        np.testing.assert_allclose(state["distance_table"][label, :count].numpy(), np.sort(values), rtol=1e-6)
    assert np.isfinite(np.asarray(detector.score(test))).all()


def test_predicted_class_distance_uses_only_that_class():
    fit, calibration, test = _blobs(300, 1), _blobs(120, 2), _blobs(60, 3)
    detector = detectors.create("sdm", distance="predicted").fit(fit).calibrate(calibration)
    state = detector.state_
    parts = detector.components(test)
    for row in range(len(test)):
        label = int(parts["prediction"][row])
        values = state["distance_table"][label, : int(state["distance_counts"][label])].numpy()
        assert parts["d"][row].item() == pytest.approx(np.mean(values >= parts["nearest_distance"][row].item()))


def test_is_ood_is_the_bin_zero_rule_and_q_zero_is_always_ood():
    fit, calibration = _blobs(300, 1), _blobs(150, 2)
    test = ModelOutputs.concat([_blobs(60, 3), _blobs(60, 4, shift=6.0)])
    detector = detectors.create("sdm").fit(fit).calibrate(calibration)
    parts = detector.components(test)
    state = detector.state_
    # soft bin = ln((2 + q)^F), F = fraction of class ŷ's calibration outputs below sdm(z)_ŷ (1 at or above the top)
    for row in range(len(test)):
        label = int(parts["prediction"][row])
        outputs = state["output_table"][label, : int(state["output_counts"][label])].numpy()
        p = parts["probability"][row].item()
        fraction = 1.0 if p >= outputs.max() else np.mean(outputs < p)
        assert parts["soft_bin"][row].item() == pytest.approx(fraction * math.log(2 + int(parts["q"][row])))
    flagged = np.asarray(detector.is_ood(test))
    assert flagged.dtype == bool
    np.testing.assert_array_equal(flagged, (parts["soft_bin"] < 1).numpy() | (parts["d"] == 0).numpy())
    assert flagged[(parts["q"] == 0).numpy()].all()
    assert flagged[60:].mean() > flagged[:60].mean()


def test_faiss_gives_the_exact_torch_neighbours():
    pytest.importorskip("faiss")
    fit, calibration, test = _blobs(300, 1), _blobs(120, 2), _blobs(80, 3, shift=0.7)
    scores = {}
    for backend in ("torch", "faiss"):
        detector = detectors.create("sdm", backend=backend).fit(fit)
        loo = detector.score(test)
        scores[backend] = (loo, detector.calibrate(calibration).score(test))
    for a, b in zip(scores["torch"], scores["faiss"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_calibration_is_saved_and_refit_forgets_it(tmp_path):
    fit, calibration, test = _blobs(200, 1), _blobs(100, 2), _blobs(40, 3)
    detector = detectors.create("sdm").fit(fit)
    before = np.asarray(detector.score(test))
    detector.calibrate(calibration)
    detector.save(tmp_path / "sdm")
    loaded = detectors.load(tmp_path / "sdm")
    np.testing.assert_array_equal(np.asarray(loaded.score(test)), np.asarray(detector.score(test)))
    assert loaded.meta_["calibration"] == "held-out rows"
    assert not np.array_equal(before, np.asarray(detector.score(test)))
    np.testing.assert_array_equal(np.asarray(detector.fit(fit).score(test)), before)


def test_bad_calibration_and_parameters_are_refused():
    fit = _blobs(100, 1)
    with pytest.raises(NotFittedError, match="before calibrate"):
        detectors.create("sdm").calibrate(fit)
    detector = detectors.create("sdm").fit(fit)
    with pytest.raises(ValueError, match="calibrate needs labels"):
        detector.calibrate(fit.with_fields(labels=None))
    with_ood = ModelOutputs(features=fit.features[:5], logits=fit.logits[:5], labels=torch.tensor([0, 1, -1, 2, -1]))
    with pytest.raises(ValueError, match="2 OOD-labelled"):
        detector.calibrate(with_ood)
    with pytest.raises(ValueError, match="D=5"):
        detector.calibrate(ModelOutputs(features=torch.zeros(4, 5), logits=fit.logits[:4], labels=fit.labels[:4]))
    with pytest.raises(ValueError, match="parameter 'distance' must be one of"):
        detectors.create("sdm", distance="mean")
    with pytest.raises(ValueError, match="parameter 'max_q' must be"):
        detectors.create("sdm", max_q=0)


def test_calibration_without_any_similar_row_is_refused():
    fit = _blobs(100, 1)
    detector = detectors.create("sdm").fit(fit)
    # every calibration row predicted as a class whose nearest support rows belong to another class
    far_from_class_2 = fit.features[fit.labels == 0][:10]
    logits = torch.nn.functional.one_hot(torch.full((10,), 2), 3).float() * 5
    with pytest.raises(ValueError, match="no calibration row has q > 0"):
        detector.calibrate(ModelOutputs(features=far_from_class_2, logits=logits, labels=torch.full((10,), 2)))


def test_a_class_without_similar_calibration_rows_warns():
    fit = _blobs(200, 1)
    detector = detectors.create("sdm").fit(fit)
    calibration = _blobs(100, 2)
    keep = calibration.labels != 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector.calibrate(calibration[keep.numpy()])
    assert any("class(es) 1 have no calibration row" in str(w.message) for w in caught)
    assert int(detector.state_["distance_counts"][1]) == 0


def test_components_and_is_ood_follow_the_input_type_and_refuse_empty_input():
    fit, test = _blobs(100, 1), _blobs(10, 2)
    detector = detectors.create("sdm").fit(fit)
    as_numpy = {"features": test.features.numpy(), "logits": test.logits.numpy()}
    parts = detector.components(as_numpy)
    assert all(isinstance(value, np.ndarray) for value in parts.values())
    assert isinstance(detector.is_ood(as_numpy), np.ndarray)
    assert isinstance(detector.is_ood(test.with_fields(labels=None)), torch.Tensor)
    with pytest.raises(ValueError, match="empty"):
        detector.is_ood(test[:0])
    with pytest.raises(ValueError, match="needs logits"):
        detector.components({"features": test.features.numpy()})
