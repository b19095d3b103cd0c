"""Truly ambiguous inputs: interpolations between two classes that an independent ensemble cannot tell apart.

After Weiss, Gómez & Tonella, "A Forgotten Danger in DNN Supervision Testing: Generating and Detecting True
Ambiguity" (ESEC/FSE 2022, AmbiGuess). An input is *truly ambiguous* when it lies between two classes of the
task itself, so that no classifier can be sure, unlike an OOD input that belongs to no class. The generator:

1. trains a **class-regularised autoencoder** on the fit images: a convolutional encoder to a small latent code,
   a decoder back to pixels, and a linear classifier on the code trained with it (cross-entropy), so that each
   class forms its own region of the latent space and the straight line between a code of class ``a`` and a code
   of class ``b`` crosses the border between them;
2. trains an **independent reference ensemble**: classifiers of other architectures than the model under test
   (an MLP, a strided CNN without pooling and a CNN with 5x5 kernels), seeded, on the same fit images;
3. for random pairs of fit images of two classes ``a != b``, bisects the line between their codes for the point
   where the ensemble's mean probability of ``a`` stops exceeding that of ``b``, decodes it, and keeps it only
   when ``a`` and ``b`` are the ensemble's two most probable classes, ``|p_a - p_b| <= margin``,
   ``p_a + p_b >= min_pair_mass``, and every member ranks ``a`` and ``b`` as its own top two;
4. takes the kept images round-robin over the class pairs (so that easy pairs such as 4/9 do not fill the set).

What it guarantees: every kept image satisfies the rule of step 3 under the returned ensemble (tested), the pair
of classes it lies between is recorded, everything is seeded and independent of the model under test.
What it does not: that a person would find the image ambiguous (AmbiGuess also trains a discriminator for
realism and validated samples by hand; this generator does neither), that the images have MNIST's stroke
texture (decoded images are smoother), or that the model under test finds them ambiguous: measuring that is the
point of the benchmark group.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from oodguard import persist

__all__ = ["AmbiguityConfig", "AmbiguousSet", "generate_ambiguous", "load_or_generate", "reference_probabilities"]

#: Bump when the generator changes, so that cached sets are rebuilt.
GENERATOR_VERSION = "ambiguity-1"
#: The kind of the cached set's file (see oodguard.persist).
CACHE_KIND = "cache.ambiguous_digits"


@dataclass(frozen=True)
class AmbiguityConfig:
    """Everything besides the data that decides the generated set (and so its cache key)."""

    count: int = 500
    #: Kept images need ``|p_a - p_b| <= margin`` under the ensemble's mean probabilities.
    margin: float = 0.2
    #: ... and ``p_a + p_b >= min_pair_mass`` (the image is between ``a`` and ``b``, not a third class or none).
    min_pair_mass: float = 0.8
    latent_dim: int = 8
    autoencoder_epochs: int = 20
    ensemble_epochs: int = 6
    #: Lines drawn per pair of classes, and bisection steps along each line.
    lines_per_pair: int = 40
    iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1), got {self.margin}")
        if not 0 < self.min_pair_mass <= 1:
            raise ValueError(f"min_pair_mass must be in (0, 1], got {self.min_pair_mass}")
        for name in ("count", "latent_dim", "autoencoder_epochs", "ensemble_epochs", "lines_per_pair"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")


@dataclass
class AmbiguousSet:
    """Generated images ``float32 [N, 1, 28, 28]`` in [0, 1], the class pair ``int64 [N, 2]`` each lies between,
    the ensemble's mean probabilities ``[N, C]``, and the reference ensemble (eval mode) that judged them."""

    images: torch.Tensor
    pairs: torch.Tensor
    probabilities: torch.Tensor
    ensemble: list[nn.Module]
    #: Candidate lines tried and lines that met the rule (before the round-robin cut to ``count``).
    tried: int
    accepted: int


# ---------------------------------------------------------------------------------------------- networks
class _Autoencoder(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),  # 14x14
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # 7x7
            nn.Flatten(), nn.Linear(32 * 7 * 7, latent_dim),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 32 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (32, 7, 7)),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
        )  # fmt: skip
        self.classifier = nn.Linear(latent_dim, num_classes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(codes))


def _ensemble_members(num_classes: int) -> list[nn.Module]:
    """Three architectures unlike the model under test (``DigitsCNN``: two 3x3 conv blocks of 16 and 32)."""
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, num_classes))
    strided = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )  # fmt: skip
    large_kernel = nn.Sequential(
        nn.Conv2d(1, 12, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 24, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(24 * 7 * 7, num_classes),
    )  # fmt: skip
    return [mlp, strided, large_kernel]


def _fit(module: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], rows: int, epochs: int,
         generator: torch.Generator, bar: tqdm, batch: int = 64) -> None:  # fmt: skip
    optimiser = torch.optim.Adam(module.parameters(), lr=2e-3)
    module.train()
    for _ in bar_steps(bar, epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, batch):
            optimiser.zero_grad(set_to_none=True)
            loss_of(order[start : start + batch]).backward()
            optimiser.step()
    module.eval()


