"""QUTE's early-exit-assisted ensemble on a model that stays frozen: ``early_exit``.

Early exits are trained on the intermediate layers the user extracted (cached outputs, so the model never runs
again); each lends its depthwise layer to one extra output head on the features, the input of the model's own
output layer; those heads are the ensemble, and the uncertainty of their averaged softmax is the score. At score
time only the features are read (the paper removes the early exits after training). The weights are state
tensors (``net.*``), saved in the detector's safetensors file, never pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodguard.detectors.base import OutputDetector, class_counts, infer_num_classes, named_layers, register
from oodguard.detectors.params import Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.detectors.trained import cached_training, feature_scaling, seeded, standardised, train_networks
from oodguard.outputs import ModelOutputs, as_outputs

__all__ = ["EarlyExit", "ensemble_uncertainty", "pooled_cells", "UNCERTAINTIES"]

_F64 = torch.float64
#: The uncertainty measures of the averaged ensemble prediction (see :func:`ensemble_uncertainty`).
UNCERTAINTIES = ("confidence", "entropy")
_POOLS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
#: Member log-probabilities are floored here (p >= 1e-261): exponentials of the scores then never fall into the
#: subnormal range, where float arithmetic runs tens of times slower, and no score moves by more than 1e-258.
_LOG_FLOOR = -600.0


def ensemble_uncertainty(log_probs: torch.Tensor, measure: str = "confidence") -> torch.Tensor:
    """Uncertainty of an ensemble from its members' log-probabilities ``[K, N, C]``: float64 ``[N]``, higher = more
    uncertain.

    The ensemble predicts the mean of its members' probabilities, ``p = (1/K) sum_k p_k`` (QUTE's eq. 3).
    ``"confidence"``: ``1 - max_c p_c`` (the paper's measure), computed as the members' mean probability outside the
    ensemble's class, so that it keeps its digits where ``max_c p_c`` rounds to 1. ``"entropy"``: the predictive
    entropy ``-sum_c p_c log p_c`` (natural log; ``0 log 0 = 0``).
    """
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs: expected [K members, N rows, C classes], got shape {tuple(log_probs.shape)}")
    log_probs = log_probs.to(_F64)
    mean = log_probs.exp().mean(dim=0)
    if measure == "entropy":
        return -torch.special.xlogy(mean, mean).sum(dim=1)
    if measure != "confidence":
        raise ValueError(f"measure must be one of {', '.join(UNCERTAINTIES)}; got {measure!r}")
    chosen = mean.argmax(dim=1)[None, :, None].expand(log_probs.shape[0], -1, 1)
    outside = log_probs.scatter(2, chosen, -torch.inf)  # sum_{j != c} p_kj = exp(LSE_{j != c} log p_kj)
    return torch.logsumexp(outside, dim=2).exp().mean(dim=0)


def pooled_cells(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """``[N, C, *S]`` (up to 3 spatial axes) -> ``[N, C, cells]``: adaptive average pooling to a grid of at most
    ``pool`` cells per axis (an axis shorter than ``pool`` keeps its size); a vector ``[N, C]`` is one cell."""
    spatial = tuple(maps.shape[2:])
    if not spatial:
        return maps.unsqueeze(-1)
    if len(spatial) > len(_POOLS):
        raise ValueError(f"expected at most {len(_POOLS)} spatial axes, got per-row shape {tuple(maps.shape[1:])}")
    grid = tuple(min(pool, size) for size in spatial)
    return _POOLS[len(spatial) - 1](maps, grid).flatten(2)


class _Exits(nn.Module):
    """The K early exits and the K heads they assist.

    Exit k, on the pooled and standardised layer ``x [N, C_k, cells]``: a pointwise convolution to the feature width
    ``D`` (``nn.Linear`` over channels), a depthwise 1x1 convolution (a weight and a bias per channel), ReLU,
    flatten, dense to the classes. Head k, on the standardised features ``[N, D]``: exit k's depthwise layer (its
    weights, with no gradient through this path: the paper copies them over before every batch), ReLU, its own
    dense layer to the classes.
    """

    def __init__(self, channels: Sequence[int], cells: Sequence[int], dim: int, classes: int) -> None:
        super().__init__()
        self.pointwise = nn.ModuleList(nn.Linear(c, dim) for c in channels)
        self.depthwise = nn.ModuleList(nn.Conv1d(dim, dim, 1, groups=dim) for _ in channels)
        self.exit_out = nn.ModuleList(nn.Linear(dim * n, classes) for n in cells)
        self.head_out = nn.ModuleList(nn.Linear(dim, classes) for _ in channels)

    def exit_logits(self, k: int, x: torch.Tensor) -> torch.Tensor:
        conv = self.depthwise[k]
        h = self.pointwise[k](x.transpose(1, 2))  # [N, cells, D]
        h = torch.relu(h * conv.weight.view(-1) + conv.bias)
        return self.exit_out[k](h.flatten(1))

    def head_logits(self, k: int, features: torch.Tensor) -> torch.Tensor:
        conv = self.depthwise[k]
        h = torch.relu(features * conv.weight.detach().view(-1) + conv.bias.detach())
        return self.head_out[k](h)


@register
class EarlyExit(OutputDetector):
    """QUTE: an ensemble of output heads on the features, each assisted by an early exit on an intermediate layer;
    the score is the uncertainty of their mean softmax.

    Fit (cached layer outputs, the model frozen): one early exit per layer in ``layers`` (``K`` of them) and one
    extra output head per exit on the features (the input of the model's own output layer, where QUTE adds its
    ``K`` output blocks). Exit ``k`` averages its layer to a grid of at most ``pool`` cells per spatial axis,
    standardises each channel (fit statistics), then: pointwise convolution to the feature width ``D``, depthwise
    1x1 convolution ``h -> a_k * h + b_k``, ReLU, dense, softmax. Head ``k`` applies exit ``k``'s depthwise layer
    ``(a_k, b_k)`` to the standardised features, then ReLU and its own dense layer and softmax (QUTE's early-view
    assistance: the head's depthwise weights are the exit's, copied before every batch). Every exit and head is
    trained together with the sum of their cross-entropies on the fit labels (Adam, seeded, one thread); a head's
    loss reaches only its own dense layer.

    Score (reads only the features; the exits are dropped after training, as in the paper, and so is the model's own
    head, which the paper leaves out as overconfident): the ensemble prediction ``p = (1/K) sum_k p_k`` of the K
    heads and, with ``uncertainty="confidence"`` (the paper's measure), ``1 - max_c p_c``; with ``"entropy"``,
    ``-sum_c p_c log p_c``. Higher = more uncertain = more likely OOD.

    Parameters
    ----------
    layers : list of str, optional
        Names of the ``outputs.layers`` that get an early exit (one ensemble member each). ``None`` (default): every
        layer the fit outputs hold, sorted by name; the names are stored at fit (``meta_["layers"]``). Each layer is
        ``[N, C]`` or ``[N, C, ...]`` with at most 3 spatial axes.
    uncertainty : {"confidence", "entropy"}, default "confidence"
    pool : int, default 4
        Cells per spatial axis of the grid each exit averages its layer to (1: global average pooling).
    epochs : int, default 20
    lr : float, default 1e-3
    batch_size : int, default 256
        The paper's recipe for its 4-layer MNIST CNN (Adam, 20 epochs, batch 256, lr 1e-3).
    seed : int, default 0
    cache_dir : str, optional
        Cache the fitted state here, keyed by the fit rows (features, labels, the exit layers) and the parameters.

    Attributes
    ----------
    state_ : ``feature_mean``, ``feature_std`` (the features' standardisation), ``exit.<k>.mean``, ``exit.<k>.std``
        (per channel of exit k's pooled layer), ``net.*`` (the weights of the exits and heads).
    meta_ : ``layers`` (names, in exit order), ``layer_shapes`` (per-row shapes at fit).

    Deviations from the paper: docs/detectors.md, section ``early_exit``.

    Paper: Ghanathe & Wilton, "QUTE: Quantifying Uncertainty in TinyML models with Early-exit-assisted ensembles
    for model-monitoring", ICML 2025, arXiv:2404.12599. No official code; the exit layout (pointwise convolution,
    depthwise convolution with ReLU, average pooling, dense) follows the authors' earlier T-RECX code,
    nikhilghanathe/t-recx ``image_classification/keras_model.py``.
    """

    name = "early_exit"
    summary = "QUTE: 1 - max of the mean softmax of output heads on the features assisted by early exits on layers"
    paper = (
        "Ghanathe & Wilton, 'QUTE: Quantifying Uncertainty in TinyML models with Early-exit-assisted ensembles for "
        "model-monitoring', ICML 2025 (arXiv:2404.12599)"
    )
    code = (
        "no official code; exit layout after the authors' T-RECX code, https://github.com/nikhilghanathe/t-recx "
        "(image_classification/keras_model.py)"
    )
    requires = frozenset({"features"})
    fit_requires = frozenset({"layers", "features", "labels"})
    _parameter_constraints = {
        "layers": [None, SequenceOf(Text())],
        "uncertainty": [Options(UNCERTAINTIES)],
        "pool": [Interval(Integral, 1, None)],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "seed": [Interval(Integral, 0, None)],
        "cache_dir": [None, Text()],
    }

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        uncertainty: str = "confidence",
        pool: int = 4,
        epochs: int = 20,
        lr: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.layers = layers
        self.uncertainty = uncertainty
        self.pool = pool
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = cache_dir
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise self._param_error("layers", "a list of distinct layer names (each layer once)")

    # ------------------------------------------------------------------ layers
    def _layer_maps(self, outputs: ModelOutputs, names: list[str], stage: str) -> list[torch.Tensor]:
        maps = [tensor.detach().cpu() for tensor in named_layers(outputs, names, self.name, stage)]
        for name, tensor in zip(names, maps, strict=True):
            if tensor.ndim > 2 + len(_POOLS):
                raise ValueError(
                    f"{self.name}: layers[{name!r}] has per-row shape {list(tensor.shape[1:])}; an early exit takes "
                    f"[C] or [C, ...] with at most {len(_POOLS)} spatial axes: reshape it or choose another layer"
                )
        if stage == "score":
            for name, tensor, shape in zip(names, maps, self.meta_["layer_shapes"], strict=True):
                if list(tensor.shape[1:]) != list(shape):
                    raise ValueError(
                        f"{self.name}: layers[{name!r}] has per-row shape {list(tensor.shape[1:])} at score but "
                        f"{shape} at fit; use the same model, layer and input size"
                    )
        return maps

    def _exit_inputs(self, maps: list[torch.Tensor], state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each layer pooled to ``[N, C_k, cells]`` and standardised per channel (float64)."""
        inputs = []
        for k, tensor in enumerate(maps):
            pooled = pooled_cells(tensor.to(_F64), int(self.pool))
            inputs.append((pooled - state[f"exit.{k}.mean"][:, None]) / state[f"exit.{k}.std"][:, None])
        return inputs

    # ------------------------------------------------------------------ fit
    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        names = list(self.layers) if self.layers else sorted(outputs.layers)
        maps = self._layer_maps(outputs, names, "fit")
        labels = outputs.labels.cpu()
        rows = {"features": outputs.features.cpu(), "labels": labels}
        rows.update({f"layers.{name}": tensor for name, tensor in zip(names, maps, strict=True)})
        state = cached_training(self, rows, lambda: self._train_state(outputs, maps, labels))
        self.meta_["layers"] = names
        self.meta_["layer_shapes"] = [list(tensor.shape[1:]) for tensor in maps]
        return state

    def _train_state(
        self, outputs: ModelOutputs, maps: list[torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        classes = infer_num_classes(outputs)
        class_counts(labels, classes, self.name, minimum=0)  # labels within 0..C-1
        features = outputs.features.cpu()
        state = feature_scaling(features)
        x = []
        for k, tensor in enumerate(maps):
            grid = pooled_cells(tensor.to(_F64), int(self.pool))
            scaling = feature_scaling(grid.transpose(1, 2).reshape(-1, grid.shape[1]))  # per channel
            mean, std = scaling["feature_mean"], scaling["feature_std"]
            state[f"exit.{k}.mean"], state[f"exit.{k}.std"] = mean, std
            x.append(((grid - mean[:, None]) / std[:, None]).to(torch.float32))  # as _exit_inputs
        f = standardised(features, state).to(torch.float32)
        channels, cells = [t.shape[1] for t in x], [t.shape[2] for t in x]
        with seeded(int(self.seed)):
            network = _Exits(channels, cells, f.shape[1], classes)

            def loss(index: torch.Tensor) -> torch.Tensor:
                y = labels[index]
                total = f.new_zeros(())
                for k in range(len(x)):
                    total = total + F.cross_entropy(network.exit_logits(k, x[k][index]), y)
                    total = total + F.cross_entropy(network.head_logits(k, f[index]), y)
                return total

            train_networks(nn.ModuleDict({"exits": network}), loss, f.shape[0], int(self.epochs),
                           int(self.batch_size), float(self.lr))  # fmt: skip
        state.update({f"net.{name}": value.detach().clone() for name, value in network.state_dict().items()})
        return state

    # ------------------------------------------------------------------ networks and score
    def _cached_networks(self) -> _Exits:
        key = ("networks",)
        if key not in self._state_cache:  # emptied whenever the state changes
            state = self.state_ or {}
            shapes = self.meta_["layer_shapes"]
            channels = [shape[0] for shape in shapes]
            cells = [pooled_cells(torch.zeros(1, *shape), int(self.pool)).shape[2] for shape in shapes]
            dim, classes = state["feature_mean"].shape[0], state["net.head_out.0.weight"].shape[0]
            network = _Exits(channels, cells, dim, classes)
            network.load_state_dict({name[4:]: value for name, value in state.items() if name.startswith("net.")})
            self._state_cache[key] = network.to(_F64).eval()  # type: ignore[assignment]
        return self._state_cache[key]  # type: ignore[return-value]

    def _heads(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per head k: the standardisation and exit k's depthwise layer folded into one affine map,
        ``relu(f * scale + shift)`` with ``scale = a_k / std`` and ``shift = b_k - a_k mean / std``, and the dense layer
        (cached per device and dtype)."""
        key = ("heads", str(device), dtype)
        if key not in self._state_cache:  # emptied whenever the state changes
            state = self.state(device, _F64)
            mean, std = state["feature_mean"], state["feature_std"]
            heads = {}
            for k in range(len(self.meta_["layers"])):
                a, b = state[f"net.depthwise.{k}.weight"].reshape(-1), state[f"net.depthwise.{k}.bias"]
                heads[f"{k}.scale"], heads[f"{k}.shift"] = a / std, b - a * mean / std
                heads[f"{k}.weight"] = state[f"net.head_out.{k}.weight"]
                heads[f"{k}.bias"] = state[f"net.head_out.{k}.bias"]
            self._state_cache[key] = {name: value.to(dtype) for name, value in heads.items()}
        return self._state_cache[key]

    def _head_log_probs(self, outputs: ModelOutputs) -> torch.Tensor:
        """``log p_k`` of every head ``[K, N, C]`` (float64); the products run in the features' dtype."""
        features = outputs.features
        heads = self._heads(features.device, features.dtype)
        members = []
        for k in range(len(self.meta_["layers"])):
            hidden = torch.relu(torch.addcmul(heads[f"{k}.shift"], features, heads[f"{k}.scale"]))
            logits = torch.addmm(heads[f"{k}.bias"], hidden, heads[f"{k}.weight"].T)
            members.append(torch.log_softmax(logits.to(_F64), dim=1).clamp_min(_LOG_FLOOR))
        return torch.stack(members)

    def member_probabilities(self, outputs: ModelOutputs | Any) -> torch.Tensor:
        """The softmax of each ensemble member (the K assisted heads) for every row: float64 ``[K, N, C]``."""
        outputs = as_outputs(outputs)
        self._check_fields(outputs, self.requires, "member_probabilities")
        self._check_dims(outputs, "member_probabilities")
        return self._head_log_probs(outputs).exp().cpu()

    def exit_probabilities(self, outputs: ModelOutputs | Any) -> torch.Tensor:
        """The softmax of each early exit on its layer (used in training only): float64 ``[K, N, C]``."""
        outputs = as_outputs(outputs)
        self._check_fields(outputs, frozenset({"layers"}), "exit_probabilities")
        state = self.state(torch.device("cpu"), _F64)
        maps = self._layer_maps(outputs, self.meta_["layers"], "score")
        network = self._cached_networks()
        with torch.no_grad():
            return torch.stack(
                [torch.softmax(network.exit_logits(k, x), dim=1) for k, x in enumerate(self._exit_inputs(maps, state))]
            )

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        return ensemble_uncertainty(self._head_log_probs(outputs), self.uncertainty)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        members = len(self.meta_.get("layers") or [1])
        return 8 * 4 * members * ((outputs.feature_dim or 1) + (self.meta_.get("num_classes") or 16))
