"""Uncertainty attribution (UA-Backprop): known answers, the raw gradient against finite differences, shapes,
batching, and refusals."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import Guard, ModelOutputs, explain
from oodguard.detectors import base
from oodguard.detectors.base import NotFittedError
from oodguard.explain import DIFFERENTIABLE_DETECTORS, refine, score_gradients
from oodguard.extraction import ModelRunner

from detector_data import SMALL_DATA_PARAMS, detector_params, far_outputs, id_outputs

SIDE = 6
PIXEL = (2, 4)


def test_doctests():
    assert doctest.testmod(explain, raise_on_error=False).failed == 0


def one_pixel_model(weights=(-1.0, -2.0, -3.0)) -> nn.Module:
    """Logits ``-a_c * x[PIXEL]`` (a_c > 0), nothing else read: the energy score rises with that pixel alone."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, len(weights)))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[:, PIXEL[0] * SIDE + PIXEL[1]] = torch.tensor(weights)
        model[1].bias.zero_()
    return model


def images(n: int, seed: int, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, size=(n, channels, SIDE, SIDE)).astype(np.float32)


def one_pixel_guard(detector: str = "energy") -> Guard:
    return Guard(one_pixel_model(), detector=detector).fit(images(20, 0))


def test_a_score_read_from_one_pixel_is_attributed_to_that_pixel_alone():
    maps = one_pixel_guard().explain(images(5, 1))
    expected = np.zeros((5, SIDE, SIDE), np.float32)
    expected[:, PIXEL[0], PIXEL[1]] = 1.0
    assert maps.shape == (5, SIDE, SIDE) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps, expected)


def test_raw_gradient_of_energy_known_answer_and_sign():
    """d energy / d x_p = sum_c softmax(-a x_p)_c a_c > 0, worked out with numpy."""
    x = images(4, 2)
    raw = one_pixel_guard().explain(x, times_input=False, positive=False, normalize=False)
    a = np.array([1.0, 2.0, 3.0])
    xp = x[:, 0, PIXEL[0], PIXEL[1]].astype(np.float64)
    logits = -a[None, :] * xp[:, None]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(raw[:, PIXEL[0], PIXEL[1]], (p * a).sum(1), rtol=1e-5)
    assert (raw[:, PIXEL[0], PIXEL[1]] > 0).all()
    raw[:, PIXEL[0], PIXEL[1]] = 0
    assert not raw.any()


def test_a_pixel_that_lowers_the_score_is_dropped_by_the_positive_part():
    guard = Guard(one_pixel_model((1.0, 2.0, 3.0)), detector="energy").fit(images(20, 0))  # energy falls with x_p
    assert not guard.explain(images(3, 1)).any()  # nothing raises the score: zeros, not NaN
    signed = guard.explain(images(3, 1), positive=False, normalize=False)
    assert (signed[:, PIXEL[0], PIXEL[1]] < 0).all()


