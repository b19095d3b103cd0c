"""Fit and score over shards on many workers: ``fit_distributed`` and ``score_distributed``.

A detector whose fit is an additive statistic (``supports_partial_fit``: Mahalanobis, RMDS, SHE, KNN, KLM, ...)
fits each shard on its own worker; the per-shard statistics are merged pairwise in a tree (in float64; class means
and covariances with Chan's pairwise update), so the result equals a single-process fit up to rounding. Scoring maps
the fitted detector over the shards and keeps their order.

``engine="ray"`` runs the shards as Ray tasks (``pip install 'oodguard[ray]'``) on the Ray the caller is connected
to, or a local one; ``engine="local"`` runs the same steps in this process. A shard folder is opened by each worker
from its path, so on a cluster of several machines it must be on storage they share; a list of in-memory
ModelOutputs is sent to the workers instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard.detectors.base import Detector, NotFittedError, OutputDetector, clone
from oodguard.outputs import ModelOutputs
from oodguard.ray_support import check_engine, connect
from oodguard.shards import ShardedOutputs, open_shards

__all__ = ["fit_distributed", "score_distributed"]

Shards = ShardedOutputs | str | os.PathLike | Sequence[ModelOutputs]


# ---------------------------------------------------------------------------------------------- shards
class _ShardRef:
    """One shard as a worker can reach it: a folder and an index, or outputs sent along."""

    def __init__(
        self, label: str, directory: Path | None = None, index: int = 0, outputs: Any = None, stored: bool = False
    ) -> None:
        self.label, self.directory, self.index, self.outputs = label, directory, index, outputs
        self.stored = stored  # outputs is a reference into Ray's object store

    def load(self) -> ModelOutputs:
        if self.directory is not None:
            return open_shards(self.directory).shard(self.index)
        if self.stored:
            import ray

            return ray.get(self.outputs)
        return self.outputs


def _shard_refs(shards: Shards) -> list[_ShardRef]:
    if isinstance(shards, (str, os.PathLike)):
        shards = open_shards(shards)
    if isinstance(shards, ShardedOutputs):
        return [
            _ShardRef(f"{info['file']} of {shards.directory}", shards.directory.resolve(), index)
            for index, info in enumerate(shards.manifest["shards"])
        ]
    if isinstance(shards, ModelOutputs) or not isinstance(shards, Sequence) or not shards:
        raise ValueError(
            "shards: expected a shard folder (extract(..., out_dir=DIR)), ModelOutputs.open(DIR) or a non-empty list "
            f"of ModelOutputs, got {type(shards).__name__}"
        )
    for index, part in enumerate(shards):
        if not isinstance(part, ModelOutputs):
            raise ValueError(f"shards[{index}]: expected ModelOutputs, got {type(part).__name__}")
    return [_ShardRef(f"shard {index}", outputs=part) for index, part in enumerate(shards)]


def _failure(what: str, ref: _ShardRef, error: BaseException) -> RuntimeError:
    return RuntimeError(f"{what} failed on {ref.label}: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------- the steps
def _fit_one(template: OutputDetector, ref: _ShardRef, drop_ood: bool) -> OutputDetector | str:
    """A clone of ``template`` fitted on one shard's statistics; on failure the message (raised by the caller)."""
    try:
        part = clone(template)
        assert isinstance(part, OutputDetector)
        outputs = ref.load()
        if drop_ood and outputs.labels is not None and bool(outputs.is_ood.all()):
            return part  # nothing in-distribution here: an empty part, skipped by the merge
        part.partial_fit(outputs, drop_ood=drop_ood)
        return part
    except Exception as error:  # reported with the shard it came from
        return str(_failure("fit_distributed", ref, error))


def _merge_two(a: OutputDetector, b: OutputDetector) -> OutputDetector:
    if b.stats_ is None:
        return a
    if a.stats_ is None:
        return b
    return a.merge(b)


def _score_one(detector: OutputDetector, ref: _ShardRef) -> np.ndarray | str:
    try:
        return np.asarray(torch.as_tensor(detector.score(ref.load())).to(torch.float64))
    except Exception as error:
        return str(_failure("score_distributed", ref, error))


def _raise_failures(results: list[Any]) -> None:
    errors = [result for result in results if isinstance(result, str)]
    if errors:
        more = f" (and {len(errors) - 1} more shard(s) failed)" if len(errors) > 1 else ""
        raise RuntimeError(errors[0] + more)


