"""Activation-shaping detectors: modify the penultimate feature or the final layer, then take the energy.

All four need the penultimate features ``z`` and the final linear layer ``(W, b)``; the head is copied into
the state at fit, so scoring needs only the features. Each returns ``-LSE(f')`` of the modified logits
``f'`` (higher = more OOD).

- ``react``: clip ``z`` at a percentile of the fit activations (ReAct, NeurIPS 2021).
- ``dice``: keep only the largest mean contributions ``W_cd * mean(z_d)`` of the head (DICE, ECCV 2022).
- ``ash``: keep the top-k entries of each ``z``, optionally binarised or rescaled (ASH, ICLR 2023).
- ``scale``: rescale the whole ``z`` by ``exp(sum z / sum of its top-k)`` (SCALE, ICLR 2024).

These methods assume non-negative (post-ReLU, pooled) activations, as in the ResNet/DenseNet
settings they were designed for.
"""

from __future__ import annotations

import torch

from oodguard.detectors.base import OutputDetector, percentile, register
from oodguard.detectors.params import Interval, Options, Real
from oodguard.outputs import ModelOutputs

#: exp overflows float64 above ~709.78; refuse scales that would reach it.
_MAX_LOG_SCALE = 700.0
_ASH_VARIANTS = ("p", "b", "s")


#: Percentiles in [0, 100): p = 100 would keep (or leave) no activation or weight.
_BELOW_HUNDRED = [Interval(Real, 0, 100, closed="left")]


def head_state(outputs: ModelOutputs) -> dict[str, torch.Tensor]:
    """The head in float64 on the features' device; copies, so that the state never aliases the caller's arrays."""
    device = outputs.features.device
    weight, bias = (t.to(device=device, dtype=torch.float64, copy=True) for t in outputs.head)
    return {"weight": weight, "bias": bias}


def _neg_energy(logits: torch.Tensor) -> torch.Tensor:
    return -torch.logsumexp(logits, dim=1).to(torch.float64)


