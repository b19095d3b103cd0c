"""IGEOOD: Fisher-Rao distances between softmax distributions (logits) and between class-conditional Gaussians
(features).

Paper: Gomes, Alberge, Duhamel & Piantanida, "Igeood: An Information Geometry Approach to Out-of-Distribution
Detection", ICLR 2022. Code: the first author's edadaltocg/detectors, ``src/detectors/methods/igeood_logits.py`` and
``igeood_features.py``.
"""

from __future__ import annotations

import math

import torch

from oodguard.detectors.base import OutputDetector, class_counts, register
from oodguard.detectors.distance import ClassStatistics
from oodguard.detectors.params import Interval, Real
from oodguard.outputs import ModelOutputs

_F64 = torch.float64
_TWO_SQRT2 = 2.0 * math.sqrt(2.0)
#: Units whose within-class variance is below this fraction of the largest count as constant (as the pseudo-inverses).
_VARIANCE_RTOL = 1e-10


def half_fisher_rao_to_centroids(logits: torch.Tensor, roots: torch.Tensor, temperature: float) -> torch.Tensor:
    """Half the Fisher-Rao distance, ``arccos(sum_i sqrt(p_i q_ci))``, for every row of ``logits`` ``[n, C]``
    and every centroid ``c``.

    ``p = softmax(logits / T)``; ``roots`` ``[K, C]`` holds the centroids' ``sqrt(q_c)``. The square roots are
    ``exp(log_softmax / 2)``, exact where a probability underflows. The affinity is clamped to ``[0, 1]``
    (rounding can push it past 1 for identical distributions).
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    sample_roots = torch.log_softmax(scaled, dim=1).mul_(0.5).exp_()
    return torch.arccos_((sample_roots @ roots.T).clamp_(0.0, 1.0))


@register
class Igeood(OutputDetector):
    """IGEOOD (logits) — mean Fisher-Rao distance of the softmax to the class-centroid softmaxes.

    Formula (``mu_c`` = mean fit logit vector of class ``c`` (by label); ``p = softmax(f / T)``,
    ``q_c = softmax(mu_c / T)``)::

        d_FR(p, q) = 2 arccos( sum_i sqrt(p_i q_i) )
        score      = -(1/C) sum_c d_FR(p, q_c)               (higher = more OOD)

    A confident ID prediction lies near one centroid and far from the other ``C - 1``; an OOD sample's flatter
    softmax lies at a similar, smaller distance from all of them, so its mean distance is smaller.

    Parameters
    ----------
    temperature : float > 0, default 1.0
        ``T`` (the official default; the paper tunes it per model together with an input perturbation, which
        is not part of this output-only score).

    Fit on labelled in-distribution training logits: the statistics are per-class logit sums and counts, so
    ``partial_fit`` and ``merge`` are exact. Every class needs at least one fit row.

    Paper: Gomes, Alberge, Duhamel & Piantanida, ICLR 2022. Code: edadaltocg/detectors
    ``src/detectors/methods/igeood_logits.py`` (``IgeoodLogits``, ``igeoodlogits_vec``). Deviations:
    docs/detectors.md, section ``igeood``.
    """

    name = "igeood"
    summary = "minus the mean Fisher-Rao distance between the softmax and the softmaxes of the class-mean logits"
    paper = (
        "Gomes, Alberge, Duhamel & Piantanida, Igeood: An Information Geometry Approach to Out-of-Distribution "
        "Detection, ICLR 2022"
    )
    code = "https://github.com/edadaltocg/detectors (src/detectors/methods/igeood_logits.py)"
    requires = frozenset({"logits"})
    fit_requires = frozenset({"logits", "labels"})
    state_reductions = {"class_sum": "sum", "class_count": "sum"}

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature: float = 1.0) -> None:
        self.temperature = temperature
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        logits = outputs.logits.to(_F64)
        c = logits.shape[1]
        labels = outputs.labels.to(device=logits.device, dtype=torch.long)
        counts = class_counts(labels, c, self.name, minimum=0).to(_F64)
        sums = torch.zeros(c, c, dtype=_F64, device=logits.device).index_add_(0, labels, logits)
        return {"class_sum": sums, "class_count": counts}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = stats["class_count"]
        if bool((counts < 1).any()):
            missing = torch.nonzero(counts < 1).flatten().tolist()
            raise ValueError(
                f"{self.name}: every class needs at least one labelled fit row; classes {missing[:10]} have none"
            )
        centroids = stats["class_sum"] / counts[:, None]
        roots = torch.exp(0.5 * torch.log_softmax(centroids / float(self.temperature), dim=1))
        return {"centroid_roots": roots}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * (4 * (outputs.num_classes or 1) + 16)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.logits
        roots = self.state(logits.device, logits.dtype)["centroid_roots"]
        distances = half_fisher_rao_to_centroids(logits, roots, float(self.temperature))
        return -2.0 * distances.mean(dim=1).to(_F64)  # the factor 2 of d_FR, applied per row


def fisher_rao_to_means(scaled: torch.Tensor, scaled_means: torch.Tensor) -> torch.Tensor:
    """``sum_d asinh(|x_d - m_cd|)^2`` for every row of ``scaled`` ``[n, D]`` and every row ``c`` of ``scaled_means``.

    With ``x = z / (2 sqrt(2) sigma)`` and ``m = mu / (2 sqrt(2) sigma)`` this is ``d_FR^2 / 8`` of the diagonal
    Gaussians ``N(z, sigma^2)`` and ``N(mu_c, sigma^2)`` (see :class:`IgeoodFeatures`). Float64 sums; the ``[n, C, D]``
    temporaries in the dtype of ``scaled``.
    """
    gaps = (scaled[:, None, :] - scaled_means[None, :, :]).abs_()
    return gaps.asinh_().square_().sum(dim=2, dtype=_F64)


@register
class IgeoodFeatures(ClassStatistics):
    """IGEOOD (features) — Fisher-Rao distance to the nearest class-conditional diagonal Gaussian.

    Fit (ID features and true labels): class means ``mu_c`` and the per-unit within-class variance ``sigma_d^2``
    (the diagonal of the tied covariance, biased). The sample is the Gaussian ``N(z, diag sigma^2)``; its distance to
    class ``c`` is the Fisher-Rao distance between diagonal Gaussians, which is the l2 norm of the univariate
    distances (the Fisher metric of a product of independent Gaussians is the sum of theirs)::

        d_FR(N(m1, s1), N(m2, s2)) = sqrt(2) log((a + b) / (a - b)),
            a = ||(m1/sqrt2, s1) - (m2/sqrt2, -s2)||,  b = ||(m1/sqrt2, s1) - (m2/sqrt2, s2)||
                                    = 2 sqrt(2) asinh(|m1 - m2| / (2 sqrt(2) s))      for s1 = s2 = s
        score = min_c sqrt(sum_d d_FR(N(z_d, sigma_d), N(mu_cd, sigma_d))^2)             (higher = more OOD)

    The ``asinh`` form is the same quantity without the cancellation of ``a - b``. Units that do not vary within
    classes (``sigma_d = 0``, e.g. dead units) are left out, as the pseudo-inverse of ``mahalanobis`` leaves them out;
    features that vary in no unit are refused.

    Fit statistics are those of ``mahalanobis`` (class counts, sums and the within-class scatter, Chan's update), so
    ``partial_fit`` and ``merge`` are exact; every class needs at least 2 fit rows. Scoring costs one ``asinh`` per
    (row, class, unit): ``C D`` per row, with no matrix product to share it.

    Paper: Gomes, Alberge, Duhamel & Piantanida, ICLR 2022 (the white-box feature score, one layer, without input
    pre-processing). Code: edadaltocg/detectors ``src/detectors/methods/igeood_features.py`` (``IgeoodFeatures``,
    ``fr_distance_univariate_gaussian``, ``class_cond_mus_cov_matrix``). Deviations: docs/detectors.md, section
    ``igeood_features``.
    """

    name = "igeood_features"
    summary = "Fisher-Rao distance to the nearest class-conditional Gaussian with the tied diagonal covariance"
    paper = Igeood.paper
    code = "https://github.com/edadaltocg/detectors (src/detectors/methods/igeood_features.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        means, _, within = self._means(stats)
        variance = within.diagonal().clamp_min(0.0)
        # zero up to the rounding of the scatter: relative to the largest variance, as the pseudo-inverses cut off
        kept = variance > _VARIANCE_RTOL * float(variance.max())
        if not bool(kept.any()):
            raise ValueError(
                f"{self.name}: the fit features do not vary within classes (every unit's variance is zero), so every "
                "input would score the same; fit on features that vary"
            )
        scale = torch.where(kept, 1.0 / (_TWO_SQRT2 * variance.clamp_min(torch.finfo(_F64).tiny).sqrt()), 0.0)
        return {"scale": scale, "scaled_means": means * scale}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        if "scaled_means" not in state:
            return 64 * 1024
        classes, dim = state["scaled_means"].shape
        return 8 * (classes * dim + 2 * dim)

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        squared = fisher_rao_to_means(z * state["scale"], state["scaled_means"])
        return _TWO_SQRT2 * squared.amin(dim=1).sqrt_()
