"""One file format for everything oodguard writes: outputs, detectors, heads, guards' tensors, checkpoints, caches.

One safetensors file per object; its metadata holds ``"oodguard"``, the JSON header ``{"kind", "format_version", ...}``,
and ``"oodguard.sha256"``, a digest over the header text and every tensor (by sorted name: name, dtype, shape, bytes,
each length-framed), so a flipped byte or an edited header is refused on load. Writes go to a temporary file in the
same folder, fsynced and renamed over the target: a crash leaves the old file or the new one, never a torn one. Files
of the first release (header ``"format"``, see :data:`LEGACY_FORMATS`) carry no digest; they load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Collection, Mapping
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
    "verify",
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
_RESERVED = ("kind", "format_version")


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
    """Write ``tensors`` and a JSON ``header`` of the given ``kind`` and format ``version`` to one file.

    Tensors are stored detached, contiguous and on the CPU. ``header`` must be plain JSON (no NaN) and must not
    set ``kind`` or ``format_version``. Returns ``path``.
    """
    path = Path(path)
    text = _header_text(path, kind, version, header)
    stored = _prepared(tensors)
    metadata = {HEADER_KEY: text, DIGEST_KEY: _digest(text, stored)}
    from safetensors.torch import save_file

    write = lambda target: save_file(stored, str(target), metadata=metadata)
    return _write_atomic(path, write) if atomic else _write_in_place(path, write)


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
    return _write_atomic(Path(path), lambda temporary: temporary.write_bytes(data))


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON with sorted keys, atomically."""
    return write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------- reading
def load(
    path: str | os.PathLike, *, kind: str, versions: Collection[int] | int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the full header (``kind`` and ``format_version`` included) of a file written by :func:`save`.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that is not safetensors
    or is truncated, has no oodguard header, holds another kind or an unsupported version, or fails its digest.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    header = _header(path, metadata)
    found = header.get("kind")
    if found != kind:
        what = f"a {found!r}" if found is not None else f"no kind oodguard knows (format {header.get('format')!r})"
        raise ValueError(f"{path} holds {what}, not a {kind!r}")
    accepted = {versions} if isinstance(versions, int) else set(versions)
    if header.get("format_version") not in accepted:
        raise ValueError(
            f"{path}: {kind} format version {header.get('format_version')!r} is not supported (this oodguard reads "
            f"version {', '.join(map(str, sorted(accepted)))}); write it again with this version of oodguard"
        )
    _check_digest(path, metadata, tensors)
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
    """The JSON header of an oodguard file, without reading its tensors (and so without checking its digest)."""
    from safetensors import safe_open

    path = _existing(Path(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for truncated and foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    return _header(path, metadata)


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check an oodguard file of any kind against its digest; return its header. Errors as in :func:`load`.

    A first-release file has no digest: it passes when it is readable.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    header = _header(path, metadata)
    _check_digest(path, metadata, tensors)
    return header


def sha256_of_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- helpers
def _header_text(path: Path, kind: str, version: int, header: Mapping[str, Any] | None) -> str:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{path}: kind must be a non-empty string, got {kind!r}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"{path}: version must be an int, got {version!r}")
    header = dict(header or {})
    clash = [key for key in _RESERVED if key in header]
    if clash:
        raise ValueError(f"{path}: the header must not set {clash}; pass them as kind= and version=")
    try:
        return json.dumps({**header, "kind": kind, "format_version": version}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{path}: the header must be plain JSON (no NaN, no objects): {error}") from error


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary)``, then fsync it and rename it over ``path``; the temporary file never survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary, mode = _new_temporary(path)
    try:
        write(temporary)
        os.chmod(temporary, mode)  # recent safetensors swap in a file of their own, readable by its owner only
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
    _fsync_folder(path.parent)
    return path


def _write_in_place(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(path)`` directly (a crash leaves a torn file); a new file gets the permissions of a plain ``open``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))  # an existing file keeps its permissions
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write(path)
    os.chmod(path, mode)
    return path


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file beside ``path`` and the permissions a plain ``open`` gives (0o666 less the umask), which
    the target gets (mkstemp's would make it readable by its owner only)."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary, stat.S_IMODE(os.stat(temporary).st_mode)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated and foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({error}); write it again") from error
    return metadata, tensors


def _header(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The parsed header; a first-release header gets the ``kind`` its ``format`` stands for."""
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


def _check_digest(path: Path, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Only first-release files (no ``kind`` in the stored header) may lack the digest; they cannot be checked."""
    damaged = f"{path} was modified after it was written or is damaged"
    if DIGEST_KEY not in metadata:
        if "kind" in json.loads(metadata[HEADER_KEY]):
            raise ValueError(f"{damaged} (its sha256 digest is missing); write it again")
        return
    if _digest(metadata[HEADER_KEY], tensors) != metadata[DIGEST_KEY]:
        raise ValueError(f"{damaged} (sha256 mismatch); write it again")


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
        # the bytes as a uint8 view: hashed in place, no copy of a large tensor
        _framed(digest, tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def _framed(digest: Any, data: Any) -> None:
    """``len(data)`` as 8 little-endian bytes, then ``data`` (bytes or a 1-d uint8 array)."""
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
