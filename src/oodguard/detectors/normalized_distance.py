"""Mahalanobis++: the Mahalanobis and relative Mahalanobis detectors on L2-normalised features.

Each feature is divided by its L2 norm, at fit and at score, before the class-conditional Gaussian statistics of
:class:`~oodguard.detectors.distance.Mahalanobis` and :class:`~oodguard.detectors.distance.RelativeMahalanobis` are
estimated or applied. The fit statistics stay the class counts, sums and scatters (now of the normalised features),
so ``partial_fit``, ``merge`` and ``fit_distributed`` remain exact.
"""

from __future__ import annotations

import copy

import torch

from oodguard.detectors.base import register
from oodguard.detectors.distance import ClassStatistics, Mahalanobis, RelativeMahalanobis, normalize_rows
from oodguard.outputs import ModelOutputs

_PAPER = "Mueller & Hein, 'Mahalanobis++: Improving OOD Detection via Feature Normalization', arXiv:2505.18032, 2025"


def _normalized(outputs: ModelOutputs) -> ModelOutputs:
    """The same outputs with each feature row divided by ``max(||z||, 1e-10)`` (a zero row stays zero)."""
    copied = copy.copy(outputs)
    copied.features = normalize_rows(outputs.features)
    return copied


class _OnNormalizedFeatures(ClassStatistics):
    """Fit and score the class statistics of the next class in the MRO on L2-normalised features."""

    def _fit_features(self, outputs: ModelOutputs) -> torch.Tensor:
        return normalize_rows(outputs.features.to(torch.float64))

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        return super()._score_complete(_normalized(outputs))


@register
class MahalanobisPlusPlus(_OnNormalizedFeatures, Mahalanobis):
    """Mahalanobis++: ``mahalanobis`` on L2-normalised features.

    Fit (ID training features and true labels): ``z_hat = z / ||z||``; class means, tied covariance (biased, 1/N) and
    its pseudo-inverse of the ``z_hat``, exactly as :class:`~oodguard.detectors.distance.Mahalanobis` (``shrinkage``
    as there). Score: ``min_c (z_hat - mu_c)^T P (z_hat - mu_c)`` (higher = more OOD; the paper's confidence is its
    negation). Exact ``partial_fit`` and ``merge``.

    Paper: Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", arXiv:2505.18032, 2025.
    Code: mueller-mp/maha-norm ``OpenOOD/openood/postprocessors/mdsn_postprocessor.py`` (``MDSNPostprocessor``).
    """

    name = "mahalanobis_pp"
    summary = "Minimum Mahalanobis distance to the class means of L2-normalised features (Mahalanobis++)"
    paper = _PAPER
    code = "https://github.com/mueller-mp/maha-norm (OpenOOD/openood/postprocessors/mdsn_postprocessor.py)"


@register
class RelativeMahalanobisPlusPlus(_OnNormalizedFeatures, RelativeMahalanobis):
    """Relative Mahalanobis on L2-normalised features (the RMDS variant of Mahalanobis++).

    As :class:`~oodguard.detectors.distance.RelativeMahalanobis` with every feature replaced by ``z / ||z||`` at fit
    and at score: ``min_c M_c(z_hat) - M_0(z_hat)``. Exact ``partial_fit`` and ``merge``.

    Paper: Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", arXiv:2505.18032, 2025.
    Code: mueller-mp/maha-norm ``OpenOOD/openood/postprocessors/rmdsn_postprocessor.py`` (config ``rmdsn.yml``).
    """

    name = "rmds_pp"
    summary = "Relative Mahalanobis distance (class minus global Gaussian) of L2-normalised features"
    paper = _PAPER
    code = "https://github.com/mueller-mp/maha-norm (OpenOOD/openood/postprocessors/rmdsn_postprocessor.py)"
