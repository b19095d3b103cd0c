"""Sharded outputs on disk: a folder of safetensors shards and a manifest, memory-mapped when opened.

Layout of a shard folder::

    manifest.json               written last (atomically): rows, fields, widths and every shard's size and sha256
    head.safetensors            the final linear layer, when there is one
    shard-00000.safetensors     rows 0 .. r0-1, a file written by ModelOutputs.save
    shard-00001.safetensors     ...

:class:`ShardWriter` writes one (``extract(..., out_dir=DIR)`` and the Ray engine use it);
:meth:`ModelOutputs.open` / :func:`open_shards` map one without reading it. A folder without a manifest, or whose
manifest says it is incomplete, is an interrupted run and is refused: it is never read as complete. Opening checks
every listed file's size and header (cheap); :meth:`ShardedOutputs.verify` also checks every byte against the
manifest's sha256.

Memory: a shard is mapped only while it is used (:meth:`ShardedOutputs.shard` maps it, dropping the result unmaps
it), so walking the shards keeps the resident memory at about one shard, whatever the number of rows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard import persist
from oodguard.outputs import FILE_KIND, FORMAT_VERSION, ModelOutputs

__all__ = ["MANIFEST", "ShardWriter", "ShardedOutputs", "is_shard_folder", "open_shards", "write_shards"]

MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
#: The ``format`` of a manifest and its version; a layout change bumps the version.
MANIFEST_FORMAT = "oodguard.sharded-outputs"
MANIFEST_VERSION = 1
#: Rows per shard when nothing else is said: 8192 rows of 2048 float32 features are 64 MiB.
DEFAULT_SHARD_ROWS = 8192
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def is_shard_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that looks like sharded outputs (a manifest, or shard files without one)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob("shard-*.safetensors")))


# ---------------------------------------------------------------------------------------------- writing
def _layout(outputs: ModelOutputs) -> dict[str, Any]:
    """What every shard of one folder must share: fields, layer names and per-row shapes, dtypes."""
    tensors = {f: getattr(outputs, f) for f in ("logits", "features", "labels") if getattr(outputs, f) is not None}
    tensors.update({f"layers[{name!r}]": value for name, value in outputs.layers.items()})
    return {
        "fields": [f for f in outputs.fields() if f != "head"],
        "layer_names": list(outputs.layers),
        "rows": {name: [list(t.shape[1:]), str(t.dtype).removeprefix("torch.")] for name, t in tensors.items()},
    }


class ShardWriter:
    """Writes sharded outputs into ``directory``, one shard per :meth:`write` call, and the manifest on :meth:`close`.

    The folder must be new or empty, or hold an earlier shard folder (complete or interrupted), which is replaced:
    its manifest is removed first, so a crash while writing leaves a folder that reads as incomplete.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"out_dir: {self.directory} is a file; give a folder for the shards")
        if self.directory.is_dir():
            ours = ("shard-", ".shard-", ".manifest", ".head")  # ".x" prefixes: temporary files of atomic writes
            foreign = [
                p.name
                for p in self.directory.iterdir()
                if p.name not in (MANIFEST, HEAD_FILE) and not p.name.startswith(ours)
            ]
            if foreign:
                raise ValueError(
                    f"out_dir: {self.directory} holds other files ({', '.join(sorted(foreign)[:5])}); give a new or "
                    "empty folder, or one that holds earlier shards only"
                )
            (self.directory / MANIFEST).unlink(missing_ok=True)  # from now on the folder reads as incomplete
            for old in self.directory.glob("shard-*.safetensors"):
                old.unlink()
            (self.directory / HEAD_FILE).unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: dict[int, dict[str, Any]] = {}
        self.layout: dict[str, Any] | None = None
        self.head: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, outputs: ModelOutputs, index: int | None = None) -> dict[str, Any]:
        """Write one shard (the next index unless given); the head, if any, is kept once for the whole folder."""
        index = len(self.shards) if index is None else int(index)
        if index in self.shards:
            raise ValueError(f"shard {index} was written twice")
        if len(outputs) == 0:
            raise ValueError(f"shard {index}: has no rows")
        self._check_layout(outputs, index)
        if outputs.head is not None:
            self._check_head(outputs.head, index)
        path = self.directory / shard_name(index)
        headless = outputs._replace_rows(lambda tensor: tensor)  # the head is stored once, beside the shards
        headless.head = None
        headless.save(path)
        return self._record(index, path, len(outputs))

    def write_file(self, index: int, data: bytes) -> dict[str, Any]:
        """Write a shard whose file bytes were made elsewhere (a worker); they are checked by opening them."""
        path = self.directory / shard_name(index)
        if index in self.shards:
            raise ValueError(f"shard {index} was written twice")
        persist.write_bytes_atomic(path, data)
        header = persist.read_header(path)
        if header.get("kind") != FILE_KIND:
            raise ValueError(f"shard {index}: the worker's file holds {header.get('kind')!r}, not outputs")
        shard = _map_shard(path, int(header["num_rows"]), header)
        self._check_layout(shard, index)
        return self._record(index, path, len(shard))

    def set_head(self, head: tuple[torch.Tensor, torch.Tensor] | None, where: int | str = "head") -> None:
        if head is not None:
            self._check_head(head, where)

    def _check_layout(self, outputs: ModelOutputs, index: int | str) -> None:
        layout = _layout(outputs)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(
                f"shard {index}: fields {layout} differ from the earlier shards' {self.layout}; every shard must come "
                "from the same model and layers"
            )

    def _check_head(self, head: tuple[torch.Tensor, torch.Tensor], where: int | str) -> None:
        if self.head is None:
            self.head = (head[0].detach().cpu(), head[1].detach().cpu())
        elif not (torch.equal(self.head[0], head[0].cpu()) and torch.equal(self.head[1], head[1].cpu())):
            raise ValueError(f"shard {where}: its head differs from the earlier shards'; outputs of one model only")

    def _record(self, index: int, path: Path, rows: int) -> dict[str, Any]:
        info = {"file": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": persist.sha256_of_file(path)}
        self.shards[index] = info
        return info

    def close(self, extra: dict[str, Any] | None = None) -> ShardedOutputs:
        """Write the head and the manifest (last, atomically) and return the folder opened."""
        if not self.shards:
            raise ValueError("no shard was written; nothing to close")
        indexes = sorted(self.shards)
        if indexes != list(range(len(indexes))):
            missing = sorted(set(range(indexes[-1] + 1)) - set(indexes))
            raise ValueError(f"shards {missing[:10]} are missing; the folder would not hold every row")
        assert self.layout is not None
        head_info = None
        if self.head is not None:
            ModelOutputs(head=self.head).save(self.directory / HEAD_FILE)
            head_path = self.directory / HEAD_FILE
            head_info = {"file": HEAD_FILE, "bytes": head_path.stat().st_size,
                         "sha256": persist.sha256_of_file(head_path)}  # fmt: skip
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "complete": True,
            "num_rows": sum(self.shards[i]["rows"] for i in indexes),
            **self.layout,
            "head": head_info,
            "shards": [self.shards[i] for i in indexes],
            **({"extra": extra} if extra else {}),
        }
        persist.write_json_atomic(self.directory / MANIFEST, manifest)
        return open_shards(self.directory)


