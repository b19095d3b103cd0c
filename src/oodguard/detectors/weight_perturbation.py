"""WeiPer + KLD: densities of the features and of randomly perturbed class projections, against the fit set's.

Paper: Granz, Heurich & Landgraf, "WeiPer: OOD Detection using Weight Perturbations of Class Projections",
NeurIPS 2024. Code: mgranz/weiper (an OpenOOD fork), ``openood/postprocessors/weiper_kldiv_postprocessor.py`` and
``openood/postprocessors/weiper_kldiv/utils.py`` (``calculate_WeiPerKLDiv_score``); OpenOOD v1.5 lists its results.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from oodguard.detectors.base import OutputDetector, register
from oodguard.detectors.params import Integral, Interval, Real
from oodguard.outputs import ModelOutputs

_F64 = torch.float64
#: The histograms' upper edge is ``max + _EDGE_PAD`` (the official bins), so the fit maximum lies inside.
_EDGE_PAD = 1e-8


def perturbed_head(weight: torch.Tensor, repeats: int, distance: float, seed: int) -> torch.Tensor:
    """``[C r, D]``: ``r`` copies of the head ``W``, each row moved by ``distance * ||W_c||`` in a random direction.

    Directions are standard normal rows normalised to unit length, drawn ``[r, C, D]`` from a generator seeded with
    ``seed`` (float64, on the CPU, so the same seed gives the same head on every machine). The rows are stored
    class-major (row ``c r + i`` is copy ``i`` of class ``c``), so that the softmax of every copy reduces over a
    strided axis with the ``r`` copies contiguous.
    """
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(repeats, *weight.shape, generator=generator, dtype=_F64)
    noise = F.normalize(noise, dim=2) * (distance * torch.linalg.vector_norm(weight.to(_F64), dim=1))[:, None]
    return (weight.to(_F64).cpu() + noise).transpose(0, 1).reshape(-1, weight.shape[1])


def row_histograms(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """Per row, the fraction of its values in each of ``bins`` equal bins over ``[low, high + 1e-8)`` (as float64).

    Values outside the range count in no bin (they still count in the row's total), as in the official code. The bin
    index is computed in the values' dtype (float32 may put a value within ~1e-7 of the range of an edge in the
    neighbouring bin).
    """
    scale = bins / (high + _EDGE_PAD - low)
    # one pass: 1 + (v - low) * scale (see binned_histograms for the 1)
    positions = torch.add(
        torch.tensor(1.0 - low * scale, dtype=values.dtype, device=values.device), values, alpha=scale
    )
    return binned_histograms(positions, bins)


def binned_histograms(positions: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`row_histograms` of values already mapped to ``1 + (v - low) * bins / width`` (so bin ``j`` is
    ``[j + 1, j + 2)``); overwrites ``positions``.

    Clamped to ``[0, bins + 1]``, the positions are non-negative, so truncation to an integer is their floor: slot 0
    collects the values below the range, slot ``bins + 1`` those above, and neither is returned.
    """
    n, m = positions.shape
    slots = bins + 2
    index = positions.clamp_(0.0, bins + 1.0).to(torch.int32)
    index += torch.arange(0, n * slots, slots, device=index.device, dtype=torch.int32)[:, None]  # row offsets
    counts = torch.bincount(index.flatten(), minlength=n * slots).view(n, slots)
    return counts[:, 1:-1].to(_F64).div_(m)


def smoothing_matrix(bins: int, size: int) -> torch.Tensor:
    """``S`` with ``h @ S`` the moving average of ``size`` bins, edges repeated (PyTorch's ``padding="same"`` with
    ``padding_mode="replicate"``: ``(size - 1) // 2`` bins before, the rest after)."""
    before = (size - 1) // 2
    window = (torch.arange(bins)[:, None] + torch.arange(-before, size - before)[None, :]).clamp_(0, bins - 1)
    columns = torch.arange(bins).repeat_interleave(size)
    matrix = torch.zeros(bins, bins, dtype=_F64)
    return matrix.index_put_((window.flatten(), columns), torch.tensor(1.0 / size, dtype=_F64), accumulate=True)


def smooth(histograms: torch.Tensor, size: int) -> torch.Tensor:
    """Moving average of ``size`` bins along each row, edges repeated (see :func:`smoothing_matrix`)."""
    return histograms @ smoothing_matrix(histograms.shape[1], size).to(histograms.device)


