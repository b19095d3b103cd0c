"""Zero-shot detectors (MCM, NegLabel, CLIPN, LAPT): known answers, direction, saving and bad input."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodguard import detectors
from oodguard.detectors import NotFittedError
from oodguard.detectors.base import clone
from oodguard.detectors.zeroshot import negative_groups

D = 16


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def space():
    """ID inputs near K=4 labels; OOD inputs near directions the negatives and "no" prompts cover."""
    rng = np.random.default_rng(0)
    labels = unit_rows(rng.normal(size=(4, D)))
    ood_concepts = unit_rows(rng.normal(size=(3, D)))
    negatives = unit_rows(np.concatenate([ood_concepts + 0.3 * rng.normal(size=(3, D)), rng.normal(size=(27, D))]))
    y = np.arange(80) % 4
    id_inputs = unit_rows(labels[y] + 0.15 * rng.normal(size=(80, D)))
    ood_inputs = unit_rows(ood_concepts[np.arange(60) % 3] + 0.15 * rng.normal(size=(60, D)))
    no_labels = unit_rows(-labels + 0.5 * rng.normal(size=(4, D)))
    return {
        "labels": labels.astype(np.float32), "negatives": negatives.astype(np.float32), "y": y,
        "id": id_inputs.astype(np.float32), "ood": ood_inputs.astype(np.float32),
        "no": no_labels.astype(np.float32),
    }  # fmt: skip


def make(name: str, space: dict, **params) -> detectors.Detector:
    text = {"label_embeddings": space["labels"]}
    if name in ("neglabel", "lapt"):
        text["negative_embeddings"] = space["negatives"]
    if name == "clipn":
        text["no_label_embeddings"] = space["no"]
    if name == "lapt":
        params = {"epochs": 3, **params}
    detector = detectors.create(name, **text, **params)
    if name == "lapt":
        detector.fit({"features": space["id"], "labels": space["y"]})
    return detector


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    return float((ood_scores[:, None] > id_scores[None, :]).mean() + 0.5 * (ood_scores[:, None] == id_scores).mean())


# ---------------------------------------------------------------------- MCM
def test_mcm_by_hand():
    # v = e1, labels e1 and e2, T = 1: S = e / (e + 1), score 1 - S = 1 / (1 + e)
    detector = detectors.create("mcm", label_embeddings=np.eye(2, dtype=np.float32))
    np.testing.assert_allclose(detector.score({"features": np.array([[5.0, 0.0]])}), [1 / (1 + math.e)], rtol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_mcm_matches_numpy(space, temperature):
    x = np.concatenate([space["id"], space["ood"]])
    expected = 1 - softmax((x @ space["labels"].T).astype(np.float64) / temperature).max(axis=1)
    got = make("mcm", space, temperature=temperature).score({"features": 3.0 * x})  # normalised again inside
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)


def test_mcm_keeps_confident_inputs_apart():
    # at T = 0.001 both inputs have S_MCM = 1 in float64, yet 1 - S (about e^-500 and e^-600) still ranks them
    labels = np.eye(3, dtype=np.float32)
    inputs = np.array([[1.0, 0.5, 0.0], [1.0, 0.4, 0.0]], dtype=np.float32)
    scores = detectors.create("mcm", label_embeddings=labels, temperature=0.001).score({"features": inputs})
    assert 0 < scores[1] < scores[0] < 1e-100


# ---------------------------------------------------------------------- NegLabel
def reference_neglabel(x, labels, negatives, group_index, scale):
    """The official grouping loop: softmax over [ID, group negatives], ID mass summed, averaged over groups."""
    pos = scale * unit_rows(x) @ labels.T
    neg = scale * unit_rows(x) @ negatives.T
    scores = []
    for g in range(group_index.shape[0]):
        full = softmax(np.concatenate([pos, neg[:, group_index[g]]], axis=1).astype(np.float64))
        scores.append(full[:, : labels.shape[0]].sum(axis=1))
    return 1 - np.mean(scores, axis=0)


def test_neglabel_by_hand():
    # v = e1, one label e1, one negative e2, scale 1, one group: S = e / (e + 1), score 1 / (1 + e)
    detector = detectors.create(
        "neglabel", label_embeddings=np.eye(2)[:1], negative_embeddings=np.eye(2)[1:], scale=1.0, groups=1
    )
    np.testing.assert_allclose(detector.score({"features": np.array([[1.0, 0.0]])}), [1 / (1 + math.e)], rtol=1e-7)


@pytest.mark.parametrize(("groups", "scale"), [(1, 100.0), (4, 100.0), (7, 10.0)])
def test_neglabel_matches_the_official_loop(space, groups, scale):
    detector = make("neglabel", space, groups=groups, scale=scale)
    x = np.concatenate([space["id"], space["ood"]])
    scores = detector.score({"features": x})
    index = detector.state_["group_index"].numpy()  # built from the parameters on first use
    assert index.shape == (groups, 30 // groups)
    expected = reference_neglabel(x, space["labels"], space["negatives"], index, scale)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-9)


def test_negative_groups_drop_the_last_then_permute_with_the_seed():
    index = negative_groups(23, 5, seed=0)
    assert index.shape == (5, 4)
    assert sorted(index.flatten().tolist()) == list(range(20))  # the last 23 mod 5 = 3 are dropped
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(0)).reshape(5, 4)
    assert torch.equal(index, expected)
    assert not torch.equal(negative_groups(23, 5, seed=1), index)
    # fewer negatives than groups: one group per negative
    assert sorted(negative_groups(3, 100, seed=0).flatten().tolist()) == [0, 1, 2]
    assert negative_groups(3, 100, seed=0).shape == (3, 1)


def test_neglabel_with_fewer_negatives_than_groups_averages_single_negatives(space):
    detector = make("neglabel", space, groups=100)
    x = space["ood"][:5]
    singles = [
        detectors.create(
            "neglabel", label_embeddings=space["labels"], negative_embeddings=space["negatives"][j : j + 1], groups=1
        ).score({"features": x})
        for j in range(30)
    ]
    np.testing.assert_allclose(detector.score({"features": x}), np.mean(singles, axis=0), rtol=1e-5)


def test_neglabel_keeps_confident_id_inputs_apart():
    # 1 - S is about e^-100 here: computed directly, not as 1 - (1 - tiny)
    detector = detectors.create("neglabel", label_embeddings=np.eye(3)[:1], negative_embeddings=np.eye(3)[1:], groups=1)
    scores = detector.score({"features": np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0]])})
    assert 0 < scores[0] < scores[1] < 1e-30


# ---------------------------------------------------------------------- CLIPN
def reference_clipn(x, yes, no, scale):
    x = unit_rows(x)
    s_yes, s_no = scale * x @ yes.T, scale * x @ no.T
    p = softmax(s_yes.astype(np.float64))
    p_yes = 1 / (1 + np.exp(-(s_yes - s_no).astype(np.float64)))
    atd = 1 - (p * p_yes).sum(axis=1)
    ctw = 1 - p_yes[np.arange(len(x)), p.argmax(axis=1)]
    return atd, ctw


def test_clipn_by_hand():
    # v = e1, yes labels e1, e2; no labels e2, e1; scale 1: p = (e, 1) / (e + 1);
    # p_yes = (sigmoid(1), sigmoid(-1)); ATD = 1 - sum p p_yes; CTW = 1 - sigmoid(1)
    yes, no = np.eye(2), np.eye(2)[::-1].copy()
    v = {"features": np.array([[1.0, 0.0]])}
    sig = 1 / (1 + math.exp(-1))
    p1 = math.e / (math.e + 1)
    atd = detectors.create("clipn", label_embeddings=yes, no_label_embeddings=no, scale=1.0).score(v)
    ctw = detectors.create("clipn", label_embeddings=yes, no_label_embeddings=no, scale=1.0, rule="ctw").score(v)
    np.testing.assert_allclose(atd, [1 - (p1 * sig + (1 - p1) * (1 - sig))], rtol=1e-7)
    np.testing.assert_allclose(ctw, [1 - sig], rtol=1e-7)


@pytest.mark.parametrize("scale", [100.0, 10.0])
def test_clipn_matches_numpy(space, scale):
    x = np.concatenate([space["id"], space["ood"]])
    atd, ctw = reference_clipn(x, space["labels"], space["no"], scale)
    np.testing.assert_allclose(make("clipn", space, scale=scale).score({"features": x}), atd, rtol=1e-4, atol=1e-9)
    got = make("clipn", space, scale=scale, rule="ctw").score({"features": x})
    np.testing.assert_allclose(got, ctw, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------- LAPT
def test_lapt_starts_from_neglabel(space):
    # with a vanishing learning rate the tuned embeddings are the given ones: the NegLabel score
    lapt = make("lapt", space, lr=1e-12)
    x = {"features": np.concatenate([space["id"], space["ood"]])}
    np.testing.assert_allclose(lapt.score(x), make("neglabel", space).score(x), rtol=1e-5, atol=1e-12)


def test_lapt_one_step_is_sgd_on_the_multi_class_cross_entropy(space):
    # one full batch, no mixing, no momentum or decay: tuned = normalize(t - lr * grad of CE over K + M classes)
    lr, scale = 0.5, 10.0
    lapt = make(
        "lapt", space, epochs=1, batch_size=200, lr=lr, momentum=0.0, weight_decay=0.0, alpha=0.0,
        negative_samples="label", scale=scale,
    )  # fmt: skip
    anchors = torch.tensor(np.concatenate([space["labels"], space["negatives"]]))
    inputs = torch.tensor(np.concatenate([space["id"], space["negatives"]]))
    targets = torch.tensor(np.concatenate([space["y"], 4 + np.arange(30)]))
    delta = torch.zeros_like(anchors, requires_grad=True)
    logits = scale * inputs.double() @ F.normalize(anchors.double() + delta.double(), dim=1).T
    torch.nn.functional.cross_entropy(logits, targets).backward()
    expected = F.normalize(anchors.double() - lr * delta.grad, dim=1)
    np.testing.assert_allclose(lapt.state_["tuned_labels"].numpy(), expected[:4].numpy(), atol=2e-5)
    np.testing.assert_allclose(lapt.state_["tuned_negatives"].numpy(), expected[4:].numpy(), atol=2e-5)


def test_lapt_default_pseudo_inputs_transplant_the_label_component_by_hand():
    # One ID input v = a e1 + b e2 of label t_0 = e1 (so every donor is v), negatives e3 and e4:
    # normalize(v - (v . t_y)(t_y - e_j)) = normalize(a e_j + b e2), i.e. (a e3 + b e2) / sqrt(a^2 + b^2) for e3.
    a, b = 0.6, 0.8
    lr, scale = 0.5, 4.0
    eye = np.eye(4, dtype=np.float32)
    v = a * eye[0] + b * eye[1]
    lapt = detectors.create(
        "lapt", label_embeddings=eye[:1], negative_embeddings=eye[2:], groups=1, epochs=1, batch_size=8, lr=lr,
        momentum=0.0, weight_decay=0.0, alpha=0.0, scale=scale,
    )  # fmt: skip
    assert lapt.params["negative_samples"] == "transplant"  # the default
    lapt.fit({"features": v[None], "labels": np.array([0])})

    def one_step(inputs):  # normalize(t - lr * grad) of the mean CE over labels [e1, e3, e4], targets 0, 1, 2
        anchors = torch.tensor(np.concatenate([eye[:1], eye[2:]]), dtype=torch.float64)
        delta = torch.zeros_like(anchors, requires_grad=True)
        logits = scale * torch.tensor(inputs, dtype=torch.float64) @ F.normalize(anchors + delta, dim=1).T
        F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        return F.normalize(anchors - lr * delta.grad, dim=1).numpy()

    pseudo = np.stack([a * eye[2] + b * eye[1], a * eye[3] + b * eye[1]])  # already unit length: a^2 + b^2 = 1
    expected = one_step(np.concatenate([v[None], pseudo]))
    tuned = np.concatenate([lapt.state_["tuned_labels"].numpy(), lapt.state_["tuned_negatives"].numpy()])
    np.testing.assert_allclose(tuned, expected, atol=1e-6)
    # the test tells the formulas apart: with the negatives themselves as inputs ("label") the step differs
    assert np.abs(one_step(np.concatenate([v[None], eye[2:]])) - expected).max() > 1e-2


def test_lapt_moves_labels_towards_their_inputs_across_a_modality_gap():
    rng = np.random.default_rng(5)
    labels = unit_rows(rng.normal(size=(3, D)))
    gap = unit_rows(rng.normal(size=(1, D)))
    y = np.arange(90) % 3
    inputs = unit_rows(labels[y] + 1.5 * gap + 0.2 * rng.normal(size=(90, D))).astype(np.float32)
    negatives = unit_rows(rng.normal(size=(20, D))).astype(np.float32)
    lapt = detectors.create("lapt", label_embeddings=labels, negative_embeddings=negatives, groups=5, batch_size=32)
    lapt.fit({"features": inputs, "labels": y})
    means = unit_rows(np.stack([inputs[y == k].mean(0) for k in range(3)]))
    before = (labels * means).sum(1)
    after = (lapt.state_["tuned_labels"].numpy() * means).sum(1)
    assert (after > before + 0.05).all(), (before, after)
    np.testing.assert_allclose(np.linalg.norm(lapt.state_["tuned_negatives"].numpy(), axis=1), 1, rtol=1e-5)


def test_lapt_is_seeded(space):
    x = {"features": space["ood"]}
    first, again, other = make("lapt", space), make("lapt", space), make("lapt", space, seed=1)
    np.testing.assert_array_equal(first.score(x), again.score(x))
    assert not np.array_equal(first.score(x), other.score(x))


def test_lapt_refuses_labels_beyond_the_label_embeddings(space):
    lapt = detectors.create("lapt", label_embeddings=space["labels"], negative_embeddings=space["negatives"])
    with pytest.raises(NotFittedError, match="before score"):
        lapt.score({"features": space["id"]})
    with pytest.raises(ValueError, match="K=4 label embeddings"):
        lapt.fit({"features": space["id"], "labels": space["y"] + 1})


# ---------------------------------------------------------------------- all four
NAMES = ["mcm", "neglabel", "clipn", "lapt"]


@pytest.mark.parametrize("name", NAMES)
def test_ood_near_negatives_or_far_from_labels_scores_higher(space, name):
    detector = make(name, space)
    id_scores, ood_scores = detector.score({"features": space["id"]}), detector.score({"features": space["ood"]})
    assert id_scores.dtype == np.float64 and np.isfinite(id_scores).all()
    assert auroc(id_scores, ood_scores) > 0.95
    assert ((0 <= np.r_[id_scores, ood_scores]) & (np.r_[id_scores, ood_scores] <= 1)).all()  # 1 - S, S in [0, 1]


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_keeps_the_text_side_as_tensors(space, name, tmp_path):
    from oodguard import persist

    detector = make(name, space)
    path = detector.save(tmp_path)
    header = persist.read_header(path)
    assert header["params"]["label_embeddings"] == {"__tensor__": "param.label_embeddings", "numpy": True}
    loaded = detectors.load(tmp_path)
    for key, value in detector.params.items():
        np.testing.assert_array_equal(np.asarray(loaded.params[key]), np.asarray(value))
    x = {"features": np.concatenate([space["id"][:5], space["ood"][:5]])}
    np.testing.assert_array_equal(loaded.score(x), detector.score(x))
    if name == "lapt":  # a loaded LAPT refits from the original embeddings it saved
        np.testing.assert_array_equal(
            loaded.fit({"features": space["id"], "labels": space["y"]}).score(x), detector.score(x)
        )


@pytest.mark.parametrize("name", NAMES)
def test_missing_text_side_is_refused_at_construction(space, name):
    with pytest.raises(ValueError, match=f"{name}: parameter 'label_embeddings' must be a tensor or numpy array"):
        detectors.create(name)


@pytest.mark.parametrize("name", NAMES)
def test_feature_width_must_match_the_embeddings(space, name):
    detector = make(name, space)
    with pytest.raises(ValueError, match="D=17"):
        detector.score({"features": np.ones((2, D + 1), dtype=np.float32)})


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_feature_rows_are_refused(space, name):
    detector = make(name, space)
    features = space["id"][:3].copy()
    features[1] = 0.0  # no direction: normalising leaves it at 0 and its score would be arbitrary
    with pytest.raises(ValueError, match=rf"{name}: features at score has 1 all-zero row.*row 1.*drop them"):
        detector.score({"features": features})
    if name == "lapt":
        with pytest.raises(ValueError, match=r"lapt: features at fit has 1 all-zero row"):
            detector.fit({"features": features, "labels": space["y"][:3]})


def test_mcm_refuses_a_single_label_but_neglabel_clipn_and_lapt_take_one(space):
    one = space["labels"][:1]
    with pytest.raises(ValueError, match="mcm: parameter 'label_embeddings' must be at least 2 ID label embeddings"):
        detectors.create("mcm", label_embeddings=one)
    x = {"features": np.concatenate([space["id"], space["ood"]])}
    # with one label the others still rank inputs: NegLabel against the negatives, CLIPN against the no prompt
    neglabel = detectors.create("neglabel", label_embeddings=one, negative_embeddings=space["negatives"])
    clipn = detectors.create("clipn", label_embeddings=one, no_label_embeddings=space["no"][:1])
    for scores in (neglabel.score(x), clipn.score(x)):
        assert np.isfinite(scores).all() and np.ptp(scores) > 0.1
    lapt = detectors.create("lapt", label_embeddings=one, negative_embeddings=space["negatives"], epochs=1)
    lapt.fit({"features": space["id"][space["y"] == 0], "labels": np.zeros(20, dtype=np.int64)})
    assert np.ptp(lapt.score(x)) > 0.1


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("mcm", {"label_embeddings": np.ones(3)}, "with 2 dimensions"),
        ("mcm", {"label_embeddings": np.array([[1.0, np.nan]])}, "NaN"),
        ("mcm", {"label_embeddings": np.eye(2), "temperature": 0.0}, "temperature"),
        (
            "neglabel",
            {"label_embeddings": np.eye(2), "negative_embeddings": np.ones((2, 3))},
            "parameter 'negative_embeddings' must be a matrix as wide",
        ),
        ("neglabel", {"label_embeddings": np.eye(2), "negative_embeddings": np.eye(2), "groups": 0}, "groups"),
        ("neglabel", {"label_embeddings": np.eye(2), "negative_embeddings": np.eye(2), "scale": -1.0}, "scale"),
        (
            "clipn",
            {"label_embeddings": np.eye(3), "no_label_embeddings": np.eye(3)[:2]},
            "parameter 'no_label_embeddings' must be one no-prompt",
        ),
        ("clipn", {"label_embeddings": np.eye(2), "no_label_embeddings": np.eye(2), "rule": "max"}, "rule"),
        ("lapt", {"label_embeddings": np.eye(2), "negative_embeddings": np.eye(2), "lr": 0.0}, "lr"),
        ("lapt", {"label_embeddings": np.eye(2), "negative_embeddings": np.eye(2), "negative_samples": "x"}, "'label'"),
    ],
)
def test_bad_parameters_are_refused(name, params, match):
    with pytest.raises(ValueError, match=match):
        detectors.create(name, **params)


def test_tensor_parameters_must_be_arrays():
    with pytest.raises(ValueError, match="parameter 'label_embeddings' must be a tensor or numpy array"):
        detectors.create("mcm", label_embeddings=[[1.0, 0.0]])


def test_the_written_out_sgd_step_equals_torch_sgd():
    from oodguard.detectors.zeroshot import _sgd_step

    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(5, 3, generator=generator)
    reference = ours.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    velocity = torch.zeros_like(ours)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=generator)
        reference.grad = grad.clone()
        optimizer.step()
        _sgd_step(ours, grad, velocity, 0.1, 0.9, 1e-2)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {
    "mcm": {"label_embeddings": None, "temperature": 1.0},
    "neglabel": {"label_embeddings": None, "negative_embeddings": None, "scale": 100.0, "groups": 100, "seed": 0},
    "clipn": {"label_embeddings": None, "no_label_embeddings": None, "rule": "atd", "scale": 100.0},
    "lapt": {
        "label_embeddings": None, "negative_embeddings": None, "scale": 100.0, "groups": 100, "seed": 0,
        "epochs": 10, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "alpha": 1.0,
        "negative_samples": "transplant",
    },
}  # fmt: skip
TEXT = {
    "mcm": ("label_embeddings",),
    "neglabel": ("label_embeddings", "negative_embeddings"),
    "clipn": ("label_embeddings", "no_label_embeddings"),
    "lapt": ("label_embeddings", "negative_embeddings"),
}
GIVEN = {
    "mcm": {"temperature": 2},
    "neglabel": {"scale": 50, "groups": np.int64(4), "seed": 3},
    "clipn": {"rule": "ctw", "scale": 10},
    "lapt": {
        "scale": 50, "groups": 4, "seed": 1, "epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0,
        "weight_decay": 0, "alpha": 0.5, "negative_samples": "label",
    },
}  # fmt: skip


def text_side(space: dict, name: str, torch_tensors: bool = False) -> dict:
    source = {"label_embeddings": "labels", "negative_embeddings": "negatives", "no_label_embeddings": "no"}
    text = {key: space[source[key]] for key in TEXT[name]}
    return {k: torch.from_numpy(v) for k, v in text.items()} if torch_tensors else text


@pytest.mark.parametrize("name", NAMES)
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    cls = detectors.implementation(name)
    parameters = inspect.signature(cls).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert set(cls._parameter_constraints) == set(DEFAULTS[name])
    assert set(cls.required_params) == set(TEXT[name])
    assert detectors.info(name)["defaults"] == DEFAULTS[name]


@pytest.mark.parametrize("torch_tensors", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_get_params_return_the_embeddings_as_given_and_clone_is_unfitted(space, name, torch_tensors):
    text = text_side(space, name, torch_tensors)
    given = {**text, **GIVEN[name]}
    detector = detectors.create(name, **given)
    params = detector.get_params()
    for key, value in given.items():
        assert params[key] is value  # the very object passed: no copy, no normalisation, no conversion
    fit = {"features": space["id"], "labels": space["y"]}
    x = {"features": np.concatenate([space["id"][:5], space["ood"][:5]])}
    scores = detector.fit(fit).score(x)
    assert all(detector.get_params()[key] is value for key, value in given.items())  # fitting changes none
    copy = clone(detector)
    assert type(copy) is type(detector) and copy.is_fitted == (not detector.needs_fit)
    assert copy.state_ is None  # the normalised embeddings are built on first use, never at construction
    for key, value in given.items():
        copied = copy.get_params()[key]
        assert type(copied) is type(value)
        if key in text:
            np.testing.assert_array_equal(np.asarray(copied), np.asarray(value))
        else:
            assert copied == value
    np.testing.assert_array_equal(copy.fit(fit).score(x), scores)


def test_construction_builds_no_state_and_set_params_rebuilds_it(space):
    detector = detectors.create("mcm", label_embeddings=space["labels"])
    assert detector.state_ is None
    x = {"features": space["ood"][:4]}
    before = detector.score(x)
    assert detector.state_ is not None  # built on first use
    detector.set_params(label_embeddings=space["labels"][::-1].copy(), temperature=0.5)
    assert detector.state_ is None
    expected = detectors.create("mcm", label_embeddings=space["labels"][::-1].copy(), temperature=0.5).score(x)
    np.testing.assert_array_equal(detector.score(x), expected)
    assert not np.array_equal(detector.score(x), before)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mcm", {"label_embeddings": None}),
        ("mcm", {"label_embeddings": np.ones((1, 2, 2))}),
        ("mcm", {"temperature": -1.0}),
        ("mcm", {"temperature": math.inf}),
        ("neglabel", {"negative_embeddings": None}),
        ("neglabel", {"negative_embeddings": np.ones(4)}),
        ("neglabel", {"scale": 0}),
        ("neglabel", {"groups": 2.0}),
        ("neglabel", {"seed": -1}),
        ("clipn", {"no_label_embeddings": None}),
        ("clipn", {"no_label_embeddings": [[1.0, 0.0]]}),
        ("clipn", {"rule": "ATD"}),
        ("clipn", {"scale": "100"}),
        ("lapt", {"negative_embeddings": torch.ones(3)}),
        ("lapt", {"epochs": 0}),
        ("lapt", {"batch_size": 0}),
        ("lapt", {"lr": -0.1}),
        ("lapt", {"momentum": 1.0}),
        ("lapt", {"weight_decay": -1e-5}),
        ("lapt", {"alpha": -1.0}),
        ("lapt", {"negative_samples": None}),
    ],
)
def test_each_constrained_parameter_names_itself_in_the_one_error_format(space, name, params):
    (param,) = params
    given = {**text_side(space, name), **params}
    with pytest.raises(ValueError, match=rf"^{name}: parameter '{param}' must be .*; got "):
        detectors.create(name, **given)