def neg_energy_of_head(features: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """``-LSE(W z + b)`` in float64 with the head ``(W, b)`` of ``state``."""
    return _neg_energy(torch.addmm(state["bias"], features, state["weight"].T))


def kept_count(feature_dim: int, percentile_value: float) -> int:
    """Entries kept by ASH / SCALE: ``k = D - round(D * p / 100)`` (round half to even, as ``np.round``)."""
    return feature_dim - round(feature_dim * percentile_value / 100.0)


def _row_sums(features: torch.Tensor) -> torch.Tensor:
    """Row sums accumulated in the input dtype, returned as float64 (``sum(dtype=float64)`` would first copy
    the whole ``[n, D]`` block to float64, which costs more than the head's product when C is small)."""
    return features.sum(dim=1).to(torch.float64)


def _sharpening(features: torch.Tensor, top_values: torch.Tensor, total: torch.Tensor, name: str) -> torch.Tensor:
    """``exp(s1 / s2)`` per row in float64: ``s1`` = sum of ``z``, ``s2`` = sum of its kept top-k entries.

    Rows that are entirely zero get 1 (their shaped vector is zero whatever the scale). Any other row
    with ``s2 <= 0`` (possible only with signed features) makes the scale undefined: ValueError.
    """
    kept_sum = top_values.sum(dim=1).to(torch.float64)
    ratio = total / kept_sum
    bad = ~(kept_sum > 0)
    if bool(bad.any()):
        all_zero = (features[bad] == 0).all(dim=1)
        if not bool(all_zero.all()):
            count = int((~all_zero).sum())
            raise ValueError(
                f"{name}: {count} row(s) have a non-positive sum of their kept top-k activations, so the scale "
                "exp(sum / kept sum) is undefined. This method assumes non-negative (post-ReLU) activations; "
                "pass post-ReLU features, or use ash with variant 'p' or 'b', or react"
            )
        ratio = torch.where(bad, torch.zeros_like(ratio), ratio)
    worst = float(ratio.max())
    if worst > _MAX_LOG_SCALE:
        raise ValueError(
            f"{name}: the scale exp(sum / kept sum) overflows (log scale {worst:.4g} > {_MAX_LOG_SCALE:g}); this "
            "happens with signed features whose kept sum is near zero. The method assumes non-negative "
            "(post-ReLU) activations; pass post-ReLU features or lower the percentile"
        )
    return torch.exp(ratio)


def shape_activations(features: torch.Tensor, percentile_value: float, variant: str) -> torch.Tensor:
    """ASH-shaped activations ``a'`` for each row of ``features`` ``[n, D]`` (float64 output).

    ``variant`` is ``"p"`` (prune), ``"b"`` (binarise to ``s1 / k``) or ``"s"`` (prune and scale by
    ``exp(s1 / s2)``); see :class:`ASH`. The detector computes the same thing with the scale factored out
    of the matrix product.
    """
    kept, scale = _ash_parts(features, percentile_value, variant, "ash")
    shaped = kept.to(torch.float64)
    return shaped if scale is None else shaped * scale[:, None]


def _ash_parts(
    features: torch.Tensor, percentile_value: float, variant: str, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kept, scale)`` with ``a' = kept * scale[:, None]``; ``scale`` is float64 or None (meaning 1)."""
    if variant not in _ASH_VARIANTS:
        raise ValueError(f"{name}: variant must be one of {', '.join(_ASH_VARIANTS)}, got {variant!r}")
    d = features.shape[1]
    k = kept_count(d, percentile_value)
    if k < 1:
        raise ValueError(
            f"{name}: percentile {percentile_value:g} keeps k = {k} of D = {d} activations; "
            f"lower the percentile so that round(D * p / 100) < D"
        )
    top_values, top_index = torch.topk(features, k, dim=1, sorted=False)
    kept = torch.zeros_like(features)
    if variant == "b":
        kept.scatter_(1, top_index, 1.0)
        return kept, _row_sums(features) / k
    kept.scatter_(1, top_index, top_values)
    if variant == "p":
        return kept, None
    return kept, _sharpening(features, top_values, _row_sums(features), name)


def _scaled_logits(kept: torch.Tensor, scale: torch.Tensor | None, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """``scale * (kept W^T) + b`` with the product in the input dtype and the scaling in float64.

    The scale multiplies the ``[n, C]`` product rather than the features (``exp(r)`` can overflow float32).
    """
    if scale is None:
        return torch.addmm(state["bias"], kept, state["weight"].T)
    products = kept @ state["weight"].T
    # the [n, C] scaling is cheap next to the product: always float64, so a row's score never depends on
    # which other rows share its chunk
    return torch.addcmul(state["bias"].to(torch.float64), products.to(torch.float64), scale.to(torch.float64)[:, None])


class HeadStateDetector(OutputDetector):
    """Features + head at fit, features at score; the head copied into the state (:func:`head_state`).

    Chunks of a ``partial_fit`` or ``merge`` must carry the same head, which is kept once.
    """

    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The head is not additive: it must be the same model's head in every chunk, and is kept once.
        if a["weight"].shape != b["weight"].shape or not (
            torch.equal(a["weight"], b["weight"].to(a["weight"].device))
            and torch.equal(a["bias"], b["bias"].to(a["bias"].device))
        ):
            raise ValueError(f"{self.name}: the chunks were fitted with different heads; fit on outputs of one model")
        combined = super()._combine(a, b)
        combined["weight"], combined["bias"] = a["weight"], a["bias"]
        return combined


class _HeadShapingDetector(HeadStateDetector):
    """Shared declarations: energy of the logits of a shaped head or shaped features."""

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        assert self.state_ is not None
        c, d = self.state_["weight"].shape
        return 8 * (4 * d + 4 * c + 16)


@register
class ReAct(_HeadShapingDetector):
    """ReAct — rectified activations: clip the features at a fit percentile, then the energy.

    Formula::

        c     = pct_p(all entries of z over the fit set)     (numpy-default linear interpolation)
        f'    = W min(z, c) + b
        score = -LSE(f')                                     (higher = more OOD)

    Parameters
    ----------
    percentile : float in (0, 100], default 90
        ``p`` of the official code. ``p = 100`` clips nothing (the plain energy score).

    Fit on in-distribution features (official ``compute_threshold.py``: about 2 000 ImageNet
    **validation** images, giving ``c ~ 1.0`` for ResNet-50; OpenOOD: the whole ID validation split,
    APS sweep 85/90/95/99; the ViM repository uses the 0.99 quantile of training features). The head is
    copied into the state at fit. No ``partial_fit``: a percentile is not a sufficient statistic.

    Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
    Code: deeplearning-wisc/react ``compute_threshold.py``, ``models/resnet.py`` (``forward_threshold``); OpenOOD
    ``openood/postprocessors/react_postprocessor.py``.
    """

    name = "react"
    summary = "energy of the logits recomputed from features clipped at a fit percentile"
    paper = "Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021"
    code = "https://github.com/deeplearning-wisc/react (compute_threshold.py, models/resnet.py forward_threshold)"

    # p = 0 would clip every activation to the minimum
    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="right")]}

    def __init__(self, *, percentile: float = 90) -> None:
        self.percentile = percentile
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        state = head_state(outputs)
        state["threshold"] = percentile(outputs.features, float(self.percentile)).to(torch.float64)
        return state

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        clipped = torch.minimum(features, state["threshold"])
        return _neg_energy(torch.addmm(state["bias"], clipped, state["weight"].T))


