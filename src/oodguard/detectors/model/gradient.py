"""Model detectors on input perturbations and gradients through the network: ODIN and GradNorm by autograd."""

from __future__ import annotations

from typing import Any

import torch

from oodguard.detectors.base import register
from oodguard.detectors.logits import neg_log_odds_msp
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Boolean, Interval, Real
from oodguard.extraction.model_runner import FEATURES, ModelRunner

__all__ = ["ODIN", "GradNormAutograd", "odin_loss", "uniform_kl_loss"]


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

    Deviations from the official code: docs/detectors.md, section ``odin``.

    Paper: Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018. Official code: facebookresearch/odin ``code/calData.py`` (``testData``, 64e9796);
    OpenOOD ``odin_postprocessor.py`` matches it.
    """

    name = "odin"
    summary = "max softmax at temperature T after a gradient-sign input perturbation (as log-odds)"
    paper = "Liang, Li & Srikant, Enhancing The Reliability of Out-of-distribution Image Detection, ICLR 2018"
    code = "https://github.com/facebookresearch/odin (code/calData.py)"
    needs_fit = False
    _parameter_constraints = {
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "scale_by_std": [Boolean()],
    }

    def __init__(self, *, temperature: float = 1000.0, epsilon: float = 0.0014, scale_by_std: bool = True) -> None:
        self.temperature = temperature
        self.epsilon = epsilon
        self.scale_by_std = scale_by_std
        super().__init__()

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        t = float(self.temperature)
        epsilon = float(self.epsilon)
        if epsilon == 0.0:
            logits = runner.forward(data, progress=progress, desc="odin").logits
        else:
            loss = odin_loss(t)
            logits = runner.perturbed_forward(data, loss, epsilon, bool(self.scale_by_std), progress=progress).logits
        return neg_log_odds_msp(logits.to(torch.float64), t)


# ---------------------------------------------------------------------- GradNorm through the model
@register
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
    token, ...). No fitted state. Registered as ``gradnorm_autograd`` (``create("gradnorm", mode="autograd")`` of
    earlier releases still works, with a deprecation warning, and saved detectors of that spelling load as this class).

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
    NeurIPS 2021. Official code: deeplearning-wisc/gradnorm_ood ``test_ood.py`` (``iterate_data_gradnorm``,
    18d5d33), batch size 1 and ``loss.backward()``; here per-sample gradients come from one batch (exact in eval
    mode, see :mod:`oodguard.extraction.model_runner`). Default ``temperature=1`` (official).
    """

    name = "gradnorm_autograd"
    summary = "L1 norm of the final linear layer's weight gradient of the KL to uniform, by autograd through the model"
    paper = (
        "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, NeurIPS 2021"
    )
    code = "https://github.com/deeplearning-wisc/gradnorm_ood (test_ood.py)"
    needs_fit = False
    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, *, temperature: float = 1.0) -> None:
        self.temperature = temperature
        super().__init__()

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
        loss = uniform_kl_loss(float(self.temperature))
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
