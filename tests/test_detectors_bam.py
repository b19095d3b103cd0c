"""bam: boxes and box scores on hand-built clusters, per-class boxes, named layers, warnings and bad input."""

import warnings

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors import NotFittedError
from oodguard.detectors.bam import box_score, cluster_boxes

#: Two hand-built clusters in 2-D: A = (0, 0), (2, 1), (1, 3); B = (10, 10), (12, 10), (11, 10).
CLUSTER_A = [[0.0, 0.0], [2.0, 1.0], [1.0, 3.0]]
CLUSTER_B = [[10.0, 10.0], [12.0, 10.0], [11.0, 10.0]]


def test_boxes_are_the_cluster_ranges_enlarged_by_the_spread_with_a_minimum_half_width():
    z = torch.tensor(CLUSTER_A + CLUSTER_B)
    assignment = torch.tensor([0, 0, 0, 1, 1, 1])
    centres, half_widths = cluster_boxes(z, assignment, enlargement=0.0, min_half_width=0.25)
    # A spans [0, 2] x [0, 3]; B spans [10, 12] x [10, 10], whose zero height becomes the minimum 0.25
    np.testing.assert_allclose(centres.numpy(), [[1.0, 1.5], [11.0, 10.0]])
    np.testing.assert_allclose(half_widths.numpy(), [[1.0, 1.5], [1.0, 0.25]])
    _, enlarged = cluster_boxes(z, assignment, enlargement=2.0, min_half_width=0.25)
    spread_a = [np.std([0.0, 2.0, 1.0]), np.std([0.0, 1.0, 3.0])]  # population standard deviations
    spread_b = [np.std([10.0, 12.0, 11.0]), 0.0]
    np.testing.assert_allclose(enlarged[0].numpy(), [1.0 + 2 * spread_a[0], 1.5 + 2 * spread_a[1]])
    np.testing.assert_allclose(enlarged[1].numpy(), [1.0 + 2 * spread_b[0], 0.25])


def test_clusters_without_rows_get_no_box():
    centres, _ = cluster_boxes(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 2]), 0.0, 0.1)
    np.testing.assert_allclose(centres.numpy(), [[0.0], [1.0]])


def test_box_score_is_the_largest_normalised_deviation_from_the_centre():
    centres = torch.tensor([[1.0, 1.5], [11.0, 10.0]])
    half_widths = torch.tensor([[1.0, 1.5], [1.0, 0.25]])
    points = torch.tensor([[1.0, 1.5], [2.0, 3.0], [4.0, 1.5], [1.0, 4.5], [11.5, 10.5]])
    expected = [
        [0.0, max(10 / 1, 8.5 / 0.25)],
        [1.0, max(9 / 1, 7 / 0.25)],  # on A's corner: exactly 1, still inside
        [3.0, max(7 / 1, 8.5 / 0.25)],  # 3 half-widths right of A's centre
        [2.0, max(10 / 1, 5.5 / 0.25)],
        [max(10.5, 9 / 1.5), max(0.5, 0.5 / 0.25)],
    ]
    np.testing.assert_allclose(box_score(points, centres, half_widths).numpy(), expected)


def _cluster_outputs(points, classes, predicted=None):
    z = torch.tensor(points)
    labels = torch.tensor(classes)
    predicted = labels if predicted is None else torch.tensor(predicted)
    logits = torch.nn.functional.one_hot(predicted, 2).float() * 3.0
    return ModelOutputs(features=z, logits=logits, labels=labels)


def _points(points, predicted):
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), 2).float() * 3.0
    return ModelOutputs(features=torch.tensor(points), logits=logits)


def test_fitted_boxes_scores_and_decisions_on_two_hand_built_clusters():
    fit = _cluster_outputs(CLUSTER_A + CLUSTER_B, [0, 0, 0, 1, 1, 1])
    detector = detectors.create("bam", grouping="all", n_clusters=2).fit(fit)
    order = torch.argsort(detector.state_["centres"][:, 0])  # k-means numbers the clusters in its own order
    np.testing.assert_allclose(detector.state_["centres"][order].numpy(), [[1.0, 1.5], [11.0, 10.0]])
    # the minimum half-width is 0.01 x the mean per-column standard deviation of the six fit rows
    floor = 0.01 * np.std(np.array(CLUSTER_A + CLUSTER_B), axis=0).mean()
    np.testing.assert_allclose(detector.state_["half_widths"][order].numpy(), [[1.0, 1.5], [1.0, floor]])
    test = _points([[1.0, 1.5], [0.5, 2.0], [4.0, 1.5], [11.0, 10.0], [12.0, 10.0], [11.0, 10.0 + 3 * floor]], [0] * 6)
    scores = np.asarray(detector.score(test))
    np.testing.assert_allclose(scores, [0.0, 0.5, 3.0, 0.0, 1.0, 3.0], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(detector.inside(test)), [True, True, False, True, True, False])


def test_class_boxes_hold_only_correct_rows_and_rows_meet_only_their_predicted_class_boxes():
    # class 0: cluster A; class 1: cluster B plus a row at (6, 6) that the model gets wrong (predicts 0)
    fit = _cluster_outputs(CLUSTER_A + CLUSTER_B + [[6.0, 6.0]], [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0])
    detector = detectors.create("bam", n_clusters=1).fit(fit)
    state = detector.state_
    assert state["box_class"].tolist() == [0, 1]
    np.testing.assert_allclose(state["centres"].numpy(), [[1.0, 1.5], [11.0, 10.0]])  # (6, 6) is in no box
    # (1, 1.5) is A's centre: 0 when predicted 0, but scored against B's box when predicted 1
    scores = np.asarray(detector.score(_points([[1.0, 1.5], [1.0, 1.5]], [0, 1])))
    floor = state["half_widths"][1, 1].item()
    np.testing.assert_allclose(scores, [0.0, max(10 / 1, 8.5 / floor)])
    np.testing.assert_array_equal(np.asarray(detector.inside(_points([[1.0, 1.5], [1.0, 1.5]], [0, 1]))), [True, False])


