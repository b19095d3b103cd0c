"""Files: reading model outputs written by other frameworks (safetensors or npz files of named arrays), and
the sha256 of a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from oodguard.outputs import ModelOutputs

#: Array names a feature file may hold; the head may be stored as head.weight/head.bias or head_weight/head_bias.
KNOWN_ARRAYS = ("logits", "features", "labels", "head.weight", "head.bias", "head_weight", "head_bias")


def sha256_of_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
                if "oodguard" in (handle.metadata() or {}):
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
            head=None if weight is None else (weight, bias),
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
