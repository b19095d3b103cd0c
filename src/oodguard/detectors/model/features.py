"""Model-based detectors on feature statistics: the multi-layer Mahalanobis ensemble and AdaSCALE.

Both run the model themselves (:class:`~oodguard.detectors.model.gradient.ModelDetector`): the Mahalanobis ensemble
perturbs each input once per layer against the gradient of its Mahalanobis distance (Lee et al., 2018), and
AdaSCALE perturbs the least-sensitive input elements to estimate how OOD a sample looks before scaling its
features (Regmi, 2025). Data are read once, batch by batch, so one-shot iterables work and activations are
reduced per batch (the fit never holds ``[N, C, H, W]`` activations).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from oodguard.detectors.base import register
from oodguard.detectors.distance import _ClassStatistics, _short_classes_message, pinv_sqrt
from oodguard.detectors.model.base import ModelDetector
from oodguard.extraction.extract import _Batches, _get_module
from oodguard.extraction.model_runner import FEATURES, ModelRunner

__all__ = ["MahalanobisEnsemble", "AdaSCALE", "fit_ensemble_weights", "spatial_mean"]

#: exp overflows float64 above ~709.78 (AdaSCALE-A scales the features by exp(r)).
_MAX_LOG_SCALE = 700.0


def _finite(name: str, key: str, value: Any, *, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: {key} must lie in {interval}, got {value:g}")
    return value


def spatial_mean(activation: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...] -> [B, C]``: the mean over every dimension after the channels (as the official code)."""
    if activation.ndim < 2:
        raise ValueError(
            f"layers: an activation of shape {tuple(activation.shape)} has no feature dimension; name a layer whose "
            "output is [B, C] or [B, C, H, W]"
        )
    return activation.flatten(2).mean(dim=2) if activation.ndim > 2 else activation