def test_a_class_without_boxes_warns_and_is_scored_against_every_box():
    fit = _cluster_outputs(CLUSTER_A + CLUSTER_B, [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0])  # class 1 never right
    with pytest.warns(RuntimeWarning, match=r"class\(es\) 1 have no correctly classified fit row"):
        detector = detectors.create("bam", n_clusters=1).fit(fit)
    assert detector.meta_["classes_without_boxes"] == [1]
    assert detector.state_["box_class"].tolist() == [0]
    assert np.asarray(detector.score(_points([[1.0, 1.5]], [1])))[0] == 0.0


def test_fewer_rows_than_clusters_gives_one_cluster_per_row_with_a_warning():
    fit = _cluster_outputs(CLUSTER_A + CLUSTER_B, [0, 0, 0, 1, 1, 1])
    with pytest.warns(RuntimeWarning, match="n_clusters=5 but only rows in class 0: 3, 1: 3"):
        detector = detectors.create("bam", n_clusters=5).fit(fit)
    assert detector.state_["centres"].shape == (6, 2)
    scores = np.asarray(detector.score(_points(CLUSTER_A + CLUSTER_B, [0, 0, 0, 1, 1, 1])))
    np.testing.assert_allclose(scores, 0.0, atol=1e-12)  # each fit row is the centre of its own box


def _blobs(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.randint(0, 3, (n,), generator=g)
    features = centres[labels] + torch.randn(n, 6, generator=g) + shift
    logits = -torch.cdist(features, centres)
    return ModelOutputs(features=features, logits=logits, labels=labels)


def test_a_named_layer_is_monitored_flattened_and_needs_no_features():
    fit, test = _blobs(300, 1), _blobs(50, 2, shift=1.0)
    maps = {name: o.features.reshape(-1, 2, 3) for name, o in (("fit", fit), ("test", test))}
    on_features = detectors.create("bam").fit(fit)
    on_layer = detectors.create("bam", layer="block").fit(
        ModelOutputs(logits=fit.logits, labels=fit.labels, layers={"block": maps["fit"]})
    )
    test_layer = ModelOutputs(logits=test.logits, layers={"block": maps["test"]})
    np.testing.assert_allclose(np.asarray(on_layer.score(test_layer)), np.asarray(on_features.score(test)))
    with pytest.raises(ValueError, match=r"layer 'block' is missing from the outputs at score \(available: 'other'\)"):
        on_layer.score(ModelOutputs(logits=test.logits, layers={"other": maps["test"]}))
    with pytest.raises(ValueError, match="D=3 columns at score but D=6"):
        on_layer.score(ModelOutputs(logits=test.logits, layers={"block": maps["test"][:, :1]}))


def test_grouping_all_needs_only_the_monitored_layer():
    fit, test = _blobs(300, 1), _blobs(50, 2)
    detector = detectors.create("bam", grouping="all").fit(ModelOutputs(features=fit.features))
    assert detector.state_["box_class"].tolist() == [0, 0, 0]
    far = ModelOutputs(features=test.features + 30.0)
    assert (
        np.asarray(detector.score(far)).min() > np.asarray(detector.score(ModelOutputs(features=test.features))).max()
    )
    with pytest.raises(ValueError, match="fit needs labels"):
        detectors.create("bam").fit(ModelOutputs(features=fit.features, logits=fit.logits))


def test_enlargement_accepts_more_held_out_rows_and_seeded_fits_repeat(tmp_path):
    fit, test = _blobs(300, 1), _blobs(300, 2)
    exact = detectors.create("bam", n_clusters=3).fit(fit)
    enlarged = detectors.create("bam", n_clusters=3, enlargement=1.0).fit(fit)
    assert np.asarray(enlarged.inside(test)).mean() > np.asarray(exact.inside(test)).mean()
    again = detectors.create("bam", n_clusters=3).fit(fit)
    np.testing.assert_array_equal(np.asarray(again.score(test)), np.asarray(exact.score(test)))
    exact.save(tmp_path / "bam")
    loaded = detectors.load(tmp_path / "bam")
    np.testing.assert_array_equal(np.asarray(loaded.inside(test)), np.asarray(exact.inside(test)))


def test_bad_input_is_refused():
    fit = _blobs(60, 1)
    with pytest.raises(NotFittedError):
        detectors.create("bam").inside(fit)
    constant = ModelOutputs(features=torch.ones(10, 3), logits=torch.zeros(10, 2), labels=torch.zeros(10).long())
    with pytest.raises(ValueError, match="all equal"):
        detectors.create("bam", grouping="all").fit(constant)
    wrong = ModelOutputs(features=fit.features, logits=fit.logits, labels=(fit.logits.argmax(1) + 1) % 3)
    with pytest.raises(ValueError, match="no fit row is correctly classified"):
        detectors.create("bam").fit(wrong)
    with pytest.raises(ValueError, match="empty"):
        detectors.create("bam").fit(fit).inside(fit[:0])
    for params, match in (
        ({"min_half_width": 0.0}, "parameter 'min_half_width' must be a finite number > 0"),
        ({"grouping": "label"}, "parameter 'grouping' must be one of"),
        ({"n_clusters": 0}, "parameter 'n_clusters' must be"),
        ({"layer": ""}, "parameter 'layer' must be None or a non-empty string"),
    ):
        with pytest.raises(ValueError, match=match):
            detectors.create("bam", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean fit warns about nothing
        detectors.create("bam").fit(fit)