def write_shards(
    outputs: ModelOutputs, directory: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS
) -> ShardedOutputs:
    """Write in-memory outputs as a shard folder of ``shard_rows`` rows per shard; returns it opened."""
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise ValueError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
    if len(outputs) == 0:
        raise ValueError("outputs: no rows to write")
    writer = ShardWriter(directory)
    for start in range(0, len(outputs), shard_rows):
        writer.write(outputs[start : start + shard_rows])
    writer.set_head(outputs.head)
    return writer.close()


# ---------------------------------------------------------------------------------------------- reading
@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Give the heap pages freed by the last shard back to the system. Without it glibc keeps the freed
    temporaries of every shard (tens of MB each, below its mmap threshold) and the resident memory of a walk over
    many shards creeps up with their number (measured: 1.5 GB after 123 shards instead of about 0.5 GB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The byte offset where the tensor data starts, and the parsed header (no tensor is read)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    return 8 + length, header


def _map_tensors(path: Path, rows: int, header: dict[str, Any] | None = None) -> tuple[dict, dict[str, Any]]:
    """The shard's tensors as copy-on-write memory maps (pages are read when touched), and its oodguard header."""
    start, table = _safetensors_header(path)
    size = path.stat().st_size
    header = header if header is not None else json.loads(table.get("__metadata__", {}).get(persist.HEADER_KEY, "{}"))
    if header.get("kind") != FILE_KIND or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an oodguard outputs file of version {FORMAT_VERSION}")
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if dtype is None or start + end > size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name!r} is damaged or of an unsupported dtype {entry['dtype']}")
        if not shape or shape[0] != rows and not name.startswith("head."):
            raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)}, the manifest says {rows} rows")
        array = np.memmap(path, dtype=dtype, mode="c", offset=start + begin, shape=shape) if end > begin else (
            np.zeros(shape, dtype=dtype))  # fmt: skip
        tensors[name] = torch.from_numpy(array)
    return tensors, header