def bar_steps(bar: tqdm, steps: int) -> Iterator[int]:
    for step in range(steps):
        yield step
        bar.update(1)


@torch.no_grad()
def reference_probabilities(ensemble: list[nn.Module], images: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Each member's softmax probabilities ``[M, N, C]`` (float64) for images ``[N, 1, 28, 28]`` in [0, 1]."""
    members = []
    for member in ensemble:
        parts = [torch.softmax(member(images[i : i + batch]).double(), dim=1) for i in range(0, len(images), batch)]
        members.append(torch.cat(parts))
    return torch.stack(members)


# ---------------------------------------------------------------------------------------------- generation
def _check_inputs(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"generate_ambiguous: expected images [N, 1, 28, 28], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or bool((labels < 0).any()):
        raise ValueError("generate_ambiguous: labels must be [N] class indices >= 0, one per image")
    classes = int(labels.max()) + 1
    present = torch.bincount(labels, minlength=classes)
    if classes < 2 or bool((present < 2).any()):
        raise ValueError(
            f"generate_ambiguous: needs at least 2 classes with 2 images each, got counts {present.tolist()}"
        )
    return images, labels, classes


def _train_autoencoder(images: torch.Tensor, labels: torch.Tensor, classes: int, config: AmbiguityConfig,
                       generator: torch.Generator, bar: tqdm) -> _Autoencoder:  # fmt: skip
    model = _Autoencoder(config.latent_dim, classes)

    def loss(rows: torch.Tensor) -> torch.Tensor:
        codes = model.encoder(images[rows])
        reconstruction = F.binary_cross_entropy_with_logits(model.decoder(codes), images[rows])
        # the class regulariser: classes separable in the code, codes kept near the origin
        regulariser = 0.05 * F.cross_entropy(model.classifier(codes), labels[rows]) + 1e-3 * codes.square().mean()
        return reconstruction + regulariser

    _fit(model, loss, len(images), config.autoencoder_epochs, generator, bar)
    return model


def _train_ensemble(images: torch.Tensor, labels: torch.Tensor, classes: int, config: AmbiguityConfig,
                    generator: torch.Generator, bar: tqdm) -> list[nn.Module]:  # fmt: skip
    ensemble = _ensemble_members(classes)
    for member in ensemble:

        def loss(rows: torch.Tensor, member: nn.Module = member) -> torch.Tensor:
            return F.cross_entropy(member(images[rows]), labels[rows])

        _fit(member, loss, len(images), config.ensemble_epochs, generator, bar)
    return ensemble


def _candidate_lines(labels: torch.Tensor, classes: int, config: AmbiguityConfig,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``lines_per_pair`` random (image of a, image of b) index pairs for every class pair ``a < b``."""
    members = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    starts, ends, pairs = [], [], []
    for a in range(classes):
        for b in range(a + 1, classes):
            n = config.lines_per_pair
            starts.append(members[a][torch.randint(len(members[a]), (n,), generator=generator)])
            ends.append(members[b][torch.randint(len(members[b]), (n,), generator=generator)])
            pairs.append(torch.tensor([[a, b]]).expand(n, 2))
    return torch.cat(starts), torch.cat(ends), torch.cat(pairs)


def _round_robin(pair_ids: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` positions, taking one kept line per class pair in turn (each pair's lines shuffled)."""
    order = torch.randperm(len(pair_ids), generator=generator)
    shuffled = pair_ids[order]
    # rank of each line within its pair (0 for the first drawn of that pair, 1 for the second, ...)
    sort = torch.sort(shuffled, stable=True)
    ranks = torch.empty_like(shuffled)
    first = torch.searchsorted(sort.values, sort.values, side="left")
    ranks[sort.indices] = torch.arange(len(shuffled)) - first
    take = torch.argsort(ranks * (int(pair_ids.max()) + 1) + shuffled)[:count]
    return order[take]


@torch.no_grad()
def _split_points(model: _Autoencoder, ensemble: list[nn.Module], images: torch.Tensor, starts: torch.Tensor,
                  ends: torch.Tensor, pairs: torch.Tensor, iterations: int,
                  bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per line, bisect ``t`` in [0, 1] for the point of the decoded line ``D((1 - t) z_a + t z_b)`` where the
    ensemble's mean ``p_a - p_b`` changes sign; returns the decoded points ``[lines, 1, 28, 28]`` and the members'
    probabilities there ``[M, lines, C]``. All lines are bisected together (one batch per iteration)."""
    codes = torch.cat([model.encoder(images[i : i + 2048]) for i in range(0, len(images), 2048)])
    start, direction = codes[starts], codes[ends] - codes[starts]
    low, high = torch.zeros(len(starts), 1), torch.ones(len(starts), 1)

    def evaluate(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = model.decode(start + t * direction)
        return decoded, reference_probabilities(ensemble, decoded)

    for _ in bar_steps(bar, iterations):
        middle = (low + high) / 2
        mean = evaluate(middle)[1].mean(dim=0)
        towards_a = mean.gather(1, pairs[:, :1]) > mean.gather(1, pairs[:, 1:])  # still on a's side: go on towards b
        low, high = torch.where(towards_a, middle, low), torch.where(towards_a, high, middle)
    return evaluate((low + high) / 2)


def generate_ambiguous(images: torch.Tensor, labels: torch.Tensor, config: AmbiguityConfig | None = None,
                       progress: bool = False) -> AmbiguousSet:  # fmt: skip
    """Generate truly ambiguous images from labelled images ``[N, 1, 28, 28]`` in [0, 1] (see the module doc).

    Seeded and one-threaded: the same call gives the same images. Raises ValueError when no line meets the rule
    (too few classes or images, or too little training).
    """
    config = config or AmbiguityConfig()
    images, labels, classes = _check_inputs(images, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # seeded results, and no thread pool spinning against the caller's
    steps = config.autoencoder_epochs + 3 * config.ensemble_epochs + config.iterations
    bar = tqdm(total=steps, desc="ambiguous digits", unit="epoch", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            generator = torch.Generator().manual_seed(config.seed)
            autoencoder = _train_autoencoder(images, labels, classes, config, generator, bar).eval()
            ensemble = _train_ensemble(images, labels, classes, config, generator, bar)
            starts, ends, pairs = _candidate_lines(labels, classes, config, generator)
            decoded, member_probs = _split_points(
                autoencoder, ensemble, images, starts, ends, pairs, config.iterations, bar
            )
            lines = torch.nonzero(meets_rule(member_probs, pairs, config)).flatten()
            if len(lines) == 0:
                raise ValueError(
                    "generate_ambiguous: no interpolation met the rule (margin, min_pair_mass, ensemble agreement); "
                    "train longer, draw more lines_per_pair or loosen margin"
                )
            pair_ids = pairs[lines, 0] * classes + pairs[lines, 1]
            chosen = lines[_round_robin(pair_ids, config.count, generator)].sort().values
            mean = member_probs.mean(dim=0)[chosen].float()
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return AmbiguousSet(decoded[chosen].contiguous(), pairs[chosen].clone(), mean, ensemble, tried=len(starts),
                        accepted=len(lines))  # fmt: skip


def meets_rule(member_probs: torch.Tensor, pairs: torch.Tensor, config: AmbiguityConfig) -> torch.Tensor:
    """Whether each image (members' probabilities ``[M, N, C]``, class pair ``[N, 2]``) is kept: ``a`` and ``b``
    are the top two of the mean probabilities and of every member, ``|p_a - p_b| <= margin`` and
    ``p_a + p_b >= min_pair_mass`` under the mean."""
    mean = member_probs.mean(dim=0)
    p_a, p_b = mean.gather(1, pairs[:, :1])[:, 0], mean.gather(1, pairs[:, 1:])[:, 0]
    on_top = torch.cat([mean[None], member_probs]).topk(2, dim=2).indices  # [1 + M, N, 2]
    pair_on_top = ((on_top == pairs[None, :, :1]) | (on_top == pairs[None, :, 1:])).all(dim=2).all(dim=0)
    return pair_on_top & ((p_a - p_b).abs() <= config.margin) & ((p_a + p_b) >= config.min_pair_mass)


# ---------------------------------------------------------------------------------------------- cache
def generation_key(images: torch.Tensor, labels: torch.Tensor, config: AmbiguityConfig) -> str:
    """sha256 over the generator version, the config, torch's version and the exact images and labels (16 hex)."""
    digest = hashlib.sha256()
    header = {"version": GENERATOR_VERSION, "config": asdict(config), "torch": torch.__version__,
              "shape": list(images.shape)}  # fmt: skip
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(torch.as_tensor(images, dtype=torch.float32).numpy()).tobytes())
    digest.update(np.ascontiguousarray(torch.as_tensor(labels, dtype=torch.int64).numpy()).tobytes())
    return digest.hexdigest()[:16]


def load_or_generate(images: torch.Tensor, labels: torch.Tensor, cache_dir: str | os.PathLike,
                     config: AmbiguityConfig | None = None,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The generated images and their class pairs, from the cache in ``cache_dir`` when this exact data and config
    made them before (safetensors, keyed by :func:`generation_key`), else generated and cached."""
    config = config or AmbiguityConfig()
    path = Path(cache_dir) / f"{GENERATOR_VERSION}-{generation_key(images, labels, config)}.safetensors"
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None and {"images", "pairs"} <= set(cached[0]):
        return cached[0]["images"], cached[0]["pairs"]
    result = generate_ambiguous(images, labels, config, progress=progress)
    header = {"config": asdict(config), "tried": result.tried, "accepted": result.accepted}
    persist.save_cache(path, {"images": result.images, "pairs": result.pairs}, kind=CACHE_KIND, version=1,
                       header=header)  # fmt: skip
    return result.images, result.pairs
