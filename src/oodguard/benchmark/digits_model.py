"""The ``digits`` benchmark's model: a small CNN, its seeded training and a safetensors weight cache.

The model takes plain ``[0, 1]`` pixels; MNIST normalisation is its first step, so every dataset of the
benchmark stays in pixel units. Its last module is the ``nn.Linear`` head, whose input (64 values after a
ReLU) is the penultimate feature vector that ``oodguard`` extracts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from oodguard import persist

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

#: Bump when the architecture or the training loop changes, so that cached weights are not reused.
MODEL_VERSION = "digits-cnn-1"


class Normalize(nn.Module):
    """``(x - mean) / std`` with fixed scalars; stored as buffers so the saved weights carry them."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DigitsCNN(nn.Module):
    """Small CNN for 28x28 gray digits in [0, 1]: normalise, 2 x (conv 3x3, ReLU, max-pool), linear 64, head.

    ``head`` (``nn.Linear(64, num_classes)``) is registered last, so it is the last entry of ``modules()``.

    Parameters
    ----------
    num_classes : int
        Number of outputs of the head.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything besides the data that decides the trained weights (and so the cache key)."""

    num_classes: int
    seed: int = 0
    epochs: int = 16
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: float = 2.0
    max_rotation: float = 10.0
    max_scale: float = 0.1


def _check_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape [N, 1, 28, 28], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}")
    return images.to(torch.float32).contiguous(), labels.to(torch.int64).contiguous()


def _augment(batch: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter per image (rotation, scale, shift; zero fill): MNIST-like variation for 3000 images."""
    if config.max_shift == 0 and config.max_rotation == 0 and config.max_scale == 0:
        return batch
    n, _, height, _ = batch.shape
    uniform = lambda bound: (2 * torch.rand(n, generator=generator) - 1) * bound
    angle = torch.deg2rad(uniform(config.max_rotation))
    scale = 1 + uniform(config.max_scale)
    shift = torch.stack([uniform(config.max_shift), uniform(config.max_shift)], 1) * (2 / height)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift[:, :, None]], 2)
    grid = nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    return nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_digits_cnn(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    epochs: int = 16,
    progress: bool = True,
    **options,
) -> DigitsCNN:
    """Train a ``DigitsCNN`` from scratch with Adam; seeded, so the same call gives the same weights.

    Parameters
    ----------
    images : tensor ``float32 [N, 1, 28, 28]`` in [0, 1]
    labels : tensor ``int64 [N]`` in ``[0, num_classes)``
    num_classes, seed, epochs : see ``TrainConfig``; ``options`` sets its other fields
        (``batch_size``, ``lr``, ``weight_decay``, ``max_shift``, ``max_rotation``, ``max_scale``).
    progress : bool
        Show a tqdm bar over the batches of all epochs.

    Returns
    -------
    DigitsCNN in eval mode.
    """
    config = TrainConfig(num_classes=num_classes, seed=seed, epochs=epochs, **options)
    return _train(images, labels, config, progress)


def _train(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, progress: bool) -> DigitsCNN:
    # One intra-op thread: for convolutions this small, threading overhead dominates (and on a busy CPU,
    # spinning OpenMP workers made 2 threads ~9x slower than 1), and the weights then do not depend on the
    # machine's core count. The caller's setting is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(images, labels, config, progress)
    finally:
        torch.set_num_threads(threads)


def _train_loop(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, progress: bool) -> DigitsCNN:
    from tqdm.auto import tqdm

    images, labels = _check_data(images, labels, config.num_classes)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # data order and shifts, apart from the init
    model = DigitsCNN(config.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch)
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with tqdm(total=config.epochs * steps_per_epoch, desc="train digits CNN", disable=not progress) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), config.batch_size):
                batch = order[start : start + config.batch_size]
                inputs = _augment(images[batch], config, generator)
                loss = loss_fn(model(inputs), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


# --------------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$OODGUARD_CACHE`` if set, else ``~/.cache/oodguard``."""
    return Path(os.environ.get("OODGUARD_CACHE") or Path.home() / ".cache" / "oodguard")


def training_key(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> str:
    """sha256 over the model version, the training config and the exact training data bytes (hex, 16 chars)."""
    images, labels = _check_data(images, labels, config.num_classes)
    digest = hashlib.sha256()
    header = {"version": MODEL_VERSION, "config": asdict(config), "shape": list(images.shape)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_path(cache_dir: str | os.PathLike | None, key: str) -> Path:
    """Where ``load_or_train`` keeps the weights for ``key``."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{MODEL_VERSION}-{key}.safetensors"


def load_or_train(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    epochs: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options,
) -> DigitsCNN:
    """Load cached weights for exactly this data and config, or train (``train_digits_cnn``) and cache them.

    Weights are stored as safetensors (never pickle) in ``cache_dir`` (default ``default_cache_dir()``) under
    a name keyed by ``training_key``; a changed config or training set gets a new key and is trained anew.
    An unreadable cache file is replaced. The write is atomic (temporary file + rename); an unwritable cache
    folder only means training again next time.

    Returns
    -------
    DigitsCNN in eval mode.
    """
    config = TrainConfig(num_classes=num_classes, seed=seed, epochs=epochs, **options)
    path = weights_path(cache_dir, training_key(images, labels, config))
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None:
        model = DigitsCNN(num_classes)
        try:
            model.load_state_dict(cached[0])
            return model.eval()
        except RuntimeError:
            pass  # weights of another architecture: retrain and overwrite them below
    model = _train(images, labels, config, progress)
    header = {"model_version": MODEL_VERSION, "config": asdict(config)}
    persist.save_cache(path, model.state_dict(), kind=CACHE_KIND, version=1, header=header)
    return model


#: The kind of the trained digits CNN's cache file (see oodguard.persist).
CACHE_KIND = "cache.digits_cnn"
