"""Run a torch model over a dataset once and collect what detectors need into :class:`ModelOutputs`.

:func:`extract` produces the logits, the penultimate features (the input of the final linear layer),
the final linear layer itself (the *head*), any named intermediate layers (forward hooks) and the labels,
for inputs given as a ``DataLoader``, a ``Dataset``, an iterable of batches, or arrays. With
``cache_dir`` the outputs stream to disk in chunks and are reused on the next call with the same model,
data and layers; the cache key makes a stale entry impossible to hit silently.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler
from tqdm.auto import tqdm

from oodguard.outputs import ModelOutputs

__all__ = ["extract", "find_head", "model_fingerprint", "content_hash", "CACHE_FORMAT_VERSION"]

#: Version of the on-disk cache layout; part of every cache key, so a layout change never reads old entries.
CACHE_FORMAT_VERSION = 1
_COMPLETE = "complete.json"
_HEAD_FILE = "head.safetensors"
_MAX_LISTED_NAMES = 200


# ---------------------------------------------------------------------------------------------- model lookup
def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    # remove_duplicate=False: a module shared under two names can be asked for by either name.
    return dict(model.named_modules(remove_duplicate=False))


def _missing_module_error(model: nn.Module, name: Any, argument: str) -> ValueError:
    names = [n for n in _module_table(model) if n]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, names, n=3)
        if close:
            hint = f"Did you mean {', '.join(repr(c) for c in close)}? "
    listed = ", ".join(names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        listed += f", ... ({len(names) - _MAX_LISTED_NAMES} more; print(dict(model.named_modules()).keys()))"
    return ValueError(
        f"{argument}: no module named {name!r} in {type(model).__name__}. {hint}"
        f"Available module names: {listed or '(the model has no submodules)'}"
    )


def _get_module(model: nn.Module, name: Any, argument: str) -> nn.Module:
    table = _module_table(model)
    if not isinstance(name, str) or name not in table:
        raise _missing_module_error(model, name, argument)
    return table[name]


def find_head(model: nn.Module, feature_layer: str | None = None) -> tuple[str, nn.Linear] | None:
    """The final linear layer of ``model`` (its input is the feature), as ``(name, module)``.

    Parameters
    ----------
    model : torch.nn.Module
    feature_layer : str, optional
        Name (as in ``model.named_modules()``) of the final linear layer. When omitted, the head is the
        model's last module in ``named_modules()`` order if that module is an ``nn.Linear`` (true for
        ResNet ``fc``, ViT ``heads.head``, DenseNet ``classifier``, ``nn.Sequential(..., nn.Linear)``);
        for a bare ``nn.Linear`` model the name is ``""``.

    Returns
    -------
    ``(name, module)``, or ``None`` when ``feature_layer`` is omitted and the last module is not an
    ``nn.Linear`` (then only logits can be extracted; name the layer to get features and head).

    Raises
    ------
    ValueError
        ``feature_layer`` names no module (the message lists the available names) or names a module
        that is not an ``nn.Linear``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> find_head(model)[0]
    '2'
    >>> find_head(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))) is None
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if feature_layer is not None:
        module = _get_module(model, feature_layer, "feature_layer")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"feature_layer: {feature_layer!r} is a {type(module).__name__}, not an nn.Linear. Name the final "
                "linear layer that produces the logits: its input is the feature and its weight and bias are the head"
            )
        return feature_layer, module
    name, module = list(model.named_modules())[-1]
    if isinstance(module, nn.Linear):
        return name, module
    return None