def _map_shard(path: Path, rows: int, header: dict[str, Any] | None = None) -> ModelOutputs:
    """The shard as ModelOutputs over memory maps, validated (which reads it once)."""
    tensors, header = _map_tensors(path, rows, header)
    layers = {name: tensors[f"layers.{i}"] for i, name in enumerate(header.get("layer_names", []))}
    return ModelOutputs(
        logits=tensors.get("logits"),
        features=tensors.get("features"),
        labels=tensors.get("labels"),
        layers=layers or None,
    )


class ShardedOutputs:
    """Model outputs held in a shard folder, mapped shard by shard instead of read into memory.

    Detectors take them wherever they take :class:`~oodguard.outputs.ModelOutputs`: ``score`` walks the shards
    (extra memory bounded by one shard, not by the number of rows), ``partial_fit`` adds them one by one, ``fit``
    does the same for detectors with additive statistics (and reads all rows into memory for the others).
    """

    array_type = "torch"

    def __init__(self, directory: Path, manifest: dict[str, Any], head: tuple[torch.Tensor, torch.Tensor] | None):
        self.directory = directory
        self.manifest = manifest
        self.head = head
        self.layer_names: list[str] = list(manifest["layer_names"])
        self._labels: torch.Tensor | None = None

    # ------------------------------------------------------------------ what ModelOutputs also answers
    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def fields(self) -> list[str]:
        return [*self.manifest["fields"], *(["head"] if self.head is not None else [])]

    def has(self, field: str) -> bool:
        return field in self.fields()

    def _width(self, field: str) -> int | None:
        entry = self.manifest["rows"].get(field)
        return int(entry[0][0]) if entry else None

    @property
    def num_classes(self) -> int | None:
        return self._width("logits") or (self.head[0].shape[0] if self.head is not None else None)

    @property
    def feature_dim(self) -> int | None:
        return self._width("features") or (self.head[0].shape[1] if self.head is not None else None)

    @property
    def labels(self) -> torch.Tensor | None:
        """All labels ``[N]`` (8 bytes a row, read once)."""
        if "labels" not in self.manifest["fields"]:
            return None
        if self._labels is None:
            self._labels = torch.cat(
                [_map_tensors(path, int(info["rows"]))[0]["labels"].clone()
                 for path, info in zip(self.shard_paths(), self.manifest["shards"], strict=True)]
            )  # fmt: skip
        return self._labels

    @property
    def is_ood(self) -> torch.Tensor:
        if self.labels is None:
            raise ValueError("labels: these outputs have no labels, so OOD rows cannot be identified")
        return self.labels < 0

    # ------------------------------------------------------------------ shards
    def shard(self, index: int) -> ModelOutputs:
        """Shard ``index`` as ModelOutputs over memory maps (with the head), validated."""
        info = self.manifest["shards"][index]
        outputs = _map_shard(self.directory / info["file"], int(info["rows"]))
        if self.head is not None:
            outputs.head = self.head  # same head for every shard, checked when the folder was written
        return outputs

    def __iter__(self) -> Iterator[ModelOutputs]:
        for index in range(self.num_shards):
            yield self.shard(index)
            _return_freed_memory()

    def shard_paths(self) -> list[Path]:
        return [self.directory / info["file"] for info in self.manifest["shards"]]

    def to_memory(self) -> ModelOutputs:
        """Every row read into one in-memory ModelOutputs (N rows of memory)."""
        outputs = ModelOutputs.concat([shard.with_fields() for shard in self]) if self.num_shards > 1 else (
            self.shard(0).with_fields())  # fmt: skip
        for name, value in list(outputs.layers.items()):
            outputs.layers[name] = value.clone()
        outputs = outputs._replace_rows(lambda t: t.clone())
        outputs.array_type = "torch"
        return outputs

    def verify(self) -> ShardedOutputs:
        """Check every file's bytes against the manifest's sha256 (reads the whole folder); returns self."""
        entries = [*self.manifest["shards"], *([self.manifest["head"]] if self.manifest.get("head") else [])]
        for info in entries:
            path = self.directory / info["file"]
            if persist.sha256_of_file(path) != info["sha256"]:
                raise ValueError(f"{path} was modified after the shards were written or is damaged (sha256 mismatch)")
        return self

    def __repr__(self) -> str:
        return f"ShardedOutputs({self.directory}, N={len(self)}, shards={self.num_shards}, fields={self.fields()})"


