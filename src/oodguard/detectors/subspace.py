"""Detectors that measure how far a feature lies outside the principal subspace of the fit features.

Both need the penultimate features and the final linear layer (``W``, ``b``): the subspace is centred at
``u = -pinv(W) b``, the point where every logit vanishes.

- ``vim``: ViM, virtual-logit matching (Wang et al., CVPR 2022): residual norm scaled to the logits,
  minus the energy.
- ``residual``: the residual norm alone (the "Residual" baseline of the ViM paper and repository).
"""

from __future__ import annotations

import warnings

import torch

from oodguard.detectors.base import OutputDetector, register
from oodguard.detectors.params import Integral, Interval
from oodguard.outputs import ModelOutputs

#: Rows per block when fitting, so that a float64 copy of one block stays around 64 MB.
_FIT_BLOCK_BYTES = 64 * 2**20
#: Below this ratio of mean residual norm to mean centred norm, the fit features have no residual part.
_DEGENERATE_RESIDUAL = 1e-9


def vim_principal_dim(feature_dim: int) -> int:
    """The official ViM principal dimension ``k`` for features of dimension ``D``.

    ``k = 1000`` if ``D >= 2048``, ``512`` if ``768 <= D < 2048``, else ``D // 2``
    (``haoqiwang/vim``, ``benchmark.py``, as stated in the paper for each backbone).

    Examples
    --------
    >>> [vim_principal_dim(d) for d in (2048, 1024, 768, 512, 65)]
    [1000, 512, 512, 256, 32]
    """
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def _row_blocks(num_rows: int, width: int) -> list[slice]:
    """Row slices covering ``num_rows`` rows, each small enough for a float64 copy of ~64 MB."""
    step = max(1, _FIT_BLOCK_BYTES // (8 * max(1, width)))
    return [slice(start, start + step) for start in range(0, num_rows, step)]


class _SubspaceDetector(OutputDetector):
    """Shared fit of ViM and Residual: centre ``u``, principal dimension and the basis used for ``r(x)``.

    ``r(x) = ||(z - u) R||`` with ``R`` the eigenvectors of ranks ``k+1..D`` of the uncentred second
    moment of ``z - u`` over the fit set. When ``k < D - k`` the k principal eigenvectors ``U`` are stored
    instead and ``r(x) = sqrt(max(||z - u||^2 - ||(z - u) U||^2, 0))`` (same value, fewer products).
    """

    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})

    _parameter_constraints = {"dim": [None, Interval(Integral, 1, None)]}

    def __init__(self, *, dim: int | None = None) -> None:
        self.dim = dim
        super().__init__()

    def _principal_dim(self, feature_dim: int) -> int:
        dim = None if self.dim is None else int(self.dim)
        k = vim_principal_dim(feature_dim) if dim is None else dim
        if not 0 < k < feature_dim:
            source = "the official rule gives" if dim is None else "dim ="
            raise ValueError(
                f"{self.name}: principal dimension must satisfy 0 < dim < D = {feature_dim}, but {source} {k}; "
                f"pass dim between 1 and {feature_dim - 1}"
                + (" (features need D >= 2 to have a residual space)" if feature_dim < 2 else "")
            )
        return k

    def _fit_subspace(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features
        weight, bias = (t.to(device=features.device, dtype=torch.float64) for t in outputs.head)
        n, d = features.shape
        k = self._principal_dim(d)
        center = -(torch.linalg.pinv(weight) @ bias)  # least-squares solution of W u = -b
        # Uncentred second moment of z - u (sklearn EmpiricalCovariance(assume_centered=True) in the official code).
        moment = torch.zeros(d, d, dtype=torch.float64, device=features.device)
        for rows in _row_blocks(n, d):
            centred = features[rows].to(torch.float64) - center
            moment.addmm_(centred.T, centred)
        moment /= n
        # eigh (not eig as in the official code): real output for a symmetric matrix, ascending order.
        _, vectors = torch.linalg.eigh(0.5 * (moment + moment.T))
        vectors = vectors.flip(1)  # descending eigenvalues
        basis = vectors[:, :k] if k < d - k else vectors[:, k:]
        return {
            "center": center,
            "basis": basis.contiguous(),
            "principal_dim": torch.tensor(k, dtype=torch.int64),
        }

    @staticmethod
    def _residual_norm(features: torch.Tensor, state: dict[str, torch.Tensor], principal_dim: int) -> torch.Tensor:
        """``||(z - u) R||`` in float64 (products in the dtype of ``features``)."""
        centred = features - state["center"]
        projection = centred @ state["basis"]
        # Row reductions in the input dtype (a float64 copy of [n, D] would cost more than it gains: the
        # projection itself carries the input dtype's rounding); the per-row arithmetic is float64.
        if state["basis"].shape[1] == features.shape[1] - principal_dim:  # residual basis
            return torch.linalg.vector_norm(projection, dim=1).to(torch.float64)
        # Principal basis: Pythagoras, clamped because rounding can make the difference slightly negative.
        total = centred.square().sum(dim=1).to(torch.float64)
        principal = projection.square().sum(dim=1).to(torch.float64)
        return (total - principal).clamp_min(0.0).sqrt()

    def _residual(self, features: torch.Tensor) -> torch.Tensor:
        state = self.state(features.device, features.dtype)
        return self._residual_norm(features, state, int(self.state_["principal_dim"]))

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        assert self.state_ is not None
        d, m = self.state_["basis"].shape
        c = self.state_["weight"].shape[0] if "weight" in self.state_ else 0
        return 8 * (3 * d + m + 3 * c + 16)


@register
class ViM(_SubspaceDetector):
    """ViM — virtual-logit matching: scaled residual norm minus the energy of the logits.

    Formula (``u = -pinv(W) b``, ``R`` the eigenvectors of ranks ``k+1..D`` of the *uncentred* second
    moment ``(Z - u)^T (Z - u) / N`` of the fit features)::

        r(x)  = ||(z - u) R||_2
        alpha = mean_i max_c f_c(x_i) / mean_i r(x_i)        (both over the fit set)
        score = alpha * r(x) - LSE(f(x))                     (higher = more OOD)

    This is the negation of the official ``LSE(f) - alpha r``. The paper's virtual-logit probability
    ``softmax([f, alpha r])[-1] = sigmoid(alpha r - LSE(f))`` is a strictly increasing function of this
    score, so both rank samples identically.

    Parameters
    ----------
    dim : int or None
        Principal dimension ``k`` (``0 < k < D``). ``None`` (default) applies the official rule
        ``k = 1000 if D >= 2048, 512 if 768 <= D < 2048, else D // 2`` (:func:`vim_principal_dim`).

    Fit on in-distribution **training** features (official: 200 000 random ImageNet training images, test
    transform) together with the head ``(W, b)``, which is copied into the state; scoring needs only the
    features (logits are taken from ``outputs.logits`` when given, otherwise computed as ``z W^T + b``).
    There is no ``partial_fit``: ``alpha`` needs the residual norms of the fit set, known only after ``R``.

    Deviations from the official code: docs/detectors.md, section ``vim``.

    Paper: Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    Code: haoqiwang/vim ``benchmark.py`` (ViM section); OpenOOD ``openood/postprocessors/vim_postprocessor.py``.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> rng = np.random.default_rng(0)
    >>> z, w, b = rng.random((200, 16)), rng.normal(size=(4, 16)), rng.normal(size=4)
    >>> vim = create("vim").fit({"features": z, "head": (w, b)})
    >>> vim.score({"features": z[:3]}).shape
    (3,)
    """

    name = "vim"
    summary = "alpha * residual norm outside the principal subspace minus the energy LSE(f)"
    paper = "Wang, Li, Feng & Zhang, ViM: Out-of-Distribution with Virtual-logit Matching, CVPR 2022"
    code = "https://github.com/haoqiwang/vim (benchmark.py, ViM section)"

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        state = self._fit_subspace(outputs)
        # Copies: the state must not share memory with the caller's arrays.
        weight, bias = (t.to(device=state["center"].device, dtype=torch.float64, copy=True) for t in outputs.head)
        state["weight"], state["bias"] = weight, bias
        features = outputs.features
        n, d = features.shape
        k = int(state["principal_dim"])
        max_logit_sum = residual_sum = centred_sum = 0.0
        for rows in _row_blocks(n, d):
            block = features[rows].to(torch.float64)
            if outputs.logits is not None:
                logits = outputs.logits[rows].to(torch.float64)
            else:
                logits = torch.addmm(bias, block, weight.T)
            max_logit_sum += float(logits.max(dim=1).values.sum())
            residual_sum += float(self._residual_norm(block, state, k).sum())
            centred_sum += float(torch.linalg.vector_norm(block - state["center"], dim=1).sum())
        if residual_sum <= _DEGENERATE_RESIDUAL * centred_sum:
            raise ValueError(
                f"{self.name}: the fit features have no component outside the {k}-dimensional principal subspace "
                f"(N={n} fit rows, D={d}), so alpha = mean max logit / mean residual norm is undefined; fit on "
                f"more than {k} rows that span more than {k} dimensions, or pass a smaller dim"
            )
        alpha = (max_logit_sum / n) / (residual_sum / n)
        if alpha <= 0:
            warnings.warn(
                f"{self.name}: the mean max logit over the fit set is {max_logit_sum / n:.4g} <= 0, so alpha = "
                f"{alpha:.4g} and a larger residual lowers the OOD score (as in the official code)",
                RuntimeWarning,
                stacklevel=3,
            )
        state["alpha"] = torch.tensor(alpha, dtype=torch.float64)
        return state

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features = outputs.features
        state = self.state(features.device, features.dtype)
        logits = outputs.logits
        if logits is None:
            logits = torch.addmm(state["bias"], features, state["weight"].T)
        energy = torch.logsumexp(logits, dim=1).to(torch.float64)
        return float(self.state_["alpha"]) * self._residual(features) - energy


@register
class Residual(_SubspaceDetector):
    """Residual — norm of the feature outside the principal subspace of the fit features.

    Formula (same ``u``, ``k`` rule and residual basis ``R`` as :class:`ViM`)::

        score = ||(z - u) R||_2                                   (higher = more OOD)

    the negation of the official ``-||(z - u) R||``. Needs the head at fit only (for ``u = -pinv(W) b``);
    scoring needs only the features.

    Parameters
    ----------
    dim : int or None
        Principal dimension ``k`` (``0 < k < D``); ``None`` (default) applies the official ViM rule.

    Fit on in-distribution training features as in the ViM repository. ``N < D`` (even ``N <= k``) gives
    finite scores. No ``partial_fit`` (an eigendecomposition is not mergeable exactly).

    Deviations from the official code: docs/detectors.md, section ``residual``.

    Paper: Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022 (the
    Residual baseline).
    Code: haoqiwang/vim ``benchmark.py`` (Residual section); OpenOOD
    ``openood/postprocessors/residual_postprocessor.py``.

    Examples
    --------
    >>> import numpy as np
    >>> from oodguard.detectors import create
    >>> rng = np.random.default_rng(0)
    >>> z, w, b = rng.random((200, 16)), rng.normal(size=(4, 16)), rng.normal(size=4)
    >>> create("residual", dim=4).fit({"features": z, "head": (w, b)}).score({"features": z[:2]}).shape
    (2,)
    """

    name = "residual"
    summary = "norm of the centred feature outside the principal subspace of the fit features"
    paper = "Wang, Li, Feng & Zhang, ViM: Out-of-Distribution with Virtual-logit Matching, CVPR 2022 (baseline)"
    code = "https://github.com/haoqiwang/vim (benchmark.py, Residual section)"

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        return self._fit_subspace(outputs)

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        return self._residual(outputs.features)
