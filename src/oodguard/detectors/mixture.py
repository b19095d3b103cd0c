"""Class-conditional Gaussian mixture on the features: one full-covariance Gaussian per class.

Reference implementation: pytorch-ood 0.4 ``src/pytorch_ood/detector/gmm.py`` (``GMM``), a classical density
baseline that no single paper introduced (the Gaussian discriminant of Lee et al., NeurIPS 2018, with one
covariance per class and the mixture likelihood in place of the nearest class).
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch

from oodguard.detectors.base import CHUNK_TEMPORARY_BYTES, class_counts, infer_num_classes, register
from oodguard.detectors.distance import ClassStatistics
from oodguard.detectors.params import Interval, Real
from oodguard.outputs import ModelOutputs

_F64 = torch.float64


def class_scatter(centred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``S_c = sum_{i: y_i = c} x_i x_i^T`` for every class ``c``, as ``[C, D, D]``.

    Rows are grouped by class into a zero-padded ``[C, m, D]`` block (``m`` the largest class count of a step),
    so every class's scatter is one batched product; steps of rows keep that block a few tens of MB.
    """
    n, dim = centred.shape
    scatter = centred.new_zeros(num_classes, dim, dim)
    step = max(16, 8 * CHUNK_TEMPORARY_BYTES // (8 * num_classes * dim))
    for start in range(0, n, step):
        rows, y = centred[start : start + step], labels[start : start + step]
        order = torch.argsort(y, stable=True)
        y_sorted = y[order]
        counts = torch.bincount(y_sorted, minlength=num_classes)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(y_sorted), device=y.device) - first[y_sorted]
        padded = centred.new_zeros(num_classes, int(counts.max()), dim)
        padded[y_sorted, position] = rows[order]
        scatter.baddbmm_(padded.transpose(1, 2), padded)
    return scatter


def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_covariance_memory(name: str, num_classes: int, dim: int, limit: int | None = None) -> None:
    """Refuse, before allocating, per-class covariances that cannot fit in memory.

    The fit holds the ``[C, D, D]`` float64 scatter and the state its Cholesky factors and whitening maps, about
    three such blocks at once; past the machine's memory the process would be killed rather than fail.
    """
    limit = physical_memory_bytes() if limit is None else limit
    needed = 3 * 8 * num_classes * dim * dim
    if limit is not None and needed > limit:
        raise MemoryError(
            f"{name}: {num_classes} classes x {dim}^2 float64 covariances need about {needed / 2**30:.1f} GiB, "
            f"more than this machine's {limit / 2**30:.1f} GiB; reduce the feature dimension (e.g. PCA to a few "
            "hundred) or use mahalanobis, which shares one covariance across classes"
        )


