"""ModelOutputs: what a model produced for a set of inputs, validated once, saved with safetensors.

Every detector reads its inputs from a :class:`ModelOutputs`, so the model runs once per dataset and
every detector reuses what it produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard import persist

ArrayLike = np.ndarray | torch.Tensor

FORMAT_VERSION = 1
#: The kind of file ModelOutputs.save writes (see oodguard.persist).
FILE_KIND = "outputs"
_FIELDS = ("logits", "features", "labels", "layers", "head")


def field_tensor(value: Any, field: str) -> tuple[torch.Tensor, bool]:
    """Convert an array to a tensor; return it and whether it came from numpy (or a list)."""
    if isinstance(value, torch.Tensor):
        return value.detach(), False
    if isinstance(value, (np.ndarray, list, tuple, np.generic)):
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise ValueError(
                f"{field}: expected a numeric array, got dtype {array.dtype}; convert it to float or int first"
            )
        return torch.from_numpy(np.ascontiguousarray(array)), True
    raise ValueError(f"{field}: expected a numpy array or torch tensor, got {type(value).__name__}")


def _as_float(tensor: torch.Tensor, field: str) -> torch.Tensor:
    """Floats keep float32/float64; half precision and integers become float32."""
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    if tensor.dtype in (torch.float16, torch.bfloat16) or (
        not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool
    ):
        return tensor.to(torch.float32)
    raise ValueError(f"{field}: expected a real numeric dtype, got {tensor.dtype}; convert it to float32")


def _check_finite(tensor: torch.Tensor, field: str) -> None:
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{field}: contains {bad} NaN or infinite value(s); remove or repair those rows before use")


def _check_rank(tensor: torch.Tensor, field: str, rank: int, shape_doc: str) -> None:
    if tensor.ndim != rank:
        raise ValueError(f"{field}: expected shape {shape_doc} (rank {rank}), got shape {tuple(tensor.shape)}")


class ModelOutputs:
    """What a model produced for ``N`` inputs: logits, penultimate features, labels, layers, head.

    Parameters
    ----------
    logits : array ``[N, C]``, optional
        Classifier outputs before the softmax.
    features : array ``[N, D]``, optional
        The input of the final linear layer (penultimate features).
    labels : integer array ``[N]``, optional
        Class ids ``0..C-1``; a negative label marks an out-of-distribution sample.
    layers : dict name -> array ``[N, ...]``, optional
        Intermediate activations.
    head : tuple ``(weight [C, D], bias [C])``, optional
        The final linear layer, so that ``logits = features @ weight.T + bias``.

    Numpy arrays and torch tensors are both accepted. Detectors return numpy scores when every array
    given here was numpy, torch tensors otherwise. Everything is validated on construction (shapes,
    dtypes, finite values) and a ``ValueError`` names the field and the fix.

    Examples
    --------
    >>> import numpy as np
    >>> out = ModelOutputs(logits=np.zeros((4, 3)), labels=np.array([0, 1, 2, -1]))
    >>> len(out), out.num_classes, int(out.is_ood.sum())
    (4, 3, 1)
    """

    def __init__(
        self,
        logits: ArrayLike | None = None,
        features: ArrayLike | None = None,
        labels: ArrayLike | None = None,
        layers: Mapping[str, ArrayLike] | None = None,
        head: tuple[ArrayLike, ArrayLike] | None = None,
    ) -> None:
        from_numpy: list[bool] = []

        def convert(value: Any, field: str) -> torch.Tensor:
            tensor, is_numpy = field_tensor(value, field)
            from_numpy.append(is_numpy)
            return tensor

        self.logits = None if logits is None else _as_float(convert(logits, "logits"), "logits")
        self.features = None if features is None else _as_float(convert(features, "features"), "features")
        self.labels = None if labels is None else self._convert_labels(convert(labels, "labels"))
        self.layers: dict[str, torch.Tensor] = {}
        if layers is not None:
            if not isinstance(layers, Mapping):
                raise ValueError("layers: expected a dict mapping layer name -> array [N, ...]")
            for name, value in layers.items():
                field = f"layers[{name!r}]"
                self.layers[str(name)] = _as_float(convert(value, field), field)
        self.head: tuple[torch.Tensor, torch.Tensor] | None = None
        if head is not None:
            if not isinstance(head, (tuple, list)) or len(head) != 2:
                raise ValueError("head: expected a pair (weight [C, D], bias [C]) of the final linear layer")
            weight = _as_float(convert(head[0], "head weight"), "head weight")
            bias = _as_float(convert(head[1], "head bias"), "head bias")
            self.head = (weight, bias)
        self.array_type = "numpy" if from_numpy and all(from_numpy) else "torch"
        self._validate()

    @staticmethod
    def _convert_labels(labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype.is_floating_point:
            if labels.numel() and not bool((labels == labels.round()).all()):
                raise ValueError("labels: expected integer class ids, got non-integer floats")
            labels = labels.to(torch.int64)
        elif labels.dtype == torch.bool or labels.dtype.is_complex:
            raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
        return labels.to(torch.int64)

    def _validate(self) -> None:
        sizes: dict[str, int] = {}
        if self.logits is not None:
            _check_rank(self.logits, "logits", 2, "[N, C]")
            sizes["logits"] = self.logits.shape[0]
        if self.features is not None:
            _check_rank(self.features, "features", 2, "[N, D]")
            sizes["features"] = self.features.shape[0]
        if self.labels is not None:
            _check_rank(self.labels, "labels", 1, "[N]")
            sizes["labels"] = self.labels.shape[0]
        for name, value in self.layers.items():
            if value.ndim < 2:
                raise ValueError(f"layers[{name!r}]: expected shape [N, ...] (rank >= 2), got {tuple(value.shape)}")
            sizes[f"layers[{name!r}]"] = value.shape[0]
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
            raise ValueError(f"fields disagree on the number of samples N ({listing}); pass rows of the same inputs")
        if self.head is not None:
            weight, bias = self.head
            _check_rank(weight, "head weight", 2, "[C, D]")
            _check_rank(bias, "head bias", 1, "[C]")
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"head: weight has {weight.shape[0]} rows (classes) but bias has {bias.shape[0]}; they must match"
                )
            if self.logits is not None and self.logits.shape[1] != weight.shape[0]:
                raise ValueError(
                    f"logits have C={self.logits.shape[1]} columns but the head has {weight.shape[0]} classes"
                )
            if self.features is not None and self.features.shape[1] != weight.shape[1]:
                raise ValueError(
                    f"features have D={self.features.shape[1]} columns but the head weight expects {weight.shape[1]}"
                )
            _check_finite(weight, "head weight")
            _check_finite(bias, "head bias")
        for field in ("logits", "features"):
            value = getattr(self, field)
            if value is not None:
                _check_finite(value, field)
        for name, value in self.layers.items():
            _check_finite(value, f"layers[{name!r}]")
        self._n = next(iter(sizes.values()), 0)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._n

    @property
    def num_classes(self) -> int | None:
        """C, from the logits or the head; ``None`` when neither is present."""
        if self.logits is not None:
            return self.logits.shape[1]
        if self.head is not None:
            return self.head[0].shape[0]
        return None

    @property
    def feature_dim(self) -> int | None:
        """D, from the features or the head; ``None`` when neither is present."""
        if self.features is not None:
            return self.features.shape[1]
        if self.head is not None:
            return self.head[0].shape[1]
        return None

    @property
    def is_ood(self) -> torch.Tensor:
        """Boolean mask of OOD-labelled rows (label < 0). Requires labels."""
        if self.labels is None:
            raise ValueError("labels: this ModelOutputs has no labels, so OOD rows cannot be identified")
        return self.labels < 0

    def has(self, field: str) -> bool:
        """Whether a field is present (``"logits"``, ``"features"``, ``"labels"``, ``"layers"``, ``"head"``)."""
        if field == "layers":
            return bool(self.layers)
        if field not in _FIELDS:
            raise ValueError(f"unknown field {field!r}; fields are {', '.join(_FIELDS)}")
        return getattr(self, field) is not None

    def fields(self) -> list[str]:
        """Names of the fields that are present."""
        return [field for field in _FIELDS if self.has(field)]

    # ------------------------------------------------------------------ slicing and joining
    def _replace_rows(self, take) -> ModelOutputs:
        """A new ModelOutputs with ``take`` applied to every per-sample tensor (no re-validation)."""
        new = object.__new__(ModelOutputs)
        new.logits = None if self.logits is None else take(self.logits)
        new.features = None if self.features is None else take(self.features)
        new.labels = None if self.labels is None else take(self.labels)
        new.layers = {name: take(value) for name, value in self.layers.items()}
        new.head = self.head
        new.array_type = self.array_type
        reference = next(
            (t for t in (new.logits, new.features, new.labels, *new.layers.values()) if t is not None), None
        )
        new._n = 0 if reference is None else reference.shape[0]
        return new

    def __getitem__(self, index: Any) -> ModelOutputs:
        """Rows selected by a slice, an integer array, or a boolean mask; the head is shared."""
        if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.dtype.is_floating_point:
            index = int(index)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            index = int(index)
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool and index.shape != (len(self),):
            raise IndexError(f"boolean mask has shape {tuple(index.shape)}, expected ({len(self)},)")
        return self._replace_rows(lambda tensor: tensor[index])

    def with_fields(self, **fields: Any) -> ModelOutputs:
        """A copy with some fields replaced (validated again)."""
        current: dict[str, Any] = {
            "logits": self.logits,
            "features": self.features,
            "labels": self.labels,
            "layers": self.layers or None,
            "head": self.head,
        }
        unknown = set(fields) - set(current)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; fields are {', '.join(_FIELDS)}")
        current.update(fields)
        new = ModelOutputs(**current)
        new.array_type = self.array_type
        return new

    @classmethod
    def concat(cls, parts: Sequence[ModelOutputs]) -> ModelOutputs:
        """Join row-wise. All parts must have the same fields, layer names and head."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat: got no ModelOutputs to join")
        first = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            if part.fields() != first.fields() or set(part.layers) != set(first.layers):
                raise ValueError(
                    f"concat: part {i} has fields {part.fields()} / layers {sorted(part.layers)}, "
                    f"part 0 has {first.fields()} / {sorted(first.layers)}; give every part the same fields"
                )
            if first.head is not None and (
                part.head is None
                or not (torch.equal(first.head[0], part.head[0]) and torch.equal(first.head[1], part.head[1]))
            ):
                raise ValueError(f"concat: part {i} has a different head than part 0; outputs of one model only")

        def cat(getter):
            values = [getter(p) for p in parts]
            return None if values[0] is None else torch.cat(values)

        joined = ModelOutputs(
            logits=cat(lambda p: p.logits),
            features=cat(lambda p: p.features),
            labels=cat(lambda p: p.labels),
            layers={name: torch.cat([p.layers[name] for p in parts]) for name in first.layers} or None,
            head=first.head,
        )
        joined.array_type = "numpy" if all(p.array_type == "numpy" for p in parts) else "torch"
        return joined

    def id_only(self) -> ModelOutputs:
        """The rows whose label is not negative (requires labels)."""
        return self[~self.is_ood]

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> None:
        """Save to one safetensors file (tensors plus a small JSON header in the metadata)."""
        tensors: dict[str, torch.Tensor] = {}
        for field in ("logits", "features", "labels"):
            value = getattr(self, field)
            if value is not None:
                tensors[field] = value.contiguous().cpu()
        for index, value in enumerate(self.layers.values()):
            tensors[f"layers.{index}"] = value.contiguous().cpu()
        if self.head is not None:
            tensors["head.weight"] = self.head[0].contiguous().cpu()
            tensors["head.bias"] = self.head[1].contiguous().cpu()
        header = {"layer_names": list(self.layers), "array_type": self.array_type, "num_rows": len(self)}
        persist.save(path, tensors, kind=FILE_KIND, version=FORMAT_VERSION, header=header)

    @classmethod
    def load(cls, path: str | Path) -> ModelOutputs:
        """Load a file written by :meth:`save`; refuses other files, unknown versions and edited or damaged files."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such outputs file: {path}")
        tensors, header = persist.load(path, kind=FILE_KIND, versions=FORMAT_VERSION)
        layers = {name: tensors[f"layers.{i}"] for i, name in enumerate(header["layer_names"])}
        head = (tensors["head.weight"], tensors["head.bias"]) if "head.weight" in tensors else None
        outputs = cls(
            logits=tensors.get("logits"),
            features=tensors.get("features"),
            labels=tensors.get("labels"),
            layers=layers or None,
            head=head,
        )
        outputs.array_type = header.get("array_type", "torch")
        return outputs

    @classmethod
    def open(cls, directory: str | Path, *, verify: bool = False) -> Any:
        """Open a shard folder (``extract(..., out_dir=DIR)``) as :class:`~oodguard.shards.ShardedOutputs`,
        memory-mapped shard by shard without reading it; ``verify=True`` also checks every file's sha256."""
        from oodguard.shards import open_shards

        return open_shards(directory, verify=verify)

    def __repr__(self) -> str:
        parts = [f"N={len(self)}"]
        if self.logits is not None:
            parts.append(f"logits[{self.logits.shape[1]}]")
        if self.features is not None:
            parts.append(f"features[{self.features.shape[1]}]")
        if self.labels is not None:
            parts.append(f"labels(ood={int(self.is_ood.sum())})")
        if self.layers:
            parts.append(f"layers={list(self.layers)}")
        if self.head is not None:
            parts.append(f"head[{self.head[0].shape[0]}x{self.head[0].shape[1]}]")
        return f"ModelOutputs({', '.join(parts)})"


