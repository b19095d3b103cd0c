"""Guard a model at run time: an OOD score, a conformal p-value and a decision for every input.

A :class:`Guard` is an optional torch model, a detector, and a decision rule calibrated on in-distribution
(ID) validation data:

1. ``fit(id_data)`` runs the model (if any) and fits the detector on ID training data.
2. ``calibrate(id_validation)`` scores **other** ID data (never the fit data: a detector scores its own fit
   data optimistically low, which breaks every guarantee below) and keeps the sorted calibration scores.
3. ``guard(x)`` returns, per input, the model's prediction, the OOD score (higher = more OOD), the conformal
   p-value and the decision; ``guard_batch(x, fdr=...)`` decides a batch with Benjamini-Hochberg.

Decision rules
--------------
``"threshold"`` (default): flag when ``score > threshold_``, the smallest calibration score that keeps at
least ``tpr`` of the calibration set accepted (the ID-TPR convention of :func:`oodguard.metrics.fpr_at_tpr`).
On fresh ID data the expected false-alarm rate is ``false_alarm_rate_`` (slightly above ``1 - tpr``).

``"pvalue"`` (``calibrate(..., alpha=a)``): flag when the conformal p-value is ``<= a``. The expected
false-alarm rate on fresh ID data is at most ``a`` (finite-sample, distribution-free, averaged over the
calibration draw). With ``correction="dkwm"`` or ``"simes"`` the p-values are calibration-conditional: with
probability ``>= 1 - delta`` over the calibration draw, the false-alarm rate *given this calibration set*
is at most ``a``. See :mod:`oodguard.conformal`.

Saving
------
``guard.save(dir)`` writes ``guard.json`` (format, version, decision rule, detector, model description with
architecture and weight fingerprints, input contract, a sha256 checksum of every other file, and a seal over all
of it: sha256, or HMAC-SHA256 with a signing key), ``calibration.safetensors``, the detector (``detector/``, via
:meth:`Detector.save`), for a model guard ``model.safetensors`` (the state dict) and, with a failure monitor
(:meth:`Guard.fit_failure_monitor`), ``failure_monitor.safetensors``. :func:`load_guard` checks
the seal, refuses files the guard does not list, checks every checksum and setting, and never imports, runs or
unpickles anything from the folder: a model guard is rebuilt by a factory the *caller* names, and must match the
recorded fingerprints (see :mod:`oodguard.guard_manifest`).

``torch.export`` programs are not offered as a model format: ``torch.export.load`` unpickles parts of the
archive (its documentation warns "uses pickle under the hood"; weights and constants may be stored with
``torch.save``, and deserialisation falls back to ``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard import persist
from oodguard.conformal import (
    CORRECTIONS,
    benjamini_hochberg,
    calibration_conditional,
    check_correction,
    check_fraction,
    false_alarm_rate,
    minimum_calibration_size,
    simes_sequence,
    sorted_pvalues,
)
from oodguard.detectors import base as detector_base
from oodguard.detectors.base import Detector, NotFittedError, Source
from oodguard.explain import explain_inputs
from oodguard.extraction.extract import extract
from oodguard.extraction.model_runner import ModelRunner
from oodguard.failure_monitor import FailureMonitor
from oodguard.guard_manifest import (
    DECISION_LOG_FILES,
    architecture_digest,
    check_folder_contents,
    check_seal,
    seal,
    signing_key,
    verified_file,
    weights_digest,
)
from oodguard.input_contract import DEFAULT_MARGIN, InputContract
from oodguard.metrics import threshold_at_tpr
from oodguard.model_factory import build_model as _build_model
from oodguard.model_factory import factory_name as _factory_name
from oodguard.outputs import ModelOutputs, as_outputs
from oodguard.persist import sha256_of_file

__all__ = ["Guard", "GuardResult", "load_guard", "FORMAT_VERSION"]

FORMAT = "oodguard.guard"
#: Version of the saved-guard layout; :func:`load_guard` refuses any other.
#: Version 3: one seal (or signature) over every setting and checksum, model fingerprints, the input contract.
#: Version 2: calibration and model files in oodguard's file format (version 1: plain safetensors); both still read.
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
GUARD_FILE = "guard.json"
CALIBRATION_FILE = "calibration.safetensors"
MODEL_FILE = "model.safetensors"
FAILURE_MONITOR_FILE = "failure_monitor.safetensors"
DETECTOR_DIR = "detector"
RULES = ("threshold", "pvalue")
_FINGERPRINT_ROWS = 32


@dataclass(frozen=True, eq=False)
class GuardResult:
    """Per-input results of :meth:`Guard.guard`, as numpy arrays of length ``N``.

    Attributes
    ----------
    prediction : int64 ``[N]``
        The model's class (argmax of the logits, or of ``features @ W.T + b`` when only features and the
        head are known); ``-1`` when neither is available.
    score : float64 ``[N]``
        The detector's OOD score, higher = more likely OOD.
    pvalue : float64 ``[N]``
        Conformal p-value against the calibration set (calibration-conditional when a correction was set).
        Small = unlike the ID calibration data.
    is_ood : bool ``[N]``
        The decision.
    reason : list of str or None, length ``N``
        Why an input was decided OOD without being scored: a value outside the range seen at fit, NaN or
        infinity (see :class:`~oodguard.input_contract.InputContract`). Such inputs have score ``inf``,
        p-value 0 and prediction -1. ``None`` for inputs that were scored.
    failure_probability : float64 ``[N]`` or None
        Only for a guard with a failure monitor (:meth:`Guard.fit_failure_monitor`): the probability that the
        system fails on the input, learned from logged outcomes; NaN for inputs decided OOD without scoring.
    failure_flag : bool ``[N]`` or None
        ``failure_probability >= `` the monitor's threshold (True for inputs not scored).
    """

    prediction: np.ndarray
    score: np.ndarray
    pvalue: np.ndarray
    is_ood: np.ndarray
    reason: list[str | None] = field(default_factory=list)
    failure_probability: np.ndarray | None = None
    failure_flag: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.reason:
            object.__setattr__(self, "reason", [None] * int(self.score.shape[0]))

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def to_pandas(self) -> Any:
        """A pandas DataFrame: one row per input, columns prediction, score, pvalue, is_ood, reason (and
        failure_probability, failure_flag with a failure monitor).

        Examples
        --------
        >>> r = GuardResult(np.array([2, 0]), np.array([0.5, np.inf]), np.array([0.25, 0.0]), np.array([False, True]),
        ...                 [None, "inputs: value 255 outside [-0.25, 1.25]"])
        >>> r.to_pandas()[["prediction", "is_ood"]].values.tolist()
        [[2, False], [0, True]]
        """
        import pandas as pd

        columns = {
            "prediction": self.prediction,
            "score": self.score,
            "pvalue": self.pvalue,
            "is_ood": self.is_ood,
            "reason": pd.Series(self.reason, dtype="object"),
        }
        if self.failure_probability is not None and self.failure_flag is not None:
            columns |= {"failure_probability": self.failure_probability, "failure_flag": self.failure_flag}
        return pd.DataFrame(columns)

    def to_records(self) -> list[dict[str, Any]]:
        """One plain-Python dict per input (JSON-serialisable: the score of an unscored input is ``None``, and so is
        its failure probability).

        Examples
        --------
        >>> r = GuardResult(np.array([2]), np.array([0.5]), np.array([0.25]), np.array([False]))
        >>> r.to_records()
        [{'prediction': 2, 'score': 0.5, 'pvalue': 0.25, 'is_ood': False, 'reason': None}]
        """
        records = [
            {"prediction": a, "score": b if np.isfinite(b) else None, "pvalue": c, "is_ood": d, "reason": e}
            for a, b, c, d, e in zip(
                self.prediction.tolist(),
                self.score.tolist(),
                self.pvalue.tolist(),
                self.is_ood.tolist(),
                self.reason,
                strict=True,
            )
        ]
        if self.failure_probability is not None and self.failure_flag is not None:
            for record, p, flag in zip(
                records, self.failure_probability.tolist(), self.failure_flag.tolist(), strict=True
            ):
                record |= {"failure_probability": None if np.isnan(p) else p, "failure_flag": flag}
        return records


@dataclass(frozen=True)
class _Calibration:
    """Everything ``guard`` needs per call, computed once by ``calibrate`` (never re-validated per call)."""

    scores: np.ndarray  # sorted ascending, float64
    tpr: float
    threshold: float
    rule: str
    alpha: float | None
    delta: float | None
    correction: str | None
    simes: np.ndarray | None
    false_alarm_rate: float

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        p = sorted_pvalues(self.scores, scores)  # conformal_pvalues without re-checking the calibration scores
        if self.correction is not None and self.delta is not None:
            p = calibration_conditional(p, self.n, self.delta, self.correction, _simes=self.simes)
        return p

    def decide(self, scores: np.ndarray, pvalues: np.ndarray) -> np.ndarray:
        if self.rule == "threshold":
            return scores > self.threshold
        return pvalues <= self.alpha


def _make_calibration(
    scores: np.ndarray, tpr: float, alpha: float | None, delta: float | None, correction: str | None
) -> _Calibration:
    """Threshold, rule and expected false-alarm rate from sorted calibration scores (validated inputs)."""
    n = scores.shape[0]
    threshold = threshold_at_tpr(scores, tpr)  # accept s <= threshold, as metrics.fpr_at_tpr
    if alpha is None:
        # The rank of a fresh ID score among the n + 1 is uniform (for continuous scores; ties only lower the rate):
        # it lands above the K = #{S_i <= t} accepted ranks, and is flagged, with probability (n + 1 - K) / (n + 1).
        accepted = int(np.searchsorted(scores, threshold, side="right"))
        rate = (n + 1 - accepted) / (n + 1)
    else:
        rate = false_alarm_rate(n, alpha, delta, correction)
    return _Calibration(
        scores=scores,
        tpr=tpr,
        threshold=threshold,
        rule="threshold" if alpha is None else "pvalue",
        alpha=alpha,
        delta=delta,
        correction=correction,
        simes=simes_sequence(n, delta) if correction == "simes" and delta is not None else None,
        false_alarm_rate=rate,
    )


def _fingerprint(source: Source) -> str:
    """A cheap digest of the first and last rows of the inputs (model mode) or of the logits/features: enough to
    spot 'calibrated on the fit set'."""
    digest = hashlib.sha256()
    if source.data is not None:
        named = [("inputs", source.data)] if isinstance(source.data, (torch.Tensor, np.ndarray)) else []
    else:
        named = [(name, getattr(source.outputs, name)) for name in ("logits", "features")]
    for name, tensor in named:
        if tensor is None:
            continue
        tensor = torch.as_tensor(tensor)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        for rows in (tensor[:_FINGERPRINT_ROWS], tensor[-_FINGERPRINT_ROWS:]):
            digest.update(rows.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rows(value: Any, keep: np.ndarray) -> Any:
    """The kept rows of one entry of an outputs dict (``head`` is not per row; ``layers`` is a dict of arrays)."""
    if isinstance(value, Mapping):
        return {name: _rows(inner, keep) for name, inner in value.items()}
    if isinstance(value, torch.Tensor):
        return value[torch.from_numpy(keep).to(value.device)]
    if isinstance(value, np.ndarray) or isinstance(value, list):
        array = np.asarray(value)
        if array.ndim >= 1 and array.shape[0] == keep.shape[0]:
            return array[keep]
    return value


def _as_dtype(values: Any, dtype: str | None) -> Any:
    """``values`` as a tensor of the dtype seen at fit (JSON numbers arrive as float64 or int64)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    if dtype is None or not hasattr(torch, dtype):
        return tensor
    return tensor.to(getattr(torch, dtype))


