"""Gram-matrix deviations of intermediate feature maps (Sastry & Oore, ICML 2020).

The detector reads cached outputs only: the ``layers`` the user extracted (feature maps ``[N, C_l, H, W]``,
or any ``[N, C_l, ...]``, or vectors ``[N, C_l]``) and the logits (for the predicted class and the MSP).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from oodguard.detectors.base import SCORE_MEMORY_BUDGET, OutputDetector, class_counts, named_layers, register
from oodguard.detectors.params import Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.outputs import ModelOutputs

#: Added to ``|min|`` and ``|max|`` before dividing, as in the official code (``torch.abs(mins + 10**-6)``).
_TABLE_EPS = 1e-6
#: Added to each layer's mean held-out deviation ``E_l``, as in the official ``detect`` (``mean + 10**-7``).
_NORM_EPS = 1e-7
_GROUPINGS = ("predicted", "label")


def normalizer_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(table_rows, normalizer_rows)`` of the deterministic held-out split of ``n`` fit rows.

    ``normalizer_rows`` are the first ``floor(fraction * n)`` entries of ``torch.randperm(n)`` drawn from a
    CPU generator seeded with ``seed`` (the official code takes ``int(0.1 * len)`` random rows); the rest,
    in increasing order, build the min/max tables.
    """
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    held = int(fraction * n)
    return order[held:].sort().values, order[:held].sort().values


def gram_features(maps: torch.Tensor, powers: int) -> torch.Tensor:
    """``g_{l,p}`` for every row and power: ``[n, C, ...]`` (or ``[n, C]``) -> float64 ``[n, powers, C]``.

    For ``F`` the ``C x S`` map of one row (``S`` = product of the trailing sizes, 1 for a vector) and
    ``p = 1..powers``: ``G_p = F^p (F^p)^T`` with the element-wise power, ``v = G_p 1`` (row sums) and
    ``g_p = sign(v) |v|^(1/p)``. The ``C x C`` Gram matrix is never formed: ``G_p 1 = F^p ((F^p)^T 1)``,
    one batched matrix-vector product, ``O(powers C S)`` instead of ``O(powers C^2 S)`` per row.

    Powers are a running product in float64 (``F^p = F^(p-1) * F``), so odd powers of negative
    activations keep their sign exactly. ``|0|^(1/p) = 0`` (no NaN; nothing here is differentiated).
    Activations beyond about ``(1e308 / (C S))^(1 / (2 powers))`` overflow float64 (``|a| ~ 1e14`` for
    powers = 10 on a 64 x 32 x 32 map; float32 would overflow from ``|a| ~ 50``): a ``ValueError`` says so.
    """
    n, channels = maps.shape[0], maps.shape[1]
    flat = maps.detach().to(torch.float64).reshape(n, 1, channels, -1)
    powered = flat.expand(n, powers, channels, flat.shape[-1]).cumprod(dim=1)  # [n, P, C, S]: F^1 .. F^P
    sums = torch.matmul(powered, powered.sum(dim=2).unsqueeze(-1)).squeeze(-1)  # [n, P, C] = G_p 1
    exponents = 1.0 / torch.arange(1, powers + 1, dtype=torch.float64, device=sums.device)
    return sums.sign() * sums.abs().pow(exponents[:, None])


def _gram_rows_bytes(shape: tuple[int, ...], powers: int) -> int:
    """Bytes of intermediates per row of :func:`gram_features` for per-row shape ``shape`` (``[C, ...]``)."""
    size = math.prod(shape)
    return 8 * size * (2 * powers + 2) + 64 * powers * shape[0]