@register
class GaussianMixture(ClassStatistics):
    """Negative log-likelihood of the features under a class-conditional Gaussian mixture.

    Fit (ID features and true labels): per class ``c`` the mean ``mu_c``, the biased covariance
    ``S_c = (1/n_c) sum_{y_i = c} (z_i - mu_c)(z_i - mu_c)^T + reg I`` and the weight ``pi_c = n_c / N``.
    Score::

        score(z) = -log sum_c pi_c N(z | mu_c, S_c)                     (higher = more OOD)
                 = -LSE_c [log pi_c - (1/2)((z - mu_c)^T S_c^-1 (z - mu_c) + log det S_c + D log 2 pi)]

    Unlike ``mahalanobis`` (one tied covariance, nearest class), every class has its own covariance and all
    classes contribute through the log-sum-exp.

    Parameters
    ----------
    reg : float >= 0, default 1e-6
        Added to the diagonal of every class covariance (pytorch-ood's default), so a class with fewer rows than
        feature dimensions still has an invertible covariance. A covariance that is not positive definite even
        then is refused with a ValueError that says to raise ``reg``.

    The fit statistics are class counts, class sums and the per-class scatter around the class means in
    float64 (``[C, D, D]``: C times the memory of ``mahalanobis``), combined by Chan's pairwise update per
    class, so ``partial_fit`` and ``merge`` are exact. Every class needs at least 2 fit rows. Scoring is one
    ``[n, D] x [D, C D]`` product with the stacked whitening maps ``L_c^-T`` (``S_c = L_c L_c^T``).

    Reference: pytorch-ood 0.4 ``src/pytorch_ood/detector/gmm.py`` (``GMM``). Deviations: docs/detectors.md,
    section ``gmm``.
    """

    name = "gmm"
    summary = "negative log-likelihood under one full-covariance Gaussian per class, weighted by class frequency"
    paper = (
        "class-conditional Gaussian mixture baseline (no single paper; the per-class-covariance form of Lee, Lee, "
        "Lee & Shin, 'A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial "
        "Attacks', NeurIPS 2018), as shipped by pytorch-ood 0.4"
    )
    code = "https://github.com/kkirchheim/pytorch-ood (src/pytorch_ood/detector/gmm.py, GMM, release 0.4)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})
    state_reductions: ClassVar[dict[str, str] | None] = {"counts": "sum", "sums": "sum", "scatter": "chan"}
    _class_keys: ClassVar[tuple[str, ...]] = ("counts", "sums", "scatter")
    _parameter_constraints = {"reg": [Interval(Real, 0, None, closed="left")]}

    def __init__(self, *, reg: float = 1e-6) -> None:
        self.reg = reg
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        num_classes = infer_num_classes(outputs)
        check_covariance_memory(self.name, num_classes, outputs.features.shape[1])
        z = outputs.features.to(_F64)
        labels = outputs.labels.to(device=z.device, dtype=torch.long)
        counts = class_counts(labels, num_classes, self.name, minimum=0)
        sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
        means = sums / counts.clamp_min(1).to(_F64)[:, None]
        # centred on this chunk's class means: no cancellation for features far from 0
        return {"counts": counts, "sums": sums, "scatter": class_scatter(z - means[labels], labels, num_classes)}

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(a["counts"].shape[0], b["counts"].shape[0])

        def pad(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            missing = width - stats["counts"].shape[0]
            return {k: torch.cat([v, v.new_zeros(missing, *v.shape[1:])]) if missing else v for k, v in stats.items()}

        a, b = pad(a), pad(b)
        # Chan's pairwise update per class: S = S_a + S_b + n_a n_b / (n_a + n_b) d d^T, d = mu_b - mu_a
        n_a, n_b = a["counts"].to(_F64), b["counts"].to(_F64)
        delta = b["sums"] / n_b.clamp_min(1)[:, None] - a["sums"] / n_a.clamp_min(1)[:, None]
        weight = n_a * n_b / (n_a + n_b).clamp_min(1)
        outer = (delta * weight[:, None])[:, :, None] * delta[:, None, :]
        return {"counts": a["counts"] + b["counts"], "sums": a["sums"] + b["sums"],
                "scatter": a["scatter"] + b["scatter"] + outer}  # fmt: skip

    def _finalize_complete(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = stats["counts"].to(_F64)
        means = stats["sums"] / counts[:, None]
        dim = means.shape[1]
        covariance = stats["scatter"] / counts[:, None, None]
        if not bool((covariance.diagonal(dim1=1, dim2=2) > 0).any()):
            raise ValueError(
                f"{self.name}: the fit features do not vary within any class (every class covariance is zero), so "
                f"only reg={self.reg} would remain and every input off a class mean would score about 1/reg; fit on "
                "features that vary"
            )
        covariance = 0.5 * (covariance + covariance.transpose(1, 2))
        covariance.diagonal(dim1=1, dim2=2).add_(float(self.reg))
        cholesky, info = torch.linalg.cholesky_ex(covariance)
        if bool((info != 0).any()):
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(
                f"{self.name}: the covariance of class(es) {bad[:10]} is not positive definite even with reg="
                f"{self.reg}; pass a larger reg (e.g. 1e-3), or check the features of those classes for "
                "constant or duplicated columns"
            )
        eye = torch.eye(dim, dtype=_F64, device=cholesky.device).expand_as(cholesky)
        # whitening maps W_c = L_c^-T: (z - mu_c)^T S_c^-1 (z - mu_c) = ||(z - mu_c) W_c||^2
        whiten = torch.linalg.solve_triangular(cholesky, eye, upper=False).transpose(1, 2)
        log_det = 2.0 * cholesky.diagonal(dim1=1, dim2=2).log().sum(dim=1)
        center = means.mean(0)  # scores are centred first, so float32 products do not cancel
        stacked = whiten.permute(1, 0, 2).reshape(dim, -1)  # [D, C D]: one product for every class
        offsets = torch.bmm((means - center)[:, None, :], whiten).reshape(1, -1)
        constant = torch.log(counts / counts.sum()) - 0.5 * (log_det + dim * math.log(2 * math.pi))
        return {"center": center, "whiten": stacked, "offsets": offsets, "constant": constant}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["whiten"].shape[1] if "whiten" in state else 64 * 1024
        return 8 * width

    def _score_complete(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        classes = state["constant"].shape[0]
        projected = torch.addmm(state["offsets"], z - state["center"], state["whiten"], alpha=1.0, beta=-1.0)
        distances = projected.square_().view(z.shape[0], classes, -1).sum(dim=2, dtype=_F64)
        constant = self.state(z.device, _F64)["constant"]
        return -torch.logsumexp(constant - 0.5 * distances, dim=1)
