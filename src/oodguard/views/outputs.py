"""Model outputs of test-time views, extracted and cached like any dataset, so any detector can be averaged over views.

A view (:class:`oodguard.views.View`) is a named, seeded input transform. :func:`extract_views` runs the model once
per view through :func:`oodguard.extraction.extract`; with ``cache_dir`` each view's outputs are stored under a key made
of the model's fingerprint, the view's key (corruption, severity, seed, pixel scale), the version of the corruption
code, the chunking of the random draws and the content hash of the *source* data. The corrupted images are therefore
never hashed (a hashing pass would cost a second corruption of every image), and a cached view costs no corruption and
no forward pass at all. :func:`average_over_views` then averages any fitted output-based detector over the views, which
is what CoVer does with its base detector.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from oodguard import detectors
>>> from oodguard.views.corruptions import View
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
>>> images = torch.rand(6, 1, 4, 4)
>>> views = [View("identity"), View("bright", "brightness", 2, seed=0)]
>>> outputs = extract_views(model, images, views, progress=False)
>>> sorted(outputs)
['bright-s2-seed0', 'identity']
>>> average_over_views(detectors.create("energy"), outputs).shape
torch.Size([6])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from oodguard.extraction.extract import content_hash, extract
from oodguard.outputs import ModelOutputs
from oodguard.views.corruptions import VIEWS_VERSION, View, ViewDataset

__all__ = ["average_over_views", "extract_views", "iter_view_outputs", "view_dataset_key"]


def view_dataset_key(view: View, source_hash: str, chunk_rows: int) -> str:
    """The extraction cache's dataset key of ``view`` applied to data whose content hash is ``source_hash``."""
    return (
        f"oodguard-view|{view.key}|pixel_scale={view.pixel_scale!r}|views_version={VIEWS_VERSION}|"
        f"chunk_rows={chunk_rows}|source={source_hash}"
    )


def _check_views(views: Sequence[View]) -> list[View]:
    views = list(views)
    if not views or not all(isinstance(view, View) for view in views):
        raise ValueError("views: expected a non-empty list of oodguard.views.View (see recommended_views())")
    keys = [view.key for view in views]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"views: {repeated} listed more than once; give each view once")
    return views


def iter_view_outputs(
    model: nn.Module,
    data: Any,
    views: Sequence[View],
    *,
    labels: Any = None,
    cache_dir: str | os.PathLike | None = None,
    chunk_rows: int = 256,
    progress: bool = True,
    desc: str = "view",
    **extract_options: Any,
) -> Iterator[tuple[View, ModelOutputs]]:
    """``(view, outputs)`` per view, one at a time (memory holds one view's outputs), cached when ``cache_dir``.

    ``data`` holds images ``[N, C, H, W]`` in [0, 1] (tensor, array, ``(images, labels)`` pair or map-style
    Dataset, as :class:`~oodguard.views.ViewDataset` takes them); ``extract_options`` go to
    :func:`oodguard.extraction.extract` (``layers``, ``feature_layer``, ``device``, ``batch_size``).
    """
    views = _check_views(views)
    source = None
    for view in views:
        dataset = ViewDataset(data, view, chunk_rows=chunk_rows)
        key = None
        if cache_dir is not None:
            if source is None:  # hashed once, only when caching; labels= are hashed by extract itself
                source = _source_hash(dataset)
            key = view_dataset_key(view, source, chunk_rows)
        outputs = extract(model, dataset, labels=labels, cache_dir=cache_dir, dataset_key=key, progress=progress,
                          desc=f"{desc} {view.name}", **extract_options)  # fmt: skip
        yield view, outputs


def _source_hash(dataset: ViewDataset) -> str:
    """Content hash of the images (and labels) a view dataset corrupts, before any corruption."""
    data, labels = dataset.source()
    if labels is not None or not isinstance(data, torch.utils.data.Dataset):
        return content_hash(data, labels)  # a tensor: hashed in slices, no per-item collation
    return content_hash(ViewDataset(data, View("identity")))  # the identity view yields the items as images


def extract_views(model: nn.Module, data: Any, views: Sequence[View], **options: Any) -> dict[str, ModelOutputs]:
    """Outputs of every view, by view key (see :func:`iter_view_outputs` for the arguments)."""
    return {view.key: outputs for view, outputs in iter_view_outputs(model, data, views, **options)}


def average_over_views(detector: Any, outputs: Mapping[str, ModelOutputs] | Iterable[ModelOutputs]) -> torch.Tensor:
    """The unweighted mean of a fitted output-based detector's scores over the views' outputs (float64 ``[N]``)."""
    parts = outputs.values() if isinstance(outputs, Mapping) else outputs  # may be a generator: one view in memory
    total, count, rows = None, 0, None
    for part in parts:
        if rows is not None and len(part) != rows:
            raise ValueError(f"outputs: the views have {rows} and {len(part)} rows; every view keeps every row")
        rows = len(part)
        scores = detector.score(part)
        scores = torch.from_numpy(scores) if isinstance(scores, np.ndarray) else scores
        scores = scores.to("cpu", torch.float64)
        total = scores if total is None else total + scores
        count += 1
    if total is None:
        raise ValueError("outputs: give the outputs of at least one view")
    return total / count