def _msp_and_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum softmax probability (float64, ``exp(max - LSE)``) and the predicted class."""
    logits = logits.to(torch.float64)
    top, predicted = logits.max(dim=1)
    return torch.exp(top - torch.logsumexp(logits, dim=1)), predicted


@register
class Gram(OutputDetector):
    """Gram-matrix deviations: how far a sample's feature correlations fall outside the ID range of its class.

    For every used layer ``l`` (feature map ``F_l``, ``C_l x S_l``) and power ``p = 1..P``:
    ``g_{l,p} = sign(v) |v|^{1/p}`` with ``v = (F_l^p)(F_l^p)^T 1`` (row sums of the Gram matrix of the
    element-wise power; see :func:`gram_features`). Fit: per class ``c`` the element-wise minimum
    ``mn_{c,l,p}`` and maximum ``mx_{c,l,p}`` of ``g_{l,p}`` over the fit rows grouped by class. Score, for a
    sample with predicted class ``c`` and maximum softmax probability MSP::

        delta_l = sum_p sum_j [ relu(mn_j - g_j) / |mn_j + 1e-6| + relu(g_j - mx_j) / |mx_j + 1e-6| ] / MSP
        score   = sum_l delta_l / E_l            (higher = more OOD; the paper's confidence is -score)

    with ``E_l`` the mean of ``delta_l`` over held-out ID rows, plus ``1e-7`` (as the official code).

    Parameters
    ----------
    powers : int, default 10
        ``P``; powers ``1..P`` are used (official: 10; OpenOOD: 5).
    layers : list of str, optional
        Names of the ``outputs.layers`` to use. ``None`` (default) uses every layer present at fit, sorted
        by name for determinism; the names are stored at fit (``meta_["layers"]``) and required at score.
    grouping : {"predicted", "label"}, default "predicted"
        Group the fit rows for the min/max tables by the predicted class (official) or by the true labels
        (OpenOOD; needs labels at fit). Scoring always uses the predicted class (both codes do).
    normalizer_fraction : float in (0, 1), default 0.1
        Fraction of the fit rows held out to estimate ``E_l`` (they do not enter the tables, so 1 would leave
        no row for them).
    seed : int, default 0
        Seed of the held-out split (see :func:`normalizer_split`).

    Attributes
    ----------
    state_ : ``mins.<i>``, ``maxs.<i>`` (float64 ``[C, P, C_l]`` for the i-th used layer) and ``norm``
        (float64 ``[L]``, the ``E_l``).
    meta_ : ``layers`` (used names, in order), ``layer_shapes`` (per-row shapes), ``empty_classes``.

    Deviations from the official code: docs/detectors.md, section ``gram``.

    Paper: Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020.
    Official code: VectorInstitute/gram-ood-detection ``ResNet_Cifar10.ipynb`` (``G_p``, ``get_min_max``,
    ``get_deviations``, ``detect``); OpenOOD ``openood/postprocessors/gram_postprocessor.py``.
    """

    name = "gram"
    summary = "Deviation of per-class Gram-matrix statistics of intermediate layers from their ID range, over MSP"
    paper = "Sastry & Oore, 'Detecting Out-of-Distribution Examples with Gram Matrices', ICML 2020"
    code = (
        "https://github.com/VectorInstitute/gram-ood-detection (ResNet_Cifar10.ipynb: G_p, get_min_max, "
        "get_deviations, detect); OpenOOD openood/postprocessors/gram_postprocessor.py"
    )
    requires = frozenset({"layers", "logits"})
    fit_requires = frozenset({"layers", "logits"})

    _parameter_constraints = {
        "powers": [Interval(Integral, 1, None)],
        "layers": [None, SequenceOf(Text())],
        "grouping": [Options(_GROUPINGS)],
        "normalizer_fraction": [Interval(Real, 0, 1, closed="neither")],
        "seed": [Interval(Integral, None, None)],
    }

    def __init__(
        self,
        *,
        powers: int = 10,
        layers: Sequence[str] | None = None,
        grouping: str = "predicted",
        normalizer_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.powers = powers
        self.layers = layers
        self.grouping = grouping
        self.normalizer_fraction = normalizer_fraction
        self.seed = seed
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise self._param_error("layers", "a list of distinct layer names (each layer once)")

    # ------------------------------------------------------------------ helpers
    def _layer_maps(self, outputs: ModelOutputs, names: list[str], stage: str) -> list[torch.Tensor]:
        return named_layers(outputs, names, self.name, stage)

    def _gram(self, maps: torch.Tensor, name: str) -> torch.Tensor:
        """:func:`gram_features` in row chunks that fit the memory budget; refuses float64 overflow."""
        powers = int(self.powers)
        rows = max(1, SCORE_MEMORY_BUDGET // _gram_rows_bytes(tuple(maps.shape[1:]), powers))
        out = torch.cat([gram_features(maps[s : s + rows], powers) for s in range(0, maps.shape[0], rows)])
        if not bool(torch.isfinite(out).all()):
            peak = float(maps.abs().max())
            raise ValueError(
                f"{self.name}: layers[{name!r}] overflows float64 at powers up to {powers} (max |activation| = "
                f"{peak:.3g}); rescale the activations or lower powers"
            )
        return out

    def _deviations(self, g: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, classes: torch.Tensor):
        """``sum_p sum_j`` of the relative excursions of ``g [n, P, C_l]`` outside the tables of ``classes``."""
        mn, mx = mins[classes], maxs[classes]
        below = torch.relu(mn - g) / (mn + _TABLE_EPS).abs()
        above = torch.relu(g - mx) / (mx + _TABLE_EPS).abs()
        return (below + above).sum(dim=(1, 2))

    # ------------------------------------------------------------------ fit / score
    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        names = list(self.layers) if self.layers else sorted(outputs.layers)
        maps = self._layer_maps(outputs, names, "fit")
        for name, tensor in zip(names, maps, strict=True):
            if tensor.ndim < 2 or tensor.shape[1] < 1:
                raise ValueError(
                    f"{self.name}: layers[{name!r}] must have shape [N, C, ...], got {tuple(tensor.shape)}"
                )
        num_classes = outputs.logits.shape[1]
        msp, predicted = _msp_and_prediction(outputs.logits)
        if self.grouping == "label":
            if outputs.labels is None:
                raise ValueError(
                    f"{self.name}: grouping='label' needs labels at fit; pass labels or use grouping='predicted'"
                )
            groups = outputs.labels.to(predicted.device)
            class_counts(groups, num_classes, self.name, minimum=0)  # validates the label range
        else:
            groups = predicted

        n = len(outputs)
        fraction = float(self.normalizer_fraction)
        table_rows, norm_rows = normalizer_split(n, fraction, int(self.seed))
        if norm_rows.numel() == 0:
            raise ValueError(
                f"{self.name}: fit got N={n} rows, too few to hold out normalizer_fraction={fraction:g} of them "
                f"for E_l; pass at least {math.ceil(1 / fraction)} rows or raise normalizer_fraction"
            )
        device = groups.device
        table_rows, norm_rows = table_rows.to(device), norm_rows.to(device)
        table_groups = groups[table_rows]
        counts = torch.bincount(table_groups, minlength=num_classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()

        state: dict[str, torch.Tensor] = {}
        norms = []
        for index, (name, tensor) in enumerate(zip(names, maps, strict=True)):
            g = self._gram(tensor, name)  # [N, P, C_l]
            fit_g = g[table_rows].flatten(1)
            index_rows = table_groups[:, None].expand_as(fit_g)
            mins = fit_g.new_full((num_classes, fit_g.shape[1]), math.inf)
            maxs = fit_g.new_full((num_classes, fit_g.shape[1]), -math.inf)
            mins.scatter_reduce_(0, index_rows, fit_g, reduce="amin")
            maxs.scatter_reduce_(0, index_rows, fit_g, reduce="amax")
            if empty:  # class-agnostic range for classes without a table row
                mins[empty] = fit_g.amin(dim=0)
                maxs[empty] = fit_g.amax(dim=0)
            mins, maxs = mins.reshape(num_classes, *g.shape[1:]), maxs.reshape(num_classes, *g.shape[1:])
            state[f"mins.{index}"], state[f"maxs.{index}"] = mins, maxs
            held = self._deviations(g[norm_rows], mins, maxs, predicted[norm_rows]) / msp[norm_rows]
            norms.append(held.mean() + _NORM_EPS)
        state["norm"] = torch.stack(norms)

        if empty:
            shown = ", ".join(str(c) for c in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            warnings.warn(
                f"{self.name}: class(es) {shown} have no fit row ({self.grouping} grouping); their "
                "min/max tables are the range over all fit rows",
                RuntimeWarning,
                stacklevel=3,
            )
        self.meta_["layers"] = list(names)
        self.meta_["layer_shapes"] = [list(t.shape[1:]) for t in maps]
        self.meta_["empty_classes"] = empty
        return state

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        names = self.meta_["layers"]
        maps = self._layer_maps(outputs, names, "score")
        for name, tensor, shape in zip(names, maps, self.meta_["layer_shapes"], strict=True):
            if list(tensor.shape[1:]) != list(shape):
                raise ValueError(
                    f"{self.name}: layers[{name!r}] has per-row shape {list(tensor.shape[1:])} at score but "
                    f"{shape} at fit; use the same model, layer and input size"
                )
        device = outputs.logits.device
        state = self.state(device, torch.float64)
        msp, predicted = _msp_and_prediction(outputs.logits)
        total = torch.zeros(len(outputs), dtype=torch.float64, device=device)
        for index, (name, tensor) in enumerate(zip(names, maps, strict=True)):
            g = self._gram(tensor.to(device), name)
            delta = self._deviations(g, state[f"mins.{index}"], state[f"maxs.{index}"], predicted) / msp
            total += delta / state["norm"][index]
        return total

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        powers = int(self.powers)
        names = self.meta_.get("layers") or sorted(outputs.layers)
        shapes = [tuple(outputs.layers[k].shape[1:]) for k in names if k in outputs.layers]
        return max([_gram_rows_bytes(s, powers) for s in shapes if s] or [64 * 1024])
