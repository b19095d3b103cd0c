"""Training checkpoints as safetensors: model weights, optimizer state as tensors, and JSON metadata (no pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard import persist

#: The kind of file save_checkpoint writes (see oodguard.persist).
FILE_KIND = "checkpoint"
FORMAT_VERSION = 1


def _encode(value: Any) -> Any:
    """JSON keeps no tuples (Adam's ``betas``): mark them so that loading gives back exactly what was saved."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s state, ``optimizer``'s state and ``meta`` (JSON-serialisable) to one safetensors file.

    Tensors are stored under ``model.<name>``, ``optimizer.<param index>.<key>`` and ``extra.<name>`` (for
    ``tensors``, e.g. random-generator states); the optimizer's non-tensor state and parameter groups, and
    ``meta``, go into the file's JSON metadata. The write is atomic (temporary file + rename).
    """

    path = Path(path)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        stored[f"model.{name}"] = tensor  # persist copies tied weights (shared memory) itself
    optimizer_json: dict[str, Any] | None = None
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    stored[f"optimizer.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        optimizer_json = {"type": type(optimizer).__name__, "param_groups": _encode(state["param_groups"]),
                          "scalars": _encode(scalars)}  # fmt: skip
    for name, tensor in (tensors or {}).items():
        stored[f"extra.{name}"] = tensor
    header = {"optimizer": optimizer_json, "meta": dict(meta or {})}
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"meta must be JSON-serialisable (numbers, strings, lists, dicts): {error}") from error
    return persist.save(path, stored, kind=FILE_KIND, version=FORMAT_VERSION, header=header)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (each optional; strict keys).

    Returns
    -------
    ``(meta, extra_tensors)``.

    Raises
    ------
    FileNotFoundError when ``path`` is missing; ValueError when it is truncated, not safetensors, or not written
    by ``save_checkpoint``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors, header = persist.load(path, kind=FILE_KIND, versions=FORMAT_VERSION)
    if model is not None:
        weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        saved = header.get("optimizer")
        if saved is None:
            raise ValueError(f"{path} holds no optimizer state; pass optimizer=None")
        if saved["type"] != type(optimizer).__name__:
            raise ValueError(f"{path} holds {saved['type']} state, not {type(optimizer).__name__}")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entry in _decode(saved["scalars"]).items():
            state.setdefault(int(index), {}).update(entry)
        optimizer.load_state_dict({"state": state, "param_groups": _decode(saved["param_groups"])})
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return header["meta"], extra
