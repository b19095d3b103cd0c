"""Monte-Carlo dropout: the uncertainty of the softmax averaged over stochastic forward passes with dropout on."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from oodguard.detectors.base import register
from oodguard.detectors.logits import neg_log_odds_msp
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Integral, Interval, Options
from oodguard.extraction.model_runner import ModelRunner

__all__ = ["MCDropout", "dropout_layers", "mc_dropout_scores"]

_UNCERTAINTIES = ("msp", "entropy", "variance")


def dropout_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``)."""
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.modules.dropout._DropoutNd)
    ]


def mc_dropout_scores(log_probs: torch.Tensor, uncertainty: str) -> torch.Tensor:
    """OOD scores ``[B]`` from the log-softmax of ``T`` stochastic passes ``[T, B, C]`` (float64).

    ``log p̄ = LSE_t(log p_t) - log T`` is the log of the averaged softmax. ``"msp"``: ``log((1 - max p̄) / max p̄)``,
    a strictly decreasing transform of the averaged softmax's maximum; ``"entropy"``: ``-Σ_c p̄_c log p̄_c``;
    ``"variance"``: the mean over classes of the unbiased variance of ``p_t,c`` over the passes (``T >= 2``).
    """
    passes = log_probs.shape[0]
    if uncertainty == "variance":
        return log_probs.exp().var(dim=0).mean(dim=1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(passes)
    if uncertainty == "entropy":
        return -(log_mean.exp() * log_mean).nan_to_num(0.0).sum(dim=1)  # 0 log 0 = 0
    return neg_log_odds_msp(log_mean)


@register
class MCDropout(ModelDetector):
    """Monte-Carlo dropout: ``T`` forward passes with the dropout layers on, scored by the averaged softmax.

    Per input ``x``: ``p_t = softmax(f_t(x))`` for ``t = 1..T`` passes with every dropout module in training mode
    (random masks) and every other module in eval mode (BatchNorm keeps its running statistics); ``p̄ = (1/T) Σ_t p_t``.

    Parameters
    ----------
    samples : int >= 1, default 30
        ``T``, the number of stochastic forward passes (pytorch-ood's default).
    uncertainty : {"msp", "entropy", "variance"}, default "msp"
        ``"msp"``: ``-max_c p̄_c`` as in pytorch-ood's ``mean`` mode, returned as the log-odds
        ``log((1 - max p̄) / max p̄)`` (strictly increasing in ``-max p̄``, never saturating); ``"entropy"``: the
        predictive entropy ``-Σ_c p̄_c log p̄_c`` (Gal's thesis, §3.3.1); ``"variance"``: pytorch-ood's ``var`` mode,
        the mean over classes of the per-class variance of ``p_t`` over the passes (needs ``samples >= 2``).
        Higher = more OOD for all three.
    seed : int >= 0, default 0
        Seeds the dropout masks: each ``score`` call draws them from ``torch.manual_seed(seed)`` in a forked RNG (the
        caller's global RNG is left as it was), so a score depends on the seed, the batch size and the order of the
        inputs (a mask is drawn per batch), never on earlier calls.

    The model must contain dropout modules, and must have been trained with them (this is what makes the passes
    samples of an approximate posterior); dropout written as ``F.dropout(x, training=self.training)`` inside a
    ``forward`` is not switched on. No fitted state. Cost: ``T`` forward passes.

    Deviations from the official code: docs/detectors.md, section ``mcdropout``.

    Paper: Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning",
    ICML 2016. Code: pytorch-ood ``src/pytorch_ood/detector/mcd.py`` (``MCD``, d047673).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    >>> det = MCDropout(samples=8).attach(model)
    >>> det.score(torch.randn(5, 4)).shape
    torch.Size([5])
    """

    name = "mcdropout"
    summary = "uncertainty of the softmax averaged over T forward passes with the dropout layers on"
    paper = (
        "Gal & Ghahramani, Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning, "
        "ICML 2016"
    )
    code = "https://github.com/kkirchheim/pytorch-ood (src/pytorch_ood/detector/mcd.py)"
    needs_fit = False
    _parameter_constraints = {
        "samples": [Interval(Integral, 1, None, closed="left")],
        "uncertainty": [Options(_UNCERTAINTIES)],
        "seed": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, *, samples: int = 30, uncertainty: str = "msp", seed: int = 0) -> None:
        self.samples = samples
        self.uncertainty = uncertainty
        self.seed = seed
        super().__init__()

    def _check_param_combination(self) -> None:
        if self.uncertainty == "variance" and int(self.samples) < 2:
            raise self._param_error(
                "samples", "at least 2 with uncertainty='variance' (a variance over one pass is undefined)"
            )

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        if not isinstance(model, nn.Module):
            return None  # not inspectable here: scoring says what is wrong
        layers = dropout_layers(model)
        if not layers:
            return (
                "the model has no dropout layers (torch.nn.Dropout, Dropout1d/2d/3d, AlphaDropout, "
                "FeatureAlphaDropout), so its forward passes are not stochastic; MC dropout needs a model trained "
                "with dropout modules (dropout called as F.dropout inside forward cannot be switched on)"
            )
        if not any(float(getattr(module, "p", 0.0)) > 0.0 for _, module in layers):
            return (
                f"every dropout layer of the model has p = 0 ({', '.join(n for n, _ in layers)}), so its forward "
                "passes are not stochastic; MC dropout needs a model trained with dropout p > 0"
            )
        return None

    def _dropouts(self, model: nn.Module) -> list[nn.Module]:
        why = self.unsupported(model)
        if why is not None:
            raise ValueError(f"{self.name}: {why}")
        return [module for _, module in dropout_layers(model) if float(getattr(module, "p", 0.0)) > 0.0]

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        dropouts = self._dropouts(runner.model)
        passes = int(self.samples)
        pieces = []
        devices = [runner.device] if runner.device.type == "cuda" else []
        with runner.eval_mode(train=dropouts), torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.seed))
            for x, _ in runner.batches(data, progress=progress, desc=self.name):
                log_probs = torch.stack(
                    [torch.log_softmax(runner.logits(x).to(torch.float64), dim=1) for _ in range(passes)]
                )
                pieces.append(mc_dropout_scores(log_probs, self.uncertainty).to("cpu"))
        if not pieces:
            raise ValueError(f"{self.name}: data produced no rows")
        return torch.cat(pieces)
