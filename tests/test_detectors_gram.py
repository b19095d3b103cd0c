"""Gram-matrix detector: known answers against a plain-loop transcription of the official notebook logic."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors import NotFittedError, base
from oodguard.detectors.base import clone

# Until detectors/__init__.py imports the gram module, importing it here would register "gram" for the whole
# session, and suites that run every registered detector on data without layers would pick it up. So the
# registration is undone at once and made again, per test, by the fixture below.
_BUILT_IN = "gram" in detectors.available()
from oodguard.detectors.gram import Gram, gram_features  # noqa: E402

if not _BUILT_IN:
    base._REGISTRY.pop("gram", None)


@pytest.fixture(autouse=True)
def _gram_registered(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "gram", Gram)


# ---------------------------------------------------------------------- independent reference (plain loops)
def _reference_g(fmap: np.ndarray, p: int) -> np.ndarray:
    """Official G_p for one row: element-wise power, full C x C Gram matrix, row sums, signed p-th root."""
    f = fmap.reshape(fmap.shape[0], -1).astype(np.float64) ** p
    gram = f @ f.T
    v = gram.sum(axis=1)
    return np.sign(v) * np.abs(v) ** (1.0 / p)


def _reference_scores(fit: dict, test: dict, names: list[str], powers: int, fraction=0.1, seed=0, groups=None):
    """Tables from the non-held-out fit rows, E_l from the held-out ones, then sum_l delta_l / E_l."""
    n = len(fit["logits"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    held, table = order[: int(fraction * n)], sorted(order[int(fraction * n) :])

    def msp_pred(logits):
        probs = []
        for row in logits.astype(np.float64):
            e = np.exp(row - row.max())
            probs.append(e / e.sum())
        probs = np.array(probs)
        return probs.max(axis=1), probs.argmax(axis=1)

    fit_conf, fit_pred = msp_pred(fit["logits"])
    groups = fit_pred if groups is None else groups
    num_classes = fit["logits"].shape[1]
    mins = [[[None] * powers for _ in names] for _ in range(num_classes)]
    maxs = [[[None] * powers for _ in names] for _ in range(num_classes)]
    all_min = [[None] * powers for _ in names]
    all_max = [[None] * powers for _ in names]
    for i in table:
        c = groups[i]
        for li, name in enumerate(names):
            for pi in range(powers):
                g = _reference_g(fit["layers"][name][i], pi + 1)
                for tables_min, tables_max in ((mins[c], maxs[c]), (all_min, all_max)):
                    if tables_min[li][pi] is None:
                        tables_min[li][pi], tables_max[li][pi] = g, g
                    else:
                        tables_min[li][pi] = np.minimum(tables_min[li][pi], g)
                        tables_max[li][pi] = np.maximum(tables_max[li][pi], g)
    for c in range(num_classes):  # classes without rows: the range over all rows (the detector's documented choice)
        if mins[c][0][0] is None:
            mins[c], maxs[c] = all_min, all_max

    def deviations(data, i, conf, pred):
        out = []
        for li, name in enumerate(names):
            dev = 0.0
            for pi in range(powers):
                g = _reference_g(data["layers"][name][i], pi + 1)
                mn, mx = mins[pred][li][pi], maxs[pred][li][pi]
                dev += (np.maximum(mn - g, 0) / np.abs(mn + 1e-6)).sum()
                dev += (np.maximum(g - mx, 0) / np.abs(mx + 1e-6)).sum()
            out.append(dev / conf)
        return np.array(out)

    validation = np.array([deviations(fit, i, fit_conf[i], fit_pred[i]) for i in held])
    norm = validation.mean(axis=0) + 1e-7
    test_conf, test_pred = msp_pred(test["logits"])
    return np.array([(deviations(test, i, test_conf[i], test_pred[i]) / norm).sum() for i in range(len(test_conf))])


# ---------------------------------------------------------------------- data
def _data(n: int, seed: int, num_classes: int = 3, scale: float = 1.0, never: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, num_classes)) * 2
    if never is not None:
        logits[:, never] = -50.0  # never predicted
    return {
        "logits": logits,
        "labels": rng.integers(0, num_classes, size=n),
        "layers": {
            "conv": scale * rng.normal(size=(n, 3, 2, 2)),  # negative values: odd powers keep their sign
            "vec": scale * np.abs(rng.normal(size=(n, 4))),
        },
    }


def _outputs(data: dict, labels: bool = False) -> ModelOutputs:
    return ModelOutputs(logits=data["logits"], layers=data["layers"], labels=data["labels"] if labels else None)


# ---------------------------------------------------------------------- known answers
def test_gram_features_match_full_gram_matrix():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(4, 3, 2, 3))
    got = gram_features(torch.from_numpy(maps), 5).numpy()
    assert got.shape == (4, 5, 3) and got.dtype == np.float64
    for i in range(4):
        for p in range(1, 6):
            np.testing.assert_allclose(got[i, p - 1], _reference_g(maps[i], p), rtol=1e-12)
    assert (got[:, 2] < 0).any()  # an odd power of mixed-sign maps gives negative row sums
    zero = gram_features(torch.zeros(1, 2, 3), 3)
    assert torch.equal(zero, torch.zeros(1, 3, 2))  # |0|^(1/p) stays 0, no NaN


@pytest.mark.parametrize("powers", [3, 10])
def test_scores_match_plain_loop_reference(powers):
    fit, test = _data(40, seed=1), _data(9, seed=2, scale=1.5)
    detector = Gram(powers=powers).fit(_outputs(fit))
    expected = _reference_scores(fit, test, ["conv", "vec"], powers)
    np.testing.assert_allclose(detector.score(_outputs(test)), expected, rtol=1e-10)
    assert detector.meta_["layers"] == ["conv", "vec"]  # all layers, sorted by name


def test_label_grouping_selected_layer_and_split_parameters():
    fit, test = _data(50, seed=3), _data(7, seed=4)
    detector = Gram(powers=2, layers=["vec"], grouping="label", normalizer_fraction=0.2, seed=5)
    detector.fit(_outputs(fit, labels=True))
    expected = _reference_scores(fit, test, ["vec"], 2, fraction=0.2, seed=5, groups=fit["labels"])
    np.testing.assert_allclose(detector.score(_outputs(test)), expected, rtol=1e-10)


def test_class_never_predicted_uses_range_over_all_rows_and_warns():
    fit, test = _data(40, seed=6, never=2), _data(8, seed=7)
    with pytest.warns(RuntimeWarning, match=r"class\(es\) 2 have no fit row"):
        detector = Gram(powers=3).fit(_outputs(fit))
    assert detector.meta_["empty_classes"] == [2]
    assert (_data(8, seed=7)["logits"].argmax(1) == 2).any()  # the test set does reach the empty class
    np.testing.assert_allclose(detector.score(_outputs(test)), _reference_scores(fit, test, ["conv", "vec"], 3))


# ---------------------------------------------------------------------- direction, types, saving
def test_far_cluster_scores_higher():
    fit = _data(200, seed=8)
    detector = Gram().fit(_outputs(fit))
    id_scores = detector.score(_outputs(_data(50, seed=9)))
    ood_scores = detector.score(_outputs(_data(50, seed=10, scale=10.0)))
    assert id_scores.dtype == np.float64 and np.isfinite(id_scores).all()
    assert ood_scores.min() > np.median(id_scores)
    assert (ood_scores[:, None] > id_scores[None, :]).mean() > 0.99


def test_torch_in_torch_out_and_save_load(tmp_path):
    fit, test = _data(40, seed=11), _data(6, seed=12)
    detector = detectors.create("gram", powers=4).fit(_outputs(fit))
    as_torch = ModelOutputs(
        logits=torch.from_numpy(test["logits"]), layers={k: torch.from_numpy(v) for k, v in test["layers"].items()}
    )
    scores = detector.score(as_torch)
    assert isinstance(scores, torch.Tensor)
    np.testing.assert_allclose(scores.numpy(), detector.score(_outputs(test)), rtol=1e-12)
    detector.save(tmp_path / "gram")
    loaded = detectors.load(tmp_path / "gram")
    assert type(loaded) is Gram and loaded.params == detector.params and loaded.meta_ == detector.meta_
    np.testing.assert_array_equal(loaded.score(_outputs(test)), detector.score(_outputs(test)))


def test_no_partial_fit_and_not_fitted():
    detector = Gram()
    assert not detector.supports_partial_fit and detectors.info("gram")["partial_fit"] is False
    with pytest.raises(TypeError, match="partial_fit is not available"):
        detector.partial_fit(_outputs(_data(20, seed=0)))
    with pytest.raises(NotFittedError):
        detector.score(_outputs(_data(3, seed=0)))


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"grouping": "true"}, "parameter 'grouping' must be one of 'predicted', 'label'"),
        ({"powers": 0}, "parameter 'powers' must be an integer >= 1"),
        ({"powers": 2.5}, "parameter 'powers' must be an integer >= 1"),
        ({"powers": True}, "parameter 'powers' must be an integer >= 1"),
        ({"layers": "conv"}, "parameter 'layers' must be None or a list"),
        ({"layers": []}, "parameter 'layers' must be None or a list"),
        ({"layers": ["a", "a"]}, "parameter 'layers' must be a list of distinct layer names"),
        ({"normalizer_fraction": 0}, "parameter 'normalizer_fraction' must be a finite number > 0 and < 1"),
        ({"normalizer_fraction": 1.0}, "parameter 'normalizer_fraction' must be a finite number > 0 and < 1"),
        ({"seed": 1.5}, "parameter 'seed' must be an integer"),
        ({"seed": True}, "parameter 'seed' must be an integer"),
        ({"layers": ["conv", ""]}, "parameter 'layers' must be None or a list"),
        ({"normalizer_fraction": float("nan")}, "parameter 'normalizer_fraction' must be"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        Gram(**params)


def test_missing_layer_lists_available_names():
    data = _data(30, seed=0)
    with pytest.raises(
        ValueError, match=r"\['block3'\] are missing from the outputs at fit \(available: 'conv', 'vec'\)"
    ):
        Gram(layers=["conv", "block3"]).fit(_outputs(data))
    detector = Gram(powers=2).fit(_outputs(data))
    only_conv = ModelOutputs(logits=data["logits"], layers={"conv": data["layers"]["conv"]})
    with pytest.raises(ValueError, match=r"\['vec'\] are missing from the outputs at score \(available: 'conv'\)"):
        detector.score(only_conv)


def test_layers_of_inconsistent_n_and_missing_fields():
    data = _data(30, seed=0)
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        Gram().fit({"logits": data["logits"], "layers": {"conv": data["layers"]["conv"][:20]}})
    with pytest.raises(ValueError, match="fit needs layers"):
        Gram().fit({"logits": data["logits"]})
    with pytest.raises(ValueError, match="fit needs logits"):
        Gram().fit({"layers": data["layers"]})


def test_label_grouping_needs_labels_in_range():
    data = _data(30, seed=0)
    with pytest.raises(ValueError, match="grouping='label' needs labels"):
        Gram(grouping="label").fit(_outputs(data))
    bad = ModelOutputs(logits=data["logits"], layers=data["layers"], labels=np.full(30, 7))
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        Gram(grouping="label").fit(bad)


def test_too_few_rows_for_held_out_split():
    with pytest.raises(ValueError, match="too few to hold out normalizer_fraction=0.1"):
        Gram().fit(_outputs(_data(9, seed=0)))


def test_layer_shape_change_at_score():
    detector = Gram(powers=2).fit(_outputs(_data(30, seed=0)))
    test = _data(4, seed=1)
    test["layers"]["conv"] = np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"layers\['conv'\] has per-row shape \[3, 3, 3\] at score but \[3, 2, 2\]"):
        detector.score(_outputs(test))


def test_float64_overflow_is_refused():
    data = _data(30, seed=0)
    data["layers"]["vec"] = data["layers"]["vec"] * 1e20
    with pytest.raises(ValueError, match=r"overflows float64 at powers up to 10"):
        Gram().fit(_outputs(data))


# ---------------------------------------------------------------------- a real CNN
@pytest.mark.filterwarnings("ignore:.*have no fit row:RuntimeWarning")
def test_end_to_end_on_digits_cnn(tmp_path):
    from oodguard.benchmark.digits_model import DigitsCNN
    from oodguard.extraction.extract import extract

    torch.manual_seed(0)
    model = DigitsCNN(num_classes=10)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 28, 28, generator=generator)
    names = ["features.3", "features.0"]
    fit = extract(model, images, layers=names, progress=False)
    test = extract(model, torch.rand(12, 1, 28, 28, generator=generator), layers=names, progress=False)
    assert fit.layers["features.0"].shape == (60, 16, 28, 28)
    detector = Gram().fit(fit)
    assert detector.meta_["layers"] == ["features.0", "features.3"]
    scores = detector.score(test)
    assert scores.shape == (12,) and torch.isfinite(scores).all()
    detector.save(tmp_path / "gram")
    np.testing.assert_array_equal(detectors.load(tmp_path / "gram").score(test).numpy(), scores.numpy())


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {"powers": 10, "layers": None, "grouping": "predicted", "normalizer_fraction": 0.1, "seed": 0}


def test_signature_names_every_parameter_keyword_only_with_its_default():
    parameters = inspect.signature(Gram).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert set(Gram._parameter_constraints) == set(DEFAULTS)
    assert Gram().get_params() == DEFAULTS == detectors.info("gram")["defaults"]


@pytest.mark.parametrize(
    "given",
    [
        {"powers": 2, "layers": ("vec", "conv"), "grouping": "label", "normalizer_fraction": 0.2, "seed": np.int64(5)},
        {"powers": np.int32(3), "layers": ["vec"], "grouping": "predicted", "normalizer_fraction": 0.25, "seed": -1},
    ],
)
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(given):
    detector = Gram(**given)
    params = detector.get_params()
    assert params == given and params["layers"] is given["layers"]  # a tuple stays a tuple, not a copy
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in given.items()}
    fit, test = _outputs(_data(50, seed=3), labels=True), _outputs(_data(7, seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class may have no fit row
        detector.fit(fit)
        copy = clone(detector)
        assert type(copy) is Gram and copy.get_params() == params and not copy.is_fitted
        assert detector.get_params() == params  # fitting changes no parameter
        np.testing.assert_array_equal(copy.fit(fit).score(test), detector.score(test))


def test_set_params_validates_and_keeps_the_old_values_on_error():
    detector = Gram(powers=3)
    detector.params["powers"] = 7  # a fresh dict: writing into it changes nothing
    with pytest.raises(ValueError, match="parameter 'normalizer_fraction' must be"):
        detector.set_params(powers=4, normalizer_fraction=1.0)
    assert detector.powers == 3 and detector.normalizer_fraction == 0.1
