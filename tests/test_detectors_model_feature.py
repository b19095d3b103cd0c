"""Mahalanobis ensemble and AdaSCALE through the model, checked against loops and plain autograd by hand."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import detectors
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.detectors.base import clone
from oodguard.detectors.model import features as model_feature
from oodguard.detectors.model.features import AdaSCALE, MahalanobisEnsemble
from oodguard.extraction.model_runner import FEATURES, ModelRunner


class _Tiny(nn.Module):
    """Conv stem (a spatial layer), tanh hidden layer, linear head: smooth, so gradients have no ties."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh())
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _Tiny().double()


def _data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 3, 3, generator=g) + shift).double()


# ---------------------------------------------------------------------- Mahalanobis ensemble by hand
def _layer_acts(model, x):
    stem = model.stem(x)
    feats = model.body(stem)
    return {"stem": stem.flatten(2).mean(2), FEATURES: feats}


def _fit_by_hand(model, x, y, layers):
    with torch.no_grad():
        acts = {k: v.numpy() for k, v in _layer_acts(model, x).items()}
    stats = {}
    for name in layers:
        a = acts[name]
        classes = sorted(set(y.tolist()))
        means = np.stack([a[y.numpy() == c].mean(0) for c in classes])
        cov = np.zeros((a.shape[1], a.shape[1]))
        for i in range(len(a)):
            d = a[i] - means[y[i]]
            cov += np.outer(d, d)
        stats[name] = (means, np.linalg.pinv(cov / len(a)))
    return stats


