"""The detector contract, the registry, and saving/loading fitted detectors.

Score convention, for every detector: **higher = more likely out-of-distribution.**

Two protocols share one base class (:class:`Detector`: declared parameters, fitted state as named tensors, save and
load, registry metadata):

* :class:`OutputDetector` fits and scores :class:`~oodguard.outputs.ModelOutputs` (the model ran once; the
  detector reuses its outputs). Detectors whose fit statistics are additive implement ``_statistics`` /
  ``_finalize`` and get exact ``partial_fit`` and ``merge`` for free.
* :class:`~oodguard.detectors.model.base.ModelDetector` fits and scores model *inputs* through a
  :class:`~oodguard.extraction.ModelRunner` (input perturbations, gradients through inner layers, test-time views).

Consumers (benchmark runner, Guard, CLI) treat both alike through :meth:`Detector.fit_from` and
:meth:`Detector.score_from`, which take a :class:`Source`: a dataset's outputs and the inputs behind them.

Parameters follow scikit-learn: the constructor names every parameter with its default and stores it as given
(``get_params``, ``set_params``, :func:`clone`); the rules they obey are declared once per class in
``_parameter_constraints`` and checked by :func:`oodguard.detectors.params.validate_params`.
"""

from __future__ import annotations

import abc
import copy
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from oodguard.detectors.params import shown, validate_params
from oodguard.outputs import ModelOutputs, as_outputs
from oodguard.shards import ShardedOutputs

#: Version 2: one safetensors file with a digest (version 1: config.json + state.safetensors, still read).
FORMAT_VERSION = 2
#: Peak extra memory a score call may use for intermediates, per chunk of rows.
SCORE_MEMORY_BUDGET = 256 * 2**20
#: Upper bound on rows per chunk (beyond it, larger chunks no longer speed anything up).
MAX_CHUNK_ROWS = 65536
#: Size of one ``[rows, width]`` temporary per chunk. Larger temporaries are fresh pages on every call
#: (the allocator returns them to the system), which costs more than the arithmetic of an element-wise pass.
CHUNK_TEMPORARY_BYTES = 8 * 2**20
#: The two detector protocols, as the registry records them.
PROTOCOLS = ("outputs", "model")

_REGISTRY: dict[str, type[Detector]] = {}
#: What ``fit`` and ``partial_fit`` take: outputs in memory, a shard folder opened, or a dict of their fields.
FitData = ModelOutputs | ShardedOutputs | Mapping[str, Any]