# ---------------------------------------------------------------------------------------------- hashing
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, on the CPU, in C order (a view where possible)."""
    tensor = tensor.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    tensor = tensor.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 hex digest identifying a model's class, structure and weights.

    Covers the class (module and qualified name), ``repr(model)`` (so two models with the same weights but
    different activations or strides differ), every ``state_dict`` entry (name, dtype, shape and bytes), the
    non-persistent buffers, and for every submodule the compiled code of its class's ``forward`` and its plain
    public attributes (numbers, strings, booleans, tuples of them; not ``training``, names starting with ``_``
    are private and ignored), so an edited ``forward`` or a changed ``self.scale`` also changes it. State
    kept elsewhere (globals, closures) cannot be seen: give such models a ``dataset_key`` naming their version.
    Changing a single weight changes the fingerprint.

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> a = nn.Linear(2, 2)
    >>> model_fingerprint(a) == model_fingerprint(a)
    True
    >>> with torch.no_grad():
    ...     a.weight[0, 0] += 1
    >>> len(model_fingerprint(a))
    64
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    digest = hashlib.sha256()
    cls = type(model)
    digest.update(f"class:{cls.__module__}.{cls.__qualname__}\n".encode())
    digest.update(f"repr:{model!r}\n".encode())
    for name, value in model.state_dict(keep_vars=False).items():
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor:{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(_tensor_bytes(value))
        else:  # e.g. a module's _extra_state
            digest.update(f"value:{name}:{value!r}\n".encode())
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name not in persistent and buffer is not None:
            digest.update(f"buffer:{name}:{buffer.dtype}:{tuple(buffer.shape)}\n".encode())
            digest.update(_tensor_bytes(buffer))
    for name, module in model.named_modules():
        digest.update(_module_behaviour(name, module))
    return digest.hexdigest()


_PLAIN = (bool, int, float, str, type(None))


def _module_behaviour(name: str, module: nn.Module) -> bytes:
    """The code of a module's ``forward`` and its plain public attributes, as bytes to hash."""
    parts = [f"module:{name}:{type(module).__module__}.{type(module).__qualname__}"]
    code = getattr(type(module).forward, "__code__", None)
    if code is not None:
        parts.append(f"code:{code.co_code.hex()}:{code.co_consts!r}:{code.co_names!r}")
    for key, value in sorted(vars(module).items()):
        plain = isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))
        if not key.startswith("_") and key != "training" and plain:  # extraction always runs in eval mode
            parts.append(f"attr:{key}={value!r}")
    return ("\n".join(parts) + "\n").encode()