def _check_additive(detector: Detector) -> OutputDetector:
    if not isinstance(detector, OutputDetector):
        raise TypeError(f"{detector.name}: a model detector runs the model itself; fit it with fit_from on one machine")
    if not detector.supports_partial_fit:
        raise TypeError(
            f"{detector.name}: its fit has no additive statistics (with these parameters), so shards cannot be fitted "
            "apart and merged; fit it on one machine with detector.fit(ModelOutputs.open(DIR)), which reads every "
            "row into memory"
        )
    return detector


# ---------------------------------------------------------------------------------------------- public API
def fit_distributed(
    detector: Detector,
    shards: Shards,
    *,
    engine: str = "ray",
    drop_ood: bool = False,
    address: str | None = None,
) -> Detector:
    """Fit ``detector`` on every shard, each on a worker, and merge the statistics in a tree; returns ``detector``.

    Equal to ``detector.fit`` on all rows up to float64 rounding. Only detectors with additive statistics qualify
    (``detector.supports_partial_fit``); others raise TypeError saying so. A failure on a worker raises one
    RuntimeError naming the shard and the cause.

    Parameters
    ----------
    detector : OutputDetector
        Its parameters are used; any earlier fit is replaced.
    shards : shard folder, ShardedOutputs or list of ModelOutputs
    engine : "ray" or "local"
    drop_ood : bool
        Drop OOD-labelled rows (label < 0) instead of refusing them.
    address : str, optional
        A Ray cluster to connect to when not connected yet (default: the running one, else a local one).
    """
    check_engine(engine)
    template = _check_additive(detector)
    refs = _shard_refs(shards)
    if engine == "local":
        parts: list[Any] = [_fit_one(template, ref, drop_ood) for ref in refs]
        _raise_failures(parts)
        while len(parts) > 1:
            parts = [_merge_two(*parts[i : i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        merged = parts[0]
    else:
        merged = _fit_on_ray(template, refs, drop_ood, address)
    if merged.stats_ is None:
        raise ValueError(f"{detector.name}: the shards hold no in-distribution row to fit on")
    template.stats_ = merged.stats_
    template.meta_ = dict(merged.meta_)
    template._statistics_changed()
    return template._finish_fit()


def _fit_on_ray(template: OutputDetector, refs: list[_ShardRef], drop_ood: bool, address: str | None) -> Any:
    ray = connect(address)
    fit_one = ray.remote(num_cpus=1)(_fit_one)
    template_ref = ray.put(template)
    parts = [fit_one.remote(template_ref, ref if ref.directory else _sent(ray, ref), drop_ood) for ref in refs]
    fitted = ray.get(parts)
    _raise_failures(fitted)
    # tree reduction on the workers: log2(shards) rounds of pairwise merges
    merge = ray.remote(num_cpus=1)(_merge_two)
    level = [ray.put(part) for part in fitted]
    while len(level) > 1:
        level = [merge.remote(*level[i : i + 2]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return ray.get(level[0])


def _sent(ray: Any, ref: _ShardRef) -> _ShardRef:
    """In-memory outputs go through Ray's object store once, not inside every task's arguments."""
    return _ShardRef(ref.label, outputs=ray.put(ref.outputs), stored=True)


def score_distributed(
    detector: Detector, shards: Shards, *, engine: str = "ray", address: str | None = None
) -> torch.Tensor:
    """Scores of every row of ``shards`` (float64, in shard order), each shard scored on a worker."""
    check_engine(engine)
    if not isinstance(detector, OutputDetector):
        raise TypeError(f"{detector.name}: a model detector runs the model itself; score it with score_from")
    if not detector.is_fitted:
        raise NotFittedError(f"{detector.name}: call fit(...) or fit_distributed(...) before score_distributed")
    refs = _shard_refs(shards)
    if engine == "local":
        scores: list[Any] = [_score_one(detector, ref) for ref in refs]
    else:
        ray = connect(address)
        score_one = ray.remote(num_cpus=1)(_score_one)
        detector_ref = ray.put(detector)
        scores = ray.get([score_one.remote(detector_ref, ref if ref.directory else _sent(ray, ref)) for ref in refs])
    _raise_failures(scores)
    return torch.from_numpy(np.concatenate(scores))
