"""Detectors that run the model themselves: input perturbations and gradients through the network.

Design
------
Most detectors score cached :class:`~oodguard.outputs.ModelOutputs`. The detectors here need the model (a
gradient with respect to the input, or to a layer, for each scored sample), so they are
:class:`ModelDetector` subclasses, declared by the class attribute ``needs_model = True`` (and
``requires = {"model"}``):

* they are created like any detector, then given a :class:`~oodguard.extraction.ModelRunner`, the one object
  that runs the model with autograd (device, batch size, input normalisation, final linear layer)::

      runner = ModelRunner(model, input_std=(0.247, 0.243, 0.261), device="cuda")
      det = create("odin", temperature=1000, epsilon=0.0014).attach(runner)
      det.fit(id_inputs)            # a no-op for detectors without fitted state
      scores = det.score(test_inputs)  # higher = more OOD

* ``fit`` and ``score`` take model **inputs** (tensor or numpy array ``[N, ...]``, ``Dataset``, ``DataLoader``,
  iterable of batches; labels inside the batches or as ``labels=`` where a detector needs them) instead of
  ModelOutputs. Numpy inputs give numpy scores, anything else torch scores (float64, on the CPU);
* scoring before :meth:`ModelDetector.attach` raises a ``RuntimeError`` that says to attach a runner;
* ``save``/``load`` work as for every detector (parameters and fitted state, safetensors + JSON). The runner,
  i.e. the model, is **not** saved: attach it again after ``load``;
* everything that does not need the model's gradients should still come from cached outputs (e.g. ``gradnorm``
  in closed form on cached features); ``gradnorm`` with ``mode="autograd"`` exists for models where the closed
  form does not apply and as a check of it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from oodguard.detectors.base import Detector, NotFittedError, register
from oodguard.detectors.logits import neg_log_odds_msp
from oodguard.extraction.model_runner import FEATURES, ModelRunner

__all__ = ["ModelDetector", "ODIN", "GradNormAutograd", "odin_loss", "uniform_kl_loss"]


def _positive(name: str, params: dict[str, Any], key: str) -> None:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {key} must be a finite number > 0, got {value!r}")
    params[key] = float(value)


class ModelDetector(Detector):
    """Base of detectors that need the model: ``fit``/``score`` take inputs and use an attached runner.

    Subclasses implement ``_score_model(runner, data, labels, progress) -> float tensor [N]`` and, when
    ``needs_fit``, ``_fit_model(runner, data, labels) -> dict of state tensors``.
    """

    needs_model: ClassVar[bool] = True
    requires = frozenset({"model"})
    fit_requires = frozenset({"model"})
    #: Dimensions of the inputs with the batch axis (4 for images ``[N, C, H, W]``), or None for any inputs.
    input_ndim: ClassVar[int | None] = None

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.runner_: ModelRunner | None = None

    # ------------------------------------------------------------------ runner
    def attach(self, runner: ModelRunner | nn.Module, **runner_options: Any) -> ModelDetector:
        """Give the detector a :class:`ModelRunner` (or a model, wrapped with ``runner_options``); returns self."""
        if isinstance(runner, nn.Module):
            runner = ModelRunner(runner, **runner_options)
        elif runner_options:
            raise ValueError(f"{self.name}: runner options {sorted(runner_options)} apply only when attaching a model")
        if not isinstance(runner, ModelRunner):
            raise TypeError(
                f"{self.name}: attach expects a ModelRunner or a torch.nn.Module, got {type(runner).__name__}"
            )
        self.runner_ = runner
        return self

    @property
    def runner(self) -> ModelRunner:
        if self.runner_ is None:
            raise RuntimeError(
                f"{self.name}: no model attached; this detector runs the model, so call "
                f".attach(ModelRunner(model, ...)) first (a loaded detector must be attached again)"
            )
        return self.runner_

    # ------------------------------------------------------------------ hooks
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _fit_model")

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _score_model")

    # ------------------------------------------------------------------ public API
    def fit(self, data: Any = None, *, labels: Any = None, drop_ood: bool = False) -> ModelDetector:  # type: ignore[override]
        """Fit on in-distribution inputs (a no-op for detectors without fitted state) and return ``self``."""
        if not self.needs_fit:
            self.state_ = {}
            return self
        if data is None:
            raise ValueError(f"{self.name}: fit needs in-distribution inputs (data=)")
        self.stats_ = None
        self.state_ = self._fit_model(self.runner, data, labels)
        return self

    def score(self, data: Any, *, labels: Any = None, progress: bool | None = None) -> np.ndarray | torch.Tensor:  # type: ignore[override]
        """OOD scores ``[N]`` of the inputs ``data``, higher = more likely OOD."""
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit(...) on in-distribution inputs before score(...)")
        runner = self.runner
        scores = self._score_model(runner, data, labels, progress).to("cpu", torch.float64)
        if not bool(torch.isfinite(scores).all()):
            bad = int((~torch.isfinite(scores)).sum())
            raise FloatingPointError(
                f"{self.name}: produced {bad} non-finite score(s); the inputs are outside what this detector can handle"
            )
        return scores.numpy() if isinstance(data, np.ndarray) else scores

    __call__ = score

    def partial_fit(self, *args: Any, **kwargs: Any) -> Detector:
        raise TypeError(f"{self.name}: partial_fit is not available for detectors that run the model; use fit")

    def merge(self, other: Detector) -> Detector:
        raise TypeError(f"{self.name}: merge is not available for detectors that run the model")


# ---------------------------------------------------------------------- losses
def odin_loss(temperature: float):
    """ODIN's per-sample loss: ``CE(f / T, argmax f) = LSE(f / T) - f_ŷ / T`` (argmax of the unscaled logits)."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        predicted = logits.detach().argmax(dim=1, keepdim=True)
        scaled = logits / temperature
        return torch.logsumexp(scaled, dim=1) - scaled.gather(1, predicted).squeeze(1)

    return loss


