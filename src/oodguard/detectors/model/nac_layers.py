"""NAC on inner layers: neuron states from gradients through the model, one coverage table per layer.

Registered as ``nac_layers`` (``create("nac", layers=[...])`` of earlier releases still gives it, with a deprecation
warning). ``nac`` is the closed-form penultimate :class:`~oodguard.detectors.head.NAC` on cached outputs; both share
the bins and the coverage rule, and this one runs the model because a layer's gradient depends on every layer above
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodguard.detectors.base import register
from oodguard.detectors.head import NAC, nac_bin_edges
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.extraction.model_runner import ModelRunner

__all__ = ["NACLayers", "pool_layer", "uniform_cross_entropy"]

_POOLS = ("auto", "channels_first", "channels_last")
#: Parameters that take one value for every layer or a list with one value per layer.
_PER_LAYER = ("alpha", "M", "O")
_POSITIVE = Interval(Real, 0, None, closed="neither")
_EDGE_COUNT = Interval(Integral, 4, None, closed="left")


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum_c -(1/C) log softmax(f)_c``: NAC's loss (KL(u || p) + log C, as the official ``kl_grad``)."""
    return -torch.log_softmax(logits, dim=1).mean(dim=1)


def pool_layer(values: torch.Tensor, pool: str = "auto") -> torch.Tensor:
    """``[B, units]`` from a layer output or its gradient by summing over positions, as NAC does.

    ``[B, D]``: unchanged. ``channels_first`` (conv maps ``[B, C, H, W]``, ``[B, C, L]``): sum over every axis after
    the channels. ``channels_last`` (tokens ``[B, T, D]``): sum over every axis between batch and units.
    ``auto``: 4-D and 5-D outputs are conv maps, 3-D outputs are token sequences.
    """
    if values.ndim == 2:
        return values
    if values.ndim < 2:
        raise ValueError(
            f"nac_layers: a layer output must have a batch and a unit axis, got shape {tuple(values.shape)}"
        )
    if pool == "auto":
        pool = "channels_last" if values.ndim == 3 else "channels_first"
    if pool == "channels_first":
        return values.flatten(2).sum(dim=2)
    return values.flatten(1, -2).sum(dim=1)


