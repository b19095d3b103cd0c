"""Training helpers shared by the detectors that train a small network on the fit data (``ae_mahalanobis``,
``sage``, ``msma``, their image versions, ``evidential``): seeded one-thread training, early stopping, held-out
rows, column scaling, and the cache of fitted states keyed by content."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard import persist

__all__ = [
    "one_thread", "seeded", "train_networks", "split_rows", "standardised", "feature_scaling", "check_latent_rows",
    "cached_training", "TRAINING_VERSION", "CACHE_KIND",
]  # fmt: skip

_F64 = torch.float64


@contextmanager
def one_thread() -> Iterator[None]:
    """Small networks run faster on one thread than on two that wait for each other (and give the same sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Training that is the same on every run: seeded, one thread (a thread pool's reductions reorder sums)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def train_networks(
    networks: nn.ModuleDict,
    loss_of: Any,
    rows: torch.Tensor | int,
    epochs: int,
    batch: int,
    lr: float,
    held_out: torch.Tensor | None = None,
) -> int:
    """Adam over shuffled mini-batches of ``rows`` (indices, or a count for all rows); ``loss_of(index)`` is the
    loss of the rows ``index``. With ``held_out`` rows, stop early once their loss has risen two epochs in a row
    (the SAGE authors' trainer). Returns the epochs run."""
    rows = torch.arange(rows) if isinstance(rows, int) else rows
    optimiser = torch.optim.Adam(networks.parameters(), lr=lr)
    previous, rises, run = math.inf, 0, 0
    while run < epochs:
        run += 1
        networks.train()
        order = rows[torch.randperm(len(rows))]
        for start in range(0, len(order), batch):
            optimiser.zero_grad(set_to_none=True)
            loss_of(order[start : start + batch]).backward()
            optimiser.step()
        if held_out is not None:
            networks.eval()
            with torch.no_grad():
                loss = float(loss_of(held_out))
            rises = rises + 1 if loss > previous else 0
            previous = loss
            if rises == 2:
                break
    networks.eval()
    return run


def split_rows(rows: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``range(rows)`` into (kept, held out ``fraction``), both sorted."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    count = int(round(fraction * rows))
    return order[count:].sort().values, order[:count].sort().values


def standardised(features: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return (features.to(_F64) - state["feature_mean"]) / state["feature_std"]


def feature_scaling(features: torch.Tensor) -> dict[str, torch.Tensor]:
    z = features.to(_F64)
    std = z.std(dim=0, unbiased=False)
    # a constant column carries nothing: scale 1 keeps it at 0 instead of dividing by 0
    return {
        "feature_mean": z.mean(dim=0),
        "feature_std": torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, 1),
    }


def check_latent_rows(name: str, rows: int, latent: int, held_out: int = 0) -> None:
    if rows - held_out <= latent:
        kept = f" ({rows - held_out} after holding out {held_out})" if held_out else ""
        raise ValueError(
            f"{name}: fit got N={rows} rows{kept} for a latent space of {latent} dimensions; the latent covariance "
            f"needs more training rows than dimensions: fit on more rows or lower latent_dim"
        )


#: Bump when any trained detector's training changes, so that cached fitted states are not reused.
TRAINING_VERSION = 2
#: The kind of a cached fitted state's file (see oodguard.persist).
CACHE_KIND = "cache.trained_detector"


def cached_training(detector: Any, rows: dict[str, torch.Tensor], train: Any) -> dict[str, torch.Tensor]:
    """``train()``'s fitted state, or the one cached in ``detector.cache_dir`` for exactly these fit ``rows`` (name ->
    tensor) and parameters (safetensors, keyed by a sha256 of the class, :data:`TRAINING_VERSION`, every parameter
    but ``cache_dir``, torch's version and the rows' bytes). Without a ``cache_dir``, just ``train()``."""
    cache_dir = getattr(detector, "cache_dir", None)
    if cache_dir is None:
        return train()
    params = {k: v for k, v in detector.get_params().items() if k != "cache_dir"}
    header = {"detector": type(detector).__qualname__, "version": TRAINING_VERSION, "torch": torch.__version__,
              "params": params}  # fmt: skip
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for field, value in rows.items():
        digest.update(f"{field}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"{detector.name}-{digest.hexdigest()[:20]}.safetensors"
    cached = persist.load_cache(path, kind=CACHE_KIND, versions=1)
    if cached is not None:
        return cached[0]
    state = train()
    # an unwritable cache folder only costs training again next time
    persist.save_cache(path, state, kind=CACHE_KIND, version=1, header={"detector": detector.name})
    return state
