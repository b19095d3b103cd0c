"""The one file format of oodguard: outputs, detectors, heads, guards' tensors, checkpoints and caches.

One safetensors file per object. Its metadata holds ``"oodguard"``, the JSON header ``{"kind": ..., "format_version":
..., ...}``, and ``"oodguard.sha256"``, a digest over the header and every tensor (name, dtype, shape, bytes), so a
flipped byte or an edited header is refused on load. Writes are atomic: a temporary file in the same folder,
flushed and fsynced, then renamed over the target, so a crash mid-save leaves the old file or nothing, never a
torn one. Files written before the digest existed (header key ``"format"``) still load, without the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load",
    "load_cache",
    "read_header",
    "save",
    "save_cache",
    "sha256_of_file",
    "write_bytes_atomic",
    "write_json_atomic",
]

HEADER_KEY = "oodguard"
DIGEST_KEY = "oodguard.sha256"
#: Header ``format`` strings of files written before the header named a kind, and the kind each one is.
LEGACY_FORMATS = {
    "oodguard.ModelOutputs": "outputs",
    "oodguard.MOSHead": "mos_head",
    "oodguard.train.checkpoint": "checkpoint",
}


# ---------------------------------------------------------------------------------------------- writing
def save(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    version: int,
    header: Mapping[str, Any] | None = None,
    atomic: bool = True,
) -> Path:
    """Write ``tensors`` and a JSON ``header`` of the given ``kind`` and format ``version`` to one file."""
    path = Path(path)
    stored = _prepared(tensors)
    full_header = {**dict(header or {}), "kind": kind, "format_version": version}
    try:
        text = json.dumps(full_header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{path}: the header must be plain JSON (no NaN, no objects): {error}") from error
    metadata = {HEADER_KEY: text, DIGEST_KEY: _digest(text, stored)}
    from safetensors.torch import save_file

    if not atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stored, str(path), metadata=metadata)
        return path
    return _write_atomic(path, lambda temporary: save_file(stored, temporary, metadata=metadata))


def save_cache(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    version: int,
    header: Mapping[str, Any] | None = None,
) -> bool:
    """:func:`save` for caches: an unwritable cache folder only costs recomputing, so it returns False instead."""
    try:
        save(path, tensors, kind=kind, version=version, header=header)
    except OSError:
        return False
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and an atomic rename."""
    return _write_atomic(Path(path), lambda temporary: Path(temporary).write_bytes(data))


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON, atomically."""
    return write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------- reading
def load(
    path: str | os.PathLike, *, kind: str, versions: Collection[int] | int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and header of a file written by :func:`save`, after checking its kind, version and digest."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated and foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({error}); write it again") from error
    header = _header(path, metadata)
    found = header.get("kind")
    if found != kind:
        raise ValueError(f"{path} holds a {found!r}, not a {kind!r}")
    accepted = {versions} if isinstance(versions, int) else set(versions)
    if header.get("format_version") not in accepted:
        raise ValueError(
            f"{path}: {kind} format version {header.get('format_version')!r} is not supported (this oodguard reads "
            f"version {', '.join(map(str, sorted(accepted)))}); write it again with this version of oodguard"
        )
    if DIGEST_KEY in metadata and _digest(metadata[HEADER_KEY], tensors) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path} was modified after it was written or is damaged (sha256 mismatch); write it again")
    return tensors, header


def load_cache(
    path: str | os.PathLike, *, kind: str, versions: Collection[int] | int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """:func:`load` for caches: None for a missing, damaged, edited or foreign file (the caller recomputes)."""
    try:
        return load(path, kind=kind, versions=versions)
    except (OSError, ValueError):
        return None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an oodguard file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    return _header(path, metadata)


def sha256_of_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- helpers
def _write_atomic(path: Path, write: Any) -> Path:
    """``write(temporary_path)``, then fsync it and rename it over ``path``; the temporary file never survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync_folder(path.parent)
    return path


def _header(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    if HEADER_KEY not in metadata:
        raise ValueError(f"{path} was not written by oodguard (its metadata has no {HEADER_KEY!r} header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the oodguard header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the oodguard header is not a JSON object")
    if "kind" not in header and header.get("format") in LEGACY_FORMATS:
        header = {**header, "kind": LEGACY_FORMATS[header["format"]]}
    return header


def _prepared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing memory are copied (safetensors refuses shared storage)."""
    stored: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        elif pointer is not None:
            seen.add(pointer)
        stored[name] = tensor
    return stored


def _digest(header_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    _framed(digest, header_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        _framed(digest, name.encode())
        _framed(digest, f"{tensor.dtype}|{list(tensor.shape)}".encode())
        _framed(digest, tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _framed(digest: Any, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened for fsync on every platform."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
