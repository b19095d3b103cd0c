"""Detectors that need only the logits: MSP, MaxLogit, Energy, GEN, KL-matching, temperature scaling.

Every score here is O(C) per sample (KL-matching O(C^2)), vectorised over rows, and oriented
**higher = more likely OOD**. Softmax-probability scores are returned as log-odds computed from the
logit gaps (in the logits' dtype; scores are returned as float64), so that confident samples never saturate to
the same value (ties distort FPR@95).
"""

from __future__ import annotations

import math

import torch

from oodguard.detectors.base import OutputDetector, class_counts, register
from oodguard.detectors.params import Integral, Interval, Real
from oodguard.outputs import ModelOutputs

#: Templates of KL-matching are clamped here before the log.
KLM_TEMPLATE_FLOOR = 1e-12
#: Temperature scaling searches T in [1/TEMPERATURE_BOUND, TEMPERATURE_BOUND].
TEMPERATURE_BOUND = 1e3


# ---------------------------------------------------------------------- shared helpers
def need_two_classes(logits: torch.Tensor, name: str) -> None:
    """A clear error for logits of fewer than two classes (a softmax over one class carries no information)."""
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name}: needs at least 2 classes (logits have C={logits.shape[1]}); a softmax over one class is "
            "constant and carries no information"
        )


