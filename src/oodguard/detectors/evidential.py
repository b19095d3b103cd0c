"""Evidential (Dirichlet) uncertainty from a head trained on the frozen features: ``evidential``.

A linear head on the standardised penultimate features is trained with an evidential loss, seeded and with one
thread; its weights, with the standardisation folded in, are the fitted state, so a score is one product with the
features. Two heads, chosen by the measure they serve:

* **Dirichlet head** (Sensoy, Kaplan & Kandemir, NeurIPS 2018): evidence ``e = g(f)`` with ``g`` a non-negative
  activation of the head's outputs ``f``, ``alpha = e + 1``. Measures: *vacuity* and *dissonance*
  (:func:`dirichlet_measures`).
* **Plausibility head** (Fan, Liu, Li, Wu & Hua, ICCV 2023): one sigmoid plausibility ``pl_i = sigmoid(f_i)`` per
  class, combined Dempster-style into singleton beliefs, *ignorance* (mass on the empty set) and *confusion* (mass
  on sets of two or more classes) (:func:`plausibility_measures`); its Dirichlet is ``alpha_i = K b_i / U + 1``.

Confusion and ignorance are functions of the ``K`` plausibilities, not of ``alpha``: ``alpha`` fixes the singleton
beliefs and their total ``U = I + C``, but not how ``U`` splits into ignorance and confusion. Hence two functions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodguard.detectors.base import OutputDetector, class_counts, infer_num_classes, register
from oodguard.detectors.params import Integral, Interval, Options, Real
from oodguard.detectors.trained import feature_scaling, seeded
from oodguard.outputs import ModelOutputs, as_outputs

__all__ = ["Evidential", "MEASURES", "dirichlet_measures", "plausibility_measures"]

_F64 = torch.float64
#: The OOD scores ``evidential`` offers, each oriented higher = more uncertain.
MEASURES = ("vacuity", "dissonance", "confusion", "ignorance")
#: Measures that need the plausibility head (Fan et al.); the others are read off the Dirichlet head.
PLAUSIBILITY_MEASURES = ("confusion", "ignorance")
#: Evidence activations of the reference code (its ``exp_evidence`` clamps the input to [-10, 10] too).
EVIDENCE = ("exp", "softplus", "relu")
EXP_EVIDENCE_CLAMP = 10.0
#: The final KL weight of each paper: Sensoy et al.'s annealing coefficient reaches 1, Fan et al.'s lambda_KL 0.05.
PAPER_KL_WEIGHT = {"dirichlet": 1.0, "plausibility": 0.05}
#: Rows per chunk of the ``[rows, K, K]`` dissonance terms: about 64 MB of float64 per temporary.
_PAIR_BUDGET = 8 * 2**20


# ---------------------------------------------------------------------------------------------- the measures
def _check_matrix(name: str, values: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"{name}: expected a [N, K] array, got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        values = values.to(_F64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: contains NaN or infinite values; pass finite numbers")
    return values.to(_F64)


def dirichlet_measures(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Subjective-logic measures of Dirichlet opinions ``Dir(alpha)``, one row per sample.

    With ``e = alpha - 1``, ``S = sum_k alpha_k``: belief ``b_k = e_k / S``, vacuity ``u = K / S`` (so
    ``sum_k b_k + u = 1``), expected probability ``alpha_k / S``, and dissonance

    ``sum_k b_k [sum_{j != k} b_j Bal(b_j, b_k)] / [sum_{j != k} b_j]``,
    ``Bal(b_j, b_k) = 1 - |b_j - b_k| / (b_j + b_k)`` (0 when both are 0; a term with an empty denominator is 0).

    Vacuity is high without evidence (OOD), dissonance when the evidence is large but split between classes.

    Parameters
    ----------
    alpha : array ``[N, K]``, every entry ``>= 1`` (``alpha = evidence + 1``).

    Returns
    -------
    dict of float64 tensors: ``belief`` and ``expected_probability`` ``[N, K]``, ``vacuity`` and ``dissonance``
    ``[N]``. The dissonance's pairwise balance is computed over all ``K x K`` class pairs at once, in chunks of rows.

    Examples
    --------
    >>> m = dirichlet_measures(torch.tensor([[1.0, 1.0, 1.0], [101.0, 101.0, 1.0]]))
    >>> [round(v, 4) for v in m["vacuity"].tolist()]  # K / S = 3 / 3 and 3 / 203
    [1.0, 0.0148]
    >>> [round(v, 4) for v in m["dissonance"].tolist()]  # 0 and 200 / 203
    [0.0, 0.9852]
    """
    alpha = _check_matrix("alpha", alpha)
    if bool((alpha < 1).any()):
        raise ValueError(
            f"alpha: every entry must be >= 1 (alpha = evidence + 1 with non-negative evidence); the smallest is "
            f"{float(alpha.min()):.4g}"
        )
    strength = alpha.sum(dim=1, keepdim=True)
    belief = (alpha - 1) / strength
    return {
        "belief": belief,
        "expected_probability": alpha / strength,
        "vacuity": alpha.shape[1] / strength.squeeze(1),
        "dissonance": _dissonance(belief),
    }