def _library_version() -> str:
    from oodguard import __version__  # imported late: the package may import this module before defining it

    return __version__


class Guard:
    """A detector (and optionally a torch model) with a calibrated decision rule, for run-time OOD checks.

    Parameters
    ----------
    model : torch.nn.Module, optional
        The classifier. When given, inputs are run through it with :func:`oodguard.extraction.extract`.
        Without it the guard is model-agnostic and works from :class:`ModelOutputs` or dicts of arrays
        (``{"logits": [N, C]}``, ``{"features": [N, D]}``, ...) produced by any framework.
    detector : str or Detector
        A registry name (``oodguard.detectors.available()``) or a detector instance.
    detector_params : dict, optional
        Hyperparameters for a detector given by name.
    layers : sequence of str
        Intermediate layers to extract (model mode), for detectors that read them.
    feature_layer : str, optional
        Name of the model's final linear layer, or of any module whose pooled output are the features (model
        mode; see :func:`oodguard.extraction.extract`).
    output_key : str or int, optional
        Where the logits are in the model's output when it returns a dict, tuple or ``ModelOutput``.
    device : str or torch.device
        Where the model runs; the model must already be there.
    batch_size : int
        Batch size for running the model.
    model_factory : "module:function" or a module-level function, optional
        How to rebuild the model when loading a saved guard: called with no arguments, it returns the
        model architecture; the saved state dict is then loaded strictly. Needed to ``save`` a model guard.
    progress : bool
        Show a progress bar while extracting in ``fit`` and ``calibrate``.
    range_margin : float or None, default 0.25
        ``fit`` and ``calibrate`` record the shape, dtype and value range of the inputs (model mode) or of the
        logits/features; ``guard`` decides OOD, without scoring, any row with a value outside the seen range
        widened by this fraction of its span, or with NaN or infinity (``GuardResult.reason`` says why).
        ``None``: check shapes only. Applies to arrays, tensors and dicts of arrays.

    Attributes
    ----------
    detector : Detector
    head_ : (weight [C, D], bias [C]) or None
        The final linear layer seen at fit time; gives predictions for inputs that carry only features.
    calibration_scores_ : float64 ``[n]``, sorted ascending
    threshold_ : float
        Flag when ``score > threshold_`` under the threshold rule.
    rule_ : "threshold" or "pvalue"
    tpr_, alpha_, delta_, correction_ : the calibration settings.
    false_alarm_rate_ : float
        Expected fraction of fresh ID inputs flagged, averaged over calibration draws (exact for continuous
        scores, an upper bound with ties): the baseline against which to monitor the live OOD rate.
    input_contract_ : InputContract or None
        Row shape, dtype and value range of each input field seen at fit and calibration.
    failure_monitor_ : FailureMonitor or None
        Set by :meth:`fit_failure_monitor`: adds ``failure_probability`` and ``failure_flag`` to every result.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> guard = Guard(detector="energy").fit({"logits": rng.normal(size=(100, 3))})
    >>> guard = guard.calibrate({"logits": rng.normal(size=(200, 3))}, tpr=0.95)
    >>> result = guard.guard({"logits": np.array([[0.1, 0.0, -0.2], [-9.0, -9.0, -9.0]])})
    >>> result.prediction.tolist(), result.is_ood.tolist()  # the second row lies far outside the logits seen at fit
    ([0, -1], [False, True])
    >>> result.reason[1].split(" outside")[0]
    'logits: value -9'
    >>> guard.guard({"logits": np.array([[-2.0, -2.0, -2.0]])}).to_records()[0]["is_ood"]  # in range, scored
    True
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        detector: str | Detector = "energy",
        *,
        detector_params: Mapping[str, Any] | None = None,
        layers: Sequence[str] = (),
        feature_layer: str | None = None,
        output_key: str | int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        model_factory: str | Callable[[], torch.nn.Module] | None = None,
        progress: bool = False,
        range_margin: float | None = DEFAULT_MARGIN,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model: expected a torch.nn.Module or None (model-agnostic), got {type(model).__name__}; "
                "pass the detector as detector=..."
            )
        if isinstance(detector, Detector):
            if detector_params:
                raise ValueError("detector_params: only for a detector given by name; configure the instance instead")
            self.detector = detector
        elif isinstance(detector, str):
            self.detector = detector_base.create(detector, **dict(detector_params or {}))
        else:
            raise TypeError(f"detector: expected a registry name or a Detector, got {type(detector).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        if model is None and (layers or feature_layer is not None or output_key is not None):
            raise ValueError(
                "layers/feature_layer/output_key: only used with a model; without one, pass the outputs as data"
            )
        if model is None and model_factory is not None:
            raise ValueError("model_factory: only used with a model (it rebuilds the model when loading)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.model = model
        self.layers = list(layers)
        self.feature_layer = feature_layer
        self.output_key = output_key
        self.device = device
        self.batch_size = batch_size
        self.model_factory = None if model_factory is None else _factory_name(model_factory)
        self.progress = progress
        if range_margin is not None and (
            not isinstance(range_margin, (int, float)) or isinstance(range_margin, bool) or not range_margin >= 0
        ):
            raise ValueError(f"range_margin: expected a number >= 0 or None (no range check), got {range_margin!r}")
        self.range_margin = range_margin
        self.input_contract_: InputContract | None = None
        self.head_: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fit_fingerprint: str | None = None
        self._calibration: _Calibration | None = None
        self.failure_monitor_: FailureMonitor | None = None
        self._head_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._model_lock = threading.RLock()
        self._runner: ModelRunner | None = None

    # ------------------------------------------------------------------ inputs
    def _source(self, data: Any, argument: str, *, labels: Any = None, progress: bool = False) -> Source:
        """What the detector fits on or scores: model outputs (given, or extracted from the inputs when first asked
        for) and, in model mode, the inputs and a runner for model detectors."""
        if isinstance(data, ModelOutputs) or isinstance(data, Mapping) or hasattr(data, "files"):
            outputs = as_outputs(data)
            if labels is not None:
                if outputs.labels is not None:
                    raise ValueError(f"labels: {argument} already has labels; give them once")
                outputs = outputs.with_fields(labels=labels)
            return Source(outputs)
        if self.model is None:
            raise ValueError(
                f"{argument}: this guard has no model, so it needs model outputs: a ModelOutputs or a dict such as "
                f"{{'logits': array [N, C]}} or {{'features': array [N, D]}}; got {type(data).__name__}"
            )
        model = self.model

        def extracted() -> ModelOutputs:
            with self._model_lock:  # extraction hooks the shared model: one request at a time may run it
                return extract(
                    model,
                    data,
                    labels=labels,
                    layers=self.layers,
                    feature_layer=self.feature_layer,
                    output_key=self.output_key,
                    device=self.device,
                    batch_size=self.batch_size,
                    progress=progress,
                )

        return Source(extracted, data=data, labels=labels, runner=self._model_runner())

    def _model_runner(self) -> ModelRunner | None:
        """The runner model detectors use (one per guard; built on first use)."""
        if self.model is None or self.detector.protocol != "model":
            return None
        if self._runner is None:
            self._runner = ModelRunner(
                self.model,
                device=self.device,
                batch_size=self.batch_size,
                feature_layer=self.feature_layer,
                output_key=self.output_key,
            )
        return self._runner

    # ------------------------------------------------------------------ the input contract
    @contextmanager
    def _recording_inputs(self, contract: InputContract) -> Iterator[None]:
        """Record the model's input batches into ``contract`` while the block runs (model mode)."""
        if self.model is None:
            yield
            return

        def observe(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                contract.observe("inputs", args[0])

        handle = self.model.register_forward_pre_hook(observe)
        try:
            yield
        finally:
            handle.remove()

    def _observe_outputs(self, contract: InputContract, source: Source) -> None:
        if self.model is None:
            for name in ("logits", "features"):
                values = getattr(source.outputs, name)
                if values is not None:
                    contract.observe(name, values)

    def _screen(self, x: Any) -> tuple[Any, np.ndarray | None, list[str | None]]:
        """Rows of ``x`` inside the input contract, which rows those are (None: all, unchecked) and, per row, why
        it is not. Shapes that disagree with the contract raise a ValueError."""
        contract = self.input_contract_
        if contract is None:
            return x, None, []
        if self.model is not None and isinstance(x, (torch.Tensor, np.ndarray)):
            named = {"inputs": x}
        elif self.model is None and isinstance(x, Mapping) and not isinstance(x, ModelOutputs):
            named = {name: x[name] for name in ("logits", "features") if x.get(name) is not None}
        else:
            named = {}
        if not named:
            return x, None, []
        arrays: dict[str, Any] = {}
        for name, values in named.items():
            if isinstance(values, torch.Tensor):
                array: Any = values.detach().cpu()
                usable = array.ndim >= 1 and not array.is_complex()
            else:
                try:
                    array = np.asarray(values)
                except ValueError:  # ragged rows: the usual validation names the problem
                    return x, None, []
                usable = array.ndim >= 1 and array.dtype.kind in "iufb"
            # rows of rank 1 for outputs [N, D]: left to the usual validation, which names the problem
            if not usable or (self.model is None and array.ndim != 2):
                return x, None, []
            contract.check_shape(name, np.empty((0, *array.shape[1:])), "x")
            arrays[name] = array
        reasons: list[str | None] = []
        for name, array in arrays.items():
            found = contract.out_of_range(name, array)
            reasons = found if not reasons else [a or b for a, b in zip(reasons, found, strict=True)]
        keep = np.array([reason is None for reason in reasons], dtype=bool)
        dtypes = {name: known.dtype for name, known in contract.fields.items()}
        everything = bool(keep.all())  # the usual case: no copy of the rows
        if self.model is not None:
            inputs = arrays["inputs"]
            if not everything:
                inputs = inputs[torch.from_numpy(keep)] if isinstance(inputs, torch.Tensor) else inputs[keep]
            return _as_dtype(inputs, dtypes.get("inputs")), keep, reasons
        screened = dict(x) if everything else {name: _rows(value, keep) for name, value in x.items()}
        for name in arrays:
            screened[name] = _as_dtype(screened[name], dtypes.get(name))
        return screened, keep, reasons

    # ------------------------------------------------------------------ fitting and calibration
    def fit(self, id_data: Any, labels: Any = None) -> Guard:
        """Fit the detector on in-distribution data and return ``self``.

        Parameters
        ----------
        id_data : model inputs (model mode: array, Dataset, DataLoader, iterable of batches), or model outputs
            (``ModelOutputs`` or a dict of ``logits``/``features``/``layers``/``head`` arrays).
        labels : integer array ``[N]``, optional
            Class ids, for detectors that need them (e.g. ``mahalanobis``).
        """
        source = self._source(id_data, "id_data", labels=labels, progress=self.progress)
        contract = InputContract(margin=self.range_margin)
        with self._model_lock, self._recording_inputs(contract):
            self.detector.fit_from(source)
        self._observe_outputs(contract, source)
        self.input_contract_ = contract
        # The head predicts classes for outputs that hold features only (model-agnostic guards).
        self.head_ = source.outputs.head if self.model is None else None
        self._head_cache = {}
        self._fit_fingerprint = _fingerprint(source) if self.detector.needs_fit else None
        self._calibration = None  # scores changed: an old calibration no longer applies
        if self.failure_monitor_ is not None:  # learned on the old scores: results would lose its columns unnoticed
            warnings.warn(
                "fit: the failure monitor was learned on the previous detector's scores and is dropped; results no "
                "longer carry failure_probability until you call fit_failure_monitor(...) again",
                stacklevel=2,
            )
        self.failure_monitor_ = None
        return self

    def fit_failure_monitor(self, x: Any, failed: Any, **params: Any) -> Guard:
        """Learn the probability that the system fails on an input from logged outcomes; returns ``self``.

        Fits a :class:`~oodguard.failure_monitor.FailureMonitor` (logistic regression on the OOD score and the
        model's softmax summaries; see that module for what it uses and why) on rows of ``x`` and whether the
        system failed on each. From then on :meth:`guard` and :meth:`guard_batch` report ``failure_probability``
        and ``failure_flag`` beside the OOD decision, and :meth:`save` stores the monitor with the guard.

        Parameters
        ----------
        x : inputs or model outputs, in any form :meth:`score` accepts (logged production inputs, or their
            logits/features). Use inputs other than those the detector was fitted on.
        failed : booleans (or 0/1) ``[N]``, one per row of ``x``: True where the system failed.
        **params : ``c``, ``recall``, ``min_per_class`` of :class:`~oodguard.failure_monitor.FailureMonitor`.
        """
        if not self.detector.is_fitted:
            raise NotFittedError("Guard: call fit(id_data) before fit_failure_monitor(...)")
        monitor = FailureMonitor(**params)
        source = self._source(x, "x")
        if self._fit_fingerprint is not None and _fingerprint(source) == self._fit_fingerprint:
            warnings.warn(
                "fit_failure_monitor: the data looks identical to the detector's fit data, which it scores "
                "optimistically low; learn the monitor from other (logged production) inputs",
                stacklevel=2,
            )
        _, inside, _ = self._screen(x)
        if inside is not None and not inside.all():
            warnings.warn(
                f"fit_failure_monitor: {int((~inside).sum())} of {inside.shape[0]} rows are outside the input "
                "contract; guard() decides such inputs OOD without scoring and always flags them, so the monitor "
                "learns from rows it will never be asked about. Drop them (with their outcomes) to fit on what it sees",
                stacklevel=2,
            )
        scores = self._score(source)
        self.failure_monitor_ = monitor.fit(scores, self._logits(source.outputs), failed)
        return self

    def calibrate(
        self,
        id_validation: Any,
        tpr: float = 0.95,
        alpha: float | None = None,
        delta: float | None = None,
        correction: str | None = None,
    ) -> Guard:
        """Score ID validation data, keep the sorted scores, and set the decision rule. Returns ``self``.

        The calibration data must be in-distribution and **disjoint from the data given to** ``fit``: the
        detector scores its own fit data optimistically, which would make the threshold too low and void the
        false-alarm guarantee. (A warning is given when the calibration data looks identical to the fit data.)

        Parameters
        ----------
        id_validation : ID data, in any form ``fit`` accepts.
        tpr : float in (0, 1]
            Target ID true-positive rate: ``threshold_`` is the smallest calibration score that keeps at
            least this fraction of the calibration set accepted (``score <= threshold_``).
        alpha : float in (0, 1), optional
            When given, the decision rule is ``pvalue <= alpha`` (guaranteed false-alarm rate ``<= alpha``)
            instead of the threshold. The calibration set must then hold at least
            :func:`~oodguard.conformal.minimum_calibration_size` samples.
        correction : None, "dkwm" or "simes"
            Calibration-conditional p-values (valid given this calibration set with probability
            ``>= 1 - delta``). Applies to the reported p-values, the ``pvalue`` rule and ``guard_batch``.
        delta : float in (0, 1), optional
            Confidence parameter of the correction (default 0.05).
        """
        if not self.detector.is_fitted:
            raise NotFittedError(f"Guard: call fit(id_data) before calibrate(...) (detector {self.detector.name!r})")
        tpr = check_fraction(tpr, "tpr", allow_one=True)
        if alpha is not None:
            alpha = check_fraction(alpha, "alpha")
        check_correction(correction)
        if correction is None and delta is not None:
            raise ValueError("delta: the confidence of a calibration-conditional correction; pass correction= too")
        if correction is not None:
            delta = 0.05 if delta is None else check_fraction(delta, "delta")
        source = self._source(id_validation, "id_validation", progress=self.progress)
        if source.data is None and source.outputs.labels is not None and bool(source.outputs.is_ood.any()):
            raise ValueError(
                f"id_validation: {int(source.outputs.is_ood.sum())} row(s) are labelled OOD (label < 0); calibrate on "
                "in-distribution data only"
            )
        if self._fit_fingerprint is not None and _fingerprint(source) == self._fit_fingerprint:
            warnings.warn(
                "calibrate: the calibration data looks identical to the fit data; calibrate on held-out ID data, "
                "otherwise the threshold is too low and the p-values are not valid",
                stacklevel=2,
            )
        contract = self.input_contract_ or InputContract(margin=self.range_margin)
        with self._recording_inputs(contract):
            scores = np.sort(self._score(source))
        self._observe_outputs(contract, source)
        self.input_contract_ = contract
        n = scores.shape[0]
        if correction == "simes" and n < 2:
            raise ValueError("id_validation: correction='simes' needs at least 2 calibration samples")
        if alpha is not None:
            needed = minimum_calibration_size(alpha, delta, correction)
            if n < needed:
                how = "" if correction is None else f" with correction={correction!r} and delta={delta}"
                raise ValueError(
                    f"id_validation: {n} calibration samples are too few for alpha={alpha}{how}: no p-value could "
                    f"ever be <= alpha, so nothing would be flagged. Pass at least {needed} in-distribution "
                    "calibration samples, or a larger alpha"
                )
        self._calibration = _make_calibration(scores, tpr, alpha, delta, correction)
        return self

    # ------------------------------------------------------------------ attributes
    def _require_calibration(self, method: str) -> _Calibration:
        if self._calibration is None:
            first = "" if self.detector.is_fitted else "fit(id_data) and then "
            raise NotFittedError(f"Guard: call {first}calibrate(id_validation) before {method}(...)")
        return self._calibration

    @property
    def is_calibrated(self) -> bool:
        return self._calibration is not None

    @property
    def calibration_scores_(self) -> np.ndarray:
        return self._require_calibration("calibration_scores_").scores

    @property
    def threshold_(self) -> float:
        return self._require_calibration("threshold_").threshold

    @property
    def rule_(self) -> str:
        return self._require_calibration("rule_").rule

    @property
    def tpr_(self) -> float:
        return self._require_calibration("tpr_").tpr

    @property
    def alpha_(self) -> float | None:
        return self._require_calibration("alpha_").alpha

    @property
    def delta_(self) -> float | None:
        return self._require_calibration("delta_").delta

    @property
    def correction_(self) -> str | None:
        return self._require_calibration("correction_").correction

    @property
    def false_alarm_rate_(self) -> float:
        return self._require_calibration("false_alarm_rate_").false_alarm_rate

    # ------------------------------------------------------------------ run time
    def _score(self, source: Source) -> np.ndarray:
        if self.detector.protocol == "model":
            with self._model_lock:
                scores = self.detector.score_from(source)
        else:
            scores = self.detector.score_from(source)
        if isinstance(scores, torch.Tensor):
            scores = scores.cpu().numpy()
        return scores.astype(np.float64, copy=False)

    def _logits(self, outputs: ModelOutputs) -> torch.Tensor | None:
        """The logits, or ``features @ W.T + b`` when only features and the head are known; None otherwise."""
        logits = outputs.logits
        if logits is None and outputs.features is not None:
            head = outputs.head
            if head is None and self.head_ is not None:
                dtype = outputs.features.dtype
                if dtype not in self._head_cache:
                    self._head_cache[dtype] = (self.head_[0].to(dtype), self.head_[1].to(dtype))
                head = self._head_cache[dtype]
            if head is not None:
                features = outputs.features
                logits = torch.addmm(head[1].to(features.device), features, head[0].to(features.device).T)
        return logits

    def _predict(self, outputs: ModelOutputs) -> np.ndarray:
        logits = self._logits(outputs)
        if logits is None:
            return np.full(len(outputs), -1, dtype=np.int64)
        return logits.argmax(dim=1).cpu().numpy().astype(np.int64, copy=False)

    def score(self, x: Any) -> np.ndarray:
        """OOD scores ``[N]`` (float64, higher = more OOD) of inputs or model outputs."""
        if not self.detector.is_fitted:
            raise NotFittedError("Guard: call fit(id_data) before score(...)")
        return self._score(self._source(x, "x"))

    def pvalues(self, x: Any) -> np.ndarray:
        """Conformal p-values ``[N]`` of inputs or model outputs (corrected when a correction was set)."""
        calibration = self._require_calibration("pvalues")
        return calibration.pvalues(self._score(self._source(x, "x")))

    def guard(self, x: Any) -> GuardResult:
        """Prediction, OOD score, p-value and decision for every input, one at a time (no multiplicity control).

        Parameters
        ----------
        x : model inputs (model mode), or model outputs: a ``ModelOutputs`` or a dict of arrays with the fields
            the detector needs (e.g. ``{"features": array [N, D]}``). Shapes are validated by
            :class:`ModelOutputs` (rank 2, finite values).
        """
        calibration = self._require_calibration("guard")
        predictions, scores, pvalues, scored, reasons, failure = self._scored(x)
        is_ood = np.ones(len(scores), dtype=bool)
        is_ood[scored] = calibration.decide(scores[scored], pvalues[scored])
        return self._result(predictions, scores, pvalues, is_ood, reasons, failure)

    def _result(
        self,
        predictions: np.ndarray,
        scores: np.ndarray,
        pvalues: np.ndarray,
        is_ood: np.ndarray,
        reasons: list[str | None],
        failure: np.ndarray | None,
    ) -> GuardResult:
        flag = None if failure is None or self.failure_monitor_ is None else self.failure_monitor_.flag(failure)
        return GuardResult(predictions, scores, pvalues, is_ood, reasons, failure, flag)

    def _failure(self, source: Source, scores: np.ndarray) -> np.ndarray | None:
        if self.failure_monitor_ is None:
            return None
        return self.failure_monitor_.predict_proba(scores, self._logits(source.outputs))

    def _scored(
        self, x: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str | None], np.ndarray | None]:
        """Predictions, scores, p-values (and failure probabilities with a monitor) of the rows inside the input
        contract; the others get -1, inf, 0 (and NaN)."""
        calibration = self._require_calibration("guard")
        screened, keep, reasons = self._screen(x)
        if keep is None:
            source = self._source(x, "x")
            scores = self._score(source)
            pvalues, failure = calibration.pvalues(scores), self._failure(source, scores)
            return self._predict(source.outputs), scores, pvalues, np.ones(len(scores), bool), [], failure
        n = keep.shape[0]
        predictions, scores, pvalues = np.full(n, -1, np.int64), np.full(n, np.inf), np.zeros(n)
        failure = None if self.failure_monitor_ is None else np.full(n, np.nan)
        if keep.any():
            source = self._source(screened, "x")
            scores[keep] = self._score(source)
            pvalues[keep] = calibration.pvalues(scores[keep])
            predictions[keep] = self._predict(source.outputs)
            if failure is not None:
                failure[keep] = self._failure(source, scores[keep])
        return predictions, scores, pvalues, keep, reasons, failure

    def guard_batch(self, x: Any, fdr: float = 0.1) -> GuardResult:
        """Like :meth:`guard`, but decide the whole batch with Benjamini-Hochberg at false discovery rate ``fdr``.

        The expected fraction of ID inputs among the flagged ones is at most ``fdr`` (times the fraction of
        ID inputs in the batch), because conformal p-values sharing a calibration set are PRDS.
        """
        self._require_calibration("guard_batch")
        fdr = check_fraction(fdr, "fdr")
        predictions, scores, pvalues, scored, reasons, failure = self._scored(x)
        is_ood = benjamini_hochberg(pvalues, fdr) | ~scored  # unscored rows have p-value 0: always rejected anyway
        return self._result(predictions, scores, pvalues, is_ood, reasons, failure)

    __call__ = guard

    def explain(self, x: Any, *, times_input: bool = True, positive: bool = True, sigma: float = 0.0,
                normalize: bool = True) -> np.ndarray:  # fmt: skip
        """Per input, a map of what drives its OOD score (UA-Backprop, see :mod:`oodguard.explain`): float32
        ``[N, H, W]`` for images ``[N, C, H, W]`` (channels summed), else the inputs' shape ``[N, ...]``.

        One forward and one backward pass through the model per batch. Needs a model guard whose detector scores
        differentiably from logits/features (``oodguard.explain.DIFFERENTIABLE_DETECTORS``); the options are
        those of :func:`oodguard.explain.refine`. Rows are not screened by the input contract: an input far
        outside it is explained like any other (its score may still be finite).
        """
        if self.model is None:
            raise ValueError(
                "explain: this guard has no model, so there are no inputs to attribute the score to; explain needs a "
                "guard built with the model (Guard(model, detector=...))"
            )
        if not self.detector.is_fitted:
            raise NotFittedError("Guard: call fit(id_data) before explain(...)")
        with self._model_lock:
            return explain_inputs(
                self.model, self.detector, x, device=self.device, batch_size=self.batch_size,
                feature_layer=self.feature_layer, output_key=self.output_key,
                times_input=times_input, positive=positive, sigma=sigma, normalize=normalize,
            )  # fmt: skip

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, key: str | bytes | None = None) -> None:
        """Write the calibrated guard to ``directory``: settings and checksums under one seal, tensors in safetensors.

        Layout: ``guard.json`` (settings, a sha256 per file, the seal), ``calibration.safetensors``,
        ``detector/detector.safetensors`` and, with a model, ``model.safetensors`` (its state dict, with the
        architecture and weight fingerprints in ``guard.json``). With a signing key (``key=`` or the environment
        variable ``OODGUARD_GUARD_KEY``) the seal is an HMAC-SHA256 that only holders of the key can recompute.
        The directory is written in a temporary sibling and moved into place, so a reader never sees half a guard.
        An existing non-empty directory is replaced only with ``overwrite=True`` and only if it holds a saved guard.
        """
        calibration = self._require_calibration("save")
        signing = signing_key(key)
        directory = Path(directory)
        if directory.exists():
            if not directory.is_dir():
                raise ValueError(f"{directory} exists and is not a directory")
            if any(directory.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace a saved guard")
                if not (directory / GUARD_FILE).is_file():
                    raise ValueError(f"{directory} is not empty and holds no saved guard; refusing to replace it")
        model_spec = None
        if self.model is not None:
            if self.model_factory is not None:
                # Check now that the factory rebuilds this architecture, rather than when someone loads the guard.
                try:
                    _build_model(self.model_factory).load_state_dict(self.model.state_dict(), strict=True)
                except RuntimeError as error:
                    raise ValueError(
                        f"model_factory {self.model_factory!r} builds a model whose state dict does not match the "
                        f"guard's model: {error}"
                    ) from error
            model_spec = {
                "state_dict": MODEL_FILE,
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "factory": self.model_factory,  # a hint for whoever loads it; never imported by load_guard
                "architecture_sha256": architecture_digest(self.model),
                "weights_sha256": weights_digest(self.model),
                "layers": self.layers,
                "feature_layer": self.feature_layer,
                "output_key": self.output_key,
                "batch_size": self.batch_size,
            }
        settings = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "oodguard_version": _library_version(),
            "decision": {
                "rule": calibration.rule,
                "tpr": calibration.tpr,
                "alpha": calibration.alpha,
                "delta": calibration.delta,
                "correction": calibration.correction,
                "threshold": calibration.threshold,
                "num_calibration": calibration.n,
                "false_alarm_rate": calibration.false_alarm_rate,
            },
            "detector": {"name": self.detector.name, "directory": DETECTOR_DIR},
            "calibration": CALIBRATION_FILE,
            "model": model_spec,
            "input": None if self.input_contract_ is None else self.input_contract_.to_json(),
        }
        if self.failure_monitor_ is not None:  # absent without a monitor: such guards save as before
            settings["failure_monitor"] = {"file": FAILURE_MONITOR_FILE}

        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            self.detector.save(temporary / DETECTOR_DIR)
            tensors = {"scores": torch.from_numpy(calibration.scores.copy())}
            if self.head_ is not None:
                tensors["head.weight"], tensors["head.bias"] = self.head_
            # The settings travel in the calibration file too, so that an edit of guard.json can be named.
            persist.save(
                temporary / CALIBRATION_FILE,
                tensors,
                kind="guard_calibration",
                version=1,
                header={"settings": settings},
            )
            if self.model is not None:
                persist.save(temporary / MODEL_FILE, self.model.state_dict(), kind="model_state", version=1)
            if self.failure_monitor_ is not None:
                self.failure_monitor_.save(temporary / FAILURE_MONITOR_FILE)
            files = sorted(p for p in temporary.rglob("*") if p.is_file())
            sealed = {**settings, "files": {p.relative_to(temporary).as_posix(): sha256_of_file(p) for p in files}}
            persist.write_json_atomic(temporary / GUARD_FILE, {**sealed, "seal": seal(sealed, signing)})
            if directory.exists():
                # keep the service's decision log (DIR/decisions.sqlite); the rest of the old guard goes
                for entry in directory.iterdir():
                    if entry.name in DECISION_LOG_FILES:
                        os.replace(entry, temporary / entry.name)
                shutil.rmtree(directory)
            os.replace(temporary, directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def __repr__(self) -> str:
        mode = "model-agnostic" if self.model is None else type(self.model).__name__
        if self._calibration is None:
            state = "calibrated=False"
        else:
            c = self._calibration
            rule = f"threshold={c.threshold:.6g}" if c.rule == "threshold" else f"alpha={c.alpha}"
            state = f"{rule}, n_calibration={c.n}" + (f", correction={c.correction!r}" if c.correction else "")
        return f"Guard({mode}, detector={self.detector!r}, {state})"


# ---------------------------------------------------------------------------------------------- loading
_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "oodguard_version": str,
    "decision": dict,
    "detector": dict,
    "calibration": str,
    "model": (dict, type(None)),
    "input": (dict, type(None)),
    "files": dict,
    "seal": dict,
}
# Settings present only when the guard has the part: a guard without it saves, and loads, as before it existed.
_OPTIONAL_SETTINGS: dict[str, type] = {"failure_monitor": dict}
_DECISION_FIELDS = ("rule", "tpr", "alpha", "delta", "correction", "threshold", "num_calibration", "false_alarm_rate")
_MODEL_FIELDS = (
    "state_dict",
    "class",
    "factory",
    "architecture_sha256",
    "weights_sha256",
    "layers",
    "feature_layer",
    "output_key",
    "batch_size",
)


