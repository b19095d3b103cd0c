"""NAC on inner layers: gradients through the model, checked against a per-sample computation by hand."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.detectors.base import clone
from oodguard.detectors.head import nac_bin_edges
from oodguard.detectors.model.nac_layers import NACLayers, pool_layer
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import FEATURES, ModelRunner


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(12, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.hidden(h)))


def _states_by_hand(model, x, layer, alpha):
    """One sample at a time: the official loss sum_c -(1/C) log softmax, its gradient at the layer, sum pooling."""
    module = dict(model.named_modules())[layer]
    rows = []
    for i in range(x.shape[0]):
        seen = {}
        handle = module.register_forward_hook(lambda m, a, out, seen=seen: seen.setdefault("o", out))
        logits = model(x[i : i + 1])
        handle.remove()
        loss = -(torch.log_softmax(logits, dim=1) / logits.shape[1]).sum()
        (g,) = torch.autograd.grad(loss, seen["o"])
        o = seen["o"].detach()
        if o.ndim == 4:
            o, g = o.sum(dim=(2, 3)), g.sum(dim=(2, 3))
        rows.append((1.0 / (1.0 + np.exp(-alpha * (o * g).double().numpy())))[0])
    return np.stack(rows)


def _coverage_by_hand(states, m, o):
    """count[bin, unit] with numpy's digitize over the official edges; cov = min(count / O, 1)."""
    edges = nac_bin_edges(m).numpy()
    bins = np.digitize(states, edges)  # 0 below e_0, i for [e_{i-1}, e_i), M at or above the last edge
    counts = np.zeros((m + 1, states.shape[1]))
    for unit in range(states.shape[1]):
        np.add.at(counts[:, unit], bins[:, unit], 1)
    coverage = np.minimum(counts / o, 1.0)
    coverage[0] = coverage[m] = 0.0
    return coverage, edges


def _score_by_hand(per_layer_states, per_layer_cov):
    layer_scores = []
    for states, (coverage, edges) in zip(per_layer_states, per_layer_cov, strict=True):
        bins = np.digitize(states, edges)
        layer_scores.append(np.take_along_axis(coverage, bins, axis=0).mean(axis=1))
    return -np.mean(layer_scores, axis=0)


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(3)
    return _ConvNet().eval()


def test_known_answer_on_a_conv_layer_and_a_hidden_layer_with_per_layer_parameters(convnet):
    gen = torch.Generator().manual_seed(4)
    fit_x, test_x = torch.randn(40, 1, 6, 6, generator=gen), torch.randn(9, 1, 6, 6, generator=gen) * 2
    layers, alphas, ms, os_ = ["conv", "hidden"], [3.0, 50.0], [10, 20], [2, 4]
    det = detectors.create("nac_layers", layers=layers, alpha=alphas, M=ms, O=os_)
    assert isinstance(det, NACLayers) and det.protocol == "model"
    det.attach(ModelRunner(convnet, batch_size=7)).fit(fit_x)
    covs = [_coverage_by_hand(_states_by_hand(convnet, fit_x, layer, a), m, o)
            for layer, a, m, o in zip(layers, alphas, ms, os_, strict=True)]  # fmt: skip
    for i, (coverage, _) in enumerate(covs):
        np.testing.assert_allclose(det.state_[f"coverage.{i}"].numpy(), coverage)
    test_states = [_states_by_hand(convnet, test_x, layer, a) for layer, a in zip(layers, alphas, strict=True)]
    expected = _score_by_hand(test_states, covs)
    got = det.score(test_x)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert all(p.grad is None for p in convnet.parameters())


def test_on_the_features_it_equals_the_closed_form_nac():
    torch.manual_seed(0)
    cnn = DigitsCNN(num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    fit_x, test_x = torch.rand(64, 1, 28, 28, generator=gen), torch.rand(32, 1, 28, 28, generator=gen)
    closed = detectors.create("nac", alpha=30.0).fit(extract(cnn, fit_x, progress=False))
    closed_scores = closed.score(extract(cnn, test_x, progress=False))
    layered = detectors.create("nac_layers", layers=[FEATURES], alpha=30.0).attach(ModelRunner(cnn, batch_size=16))
    layered_scores = layered.fit(fit_x).score(test_x)
    # same states up to float32 rounding of the gradient: a state on a bin edge may flip one unit's bin
    torch.testing.assert_close(layered_scores, closed_scores, rtol=0, atol=2.0 / 64)
    assert float((layered_scores - closed_scores).abs().mean()) < 1e-3


def test_direction_save_load_and_pooling():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    gen = torch.Generator().manual_seed(6)
    near, far = torch.randn(300, 2, generator=gen), torch.randn(50, 2, generator=gen) * 0.2 + 30.0
    det = detectors.create("nac_layers", layers=["0", "2"], alpha=10.0, O=5).attach(model).fit(near)
    assert float(det.score(far).mean()) > float(det.score(near[:50]).mean())
    assert torch.equal(pool_layer(torch.ones(2, 3, 4, 5)), torch.full((2, 3), 20.0))
    assert torch.equal(pool_layer(torch.ones(2, 7, 3)), torch.full((2, 3), 7.0))  # tokens [B, T, D]
    assert torch.equal(pool_layer(torch.ones(2, 7, 3), "channels_first"), torch.full((2, 7), 3.0))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(2))
    det = detectors.create("nac_layers", layers=["0"], M=8).attach(model).fit(x)
    det.save(tmp_path / "nac")
    loaded = detectors.load(tmp_path / "nac")
    assert isinstance(loaded, NACLayers) and loaded.params == det.params
    torch.testing.assert_close(loaded.attach(model).score(x), det.score(x))


