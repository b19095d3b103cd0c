"""Detectors that train a small auxiliary network on the fit features: ``ae_mahalanobis``, ``sage``, ``msma``.

Both train on the penultimate features (so they run on feature files too), seeded, with one thread, and keep the
trained weights as state tensors: saved in the detector's safetensors file and loaded with it, never pickled.
Features are standardised per column on the fit split first (an autoencoder's squared error would otherwise be
dominated by the widest columns).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodguard.detectors.base import OutputDetector, class_counts, infer_num_classes, register
from oodguard.detectors.distance import pinv_sqrt
from oodguard.detectors.params import Integral, Interval, Real, SequenceOf, Text
from oodguard.detectors.trained import (
    cached_training,
    check_latent_rows,
    feature_scaling,
    seeded,
    split_rows,
    standardised,
    train_networks,
)
from oodguard.outputs import ModelOutputs, as_outputs

__all__ = ["AEMahalanobis", "MSMA", "SAGE"]

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------- the networks
def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _networks(dim: int, hidden: int, latent: int, classes: int = 0) -> nn.ModuleDict:
    parts: dict[str, nn.Module] = {"encoder": _mlp([dim, hidden, latent]), "decoder": _mlp([latent, hidden, dim])}
    if classes:
        parts["task"] = nn.Linear(latent, classes)
    return nn.ModuleDict(parts)


def _weights(networks: nn.ModuleDict) -> dict[str, torch.Tensor]:
    return {f"net.{name}": value.detach().clone() for name, value in networks.state_dict().items()}


def _restore(state: dict[str, torch.Tensor], dim: int, hidden: int, latent: int, classes: int) -> nn.ModuleDict:
    networks = _networks(dim, hidden, latent, classes)
    networks.load_state_dict({name[4:]: value for name, value in state.items() if name.startswith("net.")})
    return networks.to(_F64).eval()


class _TrainedNetworks(OutputDetector):
    """A detector whose state holds trained weights (``net.*``): rebuilt once per fitted state, then reused.

    With ``cache_dir`` set, a fit first looks for a state trained before on exactly these fit rows with exactly
    these parameters (safetensors, keyed by a sha256 of the class, :data:`TRAINING_VERSION`, the parameters, torch's
    version and the fit rows' bytes) and trains, then caches, only when there is none. The benchmark runner sets
    ``cache_dir`` to its own cache folder unless the caller set one.
    """

    def _train_state(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _train_state")

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        rows = {field: getattr(outputs, field) for field in sorted(self.fit_requires)}
        return cached_training(self, rows, lambda: self._train_state(outputs))

    def _build_networks(self, state: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement _build_networks")

    def _cached_networks(self) -> Any:
        key = ("networks",)
        if key not in self._state_cache:  # emptied whenever the state changes
            self._state_cache[key] = self._build_networks(self.state_ or {}).to(_F64).eval()  # type: ignore[assignment]
        return self._state_cache[key]

    def _cpu_rows(self, outputs: ModelOutputs | Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The features of ``outputs`` (a ModelOutputs or a dict of its fields) on the CPU, and the float64 state."""
        return as_outputs(outputs).features.cpu(), self.state(torch.device("cpu"), _F64)


def split_for_standardising(name: str, rows: int, latent: int, holdout: float, seed: int,
                            what: str = "fit rows") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(train, held_out)`` rows of the AE + Mahalanobis detectors, checked: enough training rows for the latent
    covariance and at least 2 held-out rows to standardise the terms on (unless ``holdout`` is 0)."""
    train, held_out = split_rows(rows, holdout, seed)
    check_latent_rows(name, rows, latent, len(held_out))
    if holdout > 0 and len(held_out) < 2:
        raise ValueError(
            f"{name}: holdout={holdout} of N={rows} {what} leaves {len(held_out)} row(s) to standardise the terms "
            f"on; fit on more {what}, raise holdout or set holdout=0"
        )
    return train, held_out


def latent_gaussian(codes: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """One Gaussian on latent codes ``[n, d]`` (float64): its mean and the symmetric root of the pseudo-inverse of
    ``S + ridge * tr(S)/d * I``, so that ``||(z - mean) @ root||^2`` is the Mahalanobis distance."""
    latent = codes.shape[1]
    mean = codes.mean(dim=0)
    centred = codes - mean
    covariance = centred.T @ centred / codes.shape[0]
    covariance += ridge * float(torch.trace(covariance)) / latent * torch.eye(latent, dtype=codes.dtype)
    return {"latent_mean": mean, "latent_root": pinv_sqrt(covariance)}


def latent_distance(codes: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Mahalanobis distance of each code under :func:`latent_gaussian`'s state."""
    return ((codes - state["latent_mean"]) @ state["latent_root"]).square().sum(dim=1)


def term_statistics(distance: torch.Tensor, error: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and standard deviation of the distance and reconstruction terms on the rows they are standardised on."""
    return {"md_mean": distance.mean(), "md_std": distance.std().clamp_min(1e-12),
            "re_mean": error.mean(), "re_std": error.std().clamp_min(1e-12)}  # fmt: skip


def combined_score(
    distance: torch.Tensor, error: torch.Tensor, state: dict[str, torch.Tensor], alpha: float, beta: float
) -> torch.Tensor:
    """``alpha * MD_z + beta * RE_z`` with the z-scores of :func:`term_statistics`."""
    md = (distance - state["md_mean"]) / state["md_std"]
    re = (error - state["re_mean"]) / state["re_std"]
    return alpha * md + beta * re


# ---------------------------------------------------------------------------------------------- AE + Mahalanobis
@register
class AEMahalanobis(_TrainedNetworks):
    """Autoencoder reconstruction error plus the Mahalanobis distance of the latent code.

    Fit: a seeded ``holdout`` share of the fit rows is set aside; features standardised per column; an MLP
    autoencoder ``D(E(x))`` (``dim -> hidden -> latent_dim -> hidden -> dim``, ReLU) trained on the other rows with
    the mean squared error (Adam, seeded); the mean ``mu`` and covariance ``S`` of their latent codes (one
    Gaussian, not per class), precision ``pinv(S + ridge * tr(S)/d * I)``. Score: ``RE(x) = ||x - D(E(x))||^2 /
    dim`` and ``MD(x) = (E(x) - mu)^T P (E(x) - mu)``, each standardised by its mean and standard deviation over
    the held-out rows, combined as ``alpha * MD_z + beta * RE_z``.

    Parameters
    ----------
    latent_dim : int, default 16
    hidden : int, default 128
    epochs : int, default 60
    lr : float, default 1e-3
    batch_size : int, default 128
    alpha, beta : float >= 0, default 1.0
        Weights of the standardised Mahalanobis and reconstruction terms (not both 0).
    ridge : float >= 0, default 1e-6
        Added to the latent covariance, relative to its mean eigenvalue.
    holdout : float in [0, 0.5], default 0.1
        Share of the fit rows (seeded) held out of training: the two terms are standardised on them (training
        rows reconstruct better than unseen ID rows). 0 standardises on the training rows.
    seed : int, default 0
    cache_dir : str, optional
        Cache the fitted state here, keyed by the fit rows and parameters (see ``_TrainedNetworks``).

    Deviations from the paper: docs/detectors.md, section ``ae_mahalanobis``.

    Paper: Denouden, Salay, Czarnecki, Abdelzad, Phan & Vernekar, "Improving Reconstruction Autoencoder
    Out-of-distribution Detection with Mahalanobis Distance", arXiv:1812.02765, 2018. No official code.
    """

    name = "ae_mahalanobis"
    summary = "autoencoder on the features: latent Mahalanobis distance plus reconstruction error, standardised"
    paper = (
        "Denouden, Salay, Czarnecki, Abdelzad, Phan & Vernekar, 'Improving Reconstruction Autoencoder "
        "Out-of-distribution Detection with Mahalanobis Distance', arXiv:1812.02765, 2018"
    )
    code = "no official code"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})
    _parameter_constraints = {
        "latent_dim": [Interval(Integral, 1, None)],
        "hidden": [Interval(Integral, 1, None)],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "alpha": [Interval(Real, 0, None)],
        "beta": [Interval(Real, 0, None)],
        "ridge": [Interval(Real, 0, None)],
        "holdout": [Interval(Real, 0, 0.5)],
        "seed": [Interval(Integral, 0, None)],
        "cache_dir": [None, Text()],
    }

    def __init__(
        self,
        *,
        latent_dim: int = 16,
        hidden: int = 128,
        epochs: int = 60,
        lr: float = 1e-3,
        batch_size: int = 128,
        alpha: float = 1.0,
        beta: float = 1.0,
        ridge: float = 1e-6,
        holdout: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.alpha = alpha
        self.beta = beta
        self.ridge = ridge
        self.holdout = holdout
        self.seed = seed
        self.cache_dir = cache_dir
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.alpha == 0 and self.beta == 0:
            raise self._param_error("alpha", "positive, or beta positive (both 0 would score every input 0)")

    def _train_state(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features
        train, held_out = split_for_standardising(
            self.name, features.shape[0], int(self.latent_dim), float(self.holdout), int(self.seed)
        )
        state = feature_scaling(features[train])
        x = standardised(features, state).to(torch.float32)
        dim, hidden, latent = x.shape[1], int(self.hidden), int(self.latent_dim)
        with seeded(int(self.seed)):
            networks = _networks(dim, hidden, latent)
            train_networks(
                networks,
                lambda rows: F.mse_loss(networks["decoder"](networks["encoder"](x[rows])), x[rows]),
                train, int(self.epochs), int(self.batch_size), float(self.lr),
            )  # fmt: skip
        state.update(_weights(networks))
        networks = networks.to(_F64)
        with torch.no_grad():
            codes = networks["encoder"](x[train].to(_F64))
        state.update(latent_gaussian(codes, float(self.ridge)))
        state.update(term_statistics(*self._terms(features[held_out if len(held_out) else train], state, networks)))
        return state

    def _terms(
        self, features: torch.Tensor, state: dict[str, torch.Tensor], networks: nn.ModuleDict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``MD(x)`` and ``RE(x)`` (float64)."""
        x = standardised(features, state)
        with torch.no_grad():
            codes = networks["encoder"](x)
            error = (networks["decoder"](codes) - x).square().mean(dim=1)
        return latent_distance(codes, state), error

    def _build_networks(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return _restore(state, state["feature_mean"].shape[0], int(self.hidden), int(self.latent_dim), 0)

    def terms(self, outputs: ModelOutputs | Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The unstandardised ``(MD, RE)`` of each row, as the score combines them."""
        features, state = self._cpu_rows(outputs)
        return self._terms(features, state, self._cached_networks())

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features, state = self._cpu_rows(outputs)
        distance, error = self._terms(features, state, self._cached_networks())
        return combined_score(distance, error, state, float(self.alpha), float(self.beta)).to(outputs.features.device)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * 4 * (int(self.hidden) + (outputs.feature_dim or 1))


# ---------------------------------------------------------------------------------------------- SAGE
def upper_tail(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``P(x) = 1 - #{r < m(x)} / N``: the share of the (sorted) reference values at or above each value."""
    below = torch.searchsorted(reference, values.contiguous(), side="left")
    return 1.0 - below.to(_F64) / reference.shape[0]


@register
class SAGE(_TrainedNetworks):
    """SAGE: a supervised autoencoder's kNN distance, reconstruction loss and task loss, each an empirical
    upper-tail probability against the fit rows, combined by their geometric mean.

    Fit: features standardised per column; an encoder to a ``latent_dim`` code, a decoder and a linear task head
    trained together with ``0.5 * MSE(reconstruction) + 0.1 * CE(task)`` (the authors' one-stage trainer; Adam,
    seeded). Measures per row: ``dist = log(mean L1 distance of the code to its k nearest fit codes)`` (a fit
    row's own code excluded), ``rloss = MSE`` of its reconstruction, ``task = -log max softmax`` of the head.
    Each is turned into ``P_m(x) = 1 - #{r in R_m: r < m(x)} / N`` over the fit rows' values ``R_m``;
    ``SAGE = (P_dist P_rloss P_task)^(1/3)`` is higher for inputs like the training data, and the OOD score is
    ``1 - SAGE``.

    Training follows the authors' ``train_sae``: Adam with ``lr`` 3e-4, ``batch_size`` 64, at most ``epochs`` 50,
    stopped once the loss of a held-out ``validation`` share of the fit rows (seeded) has risen two epochs in a
    row. The reference values and the code bank use every fit row.

    Parameters: ``latent_dim`` 32 (the paper's), ``hidden`` 128, ``k`` 25 (``score_all.py``), ``epochs`` 50,
    ``lr`` 3e-4, ``batch_size`` 64, ``validation`` 0.1 (0: a fixed number of epochs), ``seed`` 0, ``cache_dir``.

    Deviations from the official code: docs/detectors.md, section ``sage``.

    Paper: Schreyer, Anderson & Thompson, "Generalization is not a universal guarantee: Estimating similarity
    to training data with an ensemble out-of-distribution metric", arXiv:2502.16329, 2025.
    Code: pdxgx/sage ``scripts/prob_scoring.py``, ``scripts/model_setup.py``, ``scripts/score_all.py``.
    """

    name = "sage"
    summary = "supervised autoencoder: geometric mean of kNN-distance, reconstruction and task tail probabilities"
    paper = (
        "Schreyer, Anderson & Thompson, 'Generalization is not a universal guarantee: Estimating similarity to "
        "training data with an ensemble out-of-distribution metric', arXiv:2502.16329, 2025"
    )
    code = "https://github.com/pdxgx/sage (scripts/prob_scoring.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "labels"})
    _parameter_constraints = {
        "latent_dim": [Interval(Integral, 1, None)],
        "hidden": [Interval(Integral, 1, None)],
        "k": [Interval(Integral, 1, None)],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "validation": [Interval(Real, 0, 0.5)],
        "seed": [Interval(Integral, 0, None)],
        "cache_dir": [None, Text()],
    }
    #: The measures, in the order of ``measures`` and of the reference values.
    MEASURES = ("dist", "rloss", "task")

    def __init__(
        self,
        *,
        latent_dim: int = 32,
        hidden: int = 128,
        k: int = 25,
        epochs: int = 50,
        lr: float = 3e-4,
        batch_size: int = 64,
        validation: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.k = k
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.validation = validation
        self.seed = seed
        self.cache_dir = cache_dir
        super().__init__()

    def _train_state(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features, labels = outputs.features, outputs.labels.cpu()
        rows, k = features.shape[0], int(self.k)
        if rows <= k:
            raise ValueError(f"{self.name}: k={k} neighbours need more than {k} fit rows (got {rows}); lower k")
        classes = infer_num_classes(outputs)
        class_counts(labels, classes, self.name, minimum=0)  # validates the label range
        state = feature_scaling(features)
        x = standardised(features, state).to(torch.float32)
        dim, hidden, latent = x.shape[1], int(self.hidden), int(self.latent_dim)
        with seeded(int(self.seed)):
            networks = _networks(dim, hidden, latent, classes)

            def loss(index: torch.Tensor) -> torch.Tensor:
                codes = networks["encoder"](x[index])
                reconstruction = F.mse_loss(networks["decoder"](codes), x[index])
                return 0.5 * reconstruction + 0.1 * F.cross_entropy(networks["task"](codes), labels[index])

            train, held_out = split_rows(rows, float(self.validation), int(self.seed))
            epochs = train_networks(networks, loss, train, int(self.epochs), int(self.batch_size), float(self.lr),
                            held_out if len(held_out) else None)  # fmt: skip
        state.update(_weights(networks))
        state["num_classes"] = torch.tensor(classes)
        state["epochs_run"] = torch.tensor(epochs)
        networks = networks.to(_F64)
        codes, rloss, task = self._measures_of(features, state, networks)
        state["codes"] = codes
        dist = self._distance(codes, codes, exclude_self=True)
        for name, values in zip(self.MEASURES, (dist, rloss, task), strict=True):
            state[f"reference.{name}"] = values.sort().values
        return state

    def _measures_of(
        self, features: torch.Tensor, state: dict[str, torch.Tensor], networks: nn.ModuleDict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent codes, reconstruction MSE and task loss ``-log max softmax`` (float64)."""
        x = standardised(features, state)
        with torch.no_grad():
            codes = networks["encoder"](x)
            rloss = (networks["decoder"](codes) - x).square().mean(dim=1)
            task = -torch.log_softmax(networks["task"](codes), dim=1).amax(dim=1)
        return codes, rloss, task

    def _distance(self, codes: torch.Tensor, bank: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """``log`` of the mean L1 distance to the k nearest bank codes, in chunks of rows."""
        k = int(self.k)
        step = max(1, 2**24 // max(1, bank.shape[0]))
        pieces = []
        for start in range(0, codes.shape[0], step):
            distances = torch.cdist(codes[start : start + step], bank, p=1)
            if exclude_self:  # a fit row's own code is not its neighbour (the reference code drops it too)
                nearest = distances.topk(k + 1, dim=1, largest=False).values[:, 1:]
            else:
                nearest = distances.topk(k, dim=1, largest=False).values
            pieces.append(nearest.mean(dim=1))
        return torch.log(torch.cat(pieces).clamp_min(1e-300))

    def measures(self, outputs: ModelOutputs | Any) -> dict[str, torch.Tensor]:
        """The three raw measures and their tail probabilities ``P_dist``, ``P_rloss``, ``P_task`` per row."""
        features, state = self._cpu_rows(outputs)
        codes, rloss, task = self._measures_of(features, state, self._cached_networks())
        values = {"dist": self._distance(codes, state["codes"]), "rloss": rloss, "task": task}
        result = dict(values)
        for name in self.MEASURES:
            result[f"P_{name}"] = upper_tail(state[f"reference.{name}"], values[name])
        return result

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        parts = self.measures(outputs)
        sage = (parts["P_dist"] * parts["P_rloss"] * parts["P_task"]).pow(1.0 / 3.0)
        return (1.0 - sage).to(outputs.features.device)

    def _build_networks(self, state: dict[str, torch.Tensor]) -> nn.Module:
        dim, classes = state["feature_mean"].shape[0], int(state["num_classes"])
        return _restore(state, dim, int(self.hidden), int(self.latent_dim), classes)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        bank = (self.state_ or {}).get("codes")
        return 8 * 3 * (bank.shape[0] if bank is not None else 4096) + 8 * 4 * int(self.hidden)


# ---------------------------------------------------------------------------------------------- MSMA
def noise_levels(levels: int, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """``sigma_i = exp(linspace(log sigma_max, log sigma_min, L))``: geometric, largest first (official)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), levels, dtype=_F64))


class _ScoreNetwork(nn.Module):
    """``s(x, i) = f([x, onehot(i)]) / sigma_i``: one MLP for every noise level (NCSNv2's 1/sigma scaling), so
    ``sigma_i s(x, i) = f`` and the denoising loss ``1/2 ||f(x + sigma_i e, i) + e||^2`` is well scaled at every
    level."""

    def __init__(self, dim: int, levels: int, hidden: int) -> None:
        super().__init__()
        self.levels = levels
        self.body = nn.Sequential(
            nn.Linear(dim + levels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )

    def scaled(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``sigma_i s(x, i)`` for each row's level index."""
        onehot = F.one_hot(level, self.levels).to(x.dtype)
        return self.body(torch.cat([x, onehot], dim=1))


def gaussian_mixture_log_density(
    points: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, precision_cholesky: torch.Tensor
) -> torch.Tensor:
    """``log p(x)`` of a full-covariance Gaussian mixture (scikit-learn's parametrisation: the Cholesky factors
    of the precisions, ``P_k = U_k U_k^T``)."""
    dim = points.shape[1]
    # log det of each precision's Cholesky factor, and the Mahalanobis term ||(x - mu_k) U_k||^2
    log_det = torch.log(torch.diagonal(precision_cholesky, dim1=1, dim2=2)).sum(dim=1)
    projected = torch.einsum("nd,kde->nke", points, precision_cholesky) - torch.einsum(
        "kd,kde->ke", means, precision_cholesky
    )
    log_gauss = -0.5 * (dim * math.log(2 * math.pi) + projected.square().sum(dim=2)) + log_det
    return torch.logsumexp(log_gauss + torch.log(weights), dim=1)


def check_mixture_rows(name: str, rows: int, components: Any) -> None:
    """Enough fit rows for the mixture: 10 per fold of the component search, or 2 per component without one."""
    candidates = sorted({int(c) for c in components})
    needed = 10 * max(2, candidates[0]) if len(candidates) > 1 else 2 * candidates[0]
    if rows < needed:
        how = "its 10-fold choice of components" if len(candidates) > 1 else f"{candidates[0]} component(s)"
        raise ValueError(
            f"{name}: fit got N={rows} rows; the mixture needs at least {needed} for {how}: fit on more rows"
        )


def fit_norm_mixture(norms: torch.Tensor, components: Any, seed: int, name: str) -> dict[str, torch.Tensor]:
    """MSMA's density model on score-norm vectors ``[n, L]``: standardised, a full-covariance Gaussian mixture whose
    number of components is chosen among ``components`` by 10-fold cross-validated log-likelihood (scikit-learn)."""
    try:
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import KFold
    except ImportError as error:
        raise ImportError(f"{name}: fitting its mixture needs scikit-learn ({error}); "
                          "pip install 'oodguard[bench]'") from error  # fmt: skip
    from threadpoolctl import threadpool_limits

    scaling = feature_scaling(norms)  # a constant norm column keeps scale 1, like scikit-learn's StandardScaler
    mean, std = scaling["feature_mean"], scaling["feature_std"]
    phi = ((norms - mean) / std).numpy()
    folds = KFold(n_splits=10, shuffle=True, random_state=int(seed))
    candidates = sorted({int(c) for c in components})
    best, best_score, worse = (candidates[0] if len(candidates) == 1 else None), -math.inf, 0
    # one BLAS thread: scikit-learn's pool would otherwise wait on torch's, many times slower on few cores
    limits = threadpool_limits(1)
    for count in candidates if len(candidates) > 1 else []:
        scores = []
        for train, held_out in folds.split(phi):
            if len(train) < count:
                break
            mixture = GaussianMixture(count, covariance_type="full", random_state=int(seed), reg_covar=1e-6)
            scores.append(mixture.fit(phi[train]).score(phi[held_out]))
        if scores and float(sum(scores) / len(scores)) > best_score:
            best, best_score, worse = count, float(sum(scores) / len(scores)), 0
        else:
            worse += 1
        if worse == 2:  # the held-out likelihood fell twice in a row: more components only overfit further
            break
    assert best is not None
    mixture = GaussianMixture(best, covariance_type="full", random_state=int(seed), reg_covar=1e-6).fit(phi)
    limits.restore_original_limits()
    return {
        "phi_mean": mean,
        "phi_std": std,
        "gmm_weights": torch.from_numpy(mixture.weights_).to(_F64),
        "gmm_means": torch.from_numpy(mixture.means_).to(_F64),
        "gmm_precision_cholesky": torch.from_numpy(mixture.precisions_cholesky_).to(_F64),
    }


@register
class MSMA(_TrainedNetworks):
    """MSMA: norms of a noise-conditional score network's scores at L noise levels, and a Gaussian mixture over
    them.

    Fit: features standardised per column; a score network ``s(x, i)`` trained by denoising score matching at
    ``levels`` noise levels ``sigma_i`` (geometric from ``sigma_max`` to ``sigma_min``), loss
    ``E_i E_e 1/2 sigma_i^2 ||s(x + sigma_i e, i) + e / sigma_i||^2``; the score-norm vector
    ``phi(x) = (||sigma_1 s(x, 1)||, ..., ||sigma_L s(x, L)||)`` of every fit row on the clean features; a
    full-covariance Gaussian mixture on the standardised ``phi`` with its number of components chosen by 10-fold
    cross-validated log-likelihood among ``components`` (scikit-learn, at fit only). Score: ``-log p(phi(x))``.

    Parameters: ``levels`` 10, ``sigma_max`` 1.0, ``sigma_min`` 0.01 (official), ``hidden`` 256, ``epochs`` 100,
    ``lr`` 1e-3, ``batch_size`` 128, ``components`` (2, 4, ..., 20) (official), ``seed`` 0.

    Deviations from the official code: docs/detectors.md, section ``msma``.

    Paper: Mahmood, Oliva & Styner, "Multiscale Score Matching for Out-of-Distribution Detection", ICLR 2021.
    Code: ahsanMah/msma ``ood_detection_helper.py``, ``losses/losses.py``, ``utils.py``.
    """

    name = "msma"
    summary = "negative log density (Gaussian mixture) of the score-network norms at 10 noise levels"
    paper = "Mahmood, Oliva & Styner, 'Multiscale Score Matching for Out-of-Distribution Detection', ICLR 2021"
    code = "https://github.com/ahsanMah/msma (ood_detection_helper.py)"
    requires = frozenset({"features"})
    fit_requires = frozenset({"features"})
    _parameter_constraints = {
        "levels": [Interval(Integral, 1, None)],
        "sigma_max": [Interval(Real, 0, None, closed="neither")],
        "sigma_min": [Interval(Real, 0, None, closed="neither")],
        "hidden": [Interval(Integral, 1, None)],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "components": [SequenceOf(Interval(Integral, 1, None))],
        "seed": [Interval(Integral, 0, None)],
        "cache_dir": [None, Text()],
    }

    def __init__(
        self,
        *,
        levels: int = 10,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        hidden: int = 256,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 128,
        components: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20),
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.levels = levels
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.components = components
        self.seed = seed
        self.cache_dir = cache_dir
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.sigma_min > self.sigma_max:
            raise self._param_error("sigma_min", f"at most sigma_max={self.sigma_max}")

    def _train_state(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        features = outputs.features
        rows = features.shape[0]
        check_mixture_rows(self.name, rows, self.components)
        state = feature_scaling(features)
        x = standardised(features, state).to(torch.float32)
        sigmas = noise_levels(int(self.levels), float(self.sigma_max), float(self.sigma_min))
        state["sigmas"] = sigmas
        with seeded(int(self.seed)):
            network = _ScoreNetwork(x.shape[1], int(self.levels), int(self.hidden))
            sigma32 = sigmas.to(torch.float32)

            def loss(index: torch.Tensor) -> torch.Tensor:
                level = torch.randint(0, int(self.levels), (index.shape[0],))
                noise = torch.randn(index.shape[0], x.shape[1])
                noisy = x[index] + sigma32[level, None] * noise
                return 0.5 * (network.scaled(noisy, level) + noise).square().sum(dim=1).mean()

            train_networks(
                nn.ModuleDict({"score": network}), loss, rows, int(self.epochs), int(self.batch_size), float(self.lr)
            )
        state.update({f"net.{name}": value.detach().clone() for name, value in network.state_dict().items()})
        norms = self._norms(x.to(_F64), network.to(_F64))
        state.update(fit_norm_mixture(norms, self.components, int(self.seed), self.name))
        return state

    def _norms(self, x: torch.Tensor, network: _ScoreNetwork) -> torch.Tensor:
        """``phi(x)``: ``||sigma_i s(x, i)||`` for every level, ``[n, L]``."""
        columns = []
        with torch.no_grad():
            for level in range(network.levels):
                index = torch.full((x.shape[0],), level, dtype=torch.long)
                columns.append(torch.linalg.vector_norm(network.scaled(x, index), dim=1))
        return torch.stack(columns, dim=1)

    def _build_networks(self, state: dict[str, torch.Tensor]) -> nn.Module:
        network = _ScoreNetwork(state["feature_mean"].shape[0], int(self.levels), int(self.hidden))
        network.load_state_dict({name[4:]: value for name, value in state.items() if name.startswith("net.")})
        return network

    def score_norms(self, outputs: ModelOutputs | Any) -> torch.Tensor:
        """``phi(x) = (||sigma_i s(x, i)||)_i`` of each row ``[n, L]`` (in the standardised feature space)."""
        features, state = self._cpu_rows(outputs)
        return self._norms(standardised(features, state), self._cached_networks())

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        features, state = self._cpu_rows(outputs)
        norms = self._norms(standardised(features, state), self._cached_networks())
        phi = (norms - state["phi_mean"]) / state["phi_std"]
        log_density = gaussian_mixture_log_density(
            phi, state["gmm_weights"], state["gmm_means"], state["gmm_precision_cholesky"]
        )
        return (-log_density).to(outputs.features.device)

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 8 * 4 * (int(self.hidden) + (outputs.feature_dim or 1) + int(self.levels) * 8)