def test_gradient_times_input_sums_to_the_score_of_a_homogeneous_model():
    """For logits ``W x`` (no bias) maxlogit's score -max_c (W x)_c is homogeneous of degree 1 in x, so by Euler's
    theorem sum(x * grad) equals the score exactly: the completeness of gradient x input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * SIDE * SIDE, 4, bias=False))
    guard = Guard(model, detector="maxlogit").fit(images(10, 0, channels=2))
    x = images(6, 3, channels=2)
    maps = guard.explain(x, positive=False, normalize=False)
    np.testing.assert_allclose(maps.reshape(6, -1).sum(1), guard.score(x), rtol=1e-4, atol=1e-5)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("detector", ["energy", "msp", "entropy", "maxlogit", "mahalanobis", "knn", "vim"])
def test_raw_gradient_matches_finite_differences(detector):
    rng = np.random.default_rng(0)
    fit_x = rng.normal(size=(60, 5))
    labels = rng.integers(0, 3, size=60)
    params = {"knn": {"k": 3}, "vim": {"dim": 4}}.get(detector, {})
    guard = Guard(mlp(), detector=detector, detector_params=params).fit(fit_x, labels=labels)
    x = rng.normal(size=(4, 5))
    raw = guard.explain(x, times_input=False, positive=False, normalize=False)
    model = guard.model

    def score(inputs: np.ndarray) -> np.ndarray:  # float64 throughout (the guard's extraction works in float32)
        with torch.no_grad():
            t = torch.from_numpy(inputs)
            return guard.detector.score({"logits": model(t), "features": model[:-1](t)}).numpy()

    eps = 1e-6
    numeric = np.zeros_like(x)
    for j in range(5):
        step = np.zeros_like(x)
        step[:, j] = eps
        numeric[:, j] = (score(x + step) - score(x - step)) / (2 * eps)
    np.testing.assert_allclose(raw, numeric, rtol=1e-4, atol=1e-6 * np.abs(numeric).max())


@pytest.mark.parametrize("name", DIFFERENTIABLE_DETECTORS)
def test_every_listed_detector_backpropagates_its_own_score(name):
    """The gradient of each listed detector's score w.r.t. the features (logits = head(features)) equals central
    differences of ``detector.score`` (float64): the list holds no detector whose score autograd gets wrong."""
    params = {**detector_params(name), **SMALL_DATA_PARAMS.get(name, {})}
    detector = base.create(name, **params)
    fit = id_outputs(20, 0)
    weight, bias = (torch.as_tensor(np.asarray(t), dtype=torch.float64) for t in fit.head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector.fit(
            ModelOutputs(
                logits=np.asarray(fit.logits, np.float64),
                features=np.asarray(fit.features, np.float64),
                labels=fit.labels,
                head=(weight, bias),
            )
        )
    # points between ID and far OOD: away from the kinks of max/top-k/ReLU-like scores
    z0 = 0.5 * torch.as_tensor(np.asarray(far_outputs(3, 1).features), dtype=torch.float64)
    z0 = z0 + 0.5 * torch.as_tensor(np.asarray(fit.features[:3]), dtype=torch.float64)

    class Head(nn.Module):  # features in, logits out: the runner hooks the head's input as the features
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(weight.shape[1], weight.shape[0]).double()
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.copy_(bias)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.head(z)

    _, gradient = score_gradients(ModelRunner(Head()), detector, z0)

    def score(z: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(detector.score({"logits": z @ weight.T + bias, "features": z, "head": (weight, bias)}))

    eps = 1e-6
    numeric = torch.zeros_like(z0)
    for j in range(z0.shape[1]):
        step = torch.zeros_like(z0)
        step[:, j] = eps
        numeric[:, j] = (score(z0 + step) - score(z0 - step)) / (2 * eps)
    assert numeric.abs().max() > 0, "the test points sit where the score is flat: move them"
    torch.testing.assert_close(gradient, numeric, rtol=1e-4, atol=1e-6 * float(numeric.abs().max()))


def test_batches_give_the_same_maps_as_one_input_at_a_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIDE * SIDE, 5))
    guard = Guard(model, detector="energy", batch_size=4).fit(images(20, 0, channels=3))
    x = images(10, 5, channels=3)
    batched = guard.explain(x)
    alone = np.concatenate([guard.explain(x[i : i + 1]) for i in range(10)])
    assert batched.shape == (10, SIDE, SIDE)
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched.reshape(10, -1).sum(1), 1.0, rtol=1e-5)


def test_shapes_follow_the_inputs():
    vectors = Guard(nn.Linear(7, 3), detector="energy").fit(np.random.default_rng(0).normal(size=(9, 7)))
    assert vectors.explain(np.ones((2, 7), np.float32)).shape == (2, 7)
    single_channel = Guard(nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 3)), detector="msp")
    single_channel.fit(images(8, 0)[:, 0])
    assert single_channel.explain(images(3, 1)[:, 0]).shape == (3, SIDE, SIDE)


def test_smoothing_spreads_a_point_symmetrically_around_it():
    point = torch.zeros(1, 9, 9)
    point[0, 4, 4] = 1.0
    smoothed = refine(point, torch.ones_like(point), sigma=1.0)[0]
    assert smoothed.argmax() == 4 * 9 + 4
    torch.testing.assert_close(smoothed, smoothed.T)
    torch.testing.assert_close(smoothed, smoothed.flip(0))
    assert abs(float(smoothed.sum()) - 1.0) < 1e-6


def test_refusals_say_what_to_do():
    with pytest.raises(ValueError, match="no model"):
        Guard(detector="energy").fit({"logits": np.zeros((3, 2))}).explain(np.zeros((1, 2)))
    with pytest.raises(NotFittedError, match="fit"):
        Guard(one_pixel_model(), detector="mahalanobis").explain(images(1, 0))
    klm = Guard(one_pixel_model(), detector="klm").fit(images(20, 0))
    with pytest.raises(ValueError, match="'klm' cannot be explained.*Supported detectors: .*energy"):
        klm.explain(images(1, 0))
    with pytest.raises(ValueError, match="sigma"):
        one_pixel_guard().explain(images(1, 0), sigma=-1.0)
    with pytest.raises(ValueError, match="sigma: smoothing needs spatial maps"):
        Guard(nn.Linear(7, 3), detector="energy").fit(np.zeros((3, 7))).explain(np.ones((1, 7)), sigma=1.0)
    with pytest.raises(ValueError, match="no rows"):
        one_pixel_guard().explain(np.zeros((0, 1, SIDE, SIDE), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        refine(torch.zeros(2, 3), torch.zeros(2, 4))


class LogitsInADict(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x), "extra": x.flatten(1)}


def test_a_model_returning_a_dict_is_explained_through_output_key():
    guard = Guard(LogitsInADict(one_pixel_model()), detector="energy", output_key="logits").fit(images(20, 0))
    np.testing.assert_array_equal(guard.explain(images(3, 1)), one_pixel_guard().explain(images(3, 1)))


class NanToNum(nn.Module):
    """Masks NaN inputs to 0, so their score and gradient stay finite while gradient x input would be NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = one_pixel_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.nan_to_num(x))


def test_a_non_finite_input_is_refused_rather_than_mapped_to_nan():
    guard = Guard(NanToNum(), detector="energy").fit(images(20, 0))
    x = images(3, 1)
    x[1, 0, 0, 0] = np.nan
    assert np.isfinite(guard.score(x)).all()  # the model hides the NaN from the score
    with pytest.raises(ValueError, match=r"x: 1 input\(s\) contain NaN or infinite values \(rows \[1\]\)"):
        guard.explain(x)


def test_an_onnx_model_is_refused_because_it_gives_no_gradients(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from oodguard.extraction.onnx_model import OnnxModel

    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the older one
        torch.onnx.export(one_pixel_model(), (torch.from_numpy(images(2, 0)),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})  # fmt: skip
    guard = Guard(OnnxModel(path), detector="energy").fit(images(20, 0))
    with pytest.raises(ValueError, match="ONNX file run by onnxruntime, which gives no gradients"):
        guard.explain(images(1, 0))


def test_integer_images_are_refused_with_what_to_pass():
    guard = one_pixel_guard()
    for x in ((images(2, 1) * 255).astype(np.uint8), torch.zeros(2, 1, SIDE, SIDE, dtype=torch.int64)):
        with pytest.raises(
            ValueError, match="must be floating point, got .*(uint8|int64).*float32 scaled like the fit"
        ):
            guard.explain(x)