def _ensemble_by_hand(model, x, stats, layers, weights, eps, std):
    out = []
    for i in range(len(x)):
        total = 0.0
        for name, w in zip(layers, weights, strict=True):
            means, prec = (torch.tensor(v) for v in stats[name])
            xi = x[i : i + 1].clone().requires_grad_(True)
            a = _layer_acts(model, xi)[name][0]
            m = torch.stack([(a - mu) @ prec @ (a - mu) for mu in means])
            loss = 0.5 * m[int(m.argmin())]
            (g,) = torch.autograd.grad(loss, xi)
            sign = torch.where(g >= 0, 1.0, -1.0).double()
            xt = xi.detach() - eps * sign / std
            with torch.no_grad():
                a = _layer_acts(model, xt)[name][0]
                m = torch.stack([(a - mu) @ prec @ (a - mu) for mu in means])
            total += w * float((-0.5 * m).max())
        out.append(-total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_mahalanobis_ensemble_known_answer(tiny, eps):
    x, y = _data(30, 1), torch.arange(30) % 3
    layers, weights = ["stem", FEATURES], [0.3, 0.7]
    std = torch.tensor([0.5, 2.0]).reshape(1, 2, 1, 1).double()
    stats = _fit_by_hand(tiny, x, y, layers)
    det = detectors.create("mahalanobis_ensemble", layers=layers, epsilon=eps, weights=weights)
    det.attach(ModelRunner(tiny, input_std=[0.5, 2.0], batch_size=7)).fit(x, labels=y)
    test = _data(9, 2)
    expected = _ensemble_by_hand(tiny, test, stats, layers, weights, eps, std)
    torch.testing.assert_close(det.score(test), expected, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in tiny.parameters())


def test_mahalanobis_ensemble_defaults_and_direction(tiny):
    x, y = _data(60, 3), torch.arange(60) % 3
    det = detectors.create("mahalanobis_ensemble").attach(tiny).fit(x, labels=y)
    assert det.params["layers"] is None and det.layer_names == [FEATURES] and det.layer_weights == [1.0]
    near, far = det.score(_data(20, 4)), det.score(_data(20, 5, shift=4.0))
    assert float(far.mean()) > float(near.mean())
    # equal weights: the mean of the per-layer distances
    both = detectors.create("mahalanobis_ensemble", layers=["stem", FEATURES], epsilon=0.01).attach(tiny)
    both.fit(x, labels=y)
    s = both.layer_scores(_data(5, 6))
    torch.testing.assert_close(both.score(_data(5, 6)), -s.mean(dim=1))


def test_fit_ensemble_weights_separates(tiny):
    x, y = _data(60, 3), torch.arange(60) % 3
    det = detectors.create("mahalanobis_ensemble", layers=["stem", FEATURES]).attach(tiny).fit(x, labels=y)
    id_val, ood_val = _data(40, 7), _data(40, 8, shift=3.0)
    for backend in ("sklearn", "torch"):
        w = model_feature.fit_ensemble_weights(det, id_val, ood_val, backend=backend)
        assert w.shape == (2,) and det.params["weights"] == pytest.approx(list(w))
        assert all(type(v) is float for v in det.weights)
        scores = det.score(torch.cat([_data(20, 9), _data(20, 10, shift=3.0)]))
        assert float(scores[20:].mean()) > float(scores[:20].mean())
    with pytest.raises(ValueError, match="backend"):
        model_feature.fit_ensemble_weights(det, id_val, ood_val, backend="xgb")


def test_mahalanobis_ensemble_save_load(tiny, tmp_path):
    x, y = _data(30, 1), torch.arange(30) % 3
    det = detectors.create("mahalanobis_ensemble", layers=["stem", FEATURES], epsilon=0.01, weights=[1.0, 2.0])
    det.attach(tiny).fit(x, labels=y)
    det.save(tmp_path / "d")
    loaded = detectors.load(tmp_path / "d")
    with pytest.raises(RuntimeError, match="attach"):
        loaded.score(x)
    torch.testing.assert_close(loaded.attach(tiny).score(x), det.score(x))


def test_mahalanobis_ensemble_errors(tiny):
    x = _data(12, 1)
    with pytest.raises(ValueError, match="stem"):  # the message lists the available names
        detectors.create("mahalanobis_ensemble", layers=["nope"]).attach(tiny).fit(x, labels=torch.arange(12) % 3)
    with pytest.raises(ValueError, match="labels"):
        detectors.create("mahalanobis_ensemble").attach(tiny).fit(x)
    with pytest.raises(ValueError, match="at least 2"):
        detectors.create("mahalanobis_ensemble").attach(tiny).fit(x, labels=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="0..2"):
        detectors.create("mahalanobis_ensemble").attach(tiny).fit(x, labels=torch.arange(12) % 4)
    for bad in (
        {"epsilon": -1.0},
        {"weights": [1.0, 2.0]},
        {"weights": [0.0]},
        {"layers": []},
        {"layers": "stem"},
        {"layers": ["stem", "stem"]},
        {"scale_by_std": 1},
    ):
        with pytest.raises(ValueError):
            detectors.create("mahalanobis_ensemble", **bad)


# ---------------------------------------------------------------------- AdaSCALE by hand
def _adascale_q(model, x, o, eps, lam, kq, kc):
    qs, zs = [], []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        f = model(xi)[0]
        (g,) = torch.autograd.grad(f[int(f.argmax())], xi)
        flat = g.abs().flatten().numpy()
        n = int(flat.size * o)
        order = np.argsort(flat, kind="stable")[:n]
        mask = np.zeros(flat.size)
        mask[order] = 1.0
        xt = xi.detach() + eps * torch.sign(g) * torch.tensor(mask).reshape(g.shape)
        with torch.no_grad():
            z = model.body(model.stem(xi.detach()))[0].numpy()
            zt = model.body(model.stem(xt))[0].numpy()
        top = np.argsort(-z, kind="stable")
        c_o = sum(max(zt[j], 0.0) for j in top[:kc])
        q = sum(abs(z[j] - zt[j]) for j in top[:kq])
        qs.append(c_o + lam * q)
        zs.append(z)
    return np.array(qs), np.array(zs)


@pytest.mark.parametrize("variant", ["A", "L"])
def test_adascale_known_answer(tiny, variant):
    params = {
        "variant": variant,
        "p_min": 20.0,
        "p_max": 70.0,
        "o": 0.3,
        "epsilon": 0.4,
        "lam": 3.0,
        "k_q": 20.0,
        "k_c": 50.0,
    }
    fit_x, test_x = _data(25, 11), _data(8, 12, shift=0.5)
    det = detectors.create("adascale", **params).attach(ModelRunner(tiny, batch_size=4)).fit(fit_x)
    fit_q, _ = _adascale_q(tiny, fit_x, 0.3, 0.4, 3.0, 1, 3)
    q, z = _adascale_q(tiny, test_x, 0.3, 0.4, 3.0, 1, 3)
    w, b = tiny.head.weight.detach().numpy(), tiny.head.bias.detach().numpy()
    expected = []
    for qi, zi in zip(q, z, strict=True):
        f = np.mean(fit_q <= qi)
        p = 20.0 + (1 - f) * 50.0
        k = 6 - int(np.round(6 * p / 100))
        a = np.maximum(zi, 0)
        r = a.sum() / np.sort(a)[::-1][:k].sum()
        logits = w @ (zi * np.exp(r)) + b if variant == "A" else (w @ zi + b) * r**2
        expected.append(-np.log(np.exp(logits).sum()))
    got = det.score(test_x.numpy())
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(det.state_["fit_values"].numpy(), np.sort(fit_q), rtol=1e-6)  # z~ comes back as float32


def test_adascale_direction_and_cost():
    torch.manual_seed(0)
    model = DigitsCNN(num_classes=3)
    g = torch.Generator().manual_seed(0)
    proto = torch.rand(3, 1, 28, 28, generator=g)
    y = torch.arange(60) % 3
    x = (proto[y] + 0.05 * torch.randn(60, 1, 28, 28, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    det = detectors.create("adascale", n_fit=40).attach(ModelRunner(model, batch_size=32)).fit(x)
    assert det.state_["fit_values"].numel() == 40
    far = torch.rand(20, 1, 28, 28, generator=g) * 0.2
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        near_scores = det.score(x[:20])
    finally:
        handle.remove()
    assert sum(calls) == 2 * 20
    assert float(det.score(far).mean()) > float(near_scores.mean())


def test_adascale_subsample_same_for_arrays_and_loaders(tiny):
    x = _data(30, 13)
    a = detectors.create("adascale", n_fit=10, seed=3, o=0.3).attach(tiny).fit(x)
    b = detectors.create("adascale", n_fit=10, seed=3, o=0.3).attach(tiny).fit(torch.utils.data.TensorDataset(x))
    torch.testing.assert_close(a.state_["fit_values"], b.state_["fit_values"])


def test_adascale_save_load(tiny, tmp_path):
    x = _data(20, 14)
    det = detectors.create("adascale", variant="L", o=0.3).attach(tiny).fit(x)
    det.save(tmp_path / "a")
    loaded = detectors.load(tmp_path / "a").attach(tiny)
    torch.testing.assert_close(loaded.score(x), det.score(x))


def test_adascale_errors(tiny):
    for bad in (
        {"variant": "B"},
        {"p_min": 90.0},
        {"p_max": 100.0},
        {"p_min": 0.0},
        {"o": 0.0},
        {"o": 1.5},
        {"epsilon": 0.0},
        {"lam": -1.0},
        {"k_q": 0.0},
        {"n_fit": 0},
        {"seed": 1.5},
    ):
        with pytest.raises(ValueError):
            detectors.create("adascale", **bad)
    with pytest.raises(ValueError, match="p_max"):  # D = 6: p 95 keeps no unit
        detectors.create("adascale", p_min=60.0, p_max=95.0, o=0.3).attach(tiny).fit(_data(5, 1))
    with pytest.raises(ValueError, match="final linear layer"):
        detectors.create("adascale").attach(ModelRunner(nn.Sequential(nn.Linear(4, 3), nn.Tanh()))).fit(
            torch.randn(4, 4)
        )


# ---------------------------------------------------------------------- declared parameters
_DEFAULTS = {
    MahalanobisEnsemble: {"layers": None, "epsilon": 0.0, "weights": None, "scale_by_std": True},
    AdaSCALE: {
        "variant": "A",
        "p_min": 75.0,
        "p_max": 85.0,
        "lam": 10.0,
        "o": 0.05,
        "epsilon": 0.5,
        "k_q": 1.0,
        "k_c": 5.0,
        "n_fit": 5000,
        "seed": 0,
    },
}


@pytest.mark.parametrize("cls", [MahalanobisEnsemble, AdaSCALE])
def test_signature_defaults_and_constraints(cls):
    signature = inspect.signature(cls)
    assert {name: p.default for name, p in signature.parameters.items()} == _DEFAULTS[cls]
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values())
    assert set(cls._parameter_constraints) == set(_DEFAULTS[cls])
    assert detectors.info(cls.name)["protocol"] == "model"


@pytest.mark.parametrize(
    "cls, given",
    [
        (MahalanobisEnsemble, {"layers": ("stem", FEATURES), "epsilon": 0, "weights": (1, 2.5), "scale_by_std": False}),
        (
            AdaSCALE,
            {"variant": "L", "p_min": 60, "p_max": 90, "lam": 0, "o": 1, "epsilon": 2, "k_q": 3, "k_c": 4,
             "n_fit": None, "seed": np.int64(7)},
        ),
    ],
)  # fmt: skip
def test_get_params_are_the_arguments_as_given_and_clone(tiny, cls, given):
    det = cls(**given)
    params = det.get_params()
    assert params == given and all(type(params[k]) is type(v) for k, v in given.items())  # ints stay ints
    first = next(iter(given))
    det.params[first] = "changed"  # a fresh dict: writing into it changes nothing
    assert getattr(det, first) == given[first]
    copy = clone(det)
    assert type(copy) is cls and copy is not det and copy.get_params() == given
    assert not copy.is_fitted and copy.runner_ is None


def test_mahalanobis_ensemble_weights_as_array_and_fit_weights_use_set_params(tiny):
    det = MahalanobisEnsemble(layers=["stem", FEATURES], weights=np.array([1.0, 3.0]))
    assert det.layer_weights == [1.0, 3.0]
    with pytest.raises(ValueError, match="parameter 'weights' must be"):
        MahalanobisEnsemble(weights=np.array([np.nan]))
    with pytest.raises(ValueError, match="parameter 'weights' must be"):
        det.set_params(weights=[1.0])  # one weight for two layers: refused, the old weights stay
    np.testing.assert_array_equal(det.weights, [1.0, 3.0])


@pytest.mark.parametrize(
    "param, value",
    [
        ("layers", "stem"),
        ("layers", []),
        ("layers", ["stem", ""]),
        ("layers", ["stem", "stem"]),
        ("epsilon", -1.0),
        ("epsilon", float("nan")),
        ("epsilon", None),
        ("weights", [1.0, 2.0]),
        ("weights", [0.0]),
        ("weights", [float("inf")]),
        ("weights", ["1"]),
        ("weights", np.ones((1, 1))),
        ("scale_by_std", 1),
        ("scale_by_std", None),
    ],
)
def test_mahalanobis_ensemble_bad_value_names_the_parameter(param, value):
    with pytest.raises(ValueError, match=f"mahalanobis_ensemble: parameter '{param}' must be"):
        MahalanobisEnsemble(**{param: value})
    det = MahalanobisEnsemble()
    with pytest.raises(ValueError, match=f"parameter '{param}'"):
        det.set_params(**{param: value})
    assert det.get_params() == MahalanobisEnsemble().get_params()


@pytest.mark.parametrize(
    "param, value",
    [
        ("variant", "B"),
        ("variant", "a"),
        ("p_min", 0.0),
        ("p_min", 90.0),  # above p_max
        ("p_max", 100.0),
        ("p_max", "85"),
        ("lam", -1.0),
        ("o", 0.0),
        ("o", 1.5),
        ("epsilon", 0.0),
        ("epsilon", float("inf")),
        ("k_q", 0.0),
        ("k_c", 101.0),
        ("n_fit", 0),
        ("n_fit", 10.0),
        ("seed", 1.5),
        ("seed", None),
    ],
)
def test_adascale_bad_value_names_the_parameter(param, value):
    with pytest.raises(ValueError, match=f"adascale: parameter '{param}' must be"):
        AdaSCALE(**{param: value})
    det = AdaSCALE()
    with pytest.raises(ValueError, match=f"parameter '{param}'"):
        det.set_params(**{param: value})
    assert det.get_params() == AdaSCALE().get_params()
