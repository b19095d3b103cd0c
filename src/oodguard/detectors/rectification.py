"""Feature rectification and feature-driven logit scaling, each followed by the energy score.

- ``vra``: per-unit piecewise rectification of the features between two fit quantiles (VRA, NeurIPS 2023).
- ``bats``: per-unit truncation of the features to their typical range, mean +- lambda std (BATS, NeurIPS 2022).
- ``lts``: the logits multiplied by a per-sample factor from the features' top-k mass (LTS, 2024).

``vra`` and ``bats`` copy the final linear layer into their state at fit and recompute the logits from the
rectified features; ``lts`` reads the logits and the features and needs no fit. All three return
``-LSE(logits')`` (higher = more OOD) and assume non-negative (post-ReLU, pooled) features, like ReAct.
"""

from __future__ import annotations

import numpy as np
import torch

from oodguard.detectors.base import OutputDetector, register
from oodguard.detectors.params import Interval, Real
from oodguard.detectors.shaping import HeadStateDetector, head_state, kept_count, neg_energy_of_head
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


def vra_rectify(features: torch.Tensor, low: torch.Tensor, high: torch.Tensor, gamma: float) -> torch.Tensor:
    """VRA's piecewise operator per unit: ``0`` below ``low``, ``z + gamma`` in ``[low, high]``, ``high`` above."""
    shaped = torch.where(features > high, high, features + gamma) if gamma else torch.minimum(features, high)
    return shaped.masked_fill_(features < low, 0.0)


class _RectifiedEnergy(HeadStateDetector):
    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        assert self.state_ is not None
        c, d = self.state_["weight"].shape
        return 8 * (3 * d + 2 * c + 16)


@register
class VRA(_RectifiedEnergy):
    """VRA — variational rectified activation: zero the low activations, cap the high ones, lift the middle.

    Formula, per unit ``d`` (``a_d``, ``b_d`` = the ``lower_percentile`` and ``upper_percentile`` percentiles of
    unit ``d`` over the fit features, numpy-default linear interpolation)::

        h(z)_d = 0            if z_d < a_d
               = z_d + gamma  if a_d <= z_d <= b_d
               = b_d          if z_d > b_d
        score  = -LSE(W h(z) + b)                          (higher = more OOD)

    Parameters
    ----------
    lower_percentile, upper_percentile : float in [0, 100], default 60 and 90
        The official CIFAR-10 "VRA" setting (``--q1 0.6 --q2 0.9``); "VRA+" adds ``gamma = 0.6`` with an upper
        percentile of 95. ``lower_percentile`` must not exceed ``upper_percentile``.
    gamma : float >= 0, default 0
        The amplification of the middle band (``--lamb`` of the official code; 0 is plain VRA).

    Fit on in-distribution training features (the official code takes the quantiles of the CIFAR training
    features). The head is copied into the state. No ``partial_fit``: quantiles are not sufficient statistics.

    Paper: Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution Detection",
    NeurIPS 2023. Code: zeroQiaoba/VRA ``ood_eval.py`` (quantiles), ``models/densenet.py`` (``clip2``).
    """

    name = "vra"
    summary = "energy of the logits from features zeroed below, capped above and lifted between two fit percentiles"
    paper = "Xu, Lian, Liu & Tao, VRA: Variational Rectified Activation for Out-of-distribution Detection, NeurIPS 2023"
    code = "https://github.com/zeroQiaoba/VRA (ood_eval.py, models/densenet.py clip2)"

    _parameter_constraints = {
        "lower_percentile": [Interval(Real, 0, 100)],
        "upper_percentile": [Interval(Real, 0, 100)],
        "gamma": [Interval(Real, 0, None)],
    }

    def __init__(self, *, lower_percentile: float = 60, upper_percentile: float = 90, gamma: float = 0.0) -> None:
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.gamma = gamma
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.lower_percentile > self.upper_percentile:
            raise self._param_error("lower_percentile", f"at most upper_percentile ({self.upper_percentile})")

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        state = head_state(outputs)
        # numpy's per-column percentile (linear interpolation) partitions instead of sorting: far faster than
        # torch.quantile along a dimension
        features = outputs.features.detach().cpu().numpy()
        low, high = np.percentile(features, [self.lower_percentile, self.upper_percentile], axis=0)
        device = state["weight"].device
        state["low"] = torch.as_tensor(low, dtype=_F64).to(device)
        state["high"] = torch.as_tensor(high, dtype=_F64).to(device)
        return state

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        shaped = vra_rectify(features, state["low"], state["high"], float(self.gamma))
        return neg_energy_of_head(shaped, state)