def _dissonance(belief: torch.Tensor) -> torch.Tensor:
    classes = belief.shape[1]
    others = ~torch.eye(classes, dtype=torch.bool, device=belief.device)  # j != k
    step = max(1, _PAIR_BUDGET // max(1, classes * classes))
    pieces = []
    for start in range(0, belief.shape[0], step):  # chunks of rows; each chunk is one vectorised K x K pass
        b = belief[start : start + step]
        b_k, b_j = b[:, :, None], b[:, None, :]  # [n, k, j]
        total = b_k + b_j
        balance = torch.where(total > 0, 1 - (b_j - b_k).abs() / torch.where(total > 0, total, 1), 0)
        supported = (b_j * balance * others).sum(dim=2)
        mass = b.sum(dim=1, keepdim=True) - b  # sum_{j != k} b_j
        ratio = torch.where(mass > 0, supported / torch.where(mass > 0, mass, 1), 0)
        pieces.append((b * ratio).sum(dim=1))
    return torch.cat(pieces) if pieces else belief.new_zeros(0)


def _combined_opinion(log_plausible: torch.Tensor, log_implausible: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fan et al.'s combination from ``log pl`` and ``log(1 - pl)`` (differentiable; any float dtype).

    ``b_i = pl_i prod_{j != i} (1 - pl_j)`` takes the product over the other classes from prefix and suffix sums of
    the logs (no division by ``1 - pl_i``, which may be 0); ``U = 1 - sum b`` is floored at 64 ulps before it divides
    (below that it is rounding noise).
    """
    classes = log_implausible.shape[1]
    log_ignorance = log_implausible.sum(dim=1)
    before = torch.cumsum(log_implausible, dim=1)
    after = torch.flip(torch.cumsum(torch.flip(log_implausible, [1]), dim=1), [1])
    zero = log_implausible.new_zeros(log_implausible.shape[0], 1)
    log_others = torch.cat([zero, before[:, :-1]], dim=1) + torch.cat([after[:, 1:], zero], dim=1)
    belief = torch.exp(log_plausible + log_others)
    ignorance = torch.exp(log_ignorance)
    confusion = (1 - ignorance - belief.sum(dim=1)).clamp_min(0)
    uncertainty = ignorance + confusion
    floor = 64 * torch.finfo(belief.dtype).eps
    alpha = classes * belief / uncertainty.clamp_min(floor)[:, None] + 1
    return {"belief": belief, "ignorance": ignorance, "confusion": confusion, "uncertainty": uncertainty,
            "alpha": alpha}  # fmt: skip


def plausibility_measures(plausibility: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fan et al.'s confusion and ignorance from ``K`` class plausibilities per sample.

    Each class gives a binary opinion ``(pl_i, 1 - pl_i)``; their Dempster-style product puts mass
    ``b_i = pl_i prod_{j != i}(1 - pl_j)`` on each singleton, ``I = prod_j (1 - pl_j)`` on the empty set
    (*ignorance*: no class claims the input) and ``C = 1 - I - sum_i b_i`` on the sets of two or more classes
    (*confusion*); ``U = 1 - sum_i b_i = I + C``. The class-related confusion is ``C_i = pl_i - b_i``, and the
    Dirichlet the paper trains is ``alpha_i = K b_i / U + 1``.

    Parameters
    ----------
    plausibility : array ``[N, K]`` with entries in ``[0, 1]``.

    Returns
    -------
    dict of float64 tensors: ``belief``, ``class_confusion`` and ``alpha`` ``[N, K]``; ``ignorance``,
    ``confusion`` and ``uncertainty`` ``[N]``.

    Examples
    --------
    >>> m = plausibility_measures(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]))
    >>> m["ignorance"].tolist(), m["confusion"].tolist()
    ([1.0, 0.0, 0.25], [0.0, 1.0, 0.25])
    """
    plausibility = _check_matrix("plausibility", plausibility)
    if bool(((plausibility < 0) | (plausibility > 1)).any()):
        raise ValueError(
            f"plausibility: entries must lie in [0, 1]; got range {float(plausibility.min()):.4g} to "
            f"{float(plausibility.max()):.4g} (pass sigmoid(logits), or use the evidential detector on the logits)"
        )
    result = _combined_opinion(torch.log(plausibility), torch.log1p(-plausibility))
    result["class_confusion"] = plausibility - result["belief"]
    return result


def _kl_to_flat_dirichlet(alpha: torch.Tensor) -> torch.Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))`` per row (Sensoy et al., eq. 4's regulariser)."""
    strength = alpha.sum(dim=1)
    return (
        torch.lgamma(strength)
        - math.lgamma(alpha.shape[1])
        - torch.lgamma(alpha).sum(dim=1)
        + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength)[:, None])).sum(dim=1)
    )