@register
class DICE(_HeadShapingDetector):
    """DICE — directed sparsification: keep the head's largest mean contributions, then the energy.

    Formula (``m`` = mean of ``z`` over the fit set)::

        V_cd  = W_cd * m_d                                   (signed contributions, C x D)
        tau   = pct_p(all C*D entries of V)                  (numpy-default linear interpolation)
        W'    = W * 1[V > tau]
        score = -LSE(W' z + b)                               (higher = more OOD)

    Parameters
    ----------
    percentile : float in [0, 100), default 90
        Sparsity ``p`` (the share of weights removed). Official settings: 90 for CIFAR-10/100 with
        DenseNet-101 (``demo-cifar.sh``), **70 for ImageNet with ResNet-50** (``demo-imagenet.sh``);
        OpenOOD uses 90 everywhere.

    Fit on in-distribution **training** features (official ``precompute.py``, test transform). The fit
    statistics are the feature sum and the row count (plus the head, which must be identical across
    chunks), so ``partial_fit`` and ``merge`` are exact; the percentile is taken in the finalisation.

    Deviations from the official code: docs/detectors.md, section ``dice``.

    Paper: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
    Code: deeplearning-wisc/dice ``models/route.py`` (``RouteDICE``), ``precompute.py``; OpenOOD
    ``openood/postprocessors/dice_postprocessor.py``.
    """

    name = "dice"
    summary = "energy of the logits through a head sparsified to its largest mean contributions"
    paper = "Sun & Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022"
    code = "https://github.com/deeplearning-wisc/dice (models/route.py RouteDICE, precompute.py)"

    state_reductions = {"feature_sum": "sum", "count": "sum"}
    _parameter_constraints = {"percentile": _BELOW_HUNDRED}

    def __init__(self, *, percentile: float = 90) -> None:
        self.percentile = percentile
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features
        stats = head_state(outputs)
        stats["feature_sum"] = features.sum(dim=0, dtype=torch.float64)
        stats["count"] = torch.tensor([float(features.shape[0])], dtype=torch.float64, device=features.device)
        return stats

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean = stats["feature_sum"] / stats["count"]
        contribution = stats["weight"] * mean
        threshold = percentile(contribution, float(self.percentile)).to(torch.float64)
        weight = stats["weight"] * (contribution > threshold)
        return {"weight": weight, "bias": stats["bias"].clone(), "mean": mean, "threshold": threshold}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        return neg_energy_of_head(features, state)


class _TopKDetector(_HeadShapingDetector):
    """Shared by ASH and SCALE: no statistics, the fit only records the final layer ``(W, b)``."""

    percentile: float  # set by the subclasses' constructors

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        if kept_count(outputs.features.shape[1], float(self.percentile)) < 1:
            raise ValueError(
                f"{self.name}: percentile {self.percentile:g} keeps no activation of "
                f"D = {outputs.features.shape[1]}; lower the percentile so that round(D * p / 100) < D"
            )
        return head_state(outputs)