def test_bad_parameters_and_models():
    with pytest.raises(ValueError, match="parameter 'layers' must be a list of at least 1"):
        detectors.create("nac_layers", layers=[])
    with pytest.raises(ValueError, match="parameter 'layers'.*more than once"):
        detectors.create("nac_layers", layers=["a", "a"])
    with pytest.raises(ValueError, match="parameter 'alpha'.*2 value.s. for 1 layer"):
        detectors.create("nac_layers", layers=["a"], alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="parameter 'M' must be an even integer"):
        detectors.create("nac_layers", layers=["a"], M=7)
    with pytest.raises(ValueError, match="parameter 'pool' must be one of 'auto'"):
        detectors.create("nac_layers", layers=["a"], pool="mean")
    with pytest.raises(ValueError, match="parameter 'O' must be a finite number > 0"):
        detectors.create("nac_layers", layers=["a", "b"], O=[1, 0])
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="Available module names: 0, 1, 2"):
        detectors.create("nac_layers", layers=["missing"]).attach(model).fit(torch.randn(4, 2))
    det = detectors.create("nac_layers", layers=["0"]).attach(model).fit(torch.randn(4, 2))
    wider = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="has 6 units but was fitted with 4"):
        det.attach(wider).score(torch.randn(3, 2))
    assert detectors.needs_model("nac_layers") and not detectors.needs_model("nac")


def test_old_spelling_warns_and_gives_nac_layers():
    with pytest.warns(DeprecationWarning, match="nac_layers"):
        det = detectors.create("nac", layers=["0"], alpha=[2.0], M=8)
    assert isinstance(det, NACLayers)
    assert det.get_params() == {"layers": ["0"], "alpha": [2.0], "M": 8, "O": 50, "pool": "auto"}


# ---------------------------------------------------------------------- declared parameters
def test_signature_registry_and_required_layers():
    signature = inspect.signature(NACLayers)
    defaults = {name: p.default for name, p in signature.parameters.items()}
    assert defaults == {"layers": None, "alpha": 100.0, "M": 50, "O": 50, "pool": "auto"}
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values())
    assert set(NACLayers._parameter_constraints) == set(defaults)
    assert detectors.info("nac_layers")["required_params"] == ["layers"]
    assert detectors.info("nac_layers")["protocol"] == "model"
    with pytest.raises(ValueError, match="parameter 'layers'"):
        NACLayers()  # layers has no usable default


def test_get_params_are_the_arguments_as_given_and_clone():
    given = {"layers": ("conv", FEATURES), "alpha": [3, 50.0], "M": 10, "O": [2, 4.5], "pool": "channels_first"}
    det = NACLayers(**given)
    params = det.get_params()
    assert params == given and type(params["layers"]) is tuple and type(params["alpha"][0]) is int
    det.params["alpha"] = 1.0  # a fresh dict: writing into it changes nothing
    assert det.alpha == [3, 50.0]
    copy = clone(det)
    assert type(copy) is NACLayers and copy is not det and copy.get_params() == given
    assert not copy.is_fitted and copy.runner_ is None


@pytest.mark.parametrize(
    "param, value",
    [
        ("layers", None),
        ("layers", "conv"),
        ("layers", ["conv", ""]),
        ("layers", ["conv", 3]),
        ("alpha", 0.0),
        ("alpha", float("nan")),
        ("alpha", [1.0, -1.0]),
        ("alpha", True),
        ("M", 2),
        ("M", 10.0),
        ("M", [10, 9]),
        ("M", [10]),
        ("O", -1),
        ("O", "50"),
        ("pool", "mean"),
    ],
)
def test_bad_value_names_the_parameter(param, value):
    params = {"layers": ["conv", "hidden"], param: value}
    with pytest.raises(ValueError, match=f"nac_layers: parameter '{param}' must be"):
        NACLayers(**params)
    det = NACLayers(layers=["conv", "hidden"])
    with pytest.raises(ValueError, match=f"parameter '{param}'"):
        det.set_params(**{param: value})
    assert det.get_params() == NACLayers(layers=["conv", "hidden"]).get_params()  # refused values are rolled back
