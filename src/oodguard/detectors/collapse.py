"""Detectors motivated by neural collapse: NECO (principal-subspace norm ratio) and NCI (alignment with the
predicted class's weight vector plus a feature-norm term)."""

from __future__ import annotations

from typing import ClassVar

import torch

from oodguard.detectors.base import CHUNK_TEMPORARY_BYTES, OutputDetector, register
from oodguard.detectors.params import Boolean, Integral, Interval, Real
from oodguard.outputs import ModelOutputs

#: Fraction of the variance of the standardised fit features that NECO's default subspace explains.
NECO_VARIANCE = 0.90
#: Standard deviations at or below this count as zero (the column is left unscaled, as scikit-learn's scaler does).
_ZERO_STD = 1e-12
#: Norms are divided by at least this.
_NORM_EPS = 1e-12


def explained_variance_dim(eigenvalues: torch.Tensor, fraction: float = NECO_VARIANCE) -> int:
    """Smallest ``d`` whose ``d`` largest eigenvalues hold at least ``fraction`` of their sum.

    Examples
    --------
    >>> import torch
    >>> explained_variance_dim(torch.tensor([1.0, 2.0, 7.0]), 0.9)
    2
    """
    values = eigenvalues.clamp_min(0).sort(descending=True).values.to(torch.float64)
    share = values.cumsum(0) / values.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return int(torch.searchsorted(share, torch.tensor([fraction], dtype=torch.float64) - 1e-12)) + 1


