"""Closeness of the prediction to the optimal constant solution (OCS) of the training loss: ``ocs``.

Kang, Setlur, Tomlin & Levine (ICLR 2024) observe that as inputs move away from the training distribution, a
network's predictions tend towards the OCS: the one prediction that minimises the training loss when the input is
ignored. For cross-entropy that is the marginal distribution of the training labels. A prediction near the OCS
therefore hints that the input is unfamiliar; :func:`oodguard.diagnostics.ocs_curve` measures the trend itself.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from oodguard.detectors.base import OutputDetector, class_counts, register
from oodguard.outputs import ModelOutputs

__all__ = ["OCS", "OCS_FLOOR", "kl_to_ocs", "optimal_constant_solution"]

_F64 = torch.float64
#: OCS probabilities are floored here before the log (a class absent from the fit labels has OCS probability 0).
OCS_FLOOR = 1e-12


def optimal_constant_solution(labels: Any, num_classes: int) -> torch.Tensor:
    """The cross-entropy OCS: the share of each class among ``labels`` (integers in ``0..num_classes-1``), float64.

    Examples
    --------
    >>> optimal_constant_solution(torch.tensor([0, 0, 0, 2]), 3).tolist()
    [0.75, 0.0, 0.25]
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(f"labels: expected a non-empty 1-D array of class indices, got shape {tuple(labels.shape)}")
    counts = class_counts(labels.long().cpu(), num_classes, "labels", minimum=0)
    return counts.to(_F64) / counts.sum()


def kl_to_ocs(logits: torch.Tensor, log_ocs: torch.Tensor) -> torch.Tensor:
    """``KL(p || ocs) = sum_k p_k (log p_k - log ocs_k)`` with ``p = softmax(logits)``, per row, float64.

    The divergence of the official notebooks (``np.sum(dist * np.log(dist / class_probs), axis=-1)``); ``log p`` comes
    from log-softmax, so confident rows keep distinct values.
    """
    log_p = torch.log_softmax(logits.to(_F64), dim=1)
    return (log_p.exp() * (log_p - log_ocs.to(device=logits.device, dtype=_F64))).sum(dim=1)


@register
class OCS(OutputDetector):
    """Negative KL divergence from the softmax prediction to the optimal constant solution of the training loss.

    Fit (labelled ID outputs): the cross-entropy OCS ``pi_k = n_k / N``, the marginal distribution of the fit labels
    (class counts: additive, so ``partial_fit`` and ``merge`` are exact). Score: ``-KL(p || pi)`` with
    ``p = softmax(f)``: 0 when the model predicts exactly the OCS, more negative the further its prediction is from
    it (higher = more likely OOD). ``pi`` is floored at ``OCS_FLOOR`` before the log; a class absent from the fit
    labels is warned about.

    Paper: Kang, Setlur, Tomlin & Levine, "Deep Neural Networks Tend To Extrapolate Predictably", ICLR 2024.
    Code: katiekang1998/cautious_extrapolation (``*/plot.ipynb``: ``KL(p || class_probs)`` as the distance to the
    OCS; the paper uses the trend for risk-sensitive decisions and does not propose it as an OOD score itself).
    No hyperparameters.
    """

    name = "ocs"
    summary = "negative KL divergence from the softmax prediction to the marginal label distribution of the fit set"
    paper = "Kang, Setlur, Tomlin & Levine, 'Deep Neural Networks Tend To Extrapolate Predictably', ICLR 2024"
    code = "https://github.com/katiekang1998/cautious_extrapolation (plot.ipynb: distance to the OCS)"
    requires = frozenset({"logits"})
    fit_requires = frozenset({"logits", "labels"})
    state_reductions = {"counts": "sum"}

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        counts = class_counts(outputs.labels.cpu(), outputs.logits.shape[1], self.name, minimum=0)
        return {"counts": counts.to(_F64)}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ocs = stats["counts"] / stats["counts"].sum()
        return {"ocs": ocs, "log_ocs": torch.log(ocs.clamp_min(OCS_FLOOR))}

    def _after_fit(self) -> None:
        missing = torch.nonzero(self.state_["ocs"] == 0).flatten().tolist()
        if missing:
            shown = ", ".join(str(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            warnings.warn(
                f"{self.name}: class(es) {shown} have no fit labels, so the OCS gives them probability 0 (floored at "
                f"{OCS_FLOOR:g}): a prediction for them counts as far from the OCS. Fit on labels of every class",
                stacklevel=3,
            )

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        return -kl_to_ocs(outputs.logits, self.state(outputs.logits.device, _F64)["log_ocs"])

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * 4 * outputs.logits.shape[1]
