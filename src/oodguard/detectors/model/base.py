"""The model-detector protocol: detectors that run the model themselves.

Most detectors score cached :class:`~oodguard.outputs.ModelOutputs`. A model detector needs the model (a gradient
with respect to the input or to a layer for each scored sample, or several transformed copies of the input), so it
fits and scores model **inputs** through a :class:`~oodguard.extraction.ModelRunner`, the one object that runs the
model with autograd (device, batch size, input normalisation, final linear layer)::

    runner = ModelRunner(model, input_std=(0.247, 0.243, 0.261), device="cuda")
    det = create("odin", temperature=1000, epsilon=0.0014).attach(runner)
    det.fit(id_inputs)               # a no-op for detectors without fitted state
    scores = det.score(test_inputs)  # higher = more OOD

* ``fit`` and ``score`` take inputs: a tensor or numpy array ``[N, ...]``, a ``Dataset``, a ``DataLoader``, or an
  iterable of batches (labels inside the batches or as ``labels=`` where a detector needs them). Numpy inputs give
  numpy scores, anything else torch scores (float64, on the CPU).
* Consumers that hold a model (benchmark runner, Guard, CLI) call :meth:`fit_from` / :meth:`score_from` with a
  :class:`~oodguard.detectors.base.Source` carrying the inputs and a runner; a detector without a runner takes the
  source's.
* ``save``/``load`` keep parameters and fitted state; the runner (the model) is not saved: attach it again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from oodguard.detectors.base import Detector, NotFittedError, Source, refuse_non_finite
from oodguard.extraction.model_runner import ModelRunner

__all__ = ["ModelDetector"]


class ModelDetector(Detector):
    """Base of detectors that run the model: ``fit``/``score`` take inputs and use an attached runner.

    Subclasses implement ``_score_model(runner, data, labels, progress) -> float tensor [N]`` and, when
    ``needs_fit``, ``_fit_model(runner, data, labels) -> dict of state tensors``.
    """

    protocol: ClassVar[str] = "model"
    requires = frozenset({"model"})
    fit_requires = frozenset({"model"})
    #: Dimensions of the inputs with the batch axis (4 for images ``[N, C, H, W]``), or None for any inputs.
    input_ndim: ClassVar[int | None] = None
    #: ``"tensors"``: inputs of the model, run through a runner; ``"texts"``: raw texts, embedded by an attached
    #: text encoder (consumers hand them over as ``Source(texts=..., encoder=...)``).
    input_kind: ClassVar[str] = "tensors"

    @classmethod
    def encoder_problem(cls, encoder: Any) -> str | None:
        """Why this detector cannot embed texts with ``encoder`` (None: it can); for ``input_kind == "texts"``."""
        return None if cls.input_kind == "texts" else f"{cls.name} runs the model on tensors, not a text encoder"

    def __init__(self) -> None:
        super().__init__()
        self.runner_: ModelRunner | None = None

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        """Why this detector cannot run on ``model`` at all (e.g. MC dropout on a model without dropout layers), or
        None; the benchmark runner leaves such a detector out with this reason instead of reporting a failure."""
        return None

    # ------------------------------------------------------------------ runner
    def attach(self, runner: ModelRunner | nn.Module, **runner_options: Any) -> ModelDetector:
        """Give the detector a :class:`ModelRunner` (or a model, wrapped with ``runner_options``); returns self."""
        if isinstance(runner, nn.Module):
            runner = ModelRunner(runner, **runner_options)
        elif runner_options:
            raise ValueError(f"{self.name}: runner options {sorted(runner_options)} apply only when attaching a model")
        if not isinstance(runner, ModelRunner):
            raise TypeError(
                f"{self.name}: attach expects a ModelRunner or a torch.nn.Module, got {type(runner).__name__}"
            )
        self.runner_ = runner
        return self

    @property
    def runner(self) -> ModelRunner:
        if self.runner_ is None:
            raise RuntimeError(
                f"{self.name}: no model attached; this detector runs the model, so call "
                f".attach(ModelRunner(model, ...)) first (a loaded detector must be attached again)"
            )
        return self.runner_

    # ------------------------------------------------------------------ hooks
    def _fit_model(self, runner: ModelRunner, data: Any, labels: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _fit_model")

    def _score_model(self, runner: ModelRunner, data: Any, labels: Any, progress: bool | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _score_model")

    # ------------------------------------------------------------------ public API
    def fit(self, data: Any = None, *, labels: Any = None) -> ModelDetector:
        """Fit on in-distribution inputs (a no-op for detectors without fitted state) and return ``self``."""
        if not self.needs_fit:
            self.state_ = {}
            return self
        if data is None:
            raise ValueError(f"{self.name}: fit needs in-distribution inputs (data=)")
        self.stats_ = None
        self.state_ = self._fit_model(self.runner, data, labels)
        return self

    def score(self, data: Any, *, labels: Any = None, progress: bool | None = None) -> np.ndarray | torch.Tensor:
        """OOD scores ``[N]`` of the inputs ``data``, higher = more likely OOD."""
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit(...) on in-distribution inputs before score(...)")
        scores = self._score_model(self.runner, data, labels, progress).to("cpu", torch.float64)
        refuse_non_finite(self.name, scores)
        return scores.numpy() if isinstance(data, np.ndarray) else scores

    __call__ = score

    def fit_from(self, source: Source) -> ModelDetector:
        self._take_runner(source)
        return self.fit(source.data, labels=source.labels)

    def score_from(self, source: Source) -> np.ndarray | torch.Tensor:
        self._take_runner(source)
        return self.score(source.data)

    def _take_runner(self, source: Source) -> None:
        if self.runner_ is not None:
            return
        if source.runner is None:
            raise ValueError(
                f"{self.name}: runs the model itself (gradients through it), but only cached outputs were given; "
                "evaluate it where the model is available (a Benchmark with its model, a Guard with its model)"
            )
        self.attach(source.runner)
        if source.data is None:
            raise ValueError(f"{self.name}: runs the model on the inputs, but the source holds no inputs")