@register
class ASH(_TopKDetector):
    """ASH — activation shaping: keep each feature's top-k entries (pruned, binarised or scaled), then the energy.

    With ``k = D - round(D p / 100)`` entries kept, ``T_k`` their indices, ``s1 = sum_j z_j``::

        ASH-P: a_j = z_j if j in T_k else 0
        ASH-B: a_j = s1 / k if j in T_k else 0              (preserves the sum s1)
        ASH-S: a = ASH-P(z) * exp(s1 / s2),  s2 = sum_{j in T_k} z_j
        score = -LSE(W a + b)                                (higher = more OOD)

    Parameters
    ----------
    variant : {"p", "b", "s"}, default "s"
        Prune, binarise or scale.
    percentile : float in [0, 100), default 90
        Share of activations removed. Official configurations (``andrijazz/ash/config/*.yml``; the
        function default is 65):

        ========================  ===============  ==========
        model                     ID               method
        ========================  ===============  ==========
        ResNet-50                 ImageNet         ash_s@90
        MobileNet-v2              ImageNet         ash_s@90
        DenseNet (ImageNet)       ImageNet         ash_s@99
        VGG-16                    ImageNet         ash_b@99
        ViT (CLS token)           ImageNet         ash_s@95
        DenseNet-101              CIFAR-10/100     ash_s@95
        ========================  ===============  ==========

    No statistics are fitted: ``fit`` only records the final layer ``(W, b)`` so that scoring needs only
    the features. Applied to the pooled penultimate feature (``n = D``), as the official ResNet code does.

    Deviations from the official code: docs/detectors.md, section ``ash``.

    Paper: Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023.
    Code: andrijazz/ash ``ash.py`` (``ash_p``, ``ash_b``, ``ash_s``), ``config/*.yml``.
    """

    name = "ash"
    summary = "energy of the logits from each feature's top-k activations (pruned, binarised or scaled)"
    paper = "Djurisic, Bozanic, Ashok & Liu, Extremely Simple Activation Shaping for OOD Detection, ICLR 2023"
    code = "https://github.com/andrijazz/ash (ash.py ash_p/ash_b/ash_s, config/*.yml)"

    _parameter_constraints = {"variant": [Options(_ASH_VARIANTS)], "percentile": _BELOW_HUNDRED}

    def __init__(self, *, variant: str = "s", percentile: float = 90) -> None:
        self.variant = variant
        self.percentile = percentile
        super().__init__()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        kept, scale = _ash_parts(features, float(self.percentile), self.variant, self.name)
        return _neg_energy(_scaled_logits(kept, scale, state))


@register
class SCALE(_TopKDetector):
    """SCALE — rescale the whole feature by the share of its sum held by the top-k entries, then the energy.

    With ``k = D - round(D p / 100)``, ``s1 = sum_j z_j``, ``s2`` = sum of the k largest entries::

        z'    = z * exp(s1 / s2)                             (nothing is pruned)
        score = -LSE(W z' + b)                               (higher = more OOD; the bias is not scaled)

    Parameters
    ----------
    percentile : float in [0, 100), default 85
        Official ``configs/postprocessors/scale.yml`` and OpenOOD (APS sweeps: official 50..95, OpenOOD
        65..95).

    No statistics are fitted: ``fit`` only records the final layer ``(W, b)``. Same assumption as ASH-S
    (non-negative activations, ``s2 > 0``).

    Deviations from the official code: docs/detectors.md, section ``scale``.

    Paper: Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024.
    Code: kai422/SCALE ``openood/networks/scale_net.py`` (``scale``), ``configs/postprocessors/scale.yml``.
    """

    name = "scale"
    summary = "energy of the logits from the feature scaled by exp(sum / top-k sum)"
    paper = (
        "Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution Detection "
        "Enhancement, ICLR 2024"
    )
    code = "https://github.com/kai422/SCALE (openood/networks/scale_net.py scale)"

    _parameter_constraints = {"percentile": _BELOW_HUNDRED}

    def __init__(self, *, percentile: float = 85) -> None:
        self.percentile = percentile
        super().__init__()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        d = features.shape[1]
        k = kept_count(d, float(self.percentile))
        top_values = torch.topk(features, k, dim=1, sorted=False).values
        scale = _sharpening(features, top_values, _row_sums(features), self.name)
        return _neg_energy(_scaled_logits(features, scale, state))