def open_shards(directory: str | os.PathLike, *, verify: bool = False) -> ShardedOutputs:
    """Open a shard folder without reading its tensors; ``verify=True`` also checks every byte's sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such shard folder: {directory}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        found = len(list(directory.glob("shard-*.safetensors")))
        raise ValueError(
            f"{directory} has no {MANIFEST} ({found} shard file(s)): an interrupted extraction, never read as "
            "complete; run the extraction again into this folder"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path} is not an oodguard shard manifest")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ValueError(
            f"{manifest_path}: shard format version {manifest.get('format_version')!r} is not supported (this "
            f"oodguard reads version {MANIFEST_VERSION})"
        )
    if manifest.get("complete") is not True:
        raise ValueError(f"{manifest_path} marks an incomplete extraction; run it again into this folder")
    try:
        _check_entries(directory, manifest_path, manifest)
    except (KeyError, TypeError, AttributeError) as error:  # a manifest edited by hand, or not ours
        raise ValueError(f"{manifest_path} is damaged ({type(error).__name__}: {error}); extract again") from error
    head = None
    if manifest.get("head"):
        head_path = directory / HEAD_FILE
        if not head_path.is_file():
            raise ValueError(f"{directory}: {HEAD_FILE} listed in the manifest is missing")
        head = ModelOutputs.load(head_path).head
    opened = ShardedOutputs(directory, manifest, head)
    return opened.verify() if verify else opened


def _check_entries(directory: Path, manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Every key the reader uses is there; every listed shard is a file of this folder of the listed size."""
    if not isinstance(manifest["fields"], list) or not isinstance(manifest["layer_names"], list):
        raise TypeError("fields and layer_names must be lists")
    if not isinstance(manifest["rows"], dict):
        raise TypeError("rows must be a mapping")
    shards: Sequence[dict[str, Any]] = manifest.get("shards") or []
    if not shards or sum(int(info["rows"]) for info in shards) != manifest.get("num_rows"):
        raise ValueError(f"{manifest_path}: the shards' rows do not add up to num_rows; the manifest is damaged")
    for info in shards:
        name = info["file"]
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{manifest_path}: shard file {name!r} is not a file name inside the folder")
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory}: shard {name} listed in the manifest is missing")
        if path.stat().st_size != info["bytes"]:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: damaged or from another "
                "run"
            )
        if not isinstance(info["sha256"], str):
            raise TypeError(f"the sha256 of {name} must be a string")