def neg_log_odds_msp(logits: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``log((1 - MSP) / MSP) = LSE_{c != argmax}(f_c) - f_max``, strictly decreasing in MSP.

    Unlike ``MSP`` or ``-log MSP`` it never saturates: for any finite logits it is finite and two samples
    tie only when their logit gaps tie (``-log MSP`` is exactly 0 in float64 once the gap passes ~37). It
    is computed in the logits' own dtype: the gaps of float32 logits carry no more precision than float32
    holds. ``temperature`` (> 0) gives the log-odds of the MSP of ``logits / temperature``. ``C >= 2``.

    The maximum is masked out by value rather than by an argmax (an index reduction costs as much as the
    exponentials on CPU); classes tied with it are added back as runners-up with gap 0.
    """
    if not (isinstance(temperature, float) and temperature == 1.0):
        logits = logits / temperature
    top = logits.amax(dim=1, keepdim=True)
    at_top = logits == top
    ties = at_top.view(torch.uint8).sum(dim=1, dtype=torch.int32) - 1  # classes tied with the maximum
    others = logits.masked_fill(at_top, float("-inf"))
    # Classes more than 87 below the runner-up add under 1e-37 to its exp(0) = 1; flooring them keeps the
    # exponentials out of the denormal range, where they run many times slower (e.g. after a small temperature).
    others = torch.clamp(others, min=others.amax(dim=1, keepdim=True) - 87.0)
    rest = torch.logsumexp(others, dim=1) - top.squeeze(1)  # not in place: explain differentiates it
    return torch.where(ties > 0, torch.logaddexp(rest, torch.log(ties.to(rest.dtype))), rest)


# ---------------------------------------------------------------------- stateless scores
class LogitDetector(OutputDetector):
    """Logit-only detector without fitted state."""

    requires = frozenset({"logits"})
    needs_fit = False

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        return {}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        # a few [n, C] temporaries; chunks past ~16 MB each run slower (fresh pages, cache misses)
        return 64 * outputs.logits.shape[1]


@register
class MSP(LogitDetector):
    """Maximum softmax probability, returned as the log-odds of *not* being the top class.

    ``s(x) = max_c softmax(f)_c``; the OOD score is ``log((1 - s)/s) = LSE_{c != ŷ}(f_c) - f_max``, a strictly
    decreasing transform of MSP computed from the logit gaps in the logits' dtype.

    Deviations from the official code: docs/detectors.md, section ``msp``.

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017.
    Code: Jingkang50/OpenOOD ``openood/postprocessors/base_postprocessor.py``. No hyperparameters, no fit.
    """

    name = "msp"
    summary = "maximum softmax probability (as log-odds of the runner-up classes)"
    paper = "Hendrycks & Gimpel, ICLR 2017"
    code = "Jingkang50/OpenOOD openood/postprocessors/base_postprocessor.py"

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        need_two_classes(outputs.logits, self.name)
        return neg_log_odds_msp(outputs.logits)


@register
class MaxLogit(LogitDetector):
    """Maximum logit: ``s(x) = max_c f_c``; the OOD score is ``-max_c f_c``.

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    Code: hendrycks/anomaly-seg ``eval_ood.py``; OpenOOD ``maxlogit_postprocessor.py`` (identical).
    """

    name = "maxlogit"
    summary = "negative maximum logit"
    paper = "Hendrycks et al., ICML 2022"
    code = "hendrycks/anomaly-seg eval_ood.py; Jingkang50/OpenOOD openood/postprocessors/maxlogit_postprocessor.py"

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        return -outputs.logits.amax(dim=1)


@register
class Energy(LogitDetector):
    """Free energy: the OOD score is ``E(x; T) = -T * LSE(f / T)`` (``s(x) = -E``).

    Default ``temperature = 1`` (official ``--T``; OpenOOD ``ebo.yml``). Computed in the logits' dtype: the
    log-sum-exp is stable and does not saturate.

    Paper: Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    Code: wetliu/energy_ood ``CIFAR/test.py``; OpenOOD ``ebo_postprocessor.py``.
    """

    name = "energy"
    summary = "free energy -T*logsumexp(f/T)"
    paper = "Liu et al., NeurIPS 2020"
    code = "wetliu/energy_ood CIFAR/test.py; Jingkang50/OpenOOD openood/postprocessors/ebo_postprocessor.py"
    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature: float = 1.0) -> None:
        self.temperature = temperature
        super().__init__()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        temperature = float(self.temperature)
        if temperature == 1:  # the default: no scaled copy of the logits
            return -torch.logsumexp(outputs.logits, dim=1)  # not in place: explain differentiates it
        return -temperature * torch.logsumexp(outputs.logits / temperature, dim=1)


@register
class GEN(LogitDetector):
    """Generalized entropy over the ``M`` largest probabilities.

    ``s(x) = -sum_{j<=M} p_(j)^γ (1 - p_(j))^γ`` with ``p_(1) >= p_(2) >= ...``; the OOD score is the sum itself.
    Defaults ``gamma = 0.1``, ``M = 100`` (official ``benchmark.py``; OpenOOD ``gen.yml``); all classes are used
    when ``C < M``. The top-M are found by partial selection (``topk``), and each term is evaluated in float64 as
    ``exp(γ (log p + log(1 - p)))`` with ``log(1 - p_(1)) = LSE_{c != ŷ} f_c - LSE(f)`` exactly, so confident
    samples do not collapse to the same value.

    Paper: Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR 2023.
    Code: XixiLiu95/GEN ``benchmark.py`` (``generalized_entropy``); OpenOOD ``gen_postprocessor.py`` (identical).
    """

    name = "gen"
    summary = "generalized entropy sum_j p_j^gamma (1-p_j)^gamma over the top-M probabilities"
    paper = "Liu, Lochman & Zach, CVPR 2023"
    code = "XixiLiu95/GEN benchmark.py; Jingkang50/OpenOOD openood/postprocessors/gen_postprocessor.py"
    _parameter_constraints = {
        "gamma": [Interval(Real, 0, None, closed="neither")],
        "M": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, gamma: float = 0.1, M: int = 100) -> None:  # noqa: N803  (the paper's name)
        self.gamma = gamma
        self.M = M
        super().__init__()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        need_two_classes(outputs.logits, self.name)
        logits = outputs.logits
        gamma = float(self.gamma)
        m = min(int(self.M), logits.shape[1])
        top_m = torch.topk(logits, m, dim=1, sorted=True).values
        # log-odds of the top class from the gaps (no saturation); LSE(f) = f_max + softplus(log-odds)
        log_odds = neg_log_odds_msp(logits).to(torch.float64)
        log_p = (
            top_m.to(torch.float64) - (top_m[:, 0].to(torch.float64) + torch.nn.functional.softplus(log_odds))[:, None]
        )
        # log(1 - p) = log(-expm1(log p)) is accurate for p <= 1/2, i.e. every rank but the first.
        log_q = torch.log(-torch.expm1(log_p.clamp_max(-1e-300)))
        log_q[:, 0] = log_odds - torch.nn.functional.softplus(log_odds)  # log(1 - p_(1)), exact
        return torch.exp(gamma * (log_p + log_q)).sum(dim=1)


# ---------------------------------------------------------------------- KL-matching
@register
class KLMatching(OutputDetector):
    """KL-matching: distance of the posterior to the typical posterior of each predicted class.

    Fit (unlabelled ID data, ideally a held-out validation split): ``d_k = mean{softmax(f_i) : argmax f_i = k}``.
    Score: ``s(x) = -min_k KL(p(x) || d_k)``; the OOD score is ``min_k KL(p || d_k)``, computed as
    ``rowsum(P log P) - P @ log(D)^T`` with ``log P`` from log-softmax and templates clamped at 1e-12.

    Classes never predicted on the fit data have no template. OpenOOD's fallback ``d_k = one_hot(k)`` gives
    ``KL = inf`` for every non-one-hot ``p``, i.e. such a template is never the minimiser; here it is left out of
    the minimum explicitly (the state holds templates only for predicted classes, ``template_classes``).
    Clamping a one-hot template instead would make it a finite, spurious competitor.

    The fit statistics (per-predicted-class sums of softmax vectors and counts, float64) are additive, so
    ``partial_fit`` and ``merge`` are exact.

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    Code: Jingkang50/OpenOOD ``openood/postprocessors/kl_matching_postprocessor.py`` (fits on ID val, groups by
    predicted class, min over k). No hyperparameters. Score cost O(C^2) per sample.
    """

    name = "klm"
    summary = "min over predicted classes of KL(p || mean posterior of that class)"
    paper = "Hendrycks et al., ICML 2022"
    code = "Jingkang50/OpenOOD openood/postprocessors/kl_matching_postprocessor.py"
    requires = frozenset({"logits"})
    fit_requires = frozenset({"logits"})
    state_reductions = {"softmax_sums": "sum", "counts": "sum"}

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        need_two_classes(outputs.logits, self.name)
        logits = outputs.logits.to(torch.float64)
        num_classes = logits.shape[1]
        probs = torch.softmax(logits, dim=1)
        predicted = logits.argmax(dim=1)
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=logits.device)
        sums.index_add_(0, predicted, probs)
        counts = torch.bincount(predicted, minlength=num_classes).to(torch.float64)
        return {"softmax_sums": sums, "counts": counts}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen = stats["counts"] > 0
        templates = stats["softmax_sums"][seen] / stats["counts"][seen, None]
        return {
            "log_templates": torch.log(templates.clamp_min(KLM_TEMPLATE_FLOOR)),
            "template_classes": torch.nonzero(seen).flatten(),
        }

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.logits
        log_templates = self.state(logits.device, logits.dtype)["log_templates"]
        # Probabilities below e^-87 (~1e-38) change the KL by less than 1e-33; flooring them keeps exp and the
        # product out of float32's denormal range, where they run many times slower.
        log_p = torch.log_softmax(logits, dim=1).clamp_(min=-87.0)
        p = log_p.exp()
        kl = (p * log_p).sum(dim=1, keepdim=True) - p @ log_templates.T
        return kl.amin(dim=1)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * 4 * (self.meta_.get("num_classes") or 1024)


# ---------------------------------------------------------------------- temperature scaling
def _nll_derivatives(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in ``beta = 1/T`` of the mean NLL of ``softmax(beta * f)``."""
    probs = torch.softmax(beta * logits, dim=1)
    mean_f = (probs * logits).sum(dim=1)
    second = (probs * logits.square()).sum(dim=1) - mean_f.square()
    first = mean_f - logits.gather(1, labels[:, None]).squeeze(1)
    return float(first.mean()), float(second.clamp_min(0).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the mean NLL of ``softmax(f / T)`` on labelled logits (float64, deterministic).

    The NLL is convex in ``beta = 1/T`` (its second derivative is the mean softmax variance of the logits), so
    its derivative in ``beta`` is increasing: the minimiser is found by Newton's method in ``beta`` safeguarded by
    bisection in ``log T`` on the bracket ``T in [1/TEMPERATURE_BOUND, TEMPERATURE_BOUND]``. When the minimum lies
    outside the bracket (e.g. perfectly separable data, where the NLL keeps falling as ``T -> 0``) the nearest
    bound is returned.
    """
    logits = logits.to(torch.float64)
    lo, hi = 1.0 / TEMPERATURE_BOUND, TEMPERATURE_BOUND  # bracket in beta
    if _nll_derivatives(logits, labels, lo)[0] >= 0:
        return 1.0 / lo
    if _nll_derivatives(logits, labels, hi)[0] <= 0:
        return 1.0 / hi
    beta = 1.0
    for _ in range(max_iter):
        first, second = _nll_derivatives(logits, labels, beta)
        if first == 0:
            break
        if first < 0:
            lo = beta
        else:
            hi = beta
        step = beta - first / second if second > 0 else math.nan
        new = step if lo < step < hi else math.sqrt(lo * hi)
        if abs(new - beta) <= 1e-14 * beta or hi - lo <= 1e-14 * hi:
            beta = new
            break
        beta = new
    return 1.0 / beta


@register
class TemperatureScaling(OutputDetector):
    """MSP after temperature scaling: ``s(x) = max_c softmax(f / T)_c`` with ``T`` fitted on labelled ID logits.

    Fit: ``T > 0`` minimising the NLL ``mean_i [LSE(f_i / T) - f_{i,y_i} / T]`` (float64; Newton in ``1/T`` with a
    bisection safeguard in ``log T``, see :func:`fit_temperature`; searched in ``[1e-3, 1e3]``). Use a held-out
    ID validation split, as OpenOOD does.
    Score: like ``msp`` on ``f / T``, the log-odds ``LSE_{c != ŷ}(f_c / T) - f_max / T`` (from the gaps, strictly
    decreasing in the calibrated MSP, no saturation ties) rather than ``-max log_softmax(f / T)``.

    Paper: Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
    Code: Jingkang50/OpenOOD ``openood/postprocessors/temp_scaling_postprocessor.py`` (LBFGS on ``T`` from 1.5,
    lr 0.01, 50 iterations, float32): this solves the same problem to convergence, so ``T`` can differ slightly.
    """

    name = "tempscale"
    summary = "maximum softmax probability after fitted temperature scaling (as log-odds)"
    paper = "Guo et al., ICML 2017"
    code = "Jingkang50/OpenOOD openood/postprocessors/temp_scaling_postprocessor.py"
    requires = frozenset({"logits"})
    fit_requires = frozenset({"logits", "labels"})

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        need_two_classes(outputs.logits, self.name)
        class_counts(outputs.labels, outputs.logits.shape[1], self.name, minimum=0)
        temperature = fit_temperature(outputs.logits, outputs.labels)
        return {"temperature": torch.tensor([temperature], dtype=torch.float64)}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        # a few [n, C] temporaries; chunks past ~16 MB each run slower (fresh pages, cache misses)
        return 64 * outputs.logits.shape[1]

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        temperature = self.state(outputs.logits.device)["temperature"]
        return neg_log_odds_msp(outputs.logits, temperature=temperature.to(outputs.logits.dtype))

    @property
    def temperature_(self) -> float:
        """The fitted temperature."""
        if self.state_ is None:
            raise AttributeError("tempscale: not fitted yet; call fit(...) first")
        return float(self.state_["temperature"])
