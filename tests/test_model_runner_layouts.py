"""Model detectors run on any model that runs forward: channels-last is used only where the model accepts it.

Small CNNs written the common ways (flatten with ``view``, with ``reshape``, channels indexed by hand), fed strided
slices of arrays: every model detector fits and scores them, with the scores it gives with ``channels_last=False``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from oodguard.detectors import Source, create
from oodguard.extraction import extract
from oodguard.extraction.model_runner import ModelRunner

PARAMS = {
    "odin": {"temperature": 10.0, "epsilon": 0.002},
    "adascale": {"n_fit": 20},
    "gradnorm_autograd": {},
    "nac_layers": {"layers": ["conv"], "alpha": [10.0]},
    "cover": {"views": ["identity", "brightness-1", "fog-2"], "pixel_scale": 1.0},
}


class ViewFlatten(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))  # the most common idiom: fails on channels-last tensors


class ReshapeFlatten(ViewFlatten):
    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.reshape(x.size(0), -1))


class ChannelsByHand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.other = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        a, b = self.conv(x[:, 0:1]), self.other(x[:, 1:])
        return self.fc(torch.relu(torch.cat([a, b], dim=1)).flatten(1))


class NeedsContiguous(ReshapeFlatten):
    """Refuses channels-last with its own exception type, not a RuntimeError from a view."""

    def forward(self, x):
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            raise ValueError("this model takes NCHW inputs only")
        return super().forward(x)


# name -> (model, input channels); with one channel, channels-last strides are also contiguous ones
MODELS = {
    "view": (ViewFlatten, 3),
    "view_1ch": (lambda: ViewFlatten(1), 1),
    "reshape": (ReshapeFlatten, 3),
    "reshape_1ch": (lambda: ReshapeFlatten(1), 1),
    "by_hand": (ChannelsByHand, 3),
    "needs_contiguous": (NeedsContiguous, 3),
}


def strided_images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    """Every other image of an array: a view with a batch stride, as users slice arrays."""
    rng = np.random.default_rng(seed)
    if channels == 1:
        return torch.from_numpy(rng.random((2 * n, 8, 8), dtype=np.float32)[0::2][:, None])
    return torch.from_numpy(rng.random((2 * n, channels, 8, 8), dtype=np.float32)[0::2])


def fitted_scores(name: str, model: nn.Module, channels: int, channels_last: bool) -> np.ndarray:
    runner = ModelRunner(model, batch_size=8, channels_last=channels_last)
    fit, test = strided_images(24, seed=1, channels=channels), strided_images(10, seed=2, channels=channels)
    labels = torch.arange(24) % 5
    detector = create(name, **PARAMS[name])
    fit_outputs = extract(model, fit, labels=labels, progress=False)
    detector.fit_from(Source(fit_outputs, data=fit, labels=labels, runner=runner))
    scores = detector.score_from(Source(lambda: extract(model, test, progress=False), data=test, runner=runner))
    return np.asarray(scores)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_model_detector_runs_on_models_written_the_common_ways(name, kind):
    torch.manual_seed(0)
    build, channels = MODELS[kind]
    model = build().eval()
    if kind.startswith("view"):
        with pytest.raises(RuntimeError, match="view size is not compatible"):  # the failure it used to cause
            model(strided_images(2, seed=0, channels=channels).contiguous(memory_format=torch.channels_last))
    scores = fitted_scores(name, model, channels, channels_last=True)
    assert scores.shape == (10,) and np.isfinite(scores).all()
    expected = fitted_scores(name, model, channels, channels_last=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_the_layout_decision_is_made_once_and_kept():
    torch.manual_seed(0)
    seen = []

    def record(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    refusing = ViewFlatten().eval()
    runner = ModelRunner(refusing, batch_size=4)
    handle = refusing.conv.register_forward_pre_hook(record)
    runner.input_gradients(strided_images(12, seed=3), lambda logits: logits.logsumexp(1))
    handle.remove()
    assert runner._channels_last_works is False
    assert seen == [True, False, False, False]  # tried once on the first batch, then the model's own layout
    accepting = ReshapeFlatten().eval()
    runner = ModelRunner(accepting, batch_size=4)
    seen.clear()
    handle = accepting.conv.register_forward_pre_hook(record)
    runner.input_gradients(strided_images(12, seed=3), lambda logits: logits.logsumexp(1))
    handle.remove()
    assert runner._channels_last_works is True and seen == [True, True, True]  # the faster layout kept


def channels_last_convolutions(model: nn.Module, run) -> list[bool]:
    """Per call of ``model.conv``: whether it ran channels-last (its output, with 4 channels, says unambiguously)."""
    seen: list[bool] = []

    def record(module, args, output):
        seen.append(output.is_contiguous(memory_format=torch.channels_last) and not output.is_contiguous())

    handle = model.conv.register_forward_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("channels", [1, 3])
def test_the_no_grad_forward_of_perturbed_inputs_keeps_the_decision(channels):
    torch.manual_seed(0)
    x = strided_images(12, seed=4, channels=channels)
    loss = lambda logits: logits.logsumexp(1)
    refusing = ViewFlatten(channels).eval()
    runner = ModelRunner(refusing, batch_size=4)
    seen = channels_last_convolutions(refusing, lambda: runner.perturbed_forward(x, loss, 0.01))
    # the first gradient forward tries channels-last, then it reruns contiguous; then the perturbed forward
    # (no grad) and every later batch run contiguous
    assert seen == [True] + [False] * 6
    accepting = ReshapeFlatten(channels).eval()
    runner = ModelRunner(accepting, batch_size=4)
    seen = channels_last_convolutions(accepting, lambda: runner.perturbed_forward(x, loss, 0.01))
    assert runner._channels_last_works is True and seen == [True] * 6  # convolutions run channels-last


def test_falling_back_warns_nothing_and_logs_one_debug_line(caplog):
    torch.manual_seed(0)
    runner = ModelRunner(ViewFlatten(1).eval(), batch_size=4)
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="oodguard.extraction.model_runner"):
        warnings.simplefilter("error")
        runner.input_gradients(strided_images(12, seed=3, channels=1), lambda logits: logits.logsumexp(1))
        runner.input_gradients(strided_images(12, seed=5, channels=1), lambda logits: logits.logsumexp(1))
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert "channels-last" in caplog.records[0].getMessage()


def test_a_model_failing_in_both_layouts_raises_its_own_error():
    class Broken(ViewFlatten):
        def forward(self, x):
            raise RuntimeError("broken model")

    runner = ModelRunner(Broken().eval(), batch_size=4)
    with pytest.raises(RuntimeError, match="broken model") as raised:
        runner.input_gradients(strided_images(8, seed=3), lambda logits: logits.logsumexp(1))
    assert raised.value.__context__ is None  # not reported as a consequence of the channels-last try
    assert runner._channels_last_works is None  # nothing learnt about the layout
