"""Feature-space distance detectors: Mahalanobis, relative Mahalanobis, KNN, SHE and WDiscOOD.

Every fit here is a sufficient statistic (class counts, class sums and the scatter around the class means in
float64; or, for KNN, the bank of normalised features), so ``partial_fit`` and ``merge`` are exact.
A partial fit may see some classes (or, for KNN, rows) only later: until every class has enough
samples the detector keeps accumulating and ``score`` says what is missing; ``fit`` refuses at once.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from oodguard.detectors.base import (
    CHUNK_TEMPORARY_BYTES,
    Detector,
    FitData,
    OutputDetector,
    class_counts,
    infer_num_classes,
    register,
)
from oodguard.detectors.faiss_index import INDEX_CONSTRAINTS, FaissSearch
from oodguard.detectors.params import Boolean, Integral, Interval, Options, Real
from oodguard.outputs import ModelOutputs

#: Features are divided by ``max(||z||, _NORM_EPS)`` wherever a method L2-normalises them.
_NORM_EPS = 1e-10
#: Relative eigenvalue cutoff of the pseudo-inverses, as in ``base.symmetric_pinv``.
_PINV_RTOL = 1e-10
#: Rows normalised per step of KNN's fit: its float64 temporaries are 4x the float32 bank when made at once.
_NORMALIZE_ROWS = 8192


# ---------------------------------------------------------------------- numerics shared by the detectors
def pinv_sqrt(matrix: torch.Tensor, rtol: float = _PINV_RTOL) -> torch.Tensor:
    return pinv_sqrt_and_rank(matrix, rtol)[0]


def pinv_sqrt_and_rank(matrix: torch.Tensor, rtol: float = _PINV_RTOL) -> tuple[torch.Tensor, int]:
    """Symmetric square root ``W = pinv(matrix)^{1/2}`` of a symmetric PSD matrix (float64).

    ``W @ W == symmetric_pinv(matrix)``: eigenvalues at or below ``rtol * max|eigenvalue|`` are treated
    as zero, exactly like :func:`base.symmetric_pinv`, so a rank-deficient covariance (N <= D, dead
    units) gives finite values, and the directions without variance are ignored. A quadratic form
    ``x^T pinv(S) x`` is then ``||x @ W||^2``: one ``[n, D] x [D, D]`` product at score time. Unlike
    ``V diag(lambda^-1/2)`` (any basis of a repeated eigenvalue would do), ``W`` is unique, so refits,
    partial fits and merges give the same float32 scores bit for bit.
    """
    matrix = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    if values.numel() == 0:
        return matrix, 0
    keep = values > rtol * max(float(values.abs().max()), torch.finfo(torch.float64).eps)
    values, vectors = values[keep], vectors[:, keep]
    return (vectors * values.rsqrt()) @ vectors.T, int(keep.sum())


def ledoit_wolf_intensity(covariance: torch.Tensor, fourth_moment: float, n: int) -> float:
    """The Ledoit-Wolf shrinkage intensity of a covariance ``S = (1/n) sum_i x_i x_i^T`` of centred rows ``x_i``.

    ``fourth_moment`` is ``sum_i ||x_i||^4``. With ``mu = tr(S)/D``, ``delta = ||S - mu I||_F^2 / D`` and
    ``beta = (fourth_moment / n - ||S||_F^2) / (D n)``, the intensity is ``min(beta, delta) / delta`` (0 when
    ``delta`` is 0): Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
    J. Multivariate Analysis 88(2), 2004, in the form of scikit-learn's ``ledoit_wolf_shrinkage``.
    """
    covariance = covariance.to(torch.float64)
    dim = covariance.shape[0]
    mu = float(torch.trace(covariance)) / dim
    squared = float(covariance.square().sum())
    delta = (squared - 2.0 * mu * float(torch.trace(covariance)) + dim * mu * mu) / dim
    beta = min((fourth_moment / n - squared) / (dim * n), delta)
    return 0.0 if beta == 0 or delta <= 0 else beta / delta


def shrink(covariance: torch.Tensor, intensity: float) -> torch.Tensor:
    """``(1 - s) S + s mu I`` with ``mu = tr(S) / D``: shrinkage toward a scaled identity."""
    dim = covariance.shape[0]
    mu = torch.trace(covariance) / dim
    return (1.0 - intensity) * covariance + intensity * mu * torch.eye(dim, dtype=covariance.dtype)


def normalize_rows(z: torch.Tensor) -> torch.Tensor:
    """``z / max(||z||_2, eps)`` row by row (a zero row stays zero)."""
    return F.normalize(z, dim=1, eps=_NORM_EPS)


def short_classes_message(name: str, counts: torch.Tensor, minimum: int, what: str) -> str | None:
    """Error text when some class has fewer than ``minimum`` samples, else None."""
    short = torch.nonzero(counts < minimum).flatten().tolist()
    if not short:
        return None
    shown = ", ".join(f"class {c}: {int(counts[c])}" for c in short[:5])
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    return (
        f"{name}: every class needs at least {minimum} {what} ({shown}{more}); add samples of those classes "
        "(with partial_fit: keep adding chunks) or remove the classes"
    )


def _nearest_center_sq(y: torch.Tensor, centers: torch.Tensor, center_sq: torch.Tensor) -> torch.Tensor:
    """``min_c ||y - centers_c||^2`` for every row of ``y``, via ``|y|^2 - 2 y.m_c + |m_c|^2``, clamped at 0."""
    cross = torch.addmm(center_sq, y, centers.T, alpha=-2.0)  # [n, C] = |m_c|^2 - 2 y.m_c
    return (cross.amin(dim=1) + torch.linalg.vector_norm(y, dim=1).square()).clamp_min_(0.0)


# ---------------------------------------------------------------------- class-conditional statistics
class ClassStatistics(OutputDetector):
    """Additive fit statistics per class: counts, sums and (optionally) the scatter around the class means.

    Subclasses implement ``_finalize_complete``; ``_finalize`` first checks that every class has
    ``_min_per_class`` samples and otherwise keeps a *pending* state (only the counts), which ``score``
    refuses with a message naming the short classes. ``fit`` refuses such data at once.

    When C is only known from the labels (no logits or head), chunks of a partial fit may reach
    different maximum labels; their class-indexed statistics are zero-padded to the larger C.
    """

    state_reductions: ClassVar[dict[str, str] | None] = {"counts": "sum", "sums": "sum", "scatter": "chan"}
    _class_keys: ClassVar[tuple[str, ...]] = ("counts", "sums")
    _min_per_class: ClassVar[int] = 2
    _count_what: ClassVar[str] = "fit samples"
    #: Set by the detectors with a ``shrinkage`` parameter (None, "ledoit_wolf" or an intensity in [0, 1]).
    shrinkage: float | str | None = None

    # -- the covariances: degenerate fits refused or reported, optional shrinkage
    def _precision_root(self, covariance: torch.Tensor, stats: dict[str, torch.Tensor], fourth: str) -> torch.Tensor:
        """``pinv(S')^{1/2}`` of the covariance after shrinkage; refuses a zero covariance, warns when singular."""
        what = "within classes" if fourth == "fourth" else "around their mean"
        dim = covariance.shape[0]
        n = int(stats["counts"].sum())
        # Zero up to rounding: constant values c leave at most about (N eps c)^2 in the centred scatter (the error of
        # their mean), so compare the variance with that scale rather than with 0.
        class_means = stats["sums"] / stats["counts"].to(torch.float64).clamp_min(1)[:, None]
        outer_trace = float(torch.trace(stats["scatter"])) + float((stats["sums"] * class_means).sum())
        mean_square = outer_trace / max(n, 1) / dim
        if float(torch.trace(covariance)) / dim <= (64 * max(n, 1) * torch.finfo(torch.float64).eps) ** 2 * mean_square:
            raise ValueError(
                f"{self.name}: the fit features do not vary {what} (their covariance is zero), so every input would "
                "score the same; fit on features that vary (are they all constant, e.g. a layer of dead units?)"
            )
        if self.shrinkage is not None:
            if self.shrinkage == "ledoit_wolf":
                intensity = ledoit_wolf_intensity(covariance, float(stats[fourth]), n)
            else:
                intensity = float(self.shrinkage)
            if intensity > 0:
                return pinv_sqrt(shrink(covariance, intensity))
        root, rank = pinv_sqrt_and_rank(covariance)
        constant = int((covariance.diagonal() <= _PINV_RTOL * float(covariance.diagonal().max())).sum())
        # Constant columns alone (dead units) carry no information: ignoring them is exactly right, and silent.
        if rank < dim - constant:
            columns = f"; {constant} feature column(s) are constant {what}" if constant else ""
            warnings.warn(
                f"{self.name}: the covariance of the fit features {what} is singular (rank {rank} of D={dim}, from "
                f"N={n} samples{columns}); a pseudo-inverse ignores the {dim - rank} direction(s) without variance. "
                "With few samples, pass shrinkage='ledoit_wolf' for a well-conditioned estimate",
                UserWarning,
                stacklevel=5,
            )
        return root

    def _shrinkage_statistics(self, z: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> dict[str, Any]:
        """sum_i ||z_i - mu_{y_i}||^4 and sum_i ||z_i - mu||^4 for Ledoit-Wolf (from this fit call's means)."""
        if self.shrinkage != "ledoit_wolf":
            return {}
        within = (z - means[labels]).square().sum(1)
        around = (z - z.mean(0)).square().sum(1)
        return {"fourth": within.square().sum(), "fourth_global": around.square().sum()}

    # -- statistics
    def _fit_features(self, outputs: ModelOutputs) -> torch.Tensor:
        return outputs.features.to(torch.float64)

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = self._fit_features(outputs)
        labels = outputs.labels.to(z.device)
        num_classes = infer_num_classes(outputs)
        counts = class_counts(labels, num_classes, self.name, minimum=0)  # validates the label range
        sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
        means = sums / counts.clamp_min(1).to(z.dtype)[:, None]
        # centred on this chunk's class means (no cancellation), a few thousand rows at a time: the temporaries
        # stay a few MB however many rows come in one call
        scatter = z.new_zeros(z.shape[1], z.shape[1])
        step = max(256, 2 * CHUNK_TEMPORARY_BYTES // (8 * z.shape[1]))
        for start in range(0, z.shape[0], step):
            centred = z[start : start + step] - means[labels[start : start + step]]
            scatter.addmm_(centred.T, centred)
        return {"counts": counts, "sums": sums, "scatter": scatter, **self._shrinkage_statistics(z, labels, means)}

    def _combinable(self) -> bool:
        return self.shrinkage != "ledoit_wolf"

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.shrinkage == "ledoit_wolf":
            raise ValueError(
                f"{self.name}: shrinkage='ledoit_wolf' estimates its intensity from all fit rows at once, which "
                "partial_fit and merge cannot combine exactly; call fit on all the data, or pass a fixed "
                "shrinkage=<intensity in [0, 1]>, which partial fits combine exactly"
            )
        width = max(a["counts"].shape[0], b["counts"].shape[0])

        def pad(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = dict(stats)
            for key in self._class_keys:
                missing = width - out[key].shape[0]
                if missing:
                    out[key] = torch.cat([out[key], out[key].new_zeros(missing, *out[key].shape[1:])])
            return out

        a, b = pad(a), pad(b)
        # Chan, Golub & LeVeque's pairwise update, per class: S = S_a + S_b + n_a n_b / (n_a + n_b) d d^T with
        # d = mu_b - mu_a; sums (and so means) add. Exact in any order, and stable for features far from 0.
        n_a, n_b = a["counts"].to(torch.float64), b["counts"].to(torch.float64)
        delta = b["sums"] / n_b.clamp_min(1)[:, None] - a["sums"] / n_a.clamp_min(1)[:, None]
        weight = n_a * n_b / (n_a + n_b).clamp_min(1)
        combined = {key: a[key] + b[key] for key in a if key != "scatter"}
        if "scatter" in a:
            combined["scatter"] = a["scatter"] + b["scatter"] + (delta * weight[:, None]).T @ delta
        return combined

    @staticmethod
    def upgrade_statistics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Statistics saved before 0.3 held ``outer = sum_i z_i z_i^T``; the centred scatter derives from it."""
        if "outer" in stats and "scatter" not in stats:
            stats = dict(stats)
            means = stats["sums"] / stats["counts"].to(torch.float64).clamp_min(1)[:, None]
            stats["scatter"] = stats.pop("outer") - stats["sums"].T @ means
        return stats

    # -- completeness
    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._short_message(stats["counts"]) is not None:
            return {"pending_counts": stats["counts"].clone()}
        return self._finalize_complete(stats)

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _finalize_complete (abstract hook)")

    def _short_message(self, counts: torch.Tensor) -> str | None:
        return short_classes_message(self.name, counts, self._min_per_class, self._count_what)

    def _require_complete(self) -> None:
        if self.state_ is not None and "pending_counts" in self.state_:
            raise ValueError(self._short_message(self.state_["pending_counts"]))

    def _after_fit(self) -> None:
        self._require_complete()

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        self._require_complete()
        return self._score_complete(outputs)

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _score_complete (abstract hook)")

    @staticmethod
    def _means(stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class means ``[C, D]``, global mean ``[D]`` and the tied within-class covariance (biased, 1/N)."""
        counts = stats["counts"].to(torch.float64)
        total = counts.sum()
        means = stats["sums"] / counts[:, None]
        mean = stats["sums"].sum(0) / total
        within = stats["scatter"] / total  # sum_i (z_i - mu_y)(z_i - mu_y)^T / N
        return means, mean, 0.5 * (within + within.T)


@register
class Mahalanobis(ClassStatistics):
    """Mahalanobis distance to the nearest class mean under a tied covariance (single layer, "MDS").

    Fit (ID training features and true labels): class means ``mu_c``, tied covariance
    ``S = (1/N) sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T`` (biased), precision ``P = pinv(S)`` (eigenvalues
    below ``1e-10 * max`` dropped, so a singular covariance gives finite scores).
    Score: ``M_c(z) = (z - mu_c)^T P (z - mu_c)`` and the OOD score is ``min_c M_c(z)`` (the paper's
    confidence is ``max_c -M_c``; higher here = more OOD).

    ``shrinkage``: None (the estimate above), an intensity ``s`` in [0, 1] or ``"ledoit_wolf"`` (Ledoit & Wolf,
    J. Multivariate Analysis 2004): ``S`` becomes ``(1 - s) S + s (tr(S)/D) I`` before inversion, for small N.
    A covariance that is zero is refused; one that is singular for other reasons than constant columns warns.

    Fit statistics are class counts, class sums and the scatter around the class means in float64, combined by
    Chan's pairwise update: exact ``partial_fit``, ``merge`` and ``fit_distributed``. Every class needs at least 2
    fit samples.

    Deviations from the official code: docs/detectors.md, section ``mahalanobis``.

    Paper: Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018.
    Code: pokaxpoka/deep_Mahalanobis_detector ``lib_generation.py`` (``sample_estimator``); OpenOOD
    ``openood/postprocessors/mds_postprocessor.py``.
    """

    name = "mahalanobis"
    summary = "Minimum Mahalanobis distance to the class means under a tied (pseudo-inverted) covariance"
    paper = (
        "Lee, Lee, Lee & Shin, 'A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks', NeurIPS 2018"
    )
    code = (
        "https://github.com/pokaxpoka/deep_Mahalanobis_detector (lib_generation.py::sample_estimator); "
        "OpenOOD openood/postprocessors/mds_postprocessor.py"
    )
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})
    _parameter_constraints = {"shrinkage": [None, Options(["ledoit_wolf"]), Interval(Real, 0, 1)]}

    def __init__(self, *, shrinkage: float | str | None = None) -> None:
        self.shrinkage = shrinkage
        super().__init__()

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        means, mean, within = self._means(stats)
        root = self._precision_root(within, stats, "fourth")
        centers = (means - mean) @ root
        return {"proj": root, "mean": mean, "centers": centers, "center_sq": centers.square().sum(1)}

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        y = (z - state["mean"]) @ state["proj"]  # centred first: no float32 cancellation for offset features
        return _nearest_center_sq(y, state["centers"], state["center_sq"])

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["proj"].shape[1] + state["centers"].shape[0] if "proj" in state else 1024
        return 16 * width


@register
class RelativeMahalanobis(ClassStatistics):
    """Relative Mahalanobis distance (RMDS): class Mahalanobis minus a class-agnostic background one.

    Fit: ``mu_c``, tied ``S`` and ``P = pinv(S)`` as in :class:`Mahalanobis`; in addition the global mean
    ``mu_0`` and covariance ``S_0 = (1/N) sum_i (z_i - mu_0)(z_i - mu_0)^T`` with ``P_0 = pinv(S_0)``.
    Score: ``M_0(z) = (z - mu_0)^T P_0 (z - mu_0)``; the OOD score is ``min_c M_c(z) - M_0(z)`` (the
    confidence of the paper and OpenOOD is ``max_c -(M_c - M_0)``). ``shrinkage`` as in :class:`Mahalanobis`,
    applied to both covariances. Needs at least 2 classes (with one, every score would be 0).

    ``S_0`` derives from the same sums as ``S``, so ``partial_fit`` and ``merge`` are exact.

    Deviations from the reference code: docs/detectors.md, section ``rmds``.

    Paper: Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for Improving
    Near-OOD Detection", arXiv:2106.09022, 2021.
    Code: no official code released; OpenOOD ``openood/postprocessors/rmds_postprocessor.py``.
    """

    name = "rmds"
    summary = "Class Mahalanobis distance minus the distance under one global Gaussian (relative Mahalanobis)"
    paper = (
        "Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, 'A Simple Fix to Mahalanobis Distance for Improving "
        "Near-OOD Detection', arXiv:2106.09022, 2021"
    )
    code = "OpenOOD openood/postprocessors/rmds_postprocessor.py (no official code released)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})

    _parameter_constraints = {"shrinkage": [None, Options(["ledoit_wolf"]), Interval(Real, 0, 1)]}

    def __init__(self, *, shrinkage: float | str | None = None) -> None:
        self.shrinkage = shrinkage
        super().__init__()

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if stats["counts"].shape[0] < 2:
            raise ValueError(
                f"{self.name}: needs at least 2 classes, got 1: with one class the class Gaussian and the background "
                "Gaussian are the same and every score would be 0; use mahalanobis for one class"
            )
        means, mean, within = self._means(stats)
        total = stats["counts"].sum().to(torch.float64)
        # S_0 = within + between: (scatter + sum_c n_c (mu_c - mu)(mu_c - mu)^T) / N
        spread = means - mean
        counts = stats["counts"].to(torch.float64)
        background = (stats["scatter"] + (spread * counts[:, None]).T @ spread) / total
        root = self._precision_root(within, stats, "fourth")
        proj = torch.cat([root, self._precision_root(background, stats, "fourth_global")], dim=1)
        centers = (means - mean) @ root
        return {"proj": proj, "mean": mean, "centers": centers, "center_sq": centers.square().sum(1)}

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        y = (z - state["mean"]) @ state["proj"]  # (z - mu) [P^(1/2) | P_0^(1/2)], centred first
        dim = state["centers"].shape[1]
        class_term = _nearest_center_sq(y[:, :dim], state["centers"], state["center_sq"])
        return class_term - torch.linalg.vector_norm(y[:, dim:], dim=1).square()

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["proj"].shape[1] + state["centers"].shape[0] if "proj" in state else 2048
        return 16 * width


@register
class SimplifiedHopfieldEnergy(ClassStatistics):
    """SHE: inner product between the feature and the stored pattern of the predicted class.

    Fit (ID training features, true labels and logits): the stored pattern ``m_c`` is the mean feature
    of the fit samples of class ``c`` that the model classifies correctly (``argmax f = y``).
    Score: ``s(x) = <z, m_yhat>`` with ``yhat = argmax_c f_c(x)``; the OOD score is ``-<z, m_yhat>``
    (the official code computes the same, as ``-LSE`` over the single stored pattern).

    No parameters. Fit statistics are the sums and counts of the correctly classified samples per class
    (float64), so ``partial_fit`` and ``merge`` are exact. Every class needs at least one correctly
    classified fit sample.

    Paper: Zhang, Fu, Wei, Wang & Yang, "Out-of-Distribution Detection based on In-Distribution Data Patterns
    Memorization with Modern Hopfield Energy", ICLR 2023.
    Code: zjs975584714/SHE_ood_detection ``generate_stored_pattern.py``, ``Utils/score_calculation.py``; OpenOOD
    ``openood/postprocessors/she_postprocessor.py``.
    """

    name = "she"
    summary = "Negative inner product of the feature with the mean correctly-classified feature of the predicted class"
    paper = (
        "Zhang, Fu, Wei, Wang & Yang, 'Out-of-Distribution Detection based on In-Distribution Data Patterns "
        "Memorization with Modern Hopfield Energy', ICLR 2023"
    )
    code = (
        "https://github.com/zjs975584714/SHE_ood_detection (generate_stored_pattern.py, "
        "Utils/score_calculation.py); OpenOOD openood/postprocessors/she_postprocessor.py"
    )
    requires = frozenset({"features", "logits"})
    fit_requires = frozenset({"features", "labels", "logits"})
    state_reductions: ClassVar[dict[str, str] | None] = {"counts": "sum", "sums": "sum"}
    _min_per_class = 1
    _count_what = "correctly classified fit sample(s)"

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features.to(torch.float64)
        num_classes = outputs.logits.shape[1]
        labels = outputs.labels.to(z.device)
        class_counts(labels, num_classes, self.name, minimum=0)  # validates the label range
        correct = outputs.logits.argmax(dim=1).to(z.device) == labels
        kept = labels[correct]
        counts = torch.bincount(kept, minlength=num_classes)
        sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, kept, z[correct])
        return {"counts": counts, "sums": sums}

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"patterns": stats["sums"] / stats["counts"].to(torch.float64)[:, None]}

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        patterns = self.state(z.device, z.dtype)["patterns"]
        predicted = outputs.logits.argmax(dim=1).to(z.device)
        if patterns.shape[0] <= 64:  # few classes: [n, D] x [D, C] then pick, faster than gathering [n, D]
            return -(z @ patterns.T).gather(1, predicted[:, None]).squeeze(1)
        return -torch.einsum("nd,nd->n", z, patterns.index_select(0, predicted))

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        return 16 * (state["patterns"].shape[1] if "patterns" in state else 1024)


