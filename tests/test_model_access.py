"""ModelRunner: input gradients, ODIN-style perturbations and layer gradients, checked against autograd by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import FEATURES, ModelRunner


def _ce_to_prediction(logits):
    """Per-sample ``-log softmax(f)_ŷ``."""
    return torch.logsumexp(logits, dim=1) - logits.amax(dim=1)


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- perturb: known answers
def _linear(seed=0, zero_column=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4))
    if zero_column is not None:
        with torch.no_grad():
            model[0].weight[:, zero_column] = 0.0
    return model


@pytest.mark.parametrize("std", [None, [0.5, 2.0, 1.0], 0.25])
def test_perturb_known_answer_linear(std):
    model = _linear()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    t, eps = 10.0, 0.05
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    # Analytic gradient of CE(f/T, ŷ) for f = W x + b: W^T (softmax(f/T) - onehot(ŷ)) / T.
    f = x.double() @ w.T + b
    p = torch.softmax(f / t, dim=1)
    onehot = torch.nn.functional.one_hot(f.argmax(dim=1), 4).double()
    grad = (p - onehot) @ w / t
    sign = torch.where(grad >= 0, 1.0, -1.0)
    divisor = torch.ones(3) if std is None else torch.as_tensor(std, dtype=torch.float64).expand(3)
    expected = x.double() - eps * sign / divisor
    runner = ModelRunner(model, input_std=std, batch_size=4)
    loss = lambda logits: torch.logsumexp(logits / t, dim=1) - (logits / t).amax(dim=1)  # noqa: E731
    got = runner.perturb(x, loss, eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    unscaled = runner.perturb(x, loss, eps, scale_by_std=False)
    torch.testing.assert_close(unscaled.double(), x.double() - eps * sign, rtol=0, atol=1e-6)
    torch.testing.assert_close(runner.input_gradients(x, loss).double(), grad, rtol=1e-5, atol=1e-7)
    assert _no_grads(model)


def test_sign_of_zero_gradient_is_plus_one():
    model = _linear(zero_column=1)  # input 1 has no influence: its gradient is exactly 0
    x = torch.randn(5, 3)
    runner = ModelRunner(model)
    g = runner.input_gradients(x, _ce_to_prediction)
    assert bool((g[:, 1] == 0).all())
    got = runner.perturb(x, _ce_to_prediction, 0.1)
    torch.testing.assert_close(got[:, 1], x[:, 1] - 0.1)


def test_perturb_channel_std_on_images(cnn, images):
    std = [0.3]
    runner = ModelRunner(cnn, input_std=std, batch_size=5)
    g = runner.input_gradients(images, _ce_to_prediction)
    expected = images - 0.01 * torch.where(g >= 0, 1.0, -1.0) / 0.3
    torch.testing.assert_close(runner.perturb(images, _ce_to_prediction, 0.01), expected)
    three = torch.rand(4, 3, 5, 5)
    conv = nn.Sequential(nn.Conv2d(3, 2, 5), nn.Flatten(), nn.Linear(2, 3))
    stds = torch.tensor([0.5, 1.0, 2.0])
    runner3 = ModelRunner(conv, input_std=stds)
    g3 = runner3.input_gradients(three, _ce_to_prediction)
    expected3 = three - 0.1 * torch.where(g3 >= 0, 1.0, -1.0) / stds.view(1, 3, 1, 1)
    torch.testing.assert_close(runner3.perturb(three, _ce_to_prediction, 0.1), expected3)


def test_perturbation_raises_the_predicted_softmax_score(cnn, images):
    runner = ModelRunner(cnn)
    before = torch.softmax(runner.forward(images).logits, dim=1)
    predicted = before.argmax(dim=1)
    perturbed = runner.perturb(images, _ce_to_prediction, 1e-3)
    after = torch.softmax(runner.forward(perturbed).logits, dim=1)
    rows = torch.arange(len(images))
    assert bool((after[rows, predicted] > before[rows, predicted]).all())
    out = runner.perturbed_forward(images, _ce_to_prediction, 1e-3, layers=["features.7"])
    torch.testing.assert_close(out.logits, runner.forward(perturbed).logits, rtol=1e-5, atol=1e-6)
    assert out.layers["features.7"].shape == (12, 64) and out.features.shape == (12, 64) and out.head is not None


def test_per_sample_gradients_do_not_depend_on_the_batch(cnn, images):
    batched = ModelRunner(cnn, batch_size=12).input_gradients(images, _ce_to_prediction)
    single = torch.cat([ModelRunner(cnn).input_gradients(images[i : i + 1], _ce_to_prediction) for i in range(12)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    # and one-sample-at-a-time by hand
    x = images[3:4].clone().requires_grad_(True)
    (manual,) = torch.autograd.grad(_ce_to_prediction(cnn(x)).sum(), x)
    torch.testing.assert_close(batched[3:4], manual, rtol=1e-5, atol=1e-7)
    assert _no_grads(cnn)


# ---------------------------------------------------------------------- layer gradients
def test_layer_gradients_match_manual_autograd(cnn, images):
    loss = _ce_to_prediction
    runner = ModelRunner(cnn, batch_size=5)
    acts, grads = runner.layer_gradients(images, ["features.3", "features.8", FEATURES], loss)
    # By hand: cut the network at the two layers and differentiate with respect to the cut points.
    a3 = cnn.features[:4](cnn.normalize(images))
    a8 = cnn.features[4:](a3)
    logits = cnn.head(a8)
    g3, g8 = torch.autograd.grad(loss(logits).sum(), [a3, a8])
    torch.testing.assert_close(acts["features.3"], a3.detach())
    torch.testing.assert_close(acts["features.8"], a8.detach())
    torch.testing.assert_close(acts[FEATURES], a8.detach())
    torch.testing.assert_close(grads["features.3"], g3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["features.8"], g8, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[FEATURES], g8, rtol=1e-5, atol=1e-7)
    assert _no_grads(cnn)


def test_layer_gradients_survive_inplace_relu():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    acts, grads = ModelRunner(model).layer_gradients(x, "0", lambda f: f.logsumexp(dim=1))
    a = model[0](x)
    (g,) = torch.autograd.grad(model[2](torch.relu(a)).logsumexp(dim=1).sum(), a)
    assert bool((acts["0"] < 0).any())  # recorded before the in-place ReLU
    torch.testing.assert_close(acts["0"], a.detach())
    torch.testing.assert_close(grads["0"], g)


def test_layer_not_on_the_loss_path_gets_zero_gradient():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(3, 2)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            self.aux(x)
            return self.head(x)

    acts, grads = ModelRunner(TwoHeads()).layer_gradients(torch.randn(4, 3), ["aux"], _ce_to_prediction)
    assert bool((grads["aux"] == 0).all()) and acts["aux"].shape == (4, 2)


def test_gradients_with_respect_to_layers_of_a_frozen_model(cnn, images):
    frozen = DigitsCNN(num_classes=10)
    frozen.load_state_dict(cnn.state_dict())
    frozen.requires_grad_(False)
    _, grads = ModelRunner(frozen).layer_gradients(images, "features.7", _ce_to_prediction)
    _, reference = ModelRunner(cnn).layer_gradients(images, "features.7", _ce_to_prediction)
    torch.testing.assert_close(grads["features.7"], reference["features.7"])


# ---------------------------------------------------------------------- forward, modes, inputs
def test_forward_equals_extract(cnn, images):
    out = ModelRunner(cnn, batch_size=5).forward(images, layers=["features.7"])
    ref = extract(cnn, images, layers=["features.7"], progress=False)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.features, ref.features)
    torch.testing.assert_close(out.layers["features.7"], ref.layers["features.7"])


def test_eval_mode_during_runs_and_training_flags_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    seen = []
    model[1].register_forward_hook(lambda module, args, output: seen.append(module.training))
    runner = ModelRunner(model)
    x = torch.randn(6, 4)
    runner.forward(x)
    runner.input_gradients(x, _ce_to_prediction)
    runner.perturb(x, _ce_to_prediction, 0.1)
    runner.perturbed_forward(x, _ce_to_prediction, 0.1)
    runner.layer_gradients(x, ["0"], _ce_to_prediction)
    assert seen and not any(seen)
    assert [m.training for m in model] == [True, True, False, True] and model.training
    with pytest.raises(ValueError):
        runner.input_gradients(x, lambda logits: logits.sum())  # bad loss: flags still restored
    assert [m.training for m in model] == [True, True, False, True]
    assert _no_grads(model)


def test_accepts_numpy_dataset_and_dataloader(cnn, images):
    runner = ModelRunner(cnn, batch_size=5)
    reference = runner.input_gradients(images, _ce_to_prediction)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(12, dtype=torch.long))
    for data in (images.numpy(), dataset, torch.utils.data.DataLoader(dataset, batch_size=7)):
        torch.testing.assert_close(runner.input_gradients(data, _ce_to_prediction), reference, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- errors
def test_unknown_layer_lists_available_names(cnn, images):
    with pytest.raises(ValueError, match=r"no module named 'features\.99'.*Available module names: .*head"):
        ModelRunner(cnn).layer_gradients(images, ["features.99"], _ce_to_prediction)
    with pytest.raises(ValueError, match="Available module names"):
        ModelRunner(cnn, feature_layer="nope")


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)


class _Detached(_NoGrad):
    def forward(self, x):
        return self.net(x).detach()


class _DetachedInput(_NoGrad):
    def forward(self, x):
        return self.net(x.detach())


@pytest.mark.parametrize("model_class", [_NoGrad, _Detached, _DetachedInput])
def test_non_differentiable_model_is_refused(model_class):
    runner = ModelRunner(model_class())
    with pytest.raises(ValueError, match="output is not differentiable"):
        runner.input_gradients(torch.randn(4, 3), _ce_to_prediction)
    with pytest.raises(ValueError, match="output is not differentiable"):
        runner.perturb(torch.randn(4, 3), _ce_to_prediction, 0.01)


def test_bad_arguments():
    model = _linear()
    x = torch.randn(4, 3)
    runner = ModelRunner(model)
    with pytest.raises(ValueError, match="loss: must return one floating value per sample"):
        runner.input_gradients(x, lambda logits: logits.sum())
    with pytest.raises(ValueError, match="loss: expected a callable"):
        runner.layer_gradients(x, ["0"], "ce")
    with pytest.raises(ValueError, match="loss: its value does not require grad"):
        runner.input_gradients(x, lambda logits: logits.detach().sum(dim=1))
    with pytest.raises(ValueError, match="epsilon"):
        runner.perturb(x, _ce_to_prediction, float("nan"))
    with pytest.raises(ValueError, match="input_std"):
        ModelRunner(model, input_std=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="input_std: 2 per-channel values"):
        ModelRunner(model, input_std=[1.0, 2.0]).perturb(x, _ce_to_prediction, 0.1)
    with pytest.raises(ValueError, match="batch_size"):
        ModelRunner(model, batch_size=0)
    with pytest.raises(ValueError, match="floating inputs"):
        emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
        ModelRunner(emb).input_gradients(torch.randint(0, 5, (4, 2)), _ce_to_prediction)
    with pytest.raises(ValueError, match="requested more than once"):
        runner.layer_gradients(x, ["0", "0"], _ce_to_prediction)
    with pytest.raises(TypeError, match="model"):
        ModelRunner(np.zeros(3))


def test_module_called_twice_is_refused_for_gradients():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.block(self.block(x)))

    with pytest.raises(ValueError, match="called 2 times"):
        ModelRunner(Twice()).layer_gradients(torch.randn(2, 3), ["block"], _ce_to_prediction)


def test_batchnorm_without_running_statistics_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="batch statistics even in eval mode"):
        ModelRunner(model)


def test_channels_last_gradient_passes_give_the_same_values():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    loss = lambda logits: logits.logsumexp(dim=1)  # noqa: E731
    seen = []
    handle = model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    fast = ModelRunner(model).input_gradients(x, loss)
    plain = ModelRunner(model, channels_last=False).input_gradients(x, loss)
    handle.remove()
    assert seen == [False, True]  # the default lays the batch out channels-last; the option keeps NCHW
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-7)
