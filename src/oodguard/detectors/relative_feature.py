"""Class-aware relative feature errors: how far a sample's features lie from the mean features of its predicted class.

- ``caref``: ``||z - mu_yhat||_1 / ||z||_1`` (CARef).
- ``cadref``: the same error split by the sign of the predicted class's weights into the part that raises the
  maximum logit and the part that lowers it, each rescaled by a logit confidence (CADRef).

``mu_c`` is the mean fit feature over the rows the model *predicts* as class ``c`` (official code), not over the
labelled rows; the fit statistics are per-class sums and counts, so ``partial_fit`` and ``merge`` are exact.

Paper: Ling et al., "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative
Feature Leveraging", CVPR 2025. Code: LingAndZero/CADRef; pytorch-ood ``detector/caref.py``, ``cadref.py``.
"""

from __future__ import annotations

import warnings

import torch

from oodguard.detectors.base import OutputDetector, register
from oodguard.outputs import ModelOutputs

_F64 = torch.float64
_PAPER = (
    "Ling et al., CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative Feature "
    "Leveraging, CVPR 2025"
)


def _predicted_class_sums(outputs: ModelOutputs) -> dict[str, torch.Tensor]:
    features = outputs.features.to(_F64)
    predicted = outputs.logits.argmax(dim=1).to(features.device)
    c = outputs.logits.shape[1]
    sums = torch.zeros(c, features.shape[1], dtype=_F64, device=features.device).index_add_(0, predicted, features)
    counts = torch.bincount(predicted, minlength=c).to(_F64)
    return {"class_sum": sums, "class_count": counts}


