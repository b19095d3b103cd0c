"""Model-based detectors: ODIN and GradNorm through autograd, checked against computations by hand."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.detectors.base import clone
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.model.gradient import ODIN, GradNormAutograd
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import ModelRunner

from detector_data import confidence_probe


@pytest.fixture(scope="module")
def images():  # 10 rows: three batches of 4 (overrides the shared 12-image fixture)
    return torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _odin_by_hand(model, x, t, eps, std):
    """Official ODIN step (mean CE to the argmax, sign with 0 -> +1, divide by std), then log((1 - s) / s)."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits / t, logits.argmax(dim=1))
    (g,) = torch.autograd.grad(loss, x)
    sign = (g >= 0).float() * 2 - 1
    x_tilde = x.detach() - eps * sign / std
    with torch.no_grad():
        p = torch.softmax(model(x_tilde).double() / t, dim=1)
    s = p.amax(dim=1)
    return torch.log((1 - s) / s)


@pytest.mark.parametrize("std", [None, [0.5, 2.0, 1.0]])
def test_odin_known_answer_linear(std):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4))
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    divisor = torch.ones(3) if std is None else torch.tensor(std)
    expected = _odin_by_hand(model, x, 10.0, 0.2, divisor)
    det = detectors.create("odin", temperature=10.0, epsilon=0.2).attach(
        ModelRunner(model, input_std=std, batch_size=3)
    )
    got = det.score(x)
    assert got.dtype == torch.float64 and got.shape == (7,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    plain = detectors.create("odin", temperature=10.0, epsilon=0.0).attach(ModelRunner(model)).score(x)
    assert not torch.allclose(got, plain)  # the perturbation matters at this step size
    assert all(p.grad is None for p in model.parameters())


def test_odin_known_answer_cnn_default_parameters(cnn, images):
    expected = _odin_by_hand(cnn, images, 1000.0, 0.0014, torch.tensor(1.0))
    got = detectors.create("odin").attach(ModelRunner(cnn, batch_size=4)).score(images)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    scaled = detectors.create("odin").attach(cnn, input_std=0.3081).score(images)
    torch.testing.assert_close(scaled, _odin_by_hand(cnn, images, 1000.0, 0.0014, 0.3081), rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in cnn.parameters())


def test_odin_epsilon_zero_is_temperature_scaled_msp(cnn, images):
    logits = extract(cnn, images, progress=False).logits.double()
    p = torch.softmax(logits / 1000.0, dim=1).amax(dim=1)
    got = detectors.create("odin", epsilon=0.0).attach(cnn).score(images)
    torch.testing.assert_close(got, torch.log((1 - p) / p), rtol=1e-7, atol=1e-12)


def test_odin_direction_confident_input_scores_lower():
    model, x = confidence_probe()  # confident, flat, almost flat
    scores = detectors.create("odin").attach(model).score(x)
    assert scores[0] < scores[2] < scores[1]


def test_odin_costs_two_forward_passes_and_one_backward(cnn, images, monkeypatch):
    calls = []
    handle = cnn.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    grads = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        grads.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        detectors.create("odin").attach(ModelRunner(cnn, batch_size=4)).score(images)
    finally:
        handle.remove()
    assert sum(calls) == 2 * len(images) and len(grads) == 3  # 3 batches: one backward each


def test_gradnorm_autograd_equals_closed_form(cnn, images):
    outputs = extract(cnn, images, progress=False)
    for t in (1.0, 2.5):
        closed = detectors.create("gradnorm", temperature=t).fit(outputs).score(outputs)
        auto = detectors.create("gradnorm_autograd", temperature=t)
        auto = auto.attach(ModelRunner(cnn, batch_size=4)).score(images)
        torch.testing.assert_close(auto, closed, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in cnn.parameters())


class _ScaledLogits(nn.Module):
    """The head's output is scaled afterwards: the closed form no longer applies, the true gradient does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return 3.0 * self.head(self.body(x))


def test_gradnorm_autograd_is_the_true_weight_gradient():
    torch.manual_seed(6)
    model = _ScaledLogits()
    x = torch.randn(6, 4)
    expected = []
    for i in range(6):  # the official procedure: one sample at a time, gradient of the head weight
        loss = -torch.log_softmax(model(x[i : i + 1]), dim=1).sum()
        (g,) = torch.autograd.grad(loss, model.head.weight)
        expected.append(-g.abs().sum().double())
    got = detectors.create("gradnorm_autograd").attach(ModelRunner(model, batch_size=4)).score(x)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-7)
    with pytest.warns(UserWarning, match="changes the logits after that layer"):
        outputs = extract(model, x, progress=False, feature_layer="head")
    closed = detectors.create("gradnorm").fit(outputs).score(outputs)
    assert not torch.allclose(got, closed, rtol=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_gradnorm_autograd_direction():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    near = torch.randn(20, 2) * 0.1
    far = torch.randn(20, 2) * 0.1 + 50.0  # large features and confident logits: large gradient norm
    det = detectors.create("gradnorm_autograd").attach(model)
    # GradNorm is larger for confident (ID-like) inputs, so their OOD score is lower.
    assert float(det.score(far).mean()) < float(det.score(near).mean())


def test_score_before_attach_and_save_load_round_trip(cnn, images, tmp_path):
    det = detectors.create("odin", temperature=100.0, epsilon=0.002, scale_by_std=False)
    with pytest.raises(RuntimeError, match="attach"):
        det.score(images)
    runner = ModelRunner(cnn, input_std=0.5)
    det.attach(runner).fit(images)
    before = det.score(images)
    det.save(tmp_path / "odin")
    loaded = detectors.load(tmp_path / "odin")
    assert type(loaded) is type(det) and loaded.params == det.params
    with pytest.raises(RuntimeError, match="attach"):
        loaded.score(images)
    torch.testing.assert_close(loaded.attach(runner).score(images), before)
    gn = detectors.create("gradnorm_autograd", temperature=2.0)
    gn.save(tmp_path / "gn")
    loaded_gn = detectors.load(tmp_path / "gn")
    assert isinstance(loaded_gn, GradNormAutograd) and loaded_gn.params == {"temperature": 2.0}


def test_numpy_inputs_give_numpy_scores_and_registry_metadata(cnn, images):
    scores = detectors.create("odin").attach(cnn).score(images.numpy())
    assert isinstance(scores, np.ndarray) and scores.shape == (10,)
    meta = detectors.info("odin")
    assert meta["requires"] == ["model"] and not meta["needs_fit"] and meta["paper"] and meta["code"]
    assert isinstance(detectors.create("odin"), ModelDetector) and detectors.create("odin").protocol == "model"
    # two registry names: the closed form on cached outputs, the true gradient through the model
    assert not detectors.info("gradnorm")["needs_model"] and detectors.info("gradnorm")["protocol"] == "outputs"
    assert detectors.needs_model("gradnorm_autograd") and not detectors.needs_model("gradnorm")
    assert detectors.info("gradnorm_autograd")["protocol"] == "model"
    assert detectors.create("gradnorm_autograd").requires == {"model"}


def test_bad_parameters_and_inputs(cnn):
    with pytest.raises(ValueError, match="temperature"):
        detectors.create("odin", temperature=0)
    with pytest.raises(ValueError, match="parameter 'epsilon' must be a finite number >= 0"):
        detectors.create("odin", epsilon=-0.1)
    with pytest.raises(ValueError, match="scale_by_std"):
        detectors.create("odin", scale_by_std="yes")
    with pytest.raises(ValueError, match="temperature"):
        detectors.create("gradnorm_autograd", temperature=float("inf"))
    with pytest.raises(ValueError, match="parameter 'mode' must be 'closed_form'"):
        detectors.create("gradnorm", mode="backprop")
    with pytest.raises(TypeError, match="attach expects"):
        detectors.create("odin").attach("model")
    odin = detectors.create("odin")  # model detectors offer no partial_fit (their fit runs the model)
    assert not odin.supports_partial_fit and not hasattr(odin, "partial_fit")
    with pytest.raises(ValueError, match="feature_layer"):
        headless = nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=1))
        detectors.create("gradnorm_autograd").attach(headless).score(torch.randn(2, 3))
    with pytest.raises(ValueError, match="output is not differentiable"):

        class Frozen(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(3, 2)

            def forward(self, x):
                return self.head(x).detach()

        detectors.create("odin").attach(Frozen()).score(torch.randn(2, 3))


def test_old_gradnorm_spelling_warns_and_gives_the_autograd_detector():
    with pytest.warns(DeprecationWarning, match="gradnorm_autograd"):
        det = detectors.create("gradnorm", mode="autograd", temperature=2.0)
    assert type(det) is GradNormAutograd and det.get_params() == {"temperature": 2.0}


# ---------------------------------------------------------------------- declared parameters
_DEFAULTS = {
    ODIN: {"temperature": 1000.0, "epsilon": 0.0014, "scale_by_std": True},
    GradNormAutograd: {"temperature": 1.0},
}


@pytest.mark.parametrize("cls", [ODIN, GradNormAutograd])
def test_signature_defaults_and_constraints(cls):
    signature = inspect.signature(cls)
    assert {name: p.default for name, p in signature.parameters.items()} == _DEFAULTS[cls]
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values())
    assert set(cls._parameter_constraints) == set(_DEFAULTS[cls])


@pytest.mark.parametrize(
    "cls, given",
    [(ODIN, {"temperature": 10, "epsilon": 0, "scale_by_std": False}), (GradNormAutograd, {"temperature": 2})],
)
def test_get_params_are_the_arguments_as_given_and_clone(cnn, cls, given):
    det = cls(**given).attach(cnn)
    params = det.get_params()
    assert params == given and all(type(params[k]) is type(v) for k, v in given.items())  # ints stay ints
    det.params["temperature"] = 5.0  # a fresh dict: writing into it changes nothing
    assert det.temperature == given["temperature"]
    copy = clone(det)
    assert type(copy) is cls and copy is not det and copy.get_params() == given and copy.runner_ is None


@pytest.mark.parametrize(
    "cls, param, value",
    [
        (ODIN, "temperature", 0),
        (ODIN, "temperature", -1.0),
        (ODIN, "temperature", float("nan")),
        (ODIN, "temperature", "1000"),
        (ODIN, "epsilon", -0.1),
        (ODIN, "epsilon", float("inf")),
        (ODIN, "epsilon", None),
        (ODIN, "scale_by_std", "yes"),
        (ODIN, "scale_by_std", 1),
        (GradNormAutograd, "temperature", 0.0),
        (GradNormAutograd, "temperature", float("inf")),
        (GradNormAutograd, "temperature", True),
    ],
)
def test_bad_value_names_the_parameter(cls, param, value):
    with pytest.raises(ValueError, match=f"{cls.name}: parameter '{param}' must be"):
        cls(**{param: value})
    det = cls()
    with pytest.raises(ValueError, match=f"parameter '{param}'"):
        det.set_params(**{param: value})
    assert det.get_params() == _DEFAULTS[cls]
