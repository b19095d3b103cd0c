"""A compact, seeded training loop for any ``torch.nn.Module``: ID loader, optional outlier loader, a ``Method``.

Per step: the method's sampler picks outliers from the outlier batch, the method computes the loss, SGD takes a
step at the recipe's learning rate. The outlier loader restarts at every epoch (the official OE code starts each
epoch at a random offset) and cycles within an epoch when it runs out. Checkpoints (safetensors) every N epochs
hold the model, the optimizer and the random states (CPU, and CUDA when training there), so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard.train.checkpoint import load_checkpoint, save_checkpoint
from oodguard.train.methods import Method, Recipe, recipe_dict


@dataclass
class TrainResult:
    """The trained model (eval mode) and per-epoch mean losses, steps and seconds."""

    model: nn.Module
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)


def _inputs_and_labels(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise TypeError(f"{what} must yield tensors or (inputs, labels) tuples, got {type(batch).__name__}")


class _Cycle:
    """Iterate a loader from its start, restarting when it runs out (no caching, unlike itertools.cycle)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.iterator: Iterator = iter(loader)

    def next(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError("outlier_loader is empty; pass at least one batch of outliers") from None


def _loader_generators(id_loader: Any, outlier_loader: Any) -> dict[str, torch.Generator]:
    """The loaders' own shuffling generators (``DataLoader(generator=...)``), saved in checkpoints so that a
    resumed run sees the same batches as an uninterrupted one."""
    found = {}
    for name, loader in (("rng_id_loader", id_loader), ("rng_outlier_loader", outlier_loader)):
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            found[name] = generator
    return found


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device whose generator the run draws from (dropout, random layers), or None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _random_states(generator: torch.Generator, device: torch.device, id_loader: Any, outlier_loader: Any) -> dict:
    states = {"rng_global": torch.get_rng_state(), "rng_method": generator.get_state()}
    cuda = _cuda_index(device)
    if cuda is not None:
        states["rng_cuda"] = torch.cuda.get_rng_state(cuda)
    states.update({k: g.get_state() for k, g in _loader_generators(id_loader, outlier_loader).items()})
    return states


def train(
    model: nn.Module,
    id_loader: Iterable,
    method: Method,
    outlier_loader: Iterable | None = None,
    *,
    recipe: Recipe | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` with ``method`` (in place where the method keeps the module; use the returned model).

    Parameters
    ----------
    model : any ``torch.nn.Module`` mapping an input batch to logits ``[B, C]``.
    id_loader : re-iterable with a length (e.g. a DataLoader) of ``(inputs, labels)`` batches.
    method : a ``Method`` (``methods.create_method("oe")``, ...). Its ``prepare`` runs first (architecture change).
    outlier_loader : re-iterable of outlier batches (tensors or ``(inputs, ...)`` tuples; labels are ignored);
        required when ``method.needs_outliers``.
    recipe : optimiser settings; default ``method.official_recipe()``.
    seed : seeds torch's global generator (initialisation of new layers, DataLoader shuffling) and the generator of
        the method's own randomness (mixing, k-means, DOS's random fill): the same seed gives the same weights.
    device : where the model and batches go.
    progress : tqdm bar over all steps.
    checkpoint_dir, checkpoint_every : write ``epoch-NNNN.safetensors`` to ``checkpoint_dir`` every
        ``checkpoint_every`` epochs (and after the last); see ``checkpoint.save_checkpoint``.
    resume_from : a checkpoint written by this loop with the same method and recipe; training continues after its
        epoch, with its optimizer and random states (torch's global generator, the CUDA generator of ``device``
        when training on CUDA, the method's, and the loaders' own ``generator`` where they have one), so the result
        equals an uninterrupted run on the same device type. On CUDA this also needs deterministic kernels
        (``torch.use_deterministic_algorithms(True)``); a CPU checkpoint resumed on CUDA, or the reverse, continues
        with the CUDA generator as seeded.

    Returns
    -------
    TrainResult with the model in eval mode.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, Method):
        raise TypeError(f"method must be an oodguard.train Method (e.g. create_method('oe')), got {method!r}")
    if method.needs_outliers and outlier_loader is None:
        raise ValueError(f"{method.name} trains with auxiliary outliers; pass outlier_loader")
    if checkpoint_every is not None and (checkpoint_dir is None or checkpoint_every < 1):
        raise ValueError("checkpoint_every needs a checkpoint_dir and must be >= 1")
    try:
        if not isinstance(id_loader, Sized):
            raise TypeError
        steps_per_epoch = len(id_loader)
    except TypeError:
        raise TypeError("id_loader must have a length (e.g. a DataLoader); the schedule needs the step count") from None
    if steps_per_epoch == 0:
        raise ValueError("id_loader is empty; pass at least one batch")
    recipe = recipe or method.official_recipe()
    device = torch.device(device)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = method.prepare(model).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0,
        weight_decay=recipe.weight_decay,
    )  # fmt: skip
    identity = {"method": method.config(), "recipe": recipe_dict(recipe), "seed": seed}
    result = TrainResult(model=model)
    start_epoch = 0
    if resume_from is not None:
        meta, extra = load_checkpoint(resume_from, model, optimizer)
        if {k: meta.get(k) for k in identity} != identity:
            raise ValueError(f"resume_from: {resume_from} was written for {meta.get('method')} with another recipe or "
                             "seed; resume with the same method, recipe and seed")  # fmt: skip
        start_epoch = int(meta["epoch"])
        result.epoch_losses = list(meta.get("epoch_losses", []))
        torch.set_rng_state(extra["rng_global"])
        cuda = _cuda_index(device)
        if cuda is not None and "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"], cuda)
        generator.set_state(extra["rng_method"])
        for name, loader_generator in _loader_generators(id_loader, outlier_loader).items():
            if name in extra:
                loader_generator.set_state(extra[name])
    total_steps = recipe.epochs * steps_per_epoch
    step = start_epoch * steps_per_epoch
    started = time.perf_counter()
    model.train()
    with tqdm(total=total_steps, initial=step, desc=f"train {method.name}", disable=not progress) as bar:
        for epoch in range(start_epoch, recipe.epochs):
            outliers_iter = _Cycle(outlier_loader) if method.needs_outliers and outlier_loader is not None else None
            total, count = 0.0, 0
            for batch in id_loader:
                inputs, labels = _inputs_and_labels(batch, "id_loader")
                if labels is None:
                    raise ValueError("id_loader must yield (inputs, labels); the methods train a classifier")
                inputs, labels = inputs.to(device), labels.to(device)
                outliers = None
                if outliers_iter is not None:
                    candidates, _ = _inputs_and_labels(outliers_iter.next(), "outlier_loader")
                    outliers = method.sampler(model, candidates.to(device), generator)
                for group in optimizer.param_groups:
                    group["lr"] = recipe.learning_rate(step, epoch, total_steps)
                loss = method.loss(model, inputs, labels, outliers, generator)
                if not bool(torch.isfinite(loss.detach())):
                    raise FloatingPointError(
                        f"{method.name}: the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; lower "
                        "the learning rate or check the inputs for NaN/inf"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count, step = total + loss.item(), count + 1, step + 1
                bar.update(1)
            result.epoch_losses.append(total / count)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4f}")
            last = epoch + 1 == recipe.epochs
            if checkpoint_every is not None and ((epoch + 1) % checkpoint_every == 0 or last):
                meta = {**identity, "epoch": epoch + 1, "epoch_losses": result.epoch_losses}
                assert checkpoint_dir is not None  # checked on entry
                path = Path(checkpoint_dir) / f"epoch-{epoch + 1:04d}.safetensors"
                states = _random_states(generator, device, id_loader, outlier_loader)
                save_checkpoint(path, model, optimizer, meta=meta, tensors=states)
                result.checkpoints.append(path)
    result.steps = step
    result.seconds = time.perf_counter() - started
    result.model = model.eval()
    if any(math.isnan(v) for v in result.epoch_losses):  # pragma: no cover - guarded per step above
        raise FloatingPointError(f"{method.name}: NaN loss")
    return result
