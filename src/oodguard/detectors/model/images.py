"""``ae_mahalanobis_images`` and ``msma_images``: the two auxiliary-network detectors on the input images themselves.

``ae_mahalanobis`` and ``msma`` train on the model's penultimate features (any model, feature files too). The papers
train on the images: a convolutional autoencoder (Denouden et al.) and a noise-conditional score network (Mahmood
et al.). These two do that for small images ``[N, C, H, W]`` (at least 8x8 pixels): they never run the model, only
read the inputs the benchmark or the caller gives, so they take the model-detector protocol (inputs, not outputs).
All fit inputs are held in memory while training (``N x C x H x W`` floats: 9 MB for 3000 MNIST digits); for
larger images use the feature versions. Training is seeded, one-threaded and cached like the feature versions'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodguard.detectors.autoencoder import (
    check_mixture_rows,
    combined_score,
    fit_norm_mixture,
    gaussian_mixture_log_density,
    latent_distance,
    latent_gaussian,
    noise_levels,
    split_for_standardising,
    term_statistics,
)
from oodguard.detectors.base import register
from oodguard.detectors.model.base import ModelDetector
from oodguard.detectors.params import Integral, Interval, Real, SequenceOf, Text
from oodguard.detectors.trained import (
    cached_training,
    one_thread,
    seeded,
    train_networks,
)
from oodguard.extraction.batches import Batches
from oodguard.extraction.model_runner import ModelRunner

__all__ = ["AEMahalanobisImages", "MSMAImages", "MIN_SIZE"]

_F64 = torch.float64
#: The networks halve the image twice; below 8x8 pixels nothing is left to learn from.
MIN_SIZE = 8


#: Rows per forward pass at score time: small batches of small images run fastest on one CPU thread.
_SCORE_BATCH = 64


def _images(name: str, data: Any, batch_size: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Every input of ``data`` as one float32 tensor ``[N, C, H, W]``, checked for size (and ``shape`` when given)."""
    parts = [x for x, _ in Batches(data, None, batch_size) if x.shape[0]]
    if not parts:
        raise ValueError(f"{name}: got no inputs")
    x = torch.cat([part.detach().to("cpu", torch.float32) for part in parts])
    if x.ndim != 4:
        raise ValueError(f"{name}: expects images [N, C, H, W], got inputs of shape {tuple(x.shape)}")
    if min(x.shape[2:]) < MIN_SIZE:
        raise ValueError(
            f"{name}: images of {x.shape[2]}x{x.shape[3]} pixels are too small for its networks (at least "
            f"{MIN_SIZE}x{MIN_SIZE}: they halve the image twice); use the feature version "
            f"({name.removesuffix('_images')}) instead"
        )
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name}: fitted on images of shape {list(shape)}, got {list(x.shape[1:])}; resize them")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: the images hold NaN or infinite values")
    return x


