"""Attribution maps for the benchmark report: what drives the OOD score of the highest-scoring inputs of each set.

For an image benchmark run with its model, the report shows, per OOD set, the ``per_set`` inputs with the highest
score of one differentiable detector (``energy`` by default: no fit, and the paper's setting of an uncertainty read
from the logits) next to their UA-Backprop maps (:mod:`oodguard.explain`; one forward and one backward pass for
those few inputs only). The scores come from the outputs the run already extracted. When the maps cannot be made
(no torch model, inputs that are not image tensors ``[N, C, H, W]``, outputs read from shard folders, or a run
without model detectors), the diagnostic holds the reason instead, which the report prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from oodguard.benchmark.spec import Benchmark
from oodguard.detectors import base as detector_registry
from oodguard.detectors.base import OutputDetector
from oodguard.explain import check_explainable, explain_inputs

__all__ = ["explanation_maps", "DEFAULT_DETECTOR", "PER_SET"]

DEFAULT_DETECTOR = "energy"
PER_SET = 4


def _as_bytes(values: np.ndarray, low: float | None = None, high: float | None = None) -> list[list[int]]:
    """A map or image ``[H, W]`` scaled to 0-255 by ``[low, high]`` (default its own range; a constant one gives
    zeros): compact in JSON."""
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    span = high - low
    scaled = np.zeros_like(values) if span <= 0 else np.clip((values - low) / span, 0.0, 1.0)
    return np.rint(255 * scaled).astype(np.int64).tolist()


def explanation_maps(
    benchmark: Benchmark,
    outputs: Mapping[str, Any],
    *,
    skip_reason: str | None = None,
    detector: str = DEFAULT_DETECTOR,
    per_set: int = PER_SET,
    device: str = "cpu",
    feature_layer: str | None = None,
    output_key: str | int | None = None,
) -> dict[str, Any]:
    """``{"detector", "per_set", "sets": [{"name", "group", "scores", "images", "maps"}]}``, or ``{"skipped": why}``.

    ``outputs`` are the run's extracted outputs by split name; ``skip_reason`` (e.g. no model detectors) skips.
    Images are shown as the mean over channels on one grey scale (the range of all OOD inputs); maps are scaled to
    0-255 each by its own range.
    """
    if skip_reason is not None:
        return {"skipped": skip_reason}
    splits = [split for split in benchmark.ood if split.group != "ambiguous"]
    if not isinstance(benchmark.model, torch.nn.Module):
        return {"skipped": "the model is not a torch module (no gradients through it)"}
    if not splits or any(not isinstance(s.data, (torch.Tensor, np.ndarray)) or s.data.ndim != 4 for s in splits):
        return {"skipped": "the OOD sets are not image tensors [N, C, H, W]"}
    scorer = detector_registry.create(detector)
    if not isinstance(scorer, OutputDetector):
        raise ValueError(f"detector {detector!r} does not score model outputs; pick one of oodguard.explain's list")
    if scorer.needs_fit:
        scorer.fit(outputs[benchmark.fit.name])
    check_explainable(scorer)
    sets = []
    # images share one grey scale (the range of every OOD input), so that a constant image shows its level
    low = min(float(np.asarray(split.data).min()) for split in splits)
    high = max(float(np.asarray(split.data).max()) for split in splits)
    for split in splits:
        scores = np.asarray(scorer.score(outputs[split.name]), dtype=np.float64)
        top = np.argsort(-scores, kind="stable")[:per_set]
        images = torch.as_tensor(np.asarray(split.data[top.tolist()]))
        maps = explain_inputs(benchmark.model, scorer, images, device=device, feature_layer=feature_layer,
                              output_key=output_key)  # fmt: skip
        shown = images.to(torch.float64).mean(dim=1).numpy()
        sets.append(
            {
                "name": split.name,
                "group": split.group,
                "scores": [round(float(v), 4) for v in scores[top]],
                "images": [_as_bytes(image, low, high) for image in shown],
                "maps": [_as_bytes(m) for m in maps.astype(np.float64)],
            }
        )
    return {"detector": detector, "per_set": per_set, "sets": sets}