@register
class WDiscOOD(ClassStatistics):
    """WDiscOOD: distances in the whitened-LDA discriminative subspace and in its residual.

    Fit (ID training features and labels; optionally L2-normalised first, ``feat_norm``):

    1. within-class whitening ``W_h = pinv(S_w)^{1/2}`` (symmetric square root via ``eigh``, eigenvalues
       below ``1e-10 * max`` dropped), ``z' = W_h z``;
    2. on whitened data: class means ``mu'_c``, mean of all samples ``mu'``, ``S'_w = W_h S_w W_h`` and the
       class-unweighted ``S'_b = (1/C) sum_c (mu'_c - mu')(mu'_c - mu')^T``;
    3. LDA: the symmetric generalised problem ``S'_b v = lambda (S'_w + alpha I) v`` (Cholesky-reduced
       ``eigh``), eigenvectors re-normalised to unit L2 norm, sorted by Fisher ratio; ``G`` holds the
       first ``K`` as rows;
    4. residual projector ``H = I - B^T B`` with ``B`` an orthonormal basis of ``rowspace(G)`` (SVD of ``G``).

    Score: ``d_G = min_c ||G z' - G mu'_c||``, ``d_H = ||H z' - H mu'||``; OOD score ``d_G + w d_H``
    (the paper's confidence is ``-d_G - w d_H``).

    Parameters (official defaults, ``experiments/WDiscOOD_final.sh``, ResNet-50 ImageNet):
    ``feat_norm`` False (True for ViT-B/16 and SupCon), ``alpha`` 1e-5 (LDA ridge, must be > 0),
    ``num_disc`` ``K`` (None: 1000 if D >= 2048, 512 if 768 <= D < 2048, D // 2 below; this reproduces
    the official 1000 for ResNet-50 and 512 for ViT-B/16; capped at D, as the official slicing does),
    ``res_weight`` ``w`` 5 (1 for ViT-B/16).

    Deviations from the official code: docs/detectors.md, section ``wdiscood``.

    Paper: Chen, Li, Wang & Xu (and co-authors), "WDiscOOD: Out-of-Distribution Detection via Whitened Linear
    Discriminant Analysis", ICCV 2023.
    Code: ivalab/WDiscOOD ``ood_scores/scorer_dist.py`` (``WDiscOOD``), ``experiments/WDiscOOD_final.sh``.
    """

    name = "wdiscood"
    summary = "Nearest class centre in the whitened LDA subspace plus weighted distance to the mean in its residual"
    paper = (
        "Chen, Li, Wang & Xu (and co-authors), 'WDiscOOD: Out-of-Distribution Detection via Whitened Linear "
        "Discriminant Analysis', ICCV 2023"
    )
    code = "https://github.com/ivalab/WDiscOOD (ood_scores/scorer_dist.py::WDiscOOD)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})

    _parameter_constraints = {
        "feat_norm": [Boolean()],
        "alpha": [Interval(Real, 0, None, closed="neither")],
        "num_disc": [None, Interval(Integral, 1, None)],
        "res_weight": [Interval(Real, 0, None)],
    }

    def __init__(
        self,
        *,
        feat_norm: bool = False,
        alpha: float = 1e-05,
        num_disc: int | None = None,
        res_weight: float = 5.0,
    ) -> None:
        self.feat_norm = feat_norm
        self.alpha = alpha
        self.num_disc = num_disc
        self.res_weight = res_weight
        super().__init__()

    @staticmethod
    def default_num_disc(dim: int) -> int:
        """Number of discriminants when ``num_disc`` is None (official 1000 at D=2048, 512 at D=768)."""
        return 1000 if dim >= 2048 else 512 if dim >= 768 else max(1, dim // 2)

    def _fit_features(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features.to(torch.float64)
        return normalize_rows(z) if self.feat_norm else z

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        means, mean, within = self._means(stats)
        dim = within.shape[0]
        # 1. whitening W_h = pinv(S_w)^(1/2) = V diag(lambda^-1/2) V^T over the kept eigenvalues
        whiten = pinv_sqrt(within)
        # 2. whitened statistics
        means_w, mean_w = means @ whiten, mean @ whiten
        within_w = whiten @ within @ whiten
        diff = means_w - mean_w
        between_w = diff.T @ diff / diff.shape[0]
        # 3. LDA: S_b v = lambda (S_w + alpha I) v, reduced with the Cholesky factor R of S_w + alpha I
        eye = torch.eye(dim, dtype=within.dtype, device=within.device)
        ridge = 0.5 * (within_w + within_w.T) + float(self.alpha) * eye
        chol = torch.linalg.cholesky(ridge)
        reduced = torch.linalg.solve_triangular(chol, between_w, upper=False)
        reduced = torch.linalg.solve_triangular(chol, reduced.T, upper=False)
        ratios, eigvecs = torch.linalg.eigh(0.5 * (reduced + reduced.T))
        disc = torch.linalg.solve_triangular(chol.T, eigvecs, upper=True)  # columns: generalised eigenvectors
        order = torch.argsort(ratios, descending=True)
        ratios, disc = ratios[order], disc[:, order]
        disc = disc / torch.linalg.vector_norm(disc, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        wanted = self.default_num_disc(dim) if self.num_disc is None else int(self.num_disc)
        top = float(ratios[0]) if ratios.numel() else 0.0
        nonzero = int((ratios > _PINV_RTOL * top).sum()) if top > 0 else 0
        k = min(wanted, dim, nonzero)
        g = disc[:, :k].T  # [K, D]
        # 4. residual projector H = I - B^T B, B an orthonormal basis of rowspace(G). H is unique (unlike a
        # basis of its range), so the folded state, and float32 scores, do not depend on rounding.
        blocks = [g]
        if k < dim:
            basis = torch.linalg.svd(g, full_matrices=False).Vh if k else g
            blocks.append(eye - basis.T @ basis)
        fold = torch.cat(blocks) @ whiten  # [K (+ D), D]: rows G W_h, then H W_h
        if k < dim:  # zero rows up to a multiple of 16: BLAS is much slower for odd widths; they add 0 to d_H
            fold = torch.cat([fold, fold.new_zeros(-fold.shape[0] % 16, dim)])
        centers = diff @ g.T  # G (mu'_c - mu')
        return {
            "proj": fold.T.contiguous(),
            "shift": fold @ mean,  # [G mu'; H mu'] (for normalised features)
            "mean": mean,
            "centers": centers,
            "center_sq": centers.square().sum(1),
            "fisher_ratio": ratios[:k].clone(),
        }

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        if self.feat_norm:  # (z / |z|) M = (z M) / |z|: no normalised copy of z
            y = z @ state["proj"]
            y.mul_(torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min_(_NORM_EPS).reciprocal_())
            y.sub_(state["shift"])
        else:
            y = (z - state["mean"]) @ state["proj"]  # centred first: no float32 cancellation for offset features
        k = state["centers"].shape[1]
        disc = _nearest_center_sq(y[:, :k], state["centers"], state["center_sq"]).sqrt_()
        return disc + float(self.res_weight) * torch.linalg.vector_norm(y[:, k:], dim=1)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["proj"].shape[1] + state["centers"].shape[0] if "proj" in state else 2048
        return 16 * width


@register
class KNN(FaissSearch):
    """Deep nearest neighbours: distance from the normalised feature to its k-th nearest ID neighbour.

    Fit: the bank ``{z_i / max(||z_i||, eps)}`` of ID features (no labels needed), optionally a uniformly
    random subset of a fraction ``ratio`` of them (seeded by ``seed``). Score: the Euclidean distance
    ``d_k`` from ``z / max(||z||, eps)`` to its k-th nearest bank vector; the OOD score is ``d_k`` (the
    confidence of the paper is ``-d_k``).

    Exact search: a chunked ``[n, D] x [D, N_bank]`` product and ``topk`` of the similarities, since
    ``d = sqrt(max(2 - 2 <z_hat, b_i>, 0))``. A zero feature vector is at distance ``sqrt(2)`` from every
    bank vector.

    Parameters: ``k`` 50 (official CIFAR value, ``run_cifar.py``; the ImageNet script uses 1000), ``ratio``
    1.0 (fraction of the fit rows kept in the bank), ``seed`` 0 (the subsample; the official scripts use
    ``np.random`` so their subsets differ).

    With ``ratio == 1`` the bank is concatenated across ``partial_fit`` chunks and ``merge`` (exact);
    a random subsample is not a sufficient statistic, so ``ratio < 1`` refuses both. The bank is kept in
    the dtype of the fit features (float32 stays float32: the bank is the memory cost, N x D).

    Deviations from the official code: docs/detectors.md, section ``knn``.

    Paper: Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    Code: deeplearning-wisc/knn-ood ``run_cifar.py``, ``run_imagenet.py``; OpenOOD
    ``openood/postprocessors/knn_postprocessor.py``.
    """

    name = "knn"
    summary = "Distance from the L2-normalised feature to its k-th nearest normalised ID training feature"
    paper = "Sun, Ming, Zhu & Li, 'Out-of-Distribution Detection with Deep Nearest Neighbors', ICML 2022"
    code = "https://github.com/deeplearning-wisc/knn-ood (run_cifar.py, run_imagenet.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})

    state_reductions: ClassVar[dict[str, str] | None] = {"bank": "cat"}
    _parameter_constraints = {
        "k": [Interval(Integral, 1, None)],
        "ratio": [Interval(Real, 0, 1, closed="right")],
        "seed": [Interval(Integral, 0, None)],
        **INDEX_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        k: int = 50,
        ratio: float = 1.0,
        seed: int = 0,
        backend: str = "torch",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        M: int = 32,
        ef_search: int = 128,
    ) -> None:
        self.k = k
        self.ratio = ratio
        self.seed = seed
        self._set_search(backend=backend, index=index, nlist=nlist, nprobe=nprobe, M=M, ef_search=ef_search)
        self._buffer: torch.Tensor | None = None  # the bank's storage while partial fits grow it
        super().__init__()

    @property
    def supports_partial_fit(self) -> bool:
        return self.ratio == 1

    def _refuse_subsampled(self, method: str) -> None:
        if self.ratio != 1:
            raise TypeError(
                f"{self.name}: {method} is not available with ratio={self.ratio} because a random "
                "subsample of the bank is not a sufficient statistic; use ratio=1.0, or fit on all the data"
            )

    def partial_fit(self, outputs: FitData, *, drop_ood: bool = False) -> OutputDetector:
        self._refuse_subsampled("partial_fit")
        return super().partial_fit(outputs, drop_ood=drop_ood)

    def merge(self, other: Detector) -> OutputDetector:
        self._refuse_subsampled("merge")
        return super().merge(other)

    def _after_fit(self) -> None:
        size = self.state_["bank"].shape[0]
        if size < self.k:
            raise ValueError(
                f"{self.name}: k={self.k} but the bank holds only {size} row(s) (ratio="
                f"{self.ratio}); lower k or fit on more samples"
            )
        if self.ratio != 1:
            self.stats_ = None  # not mergeable, and a second copy of the bank would only cost memory

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        if self.ratio != 1:
            generator = torch.Generator().manual_seed(int(self.seed))
            keep = max(1, int(float(self.ratio) * len(z)))
            rows = torch.randperm(len(z), generator=generator)[:keep].sort().values
            z = z[rows.to(z.device)]
        bank = torch.empty_like(z)
        for start in range(0, len(z), _NORMALIZE_ROWS):  # float64 copies of one chunk at a time, not of the bank
            bank[start : start + _NORMALIZE_ROWS] = normalize_rows(z[start : start + _NORMALIZE_ROWS].to(torch.float64))
        return {"bank": bank}

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Append ``b``'s bank to ``a``'s in a buffer that doubles when full: chunks cost linear copying in total,
        not the quadratic cost of concatenating the whole bank for every chunk."""
        bank, more = a["bank"], b["bank"]
        if bank.shape[1:] != more.shape[1:]:
            raise ValueError(f"{self.name}: cannot combine banks of widths {bank.shape[1]} and {more.shape[1]}")
        rows, extra = bank.shape[0], more.shape[0]
        buffer = self._buffer
        reusable = (
            buffer is not None
            and buffer.dtype == bank.dtype
            and buffer.device == bank.device
            and bank.data_ptr() == buffer.data_ptr()
            and buffer.shape[0] >= rows + extra
        )
        if not reusable:
            buffer = bank.new_empty((max(2 * (rows + extra), 1024), *bank.shape[1:]))
            buffer[:rows] = bank
        assert buffer is not None
        buffer[rows : rows + extra] = more.to(buffer.dtype)
        self._buffer = buffer
        return {"bank": buffer[: rows + extra]}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the bank is its own statistic: one copy in memory and on disk
        return {"bank": stats["bank"], **self._index_state(stats["bank"])}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        bank = self.state(z.device, z.dtype)["bank"]
        k = int(self.k)
        if bank.shape[0] < k:
            raise ValueError(
                f"{self.name}: k={k} but the bank holds only {bank.shape[0]} row(s) so far; partial_fit more "
                "data or lower k"
            )
        if self.backend == "faiss":
            kth = self._faiss_top(normalize_rows(z), k)[:, -1]
        else:
            similarity = normalize_rows(z) @ bank.T  # [n, N_bank]
            kth = torch.topk(similarity, k, dim=1, largest=True, sorted=False).values.amin(dim=1)
        if kth.requires_grad:  # explain differentiates the score: no in-place steps on the graph
            return (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
        return kth.mul_(-2.0).add_(2.0).clamp_min_(0.0).sqrt_()

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        bank = (self.state_ or {}).get("bank")
        if bank is None:
            return 64 * 1024
        if self.backend == "faiss":
            return self._faiss_row_bytes(bank.shape[1])
        return 2 * bank.shape[0] * max(4, bank.element_size()) + 8 * bank.shape[1]


__all__ = [
    "KNN",
    "Mahalanobis",
    "RelativeMahalanobis",
    "SimplifiedHopfieldEnergy",
    "WDiscOOD",
    "normalize_rows",
    "pinv_sqrt",
]