@register
class NECO(OutputDetector):
    """NECO: norm of the standardised feature inside the principal subspace of the fit features, over its full norm.

    Fit (ID training features): per-column mean ``mu`` and standard deviation ``sigma`` (biased; zero ones become 1),
    then the eigenvectors of the covariance of the standardised features ``s = (z - mu) / sigma`` (PCA), sorted by
    decreasing eigenvalue; ``V_d`` holds the first ``d``. Score: ``NECO(x) = ||V_d^T s|| / ||s||``, times the maximum
    logit when ``maxlogit`` (the paper's setting for vision transformers); the OOD score is ``-NECO(x)``.

    Parameters
    ----------
    dim : int or None
        ``d``, the dimension of the subspace (``1 <= d < D``). None (default): the smallest ``d`` whose components
        explain at least 90 % of the variance of the standardised fit features (the rule of thumb pytorch-ood
        attributes to the paper, and the one of the NECO re-implementation in mueller-mp/maha-norm).
    maxlogit : bool
        Multiply by ``max_c f_c`` (needs logits at score). Default False (the paper's ResNet setting).

    Fit statistics (count, sum and centred scatter of the features, float64) are additive: exact ``partial_fit`` and
    ``merge`` (the scatters combine by Chan's pairwise update).

    Deviations from the official code: docs/detectors.md, section ``neco``.

    Paper: Ben Ammar, Belkhir, Popescu, Manzanera & Franchi, "NECO: NEural Collapse Based Out-of-distribution
    detection", ICLR 2024.
    Code: gitlab.com/drti/neco ``ood_methods.py`` (``neco``: StandardScaler, PCA, ratio of norms, max logit for
    ViT/DeiT/Swin); kkirchheim/pytorch-ood ``src/pytorch_ood/detector/neco.py``.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> z = np.random.default_rng(0).normal(size=(200, 8))
    >>> create("neco", dim=3).fit({"features": z}).score({"features": z[:2]}).shape
    (2,)
    """

    name = "neco"
    summary = "minus the norm of the standardised feature in the top principal subspace over its full norm"
    paper = (
        "Ben Ammar, Belkhir, Popescu, Manzanera & Franchi, 'NECO: NEural Collapse Based Out-of-distribution "
        "detection', ICLR 2024"
    )
    code = "https://gitlab.com/drti/neco (ood_methods.py: neco); kkirchheim/pytorch-ood detector/neco.py"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})
    state_reductions: ClassVar[dict[str, str] | None] = {"count": "sum", "sum": "sum", "scatter": "chan"}
    _parameter_constraints = {"dim": [None, Interval(Integral, 1, None)], "maxlogit": [Boolean()]}

    def __init__(self, *, dim: int | None = None, maxlogit: bool = False) -> None:
        self.dim = dim
        self.maxlogit = maxlogit
        super().__init__()

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        n, width = z.shape
        total = torch.zeros(width, dtype=torch.float64, device=z.device)
        step = max(256, CHUNK_TEMPORARY_BYTES // (8 * width))
        for start in range(0, n, step):
            total += z[start : start + step].to(torch.float64).sum(0)
        mean = total / n
        scatter = torch.zeros(width, width, dtype=torch.float64, device=z.device)
        for start in range(0, n, step):  # centred on this chunk's mean: no cancellation
            centred = z[start : start + step].to(torch.float64) - mean
            scatter.addmm_(centred.T, centred)
        return {"count": torch.tensor([float(n)], dtype=torch.float64), "sum": total, "scatter": scatter}

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if a["sum"].shape != b["sum"].shape:
            raise ValueError(
                f"{self.name}: cannot combine statistics of widths {a['sum'].shape[0]} and {b['sum'].shape[0]}"
            )
        n_a, n_b = float(a["count"]), float(b["count"])
        delta = b["sum"] / n_b - a["sum"] / n_a
        scatter = a["scatter"] + b["scatter"] + (n_a * n_b / (n_a + n_b)) * torch.outer(delta, delta)
        return {"count": a["count"] + b["count"], "sum": a["sum"] + b["sum"], "scatter": scatter}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = float(stats["count"])
        width = stats["sum"].shape[0]
        mean = stats["sum"] / n
        std = (stats["scatter"].diagonal() / n).clamp_min(0).sqrt()
        std = torch.where(std > _ZERO_STD, std, torch.ones_like(std))
        # covariance of the standardised features; its eigenvectors are the principal axes
        covariance = stats["scatter"] / n / std[:, None] / std[None, :]
        values, vectors = torch.linalg.eigh(0.5 * (covariance + covariance.T))
        values, vectors = values.flip(0), vectors.flip(1)
        if float(values.clamp_min(0).sum()) <= 0:
            raise ValueError(
                f"{self.name}: the fit features do not vary (their covariance is zero), so there is no principal "
                "subspace; fit on features that vary"
            )
        d = explained_variance_dim(values) if self.dim is None else int(self.dim)
        if d >= width:
            raise ValueError(
                f"{self.name}: dim={d} must be below the feature dimension D={width} (with d = D the ratio is 1 for "
                f"every input); pass a dim between 1 and {width - 1}"
            )
        # fold the standardisation into the projection: s = (z - mu) / sigma, V_d^T s = ((z - mu) / sigma) V_d
        return {
            "mean": mean,
            "inv_std": 1.0 / std,
            "basis": vectors[:, :d].contiguous(),
            "explained_variance": values.clamp_min(0).clone(),
        }

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        standardised = (z - state["mean"]).mul_(state["inv_std"])
        inside = torch.linalg.vector_norm(standardised @ state["basis"], dim=1).to(torch.float64)
        full = torch.linalg.vector_norm(standardised, dim=1).to(torch.float64).clamp_min(_NORM_EPS)
        ratio = inside / full
        if self.maxlogit:
            if outputs.logits is None:
                raise ValueError(
                    f"{self.name}: maxlogit=True needs logits at score but the outputs have none; extract the logits "
                    "too, or pass maxlogit=False"
                )
            ratio = ratio * outputs.logits.amax(dim=1).to(torch.float64)
        return -ratio

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["basis"].shape[0] + state["basis"].shape[1] if "basis" in state else 2048
        return 16 * width

    @property
    def dim_(self) -> int:
        """The fitted subspace dimension ``d``."""
        if self.state_ is None or "basis" not in self.state_:
            raise AttributeError(f"{self.name}: not fitted yet; call fit(...) first")
        return int(self.state_["basis"].shape[1])


@register
class NCI(OutputDetector):
    """NCI: cosine-like alignment of the centred feature with the predicted class's weight vector, plus a norm term.

    Fit (ID training features and the head ``(W, b)``): the mean ``mu_g`` of the fit features; ``W`` and ``b`` are
    copied into the state. Score, with ``yhat = argmax_c f_c`` (from the logits when given, else ``z W^T + b``)::

        s(x) = w_yhat . (z - mu_g) / ||z - mu_g||  +  alpha * ||z||_1        (higher = more in-distribution)

    and the OOD score is ``-s(x)``. ``w_yhat`` is not normalised (as in the official code). Default ``alpha = 1e-4``
    (official ``configs/postprocessors/nci.yml``; the official code sweeps ``{1e-4, 1e-3, 1e-2, 1e-1}`` on OOD
    validation data). No ``partial_fit`` (the head is part of the fit).

    Paper: Liu & Qin, "Detecting Out-of-distribution through the Lens of Neural Collapse", CVPR 2025 (arXiv:2311.01479).
    Code: litianliu/NCI-OOD (integrated into OpenOOD): Jingkang50/OpenOOD
    ``openood/postprocessors/nci_postprocessor.py``,
    ``configs/postprocessors/nci.yml``.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> rng = np.random.default_rng(0)
    >>> z, w, b = rng.random((50, 4)), rng.normal(size=(3, 4)), np.zeros(3)
    >>> create("nci").fit({"features": z, "head": (w, b)}).score({"features": z[:2]}).shape
    (2,)
    """

    name = "nci"
    summary = "minus (predicted class weight . centred feature / its norm + alpha * L1 norm of the feature)"
    paper = "Liu & Qin, 'Detecting Out-of-distribution through the Lens of Neural Collapse', CVPR 2025"
    code = (
        "https://github.com/litianliu/NCI-OOD; Jingkang50/OpenOOD openood/postprocessors/nci_postprocessor.py, "
        "configs/postprocessors/nci.yml"
    )
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})
    _parameter_constraints = {"alpha": [Interval(Real, 0, None)]}

    def __init__(self, *, alpha: float = 1e-4) -> None:
        self.alpha = alpha
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        total = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        step = max(256, CHUNK_TEMPORARY_BYTES // (8 * z.shape[1]))
        for start in range(0, z.shape[0], step):
            total += z[start : start + step].to(torch.float64).sum(0)
        weight, bias = (t.to(device=z.device, dtype=torch.float64, copy=True) for t in outputs.head)
        return {"mean": total / z.shape[0], "weight": weight, "bias": bias}

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        weight = state["weight"]
        logits = outputs.logits
        if logits is None:
            logits = torch.addmm(state["bias"], z, weight.T)
        predicted = logits.argmax(dim=1).to(z.device)
        centred = z - state["mean"]
        if weight.shape[0] <= 64:  # few classes: [n, D] x [D, C] then pick, faster than gathering [n, D]
            aligned = (centred @ weight.T).gather(1, predicted[:, None]).squeeze(1)
        else:
            aligned = torch.einsum("nd,nd->n", centred, weight.index_select(0, predicted))
        norm = torch.linalg.vector_norm(centred, dim=1).clamp_min_(_NORM_EPS)
        confidence = aligned.to(torch.float64) / norm.to(torch.float64)
        alpha = float(self.alpha)
        if alpha:
            confidence = confidence + alpha * z.abs().sum(dim=1).to(torch.float64)
        return -confidence

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["weight"].shape[1] + state["weight"].shape[0] if "weight" in state else 2048
        return 16 * width