# ====================================================================== Mahalanobis ensemble
@register
class MahalanobisEnsemble(ModelDetector):
    """Mahalanobis ensemble over several layers with input pre-processing (the official "feature ensemble").

    For each named layer ``l`` the activation ``a_l(x)`` is averaged over its spatial positions (``[B, C, H, W]
    -> [B, C]``). Fit (ID training inputs and their **true** labels): class means ``mu_{l,c}``, the tied
    covariance ``S_l = (1/N) sum_i (a_i - mu_{l,y_i})(a_i - mu_{l,y_i})^T`` (biased, float64) and its
    pseudo-inverse ``P_l`` (eigenvalues below ``1e-10 * max`` dropped, as ``mahalanobis``).

    Score, per layer (one gradient pass each, as the official code)::

        M_{l,c}(x) = (a_l(x) - mu_{l,c})^T P_l (a_l(x) - mu_{l,c});  c^ = argmin_c M_{l,c}(x)
        g = d(1/2 M_{l,c^}(x)) / dx;   x~ = x - epsilon * sign(g) / std_ch     (sign(0) := +1)
        S_l(x) = max_c -1/2 M_{l,c}(x~)
        OOD score = -sum_l w_l S_l(x)          (higher = more OOD)

    ``std_ch`` is the runner's ``input_std`` (the data normalisation's std; ``scale_by_std=False`` drops it).

    Parameters
    ----------
    layers : list of str, optional
        Module names (as in ``model.named_modules()``) and/or :data:`~oodguard.extraction.FEATURES` (the input
        of the final linear layer). Default: ``[FEATURES]`` only, i.e. single-layer Mahalanobis with input
        pre-processing. The official ResNet-34 uses the stem and the four stages (``relu(bn1(conv1))``,
        ``layer1`` .. ``layer4``).
    epsilon : float >= 0, default 0
        Noise magnitude in raw-pixel units (divided by ``std_ch``). 0 = no pre-processing (one forward pass for
        all layers). The official code picks it per OOD set from ``{0, 0.01, 0.005, 0.002, 0.0014, 0.001,
        0.0005}`` on OOD validation data.
    weights : list of float, optional
        One weight per layer. Default: equal weights ``1/L`` (no OOD data needed). The official weights come from
        a logistic regression on ID vs OOD (or adversarial) validation samples: see :func:`fit_ensemble_weights`.
    scale_by_std : bool, default True

    Cost: fit one forward pass per input; score ``L x (2 forward + 1 backward)`` with ``epsilon > 0``, one
    forward pass otherwise.

    Paper: Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018. Official code: pokaxpoka/deep_Mahalanobis_detector
    (``lib_generation.py``: ``sample_estimator``, ``get_Mahalanobis_score``; ``OOD_Regression_Mahalanobis.py``;
    90c2105).

    Deviations: the gradient is of the per-sample loss summed over the batch (official: the batch mean; only
    the sign is used, so the step is the same); the precision is an eigenvalue pseudo-inverse instead of
    sklearn's ``pinvh``; distances are computed in float64 from ``P^{1/2}`` (same values); the default weights
    are equal instead of regression weights (those need OOD data, which a plain ``fit`` does not have).
    OpenOOD's ``mds_ensemble`` differs from the official method (first conv block only, weight 1, gradient
    divided by 0.5): use ``layers=[<stem>], scale_by_std=False`` with ``input_std=0.5`` to mimic it.
    """

    name = "mahalanobis_ensemble"
    summary = "weighted sum over layers of the Mahalanobis confidence after per-layer input pre-processing"
    paper = (
        "Lee, Lee, Lee & Shin, 'A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks', NeurIPS 2018"
    )
    code = "https://github.com/pokaxpoka/deep_Mahalanobis_detector (lib_generation.py, OOD_Regression_Mahalanobis.py)"

    def __init__(
        self,
        *,
        layers: Any = None,
        epsilon: float = 0.0,
        weights: Any = None,
        scale_by_std: bool = True,
    ) -> None:
        self.layers = layers
        self.epsilon = epsilon
        self.weights = weights
        self.scale_by_std = scale_by_std
        super().__init__()


    # ------------------------------------------------------------------ parameters
    def _check_param_combination(self) -> None:
        layers = self.params["layers"]
        if layers is None:
            layers = [FEATURES]
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(
                f"{self.name}: layers must be a non-empty list of module names (or FEATURES), got {layers!r}"
            )
        layers = list(layers)
        if not all(isinstance(name, str) for name in layers):
            raise ValueError(f"{self.name}: layers must be module names (strings), got {layers!r}")
        duplicates = sorted({name for name in layers if layers.count(name) > 1})
        if duplicates:
            raise ValueError(f"{self.name}: layers {duplicates} given more than once; give each layer once")
        self.params["layers"] = layers
        self.params["epsilon"] = _finite(
            self.name, "epsilon", self.params["epsilon"], low=0.0, high=math.inf, low_open=False, high_open=True
        )
        weights = self.params["weights"]
        if weights is not None:
            if isinstance(weights, (np.ndarray, torch.Tensor)):
                weights = weights.tolist()
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise ValueError(f"{self.name}: weights must be a list of numbers (one per layer), got {weights!r}")
            if len(weights) != len(layers):
                raise ValueError(
                    f"{self.name}: weights has {len(weights)} value(s) for {len(layers)} layer(s); give one weight "
                    "per layer (or None for equal weights)"
                )
            weights = [
                _finite(self.name, "weights", w, low=-math.inf, high=math.inf, low_open=True, high_open=True)
                for w in weights
            ]
            if not any(weights):
                raise ValueError(f"{self.name}: weights are all zero; at least one layer must count")
            self.params["weights"] = weights
        if not isinstance(self.params["scale_by_std"], bool):
            raise ValueError(f"{self.name}: scale_by_std must be True or False, got {self.params['scale_by_std']!r}")

    @property
    def layer_weights(self) -> list[float]:
        """The weight of each layer (equal weights ``1/L`` when ``weights`` is None)."""
        layers = self.params["layers"]
        weights = self.params["weights"]
        return [1.0 / len(layers)] * len(layers) if weights is None else list(weights)

    def _check_layers(self, runner: ModelRunner) -> None:
        for name in self.params["layers"]:
            if name == FEATURES:
                if runner.head is None:
                    raise ValueError(
                        f"{self.name}: layers names {FEATURES!r} (the features), but the model's final linear "
                        "layer was not found; pass feature_layer= to the ModelRunner or name module layers"
                    )
            else:
                _get_module(runner.model, name, "layers")  # lists the available names when missing

    # ------------------------------------------------------------------ fit
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        self._check_layers(runner)
        layers = self.params["layers"]
        modules = [name for name in layers if name != FEATURES]
        counts: torch.Tensor | None = None
        sums: list[torch.Tensor] = []
        outer: list[torch.Tensor] = []
        for x, y in _Batches(data, labels, runner.batch_size):
            if x.shape[0] == 0:
                continue
            if y is None:
                raise ValueError(
                    f"{self.name}: fit needs the true class labels of the in-distribution inputs; pass labels= or "
                    "batches of (inputs, labels)"
                )
            outputs = runner.forward(x, modules, progress=False, desc=self.name)
            num_classes = outputs.logits.shape[1]
            y = y.to(torch.long).reshape(-1)
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise ValueError(
                    f"{self.name}: labels must lie in 0..{num_classes - 1} (the model's classes), got range "
                    f"{int(y.min())}..{int(y.max())}; fit on in-distribution rows only"
                )
            if counts is None:
                counts = torch.zeros(num_classes, dtype=torch.int64)
            counts += torch.bincount(y, minlength=num_classes)
            for index, name in enumerate(layers):
                a = spatial_mean(outputs.features if name == FEATURES else outputs.layers[name]).to(torch.float64)
                s = a.new_zeros(num_classes, a.shape[1]).index_add_(0, y, a)
                if index == len(sums):
                    sums.append(s)
                    outer.append(a.T @ a)
                else:
                    sums[index] += s
                    outer[index] += a.T @ a
        if counts is None:
            raise ValueError(f"{self.name}: the fit data produced no rows")
        message = _short_classes_message(self.name, counts, 2, "fit samples")
        if message is not None:
            raise ValueError(message)
        state: dict[str, torch.Tensor] = {"counts": counts}
        for index in range(len(layers)):
            means, mean, within = _ClassStatistics._means(
                {"counts": counts, "sums": sums[index], "outer": outer[index]}
            )
            root = pinv_sqrt(within)
            state[f"layer{index}.mean"] = mean
            state[f"layer{index}.proj"] = root
            state[f"layer{index}.centers"] = (means - mean) @ root
        return state

    # ------------------------------------------------------------------ score
    def _layer_state(self, index: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        state = self.state(device, dtype)
        return state[f"layer{index}.mean"], state[f"layer{index}.proj"], state[f"layer{index}.centers"]

    def _distances(self, index: int, activation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``M_{l,c}`` for every row and class, ``[B, C]`` (differentiable), in ``dtype``."""
        mean, proj, centers = self._layer_state(index, activation.device, dtype)
        a = spatial_mean(activation).to(dtype)
        if a.shape[1] != mean.shape[0]:
            raise ValueError(
                f"{self.name}: layer {self.params['layers'][index]!r} gives {a.shape[1]} channels, the fit saw "
                f"{mean.shape[0]}; attach the model the detector was fitted with"
            )
        y = (a - mean) @ proj
        return (y[:, None, :] - centers[None]).square().sum(dim=2)

    def _loss(self, index: int):
        name = self.params["layers"][index]

        def loss(logits: torch.Tensor, activations: dict[str, torch.Tensor]) -> torch.Tensor:
            activation = activations[name]
            distances = self._distances(index, activation, activation.dtype)
            nearest = distances.detach().argmin(dim=1, keepdim=True)
            return 0.5 * distances.gather(1, nearest).squeeze(1)

        return loss

    def layer_scores(self, data: Any, *, progress: bool | None = None) -> torch.Tensor:
        """The per-layer confidences ``S_l(x) = max_c -1/2 M_{l,c}(x~)``, ``[N, L]`` float64 (higher = more ID)."""
        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: call fit(...) on in-distribution inputs before layer_scores(...)")
        return self._layer_scores(self.runner, data, progress)

    def _layer_scores(self, runner: ModelRunner, data: Any, progress: bool | None) -> torch.Tensor:
        self._check_layers(runner)
        layers = self.params["layers"]
        modules = [name for name in layers if name != FEATURES]
        epsilon = self.params["epsilon"]
        rows: list[torch.Tensor] = []
        for x, _ in _Batches(data, None, runner.batch_size):
            if x.shape[0] == 0:
                continue
            columns = []
            if epsilon == 0.0:
                outputs = runner.forward(x, modules, progress=False, desc=self.name)
                for index, name in enumerate(layers):
                    a = outputs.features if name == FEATURES else outputs.layers[name]
                    columns.append(-0.5 * self._distances(index, a, torch.float64).amin(dim=1))
            else:
                for index, name in enumerate(layers):
                    outputs = runner.perturbed_forward(
                        x,
                        self._loss(index),
                        epsilon,
                        self.params["scale_by_std"],
                        layers=[] if name == FEATURES else [name],
                        loss_layers=[name],
                        progress=False,
                    )
                    a = outputs.features if name == FEATURES else outputs.layers[name]
                    columns.append(-0.5 * self._distances(index, a, torch.float64).amin(dim=1))
            rows.append(torch.stack(columns, dim=1).to("cpu"))
        if not rows:
            raise ValueError(f"{self.name}: data produced no rows")
        return torch.cat(rows)

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        confidences = self._layer_scores(runner, data, progress)
        weights = torch.tensor(self.layer_weights, dtype=torch.float64)
        return -(confidences @ weights)


def _torch_logistic(features: torch.Tensor, targets: torch.Tensor, c: float = 1.0) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression (sklearn's objective with ``C = c``, intercept not penalised) by LBFGS."""
    x = features.to(torch.float64)
    t = targets.to(torch.float64)
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    intercept = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [coef, intercept],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        margin = x @ coef + intercept
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(margin, t, reduction="sum")
        loss = loss + 0.5 * coef.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return coef.detach(), float(intercept.detach())


def fit_ensemble_weights(
    detector: MahalanobisEnsemble,
    id_inputs: Any,
    ood_inputs: Any,
    *,
    backend: str = "auto",
    assign: bool = True,
    progress: bool | None = None,
) -> np.ndarray:
    """**Needs OOD (or adversarial) validation data.** The official layer weights of the Mahalanobis ensemble.

    The official method (``OOD_Regression_Mahalanobis.py``) fits a logistic regression with the per-layer
    confidences ``S_l`` as features, in-distribution samples as class 1 and OOD samples (of the very set it is
    then evaluated on: 500 + 500 for training) or FGSM adversarial samples as class 0; the ensemble confidence is
    ``sum_l alpha_l S_l + beta``. This function computes ``S_l`` for both input sets with ``detector`` (fitted
    and attached; its ``epsilon`` is used), fits the regression and returns ``alpha`` ``[L]`` (``beta`` does not
    change the ranking). With ``assign`` the detector's ``weights`` are set to ``alpha``.

    Weights tuned on the OOD set you then evaluate on give optimistic numbers; use a separate OOD (or
    adversarial) validation set.

    Parameters
    ----------
    backend : "auto", "sklearn" or "torch"
        ``"sklearn"``: ``LogisticRegressionCV()`` with default arguments, as the official code. ``"torch"``:
        a plain L2-regularised logistic regression (``C = 1``, no cross-validation) by LBFGS, for
        environments without scikit-learn. ``"auto"``: sklearn when importable, else torch.
    """
    if not isinstance(detector, MahalanobisEnsemble):
        raise TypeError(f"detector: expected a mahalanobis_ensemble detector, got {type(detector).__name__}")
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"backend: expected 'auto', 'sklearn' or 'torch', got {backend!r}")
    id_scores = detector.layer_scores(id_inputs, progress=progress)
    ood_scores = detector.layer_scores(ood_inputs, progress=progress)
    x = torch.cat([id_scores, ood_scores])
    t = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(ood_scores))])
    if backend == "auto":
        try:
            import sklearn.linear_model  # noqa: F401
        except ImportError:
            backend = "torch"
        else:
            backend = "sklearn"
    if backend == "sklearn":
        from sklearn.linear_model import LogisticRegressionCV

        with warnings.catch_warnings():  # sklearn's notices about future default changes
            warnings.simplefilter("ignore", FutureWarning)
            model = LogisticRegressionCV().fit(x.numpy(), t.numpy().astype(np.int64))
        weights = np.asarray(model.coef_[0], dtype=np.float64)
    else:
        weights = _torch_logistic(x, t)[0].numpy()
    if not np.all(np.isfinite(weights)) or not np.any(weights):
        raise ValueError(
            "the logistic regression gave no usable weights (all zero or non-finite); the ID and OOD validation "
            "sets may be indistinguishable by these layers"
        )
    if assign:
        detector.params["weights"] = [float(w) for w in weights]
        detector._check_params()
    return weights