def _class_means(name: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-class means; a class the model never predicted on the fit data gets the mean of all fit rows (warned)."""
    sums, counts = stats["class_sum"], stats["class_count"]
    means = sums / counts.clamp_min(1.0)[:, None]
    empty = counts == 0
    if bool(empty.any()):
        warnings.warn(
            f"{name}: {int(empty.sum())} of {counts.numel()} classes are never predicted on the fit data; their "
            "centre is the mean of all fit features (fit on more data to give every class its own centre)",
            stacklevel=4,
        )
        means[empty] = sums.sum(dim=0) / counts.sum()
    return means


def _l1_norms(features: torch.Tensor, name: str) -> torch.Tensor:
    norms = features.abs().sum(dim=1).to(_F64)
    if not bool((norms > 0).all()):
        raise ValueError(
            f"{name}: {int((norms <= 0).sum())} row(s) have all-zero features, whose relative error ||z - mu|| / "
            "||z|| is undefined; pass the penultimate features of the model"
        )
    return norms


@register
class CARef(OutputDetector):
    """CARef — class-aware relative feature error: the l1 distance to the predicted class's mean over the l1 norm.

    Formula (``yhat = argmax f``; ``mu_c`` = mean fit feature of the rows predicted as ``c``)::

        score = ||z - mu_yhat||_1 / ||z||_1                  (higher = more OOD)

    No parameters. Fit on in-distribution training outputs (features and logits; labels are not used). A class
    never predicted on the fit data falls back to the mean of all fit features, with a warning (the official code
    leaves it empty, which gives NaN scores).

    Paper: Ling et al., CVPR 2025 (CARef is the paper's first step). Code: LingAndZero/CADRef;
    pytorch-ood ``src/pytorch_ood/detector/caref.py``.
    """

    name = "caref"
    summary = "l1 distance of the features to the mean features of the predicted class, over the features' l1 norm"
    paper = _PAPER
    code = "https://github.com/LingAndZero/CADRef (pytorch-ood: src/pytorch_ood/detector/caref.py)"
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features", "logits"})
    state_reductions = {"class_sum": "sum", "class_count": "sum"}

    def __init__(self) -> None:
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        return _predicted_class_sums(outputs)

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"means": _class_means(self.name, stats)}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * (3 * (outputs.feature_dim or 1) + 16)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        means = self.state(features.device, features.dtype)["means"]
        centres = means.index_select(0, outputs.logits.argmax(dim=1).to(features.device))
        return (features - centres).abs_().sum(dim=1).to(_F64) / _l1_norms(features, self.name)


@register
class CADRef(OutputDetector):
    """CADRef — CARef's error split by the sign of the predicted class's weights and rescaled by the energy.

    Formula (``yhat``, ``mu`` as in ``caref``; ``a = sign(w_yhat) * (z - mu_yhat)``; ``S(x) = LSE(f)``, the
    negative energy; ``S_bar`` = its mean over the fit rows)::

        E_p   = sum(max(a, 0)) / ||z||_1                     (the part that raises the maximum logit)
        E_n   = sum(max(-a, 0)) / ||z||_1                    (the part that lowers it)
        score = E_p / S(x) + E_n / S_bar                     (higher = more OOD)

    No parameters (the paper's choice of logit score, the energy). The rescaling assumes ``S > 0``, which holds
    whenever a logit is positive: fitting refuses data whose mean ``S`` is not positive, and scoring refuses rows
    with ``S <= 0``.

    Fit on in-distribution training outputs: features, logits and the head (the signs of ``W``, stored at fit).
    The statistics are per-class sums and counts and the sum of ``S``, so ``partial_fit`` and ``merge`` are exact
    (every chunk must come from the same head).

    Paper: Ling et al., CVPR 2025. Code: LingAndZero/CADRef; pytorch-ood
    ``src/pytorch_ood/detector/cadref.py``. Deviations: docs/detectors.md, section ``cadref``.
    """

    name = "cadref"
    summary = "CARef's relative error split by the signs of the predicted class's weights, rescaled by the energy"
    paper = _PAPER
    code = "https://github.com/LingAndZero/CADRef (pytorch-ood: src/pytorch_ood/detector/cadref.py)"
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features", "logits", "head"})
    state_reductions = {"class_sum": "sum", "class_count": "sum", "confidence_sum": "sum"}

    def __init__(self) -> None:
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        stats = _predicted_class_sums(outputs)
        device = stats["class_sum"].device
        stats["confidence_sum"] = torch.logsumexp(outputs.logits.to(_F64), dim=1).sum().reshape(1).to(device)
        stats["weight_sign"] = torch.sign(outputs.head[0].to(device=device, dtype=_F64))
        if self.stats_ is not None:
            self._check_same_signs(self.stats_, stats)
        return stats

    def _check_same_signs(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        if a["weight_sign"].shape != b["weight_sign"].shape or not torch.equal(
            a["weight_sign"], b["weight_sign"].to(a["weight_sign"].device)
        ):
            raise ValueError(f"{self.name}: the chunks were fitted with different heads; fit on outputs of one model")

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_same_signs(a, b)
        combined = super()._combine(a, b)
        combined["weight_sign"] = a["weight_sign"]
        return combined

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean_confidence = stats["confidence_sum"] / stats["class_count"].sum()
        if not float(mean_confidence) > 0:
            raise ValueError(
                f"{self.name}: the mean fit confidence LSE(logits) is {float(mean_confidence):.4g}, not positive, so "
                "the error rescaling of CADRef is undefined; use caref, or logits of a trained classifier"
            )
        return {
            "means": _class_means(self.name, stats),
            "weight_sign": stats["weight_sign"],
            "mean_confidence": mean_confidence,
        }

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * (4 * (outputs.feature_dim or 1) + 2 * (outputs.num_classes or 1) + 16)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        predicted = outputs.logits.argmax(dim=1).to(features.device)
        aligned = (features - state["means"].index_select(0, predicted)).mul_(
            state["weight_sign"].index_select(0, predicted)
        )
        positive = aligned.clamp_min(0.0).sum(dim=1).to(_F64)
        negative = aligned.clamp_max_(0.0).sum(dim=1).to(_F64).neg_()
        norms = _l1_norms(features, self.name)
        confidence = torch.logsumexp(outputs.logits, dim=1).to(_F64).to(features.device)
        if not bool((confidence > 0).all()):
            raise ValueError(
                f"{self.name}: {int((confidence <= 0).sum())} row(s) have LSE(logits) <= 0, so CADRef's rescaling "
                "E_p / LSE(f) is undefined; use caref for such logits"
            )
        return positive / norms / confidence + negative / norms / state["mean_confidence"].to(_F64)