def _channel_scaling(x: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = x.double().mean(dim=(0, 2, 3))
    std = x.double().std(dim=(0, 2, 3), unbiased=False)
    return {"pixel_mean": mean, "pixel_std": torch.where(std > 1e-12, std, 1)}


def _standardised(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x.to(_F64) - state["pixel_mean"][:, None, None]) / state["pixel_std"][:, None, None]


def _down(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
    )  # fmt: skip


class _ConvAutoencoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], width: int, latent: int) -> None:
        super().__init__()
        channels, height, weight_w = shape
        self.shape = shape
        self.small = (math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(weight_w / 2) / 2))
        flat = 2 * width * self.small[0] * self.small[1]
        self.encoder = nn.Sequential(_down(channels, width), nn.Flatten(), nn.Linear(flat, latent))
        self.expand = nn.Sequential(nn.Linear(latent, flat), nn.SiLU())
        self.up1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.up2 = nn.Conv2d(width, channels, 3, padding=1)
        self.width = width

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.expand(codes).view(-1, 2 * self.width, *self.small)
        h = F.silu(self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.up2(F.interpolate(h, size=self.shape[1:], mode="nearest"))


class _ConvScoreNetwork(nn.Module):
    """``sigma_i s(x, i)``: a small encoder-decoder whose every layer gets a learned bias per noise level."""

    def __init__(self, channels: int, levels: int, width: int) -> None:
        super().__init__()
        self.levels = levels
        self.inner = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        self.embed = nn.Embedding(levels, 4 * width)
        self.width = width

    def scaled(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        bias = self.embed(level)[:, :, None, None]
        w = self.width
        h1 = F.silu(self.inner(x) + bias[:, :w])
        h2 = F.silu(self.down(h1) + bias[:, w : 3 * w])
        h3 = F.silu(self.up(F.interpolate(h2, size=h1.shape[2:], mode="nearest")) + bias[:, 3 * w :])
        return self.out(torch.cat([h1, h3], dim=1))


class _ImageNetworks(ModelDetector):
    """Shared plumbing: inputs in, trained weights (``net.*``) in the state, networks rebuilt once per state."""

    input_ndim = 4
    not_by_default = "trains a convolutional network on the images (15-35 s on digits' 3000 images, one core)"

    @property
    def runner(self) -> ModelRunner | None:  # type: ignore[override]
        """The attached runner, if any: these detectors read the inputs only, so none is needed."""
        return self.runner_

    def _networks_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def _cached_networks(self) -> Any:
        key = ("networks",)
        if key not in self._state_cache:  # emptied whenever the state changes
            # float32: convolutions in float64 run several times slower on the CPU (no oneDNN kernels)
            self._state_cache[key] = self._networks_from(self.state_ or {}).float().eval()  # type: ignore[assignment]
        return self._state_cache[key]

    def _shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in (self.state_ or {})["image_shape"].tolist())  # type: ignore[return-value]

    def _load(self, net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        net.load_state_dict({name[4:]: value for name, value in state.items() if name.startswith("net.")})
        return net

    def _fit_model(self, runner: ModelRunner | None, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        x = _images(self.name, data, runner.batch_size if runner is not None else 256)
        return cached_training(self, {"inputs": x}, lambda: self._train_images(x))

    def _train_images(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _score_model(self, runner: ModelRunner | None, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        x = _images(self.name, data, runner.batch_size if runner is not None else 256, self._shape())
        state = self.state(torch.device("cpu"), _F64)
        with one_thread():
            step = _SCORE_BATCH
            return torch.cat([self._score_images(x[i : i + step], state) for i in range(0, len(x), step)])

    def _score_images(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


_COMMON: dict[str, list[Any]] = {
    "width": [Interval(Integral, 1, None)],
    "epochs": [Interval(Integral, 1, None)],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "batch_size": [Interval(Integral, 1, None)],
    "seed": [Interval(Integral, 0, None)],
    "cache_dir": [None, Text()],
}


@register
class AEMahalanobisImages(_ImageNetworks):
    """``ae_mahalanobis`` on the images: a convolutional autoencoder's reconstruction error plus the Mahalanobis
    distance of its latent code, each standardised on held-out fit images.

    Fit: pixels standardised per channel; a seeded ``holdout`` share of the images set aside; an autoencoder
    (two stride-2 3x3 convolutions of ``width`` and ``2 width`` channels, SiLU, a linear map to ``latent_dim``; the
    decoder mirrors it with nearest upsampling) trained on the others with the mean squared error; one Gaussian on
    their latent codes. Score: ``alpha * MD_z + beta * RE_z`` as in ``ae_mahalanobis``, with ``RE`` the mean
    squared error per pixel.

    Parameters: ``latent_dim`` 16, ``width`` 16, ``epochs`` 15, ``lr`` 2e-3, ``batch_size`` 64, ``alpha``, ``beta``
    1.0, ``ridge`` 1e-6, ``holdout`` 0.1, ``seed`` 0, ``cache_dir``.

    Paper: Denouden, Salay, Czarnecki, Abdelzad, Phan & Vernekar, "Improving Reconstruction Autoencoder
    Out-of-distribution Detection with Mahalanobis Distance", arXiv:1812.02765, 2018. No official code.
    """

    name = "ae_mahalanobis_images"
    summary = "convolutional autoencoder on the input images: latent Mahalanobis distance plus reconstruction error"
    paper = (
        "Denouden, Salay, Czarnecki, Abdelzad, Phan & Vernekar, 'Improving Reconstruction Autoencoder "
        "Out-of-distribution Detection with Mahalanobis Distance', arXiv:1812.02765, 2018"
    )
    code = "no official code"
    _parameter_constraints = {
        **_COMMON,
        "latent_dim": [Interval(Integral, 1, None)],
        "alpha": [Interval(Real, 0, None)],
        "beta": [Interval(Real, 0, None)],
        "ridge": [Interval(Real, 0, None)],
        "holdout": [Interval(Real, 0, 0.5)],
    }

    def __init__(
        self,
        *,
        latent_dim: int = 16,
        width: int = 16,
        epochs: int = 15,
        lr: float = 2e-3,
        batch_size: int = 64,
        alpha: float = 1.0,
        beta: float = 1.0,
        ridge: float = 1e-6,
        holdout: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.latent_dim = latent_dim
        self.width = width
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

    def _networks_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        shape = tuple(int(v) for v in state["image_shape"].tolist())
        net = _ConvAutoencoder(shape, int(self.width), int(self.latent_dim))
        return self._load(net, state)

    def _train_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        train, held_out = split_for_standardising(
            self.name, len(images), int(self.latent_dim), float(self.holdout), int(self.seed), what="images"
        )
        state = _channel_scaling(images[train])
        state["image_shape"] = torch.tensor(images.shape[1:])
        x = _standardised(images, state).to(torch.float32)
        with seeded(int(self.seed)):
            net = _ConvAutoencoder(tuple(images.shape[1:]), int(self.width), int(self.latent_dim))

            def loss(rows: torch.Tensor) -> torch.Tensor:
                return F.mse_loss(net.decode(net.encoder(x[rows])), x[rows])

            train_networks(
                nn.ModuleDict({"ae": net}), loss, train, int(self.epochs), int(self.batch_size), float(self.lr)
            )
        state.update({f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()})
        net = net.eval()
        with torch.no_grad(), one_thread():
            step = _SCORE_BATCH
            codes = torch.cat([net.encoder(x[train][i : i + step]) for i in range(0, len(train), step)]).double()
        state.update(latent_gaussian(codes, float(self.ridge)))
        with one_thread():
            state.update(term_statistics(*self._terms(images[held_out if len(held_out) else train], state, net)))
        return state

    def _terms(
        self, images: torch.Tensor, state: dict[str, torch.Tensor], net: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = _standardised(images, state).float()
        with torch.no_grad():
            codes = net.encoder(x)
            error = (net.decode(codes) - x).square().mean(dim=(1, 2, 3)).double()
            codes = codes.double()
        return latent_distance(codes, state), error

    def _score_images(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        distance, error = self._terms(x, state, self._cached_networks())
        return combined_score(distance, error, state, float(self.alpha), float(self.beta))


@register
class MSMAImages(_ImageNetworks):
    """``msma`` on the images: norms of a convolutional noise-conditional score network at L noise levels, and a
    Gaussian mixture over them.

    Fit: pixels standardised per channel; a score network ``sigma_i s(x, i)`` (a 3x3 convolution of ``width``
    channels, a stride-2 one of ``2 width``, nearest upsampling, a skip connection, a learned bias per noise level
    in every layer) trained by denoising score matching (``1/2 ||sigma_i s(x + sigma_i e, i) + e||^2``, levels
    drawn uniformly); ``phi(x) = (||sigma_i s(x, i)||)_i`` on the clean images; the mixture of ``msma``
    (standardised, full covariance, components by 10-fold cross-validated likelihood). Score: ``-log p(phi(x))``.

    Parameters: ``levels`` 10, ``sigma_max`` 1.0, ``sigma_min`` 0.01 (official, here in units of the standardised
    pixels), ``width`` 16, ``epochs`` 10, ``lr`` 2e-3, ``batch_size`` 64, ``components`` (2, 4, ..., 20), ``seed``
    0, ``cache_dir``.

    Paper: Mahmood, Oliva & Styner, "Multiscale Score Matching for Out-of-Distribution Detection", ICLR 2021.
    Code: ahsanMah/msma (a RefineNet score network; this one is much smaller).
    """

    name = "msma_images"
    summary = "negative log density of a convolutional score network's norms at 10 noise levels, on the images"
    paper = "Mahmood, Oliva & Styner, 'Multiscale Score Matching for Out-of-Distribution Detection', ICLR 2021"
    code = "https://github.com/ahsanMah/msma (ood_detection_helper.py)"
    _parameter_constraints = {
        **_COMMON,
        "levels": [Interval(Integral, 1, None)],
        "sigma_max": [Interval(Real, 0, None, closed="neither")],
        "sigma_min": [Interval(Real, 0, None, closed="neither")],
        "components": [SequenceOf(Interval(Integral, 1, None))],
    }

    def __init__(
        self,
        *,
        levels: int = 10,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        width: int = 16,
        epochs: int = 10,
        lr: float = 2e-3,
        batch_size: int = 64,
        components: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20),
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.levels = levels
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.width = width
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

    def _networks_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        channels = int(state["image_shape"][0])
        return self._load(_ConvScoreNetwork(channels, int(self.levels), int(self.width)), state)

    def _train_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_mixture_rows(self.name, len(images), self.components)
        state = _channel_scaling(images)
        state["image_shape"] = torch.tensor(images.shape[1:])
        x = _standardised(images, state).to(torch.float32)
        sigmas = noise_levels(int(self.levels), float(self.sigma_max), float(self.sigma_min))
        state["sigmas"] = sigmas
        with seeded(int(self.seed)):
            net = _ConvScoreNetwork(images.shape[1], int(self.levels), int(self.width))
            sigma32 = sigmas.to(torch.float32)

            def loss(rows: torch.Tensor) -> torch.Tensor:
                level = torch.randint(0, int(self.levels), (rows.shape[0],))
                noise = torch.randn_like(x[rows])
                noisy = x[rows] + sigma32[level, None, None, None] * noise
                return 0.5 * (net.scaled(noisy, level) + noise).square().sum(dim=(1, 2, 3)).mean()

            train_networks(nn.ModuleDict({"score": net}), loss, len(images), int(self.epochs), int(self.batch_size),
                   float(self.lr))  # fmt: skip
        state.update({f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()})
        net = net.eval()
        with one_thread():
            step = _SCORE_BATCH
            norms = torch.cat([self._norms(x[i : i + step], net) for i in range(0, len(x), step)])
        state.update(fit_norm_mixture(norms, self.components, int(self.seed), self.name))
        return state

    def _norms(self, x: torch.Tensor, net: _ConvScoreNetwork) -> torch.Tensor:
        columns = []
        with torch.no_grad():
            for level in range(net.levels):
                index = torch.full((x.shape[0],), level, dtype=torch.long)
                columns.append(torch.linalg.vector_norm(net.scaled(x.float(), index).flatten(1), dim=1))
        return torch.stack(columns, dim=1).double()

    def score_norms(self, images: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` of each image ``[n, L]`` (in the standardised pixel space)."""
        x = _images(self.name, images, 512, self._shape())
        state = self.state(torch.device("cpu"), _F64)
        with one_thread():
            x = _standardised(x, state)
            step = _SCORE_BATCH
            return torch.cat([self._norms(x[i : i + step], self._cached_networks()) for i in range(0, len(x), step)])

    def _score_images(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        phi = (self._norms(_standardised(x, state), self._cached_networks()) - state["phi_mean"]) / state["phi_std"]
        return -gaussian_mixture_log_density(
            phi, state["gmm_weights"], state["gmm_means"], state["gmm_precision_cholesky"]
        )
