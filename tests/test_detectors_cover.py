"""CoVer: averaged base scores over corrupted views, checked against a plain loop over views by hand."""

import inspect

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodguard import detectors
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.detectors import NotFittedError
from oodguard.detectors.base import clone
from oodguard.detectors.model.cover import CoVer, parse_views
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import ModelRunner
from oodguard.views import CORRUPTIONS, corrupt


def _msp_log_odds_by_hand(logits):
    p = torch.softmax(logits.double(), dim=1).amax(dim=1)
    return torch.log((1 - p) / p)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_registered_as_model_detector():
    assert "cover" in detectors.available(needs_model=True)
    assert detectors.info("cover")["defaults"]["base"] == "msp"


@pytest.mark.parametrize("base", ["msp", "energy"])
def test_known_answer_mean_over_views(cnn, images, base):
    names = [("identity", None, 0), ("brightness-1", "brightness", 1), ("fog-2", "fog", 2), ("gb", "gaussian_blur", 2)]
    per_view = []
    for _, corruption, severity in names:
        x = images if corruption is None else corrupt(images, corruption, severity, seed=3, pixel_scale=1.0)
        logits = _logits(cnn, x)
        per_view.append(_msp_log_odds_by_hand(logits) if base == "msp" else -torch.logsumexp(logits.double(), 1))
    expected = sum(per_view) / len(per_view)
    det = CoVer(
        base=base, views=["identity", "brightness-1", "fog-s2", "gaussian_blur-2"], seed=3, pixel_scale=1.0
    ).attach(ModelRunner(cnn, batch_size=5))
    got = det.score(images)
    assert got.dtype == torch.float64 and got.shape == (12,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, per_view[0])  # the views change the score


def test_identity_only_equals_base_detector(cnn, images):
    outputs = extract(cnn, images, progress=False)
    for base in ("msp", "energy"):
        expected = detectors.create(base).score(outputs)
        got = CoVer(base=base, views=["identity"]).attach(cnn).score(images)
        torch.testing.assert_close(got, expected.to(torch.float64))


def test_fitted_base_on_identity_outputs(cnn, images):
    det = CoVer(base="vim", base_params={"dim": 8}, views=["identity"]).attach(cnn)
    with pytest.raises(NotFittedError):
        det.score(images)
    det.fit(images)
    outputs = extract(cnn, images, progress=False)
    expected = detectors.create("vim", dim=8).fit(outputs).score(outputs)
    torch.testing.assert_close(det.score(images), expected.to(torch.float64))


def test_recommended_and_all_view_sets():
    assert len(CoVer().view_list()) == 13
    assert [v.key for v in CoVer().view_list()][:2] == ["identity", "brightness-s1-seed0"]
    assert len(CoVer(views="all").view_list()) == 1 + 5 * len(CORRUPTIONS)
    keys = [v.key for v in parse_views(("identity", "fog-1", "fog-s1-seed5"), seed=2, pixel_scale=1.0)]
    assert keys == ["identity", "fog-s1-seed2-px1.0", "fog-s1-seed5-px1.0"]
    det = CoVer(views=("identity", "fog-1"), seed=2, pixel_scale=1)
    assert det.params["views"] == ("identity", "fog-1")  # stored as given
    assert [v.key for v in det.view_list()] == ["identity", "fog-s1-seed2-px1.0"]


@pytest.mark.parametrize(
    "views, match, function_match",
    [
        (["identity", "foggy-1"], "unknown corruption 'foggy'.*gaussian_noise.*elastic_transform", None),
        (["fog-6"], "outside 1-5", None),
        (["fog"], "cannot read", None),
        ("some", "one of 'recommended', 'all' or a list", "'recommended' or 'all'"),
        ([], "a list of at least 1 item", "non-empty list"),
        (["fog-1", "fog-s1-seed0"], "more than once", None),
        ([3], "each a non-empty string", "strings"),
    ],
)
def test_bad_views(views, match, function_match):
    with pytest.raises(ValueError, match="cover: parameter 'views' must be .*" + match):
        CoVer(views=views)
    with pytest.raises(ValueError, match=function_match or match):  # parse_views's own message
        parse_views(views)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"base": "odin"}, "parameter 'base'.*runs the model"),
        ({"base": "nope"}, "parameter 'base'.*available: .*msp"),
        ({"base": "gram"}, "parameter 'base'.*needs layers"),
        ({"base": "energy", "base_params": {"temperature": -1}}, "parameter 'base_params'.*temperature"),
        ({"base": "energy", "base_params": {"k": 1}}, "parameter 'base_params'.*unknown parameter.*'k'"),
        ({"base_params": [1]}, "parameter 'base_params'"),
        ({"seed": -1}, "parameter 'seed'"),
        ({"pixel_scale": 0}, "parameter 'pixel_scale'"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        CoVer(**params)


def test_signature_defaults_and_constraints():
    signature = inspect.signature(CoVer)
    defaults = {name: p.default for name, p in signature.parameters.items()}
    assert defaults == {"base": "msp", "base_params": None, "views": "recommended", "seed": 0, "pixel_scale": None,
                        "mean": None, "std": None}  # fmt: skip
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values())
    assert set(CoVer._parameter_constraints) == set(defaults)
    assert detectors.info("cover")["protocol"] == "model"