def _entry(mapping: Mapping[str, Any], key: str, config_path: Path, kind: type, where: str = "") -> Any:
    """``mapping[key]``, which must exist and be of ``kind`` (an int is accepted as a float)."""
    value = mapping.get(key)
    accepted = (int, float) if kind is float else kind
    if value is None or isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(
            f"{config_path}: field {where + key!r} is missing or not a {kind.__name__} (got {value!r}); the file is "
            "damaged"
        )
    return value


def _check_keys(mapping: Mapping[str, Any], expected: Sequence[str], config_path: Path, where: str) -> None:
    unknown = sorted(set(mapping) - set(expected))
    missing = [name for name in expected if name not in mapping]
    if unknown or missing:
        name = (unknown or missing)[0]
        problem = "is not a setting of a saved guard" if unknown else "is missing"
        raise ValueError(f"{config_path}: field {where + name!r} {problem}; the file is damaged or was edited")


def _read_config(directory: Path) -> tuple[Path, dict[str, Any], int]:
    config_path = directory / GUARD_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved guard ({GUARD_FILE} is missing)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not an oodguard guard config (format {FORMAT!r} expected)")
    version = config.get("format_version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{config_path}: guard format version {version!r} is not supported (oodguard {_library_version()} "
            f"reads versions {', '.join(map(str, _READABLE_VERSIONS))}); save the guard again with this version of "
            "oodguard"
        )
    if version >= 3:
        optional = [name for name in _OPTIONAL_SETTINGS if name in config]
        _check_keys(config, [*_SETTINGS, *optional], config_path, "")
        for name, kind in [*_SETTINGS.items(), *((name, _OPTIONAL_SETTINGS[name]) for name in optional)]:
            if not isinstance(config[name], kind) or isinstance(config[name], bool):
                raise ValueError(f"{config_path}: field {name!r} has the wrong type ({config[name]!r}); damaged file")
    return config_path, config, version


