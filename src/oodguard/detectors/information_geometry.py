"""IGEOOD: Fisher-Rao distances between softmax distributions (the logits-based, black-box score).

Paper: Gomes, Alberge, Duhamel & Piantanida, "Igeood: An Information Geometry Approach to Out-of-Distribution
Detection", ICLR 2022. Code: the first author's edadaltocg/detectors, ``src/detectors/methods/igeood_logits.py``.
"""

from __future__ import annotations

import torch

from oodguard.detectors.base import OutputDetector, class_counts, register
from oodguard.detectors.params import Interval, Real
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


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
