"""``rotation``: the OOD score of a classifier trained with an auxiliary rotation head (self-supervised OOD training).

Hendrycks, Mazeika, Kadavath & Song (NeurIPS 2019) train a 4-way rotation head beside the classifier
(``oodguard.train``'s ``rotation`` method) and score an input by how badly the head predicts its rotations and how
close the class prediction is to uniform. The score needs that head, so the detector runs the model itself (a model
detector) and refuses models without one (``oodguard.train.heads.RotationNet``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from oodguard.detectors.base import register
from oodguard.detectors.model.base import ModelDetector
from oodguard.extraction.batches import Batches
from oodguard.extraction.model_runner import ModelRunner
from oodguard.train.heads import rotations

__all__ = ["RotationScore", "rotation_score"]

_LOG2 = math.log(2.0)


def rotation_score(logits: torch.Tensor, rotation_logits: torch.Tensor) -> torch.Tensor:
    """The score of ``n`` images from the class logits of the upright images ``[n, K]`` and the rotation logits of
    all four rotations ``[4n, 4]`` (0 degrees for all first, then 90, 180, 270): in bits,
    ``mean_k CE(r(R_k x), k) - KL(U || softmax(f(x)))``; higher = more OOD. float64."""
    n = logits.shape[0]
    if rotation_logits.shape != (4 * n, 4):
        raise ValueError(f"rotation_logits: expected [{4 * n}, 4], got {tuple(rotation_logits.shape)}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    classes = logits.shape[1]
    # KL(U || p) = sum_k (1/K) (log(1/K) - log p_k)
    divergence = (-math.log(classes) - log_p.mean(dim=1)) / _LOG2
    targets = torch.arange(4, device=logits.device).repeat_interleave(n)
    rotation_loss = F.cross_entropy(rotation_logits.double(), targets, reduction="none").view(4, n).mean(dim=0)
    return rotation_loss / _LOG2 - divergence


@register
class RotationScore(ModelDetector):
    """Rotation loss minus the class prediction's divergence from uniform, for a model with a rotation head.

    Score: ``mean_k CE(r(R_k x), k) - KL(U || softmax(f(x)))`` in bits, ``R_k`` the rotation by ``90 k`` degrees,
    ``r`` the auxiliary rotation head, ``f`` the classifier (the official test script's score ``KL - rotation
    loss``, negated so that higher = more OOD). Needs square images and a model trained with
    ``oodguard.train.create_method("rotation")`` (a ``RotationNet``); four forward passes per input. No fit.

    Paper: Hendrycks, Mazeika, Kadavath & Song, "Using Self-Supervised Learning Can Improve Model Robustness and
    Uncertainty", NeurIPS 2019. Code: hendrycks/ss-ood ``multiclass_ood/test_auxiliary_ood.py`` (OpenOOD:
    ``rotpred_postprocessor.py``).
    """

    name = "rotation"
    summary = "rotation-head loss minus the class prediction's KL from uniform (needs a rotation-trained model)"
    paper = (
        "Hendrycks, Mazeika, Kadavath & Song, 'Using Self-Supervised Learning Can Improve Model Robustness and "
        "Uncertainty', NeurIPS 2019"
    )
    code = "https://github.com/hendrycks/ss-ood (multiclass_ood/test_auxiliary_ood.py)"
    needs_fit = False
    input_ndim = 4
    #: Runs only on models trained with its auxiliary head: benchmarks do not pick it by default.
    needs_auxiliary_head: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def _network(runner: ModelRunner) -> Any:
        model = runner.model
        if not callable(getattr(model, "logits_and_rotation", None)):
            raise ValueError(
                "rotation: the model has no rotation head; train it with oodguard.train's 'rotation' method "
                "(create_method('rotation')), which wraps it in a RotationNet"
            )
        return model

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        network = self._network(runner)
        scores = []
        with torch.no_grad():
            for x, _ in Batches(data, None, runner.batch_size):
                if x.shape[0] == 0:
                    continue
                x = x.to(runner.device, dtype=next(network.parameters()).dtype)
                turned, _ = rotations(x)  # refuses anything but square images
                logits, rotation_logits = network.logits_and_rotation(turned)
                scores.append(rotation_score(logits[: x.shape[0]], rotation_logits).cpu())
        if not scores:
            raise ValueError("rotation: got no inputs")
        return torch.cat(scores)