def _saved_settings(directory: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The copy of the settings inside the calibration file, or None when it cannot be read."""
    name = config.get("calibration")
    if not isinstance(name, str) or Path(name).name != name:
        name = CALIBRATION_FILE
    try:
        header = persist.load(directory / name, kind="guard_calibration", versions=1)[1]
    except (OSError, ValueError):
        return None
    settings = header.get("settings")
    return {**settings, "files": config.get("files")} if isinstance(settings, dict) else None


def _read_tensors(path: Path, kind: str, guard_version: int) -> dict[str, torch.Tensor]:
    """A guard's tensor file: plain safetensors in guard format version 1, oodguard's file format since."""
    if guard_version == 1:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    return persist.load(path, kind=kind, versions=1)[0]


def _load_model(
    directory: Path,
    config_path: Path,
    spec: Mapping[str, Any],
    files: Mapping[str, Any],
    version: int,
    model_factory: str | Callable[[], torch.nn.Module] | None,
    device: str | torch.device,
) -> tuple[torch.nn.Module, str | None]:
    """Rebuild a guard's model with the caller's factory, then check it against the recorded fingerprints."""
    if version >= 3:
        _check_keys(spec, _MODEL_FIELDS, config_path, "model.")
    recorded_class, hint = spec.get("class"), spec.get("factory")
    if model_factory is None:
        saved_with = f"; it was saved with model_factory={hint!r}" if isinstance(hint, str) else ""
        raise ValueError(
            f"{config_path}: this guard holds a model ({recorded_class}){saved_with}. Pass model_factory= to "
            "load_guard (or --model-factory to `oodguard serve`): a function of your own code, or its "
            "'module:function' name, that builds the architecture. load_guard never imports code named inside a guard "
            "folder"
        )
    model_path = verified_file(directory, files, _entry(spec, "state_dict", config_path, str, "model."), config_path)
    if isinstance(model_factory, str):
        name: str | None = _factory_name(model_factory)
        model = _build_model(model_factory)
    elif callable(model_factory):
        try:
            name = _factory_name(model_factory)
        except ValueError:
            name = None  # a lambda or local function: fine to load with, not a name to save
        model = model_factory()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"model_factory {model_factory!r}: returned a {type(model).__name__}, expected a torch.nn.Module"
            )
    else:
        raise ValueError(f"model_factory: expected 'package.module:function' or a function, got {model_factory!r}")
    shown = name or repr(model_factory)
    try:
        model.load_state_dict(_read_tensors(model_path, "model_state", version), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{model_path}: does not fit the model built by {shown} ({error}); use a factory that builds the "
            f"architecture the guard was saved with ({recorded_class})"
        ) from error
    if version >= 3:
        checks = [("architecture_sha256", architecture_digest, "architecture"), ("weights_sha256", weights_digest,
                  "weights after loading the saved state")]  # fmt: skip
        for entry, digest, what in checks:
            recorded = _entry(spec, entry, config_path, str, "model.")
            if digest(model) != recorded:
                raise ValueError(
                    f"{config_path}: field 'model.{entry}': the model built by {shown} has other {what} than the "
                    f"saved model ({recorded_class}); use the factory the guard was saved with"
                )
    return model.to(device).eval(), name


def _decision_settings(
    decision: Mapping[str, Any], config_path: Path, version: int, scores: np.ndarray
) -> _Calibration:
    """The calibration rebuilt from the recorded decision settings, every one checked."""
    if version >= 3:
        _check_keys(decision, _DECISION_FIELDS, config_path, "decision.")
    rule = _entry(decision, "rule", config_path, str, "decision.")
    alpha, delta, correction = decision.get("alpha"), decision.get("delta"), decision.get("correction")
    if rule not in RULES or (rule == "pvalue") != (alpha is not None):
        raise ValueError(f"{config_path}: field 'decision.rule': inconsistent rule {rule!r} with alpha={alpha!r}")
    if (
        correction not in (None, *CORRECTIONS)
        or (correction is None) != (delta is None)
        or (correction == "simes" and scores.size < 2)
    ):
        raise ValueError(
            f"{config_path}: field 'decision.correction': inconsistent correction {correction!r} with delta={delta!r}"
        )
    try:
        calibration = _make_calibration(
            scores,
            check_fraction(_entry(decision, "tpr", config_path, float, "decision."), "tpr", allow_one=True),
            None if alpha is None else check_fraction(alpha, "alpha"),
            None if delta is None else check_fraction(delta, "delta"),
            correction,
        )
    except ValueError as error:
        raise ValueError(f"{config_path}: field 'decision': {error}") from error
    recorded = {"threshold": calibration.threshold}
    if version >= 3:
        recorded |= {"num_calibration": calibration.n, "false_alarm_rate": calibration.false_alarm_rate}
    for name, value in recorded.items():
        if decision.get(name) != value:
            raise ValueError(
                f"{config_path}: field 'decision.{name}' is {decision.get(name)!r} but the calibration scores give "
                f"{value!r}; the guard is damaged"
            )
    return calibration


def load_guard(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    model_factory: str | Callable[[], torch.nn.Module] | None = None,
    key: str | bytes | None = None,
) -> Guard:
    """Load a guard written by :meth:`Guard.save`, without importing or unpickling anything from the folder.

    The seal over every setting and file checksum is checked first (an HMAC-SHA256 signature when a key is set:
    ``key=`` or the environment variable ``OODGUARD_GUARD_KEY``; a signed guard needs the key, and with a key
    set an unsigned guard is refused), then that the folder holds no file the guard does not list, then every
    file's sha256, then every setting. A model guard needs ``model_factory``: a function of the caller's code, or
    its ``"module:function"`` name, that builds the architecture; the saved weights are loaded into it strictly
    and the result must match the architecture and weight fingerprints recorded at save. Any tampering is a
    ``ValueError`` naming the file and the field.
    """
    directory = Path(directory)
    config_path, config, version = _read_config(directory)
    signing = signing_key(key)
    if version < 3 and signing is not None:
        raise ValueError(
            f"{config_path}: guard format version {version} has no signature, but a signing key is set; load it "
            "without the key and save it again (guard.save(dir, overwrite=True)) to sign it"
        )
    files = _entry(config, "files", config_path, dict)
    check_folder_contents(directory, set(files), GUARD_FILE)
    if version >= 3:
        sealed = {name: value for name, value in config.items() if name != "seal"}
        check_seal(config_path, sealed, config["seal"], signing, lambda: _saved_settings(directory, config))
    decision = _entry(config, "decision", config_path, dict)
    detector_spec = _entry(config, "detector", config_path, dict)
    model_spec = config.get("model")
    if model_spec is not None and not isinstance(model_spec, dict):
        raise ValueError(f"{config_path}: field 'model' must be null or an object; the file is damaged")
    if version >= 3:
        _check_keys(detector_spec, ("name", "directory"), config_path, "detector.")

    calibration_path = verified_file(directory, files, _entry(config, "calibration", config_path, str), config_path)
    tensors = _read_tensors(calibration_path, "guard_calibration", version)
    detector_dir = _entry(detector_spec, "directory", config_path, str, "detector.")
    detector_files = sorted(name for name in files if name.startswith(f"{detector_dir}/"))
    if not detector_files:
        raise ValueError(f"{config_path}: field 'files' lists no file of the detector folder {detector_dir!r}")
    for name in detector_files:
        verified_file(directory, files, name, config_path)
    detector = detector_base.load(directory / detector_dir)
    if detector.name != detector_spec.get("name"):
        raise ValueError(
            f"{config_path}: field 'detector.name' records {detector_spec.get('name')!r} but "
            f"{directory / detector_dir} holds {detector.name!r}"
        )
    model, factory = None, None
    output_key = model_spec.get("output_key") if model_spec else None
    if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (str, int))):
        raise ValueError(f"{config_path}: field 'model.output_key' must be null, a string or an integer")
    if model_spec is not None:
        model, factory = _load_model(directory, config_path, model_spec, files, version, model_factory, device)
    elif model_factory is not None:
        raise ValueError(f"model_factory: {directory} holds a model-agnostic guard (no model to build)")
    # Guards of earlier formats recorded no ranges: they still decide rows with NaN or infinity OOD, unscored.
    contract = InputContract(margin=None)
    if version >= 3 and config["input"] is not None:
        contract = InputContract.from_json(config["input"], f"{config_path}: field 'input'")

    guard = Guard(
        model,
        detector,
        layers=_entry(model_spec, "layers", config_path, list, "model.") if model_spec else (),
        feature_layer=model_spec.get("feature_layer") if model_spec else None,
        output_key=output_key,
        device=device,
        batch_size=_entry(model_spec, "batch_size", config_path, int, "model.") if model_spec else 256,
        range_margin=contract.margin,
    )
    guard.model_factory = factory
    guard.input_contract_ = contract
    if "head.weight" in tensors and "head.bias" in tensors:
        guard.head_ = (tensors["head.weight"], tensors["head.bias"])
    stored = tensors.get("scores")
    if stored is None or stored.ndim != 1 or stored.numel() == 0 or not bool(torch.isfinite(stored).all()):
        raise ValueError(f"{calibration_path}: expected finite calibration scores [n], n >= 1; damaged guard")
    scores = stored.to(torch.float64).numpy()
    if (np.diff(scores) < 0).any():
        raise ValueError(f"{calibration_path}: calibration scores are not sorted; damaged guard")
    guard._calibration = _decision_settings(decision, config_path, version, scores)
    if version >= 3 and "failure_monitor" in config:
        _check_keys(config["failure_monitor"], ("file",), config_path, "failure_monitor.")
        name = _entry(config["failure_monitor"], "file", config_path, str, "failure_monitor.")
        guard.failure_monitor_ = FailureMonitor.load(verified_file(directory, files, name, config_path))
    return guard