def uniform_kl_loss(temperature: float):
    """GradNorm's per-sample loss: ``sum_c -log softmax(f / T)_c`` (cross-entropy to an all-ones target)."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(logits / temperature, dim=1).sum(dim=1)

    return loss


# ---------------------------------------------------------------------- ODIN
@register
class ODIN(ModelDetector):
    """ODIN: temperature scaling plus an input perturbation that raises the predicted class's softmax score.

    Per sample (``x`` as given to the model, i.e. after the data normalisation):
    ``ŷ = argmax f(x)``; ``L = -log softmax(f(x) / T)_ŷ``; ``g = dL/dx``;
    ``x~ = x - ε · sign(g) / std_ch`` with ``sign(0) := +1`` (no clamping); ``s(x) = max_c softmax(f(x~) / T)_c``.
    The OOD score is the log-odds ``log((1 - s) / s) = LSE_{c≠ĉ}(f~/T) - max(f~/T)`` computed in float64, a
    strictly decreasing transform of ``s`` (higher = more OOD): with ``T = 1000`` the softmax is nearly uniform
    and ``s`` differs between samples only in the 6th decimal, which float32 probabilities would lose.

    ``std_ch`` is the runner's ``input_std`` (the std of the data normalisation, per channel), so ``ε`` is a step
    in raw pixel units as in the official code; with ``input_std=None`` (raw inputs, or a model that normalises
    inside) the divisor is 1. ``scale_by_std=False`` gives the variant of the MOS/GradNorm/ReAct baselines
    (no division); ``epsilon=0`` is temperature scaling alone (one forward pass, no gradient).
    Cost: 2 forward passes and 1 backward pass to the input per batch; no fitted state.

    Defaults ``temperature=1000, epsilon=0.0014`` (official ``main.py``, DenseNet-BC on CIFAR-10; the paper tunes
    both per OOD set on held-out data).

    Paper: Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018. Official code: facebookresearch/odin ``code/calData.py`` (``testData``, 64e9796);
    OpenOOD ``odin_postprocessor.py`` matches it.

    Deviations: the loss gradient is of the per-sample loss summed over the batch (the official code averages
    over the batch; only the sign is used, so the step is identical); the score is the log-odds instead of the
    probability (same ranking).
    """

    name = "odin"
    summary = "max softmax at temperature T after a gradient-sign input perturbation (as log-odds)"
    paper = "Liang, Li & Srikant, Enhancing The Reliability of Out-of-distribution Image Detection, ICLR 2018"
    code = "https://github.com/facebookresearch/odin (code/calData.py)"
    defaults: dict[str, Any] = {"temperature": 1000.0, "epsilon": 0.0014, "scale_by_std": True}
    needs_fit = False

    def _check_params(self) -> None:
        _positive(self.name, self.params, "temperature")
        epsilon = self.params["epsilon"]
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
            raise ValueError(f"{self.name}: epsilon must be a finite number >= 0, got {epsilon!r}")
        if epsilon < 0:
            raise ValueError(
                f"{self.name}: epsilon must be >= 0 (the step moves towards the predicted class), got {epsilon!r}"
            )
        self.params["epsilon"] = float(epsilon)
        if not isinstance(self.params["scale_by_std"], bool):
            raise ValueError(f"{self.name}: scale_by_std must be True or False, got {self.params['scale_by_std']!r}")

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        t = self.params["temperature"]
        epsilon = self.params["epsilon"]
        if epsilon == 0.0:
            logits = runner.forward(data, progress=progress, desc="odin").logits
        else:
            loss = odin_loss(t)
            logits = runner.perturbed_forward(
                data, loss, epsilon, self.params["scale_by_std"], progress=progress
            ).logits
        return neg_log_odds_msp(logits.to(torch.float64), t)


# ---------------------------------------------------------------------- GradNorm through the model
class GradNormAutograd(ModelDetector):
    """GradNorm with the true gradient through the model: ``-||dL/dW||_1`` of the final linear layer's weight.

    ``L = sum_c -log softmax(f / T)_c`` on the model's output ``f``. One forward pass with autograd and one
    ``torch.autograd.grad`` per batch give ``G = dL/dy`` at the final linear layer's output ``y`` (hooks; the
    parameters' ``.grad`` are untouched); with its input ``z`` (the features), the per-sample weight gradient is
    ``dL/dW = G^T z`` (an outer product ``g z^T`` for ``[B, D]`` features, whose L1 norm is
    ``||g||_1 · ||z||_1``; summed over positions for a head applied to ``[B, ..., D]``). The OOD score is
    ``-||dL/dW||_1`` (higher = more OOD).

    When the logits are the head's output (the usual case), this equals the closed form of the ``gradnorm``
    detector ``(1/T)(sum_d |z_d|)(sum_c |C p_c - 1|)``, which needs only cached features: prefer ``gradnorm``
    then. This detector is exact also when the model transforms the head's output (scaling, a head applied per
    token, ...). No fitted state. Created as ``create("gradnorm", mode="autograd")``: it shares the registry name
    ``gradnorm``, and saved detectors load back as this class from that parameter.

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
    NeurIPS 2021. Official code: deeplearning-wisc/gradnorm_ood ``test_ood.py`` (``iterate_data_gradnorm``,
    18d5d33), batch size 1 and ``loss.backward()``; here per-sample gradients come from one batch (exact in eval
    mode, see :mod:`oodguard.extraction.model_runner`). Default ``temperature=1`` (official).
    """

    name = "gradnorm"
    summary = "L1 norm of the final linear layer's weight gradient of the KL to uniform, by autograd through the model"
    paper = (
        "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, NeurIPS 2021"
    )
    code = "https://github.com/deeplearning-wisc/gradnorm_ood (test_ood.py)"
    defaults: dict[str, Any] = {"temperature": 1.0, "mode": "autograd"}
    needs_fit = False

    def _check_params(self) -> None:
        _positive(self.name, self.params, "temperature")
        if self.params["mode"] != "autograd":
            raise ValueError(
                f"{self.name}: this class implements mode='autograd'; create other modes with "
                f"detectors.create('gradnorm', mode=...), got {self.params['mode']!r}"
            )

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        if runner.head is None:
            raise ValueError(
                f"{self.name}: the model's final linear layer was not found; create the ModelRunner with "
                "feature_layer= naming it"
            )
        head_name = runner.head[0]
        if head_name == "":
            raise ValueError(
                f"{self.name}: the model is a bare nn.Linear, so its features are its inputs; use the closed-form "
                "'gradnorm' detector on them"
            )
        loss = uniform_kl_loss(self.params["temperature"])
        pieces = []
        batches = runner.gradient_batches(
            data,
            lambda logits, acts: loss(logits),
            layers=[FEATURES, head_name],
            wrt_input=False,
            progress=progress,
            desc=self.name,
        )
        for batch in batches:
            z = batch.activations[FEATURES]
            g = batch.gradients[head_name]
            if z.ndim == 2:
                norm = torch.linalg.vector_norm(g, ord=1, dim=1) * torch.linalg.vector_norm(z, ord=1, dim=1)
            else:  # head applied per position: dL/dW = sum over positions of g_t z_t^T
                weight_grad = torch.einsum("b...c,b...d->bcd", g, z)
                norm = weight_grad.abs().flatten(1).sum(dim=1)
            pieces.append(-norm.to("cpu", torch.float64))
        if not pieces:
            raise ValueError(f"{self.name}: data produced no rows")
        return torch.cat(pieces)