def symmetric_kld(reference: torch.Tensor, histograms: torch.Tensor, size: int, epsilon: float) -> torch.Tensor:
    """``KL(p || q) + KL(q || p)`` per row: ``p`` the reference histogram, ``q`` the row's, smoothed; both ``+ eps``
    and renormalised.

    With ``r = smooth(h) + eps`` and ``q = r / S``, ``S = sum r``, the sum ``sum (p - q)(log p - log q)`` expands to
    ``p.log p - p.log r - (r.log p - r.log r) / S`` (the ``log S`` terms cancel): products with the fixed ``p`` and
    ``log p``, and one row-wise ``r.log r``, without normalising ``r`` first.
    """
    p = reference + epsilon
    p = p / p.sum()
    log_p = p.log()
    smoothing = smoothing_matrix(histograms.shape[1], size).to(histograms.device)
    r = torch.addmm(torch.tensor(epsilon, dtype=histograms.dtype, device=histograms.device), histograms, smoothing)
    log_r = r.log()
    cross = r @ log_p - torch.linalg.vecdot(r, log_r)
    return (p @ log_p) - log_r @ p - cross / r.sum(dim=1)


@register
class WeiPer(OutputDetector):
    """WeiPer + KLD — divergence of each sample's activation histograms from the fit set's, minus the perturbed MSP.

    Fit (ID features and the head ``(W, b)``): ``W~`` = ``r`` perturbed copies of ``W`` (each class row moved by
    ``delta ||W_c||`` in a seeded random direction, bias repeated); the range ``[min, max]`` of every fit feature
    value and of every perturbed logit ``W~ z + b``; the mean over fit rows of the per-row histograms ``p_z`` and
    ``p_w`` (``n_bins`` bins over those ranges). Score, per row ``z``::

        h_z, h_w = histogram of z's D values,  histogram of its r C perturbed logits
        KLD(p, h, s, eps) = KL(p' || q) + KL(q || p'),  p' = (p + eps) / sum,  q = (smooth_s(h) + eps) / sum
        MSP~  = mean over the r copies of max softmax(W~_i z + b)
        score = KLD(p_z, h_z, s1, eps) + lambda_1 KLD(p_w, h_w, s2, eps_noise) - lambda_2 MSP~   (higher = OOD)

    ``smooth_s`` is a moving average of ``s`` bins (edges repeated).

    Parameters (the defaults of the official ``calculate_WeiPerKLDiv_score``; the paper tunes ``delta``,
    ``n_bins``, ``lambda_1``, ``lambda_2``, ``s1`` and ``s2`` per benchmark on validation OOD data)
    ----------
    n_repeats : int >= 1, default 100 (``r``)
    perturbation_distance : float > 0, default 2.1 (``delta``)
    n_bins : int >= 1, default 100
    smoothing, smoothing_perturbed : int >= 1, default 20 (``s1``, ``s2``)
    epsilon, epsilon_noise : float > 0, default 0.01 and 0.025
    lambda_1, lambda_2 : float >= 0, default 1.0
    seed : int >= 0, default 0 (the perturbation; the official code draws a new one per run)

    The fit range needs every fit row before any histogram, so there is no ``partial_fit``. The state holds
    ``W~`` (``r C x D``: 100 copies of the head).

    Paper: Granz, Heurich & Landgraf, NeurIPS 2024. Code: mgranz/weiper
    ``openood/postprocessors/weiper_kldiv/utils.py``. Deviations: docs/detectors.md, section ``weiper``.
    """

    name = "weiper"
    summary = (
        "symmetric KL of each sample's histograms of its features and of its logits under randomly perturbed class "
        "projections from the fit set's mean histograms, minus the mean perturbed max-softmax"
    )
    paper = (
        "Granz, Heurich & Landgraf, 'WeiPer: OOD Detection using Weight Perturbations of Class Projections', "
        "NeurIPS 2024"
    )
    code = (
        "https://github.com/mgranz/weiper (openood/postprocessors/weiper_kldiv/utils.py, calculate_WeiPerKLDiv_score)"
    )
    requires = frozenset({"features"})
    fit_requires = frozenset({"features", "head"})
    _parameter_constraints = {
        "n_repeats": [Interval(Integral, 1, None)],
        "perturbation_distance": [Interval(Real, 0, None, closed="neither")],
        "n_bins": [Interval(Integral, 1, None)],
        "smoothing": [Interval(Integral, 1, None)],
        "smoothing_perturbed": [Interval(Integral, 1, None)],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "epsilon_noise": [Interval(Real, 0, None, closed="neither")],
        "lambda_1": [Interval(Real, 0, None)],
        "lambda_2": [Interval(Real, 0, None)],
        "seed": [Interval(Integral, 0, None)],
    }

    def __init__(
        self,
        *,
        n_repeats: int = 100,
        perturbation_distance: float = 2.1,
        n_bins: int = 100,
        smoothing: int = 20,
        smoothing_perturbed: int = 20,
        epsilon: float = 0.01,
        epsilon_noise: float = 0.025,
        lambda_1: float = 1.0,
        lambda_2: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.n_repeats = n_repeats
        self.perturbation_distance = perturbation_distance
        self.n_bins = n_bins
        self.smoothing = smoothing
        self.smoothing_perturbed = smoothing_perturbed
        self.epsilon = epsilon
        self.epsilon_noise = epsilon_noise
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.seed = seed
        super().__init__()

    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        z = outputs.features
        dtype = z.dtype if z.is_floating_point() else torch.float32
        head = outputs.head
        if head is None:  # fit_requires names the head, so the fit checks have refused this already
            raise ValueError(f"{self.name}: fit needs the head (the final linear layer's weight and bias)")
        weight, bias = head
        repeats, bins = int(self.n_repeats), int(self.n_bins)
        perturbed = perturbed_head(weight, repeats, float(self.perturbation_distance), int(self.seed))
        perturbed = perturbed.to(device=z.device, dtype=dtype)
        bias = bias.to(device=z.device, dtype=dtype).repeat_interleave(repeats)
        # two passes in row chunks: the logits' range first, then their histograms (no [N, r C] block at once)
        step = max(64, 2**24 // (4 * max(z.shape[1], perturbed.shape[0])))
        low, high = float("inf"), float("-inf")
        for start in range(0, len(z), step):
            logits = torch.addmm(bias, z[start : start + step], perturbed.T)
            low, high = min(low, float(logits.min())), max(high, float(logits.max()))
        scale = bins / (high + _EDGE_PAD - low)
        # the perturbed head in bin units, 1 + (W~ z + b - low) * scale: the histogram needs no pass of its own
        state: dict[str, Any] = {
            "bin_weight": perturbed * scale,
            "bin_bias": (bias - low) * scale + 1.0,
            "logits_range": torch.tensor([low, high], dtype=_F64),
            "features_range": torch.stack([z.min(), z.max()]).to(_F64),
        }
        f_low, f_high = state["features_range"].tolist()
        if f_high <= f_low or high <= low:
            what = "features" if f_high <= f_low else "perturbed logits"
            raise ValueError(
                f"{self.name}: every fit value of the {what} is the same ({f_low if f_high <= f_low else low:g}), so "
                "the histograms have one bin of width 1e-8 and any other input falls outside them; fit on features "
                "that vary"
            )
        feature_density = torch.zeros(bins, dtype=_F64, device=z.device)
        logit_density = torch.zeros(bins, dtype=_F64, device=z.device)
        for start in range(0, len(z), step):
            rows = z[start : start + step]
            feature_density += row_histograms(rows, f_low, f_high, bins).sum(0)
            positions = torch.addmm(state["bin_bias"], rows, state["bin_weight"].T)
            logit_density += binned_histograms(positions, bins).sum(0)
        return state | {"features_density": feature_density / len(z), "logits_density": logit_density / len(z)}

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        state = self.state_ or {}
        width = state["bin_weight"].shape[0] if "bin_weight" in state else 64 * 1024
        return 8 * 4 * width

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        z = outputs.features
        state = self.state(z.device, z.dtype)
        exact = self.state(z.device)  # ranges and densities in float64
        bins = int(self.n_bins)
        low, high = exact["features_range"].tolist()
        features_kld = symmetric_kld(exact["features_density"], row_histograms(z, low, high, bins),
                                     int(self.smoothing), float(self.epsilon))  # fmt: skip
        positions = torch.addmm(state["bin_bias"], z, state["bin_weight"].T)  # perturbed logits in bin units
        # max softmax of each copy = 1 / sum_c exp(l_c - max_c l), l = low + position / scale; classes on the strided
        # axis, the r copies contiguous
        low, high = exact["logits_range"].tolist()
        copies = positions.view(len(z), -1, int(self.n_repeats))
        width = torch.tensor((high + _EDGE_PAD - low) / bins, dtype=z.dtype, device=z.device)
        shifted = torch.addcmul(copies.amax(dim=1, keepdim=True).mul_(-width), copies, width)  # (l - max l), one pass
        msp = shifted.exp_().sum(dim=1).reciprocal_().mean(dim=1, dtype=_F64)
        logits_kld = symmetric_kld(exact["logits_density"], binned_histograms(positions, bins),
                                   int(self.smoothing_perturbed), float(self.epsilon_noise))  # fmt: skip
        return features_kld + float(self.lambda_1) * logits_kld - float(self.lambda_2) * msp
