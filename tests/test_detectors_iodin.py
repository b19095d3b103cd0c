"""i-ODIN: scores against the official computation replayed by hand (mean cross-entropy, one masked element)."""

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.detectors.model.iodin import largest_gradient_step
from oodguard.extraction.model_runner import ModelRunner

from detector_data import assert_model_round_trip, confidence_probe


def _iodin_by_hand(model, x, t, eps, std):
    """The official postprocessor: CE to the argmax at T, gradient, mask of the largest |g| per sample over every
    channel and position, sign with 0 -> +1 divided by the channel's std, step; then log((1 - s) / s)."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits / t, logits.argmax(dim=1))
    (g,) = torch.autograd.grad(loss, x)
    x_tilde = x.detach().clone()
    for i in range(len(x)):
        j = int(g[i].abs().flatten().argmax())
        index = np.unravel_index(j, g[i].shape)
        sign = 1.0 if float(g[i][index]) >= 0 else -1.0
        channel_std = float(std[index[0]]) if std is not None else 1.0
        x_tilde[i][index] -= eps * sign / channel_std
    with torch.no_grad():
        p = torch.softmax(model(x_tilde).double() / t, dim=1)
    s = p.amax(dim=1)
    return torch.log((1 - s) / s), x_tilde


def _cnn3():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)
    )


@pytest.mark.parametrize("std", [None, [0.5, 2.0, 0.25]])
def test_known_answer_three_channels(std):
    model = _cnn3()
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    expected, _ = _iodin_by_hand(model, x, 10.0, 0.3, None if std is None else torch.tensor(std))
    det = detectors.create("iodin", temperature=10.0, epsilon=0.3).attach(
        ModelRunner(model, input_std=std, batch_size=4)
    )
    got = det.score(x)
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    odin = detectors.create("odin", temperature=10.0, epsilon=0.3).attach(ModelRunner(model, input_std=std)).score(x)
    assert not torch.allclose(got, odin)  # one element moved, not all of them


def test_known_answer_digits_cnn_default_parameters(cnn, images):
    expected, _ = _iodin_by_hand(cnn, images, 1000.0, 0.0014, torch.tensor([0.3081]))
    got = detectors.create("iodin").attach(ModelRunner(cnn, input_std=0.3081, batch_size=5)).score(images)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in cnn.parameters())


def test_the_step_moves_one_element_per_sample():
    g = torch.tensor([[[1.0, -3.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]]).unsqueeze(1)  # [2, 1, 2, 2]
    step = largest_gradient_step(g, torch.tensor([0.5]))
    expected = torch.zeros_like(g)
    expected[0, 0, 0, 1] = -2.0  # first of the tied |g| = 3 entries; sign -1 over std 0.5
    expected[1, 0, 0, 0] = 2.0  # all zero: the first entry, sign(0) = +1
    torch.testing.assert_close(step, expected)


def test_epsilon_zero_is_temperature_scaled_msp(cnn, images):
    with torch.no_grad():
        p = torch.softmax(cnn(images).double() / 1000.0, dim=1).amax(dim=1)
    got = detectors.create("iodin", epsilon=0.0).attach(cnn).score(images)
    torch.testing.assert_close(got, torch.log((1 - p) / p), rtol=1e-6, atol=1e-12)


def test_direction_confident_input_scores_lower():
    model, x = confidence_probe()  # confident, flat, almost flat
    scores = detectors.create("iodin").attach(model).score(x)
    assert scores[0] < scores[2] < scores[1]


def test_save_load_round_trip(cnn, images, tmp_path):
    det = detectors.create("iodin", temperature=100.0, epsilon=0.01, scale_by_std=False)
    runner = ModelRunner(cnn, input_std=0.5)
    assert_model_round_trip(det.attach(runner), runner, images, tmp_path / "iodin")


def test_bad_parameters_and_inputs():
    with pytest.raises(ValueError, match="temperature"):
        detectors.create("iodin", temperature=0)
    with pytest.raises(ValueError, match="epsilon"):
        detectors.create("iodin", epsilon=-1.0)
    with pytest.raises(ValueError, match="input_std"):
        detectors.create("iodin").attach(_cnn3(), input_std=[0.5, 0.5]).score(torch.rand(2, 3, 5, 5))
