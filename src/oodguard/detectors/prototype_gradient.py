"""GROOD: nearest-neighbour distance in the space of gradients with respect to an OOD prototype.

Paper: ElAraby, Sahoo, Pequignot, Novello & Paull, "GROOD: Gradient-Aware Out-of-Distribution Detection",
TMLR 2025 (arXiv:2312.14427). Code: OpenOOD v1.5 ``openood/postprocessors/grood.py`` (``GrOODPostprocessor``),
``configs/postprocessors/grood.yaml``.
"""

from __future__ import annotations

from typing import Any

import torch

from oodguard.detectors.base import OutputDetector, class_counts, register
from oodguard.detectors.params import ArrayLike
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


def prototype_gradients(features: torch.Tensor, prototypes: torch.Tensor, ood_prototype: torch.Tensor) -> torch.Tensor:
    """Gradient of the nearest-class-prototype cross-entropy with respect to the OOD prototype, per row.

    The loss is ``CE(softmax(s), y)`` with ``s_j = -||z - p_j||`` over the C class prototypes and the OOD prototype
    ``p_o``; the label ``y`` is a class, never the OOD entry, so the gradient does not depend on it::

        dCE / dp_o = softmax(s)_o * (z - p_o) / ||z - p_o||

    Distances are computed in float64 (centred on ``p_o``: no cancellation for features far from 0); the result is
    float64 ``[n, D]``.
    """
    z = features.to(_F64) - ood_prototype
    centred = prototypes - ood_prototype
    squared = torch.addmm(centred.square().sum(1), z, centred.T, alpha=-2.0)  # [n, C] = |p|^2 - 2 z.p
    norm = torch.linalg.vector_norm(z, dim=1)
    class_distances = (squared + norm.square()[:, None]).clamp_min_(0.0).sqrt_()
    logits = torch.cat([-class_distances, -norm[:, None]], dim=1)
    ood_probability = torch.softmax(logits, dim=1)[:, -1]
    # a feature at the OOD prototype has no direction: its gradient is 0 (the subgradient autograd gives)
    return z * (ood_probability / norm.clamp_min(torch.finfo(_F64).tiny))[:, None]


@register
class Grood(OutputDetector):
    """GROOD — squared distance of the OOD-prototype gradient to the nearest gradient of a correct fit row.

    Fit (ID features, logits and true labels): class prototypes ``p_c`` = mean feature of class ``c``; the OOD
    prototype ``p_o`` = mean of ``ood_features`` when given (OpenOOD's default: the features of 100 validation OOD
    samples), else the mean of the class prototypes (the official ``use_proto_mean`` option, the only one that needs
    no data beyond the fit outputs). The bank holds ``g(z_i)`` for the fit rows the model classifies correctly
    (``argmax logits == label``), with::

        g(z)  = q_o(z) (z - p_o) / ||z - p_o||,   q_o = softmax_j(-||z - p_j||) at the OOD entry
        score = min_i ||g(z) - g(z_i)||^2                                   (higher = more OOD)

    ``g`` is the gradient of the cross-entropy of the nearest-class-prototype classifier with respect to ``p_o``
    (closed form: the official code takes it by autograd or, with ``use_direct_grad``, by this formula).

    Parameters
    ----------
    ood_features : array ``[m, D]`` or None, default None
        Features of OOD samples (validation OOD, noise images, synthetic outliers) whose mean is the OOD prototype;
        None takes the mean of the class prototypes.

    The bank is ``N_correct x D`` (like ``knn``'s) and the search exact (the official code searches a FAISS IVF
    index with 4 probes). Every class needs at least one fit row and some fit row must be classified correctly.

    Paper: ElAraby, Sahoo, Pequignot, Novello & Paull, TMLR 2025. Code: OpenOOD v1.5
    ``openood/postprocessors/grood.py``. Deviations: docs/detectors.md, section ``grood``.
    """

    name = "grood"
    summary = (
        "squared distance of the gradient of the nearest-prototype loss w.r.t. an OOD prototype to the nearest such "
        "gradient of a correctly classified fit row"
    )
    paper = (
        "ElAraby, Sahoo, Pequignot, Novello & Paull, 'GROOD: Gradient-Aware Out-of-Distribution Detection', "
        "TMLR 2025 (arXiv:2312.14427)"
    )
    code = "https://github.com/Jingkang50/OpenOOD (openood/postprocessors/grood.py, GrOODPostprocessor)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "logits", "labels"})
    _parameter_constraints = {"ood_features": [None, ArrayLike(ndim=2)]}

    def __init__(self, *, ood_features: Any = None) -> None:
        self.ood_features = ood_features
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.ood_features is None:
            return
        rows = torch.as_tensor(self.ood_features)
        if rows.shape[0] == 0:
            raise self._param_error("ood_features", "an array of shape [m, D] with m >= 1 rows")
        if not bool(torch.isfinite(rows).all()):
            raise self._param_error("ood_features", "finite (it holds NaN or Inf)")

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        labels = outputs.labels.to(device=z.device, dtype=torch.long)
        num_classes = outputs.logits.shape[1]
        counts = class_counts(labels, num_classes, self.name, minimum=1).to(_F64)
        prototypes = z.new_zeros(num_classes, z.shape[1], dtype=_F64).index_add_(0, labels, z.to(_F64))
        prototypes /= counts[:, None]
        if self.ood_features is None:
            ood_prototype = prototypes.mean(0)
        else:
            extra = torch.as_tensor(self.ood_features).to(device=z.device, dtype=_F64)
            if extra.shape[1] != z.shape[1]:
                raise ValueError(
                    f"{self.name}: ood_features have D={extra.shape[1]} columns but the fit features D={z.shape[1]}; "
                    "pass OOD features from the same model and layer"
                )
            ood_prototype = extra.mean(0)
        spread = float((prototypes - ood_prototype).abs().max())
        if spread <= 1e-12 * max(1.0, float(ood_prototype.abs().max())):
            raise ValueError(
                f"{self.name}: every class prototype coincides with the OOD prototype (the fit features do not differ "
                "between classes), so the OOD probability is 1/(C+1) everywhere and every input would score the same; "
                "fit on features that separate the classes, or pass ood_features"
            )
        correct = outputs.logits.argmax(dim=1).to(labels.device) == labels
        if not bool(correct.any()):
            raise ValueError(
                f"{self.name}: no fit row is classified correctly (argmax of the logits equals the label), so the "
                "gradient bank would be empty; check that the labels and logits come from the same rows and model"
            )
        bank = prototype_gradients(z[correct], prototypes, ood_prototype)
        return {
            "prototypes": prototypes,
            "ood_prototype": ood_prototype,
            "bank": bank.to(z.dtype if z.is_floating_point() else torch.float32),
            "bank_sq": bank.square().sum(1),
        }

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        return 12 * (state["bank"].shape[0] if "bank" in state else 64 * 1024)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device)
        gradients = prototype_gradients(z, state["prototypes"], state["ood_prototype"])
        bank = state["bank"].to(z.dtype)
        # |b|^2 - 2 g.b in the features' dtype over the bank; the row's own |g|^2 and the minimum in float64
        cross = torch.addmm(state["bank_sq"].to(z.dtype), gradients.to(z.dtype), bank.T, alpha=-2.0)
        return (cross.amin(dim=1).to(_F64) + gradients.square().sum(1)).clamp_min_(0.0)