def test_get_params_are_the_arguments_as_given_and_clone(cnn, images):
    given = {"base": "vim", "base_params": {"dim": 8}, "views": ("identity", "fog-1"), "seed": 3, "pixel_scale": 1,
             "mean": (0.5,), "std": [0.25]}  # fmt: skip
    det = CoVer(**given)
    params = det.get_params()
    assert params == given and type(params["views"]) is tuple and type(params["pixel_scale"]) is int
    det.params["seed"] = 5  # a fresh dict: writing into it changes nothing
    assert det.seed == 3
    det.attach(cnn).fit(images)
    copy = clone(det)
    assert type(copy) is CoVer and copy.get_params() == given and copy.base_params is not det.base_params
    assert not copy.is_fitted and copy.runner_ is None
    stateless = CoVer(base="msp", views=["identity"])
    assert stateless.is_fitted and not stateless.needs_fit and CoVer.needs_fit and det.needs_fit
    calls = []
    handle = cnn.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        stateless.attach(cnn).fit(images)  # a base without fitted state: fit is a no-op
    finally:
        handle.remove()
    assert calls == [] and stateless.state_ == {}


@pytest.mark.parametrize(
    "param, value",
    [
        ("base", ""),
        ("base", 3),
        ("base", "odin"),
        ("base_params", {1: 2}),
        ("base_params", "dim=8"),
        ("views", "identity"),
        ("views", ["identity", None]),
        ("seed", 1.5),
        ("seed", True),
        ("pixel_scale", -1.0),
        ("pixel_scale", float("inf")),
        ("pixel_scale", "1"),
    ],
)
def test_bad_value_names_the_parameter(param, value):
    with pytest.raises(ValueError, match=f"cover: parameter '{param}' must be"):
        CoVer(**{param: value})
    det = CoVer()
    with pytest.raises(ValueError, match=f"parameter '{param}'"):
        det.set_params(**{param: value})
    assert det.get_params() == CoVer().get_params()


def test_bad_inputs(cnn, images):
    det = CoVer(views=["identity", "fog-1"]).attach(cnn)
    with pytest.raises(ValueError, match="DataLoader"):
        det.score(DataLoader(TensorDataset(images), batch_size=4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.score(images * 3)
    with pytest.raises(RuntimeError, match="attach"):
        CoVer().score(images)


def test_input_forms(cnn, images):
    det = CoVer(views=["identity", "fog-1"]).attach(cnn)
    reference = det.score(images)
    numpy_scores = det.score(images.numpy())
    assert isinstance(numpy_scores, np.ndarray)
    np.testing.assert_allclose(numpy_scores, reference.numpy())
    torch.testing.assert_close(det.score((images, torch.zeros(12, dtype=torch.long))), reference)


def test_save_load_round_trip(cnn, images, tmp_path):
    det = CoVer(base="vim", base_params={"dim": 8}, views=["identity", "brightness-2", "defocus_blur-1"], seed=4)
    det.attach(cnn).fit(images)
    det.save(tmp_path)
    loaded = detectors.load(tmp_path)
    assert isinstance(loaded, CoVer) and loaded.params == det.params
    with pytest.raises(RuntimeError, match="attach"):
        loaded.score(images)
    torch.testing.assert_close(loaded.attach(cnn).score(images), det.score(images))
    torch.testing.assert_close(loaded.base_detector().state_["basis"], det.base_detector().state_["basis"])


@pytest.mark.slow  # trains a CNN
def test_direction_noise_scores_higher():
    """A CNN trained briefly on ten noisy templates: uniform-noise images score higher than held-out digits."""
    g = torch.Generator().manual_seed(0)
    templates = (torch.rand(10, 1, 28, 28, generator=g) > 0.8).float()

    def sample(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        x = (templates[labels] * 0.9 + 0.1 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)
        return x, labels

    torch.manual_seed(0)
    model = DigitsCNN(num_classes=10)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = sample(32)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    id_x, _ = sample(64)
    ood_x = torch.rand(64, 1, 28, 28, generator=g)
    det = CoVer(views=["identity", "brightness-1", "fog-1", "gaussian_blur-2"], pixel_scale=1.0).attach(model)
    scores = torch.cat([det.score(id_x), det.score(ood_x)]).numpy()
    auroc = roc_auc_score(np.r_[np.zeros(64), np.ones(64)], scores)
    assert auroc > 0.9


def test_normalised_inputs_are_corrupted_in_pixel_space_and_normalised_again():
    """A Normalize pipeline: CoVer(mean, std) on normalised images scores as CoVer on the pixels with the
    normalisation inside the model."""
    torch.manual_seed(0)
    mean, std = (0.3,), (0.2,)
    pixels = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    normalised = (pixels - mean[0]) / std[0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 5))

    class NormaliseFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner((x - mean[0]) / std[0])

    views = ["identity", "brightness-1", "fog-2"]
    on_normalised = CoVer(views=views, mean=mean, std=std, pixel_scale=1.0).attach(model).score(normalised)
    on_pixels = CoVer(views=views, pixel_scale=1.0).attach(NormaliseFirst()).score(pixels)
    torch.testing.assert_close(on_normalised, on_pixels, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="values must lie in \\[0, 1\\].*give them \\(CoVer\\(mean=..., std=...\\)"):
        CoVer(views=views, pixel_scale=1.0).attach(model).score(normalised)
    with pytest.raises(ValueError, match="undoing the normalisation .* gives values in"):
        CoVer(views=views, mean=(0.0,), std=(1.0,), pixel_scale=1.0).attach(model).score(normalised)
    with pytest.raises(ValueError, match="parameter 'std'"):
        CoVer(mean=(0.5, 0.5), std=(0.2,))