class _ContentHash:
    """sha256 over the inputs and labels fed to the model, independent of how rows are split into batches."""

    def __init__(self) -> None:
        self._inputs = hashlib.sha256()
        self._labels = hashlib.sha256()
        self._signature: str | None = None
        self.rows = 0
        self.has_labels = False

    def update(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        signature = f"{inputs.dtype}|{tuple(inputs.shape[1:])}"
        if signature != self._signature:  # record the per-row layout whenever it changes
            self._inputs.update(f"\x00rows:{self.rows}:{signature}\x00".encode())
            self._signature = signature
        self._inputs.update(_tensor_bytes(inputs))
        if labels is not None:
            self.has_labels = True
            self._labels.update(_tensor_bytes(labels))
        self.rows += inputs.shape[0]

    def hexdigest(self) -> str:
        final = hashlib.sha256()
        final.update(f"rows:{self.rows};labels:{self.has_labels};".encode())
        final.update(self._inputs.digest())
        final.update(self._labels.digest())
        return final.hexdigest()


def content_hash(data: Any, labels: Any = None, batch_size: int = 256) -> str:
    """sha256 (hex) of the inputs and labels ``data`` yields, as the extraction cache keys them.

    The same for any split of the rows into batches; ``data`` takes every form :func:`extract` accepts (it must be
    re-iterable to be extracted afterwards).
    """
    digest = _ContentHash()
    for inputs, batch_labels in _Batches(data, labels, batch_size):
        if inputs.shape[0]:
            digest.update(inputs, batch_labels)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- devices
def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise ValueError(
                f"device: {device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps'"
            ) from error
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise ValueError(f"device: expected a string such as 'cpu' or 'cuda', or a torch.device; got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {str(resolved)!r} was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use device='cpu' or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= count:
            raise ValueError(f"device: {str(resolved)!r} was requested but only {count} CUDA device(s) are visible")
        resolved = torch.device("cuda", index)
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device: 'mps' was requested but the Apple MPS backend is not available; use device='cpu'")
    return resolved


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index_a = torch.cuda.current_device() if a.index is None else a.index
        index_b = torch.cuda.current_device() if b.index is None else b.index
        return index_a == index_b
    return True


def _check_model_device(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """Refuse a model that lives entirely on another device; return its floating dtype (for casting inputs)."""
    tensors = [*model.parameters(), *model.buffers()]
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        (model_device,) = devices
        if model_device.type != "meta" and not _same_device(model_device, device):
            raise ValueError(
                f"device: the model's parameters are on {model_device} but device={str(device)!r}; "
                f"move the model with model.to({str(device)!r}) or pass device={str(model_device)!r}"
            )
    return next((t.dtype for t in model.parameters() if t.dtype.is_floating_point), None)


# ---------------------------------------------------------------------------------------------- batches
def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{what}: got a numpy array of Python objects; convert it to a numeric array")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{what}: expected a torch tensor or numpy array, got {type(value).__name__}")


def _as_labels(value: Any, rows: int, what: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError as error:
            raise ValueError(f"{what}: labels must be integer class ids, got a ragged list") from error
        if value.dtype.kind not in "biu":
            raise ValueError(f"{what}: labels must be integer class ids, got {value.dtype} values")
    labels = _as_tensor(value, what)
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise ValueError(
            f"{what}: labels must have shape [{rows}] (one integer class id per input row), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point:
        if labels.numel() and not bool((labels == labels.round()).all()):
            raise ValueError(f"{what}: labels must be integer class ids, got non-integer floats")
    elif labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"{what}: labels must be integer class ids, got dtype {labels.dtype}")
    return labels.to(torch.int64)


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, Any]:
    """A batch is a tensor/array of inputs, or ``(inputs,)``, or ``(inputs, labels)``."""
    where = f"batch {index}"
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        inputs, labels = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs, labels = batch[0], (batch[1] if len(batch) == 2 else None)
    elif isinstance(batch, (tuple, list)):
        raise ValueError(
            f"{where}: a tuple/list batch must be (inputs,) or (inputs, labels), got {len(batch)} elements. "
            "Models with several inputs are not supported yet: wrap the model so that it takes one tensor"
        )
    elif isinstance(batch, dict):
        raise ValueError(f"{where}: dict batches are not supported; yield (inputs, labels) tuples or plain tensors")
    else:
        raise ValueError(f"{where}: expected a tensor or an (inputs, labels) pair, got {type(batch).__name__}")
    if isinstance(inputs, (tuple, list, dict)):
        raise ValueError(
            f"{where}: the inputs are a {type(inputs).__name__}; only single-tensor inputs are supported for now. "
            "Wrap the model so that it takes one tensor (e.g. stack or concatenate the inputs)"
        )
    inputs = _as_tensor(inputs, f"{where} inputs")
    if inputs.ndim == 0:
        raise ValueError(f"{where}: inputs must have a leading batch dimension, got a scalar")
    return inputs, labels


class _Batches:
    """Uniform iteration over the accepted data forms, yielding ``(inputs [B, ...], labels [B] or None)``."""

    def __init__(self, data: Any, labels: Any, batch_size: int) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.labels = None
        if labels is not None:
            tensor = _as_tensor(np.asarray(labels) if isinstance(labels, (list, tuple)) else labels, "labels")
            if tensor.ndim != 1:
                raise ValueError(f"labels: expected shape [N] (one class id per row), got {tuple(tensor.shape)}")
            self.labels = _as_labels(tensor, tensor.shape[0], "labels")
        self.arrays: torch.Tensor | None = None
        self.iterable: Iterable | None = None
        if isinstance(data, (torch.Tensor, np.ndarray)):
            self.arrays = _as_tensor(data, "data")
            if self.arrays.ndim == 0:
                raise ValueError("data: an array of inputs must have a leading row dimension, got a scalar")
            if self.labels is not None and self.labels.shape[0] != self.arrays.shape[0]:
                raise ValueError(
                    f"labels: {self.labels.shape[0]} labels for {self.arrays.shape[0]} input rows; give one per row"
                )
        elif isinstance(data, DataLoader):
            if isinstance(getattr(data, "sampler", None), RandomSampler):
                warnings.warn(
                    "data: the DataLoader shuffles (shuffle=True), so rows come out in a random order that differs "
                    "between calls; build it with shuffle=False",
                    stacklevel=3,
                )
            self.iterable = data
        elif isinstance(data, (Dataset, IterableDataset)):
            self.iterable = DataLoader(data, batch_size=batch_size, shuffle=False)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
            self.iterable = data
        else:
            raise ValueError(
                "data: expected a DataLoader, a torch Dataset, an iterable of batches, or an array of inputs; "
                f"got {type(data).__name__}"
            )

    @property
    def one_shot(self) -> bool:
        """Whether iterating consumes the data (a generator or iterator), so it cannot be read twice."""
        # Checked on the type: calling iter() on a DataLoader would start its worker processes.
        return isinstance(self.iterable, Iterator)

    def __len__(self) -> int:
        if self.arrays is not None:
            return -(-self.arrays.shape[0] // self.batch_size)
        return len(self.iterable)  # type: ignore[arg-type]  # TypeError when unknown, handled by callers

    def num_batches(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.arrays is not None:
            for start in range(0, self.arrays.shape[0], self.batch_size):
                stop = start + self.batch_size
                labels = None if self.labels is None else self.labels[start:stop]
                yield self.arrays[start:stop], labels
            return
        offset = 0
        has_labels: bool | None = None
        for index, batch in enumerate(self.iterable):  # type: ignore[arg-type]
            inputs, labels = _split_batch(batch, index)
            rows = inputs.shape[0]
            if labels is not None:
                if self.labels is not None:
                    raise ValueError(
                        f"labels: given both as labels= and inside the batches (batch {index}); give them once"
                    )
                labels = _as_labels(labels, rows, f"batch {index}")
            elif self.labels is not None:
                if offset + rows > self.labels.shape[0]:
                    raise ValueError(
                        f"labels: {self.labels.shape[0]} labels given but the data has more rows "
                        f"(at least {offset + rows}); give one label per row"
                    )
                labels = self.labels[offset : offset + rows]
            if has_labels is None:
                has_labels = labels is not None
            elif has_labels != (labels is not None):
                raise ValueError(f"batch {index}: some batches carry labels and others do not; be consistent")
            offset += rows
            yield inputs, labels
        if self.labels is not None and offset != self.labels.shape[0]:
            raise ValueError(
                f"labels: {self.labels.shape[0]} labels given but the data has {offset} rows; give one label per row"
            )


# ---------------------------------------------------------------------------------------------- collecting
class _Collector:
    """Gathers per-batch outputs; with a directory, writes a part file every ``chunk_rows`` rows."""

    def __init__(self, directory: Path | None, chunk_rows: int, layer_names: Sequence[str]) -> None:
        self.directory = directory
        self.chunk_rows = chunk_rows
        self.layer_names = list(layer_names)
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered_rows = 0
        self.rows = 0
        self.parts: list[str] = []

    def add(self, fields: dict[str, torch.Tensor]) -> None:
        for key, value in fields.items():
            self.buffer.setdefault(key, []).append(value)
        rows = next(iter(fields.values())).shape[0]
        self.buffered_rows += rows
        self.rows += rows
        if self.directory is not None and self.buffered_rows >= self.chunk_rows:
            joined = self._take_all()
            start = 0
            while self.buffered_rows - start >= self.chunk_rows:
                self._write({key: value[start : start + self.chunk_rows] for key, value in joined.items()})
                start += self.chunk_rows
            self.buffer = {key: [value[start:]] for key, value in joined.items()} if start < self.buffered_rows else {}
            self.buffered_rows -= start

    def _take_all(self) -> dict[str, torch.Tensor]:
        joined = {key: values[0] if len(values) == 1 else torch.cat(values) for key, values in self.buffer.items()}
        self.buffer = {}
        return joined

    def _outputs(self, fields: dict[str, torch.Tensor]) -> ModelOutputs:
        layers = {name: fields[f"layer:{name}"] for name in self.layer_names}
        return ModelOutputs(
            logits=fields["logits"],
            features=fields.get("features"),
            labels=fields.get("labels"),
            layers=layers or None,
        )

    def _write(self, fields: dict[str, torch.Tensor]) -> None:
        assert self.directory is not None
        name = f"part-{len(self.parts):05d}.safetensors"
        self._outputs(fields).save(self.directory / name)
        self.parts.append(name)

    def finish(self) -> ModelOutputs | None:
        """In memory: all outputs (without head). On disk: flushes the last part and returns None."""
        if self.directory is None:
            return self._outputs(self._take_all()) if self.rows else None
        if self.buffered_rows:
            self._write(self._take_all())
            self.buffered_rows = 0
        return None


def _check_rows(value: Any, rows: int, what: str, fix: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} is a {type(value).__name__}, expected a tensor; {fix}")
    if value.ndim == 0 or value.shape[0] != rows:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, expected the batch of {rows} rows first "
            f"(shape [{rows}, ...]); {fix}"
        )
    return value


def _run(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    total: int | None,
    device: torch.device,
    input_dtype: torch.dtype | None,
    layer_names: Sequence[str],
    head: tuple[str, nn.Linear] | None,
    head_found_automatically: bool,
    collector: _Collector,
    content_hash: _ContentHash | None,
    progress: bool,
    desc: str | None,
) -> None:
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def layer_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # clone: a later in-place op (ReLU(inplace=True)) must not change what was recorded, and a layer
            # that is a view of the features must not share their memory. A module called twice keeps its last.
            captured[f"layer:{name}"] = output.detach().clone() if isinstance(output, torch.Tensor) else output

        return hook

    def feature_hook(module: nn.Module, args: tuple) -> None:
        value = args[0] if args else None
        captured["features"] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    modes = [(module, module.training) for module in model.modules()]
    try:
        for name in layer_names:
            handles.append(_get_module(model, name, "layers").register_forward_hook(layer_hook(name)))
        if head is not None:
            handles.append(head[1].register_forward_pre_hook(feature_hook))
        model.eval()
        head_checked = False
        with torch.no_grad():
            iterator = tqdm(batches, total=total, desc=desc or "extract", unit="batch", disable=not progress)
            for index, (inputs, labels) in enumerate(iterator):
                if inputs.shape[0] == 0:
                    continue
                if content_hash is not None:
                    content_hash.update(inputs, labels)
                rows = inputs.shape[0]
                captured.clear()
                x = inputs.to(device)
                if input_dtype is not None and x.dtype.is_floating_point and x.dtype != input_dtype:
                    x = x.to(input_dtype)
                logits = model(x)
                fix = "wrap the model so that forward returns the logits tensor [B, C]"
                _check_rows(logits, rows, f"batch {index}: the model output", fix)
                if logits.ndim != 2:
                    raise ValueError(
                        f"batch {index}: the model output has shape {tuple(logits.shape)}; logits must be [B, C]. {fix}"
                    )
                fields = {"logits": logits.detach().to("cpu", torch.float32)}
                if head is not None:
                    how = "found automatically" if head_found_automatically else "given as feature_layer"
                    if "features" not in captured:
                        raise ValueError(
                            f"the final linear layer {head[0]!r} ({how}) was not called during forward; "
                            "pass feature_layer= naming the linear layer that produces the logits"
                        )
                    features = _check_rows(
                        captured["features"], rows, f"the input of the final linear layer {head[0]!r}", ""
                    )
                    if features.ndim != 2:
                        raise ValueError(
                            f"the input of the final linear layer {head[0]!r} ({how}) has shape "
                            f"{tuple(features.shape)}; features must be [B, D]. Pass feature_layer= naming the "
                            "linear layer that maps [B, D] features to the [B, C] logits"
                        )
                    if not head_checked:
                        _check_head(head, features, logits, how)
                        head_checked = True
                    fields["features"] = features.detach().to("cpu", torch.float32)
                for name in layer_names:
                    key = f"layer:{name}"
                    if key not in captured:
                        raise ValueError(f"layers: the module {name!r} was not called during forward")
                    fix = "pick a submodule whose output is a single tensor with the batch first"
                    value = _check_rows(captured[key], rows, f"layers: the output of {name!r}", fix)
                    fields[key] = value.detach().to("cpu", torch.float32)
                if labels is not None:
                    fields["labels"] = labels
                collector.add(fields)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _check_head(head: tuple[str, nn.Linear], features: torch.Tensor, logits: torch.Tensor, how: str) -> None:
    """Warn when logits != features @ W.T + b: detectors using the head would then see another model."""
    name, module = head
    predicted = nn.functional.linear(features.to(module.weight.dtype), module.weight, module.bias).to(logits.dtype)
    if predicted.shape != logits.shape:
        raise ValueError(
            f"the final linear layer {name!r} ({how}) outputs shape {tuple(predicted.shape)} but the model outputs "
            f"{tuple(logits.shape)}; pass feature_layer= naming the linear layer that produces the logits"
        )
    difference = float((predicted - logits).abs().max())
    scale = 1.0 + float(logits.abs().max())
    if not difference <= 1e-2 * scale:
        warnings.warn(
            f"the model's logits differ from features @ weight.T + bias of the final linear layer {name!r} ({how}) "
            f"by up to {difference:.3g}: the model changes the logits after that layer (scaling, softmax, ...). "
            "Detectors that use the head will assume logits = features @ weight.T + bias",
            stacklevel=4,
        )


def _head_tensors(head: tuple[str, nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    module = head[1]
    weight = module.weight.detach().to("cpu", torch.float32).clone()
    if module.bias is None:
        bias = torch.zeros(weight.shape[0], dtype=torch.float32)
    else:
        bias = module.bias.detach().to("cpu", torch.float32).clone()
    return weight, bias


# ---------------------------------------------------------------------------------------------- cache
def _load_entry(entry: Path, key: str) -> ModelOutputs:
    meta = json.loads((entry / _COMPLETE).read_text())
    if meta.get("format") != "oodguard.extraction.extract-cache" or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"unsupported cache format {meta.get('format')!r} version {meta.get('format_version')!r}")
    if meta.get("key") != key:
        raise ValueError(f"the entry records key {meta.get('key')!r}")
    outputs = _load_parts(entry, meta["parts"], bool(meta.get("head")))
    if len(outputs) != meta["num_rows"]:
        raise ValueError(f"the parts hold {len(outputs)} rows, complete.json records {meta['num_rows']}")
    return outputs


def _load_parts(directory: Path, parts: Sequence[str], has_head: bool) -> ModelOutputs:
    outputs = ModelOutputs.concat([ModelOutputs.load(directory / name) for name in parts])
    if has_head:
        outputs = outputs.with_fields(head=ModelOutputs.load(directory / _HEAD_FILE).head)
    outputs.array_type = "torch"
    return outputs


def _commit(temporary: Path, entry: Path) -> None:
    """Move a finished temporary directory into place (complete.json is already inside it)."""
    if entry.exists():
        if (entry / _COMPLETE).is_file():  # another process finished the same key first
            shutil.rmtree(temporary, ignore_errors=True)
            return
        shutil.rmtree(entry)
    os.replace(temporary, entry)


# ---------------------------------------------------------------------------------------------- extract
def extract(
    model: nn.Module,
    data: Any,
    *,
    labels: Any = None,
    layers: Sequence[str] | str = (),
    feature_layer: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    dataset_key: str | None = None,
    chunk_rows: int = 8192,
    desc: str | None = None,
) -> ModelOutputs:
    """Run ``model`` once over ``data`` and return logits, features, head, layers and labels.

    Parameters
    ----------
    model : torch.nn.Module
        Any module whose ``forward`` takes one tensor batch and returns logits ``[B, C]``. It must already be
        on ``device`` (it is never moved). It runs in ``eval()`` mode under ``torch.no_grad()``; the training
        flag of every submodule is restored afterwards, also on error.
    data : DataLoader, Dataset, iterable of batches, or array
        A ``DataLoader`` is iterated as is; a ``Dataset`` is wrapped in ``DataLoader(data, batch_size,
        shuffle=False)``; an array (numpy or torch) of inputs ``[N, ...]`` is cut into batches. Otherwise
        ``data`` is an iterable whose batches are a tensor of inputs, ``(inputs,)`` or ``(inputs, labels)``.
        Models with several inputs are not supported yet (wrap them to take one tensor). Floating inputs are
        cast to the floating dtype of the model's parameters; integer inputs (token ids) are left as they are.
    labels : integer array ``[N]``, optional
        Labels when the batches carry none (a negative label marks an OOD row). Giving labels both here and
        in the batches is an error.
    layers : sequence of str
        Module names (as in ``model.named_modules()``) whose outputs to record, each kept at its full shape
        ``[N, ...]`` in ``outputs.layers[name]``. Each must return one tensor with the batch first.
    feature_layer : str, optional
        Name of the final linear layer; its input becomes ``features`` and its ``(weight, bias)`` the head
        (bias zeros when the layer has none). When omitted the head is found by :func:`find_head`: the model's
        last module in ``named_modules()`` order, if it is an ``nn.Linear``. **When no such layer is found,
        only logits (and labels and layers) are extracted, without features and head.** A warning is given
        when the logits differ from ``features @ weight.T + bias`` (a model that rescales its logits).
    device : "cpu", "cuda", "cuda:N", "mps" or torch.device
        Where the model runs; inputs are moved there, outputs come back to the CPU as float32.
    batch_size : int
        Batch size for datasets and arrays (a given DataLoader keeps its own).
    progress : bool
        Show a tqdm progress bar (with ``desc`` as its label).
    cache_dir : path, optional
        Cache the outputs under ``cache_dir/<key>/`` and reuse them on a later call with the same key. The key
        is a sha256 over (a) :func:`model_fingerprint` (class, structure, every weight), (b) the data and (c)
        ``layers`` and the final linear layer's name. By default (b) is the content hash of every input batch
        and label fed to the model, after any transform, so a changed pixel, label or transform always misses;
        this costs a first pass over the data without the model (the model then runs only on a miss, and the
        hash is checked again during that run: data that changes between passes, e.g. a random augmentation,
        is extracted but not cached, with a warning). ``data`` must then be re-iterable (not a generator).
    dataset_key : str, optional
        A string naming the dataset and its transform, used for (b) instead of the content hash, which skips
        the extra pass. **You are then responsible for changing it whenever the data or transform change**;
        the model and layers are still fingerprinted. Labels given as ``labels=`` are always hashed.
    chunk_rows : int
        With ``cache_dir``, outputs are written to ``part-00000.safetensors``, ``part-00001...`` every
        ``chunk_rows`` rows while the model runs, so memory holds at most one chunk during extraction.
        ``complete.json`` is written last and the entry appears under its key only once complete, so an
        interrupted run is never a cache hit.
    desc : str, optional
        Label of the progress bar.

    Returns
    -------
    ModelOutputs
        With ``array_type == "torch"``: ``logits [N, C]``, and where available ``features [N, D]``, ``head``,
        ``layers`` and ``labels [N]``.

    Raises
    ------
    ValueError
        A layer or feature_layer name that does not exist (the message lists the available names), an
        unavailable device, a model on another device, malformed batches or labels, non-finite outputs.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> out = extract(model, torch.randn(10, 4), labels=torch.arange(10) % 3, layers=["1"], progress=False)
    >>> out.logits.shape, out.features.shape, out.layers["1"].shape, out.head[0].shape
    (torch.Size([10, 3]), torch.Size([10, 8]), torch.Size([10, 8]), torch.Size([3, 8]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows!r}")
    if dataset_key is not None and (not isinstance(dataset_key, str) or not dataset_key.strip()):
        raise ValueError("dataset_key: expected a non-empty string naming the dataset and its transform")
    resolved_device = _resolve_device(device)
    input_dtype = _check_model_device(model, resolved_device)

    layer_names = [layers] if isinstance(layers, str) else list(layers)
    duplicates = sorted({name for name in layer_names if layer_names.count(name) > 1})
    if duplicates:
        raise ValueError(f"layers: {duplicates} requested more than once; give each layer name once")
    for name in layer_names:
        _get_module(model, name, "layers")
    head = find_head(model, feature_layer)
    batches = _Batches(data, labels, batch_size)
    total = batches.num_batches()
    run_args = dict(
        total=total,
        device=resolved_device,
        input_dtype=input_dtype,
        layer_names=layer_names,
        head=head,
        head_found_automatically=feature_layer is None,
        progress=progress,
        desc=desc,
    )

    if cache_dir is None:
        collector = _Collector(None, chunk_rows, layer_names)
        _run(model, batches, collector=collector, content_hash=None, **run_args)
        outputs = collector.finish()
        if outputs is None:
            raise ValueError("data: produced no rows; nothing to extract")
        if head is not None:
            outputs = outputs.with_fields(head=_head_tensors(head))
        outputs.array_type = "torch"
        return outputs

    # ---- cached extraction
    key_data: dict[str, Any] = {}
    first_pass: _ContentHash | None = None
    if dataset_key is None:
        if batches.one_shot:
            raise ValueError(
                "cache_dir: data is a one-shot iterator (e.g. a generator), but the content hash needs a first pass "
                "over the data; pass a list, Dataset or DataLoader, or give dataset_key="
            )
        first_pass = _ContentHash()
        label = f"{desc or 'extract'}: hashing inputs"
        hashing = tqdm(batches, total=total, desc=label, unit="batch", disable=not progress, leave=False)
        for inputs, batch_labels in hashing:
            if inputs.shape[0]:
                first_pass.update(inputs, batch_labels)
        key_data = {"content": first_pass.hexdigest()}
    else:
        key_data = {"dataset_key": dataset_key}
        if batches.labels is not None:
            key_data["labels"] = hashlib.sha256(_tensor_bytes(batches.labels)).hexdigest()
    key_payload = {
        "cache_format": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "data": key_data,
        "layers": layer_names,
        "feature_layer": None if head is None else head[0],
    }
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir)
    entry = root / key
    if (entry / _COMPLETE).is_file():
        try:
            return _load_entry(entry, key)
        except Exception as error:  # a damaged entry is rebuilt, never trusted
            warnings.warn(f"cache entry {entry} is damaged ({error}); extracting again", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        collector = _Collector(temporary, chunk_rows, layer_names)
        second_pass = None if first_pass is None else _ContentHash()
        _run(model, batches, collector=collector, content_hash=second_pass, **run_args)
        collector.finish()
        if not collector.rows:
            raise ValueError("data: produced no rows; nothing to extract")
        if head is not None:
            ModelOutputs(head=_head_tensors(head)).save(temporary / _HEAD_FILE)
        outputs = _load_parts(temporary, collector.parts, head is not None)
        if second_pass is not None and second_pass.hexdigest() != key_data["content"]:
            warnings.warn(
                "cache_dir: the data differed between the hashing pass and the extraction pass (a random transform "
                "or changing files?), so these outputs are not cached; use a deterministic transform or dataset_key=",
                stacklevel=2,
            )
            shutil.rmtree(temporary, ignore_errors=True)
            return outputs
        meta = {
            "format": "oodguard.extraction.extract-cache",
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "key_payload": key_payload,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "num_rows": collector.rows,
            "parts": collector.parts,
            "head": head is not None,
            "chunk_rows": chunk_rows,
        }
        (temporary / _COMPLETE).write_text(json.dumps(meta, indent=2))
        _commit(temporary, entry)
        return outputs
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