@register
class NACLayers(ModelDetector):
    """NAC-UE over several layers: the mean over layers of each layer's mean training coverage (OOD score: minus it).

    Parameters
    ----------
    layers : list of str, required
        Module names as in ``model.named_modules()``, or :data:`~oodguard.extraction.FEATURES` (the input of the
        final linear layer); each layer once.
    alpha : float > 0 or list of float, default 100
        Sigmoid steepness of the neuron states, one value for every layer or one per layer.
    M : even int >= 4 or list of int, default 50
        Number of bin edges, one for every layer or one per layer.
    O : float > 0 or list of float, default 50
        Count at which a bin is fully covered, one for every layer or one per layer.
    pool : "auto", "channels_first" or "channels_last", default "auto"
        How a layer's output and gradient are summed over positions (:func:`pool_layer`).

    The defaults are the official ResNet-18 CIFAR-10 avgpool setting; the official per-layer settings differ
    (see the detector documentation).

    Paper: Liu, Tian, Li, Ma & Wang, "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and
    Generalization", ICLR 2024. Official code: BierOne/ood_coverage ``openood/postprocessors/nac/``
    (``coverage.py``, ``instr_state.py``; b002780).
    """

    name = "nac_layers"
    summary = "mean training coverage of NAC neuron states on several layers, gradients through the model"
    paper = NAC.paper
    code = NAC.code
    needs_fit = True
    required_params = ("layers",)
    _parameter_constraints = {
        "layers": [SequenceOf(Text())],
        "alpha": [_POSITIVE, SequenceOf(_POSITIVE)],
        "M": [_EDGE_COUNT, SequenceOf(_EDGE_COUNT)],
        "O": [_POSITIVE, SequenceOf(_POSITIVE)],
        "pool": [Options(_POOLS)],
    }

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        alpha: float | Sequence[float] = 100.0,
        M: int | Sequence[int] = 50,  # noqa: N803  (the paper's names)
        O: float | Sequence[float] = 50,  # noqa: N803, E741
        pool: str = "auto",
    ) -> None:
        self.layers = layers
        self.alpha = alpha
        self.M = M
        self.O = O  # noqa: E741
        self.pool = pool
        super().__init__()

    # ------------------------------------------------------------------ parameters
    def _check_param_combination(self) -> None:
        repeated = sorted({n for n in self.layers if list(self.layers).count(n) > 1})
        if repeated:
            raise self._param_error("layers", f"a list naming each layer once ({repeated} named more than once)")
        for key in _PER_LAYER:
            value = getattr(self, key)
            if isinstance(value, (list, tuple)) and len(value) != len(self.layers):
                raise self._param_error(
                    key,
                    f"one value or a list with one value per layer ({len(value)} value(s) for "
                    f"{len(self.layers)} layer(s))",
                )
        if any(m % 2 for m in self._per_layer("M")):
            raise self._param_error("M", "an even integer >= 4 (number of bin edges), or a list of them")

    def _per_layer(self, key: str) -> list:
        """``alpha``, ``M`` or ``O`` as one value per layer (validated: a list has one value per layer)."""
        value = getattr(self, key)
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.layers)

    # ------------------------------------------------------------------ states
    def _layer_states(self, batch: Any) -> list[torch.Tensor]:
        """Per layer: ``sigmoid(alpha * pool(o) * pool(g))`` ``[B, D_l]`` as the official ``1 / (1 + exp(-.))``."""
        states = []
        for name, alpha in zip(self.layers, self._per_layer("alpha"), strict=True):
            o = pool_layer(batch.activations[name], self.pool)
            g = pool_layer(batch.gradients[name], self.pool)
            states.append(g.mul(o).mul_(-float(alpha)).exp_().add_(1.0).reciprocal_())
        return states

    def _batches(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None, desc: str):
        return runner.gradient_batches(
            data,
            lambda logits, acts: uniform_cross_entropy(logits),
            layers=list(self.layers),
            wrt_input=False,
            labels=labels,
            progress=progress,
            desc=desc,
        )

    # ------------------------------------------------------------------ fit / score
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        counts: list[torch.Tensor | None] = [None] * len(self.layers)
        edges = [nac_bin_edges(m) for m in self._per_layer("M")]
        for batch in self._batches(runner, data, labels, None, f"{self.name} fit"):
            for i, states in enumerate(self._layer_states(batch)):
                layer_edges = NAC._edges_for(edges[i], states.dtype).to(states.device)
                slots = NAC._slots(states, layer_edges).long()
                width = states.shape[1]
                if counts[i] is None:
                    counts[i] = torch.zeros((edges[i].numel() + 1) * width, dtype=torch.float64)
                flat = (slots * width + torch.arange(width, device=states.device)).flatten()
                counts[i] += torch.bincount(flat, minlength=counts[i].numel()).to("cpu", torch.float64)
        if counts[0] is None:
            raise ValueError(f"{self.name}: fit data produced no rows")
        state: dict[str, torch.Tensor] = {}
        for i, (layer_counts, o) in enumerate(zip(counts, self._per_layer("O"), strict=True)):
            m = edges[i].numel()
            table = layer_counts.reshape(m + 1, -1)[1:m]
            coverage = (table / float(o)).clamp_max(1.0)
            zero = coverage.new_zeros(1, coverage.shape[1])
            state[f"coverage.{i}"] = torch.cat([zero, coverage, zero])  # [M + 1, D_l], zero rows out of range
            state[f"edges.{i}"] = edges[i]
        return state

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        state = self.state_
        pieces = []
        for batch in self._batches(runner, data, labels, progress, self.name):
            per_layer = []
            for i, states in enumerate(self._layer_states(batch)):
                coverage = state[f"coverage.{i}"]
                if states.shape[1] != coverage.shape[1]:
                    raise ValueError(
                        f"{self.name}: layer {self.layers[i]!r} has {states.shape[1]} units but was fitted "
                        f"with {coverage.shape[1]}; score with the model the detector was fitted on"
                    )
                edges = NAC._edges_for(state[f"edges.{i}"], states.dtype).to(states.device)
                slots = NAC._slots(states, edges).long().cpu()
                width = states.shape[1]
                flat = slots * width + torch.arange(width)
                per_layer.append(coverage.reshape(-1)[flat].mean(dim=1))
            pieces.append(-torch.stack(per_layer).mean(dim=0))
        if not pieces:
            raise ValueError(f"{self.name}: data produced no rows")
        return torch.cat(pieces)