@register
class BATS(_RectifiedEnergy):
    """BATS — truncate each feature unit to its typical range, then the energy.

    Formula, per unit ``d`` (``m_d``, ``s_d`` = mean and standard deviation of unit ``d`` over the fit
    features)::

        z'_d  = min(max(z_d, m_d - lambda s_d), m_d + lambda s_d)
        score = -LSE(W z' + b)                              (higher = more OOD)

    The paper's ResNet-50 version truncates the output of the last batch-normalisation layer to
    ``beta +- lambda gamma`` (the layer's own shift and scale) before the final ReLU and pooling; cached outputs
    hold neither, so this is the version of the official code for CIFAR ResNet-18 and ImageNet ViT, which
    truncates the pooled features to their stored mean +- lambda std (docs/detectors.md, section ``bats``).

    Parameters
    ----------
    lam : float > 0, default 1.05
        ``lambda``: the official ImageNet (ViT-B/16) value; the official CIFAR-10 (ResNet-18) value is 3.25.

    The fit statistics are per-unit sums, sums of squares and the row count (plus the head, kept once), so
    ``partial_fit`` and ``merge`` are exact. The standard deviation is the population one (``ddof = 0``).

    Paper: Zhu, Chen, Xie, Li, Zhang, Xue, Tian, Zheng & Chen, "Boosting Out-of-distribution Detection with
    Typical Features", NeurIPS 2022. Code: alibaba/easyrobust ``examples/ood_detection/BATS/test_ood.py``.
    """

    name = "bats"
    summary = "energy of the logits from features truncated to their typical range, fit mean +- lambda std per unit"
    paper = "Zhu et al., Boosting Out-of-distribution Detection with Typical Features, NeurIPS 2022"
    code = "https://github.com/alibaba/easyrobust (examples/ood_detection/BATS/test_ood.py)"

    state_reductions = {"feature_sum": "sum", "feature_square_sum": "sum", "count": "sum"}
    _parameter_constraints = {"lam": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, lam: float = 1.05) -> None:
        self.lam = lam
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features.to(_F64)
        stats = head_state(outputs)
        stats["feature_sum"] = features.sum(dim=0)
        stats["feature_square_sum"] = (features * features).sum(dim=0)
        stats["count"] = torch.tensor([float(features.shape[0])], dtype=_F64, device=features.device)
        return stats

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = stats["count"]
        mean = stats["feature_sum"] / count
        variance = (stats["feature_square_sum"] / count - mean * mean).clamp_min(0.0)
        spread = float(self.lam) * variance.sqrt()
        return {"weight": stats["weight"], "bias": stats["bias"], "low": mean - spread, "high": mean + spread}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        return neg_energy_of_head(torch.clamp(features, min=state["low"], max=state["high"]), state)


@register
class LTS(OutputDetector):
    """LTS — logit scaling: multiply the logits by a per-sample factor from the features' top-k mass, then the energy.

    Formula (``z+ = max(z, 0)``, ``k = D - round(D p / 100)`` as in ASH, ``s1`` = sum of ``z+``, ``s2`` = sum
    of its ``k`` largest entries)::

        S(z)  = (s1 / s2)^2
        score = -LSE(S(z) f)                                 (higher = more OOD)

    Parameters
    ----------
    percentile : float in [0, 100), default 65
        ``p``: the share of units left out of the top-k mass (the default of the official ``lts`` function).

    No fit: the score reads the logits and the features of the same rows. A row whose rectified features are all
    zero has no scale (``0 / 0``) and is refused.

    Deviations and pytorch-ood 0.4.0 (which also multiplies): docs/detectors.md, section ``lts``.

    Paper: Djurisic, Liu & Nikolic, "Logit Scaling for Out-of-Distribution Detection", arXiv:2409.01175, 2024
    (Machine Vision and Applications, 2025). Code: andrijazz/lts ``lts.py`` (``lts``), ``models/*.py``.
    """

    name = "lts"
    summary = "energy of the logits multiplied by (sum / top-k sum of the rectified features) squared"
    paper = "Djurisic, Liu & Nikolic, Logit Scaling for Out-of-Distribution Detection, arXiv:2409.01175, 2024"
    code = "https://github.com/andrijazz/lts (lts.py)"
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset()
    needs_fit = False

    _parameter_constraints = {"percentile": [Interval(Real, 0, 100, closed="left")]}

    def __init__(self, *, percentile: float = 65) -> None:
        self.percentile = percentile
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        return {}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * (2 * (outputs.feature_dim or 1) + 2 * (outputs.num_classes or 1) + 16)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features, logits = outputs.features.clamp_min(0.0), outputs.logits
        k = kept_count(features.shape[1], float(self.percentile))
        if k < 1:
            raise ValueError(
                f"{self.name}: percentile {self.percentile:g} keeps k = {k} of D = {features.shape[1]} units; "
                "lower the percentile so that round(D * p / 100) < D"
            )
        total = features.sum(dim=1).to(_F64)
        top = torch.topk(features, k, dim=1, sorted=False).values.sum(dim=1).to(_F64)
        if not bool((top > 0).all()):
            bad = int((~(top > 0)).sum())
            raise ValueError(
                f"{self.name}: {bad} row(s) have no positive feature, so the scale (sum / top-k sum)^2 is 0 / 0; "
                "LTS needs features with some positive (post-ReLU) activation in every row"
            )
        factor = (total / top).square_()
        return -torch.logsumexp(logits * factor.to(logits.dtype)[:, None], dim=1).to(_F64)