class NotFittedError(RuntimeError):
    """Raised when a detector that needs fitting is used before ``fit``."""


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    if cls.protocol not in PROTOCOLS:
        raise TypeError(f"{cls.__name__}: protocol must be one of {PROTOCOLS}, got {cls.protocol!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"detector name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


class Source:
    """What a consumer hands a detector to fit on or to score: one dataset's model outputs and the inputs behind them.

    Output detectors read ``outputs``; model detectors run ``runner`` (a :class:`~oodguard.extraction.ModelRunner`)
    on ``data`` (with ``labels`` where they need them). ``outputs`` may be a zero-argument callable, called once on
    first use, so that a source built for a model detector never runs the extraction. Where ``data`` are embeddings
    of texts, ``texts`` are those texts and ``encoder`` the text encoder that embedded them, for the detectors that
    embed texts themselves (``input_kind == "texts"``, e.g. ``ahm``).
    """

    def __init__(
        self,
        outputs: ModelOutputs | Mapping[str, Any] | Callable[[], ModelOutputs] | None = None,
        *,
        data: Any = None,
        labels: Any = None,
        runner: Any = None,
        texts: Any = None,
        encoder: Any = None,
    ) -> None:
        self._outputs = outputs
        self.data = data
        self.labels = labels
        self.runner = runner
        self.texts = texts
        self.encoder = encoder

    @property
    def outputs(self) -> ModelOutputs:
        if self._outputs is None:
            raise ValueError("this source has no model outputs; extract them from the model first")
        if callable(self._outputs) and not isinstance(self._outputs, ModelOutputs):
            self._outputs = self._outputs()
        if isinstance(self._outputs, ShardedOutputs):  # detectors walk the shards themselves
            return self._outputs
        return as_outputs(self._outputs)


class Detector(abc.ABC):
    """Base of every detector: declared parameters, fitted state, saving, registry metadata.

    Class attributes
    ----------------
    name : registry name.
    protocol : ``"outputs"`` (:class:`OutputDetector`) or ``"model"`` (``ModelDetector``).
    summary : one line saying what the score is.
    paper, code : citation and official code location.
    requires : what ``score`` needs (fields of the outputs, or ``"model"``).
    fit_requires : what ``fit`` needs (may add labels, head).
    required_params : parameters with no usable default that the caller must give (e.g. MOS's group layout).
    needs_fit : False for detectors with no fitted state (``fit`` is then optional).
    input_kind : what ``fit`` and ``score`` take: ``"outputs"`` (:class:`~oodguard.outputs.ModelOutputs`),
        ``"tensors"`` (model inputs ``[N, ...]``, run through a model runner) or ``"texts"`` (raw texts, embedded
        by an attached text encoder).
    _parameter_constraints : for every constructor parameter, the list of rules one of which its value must meet
        (see :mod:`oodguard.detectors.params`).

    Subclasses name their parameters in ``__init__`` (keyword-only, with the official defaults), store each one
    unchanged as an attribute of the same name, then call ``super().__init__()``, which validates them.
    """

    name: ClassVar[str] = ""
    protocol: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    fit_requires: ClassVar[frozenset[str]] = frozenset()
    needs_fit: ClassVar[bool] = True
    input_kind: ClassVar[str] = "outputs"
    #: Why benchmarks leave this detector out unless asked for by name (e.g. its cost), or None: run by default.
    not_by_default: ClassVar[str | None] = None
    required_params: ClassVar[tuple[str, ...]] = ()
    state_reductions: ClassVar[dict[str, str] | None] = None
    _parameter_constraints: ClassVar[dict[str, list]] = {}

    def __init__(self) -> None:
        self._validate_params()
        self._state: dict[str, torch.Tensor] | None = None
        self._stale = False
        self._state_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.state_: dict[str, torch.Tensor] | None = None
        self.stats_: dict[str, torch.Tensor] | None = None
        self.meta_: dict[str, Any] = {}

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The constructor's parameter names, in signature order."""
        cached = cls.__dict__.get("_param_names_cache")
        if cached is None:
            signature = inspect.signature(cls.__init__)
            cached = tuple(
                p.name
                for p in signature.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            )
            cls._param_names_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """The constructor's defaults (the official ones)."""
        signature = inspect.signature(cls.__init__)
        return {name: signature.parameters[name].default for name in cls.param_names()}

    def get_params(self) -> dict[str, Any]:
        """The parameters as given to the constructor (or to :meth:`set_params`)."""
        return {name: getattr(self, name) for name in self.param_names()}

    @property
    def params(self) -> dict[str, Any]:
        """Same as :meth:`get_params`."""
        return self.get_params()

    def set_params(self, **params: Any) -> Detector:
        """Change parameters (validated as in the constructor); returns self. Refit afterwards."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise TypeError(self._unknown_params_message(unknown))
        previous = self.get_params()
        for key, value in params.items():
            setattr(self, key, value)
        try:
            self._validate_params()
        except (TypeError, ValueError):
            for key, value in previous.items():
                setattr(self, key, value)
            raise
        return self

    def _validate_params(self) -> None:
        validate_params(self.name or type(self).__name__, self._parameter_constraints, self.get_params())
        self._check_param_combination()

    def _check_param_combination(self) -> None:
        """Rules that tie several parameters together; raise ValueError via :meth:`_param_error`."""
        return None  # most detectors have none

    def _param_error(self, param: str, must: str) -> ValueError:
        """The one error format of parameter validation."""
        return ValueError(f"{self.name}: parameter {param!r} must be {must}; got {shown(getattr(self, param))}")

    @classmethod
    def _unknown_params_message(cls, unknown: list[str]) -> str:
        valid = ", ".join(cls.param_names()) or "none"
        return f"{cls.name}: unknown parameter(s) {unknown}; valid parameters: {valid}"

    def __getstate__(self) -> dict[str, Any]:
        """For copies and for sending a detector to workers in memory (files never hold pickles): caches and
        native handles (a FAISS index) are dropped and rebuilt from the state tensors on first use."""
        state = dict(self.__dict__)
        state["_state_cache"] = {}
        for transient in ("_faiss_index", "_buffer"):
            if transient in state:
                state[transient] = None
        return state

    # ------------------------------------------------------------------ state
    @property
    def state_(self) -> dict[str, torch.Tensor] | None:
        """Fitted state tensors. After ``partial_fit``/``merge`` they are finalised on first use, so adding
        many chunks costs only the statistics, not one finalisation (e.g. an eigendecomposition) per chunk."""
        if self._stale:
            self._stale = False
            self._state = self._finalize(self.stats_)
        return self._state

    @state_.setter
    def state_(self, value: dict[str, torch.Tensor] | None) -> None:
        self._state = value
        self._stale = False
        self._state_cache = {}

    def _statistics_changed(self) -> None:
        self._state = None
        self._stale = True
        self._state_cache = {}

    def _finalize(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no additive fit statistics")

    @property
    def is_fitted(self) -> bool:
        return self._state is not None or self._stale or not self.needs_fit

    @property
    def supports_partial_fit(self) -> bool:
        return self.state_reductions is not None and self._combinable()

    def _combinable(self) -> bool:
        """Whether statistics of separate chunks combine exactly with these parameters (see ``_combine``)."""
        return True

    def state(self, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The fitted state on ``device``; floating tensors cast to ``dtype`` when given (cached)."""
        key = (str(device), dtype)
        if key not in self._state_cache:
            state = self.state_
            if state is None:
                raise NotFittedError(f"{self.name}: call fit(...) first")
            self._state_cache[key] = {
                k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                for k, v in state.items()
            }
        return self._state_cache[key]

    # ------------------------------------------------------------------ the consumers' protocol
    @abc.abstractmethod
    def fit_from(self, source: Source) -> Detector:
        """Fit on a :class:`Source` (outputs or inputs, whichever this detector's protocol takes); returns self."""

    @abc.abstractmethod
    def score_from(self, source: Source) -> np.ndarray | torch.Tensor:
        """OOD scores of a :class:`Source`, higher = more likely OOD."""

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> Path:
        """Write the parameters and fitted state to ``directory/detector.safetensors`` (one file, written atomically,
        with a sha256 digest; no pickle). Returns the file's path."""
        from oodguard import persist

        state = self.state_
        tensors: dict[str, torch.Tensor] = {}
        for key, value in (self.stats_ or {}).items():
            tensors[f"stats.{key}"] = value
        # A state tensor that *is* a statistic (e.g. the KNN bank) is written once.
        aliases = {}
        for key, value in (state or {}).items():
            twin = next((k for k, v in (self.stats_ or {}).items() if v is value), None)
            if twin is not None:
                aliases[key] = twin
            else:
                tensors[f"state.{key}"] = value
        params = {}
        for key, value in self.get_params().items():
            if isinstance(value, (torch.Tensor, np.ndarray)):  # embedding matrices and the like: tensors, not JSON
                tensors[f"param.{key}"] = torch.as_tensor(value)
                params[key] = {"__tensor__": f"param.{key}", "numpy": isinstance(value, np.ndarray)}
            else:
                params[key] = _jsonable(value, self.name)
        header = {"name": self.name, "params": params, "meta": self.meta_, "fitted": state is not None,
                  "state_aliases": aliases}  # fmt: skip
        return persist.save(Path(directory) / DETECTOR_FILE, tensors, kind="detector", version=FORMAT_VERSION,
                            header=header)  # fmt: skip

    def __repr__(self) -> str:
        defaults = self.default_params()
        shown = []
        for key, value in self.get_params().items():
            default = defaults.get(key, inspect.Parameter.empty)
            if default is inspect.Parameter.empty or not _same(value, default):
                shown.append(f"{key}={_short_repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"


class OutputDetector(Detector):
    """A detector that fits and scores :class:`~oodguard.outputs.ModelOutputs`.

    Hooks
    -----
    _fit(outputs) -> dict of state tensors (or implement ``_statistics`` + ``_finalize``).
    _score(outputs) -> float tensor ``[n]`` for one chunk of rows, higher = more OOD.
    _score_row_bytes(outputs) -> estimated bytes of intermediates per scored row of ``outputs`` (sets the
        chunk size).
    """

    protocol: ClassVar[str] = "outputs"

    # ------------------------------------------------------------------ hooks
    def _fit(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        if self.state_reductions is not None:
            return self._finalize(self._statistics(outputs))
        raise NotImplementedError(f"{type(self).__name__} must implement _fit or _statistics/_finalize")

    def _statistics(self, outputs: ModelOutputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no additive fit statistics")

    def _score(self, outputs: ModelOutputs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _score")

    def _score_row_bytes(self, outputs: ModelOutputs) -> int:
        return 64 * 1024

    # ------------------------------------------------------------------ public API
    def fit(self, outputs: FitData, *, drop_ood: bool = False) -> OutputDetector:
        """Fit on in-distribution outputs and return ``self``.

        Rows labelled OOD (label < 0) are refused unless ``drop_ood=True``, which drops them. Sharded outputs
        (:meth:`ModelOutputs.open`) are added shard by shard when the fit statistics are additive
        (``supports_partial_fit``: memory of one shard plus the statistics); other detectors read every row into
        memory first.
        """
        if isinstance(outputs, ShardedOutputs):
            if not self.supports_partial_fit:
                return self.fit(outputs.to_memory(), drop_ood=drop_ood)
            self.stats_ = None
            self.meta_ = {}
            self.state_ = None
            self.partial_fit(outputs, drop_ood=drop_ood)
            return self._finish_fit()
        outputs = self._prepare_fit(outputs, drop_ood)
        self.stats_ = None
        self.meta_ = {}  # a re-fit may come from another model: forget the old dimensions
        self._state_cache = {}
        if self.state_reductions is not None:
            self.stats_ = self._statistics(outputs)
            self.state_ = self._finalize(self.stats_)
        else:
            self.state_ = self._fit(outputs)
        self._record_dims(outputs)
        return self._finish_fit()

    def _after_fit(self) -> None:
        """Checks (and trims) a finished fit: ``fit`` on outputs or shards and ``fit_distributed`` call it. A
        ValueError undoes the fit."""

    def _finish_fit(self) -> OutputDetector:
        try:
            self.state_  # finalise now (after partial fits): its errors belong to the fit  # noqa: B018
            self._after_fit()
        except ValueError:
            self.state_, self.stats_ = None, None
            raise
        return self

    def partial_fit(self, outputs: FitData, *, drop_ood: bool = False) -> OutputDetector:
        """Add one chunk of fit data; after any number of chunks, equal to ``fit`` on all of them.

        Sharded outputs are added shard by shard (a shard with only OOD rows is skipped under ``drop_ood``)."""
        self._require_partial_fit("partial_fit")
        if isinstance(outputs, ShardedOutputs):
            added = 0
            for shard in outputs:
                if drop_ood and shard.labels is not None and bool(shard.is_ood.all()):
                    continue
                self.partial_fit(shard, drop_ood=drop_ood)
                added += 1
            if not added:
                raise ValueError(f"{self.name}: fit got no in-distribution rows in {outputs.directory}")
            return self
        outputs = self._prepare_fit(outputs, drop_ood)
        if self.stats_ is not None:
            self._check_dims(outputs, "partial_fit")
        stats = self._statistics(outputs)
        self.stats_ = stats if self.stats_ is None else self._combine(self.stats_, stats)
        self._statistics_changed()
        self._record_dims(outputs)
        return self

    def merge(self, other: Detector) -> OutputDetector:
        """Combine with another detector of the same kind fitted on other data (in place; returns self)."""
        self._require_partial_fit("merge")
        if type(other) is not type(self) or not _same(other.get_params(), self.get_params()):
            raise ValueError(f"{self.name}: can only merge with a {self.name} detector with the same parameters")
        if other.stats_ is None:
            raise NotFittedError(f"{self.name}: the detector to merge has not been fitted")
        if self.stats_ is None:
            self.stats_ = {k: v.clone() for k, v in other.stats_.items()}
            self.meta_ = dict(other.meta_)
        else:
            for key in ("num_classes", "feature_dim"):
                if self.meta_.get(key) != other.meta_.get(key):
                    raise ValueError(
                        f"{self.name}: cannot merge, {key} differs ({self.meta_.get(key)} vs {other.meta_.get(key)})"
                    )
            self.stats_ = self._combine(self.stats_, other.stats_)
        self._statistics_changed()
        return self

    def score(
        self, outputs: ModelOutputs | ShardedOutputs | Mapping[str, Any] | torch.Tensor | np.ndarray
    ) -> np.ndarray | torch.Tensor:
        """OOD scores ``[N]``, higher = more likely OOD. Numpy outputs give numpy, torch gives torch.

        A plain tensor or array is accepted for a detector that reads one field: it is that field (the logits of
        ``energy``, the image embeddings of ``mcm``, ...)."""
        if isinstance(outputs, (torch.Tensor, np.ndarray)):
            if len(self.requires) != 1:
                raise ValueError(
                    f"{self.name}: score reads {', '.join(sorted(self.requires))}; pass them as a dict such as "
                    f"{{{', '.join(repr(f) + ': ...' for f in sorted(self.requires))}}}, not one array"
                )
            outputs = {next(iter(self.requires)): outputs}
        if isinstance(outputs, ShardedOutputs):  # one shard mapped at a time: memory bounded by a shard, not by N
            return torch.cat([torch.as_tensor(self.score(shard)) for shard in outputs])
        outputs = as_outputs(outputs)
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit(...) on in-distribution outputs before score(...)")
        self._check_fields(outputs, self.requires, "score")
        if len(outputs) == 0:
            raise ValueError(f"{self.name}: score got empty outputs (N=0); pass at least one row")
        self._check_dims(outputs, "score")
        row_bytes = self._score_row_bytes(outputs)
        widths = [1]
        if "features" in self.requires:  # features, and the [n, C] products with a stored head
            widths += [outputs.feature_dim or 1, self.meta_.get("num_classes") or 1]
        if "logits" in self.requires:
            widths.append(outputs.num_classes or 1)
        width = max(widths)
        chunk = min(len(outputs), MAX_CHUNK_ROWS, SCORE_MEMORY_BUDGET // max(1, row_bytes))
        chunk = max(1, min(chunk, max(256, CHUNK_TEMPORARY_BYTES // (4 * width))))
        pieces = [
            self._score(outputs._replace_rows(lambda t, s=start: t[s : s + chunk]))
            for start in range(0, len(outputs), chunk)
        ]
        scores = torch.cat(pieces).to(torch.float64) if len(pieces) > 1 else pieces[0].to(torch.float64)
        refuse_non_finite(self.name, scores)
        if outputs.array_type == "numpy":
            return scores.cpu().numpy()
        return scores

    __call__ = score

    def fit_from(self, source: Source) -> OutputDetector:
        return self.fit(source.outputs)

    def score_from(self, source: Source) -> np.ndarray | torch.Tensor:
        return self.score(source.outputs)

    # ------------------------------------------------------------------ helpers for subclasses
    def _prepare_fit(self, outputs: ModelOutputs | Mapping[str, Any], drop_ood: bool) -> ModelOutputs:
        outputs = as_outputs(outputs)
        if outputs.labels is not None and bool(outputs.is_ood.any()):
            count = int(outputs.is_ood.sum())
            if not drop_ood:
                raise ValueError(
                    f"{self.name}: fit data contains {count} OOD-labelled row(s) (label < 0); fit on "
                    "in-distribution data, or pass drop_ood=True to drop them"
                )
            outputs = outputs.id_only()
        self._check_fields(outputs, self.fit_requires, "fit")
        if len(outputs) == 0:
            raise ValueError(f"{self.name}: fit got empty outputs (N=0); pass in-distribution rows to fit on")
        return outputs

    def _check_fields(self, outputs: ModelOutputs, fields: frozenset[str], stage: str) -> None:
        missing = sorted(field for field in fields if not outputs.has(field))
        if missing:
            have = ", ".join(outputs.fields()) or "nothing"
            hints = []
            from_model = [field for field in missing if field != "labels"]  # labels come with the data
            if from_model:
                hints.append(f"extract {' and '.join(from_model)} from the model")
            if {"features", "head"} & set(missing):
                hints[-1] += (
                    " (extract(model, data, feature_layer=...) names the final linear layer, or the module whose "
                    "output are the features, when they are not found automatically)"
                )
            if "labels" in missing:
                hints.append("pass the true class of each fit row as labels (extract(model, data, labels=...) or "
                             "ModelOutputs(..., labels=...))")  # fmt: skip
            raise ValueError(
                f"{self.name}: {stage} needs {', '.join(missing)} but the outputs have {have}; {'; '.join(hints)}"
            )

    def _record_dims(self, outputs: ModelOutputs) -> None:
        if outputs.num_classes is not None:
            self.meta_["num_classes"] = outputs.num_classes
        if outputs.feature_dim is not None:
            self.meta_["feature_dim"] = outputs.feature_dim

    def _check_dims(self, outputs: ModelOutputs, stage: str) -> None:
        expected_c = self.meta_.get("num_classes")
        if outputs.logits is not None and expected_c is not None and outputs.logits.shape[1] != expected_c:
            raise ValueError(
                f"{self.name}: logits have C={outputs.logits.shape[1]} columns at {stage} but the detector "
                f"was fitted with C={expected_c}; use outputs of the same model"
            )
        expected_d = self.meta_.get("feature_dim")
        if outputs.features is not None and expected_d is not None and outputs.features.shape[1] != expected_d:
            raise ValueError(
                f"{self.name}: features have D={outputs.features.shape[1]} columns at {stage} but the detector "
                f"was fitted with D={expected_d}; use outputs of the same model and layer"
            )

    def _require_partial_fit(self, method: str) -> None:
        if self.state_reductions is None:
            raise TypeError(
                f"{self.name}: {method} is not available because its fit is not a sufficient statistic; "
                "use fit on all the data"
            )

    def _combine(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.state_reductions is not None
        combined = {}
        for key, how in self.state_reductions.items():
            if how == "sum":
                if a[key].shape != b[key].shape:
                    raise ValueError(
                        f"{self.name}: cannot combine statistic {key!r} of shapes "
                        f"{tuple(a[key].shape)} and {tuple(b[key].shape)}"
                    )
                combined[key] = a[key] + b[key]
            elif how == "cat":
                combined[key] = torch.cat([a[key], b[key]])
            else:
                raise ValueError(f"unknown reduction {how!r}")
        return combined


def refuse_non_finite(name: str, scores: torch.Tensor) -> None:
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise FloatingPointError(
            f"{name}: produced {bad} non-finite score(s); the inputs are outside what this detector "
            "can handle (see its documentation for the valid range)"
        )


def named_layers(outputs: ModelOutputs, names: list[str], detector: str, stage: str) -> list[torch.Tensor]:
    """``outputs.layers[name]`` for each of ``names``; a missing one is an error naming the layers that are there."""
    missing = [name for name in names if name not in outputs.layers]
    if missing:
        available = ", ".join(repr(k) for k in sorted(outputs.layers)) or "none"
        raise ValueError(
            f"{detector}: layer(s) {missing} are missing from the outputs at {stage} (available: {available}); "
            "extract them with extract(model, data, layers=[...]) or choose layers from the available ones"
        )
    return [outputs.layers[name] for name in names]


def _same(a: Any, b: Any) -> bool:
    """Equality of parameter values that may hold tensors or arrays."""
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        if type(a) is not type(b) or tuple(a.shape) != tuple(b.shape):
            return False
        return bool((torch.as_tensor(a) == torch.as_tensor(b)).all())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _short_repr(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"<{type(value).__name__} {tuple(value.shape)}>"
    return repr(value)


def _jsonable(value: Any, owner: str) -> Any:
    """A parameter value as JSON (numpy scalars become numbers); anything else that JSON cannot hold is refused."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, owner) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, owner) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{owner}: parameter value {value!r} of type {type(value).__name__} cannot be saved")


def clone(detector: Detector) -> Detector:
    """A new, unfitted detector of the same class with (deep copies of) the same parameters."""
    return type(detector)(**copy.deepcopy(detector.get_params()))


# ---------------------------------------------------------------------- registry functions
#: Spellings of earlier releases: (name, parameter) -> what to create instead, and how to translate.
def _renamed(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if name == "gradnorm" and "mode" in params:
        params = dict(params)
        mode = params.pop("mode")
        if mode == "autograd":
            warnings.warn(
                "create('gradnorm', mode='autograd') is deprecated: the model detector is now "
                "create('gradnorm_autograd')",
                DeprecationWarning,
                stacklevel=3,
            )
            return "gradnorm_autograd", params
        if mode != "closed_form":
            raise ValueError(f"gradnorm: parameter 'mode' must be 'closed_form' or 'autograd'; got {mode!r}")
        warnings.warn(
            "gradnorm's mode parameter is deprecated: 'gradnorm' is the closed form, 'gradnorm_autograd' the "
            "model detector",
            DeprecationWarning,
            stacklevel=3,
        )
        return "gradnorm", params
    if name == "nac" and "layers" in params:
        params = dict(params)
        if params["layers"] is None:
            params.pop("layers")
            return "nac", params
        warnings.warn(
            "create('nac', layers=[...]) is deprecated: NAC on inner layers is now create('nac_layers', layers=[...])",
            DeprecationWarning,
            stacklevel=3,
        )
        return "nac_layers", params
    return name, params


def create(name: str, **params: Any) -> Detector:
    """A new detector by registry name, e.g. ``create("vim", dim=64)``."""
    name, params = _renamed(name, params)
    cls = implementation(name)
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        raise TypeError(cls._unknown_params_message(unknown))
    return cls(**params)


def implementation(name: str) -> type[Detector]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def protocol(name: str) -> str:
    """``"outputs"`` for detectors that score cached model outputs, ``"model"`` for those that run the model."""
    return implementation(name).protocol


def needs_model(name: str) -> bool:
    """Whether the detector runs the model itself (the ``"model"`` protocol)."""
    return protocol(name) == "model"


def available(protocol: str | None = None, *, needs_model: bool | None = None) -> list[str]:
    """Registry names of the detectors, sorted; ``protocol="outputs"`` or ``"model"`` lists only that protocol
    (``needs_model=True``/``False`` is the same as ``protocol="model"``/``"outputs"``)."""
    if needs_model is not None:
        protocol = "model" if needs_model else "outputs"
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return sorted(n for n, cls in _REGISTRY.items() if protocol is None or cls.protocol == protocol)


def info(name: str) -> dict[str, Any]:
    """Paper, official code, protocol, requirements and defaults of a detector."""
    cls = implementation(name)
    return {
        "name": cls.name,
        "protocol": cls.protocol,
        "summary": cls.summary,
        "paper": cls.paper,
        "code": cls.code,
        "requires": sorted(cls.requires),
        "fit_requires": sorted(cls.fit_requires),
        "defaults": cls.default_params(),
        "needs_fit": cls.needs_fit,
        "required_params": list(cls.required_params),
        "needs_model": cls.protocol == "model",
        "input_kind": cls.input_kind,
        "partial_fit": cls.state_reductions is not None,
    }


def load(directory: str | Path) -> Detector:
    """Load a detector written by :meth:`Detector.save` (or by an earlier release). Refuses damaged or edited files,
    other kinds of file and unknown versions."""
    from oodguard import persist

    directory = Path(directory)
    if (directory / DETECTOR_FILE).is_file():
        tensors, header = persist.load(directory / DETECTOR_FILE, kind="detector", versions=FORMAT_VERSION)
    elif (directory / "config.json").is_file():
        tensors, header = _load_version_1(directory)
    else:
        raise FileNotFoundError(f"{directory} holds no saved detector ({DETECTOR_FILE} is missing)")
    try:
        params = {key: _param_from_file(value, tensors) for key, value in header["params"].items()}
        detector = create(header["name"], **params)
        detector.meta_ = dict(header.get("meta", {}))
        stats = {k[6:]: v for k, v in tensors.items() if k.startswith("stats.")}
        if header.get("fitted"):
            state = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
            for key, twin in header.get("state_aliases", {}).items():
                state[key] = stats[twin]
            detector.state_ = state
        upgrade = getattr(detector, "upgrade_statistics", None)
        detector.stats_ = (upgrade(stats) if upgrade is not None else stats) or None
    except (KeyError, TypeError, AttributeError) as error:  # a header that parses but does not describe a detector
        raise ValueError(f"{directory}: the saved detector is damaged or was edited ({type(error).__name__}: "
                         f"{error}); save it again") from error  # fmt: skip
    return detector


#: The file a detector is saved to, inside the directory given to save/load.
DETECTOR_FILE = "detector.safetensors"


def _param_from_file(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value and isinstance(value["__tensor__"], str):
        tensor = tensors[value["__tensor__"]]
        return tensor.numpy() if value.get("numpy") else tensor
    return _from_json(value)


def _load_version_1(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The layout of the first release: ``config.json`` + ``state.safetensors`` (no digest)."""
    from safetensors.torch import load_file

    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != "oodguard.detector":
        raise ValueError(f"{config_path} is not an oodguard detector config")
    version = config.get("format_version")
    if version != 1:
        raise ValueError(
            f"{directory}: detector format version {version!r} is not supported (this oodguard reads versions 1 "
            f"and {FORMAT_VERSION}); re-fit and save with this version of oodguard"
        )
    try:
        tensors = load_file(str(directory / "state.safetensors"))
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise ValueError(f"{directory / 'state.safetensors'} is not readable ({error})") from error
    for key, twin in config.get("state_aliases", {}).items():
        if f"stats.{twin}" not in tensors:
            raise ValueError(f"{directory}: state {key!r} refers to a missing statistic {twin!r}; the file is damaged")
    return tensors, config


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# ---------------------------------------------------------------------- shared numerics
def logsumexp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T * LSE(f / T)`` along the last axis, computed stably."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def class_counts(labels: torch.Tensor, num_classes: int, name: str, minimum: int = 2) -> torch.Tensor:
    """Samples per class; refuses labels outside ``0..C-1`` and classes with fewer than ``minimum`` rows."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in 0..{num_classes - 1} (C={num_classes}), got range "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    if minimum and bool((counts < minimum).any()):
        short = torch.nonzero(counts < minimum).flatten().tolist()
        shown = ", ".join(f"class {c}: {int(counts[c])}" for c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise ValueError(
            f"{name}: every class needs at least {minimum} fit samples ({shown}{more}); "
            "add samples of those classes or remove the classes"
        )
    return counts


def infer_num_classes(outputs: ModelOutputs) -> int:
    """C from logits or head when present, else ``max(label) + 1``."""
    if outputs.num_classes is not None:
        return outputs.num_classes
    if outputs.labels is None or outputs.labels.numel() == 0:
        raise ValueError("cannot tell the number of classes: pass labels, logits or the head")
    return int(outputs.labels.max()) + 1


def symmetric_pinv(matrix: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix via ``eigh`` in float64 (finite even when singular)."""
    matrix = matrix.to(torch.float64)
    matrix = 0.5 * (matrix + matrix.T)
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = rtol * max(float(values.abs().max()), math.ulp(1.0)) if values.numel() else 0.0
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff if cutoff > 0 else 1e-300), 0.0)
    return (vectors * inverse) @ vectors.T


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy-default (linear interpolation) percentile ``q`` in [0, 100] over all entries, as float64.

    Large inputs go through numpy in their own dtype, so no float64 copy of the whole tensor is made.
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("percentile of an empty set")
    if flat.numel() <= 16_000_000:  # torch.quantile's size limit
        return torch.quantile(flat.to(torch.float64), q / 100.0)
    return torch.tensor(float(np.percentile(flat.cpu().numpy(), q)), dtype=torch.float64)