# ---------------------------------------------------------------------------------------------- training
# ---------------------------------------------------------------------------------------------- the detector
@register
class Evidential(OutputDetector):
    """Evidential uncertainty of a Dirichlet or plausibility head trained on the features: vacuity, dissonance,
    confusion or ignorance.

    Fit: features standardised per column; a linear head ``f = W z + c`` (``K`` outputs) trained with Adam on the
    fit rows and their labels, with the evidential loss (the log-likelihood form, Sensoy et al. eq. 3)

    ``L = sum_i y_i (log S - log alpha_i) + lambda_t KL(Dir(alpha~) || Dir(1))``, ``alpha~ = y + (1 - y) alpha``,

    ``lambda_t = kl_weight * min(1, t / kl_anneal_epochs)`` growing with the epoch ``t`` (counted in steps).
    ``measure`` picks the head:

    * ``"vacuity"``, ``"dissonance"``: Dirichlet head, ``alpha = evidence(f) + 1``; score ``u = K / S`` or the
      dissonance of :func:`dirichlet_measures`.
    * ``"ignorance"``, ``"confusion"``: plausibility head, ``pl = sigmoid(f)``, ``alpha_i = K b_i / U + 1``, the
      loss plus ``reg_weight * sum_i y_i (pl_i - (1 - I))^2``; score ``I`` or ``C`` of
      :func:`plausibility_measures`.

    Every score is the measure itself, in ``[0, 1]``, higher = more uncertain (more likely OOD for vacuity and
    ignorance; dissonance and confusion flag inputs *between* known classes and are low far from all of them).

    Parameters
    ----------
    measure : {"vacuity", "dissonance", "confusion", "ignorance"}, default "vacuity"
    evidence : {"exp", "softplus", "relu"}, default "exp"
        The Dirichlet head's activation; ``exp`` clamps ``f`` to [-10, 10] first (as the reference code). Ignored by the
        plausibility head.
    epochs : int, default 30
    lr : float, default 1e-2
        Adam's step (the authors' notebook keeps Adam's default 1e-3, for a whole network and many more steps).
    batch_size : int, default 128
    kl_weight : float >= 0, optional
        Final weight of the KL term; None (default) takes the paper's: 1.0 for the Dirichlet head (Sensoy et al.),
        0.05 for the plausibility head (Fan et al.).
    kl_anneal_epochs : int >= 0, default 10
        Epochs over which the KL weight grows from 0 (Sensoy et al.'s ``min(1, t / 10)``); 0: full weight at once.
    reg_weight : float >= 0, default 1.0
        Fan et al.'s ``lambda_reg`` (plausibility head only).
    l2_weight : float >= 0, default 0.005
        Weight decay ``l2_weight * ||W||^2 / 2`` on the head's weights (the notebook's ``lmb * tf.nn.l2_loss(W)``).
    seed : int, default 0

    ``measures(outputs)`` returns every measure the fitted head gives. A detector fitted for one head refuses a
    ``measure`` of the other (fit again). Deviations from the papers: docs/detectors.md, section ``evidential``.

    Papers: Sensoy, Kaplan & Kandemir, "Evidential Deep Learning to Quantify Classification Uncertainty",
    NeurIPS 2018 (vacuity, dissonance: Josang, "Subjective Logic", 2016); Fan, Liu, Li, Wu & Hua, "Flexible Visual
    Recognition by Evidential Modeling of Confusion and Ignorance", ICCV 2023 (no official code).
    Code: the authors' TensorFlow notebook (``LeNet_EDL``); PyTorch port dougbrion/pytorch-classification-uncertainty
    (``losses.py``).
    """

    name = "evidential"
    summary = "vacuity, dissonance, confusion or ignorance of an evidential head trained on the features"
    paper = (
        "Sensoy, Kaplan & Kandemir, 'Evidential Deep Learning to Quantify Classification Uncertainty', NeurIPS 2018; "
        "Fan, Liu, Li, Wu & Hua, 'Flexible Visual Recognition by Evidential Modeling of Confusion and Ignorance', "
        "ICCV 2023"
    )
    code = (
        "https://github.com/dougbrion/pytorch-classification-uncertainty (losses.py, a port of the authors' notebook); "
        "Fan et al.: no official code"
    )
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})
    _parameter_constraints = {
        "measure": [Options(MEASURES)],
        "evidence": [Options(EVIDENCE)],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "kl_weight": [None, Interval(Real, 0, None)],
        "kl_anneal_epochs": [Interval(Integral, 0, None)],
        "reg_weight": [Interval(Real, 0, None)],
        "l2_weight": [Interval(Real, 0, None)],
        "seed": [Interval(Integral, 0, None)],
    }

    def __init__(
        self,
        *,
        measure: str = "vacuity",
        evidence: str = "exp",
        epochs: int = 30,
        lr: float = 1e-2,
        batch_size: int = 128,
        kl_weight: float | None = None,
        kl_anneal_epochs: int = 10,
        reg_weight: float = 1.0,
        l2_weight: float = 0.005,
        seed: int = 0,
    ) -> None:
        self.measure = measure
        self.evidence = evidence
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.kl_weight = kl_weight
        self.kl_anneal_epochs = kl_anneal_epochs
        self.reg_weight = reg_weight
        self.l2_weight = l2_weight
        self.seed = seed
        super().__init__()

    @property
    def plausibility_head(self) -> bool:
        """Whether ``measure`` needs Fan et al.'s plausibility head (else Sensoy et al.'s Dirichlet head)."""
        return self.measure in PLAUSIBILITY_MEASURES

    def _head_outputs(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """``alpha`` (and the plausibility head's opinion) from the head's outputs ``f``; differentiable."""
        if self.plausibility_head:
            opinion = _combined_opinion(F.logsigmoid(f), F.logsigmoid(-f))
            opinion["plausibility"] = torch.sigmoid(f)
            return opinion
        if self.evidence == "exp":
            evidence = torch.exp(f.clamp(-EXP_EVIDENCE_CLAMP, EXP_EVIDENCE_CLAMP))
        elif self.evidence == "softplus":
            evidence = F.softplus(f)
        else:
            evidence = F.relu(f)
        return {"alpha": evidence + 1}

    def _loss(self, f: torch.Tensor, onehot: torch.Tensor, kl_weight: float) -> torch.Tensor:
        head = self._head_outputs(f)
        alpha = head["alpha"]
        likelihood = (onehot * (torch.log(alpha.sum(dim=1, keepdim=True)) - torch.log(alpha))).sum(dim=1)
        loss = likelihood.mean()
        if kl_weight > 0:
            loss = loss + kl_weight * _kl_to_flat_dirichlet(onehot + (1 - onehot) * alpha).mean()
        if self.plausibility_head and float(self.reg_weight) > 0:
            target = 1 - head["ignorance"][:, None]
            loss = loss + float(self.reg_weight) * (onehot * (head["plausibility"] - target).square()).sum(1).mean()
        return loss

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features, labels = outputs.features.cpu(), outputs.labels.cpu()
        classes = infer_num_classes(outputs)
        counts = class_counts(labels, classes, self.name, minimum=0)  # validates the label range
        if features.shape[0] < 2 or int((counts > 0).sum()) < 2:
            raise ValueError(
                f"{self.name}: fit got N={features.shape[0]} row(s) with labels of {int((counts > 0).sum())} "
                "class(es); the evidential head needs labelled rows of at least 2 classes: fit on more rows"
            )
        scaling = feature_scaling(features)
        mean, std = scaling["feature_mean"], scaling["feature_std"]
        x = ((features.to(_F64) - mean) / std).to(torch.float32)
        onehot = F.one_hot(labels, classes).to(torch.float32)
        rows, batch = x.shape[0], int(self.batch_size)
        # annealed by step as in the authors' notebook: min(1, step / (anneal_epochs * batches per epoch))
        anneal_steps = int(self.kl_anneal_epochs) * math.ceil(rows / batch)
        default_weight = PAPER_KL_WEIGHT["plausibility" if self.plausibility_head else "dirichlet"]
        final_weight = float(self.kl_weight) if self.kl_weight is not None else default_weight
        with seeded(int(self.seed)):
            head = nn.Linear(x.shape[1], classes)
            if self.plausibility_head:
                # Start at pl_i = 1/K (total ignorance, little confusion): from pl = 1/2 every input is confused and
                # training stalls there (the reproduction of Fan et al. reports it; it warms up with cross-entropy).
                with torch.no_grad():
                    head.bias.fill_(-math.log(classes - 1) if classes > 2 else 0.0)
            optimiser = torch.optim.Adam(head.parameters(), lr=float(self.lr))
            step = 0
            for _ in range(int(self.epochs)):
                order = torch.randperm(rows)
                for start in range(0, rows, batch):
                    index = order[start : start + batch]
                    kl_weight = final_weight * (min(1.0, step / anneal_steps) if anneal_steps else 1.0)
                    penalty = 0.5 * float(self.l2_weight) * head.weight.square().sum()  # the notebook's lmb * l2(W)
                    optimiser.zero_grad(set_to_none=True)
                    (self._loss(head(x[index]), onehot[index], kl_weight) + penalty).backward()
                    optimiser.step()
                    step += 1
        # fold the standardisation into the head: W (x - mean) / std + b = (W / std) x + (b - W mean / std)
        weight = head.weight.detach().to(_F64) / std
        return {
            "head_weight": weight,
            "head_bias": head.bias.detach().to(_F64) - weight @ mean,
            "plausibility_head": torch.tensor(self.plausibility_head),
        }

    def _fitted_head(self, outputs: ModelOutputs | Any) -> dict[str, torch.Tensor]:
        """The head's ``alpha`` (and the plausibility head's opinion) for each row, float64 on the features' device."""
        features = as_outputs(outputs).features
        state = self.state(features.device, _F64)
        fitted_plausibility = bool(state["plausibility_head"])
        if fitted_plausibility != self.plausibility_head:
            fitted = "plausibility head (confusion, ignorance)" if fitted_plausibility else "Dirichlet head"
            raise ValueError(
                f"{self.name}: measure={self.measure!r} needs the "
                f"{'plausibility' if self.plausibility_head else 'Dirichlet'} head but the detector was fitted with "
                f"the {fitted}; fit again after changing measure"
            )
        return self._head_outputs(features.to(_F64) @ state["head_weight"].T + state["head_bias"])

    def measures(self, outputs: ModelOutputs | Any) -> dict[str, torch.Tensor]:
        """Every measure of the fitted head per row (float64): ``vacuity``, ``dissonance``, ``belief``,
        ``alpha``, ``expected_probability``; the plausibility head adds ``ignorance``, ``confusion``,
        ``uncertainty`` (equal to its vacuity) and ``plausibility``."""
        head = self._fitted_head(outputs)
        return {**dirichlet_measures(head["alpha"]), **head}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        head = self._fitted_head(outputs)
        if self.measure in head:  # ignorance, confusion
            score = head[self.measure]
        elif self.measure == "vacuity":  # K / S, without the K x K dissonance terms
            score = head["alpha"].shape[1] / head["alpha"].sum(dim=1)
        else:
            score = dirichlet_measures(head["alpha"])["dissonance"]
        return score

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        # a few [n, K] and [n, D] float64 temporaries; the dissonance's [n, K, K] terms are chunked on their own
        classes = self.state_["head_bias"].shape[0] if self.state_ else 1000
        return 8 * 8 * (classes + (outputs.feature_dim or 1))
