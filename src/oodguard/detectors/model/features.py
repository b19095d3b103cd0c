"""Model-based detectors on feature statistics: the multi-layer Mahalanobis ensemble and AdaSCALE.

Both run the model themselves (:class:`~oodguard.detectors.model.base.ModelDetector`): the Mahalanobis ensemble
perturbs each input once per layer against the gradient of its Mahalanobis distance (Lee et al., 2018), and
AdaSCALE perturbs the least-sensitive input elements to estimate how OOD a sample looks before scaling its
features (Regmi, 2025). Data are read once, batch by batch, so one-shot iterables work and activations are
reduced per batch (the fit never holds ``[N, C, H, W]`` activations).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oodguard.detectors.base import register
from oodguard.detectors.distance import ClassStatistics, pinv_sqrt, short_classes_message
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import ArrayLike, Boolean, Integral, Interval, Options, Real, SequenceOf, Text
from oodguard.extraction.batches import Batches as _Batches
from oodguard.extraction.model_runner import FEATURES, ModelRunner
from oodguard.extraction.modules import get_module as _get_module

__all__ = ["MahalanobisEnsemble", "AdaSCALE", "fit_ensemble_weights", "spatial_mean"]

#: exp overflows float64 above ~709.78 (AdaSCALE-A scales the features by exp(r)).
_MAX_LOG_SCALE = 700.0


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

    Per layer: class means and a tied covariance of the spatially averaged activations; at score time each
    input is moved a step ``epsilon`` against the gradient of its Mahalanobis distance, and the OOD score is
    ``-sum_l w_l max_c -1/2 M_{l,c}(x~)``. Fit needs the true class labels of in-distribution inputs.

    Parameters
    ----------
    layers : list of str, optional
        Module names (as in ``model.named_modules()``) and/or :data:`~oodguard.extraction.FEATURES` (the input
        of the final linear layer), each once. None (default) means ``[FEATURES]``: single-layer Mahalanobis
        with input pre-processing.
    epsilon : float >= 0, default 0
        Step in raw-pixel units (divided by the runner's ``input_std``); 0 means no pre-processing.
    weights : list of float, optional
        One weight per layer, not all zero; None (default) means equal weights ``1/L``. The official weights come
        from OOD validation data: see :func:`fit_ensemble_weights`.
    scale_by_std : bool, default True
        Divide the step by the runner's ``input_std``.

    Paper: Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018. Official code: pokaxpoka/deep_Mahalanobis_detector
    (``lib_generation.py``: ``sample_estimator``, ``get_Mahalanobis_score``; ``OOD_Regression_Mahalanobis.py``;
    90c2105).
    """

    name = "mahalanobis_ensemble"
    summary = "weighted sum over layers of the Mahalanobis confidence after per-layer input pre-processing"
    paper = (
        "Lee, Lee, Lee & Shin, 'A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks', NeurIPS 2018"
    )
    code = "https://github.com/pokaxpoka/deep_Mahalanobis_detector (lib_generation.py, OOD_Regression_Mahalanobis.py)"
    _parameter_constraints = {
        "layers": [None, SequenceOf(Text())],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "weights": [None, SequenceOf(Interval(Real, None, None)), ArrayLike(ndim=1)],
        "scale_by_std": [Boolean()],
    }

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        epsilon: float = 0.0,
        weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        scale_by_std: bool = True,
    ) -> None:
        self.layers = layers
        self.epsilon = epsilon
        self.weights = weights
        self.scale_by_std = scale_by_std
        super().__init__()

    # ------------------------------------------------------------------ parameters
    def _check_param_combination(self) -> None:
        layers = self.layer_names
        duplicates = sorted({name for name in layers if layers.count(name) > 1})
        if duplicates:
            raise self._param_error("layers", f"a list naming each layer once ({duplicates} given more than once)")
        if self.weights is None:
            return
        weights = [float(w) for w in self.weights]
        if len(weights) != len(layers):
            raise self._param_error(
                "weights", f"None (equal weights) or one weight per layer ({len(weights)} for {len(layers)} layer(s))"
            )
        if not all(np.isfinite(weights)):
            raise self._param_error("weights", "finite numbers")
        if not any(weights):
            raise self._param_error("weights", "None or weights not all zero (at least one layer must count)")

    @property
    def layer_names(self) -> list[str]:
        """The layers used: ``layers``, or ``[FEATURES]`` when it is None."""
        return [FEATURES] if self.layers is None else list(self.layers)

    @property
    def layer_weights(self) -> list[float]:
        """The weight of each layer (equal weights ``1/L`` when ``weights`` is None)."""
        count = len(self.layer_names)
        return [1.0 / count] * count if self.weights is None else [float(w) for w in self.weights]

    def _check_layers(self, runner: ModelRunner) -> None:
        for name in self.layer_names:
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
        layers = self.layer_names
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
        message = short_classes_message(self.name, counts, 2, "fit samples")
        if message is not None:
            raise ValueError(message)
        state: dict[str, torch.Tensor] = {"counts": counts}
        for index in range(len(layers)):
            means, mean, within = ClassStatistics._means(
                ClassStatistics.upgrade_statistics({"counts": counts, "sums": sums[index], "outer": outer[index]})
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
                f"{self.name}: layer {self.layer_names[index]!r} gives {a.shape[1]} channels, the fit saw "
                f"{mean.shape[0]}; attach the model the detector was fitted with"
            )
        y = (a - mean) @ proj
        return (y[:, None, :] - centers[None]).square().sum(dim=2)

    def _loss(self, index: int):
        name = self.layer_names[index]

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
        layers = self.layer_names
        modules = [name for name in layers if name != FEATURES]
        epsilon = float(self.epsilon)
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
                        bool(self.scale_by_std),
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
        a plain L2-regularised logistic regression (``C = 1``, no cross-validation) by Newton steps, for
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
        from oodguard.logistic import fit_logistic

        weights = fit_logistic(x.double().numpy(), t.double().numpy())[0]
    if not np.all(np.isfinite(weights)) or not np.any(weights):
        raise ValueError(
            "the logistic regression gave no usable weights (all zero or non-finite); the ID and OOD validation "
            "sets may be indistinguishable by these layers"
        )
    if assign:
        detector.set_params(weights=[float(w) for w in weights])
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

    Per sample, the least gradient-sensitive input elements are moved by ``epsilon``; the shift of the top
    penultimate units (``Q'``), ranked against its values on the fit inputs, sets the percentile
    ``p(x) in [p_min, p_max]`` of SCALE's feature (A) or logit (L) scaling; the OOD score is the negative energy
    of the scaled logits. Needs a head applied to ``[B, D]`` features.

    Parameters
    ----------
    variant : "A" or "L", default "A"
        Scale the features (A) or the logits (L).
    p_min, p_max : float in (0, 100), default 75, 85
        Range of the per-sample percentile, ``p_min <= p_max`` (official ``configs/postprocessors/adascale_*.yml``).
    lam : float >= 0, default 10
        Weight of the feature-shift term (official ``lmbda``).
    o : float in (0, 1], default 0.05
        Fraction of input elements perturbed.
    epsilon : float > 0, default 0.5
        Perturbation, in units of the model's inputs.
    k_q, k_c : float in (0, 100], default 1 and 5
        Percent of units for the shift ``Q`` and the correction ``C_o``.
    n_fit : int >= 1 or None, default 5000
        Fit inputs drawn (seeded) for the ECDF of ``Q'``; None uses every row.
    seed : int, default 0
        Seed of that draw.

    Paper: Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", 2025. Official code: sudarshanregmi/AdaSCALE
    ``openood/postprocessors/adascale_postprocessor.py`` and ``openood/networks/adascale_net.py``.
    """

    name = "adascale"
    summary = "SCALE with a per-sample percentile from the feature shift under a small input perturbation"
    paper = "Regmi, AdaSCALE: Adaptive Scaling for OOD Detection, 2025"
    code = "https://github.com/sudarshanregmi/AdaSCALE (openood/postprocessors/adascale_postprocessor.py)"
    _parameter_constraints = {
        "variant": [Options(("A", "L"))],
        "p_min": [Interval(Real, 0, 100, closed="neither")],
        "p_max": [Interval(Real, 0, 100, closed="neither")],
        "lam": [Interval(Real, 0, None, closed="left")],
        "o": [Interval(Real, 0, 1, closed="right")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "k_q": [Interval(Real, 0, 100, closed="right")],
        "k_c": [Interval(Real, 0, 100, closed="right")],
        "n_fit": [None, Interval(Integral, 1, None, closed="left")],
        "seed": [Interval(Integral, None, None)],
    }

    def __init__(
        self,
        *,
        variant: str = "A",
        p_min: float = 75.0,
        p_max: float = 85.0,
        lam: float = 10.0,
        o: float = 0.05,
        epsilon: float = 0.5,
        k_q: float = 1.0,
        k_c: float = 5.0,
        n_fit: int | None = 5000,
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
        if self.p_min > self.p_max:
            raise self._param_error("p_min", f"<= p_max ({self.p_max})")

    # ------------------------------------------------------------------ shared pass
    def _check_dim(self, dim: int) -> None:
        kept = dim - round(dim * float(self.p_max) / 100.0)
        if kept < 1:
            raise ValueError(
                f"{self.name}: p_max {float(self.p_max):g} keeps k = {kept} of D = {dim} feature units; lower "
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
        fraction, epsilon, lam = float(self.o), float(self.epsilon), float(self.lam)
        k_c, k_q = float(self.k_c), float(self.k_q)
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
            count = int(flat.shape[1] * fraction)
            mask = torch.zeros_like(flat)
            if count:
                mask.scatter_(1, torch.topk(flat, count, dim=1, largest=False).indices, 1.0)
            perturbed = x + epsilon * torch.sign(g) * mask.view_as(g)
            z_tilde = runner.forward(perturbed, progress=False, desc=self.name).features
            z = z.to("cpu", torch.float64)
            z_tilde = z_tilde.to("cpu", torch.float64)
            dim = z.shape[1]
            order = torch.argsort(z, dim=1, descending=True, stable=True)
            top_c = order[:, : _top_count(dim, k_c)]
            top_q = order[:, : _top_count(dim, k_q)]
            correction = z_tilde.clamp_min(0.0).gather(1, top_c).sum(dim=1)
            shift = (z - z_tilde).abs().gather(1, top_q).sum(dim=1)
            yield z, correction + lam * shift

    # ------------------------------------------------------------------ fit / score
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        n_fit = None if self.n_fit is None else int(self.n_fit)
        seed = int(self.seed)
        if isinstance(data, (torch.Tensor, np.ndarray)) and n_fit is not None and len(data) > n_fit:
            # Same rows as computing every Q' and keeping the subset, without running the model on the rest.
            keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_fit]
            data = data[keep.numpy()] if isinstance(data, np.ndarray) else data[keep.to(data.device)]
            subsample_after = False
        else:
            subsample_after = n_fit is not None
        pieces = []
        dim = None
        for z, q in self._passes(runner, data, None):
            dim = z.shape[1]
            pieces.append(q)
        if not pieces or dim is None:
            raise ValueError(f"{self.name}: the fit data produced no rows")
        self._check_dim(dim)
        values = torch.cat(pieces)
        if subsample_after and len(values) > n_fit:
            values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))[:n_fit]]
        return {"fit_values": torch.sort(values).values, "feature_dim": torch.tensor(dim)}

    def percentiles(self, shifts: torch.Tensor) -> torch.Tensor:
        """``p(x) = p_min + (1 - F(Q')) (p_max - p_min)`` for given ``Q'`` values (float64)."""
        fit_values = self.state_["fit_values"]
        ecdf = torch.searchsorted(fit_values, shifts.to(torch.float64), right=True).to(torch.float64)
        ecdf = ecdf / fit_values.numel()
        p_min, p_max = float(self.p_min), float(self.p_max)
        return p_min + (1.0 - ecdf) * (p_max - p_min)

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
            if self.variant == "A":
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
