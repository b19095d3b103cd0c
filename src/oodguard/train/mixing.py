"""MixOE's mixing of ID images with outliers: mixup, and cutmix with the outlier patch pasted into the ID image."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from oodguard.train.losses import check_mixing_share

MIX_OPS = ("mixup", "cutmix")


def sample_lambda(alpha: float, beta: float, generator: torch.Generator | None = None) -> float:
    """One mixing coefficient ``lam ~ Beta(alpha, beta)`` per batch (official: ``Beta(alpha, alpha)``)."""
    # torch.distributions.Beta has no generator argument: seed numpy's Beta from the torch generator instead.
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) and v > 0 for v in (alpha, beta)):
        raise ValueError(f"mix_alpha and mix_beta must be > 0, got {alpha} and {beta}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, beta))


def rand_bbox(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """CutMix's box for mixing coefficient ``lam``: side ``int(size * sqrt(1 - lam))`` around a uniform centre,
    clipped to the image, as ``(top, left, bottom, right)`` (the official ``rand_bbox``, which names the
    first spatial axis W)."""
    check_mixing_share(lam)
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre = (
        int(torch.randint(0, height, (1,), generator=generator).item()),
        int(torch.randint(0, width, (1,), generator=generator).item()),
    )
    top = min(max(centre[0] - cut_h // 2, 0), height)
    bottom = min(max(centre[0] + cut_h // 2, 0), height)
    left = min(max(centre[1] - cut_w // 2, 0), width)
    right = min(max(centre[1] + cut_w // 2, 0), width)
    return top, left, bottom, right


def mix_outliers(
    inputs: torch.Tensor,
    outliers: torch.Tensor,
    mix_op: str,
    lam: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """Mix a batch of ID images with as many outliers; return the mixed batch and the ID share ``lam``.

    ``mixup``: ``lam * x_in + (1 - lam) * x_out``. ``cutmix``: the outlier's patch (box from ``rand_bbox(lam)``)
    replaces that region of the ID image and ``lam`` becomes ``1 - box_area / image_area``, the ID share of the
    pixels. The direction (outlier into ID image) is the official one; the authors found it works better.
    """
    if mix_op not in MIX_OPS:
        raise ValueError(f"mix_op must be one of {MIX_OPS}, got {mix_op!r}")
    check_mixing_share(lam)
    if outliers.shape[0] < inputs.shape[0] or outliers.shape[1:] != inputs.shape[1:]:
        raise ValueError(
            f"outliers {tuple(outliers.shape)} must hold at least as many images as the ID batch "
            f"{tuple(inputs.shape)}, of the same size; use an outlier batch size >= the ID batch size"
        )
    outliers = outliers[: inputs.shape[0]]
    if mix_op == "mixup":
        return lam * inputs + (1 - lam) * outliers, lam
    if inputs.ndim < 3:
        raise ValueError(f"cutmix needs images [batch, ..., height, width], got {tuple(inputs.shape)}")
    height, width = inputs.shape[-2:]
    top, left, bottom, right = rand_bbox(height, width, lam, generator)
    mixed = inputs.clone()
    mixed[..., top:bottom, left:right] = outliers[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
