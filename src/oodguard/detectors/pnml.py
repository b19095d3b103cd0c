"""pNML: the regret of the predictive normalised maximum likelihood learner of the last layer.

Paper: Bibas, Feder & Hassner, "Single Layer Predictive Normalized Maximum Likelihood for Out-of-Distribution
Detection", NeurIPS 2021. Code: kobybibas/pnml_ood_detection; pytorch-ood ``src/pytorch_ood/detector/pnml.py``.
"""

from __future__ import annotations

import math

import torch

from oodguard.detectors.base import OutputDetector, register, symmetric_pinv
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm (all-zero rows stay zero)."""
    return features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-12)


def pnml_regret(log_probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``log sum_c p_c / (p_c + (1 - p_c) p_c^g) / log C`` per row, from log-probabilities ``[n, C]`` and ``g [n]``.

    Each term is written ``1 / (1 + (1 - p_c) p_c^(g - 1))``: finite for every ``p_c`` in ``[0, 1]`` (0 when
    ``p_c -> 0`` with ``g < 1``, 1 at ``p_c = 1``), so no clamping of the probabilities is needed.
    """
    one_minus = -torch.expm1(log_probs)
    terms = torch.reciprocal(1.0 + one_minus * torch.exp((g[:, None] - 1.0) * log_probs))
    return torch.log(terms.sum(dim=1)) / math.log(log_probs.shape[1])


@register
class PNML(OutputDetector):
    """pNML — the regret of the single-layer predictive normalised maximum likelihood learner.

    Formula (``x = z / ||z||``; ``X`` = the unit-normalised fit features as rows; ``p = softmax(f)``)::

        P     = (X^T X)^+                                    (pseudo-inverse, D x D)
        g     = x^T P x / (1 + x^T P x)
        score = log( sum_c p_c / (p_c + (1 - p_c) p_c^g) ) / log C     (regret in [0, 1]; higher = more OOD)

    A test point in a direction the fit features barely span has a large ``x^T P x``, ``g`` near 1 and a regret
    near 1; a point well inside their span has ``g`` near 0 and a regret near ``log(sum p / (p + 1 - p)) = 0``.

    No parameters. Fit on in-distribution training features (official code: the training set). The fit
    statistic is the scatter ``X^T X`` (float64) and the row count, so ``partial_fit`` and ``merge`` are exact.
    Scoring reads the features and the model's logits.

    Paper: Bibas, Feder & Hassner, NeurIPS 2021. Code: kobybibas/pnml_ood_detection; pytorch-ood
    ``src/pytorch_ood/detector/pnml.py``. Deviations: docs/detectors.md, section ``pnml``.
    """

    name = "pnml"
    summary = "regret of the predictive normalised maximum likelihood learner of the last layer"
    paper = (
        "Bibas, Feder & Hassner, Single Layer Predictive Normalized Maximum Likelihood for Out-of-Distribution "
        "Detection, NeurIPS 2021"
    )
    code = "https://github.com/kobybibas/pnml_ood_detection (pytorch-ood: src/pytorch_ood/detector/pnml.py)"
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features"})
    state_reductions = {"scatter": "sum", "count": "sum"}

    def __init__(self) -> None:
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        unit = unit_rows(outputs.features.to(_F64))
        count = torch.tensor([float(unit.shape[0])], dtype=_F64, device=unit.device)
        return {"scatter": unit.T @ unit, "count": count}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"projector": symmetric_pinv(stats["scatter"]).to(stats["scatter"].device)}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * (3 * (outputs.feature_dim or 1) + 4 * (outputs.num_classes or 1) + 16)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        projector = self.state(features.device, features.dtype)["projector"]
        # x^T P x of the unit row, as z^T P z / ||z||^2: no normalised copy of the features
        squared_norms = (features * features).sum(dim=1).to(_F64).clamp_min_(1e-24)
        quadratic = ((features @ projector) * features).sum(dim=1).to(_F64).div_(squared_norms).clamp_min_(0.0)
        g = quadratic / (1.0 + quadratic)
        log_probs = torch.log_softmax(outputs.logits.to(_F64), dim=1).to(g.device)
        return pnml_regret(log_probs, g)