# ---------------------------------------------------------------------- files from other frameworks
#: Array names a feature file may hold; the head may be stored as head.weight/head.bias or head_weight/head_bias.
KNOWN_ARRAYS = ("logits", "features", "labels", "head.weight", "head.bias", "head_weight", "head_bias")


def read_outputs(path: str | Path) -> ModelOutputs:
    """Load outputs from a ``.safetensors`` or ``.npz`` file.

    The file holds arrays named ``logits`` ``[N, C]``, ``features`` ``[N, D]``, ``labels`` ``[N]`` and,
    optionally, the final linear layer as ``head.weight`` ``[C, D]`` and ``head.bias`` ``[C]`` (or
    ``head_weight``/``head_bias``). A file written by :meth:`ModelOutputs.save` is read as such.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as handle:
                if persist.HEADER_KEY in (handle.metadata() or {}):
                    return ModelOutputs.load(path)
                arrays = {key: handle.get_tensor(key) for key in handle.keys()}
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except Exception as error:
            raise ValueError(f"{path} is not a readable npz file without pickled objects ({error})") from error
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .safetensors or .npz")
    unknown = sorted(set(arrays) - set(KNOWN_ARRAYS))
    if unknown:
        raise ValueError(f"{path}: unknown array(s) {unknown}; expected some of {', '.join(KNOWN_ARRAYS)}")
    weight = arrays.get("head.weight", arrays.get("head_weight"))
    bias = arrays.get("head.bias", arrays.get("head_bias"))
    if (weight is None) != (bias is None):
        raise ValueError(f"{path}: the head needs both its weight and its bias")
    try:
        return ModelOutputs(
            logits=arrays.get("logits"),
            features=arrays.get("features"),
            labels=arrays.get("labels"),
            head=None if weight is None or bias is None else (weight, bias),
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def as_outputs(value: ModelOutputs | Mapping[str, Any]) -> ModelOutputs:
    """Accept a ModelOutputs or a mapping of its fields (e.g. an ``np.load`` result)."""
    if isinstance(value, ModelOutputs):
        return value
    if isinstance(value, Mapping) or hasattr(value, "files"):
        keys = list(value.files) if hasattr(value, "files") else list(value)
        unknown = [k for k in keys if k not in _FIELDS]
        if unknown:
            raise ValueError(f"unknown output field(s) {unknown}; expected some of {', '.join(_FIELDS)}")
        return ModelOutputs(**{k: value[k] for k in keys})
    raise ValueError(
        f"expected a ModelOutputs (or a dict of logits/features/labels arrays), got {type(value).__name__}"
    )
