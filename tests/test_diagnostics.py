"""ocs_curve: the distance of the predictions to the OCS by corruption severity, against a loop over views by hand."""

import doctest
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from oodguard import detectors, diagnostics  # noqa: E402
from oodguard.detectors import NotFittedError  # noqa: E402
from oodguard.diagnostics import PAPER_CORRUPTIONS, ocs_curve  # noqa: E402
from oodguard.extraction.model_runner import ModelRunner  # noqa: E402
from oodguard.outputs import ModelOutputs  # noqa: E402
from oodguard.views import corrupt  # noqa: E402

PRIOR = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _template_model(scale=3.0):
    """logits = scale * W x + log(prior), with every row of W summing to 0 over the pixels.

    ``contrast`` maps x to c (x - mean) + mean, so the logits become c * scale * W x + log(prior): the prediction
    moves straight towards the prior as c falls with severity (0.4, 0.3, 0.2, 0.1, 0.05), and KL(p || prior) of
    p = softmax(t v + log prior) grows with t (its derivative is t Var_p(v) >= 0)."""
    weight = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    weight -= weight.mean(dim=1, keepdim=True)
    linear = nn.Linear(64, 3)
    with torch.no_grad():
        linear.weight.copy_(scale * weight)
        linear.bias.copy_(torch.log(PRIOR).float())
    return nn.Sequential(nn.Flatten(), linear).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _mean_kl_by_hand(model, x, ocs):
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)
    return float((p * torch.log(p / ocs)).sum(dim=1).mean())


def test_doctests():
    failures, attempted = doctest.testmod(diagnostics)
    assert attempted and not failures


def test_every_entry_is_the_mean_kl_of_that_view_computed_by_hand(images):
    model = _template_model()
    labels = torch.arange(20) % 3
    curve = ocs_curve(model, images, PRIOR.numpy(), labels=labels, corruptions=("contrast", "gaussian_noise"),
                      severities=(2, 5), seed=4, pixel_scale=1.0)  # fmt: skip
    assert curve.corruptions == ("contrast", "gaussian_noise") and curve.severities == (0, 2, 5)
    assert curve.distance.shape == curve.accuracy.shape == (2, 3)
    clean = _mean_kl_by_hand(model, images, PRIOR)
    assert curve.distance[:, 0].tolist() == pytest.approx([clean, clean], rel=1e-12)
    for row, name in enumerate(curve.corruptions):
        for column, severity in enumerate((2, 5), start=1):
            view = corrupt(images, name, severity, seed=4, pixel_scale=1.0)
            assert curve.distance[row, column] == pytest.approx(_mean_kl_by_hand(model, view, PRIOR), rel=1e-6)
            with torch.no_grad():
                accuracy = float((model(view).argmax(1) == labels).double().mean())
            assert curve.accuracy[row, column] == accuracy
    np.testing.assert_array_equal(curve.mean_distance, curve.distance.mean(axis=0))


def test_predictions_approach_the_ocs_as_contrast_fades(images):
    curve = ocs_curve(_template_model(), images, PRIOR.numpy(), corruptions=("contrast",))
    distance = curve.distance[0]
    assert curve.severities == (0, 1, 2, 3, 4, 5) and curve.accuracy is None
    assert np.all(np.diff(distance) < 0), distance  # strictly closer to the OCS at every step
    assert distance[-1] < 0.05 * distance[0]


def test_a_fitted_ocs_detector_and_a_runner_give_the_same_curve(images):
    model = _template_model()
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)  # label shares 0.5, 0.3, 0.2 = PRIOR
    fitted = detectors.create("ocs").fit(ModelOutputs(logits=torch.zeros(10, 3), labels=labels))
    by_vector = ocs_curve(model, images, PRIOR.numpy(), corruptions=("contrast", "defocus_blur"), severities=(1, 3))
    by_detector = ocs_curve(ModelRunner(model, batch_size=7), images, fitted, corruptions=("contrast", "defocus_blur"),
                            severities=(1, 3))  # fmt: skip
    np.testing.assert_allclose(by_detector.distance, by_vector.distance, rtol=1e-12)
    np.testing.assert_allclose(by_detector.ocs, PRIOR.numpy())


def test_plot_draws_a_line_per_corruption_and_the_mean(images):
    curve = ocs_curve(_template_model(), images, PRIOR.numpy(), corruptions=("contrast", "impulse_noise"))
    ax = curve.plot(title="template model")
    lines = ax.get_lines()
    assert len(lines) == 3 and ax.get_title() == "template model"
    for line, row in zip(lines, [*curve.distance, curve.mean_distance], strict=True):
        np.testing.assert_array_equal(line.get_xdata(), curve.severities)
        np.testing.assert_array_equal(line.get_ydata(), row)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["contrast", "impulse_noise", "mean"]


def test_bad_input_is_refused(images):
    model = _template_model()
    with pytest.raises(ValueError, match="ocs: has 2 classes but the model gives C=3"):
        ocs_curve(model, images, [0.5, 0.5], corruptions=("contrast",))
    with pytest.raises(ValueError, match="sum to 1"):
        ocs_curve(model, images, [0.5, 0.3, 0.3], corruptions=("contrast",))
    with pytest.raises(ValueError, match="unknown corruption|corruption"):
        ocs_curve(model, images, PRIOR.numpy(), corruptions=("rain",))
    with pytest.raises(ValueError, match="severity"):
        ocs_curve(model, images, PRIOR.numpy(), corruptions=("contrast",), severities=(6,))
    with pytest.raises(ValueError, match="corruptions"):
        ocs_curve(model, images, PRIOR.numpy(), corruptions="contrast")
    with pytest.raises(NotFittedError):
        ocs_curve(model, images, detectors.create("ocs"), corruptions=("contrast",))


@pytest.mark.slow  # builds the digits benchmark and trains its CNN when not cached
def test_the_digits_model_extrapolates_towards_its_ocs(digits_cache):
    from oodguard.benchmark.digits import digits_benchmark

    bench = digits_benchmark(cache_dir=digits_cache, progress=False)
    ocs = detectors.create("ocs").fit(ModelOutputs(logits=torch.zeros(len(bench.fit.labels), 10),
                                                   labels=bench.fit.labels))  # fmt: skip
    curve = ocs_curve(bench.model, bench.test.data[:300], ocs, labels=bench.test.labels[:300])
    assert curve.corruptions == PAPER_CORRUPTIONS
    assert np.all(np.diff(curve.mean_distance) < 0), curve.distance  # the paper's trend, on average
    assert np.all(curve.distance[:, -1] < curve.distance[:, 0])  # and for each corruption at severity 5
    assert math.isclose(curve.ocs.sum(), 1.0)
