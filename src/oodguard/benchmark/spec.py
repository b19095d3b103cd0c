"""A benchmark is data: a model, a fit set, an ID test set, and named OOD sets in groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: OOD groups, in the order reports show them. "covariate" sets share the ID label space; "ambiguous" sets lie
#: between two ID classes (not OOD: reported beside the OOD groups, see ``oodguard.benchmark.side_views``).
GROUPS = ("near", "far", "covariate", "synthetic", "ambiguous")


@dataclass
class DataSplit:
    """Inputs the model can run on (anything ``oodguard.extraction.extract`` accepts) and optional labels.

    ``data`` is a tensor/array of inputs ``[N, ...]``, a torch Dataset, a DataLoader or an iterable
    of batches. ``labels`` (``[N]``, integers) is given when ``data`` holds inputs only; OOD sets of a
    new label space use ``-1``. ``texts`` are the raw texts behind ``data`` when ``data`` are their embeddings (the
    ``text`` benchmark), for detectors that embed texts themselves (see ``Benchmark.encoder``).
    """

    name: str
    data: Any
    labels: Any = None
    group: str = "id"
    description: str = ""
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.group not in ("id", *GROUPS):
            raise ValueError(f"{self.name}: group must be 'id' or one of {', '.join(GROUPS)}, got {self.group!r}")


@dataclass
class Benchmark:
    """Everything a benchmark run needs. ``ood`` lists the OOD sets; each carries its group."""

    name: str
    model: torch.nn.Module
    fit: DataSplit
    test: DataSplit
    ood: list[DataSplit]
    validation: DataSplit | None = None
    description: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    #: Intermediate layers (module names) to extract too, for detectors that read them (e.g. ``gram``).
    layers: list[str] = field(default_factory=list)
    #: Default hyperparameters per detector for this benchmark (e.g. zero-shot label embeddings, layer lists).
    #: The runner merges a user's parameters over these; a detector whose required parameters are all given
    #: here runs by default.
    detector_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The text encoder that embedded every split's ``texts`` into its ``data``. With it (and texts on every split)
    #: the runner also runs the detectors that embed texts themselves (``input_kind == "texts"``, e.g. ``ahm``).
    encoder: Any = None
    #: Rows the benchmark computes itself, beside the registered detectors: name -> a callable that returns scores
    #: (higher = more OOD) for ``"id"`` (the ID test split) and for every OOD set by name. For methods that need a
    #: model of their own, e.g. the ``text`` benchmark's ``bam_lora`` (LoRA fine-tuning of the encoder, then boxes
    #: over the LoRA layers). The runner calls one only when its row is asked for (by default, every one).
    extra_jobs: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [split.name for split in self.ood]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{self.name}: OOD set names must be unique, repeated: {duplicates}")
        if not self.ood:
            raise ValueError(f"{self.name}: a benchmark needs at least one OOD set")

    def splits(self) -> list[DataSplit]:
        """Fit, validation (when there is one), ID test and every OOD split."""
        return [self.fit, *([self.validation] if self.validation is not None else []), self.test, *self.ood]

    def text_encoder(self) -> Any:
        """``encoder`` when every split carries its texts (detectors that embed texts can run), else None."""
        if self.encoder is None or any(split.texts is None for split in self.splits()):
            return None
        return self.encoder

    def groups(self) -> dict[str, list[str]]:
        """OOD set names per group, in the order of ``GROUPS``."""
        return {g: [s.name for s in self.ood if s.group == g] for g in GROUPS if any(s.group == g for s in self.ood)}
