"""Diagnostics of how a model behaves under distribution shift (measurements, not detectors).

:func:`ocs_curve` follows Kang, Setlur, Tomlin & Levine, "Deep Neural Networks Tend To Extrapolate Predictably"
(ICLR 2024): as inputs are corrupted more and more, a network's predictions tend to move towards the optimal
constant solution (OCS) of its training loss, for cross-entropy the marginal label distribution of the training set.
The curve is the mean ``KL(softmax(f(x)) || OCS)`` over ID inputs, per corruption and severity, computed on the
seeded ImageNet-C corruptions of :mod:`oodguard.views` (the views CoVer uses). Where it falls with severity, the
``ocs`` detector's premise holds for that model.

Examples
--------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
>>> curve = ocs_curve(model, torch.rand(8, 1, 4, 4), [0.5, 0.25, 0.25], corruptions=("contrast",))
>>> curve.severities, curve.distance.shape
((0, 1, 2, 3, 4, 5), (1, 6))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from oodguard.detectors.ocs import OCS, OCS_FLOOR, kl_to_ocs
from oodguard.extraction.model_runner import ModelRunner
from oodguard.views.corruptions import SEVERITIES, View

__all__ = ["OCSCurve", "PAPER_CORRUPTIONS", "ocs_curve"]

#: The corruptions of the paper's CIFAR-10-C figures (official ``CIFAR10/plot.ipynb``), each at severities 1-5.
PAPER_CORRUPTIONS = ("impulse_noise", "shot_noise", "defocus_blur", "motion_blur", "speckle_noise")


@dataclass(frozen=True)
class OCSCurve:
    """The result of :func:`ocs_curve`.

    Attributes
    ----------
    corruptions : the corruptions, one row of ``distance`` each.
    severities : the columns: 0 (the uncorrupted inputs, the same in every row), then the severities asked for.
    distance : float64 ``[len(corruptions), len(severities)]``, the mean over the inputs of ``KL(p || ocs)``.
    accuracy : the same shape, the share of inputs classified correctly; None when no labels were given.
    ocs : float64 ``[C]``, the optimal constant solution the distances are measured to.
    """

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    distance: np.ndarray
    accuracy: np.ndarray | None
    ocs: np.ndarray

    @property
    def mean_distance(self) -> np.ndarray:
        """The distance at each severity averaged over the corruptions, ``[len(severities)]``."""
        return self.distance.mean(axis=0)

    def plot(self, *, ax: Any = None, title: str | None = None) -> Any:
        """Draw the curves (:func:`oodguard.plot.ocs_curves`, needs matplotlib); returns the Axes."""
        from oodguard.plot import ocs_curves

        return ocs_curves(self, ax=ax, title=title)


def _log_ocs(ocs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ocs, log ocs)`` from a fitted ``ocs`` detector or a probability vector."""
    if isinstance(ocs, OCS):
        state = ocs.state(torch.device("cpu"), torch.float64)  # refuses an unfitted detector
        return state["ocs"], state["log_ocs"]
    try:
        probabilities = torch.as_tensor(np.asarray(ocs, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise ValueError(f"ocs: expected a probability vector or a fitted ocs detector ({error})") from error
    if probabilities.ndim != 1 or probabilities.numel() < 2:
        raise ValueError(f"ocs: expected a probability vector [C] with C >= 2, got shape {tuple(probabilities.shape)}")
    finite = bool(torch.isfinite(probabilities).all())
    if not finite or bool((probabilities < 0).any()) or abs(float(probabilities.sum()) - 1.0) > 1e-6:
        raise ValueError(
            "ocs: the optimal constant solution must be finite, non-negative and sum to 1 (got sum "
            f"{float(probabilities.sum()):.6g}); for cross-entropy it is the label distribution of the training set: "
            "oodguard.detectors.ocs.optimal_constant_solution(labels, num_classes)"
        )
    return probabilities, torch.log(probabilities.clamp_min(OCS_FLOOR))


def _views(
    corruptions: Sequence[str], severities: Sequence[int], seed: int, pixel_scale: float | None, **normalisation: Any
) -> list[View]:
    if isinstance(corruptions, str) or not corruptions or len(set(corruptions)) != len(corruptions):
        raise ValueError(f"corruptions: expected a non-empty list of distinct corruption names, got {corruptions!r}")
    if isinstance(severities, (str, int)) or not severities or len(set(severities)) != len(severities):
        raise ValueError(f"severities: expected a non-empty list of distinct severities 1-5, got {severities!r}")
    views = [View("identity", **normalisation)]
    for corruption in corruptions:
        for severity in severities:  # View validates the name and the severity
            views.append(View(f"{corruption}-{severity}", corruption, severity, seed, pixel_scale, **normalisation))
    return views


def ocs_curve(
    model: nn.Module | ModelRunner,
    images: Any,
    ocs: Any,
    *,
    labels: Any = None,
    corruptions: Sequence[str] = PAPER_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    pixel_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> OCSCurve:
    """Mean distance ``KL(softmax(f(x)) || OCS)`` of a model's predictions to the OCS, by corruption severity.

    Parameters
    ----------
    model : torch.nn.Module or ModelRunner
        The classifier (logits ``[B, C]``); a module runs on the CPU in batches of 128, a
        :class:`~oodguard.extraction.ModelRunner` with its own device, batch size and view cache.
    images : images ``[N, C, H, W]`` in [0, 1] (tensor, array, ``(images, labels)`` pair or Dataset), ID inputs.
    ocs : probability vector ``[C]`` or a fitted ``ocs`` detector
        The optimal constant solution; for cross-entropy the training label distribution
        (:func:`oodguard.detectors.ocs.optimal_constant_solution`).
    labels : ``[N]`` class labels, optional; when given the curve also holds the accuracy.
    corruptions : corruption names from :data:`oodguard.views.CORRUPTIONS`; default the paper's five.
    severities : severities 1-5 (default all).
    seed, pixel_scale, mean, std : as for :class:`oodguard.views.View` (``mean``/``std``: the normalisation the
        images went through, undone before corrupting).

    Returns
    -------
    OCSCurve
        ``distance[i, j]`` for corruption ``i`` at ``severities[j]`` (column 0: the clean inputs); each view is one
        forward pass over the images.
    """
    probabilities, log_ocs = _log_ocs(ocs)
    views = _views(corruptions, severities, seed, pixel_scale, mean=mean, std=std)
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
    distance: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for view, outputs in runner.forward_views(images, views, labels=labels):
        logits = outputs.logits
        if logits is None:
            raise ValueError("model: gave no logits; ocs_curve needs a classifier's logits [B, C]")
        if logits.shape[1] != probabilities.shape[0]:
            raise ValueError(
                f"ocs: has {probabilities.shape[0]} classes but the model gives C={logits.shape[1]} logits; give the "
                "OCS of this model's training labels"
            )
        distance[view.key] = float(kl_to_ocs(logits, log_ocs).mean())
        if outputs.labels is not None:
            accuracy[view.key] = float((logits.argmax(dim=1) == outputs.labels.to(logits.device)).double().mean())
    identity, rest = views[0].key, views[1:]
    columns = len(severities) + 1

    def table(values: dict[str, float]) -> np.ndarray:
        rows = np.empty((len(corruptions), columns))
        rows[:, 0] = values[identity]
        rows[:, 1:] = np.array([values[view.key] for view in rest]).reshape(len(corruptions), columns - 1)
        return rows

    return OCSCurve(
        corruptions=tuple(corruptions),
        severities=(0, *(int(s) for s in severities)),
        distance=table(distance),
        accuracy=table(accuracy) if accuracy else None,
        ocs=probabilities.numpy(),
    )
