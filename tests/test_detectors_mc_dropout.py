"""MC dropout: scores against stochastic passes replayed by hand with the same seed and worked out in numpy."""

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.extraction.model_runner import ModelRunner

from detector_data import assert_model_round_trip


def _model(p=0.5):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))


def _inputs(n=7):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(8))


def _passes_by_hand(model, x, samples, seed, batch_size):
    """Softmax of each pass [T, N, C] (float64 numpy): eval mode, dropout alone in train mode, masks drawn per batch."""
    model.eval()
    model[3].train()
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            out.append(np.stack([torch.softmax(model(batch).double(), dim=1).numpy() for _ in range(samples)]))
    model.eval()
    return np.concatenate(out, axis=1)


def _expected(probs, uncertainty):
    mean = probs.mean(axis=0)
    if uncertainty == "msp":
        top = mean.max(axis=1)
        return np.log((1 - top) / top)
    if uncertainty == "entropy":
        return -(mean * np.log(mean)).sum(axis=1)
    return probs.var(axis=0, ddof=1).mean(axis=1)


@pytest.mark.parametrize("uncertainty", ["msp", "entropy", "variance"])
def test_known_answer_against_passes_replayed_by_hand(uncertainty):
    model, x = _model(), _inputs()
    running_mean = model[1].running_mean.clone()
    det = detectors.create("mcdropout", samples=5, uncertainty=uncertainty, seed=11)
    got = det.attach(ModelRunner(model, batch_size=3)).score(x)
    expected = _expected(_passes_by_hand(model, x, 5, 11, 3), uncertainty)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-9)
    assert torch.equal(model[1].running_mean, running_mean)  # BatchNorm stayed in eval mode
    assert not model.training and not model[3].training  # modes restored


def test_passes_are_stochastic_and_msp_of_one_pass_is_not_the_eval_msp():
    model, x = _model(), _inputs()
    probs = _passes_by_hand(model, x, 4, 0, 128)
    assert not np.allclose(probs[0], probs[1])  # dropout was on
    with torch.no_grad():
        plain = torch.softmax(model(x).double(), dim=1).amax(dim=1).numpy()
    got = detectors.create("mcdropout", samples=1).attach(model).score(x).numpy()
    assert not np.allclose(got, np.log((1 - plain) / plain))


def test_seeded_repeatable_and_leaves_the_global_rng_alone():
    model, x = _model(), _inputs()
    det = detectors.create("mcdropout", samples=4).attach(model)
    state = torch.get_rng_state()
    first = det.score(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(det.score(x), first, rtol=0, atol=0)
    other = detectors.create("mcdropout", samples=4, seed=1).attach(model).score(x)
    assert not torch.allclose(other, first)


def test_direction_confident_input_scores_lower():
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.2), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.cat([torch.eye(2), -torch.eye(2), torch.zeros(4, 2)]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6, [0.0] * 8]))
        model[2].bias.zero_()
    x = torch.tensor([[20.0, 0.0], [0.0, 0.0]])  # confident (class 0 far ahead), flat
    for uncertainty in ("msp", "entropy"):
        scores = detectors.create("mcdropout", samples=20, uncertainty=uncertainty).attach(model).score(x)
        assert scores[0] < scores[1]


def test_save_load_round_trip(tmp_path):
    model, x = _model(), _inputs()
    det = detectors.create("mcdropout", samples=3, uncertainty="entropy", seed=5).attach(model)
    assert_model_round_trip(det, model, x, tmp_path / "mcd", rtol=0, atol=0)


def test_a_model_without_dropout_gets_a_clear_error():
    with pytest.raises(ValueError, match="no dropout layers"):
        detectors.create("mcdropout").attach(nn.Sequential(nn.Linear(4, 3))).score(_inputs())
    with pytest.raises(ValueError, match="p = 0"):
        detectors.create("mcdropout").attach(_model(p=0.0)).score(_inputs())


def test_bad_parameters():
    with pytest.raises(ValueError, match="samples"):
        detectors.create("mcdropout", samples=0)
    with pytest.raises(ValueError, match="uncertainty"):
        detectors.create("mcdropout", uncertainty="mutual_information")
    with pytest.raises(ValueError, match="samples"):
        detectors.create("mcdropout", samples=1, uncertainty="variance")
    with pytest.raises(ValueError, match="seed"):
        detectors.create("mcdropout", seed=-1)


def test_the_benchmark_runner_leaves_it_out_for_a_model_without_dropout():
    from oodguard.benchmark.digits_model import DigitsCNN
    from oodguard.benchmark.runner import _model_detectors_for, skipped_detectors
    from oodguard.outputs import ModelOutputs

    images = torch.rand(3, 1, 28, 28)
    plain, with_dropout = DigitsCNN(), DigitsCNN()
    with_dropout.features.append(nn.Dropout(0.5))
    assert "mcdropout" not in _model_detectors_for(images, None, plain)
    assert "mcdropout" in _model_detectors_for(images, None, with_dropout)
    outputs = ModelOutputs(logits=torch.zeros(3, 10))
    reasons = skipped_detectors(outputs, [], None, inputs=images, model=plain)
    assert "no dropout layers" in reasons["mcdropout"]
    assert "mcdropout" not in skipped_detectors(outputs, [], None, inputs=images, model=with_dropout)