# ====================================================================== AdaSCALE
def _max_logit_loss(logits: torch.Tensor, activations: Any = None) -> torch.Tensor:
    return logits.gather(1, logits.detach().argmax(dim=1, keepdim=True)).squeeze(1)


def _top_count(dim: int, percent: float) -> int:
    """``int(D * percent / 100)`` (the official floor), at least 1 so that small feature vectors keep a unit."""
    return max(1, int(dim * percent / 100.0))


@register
class AdaSCALE(ModelDetector):
    """AdaSCALE: SCALE with a per-sample percentile set by how much the features move under a small perturbation.

    Per sample ``x`` (as given to the model), with ``f = model(x)``, ``z`` its penultimate features (input of
    the final linear layer ``W, b``), ``D = dim z``::

        g    = d f_y^ / dx   (y^ = argmax f; the max logit, not a loss)
        mask = the int(o * numel(x)) input elements with the smallest |g|
        x~   = x + epsilon * sign(g) * mask          (sign(0) = 0; no std scaling, no clamping)
        z~   = penultimate features of x~
        Q    = sum over the top-k_Q units of z of |z - z~|        (k_Q = 1 % of D)
        C_o  = sum over the top-k_C units of z of max(z~, 0)      (k_C = 5 % of D)
        Q'   = C_o + lambda * Q
        p(x) = p_min + (1 - F(Q'(x))) (p_max - p_min)   (F = ECDF of Q' on the fit inputs: fraction <= Q')
        k(x) = D - round(D p(x) / 100);  a = max(z, 0);  r(x) = sum_j a_j / (sum of the k(x) largest a_j)
        A: f' = W (z exp(r)) + b        L: f' = (W z + b) r^2
        OOD score = -LSE(f')             (higher = more OOD)

    Fit: ``Q'`` of ``n_fit`` random rows of the fit inputs (seeded; all rows when there are fewer or
    ``n_fit=None``); the official code uses 5000 random ID **validation** images. Cost: 2 forward passes and
    1 backward pass per sample, at fit and at score.

    Parameters
    ----------
    variant : "A" (scale the features, default) or "L" (scale the logits).
    p_min, p_max : float in (0, 100), default 75, 85
        Official ``configs/postprocessors/adascale_{a,l}.yml`` default ``[75, 85]``. The README advises
        ``p_min = 60`` and tuning only ``p_max`` (sweep 65..99); tuned ResNet-50 ImageNet: ``[80, 85]``.
    lam : float >= 0, default 10 (weight of the shift term, ``lmbda``).
    o : float in (0, 1], default 0.05 (fraction of input elements perturbed).
    epsilon : float > 0, default 0.5 (perturbation in units of the model's inputs; hard-coded officially).
    k_q, k_c : percent of units for Q and C_o, default 1 and 5.
    n_fit : int or None, default 5000; seed : int, default 0 (the subset; officially unseeded).

    Paper: Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", 2025. Official code: sudarshanregmi/AdaSCALE
    ``openood/postprocessors/adascale_postprocessor.py`` and ``openood/networks/adascale_net.py`` (also merged
    in OpenOOD).

    Deviations: the self-consistent assignment (C_o over the top 5 %, Q over the top 1 %, at fit and at score;
    the official HEAD swaps them at fit only, the earlier code and OpenOOD's copy do not); ``k_Q, k_C`` are at
    least 1 (the official ``int(D * 1 / 100)`` is 0 for D < 100, which drops the shift term); a sample whose
    ``max(z, 0)`` is all zero gets ``r = 1`` (officially 0/0 = NaN); the energy is computed in float64; an
    ``exp(r)`` overflow raises ValueError. Needs a head applied to ``[B, D]`` features and a model whose
    samples do not interact (eval-mode BatchNorm with running statistics).
    """

    name = "adascale"
    summary = "SCALE with a per-sample percentile from the feature shift under a small input perturbation"
    paper = "Regmi, AdaSCALE: Adaptive Scaling for OOD Detection, 2025"
    code = "https://github.com/sudarshanregmi/AdaSCALE (openood/postprocessors/adascale_postprocessor.py)"

    def __init__(
        self,
        *,
        variant: str = 'A',
        p_min: float = 75.0,
        p_max: float = 85.0,
        lam: float = 10.0,
        o: float = 0.05,
        epsilon: float = 0.5,
        k_q: float = 1.0,
        k_c: float = 5.0,
        n_fit: int = 5000,
        seed: int = 0,
    ) -> None:
        self.variant = variant
        self.p_min = p_min
        self.p_max = p_max
        self.lam = lam
        self.o = o
        self.epsilon = epsilon
        self.k_q = k_q
        self.k_c = k_c
        self.n_fit = n_fit
        self.seed = seed
        super().__init__()


    def _check_param_combination(self) -> None:
        p = self.params
        if p["variant"] not in ("A", "L"):
            raise ValueError(
                f"{self.name}: variant must be 'A' (scale features) or 'L' (scale logits), got {p['variant']!r}"
            )
        for key in ("p_min", "p_max"):
            p[key] = _finite(self.name, key, p[key], low=0.0, high=100.0, low_open=True, high_open=True)
        if p["p_min"] > p["p_max"]:
            raise ValueError(f"{self.name}: p_min ({p['p_min']:g}) must not exceed p_max ({p['p_max']:g})")
        p["lam"] = _finite(self.name, "lam", p["lam"], low=0.0, high=math.inf, low_open=False, high_open=True)
        p["o"] = _finite(self.name, "o", p["o"], low=0.0, high=1.0, low_open=True, high_open=False)
        p["epsilon"] = _finite(
            self.name, "epsilon", p["epsilon"], low=0.0, high=math.inf, low_open=True, high_open=True
        )
        for key in ("k_q", "k_c"):
            p[key] = _finite(self.name, key, p[key], low=0.0, high=100.0, low_open=True, high_open=False)
        n_fit = p["n_fit"]
        if n_fit is not None and (isinstance(n_fit, bool) or not isinstance(n_fit, Integral) or n_fit < 1):
            raise ValueError(f"{self.name}: n_fit must be a positive integer or None (all rows), got {n_fit!r}")
        if isinstance(p["seed"], bool) or not isinstance(p["seed"], Integral):
            raise ValueError(f"{self.name}: seed must be an integer, got {p['seed']!r}")
        p["n_fit"] = None if n_fit is None else int(n_fit)
        p["seed"] = int(p["seed"])

    # ------------------------------------------------------------------ shared pass
    def _check_dim(self, dim: int) -> None:
        kept = dim - round(dim * self.params["p_max"] / 100.0)
        if kept < 1:
            raise ValueError(
                f"{self.name}: p_max {self.params['p_max']:g} keeps k = {kept} of D = {dim} feature units; lower "
                "p_max so that round(D * p_max / 100) < D"
            )

    def _head(self, runner: ModelRunner) -> torch.nn.Linear:
        if runner.head is None:
            raise ValueError(
                f"{self.name}: the model's final linear layer was not found; create the ModelRunner with "
                "feature_layer= naming it"
            )
        return runner.head[1]

    def _passes(self, runner: ModelRunner, data: Any, progress: bool | None):
        """Per batch: ``(z, Q')`` on the CPU in float64, from one gradient pass and one perturbed forward."""
        self._head(runner)
        p = self.params
        for batch in runner.gradient_batches(
            data, _max_logit_loss, layers=[FEATURES], wrt_layers=False, progress=progress, desc=self.name
        ):
            x, g = batch.inputs, batch.input_gradient
            assert g is not None
            z = batch.activations[FEATURES]
            if z.ndim != 2:
                raise ValueError(
                    f"{self.name}: the features have shape {tuple(z.shape)}; AdaSCALE needs [B, D] features "
                    "(a final linear layer applied to pooled features)"
                )
            flat = g.abs().flatten(1)
            count = int(flat.shape[1] * p["o"])
            mask = torch.zeros_like(flat)
            if count:
                mask.scatter_(1, torch.topk(flat, count, dim=1, largest=False).indices, 1.0)
            perturbed = x + p["epsilon"] * torch.sign(g) * mask.view_as(g)
            z_tilde = runner.forward(perturbed, progress=False, desc=self.name).features
            z = z.to("cpu", torch.float64)
            z_tilde = z_tilde.to("cpu", torch.float64)
            dim = z.shape[1]
            order = torch.argsort(z, dim=1, descending=True, stable=True)
            top_c = order[:, : _top_count(dim, p["k_c"])]
            top_q = order[:, : _top_count(dim, p["k_q"])]
            correction = z_tilde.clamp_min(0.0).gather(1, top_c).sum(dim=1)
            shift = (z - z_tilde).abs().gather(1, top_q).sum(dim=1)
            yield z, correction + p["lam"] * shift

    # ------------------------------------------------------------------ fit / score
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        p = self.params
        if isinstance(data, (torch.Tensor, np.ndarray)) and p["n_fit"] is not None and len(data) > p["n_fit"]:
            # Same rows as computing every Q' and keeping the subset, without running the model on the rest.
            keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(p["seed"]))[: p["n_fit"]]
            data = data[keep.numpy()] if isinstance(data, np.ndarray) else data[keep.to(data.device)]
            subsample_after = False
        else:
            subsample_after = p["n_fit"] is not None
        pieces = []
        dim = None
        for z, q in self._passes(runner, data, None):
            dim = z.shape[1]
            pieces.append(q)
        if not pieces or dim is None:
            raise ValueError(f"{self.name}: the fit data produced no rows")
        self._check_dim(dim)
        values = torch.cat(pieces)
        if subsample_after and len(values) > p["n_fit"]:
            values = values[
                torch.randperm(len(values), generator=torch.Generator().manual_seed(p["seed"]))[: p["n_fit"]]
            ]
        return {"fit_values": torch.sort(values).values, "feature_dim": torch.tensor(dim)}

    def percentiles(self, shifts: torch.Tensor) -> torch.Tensor:
        """``p(x) = p_min + (1 - F(Q')) (p_max - p_min)`` for given ``Q'`` values (float64)."""
        fit_values = self.state_["fit_values"]
        ecdf = torch.searchsorted(fit_values, shifts.to(torch.float64), right=True).to(torch.float64)
        ecdf = ecdf / fit_values.numel()
        p = self.params
        return p["p_min"] + (1.0 - ecdf) * (p["p_max"] - p["p_min"])

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        head = self._head(runner)
        weight = head.weight.detach().to("cpu", torch.float64)
        bias = (
            torch.zeros(weight.shape[0], dtype=torch.float64)
            if head.bias is None
            else head.bias.detach().to("cpu", torch.float64)
        )
        fitted_dim = int(self.state_["feature_dim"])
        scores = []
        for z, q in self._passes(runner, data, progress):
            dim = z.shape[1]
            if dim != fitted_dim:
                raise ValueError(
                    f"{self.name}: the features have {dim} units, the fit saw {fitted_dim}; attach the model the "
                    "detector was fitted with"
                )
            kept = dim - torch.round(dim * self.percentiles(q) / 100.0).to(torch.int64)
            a = z.clamp_min(0.0)
            top = torch.topk(a, int(kept.max()), dim=1).values
            top_sum = (top * (torch.arange(top.shape[1])[None, :] < kept[:, None])).sum(dim=1)
            total = a.sum(dim=1)
            ratio = torch.where(top_sum > 0, total / torch.where(top_sum > 0, top_sum, 1.0), 1.0)
            if self.params["variant"] == "A":
                worst = float(ratio.max())
                if worst > _MAX_LOG_SCALE:
                    raise ValueError(
                        f"{self.name}: the scale exp(r) overflows (r = {worst:.4g}); use variant 'L' or lower p_max"
                    )
                logits = (z @ weight.T) * torch.exp(ratio)[:, None] + bias
            else:
                logits = (z @ weight.T + bias) * ratio.square()[:, None]
            scores.append(-torch.logsumexp(logits, dim=1))
        if not scores:
            raise ValueError(f"{self.name}: data produced no rows")
        return torch.cat(scores)
