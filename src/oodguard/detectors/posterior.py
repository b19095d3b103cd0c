"""Logit detectors built on the whole softmax posterior: predictive entropy, DOCTOR and weighted energy.

Entropy and DOCTOR's ``D_alpha`` saturate for confident samples when computed from the probabilities (every
probability but one underflows, or rounds ``1 - p_max`` to 0, and confident samples tie). Both are computed here
from the logit gaps to the top class, in the log domain, and returned as the logarithm of the paper's score: a
strictly increasing transform, so the ranking (every metric) is the paper's, without saturation ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional

from oodguard.detectors.base import register
from oodguard.detectors.logits import LogitDetector, need_two_classes, neg_log_odds_msp
from oodguard.detectors.params import ArrayLike, Interval, Options, Real, SequenceOf
from oodguard.outputs import ModelOutputs

#: Classes further than this below the runner-up add under e^-87 (~1e-38) to the sums: flooring them keeps the
#: exponentials out of float32's denormal range, where they run many times slower.
_FLOOR = 87.0


def runner_up_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The posterior relative to its top class, without underflow or cancellation.

    With ``f_1 >= f_2`` the two largest logits, ``m = f_2 - f_1 <= 0`` and ``e_c = exp(min(f_c - f_2, 0))``: the top
    class has ``e = 1`` and every other class ``e_c = exp(f_c - f_2) = (p_c / p_top) e^-m``. So ``R' = sum_c e_c - 1``
    is ``sum_{c != top} (p_c / p_top) e^-m >= 1`` (the runner-up adds 1; classes tied with the top count as
    runner-ups), with no cancellation and no underflow however confident the sample, and classes more than 87 below
    the runner-up are floored there (they add under 1e-37 relative; the floor keeps float32 out of slow denormals).
    Returns ``e [n, C]`` (logits' dtype), the top logits ``[n, 1]`` and ``m [n]`` (float64).
    """
    two = torch.topk(logits, 2, dim=1, sorted=True).values
    top, second = two[:, :1], two[:, 1:]
    e = torch.sub(logits, second).clamp_(min=-_FLOOR, max=0.0).exp_()
    return e, top, (second - top).squeeze(1).to(torch.float64)


