"""Model detectors run on any model that runs forward: channels-last is used only where the model accepts it.

Small CNNs written the common ways (flatten with ``view``, with ``reshape``, channels indexed by hand), fed strided
slices of arrays: every model detector fits and scores them, with the scores it gives with ``channels_last=False``.
"""

from __future__ import annotations

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


MODELS = {"view": ViewFlatten, "reshape": ReshapeFlatten, "by_hand": ChannelsByHand}


def strided_images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    images = np.random.default_rng(seed).random((2 * n, channels, 8, 8), dtype=np.float32)
    return torch.from_numpy(images[0::2])  # every other image: a view with a batch stride, as users slice arrays


def fitted_scores(name: str, model: nn.Module, channels_last: bool) -> np.ndarray:
    runner = ModelRunner(model, batch_size=8, channels_last=channels_last)
    fit, test = strided_images(24, seed=1), strided_images(10, seed=2)
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
    model = MODELS[kind]().eval()
    if kind == "view":
        with pytest.raises(RuntimeError, match="view size is not compatible"):  # the failure it used to cause
            model(strided_images(2, seed=0).contiguous(memory_format=torch.channels_last))
    scores = fitted_scores(name, model, channels_last=True)
    assert scores.shape == (10,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, fitted_scores(name, model, channels_last=False), rtol=1e-4, atol=1e-5)


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
