"""Fingerprints that key the outputs cache: a model's weights and forward code, and the content of a dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from oodguard.extraction.batches import Batches

__all__ = ["ContentHash", "content_hash", "model_fingerprint", "tensor_bytes"]


# ---------------------------------------------------------------------------------------------- hashing
def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, on the CPU, in C order (a view where possible)."""
    tensor = tensor.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    tensor = tensor.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy().data)


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
            digest.update(tensor_bytes(value))
        else:  # e.g. a module's _extra_state
            digest.update(f"value:{name}:{value!r}\n".encode())
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name not in persistent and buffer is not None:
            digest.update(f"buffer:{name}:{buffer.dtype}:{tuple(buffer.shape)}\n".encode())
            digest.update(tensor_bytes(buffer))
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


class ContentHash:
    """sha256 over the inputs and labels fed to the model, independent of how rows are split into batches."""

    def __init__(self) -> None:
        self._inputs = hashlib.sha256()
        self._keyed: dict[str, Any] = {}  # keyword inputs: one digest per name, so batching cannot matter
        self._labels = hashlib.sha256()
        self._signature: str | None = None
        self.rows = 0
        self.has_labels = False

    def update(self, inputs: Any, labels: torch.Tensor | None) -> None:
        if isinstance(inputs, Mapping):  # keyword inputs (input_ids, attention_mask, ...)
            for name in sorted(inputs):
                value = inputs[name]
                digest, signature = self._keyed.get(name, (hashlib.sha256(), None))
                layout = f"{value.dtype}|{tuple(value.shape[1:])}"
                if layout != signature:  # the per-row layout, recorded whenever it changes
                    digest.update(f"\x00rows:{self.rows}:{layout}\x00".encode())
                digest.update(tensor_bytes(value))
                self._keyed[name] = (digest, layout)
            rows = next(iter(inputs.values())).shape[0]
        else:
            signature = f"{inputs.dtype}|{tuple(inputs.shape[1:])}"
            if signature != self._signature:  # record the per-row layout whenever it changes
                self._inputs.update(f"\x00rows:{self.rows}:{signature}\x00".encode())
                self._signature = signature
            self._inputs.update(tensor_bytes(inputs))
            rows = inputs.shape[0]
        if labels is not None:
            self.has_labels = True
            self._labels.update(tensor_bytes(labels))
        self.rows += rows

    def hexdigest(self) -> str:
        final = hashlib.sha256()
        final.update(f"rows:{self.rows};labels:{self.has_labels};".encode())
        final.update(self._inputs.digest())
        for name in sorted(self._keyed):
            final.update(name.encode() + b"\x00" + self._keyed[name][0].digest())
        final.update(self._labels.digest())
        return final.hexdigest()


def content_hash(data: Any, labels: Any = None, batch_size: int = 256) -> str:
    """sha256 (hex) of the inputs and labels ``data`` yields, as the extraction cache keys them.

    The same for any split of the rows into batches; ``data`` takes every form :func:`extract` accepts (it must be
    re-iterable to be extracted afterwards).
    """
    digest = ContentHash()
    for inputs, batch_labels in Batches(data, labels, batch_size):
        if inputs.shape[0]:
            digest.update(inputs, batch_labels)
    return digest.hexdigest()