def below_top_exponentials(
    logits: torch.Tensor, *, keep_gaps: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``e_c = exp(f_c - f_top)`` of the classes below the top, from one max over the logits (no top-2 search).

    With ``g_c = f_top - f_c`` the gaps to the top, the top class and those tied with it are set aside (gap 0: their
    ``e = 1`` would cancel against the 1 of the top in ``R = sum_{c != top} p_c / p_top``) by moving them to a floor
    gap, where every class further below is floored too (``e^-floor`` is still a normal float: ``exp`` of denormals
    runs many times slower). Then ``R = sum_c e_c + ties``, with no cancellation. The floored classes add under
    ``C e^-floor``, negligible against float rounding unless ``R`` is itself that small (every other class more than
    about 50 below the top in float32, 650 in float64): such rows are flagged ``far``, to be recomputed by
    :func:`runner_up_terms` (almost never on real logits). ``exp`` is taken as ``exp2`` of the gaps in bits, which
    runs about 3 times faster on CPUs.

    Returns ``e [n, C]`` and ``-g / ln 2 [n, C]`` (logits' dtype; one buffer, overwritten by ``e``, unless
    ``keep_gaps``), then, all ``[n]``, the number of ``ties`` with the top and ``sum_c e_c`` (float64) and ``far``.
    """
    classes = logits.shape[1]
    info = torch.finfo(logits.dtype)
    bits = -math.log2(info.tiny) - math.log2(classes) - 1.0  # 2^-bits, even times C, is a normal float
    floor = bits * math.log(2.0)
    gaps = torch.sub(logits.amax(dim=1, keepdim=True), logits).clamp_(max=floor)
    # the set-aside classes are counted from the sums before and after moving them to the floor (float32 sums of
    # up to ~16k classes stay well within floor / 2 of exact; wider rows sum in float64)
    sum_dtype = torch.float64 if classes > 16384 else None
    before = gaps.sum(dim=1, dtype=sum_dtype)
    functional.threshold(gaps, 0.0, floor, inplace=True)
    ties = torch.round((gaps.sum(dim=1, dtype=sum_dtype) - before) / floor).to(torch.float64) - 1.0
    neg_bits = gaps.mul_(-1.0 / math.log(2.0))
    e = torch.exp2(neg_bits) if keep_gaps else neg_bits.exp2_()
    below = e.sum(dim=1).to(torch.float64)
    # rows where the floored classes (under C 2^-bits in R, C floor 2^-bits in the entropy's sum e g) could weigh
    # more than a quarter of a rounding unit of the score
    far = below + ties < 4.0 * classes * floor * 2.0**-bits / info.eps
    return e, neg_bits, ties, below, far


def _exact_far_rows(
    scores: torch.Tensor, far: torch.Tensor, logits: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``scores`` with the rows flagged ``far`` recomputed by ``exact`` (the runner-up formulation)."""
    if bool(far.any()):
        rows = far.nonzero().squeeze(1)
        scores[rows] = exact(logits[rows])
    return scores


@register
class Entropy(LogitDetector):
    """Predictive entropy of the softmax, ``H(p) = -sum_c p_c log p_c``, returned as ``log H``.

    ``H`` is written through the gaps to the top class (``R = sum_{c != top} p_c / p_top``, see
    :func:`runner_up_terms`) as ``H = sum_{c != top} r_c g_c / (1 + R) + log(1 + R)``, which stays exact (relative
    to float rounding) however confident the sample: the naive ``-sum p log p`` rounds every confident sample of
    float32 logits with a top gap beyond ~17 to nearly the same value. The OOD score is ``log H`` (strictly
    increasing in ``H``), finite for every finite input; a uniform posterior gives ``log log C``.

    No parameters, no fit (``fit`` is optional).

    Paper: Shannon entropy of the predictive distribution as an uncertainty score, as in pytorch-ood's ``Entropy``
    (no dedicated OOD paper; e.g. Hendrycks & Gimpel, ICLR 2017 discuss it alongside MSP).
    Code: kkirchheim/pytorch-ood ``src/pytorch_ood/detector/entropy.py``.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> scores = create("entropy").score(np.array([[0.0, 0.0], [10.0, 0.0]]))
    >>> bool(scores[0] > scores[1]), round(float(np.exp(scores[0])), 6)  # uniform over 2 classes: H = log 2
    (True, 0.693147)
    """

    name = "entropy"
    summary = "predictive entropy of the softmax (as log H, from the logit gaps)"
    paper = "Shannon entropy of the softmax posterior (baseline of pytorch-ood; e.g. Hendrycks & Gimpel, ICLR 2017)"
    code = "kkirchheim/pytorch-ood src/pytorch_ood/detector/entropy.py"

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.logits
        need_two_classes(logits, self.name)
        return log_entropy(logits)


def log_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``log H(softmax(f))`` per row, float64, without saturation (see :class:`Entropy`)."""
    e, neg_bits, ties, below, far = below_top_exponentials(logits, keep_gaps=True)
    # A = sum_{c != top} (p_c / p_top) g_c (the ties add g = 0), in place in the exponentials' buffer unless explain
    # differentiates the score (no in-place steps on the graph)
    products = e * neg_bits if e.requires_grad else e.mul_(neg_bits)
    weighted = products.sum(dim=1).to(torch.float64) * -math.log(2.0)
    rest = below + ties  # R
    scores = torch.log(weighted / (1.0 + rest) + torch.log1p(rest))  # H = A / (1 + R) + log1p(R)
    return _exact_far_rows(scores, far, logits, _log_entropy_from_runner_up)


def _log_entropy_from_runner_up(logits: torch.Tensor) -> torch.Tensor:
    e, top, m = runner_up_terms(logits)
    r_scaled = e.sum(dim=1).to(torch.float64) - 1.0  # R' >= 1, R = e^m R'
    # A' = sum e_c g_c (the top adds 0); the product in place in the gaps' buffer (vecdot would add a temporary)
    a_scaled = torch.sub(top, logits).mul_(e).sum(dim=1).to(torch.float64)
    total = torch.exp(m) * r_scaled
    # H = e^m (A' / (1 + R) + R' log1p(R) / R), and log1p(R) / R -> 1 as R -> 0 (R underflows past gaps of ~745);
    # below 1e-300 it is 1 to float64 precision (dividing by the clamped R there would shrink it)
    ratio = torch.where(total > 1e-300, torch.log1p(total) / total.clamp_min(1e-300), torch.ones_like(total))
    return m + torch.log(a_scaled / (1.0 + total) + r_scaled * ratio)


@register
class Doctor(LogitDetector):
    """DOCTOR: ``D_alpha`` (Gini impurity ratio) or ``D_beta`` (error-probability ratio).

    With ``p = softmax(f / T)`` and ``g(x) = sum_c p_c^2``:

    * ``mode="alpha"``: ``D_alpha = (1 - g) / g``, computed from the gaps to the top class as
      ``(2R + R^2 - S) / (1 + S)`` with ``R = sum_{c != top} p_c / p_top`` and ``S = sum_{c != top} (p_c / p_top)^2``
      (exact algebra; no ``1 - g`` cancellation);
    * ``mode="beta"``: ``D_beta = (1 - p_top) / p_top = R``, the odds of an error: the same ranking as MSP (at T).

    The OOD score is ``log D`` (strictly increasing in ``D``, finite for every finite input). Defaults are the
    official "totally black box" setting: ``T = 1``, no input perturbation (the "partially black box" setting
    perturbs the input, which needs the model; see docs/detectors.md, section ``doctor``).

    Paper: Granese, Romanelli, Gorla, Palamidessi & Piantanida, "DOCTOR: A Simple Method for Detecting
    Misclassification Errors", NeurIPS 2021.
    Code: fgranese/DOCTOR ``lib_discriminators/discriminators.py`` (``g_x``, ``pe_x``, ``doctor_ratio``), README
    parameter table.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> p = np.array([0.5, 0.3, 0.2])
    >>> score = create("doctor").score(np.log(p)[None])[0]
    >>> bool(np.isclose(np.exp(score), (1 - (p**2).sum()) / (p**2).sum()))
    True
    """

    name = "doctor"
    summary = "DOCTOR's D_alpha = (1 - sum p^2) / sum p^2 (or D_beta = (1 - p_max) / p_max), as log"
    paper = (
        "Granese, Romanelli, Gorla, Palamidessi & Piantanida, 'DOCTOR: A Simple Method for Detecting "
        "Misclassification Errors', NeurIPS 2021"
    )
    code = "https://github.com/fgranese/DOCTOR (lib_discriminators/discriminators.py: g_x, pe_x, doctor_ratio)"
    _parameter_constraints = {
        "mode": [Options(["alpha", "beta"])],
        "temperature": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, *, mode: str = "alpha", temperature: float = 1.0) -> None:
        self.mode = mode
        self.temperature = temperature
        super().__init__()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        need_two_classes(outputs.logits, self.name)
        temperature = float(self.temperature)
        logits = outputs.logits if temperature == 1.0 else outputs.logits / temperature
        if self.mode == "beta":
            return neg_log_odds_msp(logits).to(torch.float64)
        return log_doctor_alpha(logits)


def log_doctor_alpha(logits: torch.Tensor) -> torch.Tensor:
    """``log((1 - sum p^2) / sum p^2)`` per row, float64, without saturation (see :class:`Doctor`)."""
    e, _, ties, below, far = below_top_exponentials(logits, keep_gaps=False)
    rest = below + ties  # R
    squares = e.square() if e.requires_grad else e.square_()  # in place unless explain differentiates the score
    square_rest = squares.sum(dim=1).to(torch.float64) + ties  # S = sum_{c != top} (p_c / p_top)^2
    cross = (rest.square() - square_rest).clamp_min(0.0)  # sum_{i != j} r_i r_j over the classes below the top
    scores = torch.log(2.0 * rest + cross) - torch.log1p(square_rest)
    return _exact_far_rows(scores, far, logits, _log_doctor_alpha_from_runner_up)


def _log_doctor_alpha_from_runner_up(logits: torch.Tensor) -> torch.Tensor:
    e, _, m = runner_up_terms(logits)
    r_scaled = e.sum(dim=1).to(torch.float64) - 1.0  # R' (R = e^m R')
    s_scaled = e.square_().sum(dim=1).to(torch.float64) - 1.0  # S' (S = e^2m S'), squared in place: no temporary
    exp_m = torch.exp(m)
    cross = (r_scaled.square() - s_scaled).clamp_min(0.0)  # sum_{i != j} e_i e_j over the other classes
    # (2R + R^2 - S) / (1 + S) with R^2 - S = e^2m cross
    return m + torch.log(2.0 * r_scaled + exp_m * cross) - torch.log1p(exp_m.square() * s_scaled)


@register
class WeightedEnergy(LogitDetector):
    """Weighted energy (WEBO): ``E_w(x) = -log sum_c relu(w_c) exp(f_c)``, the OOD score.

    ``weights`` are the per-class weights ``w`` of the weighted energy that VOS learns during training (its
    ``weight_energy`` layer, ``Linear(C, 1)``); they are a parameter here (a length-C array or list), required
    because they come from that training. Negative weights count as 0 (the ``relu``); at least one must be positive.
    Computed as ``-LSE(f + log relu(w))`` (stable, no overflow). With all weights 1 this is ``energy``.

    Paper: Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022.
    Code: kkirchheim/pytorch-ood ``src/pytorch_ood/detector/webo.py`` (``WeightedEBO``); the weights come from
    deeplearning-wisc/vos training.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> webo = create("webo", weights=np.array([1.0, 0.5]))
    >>> bool(np.isclose(webo.score(np.array([[0.0, 0.0]]))[0], -np.log(1.5)))
    True
    """

    name = "webo"
    summary = "weighted energy -log sum_c relu(w_c) exp(f_c) with VOS's learned class weights"
    paper = "Du, Wang, Cai & Li, 'VOS: Learning What You Don't Know by Virtual Outlier Synthesis', ICLR 2022"
    code = "kkirchheim/pytorch-ood src/pytorch_ood/detector/webo.py (WeightedEBO); deeplearning-wisc/vos"
    required_params = ("weights",)
    _parameter_constraints = {"weights": [ArrayLike(ndim=1), SequenceOf(Real)]}

    def __init__(self, *, weights: np.ndarray | torch.Tensor | list[float] | None = None) -> None:
        self.weights = weights
        super().__init__()

    def _check_param_combination(self) -> None:
        values = torch.as_tensor(np.asarray(self.weights, dtype=np.float64))
        if values.numel() == 0 or not bool(torch.isfinite(values).all()) or not bool((values > 0).any()):
            raise self._param_error("weights", "a non-empty, finite length-C array with at least one positive weight")

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 32 * outputs.logits.shape[1]

    def _log_weights(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_log_weight_cache", {})
        if key not in cache:
            values = torch.as_tensor(np.asarray(self.weights, dtype=np.float64)).clamp_min(0.0)
            cache.clear()  # set_params may have changed the weights; one entry is all a run needs
            cache[key] = torch.log(values).to(device=device, dtype=dtype)
        return cache[key]

    def set_params(self, **params: object) -> WeightedEnergy:
        self.__dict__.pop("_log_weight_cache", None)
        super().set_params(**params)
        return self

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        logits = outputs.logits
        log_weights = self._log_weights(logits.device, logits.dtype)
        if log_weights.shape[0] != logits.shape[1]:
            raise ValueError(
                f"{self.name}: weights have {log_weights.shape[0]} entries but the logits have C={logits.shape[1]} "
                "columns; pass one weight per class"
            )
        return torch.logsumexp(logits + log_weights, dim=1).neg_()
