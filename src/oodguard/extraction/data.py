"""Datasets for data users already have on disk; nothing is ever downloaded.

Every dataset here yields ``(image, label)`` (or ``image`` alone for unlabelled arrays) where ``image`` is a
float tensor ``[C, H, W]`` in ``[0, 1]`` before the optional ``transform``; :func:`oodguard.extraction.extract`
accepts all of them directly. A transform is any callable on that tensor, e.g. :class:`Normalize`.

CIFAR batch files are pickles. They are read with a restricted unpickler that only rebuilds numpy arrays,
dicts and lists, so a malicious file cannot execute code.
"""

from __future__ import annotations

import ast
import importlib
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ArrayDataset",
    "ImageFolder",
    "ImageList",
    "CIFAR",
    "load_cifar",
    "load_image",
    "Normalize",
    "Resize",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
Transform = Callable[[torch.Tensor], Any]

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


# ---------------------------------------------------------------------------------------------- transforms
class Normalize:
    """``(x - mean) / std`` per channel of a ``[C, H, W]`` (or ``[B, C, H, W]``) float tensor.

    Examples
    --------
    >>> Normalize([0.5], [0.25])(torch.full((1, 2, 2), 0.75))[0, 0, 0].item()
    1.0
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalize: mean has {self.mean.numel()} values but std has {self.std.numel()}")
        if not bool((self.std > 0).all()):
            raise ValueError("Normalize: every std must be positive")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[-3]
        if self.mean.shape[0] not in (1, channels):
            raise ValueError(
                f"Normalize: {self.mean.shape[0]} channel statistics for an image with {channels} channels"
            )
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Resize:
    """Resize a ``[C, H, W]`` float tensor to exactly ``size`` (an int means a square ``size x size``).

    Unlike torchvision's ``Resize(int)``, an int does not keep the aspect ratio. Bilinear with antialiasing.

    Examples
    --------
    >>> Resize((4, 6))(torch.zeros(3, 8, 8)).shape
    torch.Size([3, 4, 6])
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise ValueError(f"Resize: size must be a positive int or (height, width), got {size!r}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image
        batch = image.unsqueeze(0) if image.ndim == 3 else image
        resized = torch.nn.functional.interpolate(
            batch.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True
        )
        return resized[0] if image.ndim == 3 else resized

    def __repr__(self) -> str:
        return f"Resize({self.size})"


# ---------------------------------------------------------------------------------------------- arrays
class ArrayDataset(Dataset):
    """Rows of an in-memory array as a dataset: item ``i`` is ``(transform(inputs[i]), labels[i])``.

    Parameters
    ----------
    inputs : numpy array or tensor ``[N, ...]``
        Used as is (no layout or dtype conversion); do that in ``transform``.
    labels : integer array ``[N]``, optional
        When omitted, items are the inputs alone.
    transform : callable, optional
        Applied to each row.

    Examples
    --------
    >>> ds = ArrayDataset(np.zeros((3, 2), dtype=np.float32), labels=[0, 1, 1])
    >>> len(ds), ds[1][1]
    (3, 1)
    """

    def __init__(self, inputs: Any, labels: Any = None, transform: Transform | None = None) -> None:
        self.inputs = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        if self.inputs.ndim == 0:
            raise ValueError("inputs: expected an array with one row per sample, got a scalar")
        self.labels = None
        if labels is not None:
            self.labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
            if self.labels.shape != (len(self.inputs),):
                raise ValueError(
                    f"labels: expected shape ({len(self.inputs)},) (one per input row), got {tuple(self.labels.shape)}"
                )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Any:
        item = self.inputs[index]
        if self.transform is not None:
            item = self.transform(item)
        if self.labels is None:
            return item
        return item, int(self.labels[index])


# ---------------------------------------------------------------------------------------------- images
def load_image(path: str | os.PathLike, mode: str | None = None) -> torch.Tensor:
    """Read an image file into a float tensor ``[C, H, W]`` in ``[0, 1]``.

    ``mode=None`` keeps grayscale images as 1 channel and turns every other image (palette, RGBA, CMYK, ...)
    into 3 RGB channels; 16-bit grayscale is scaled by 65535. ``mode="L"`` or ``"RGB"`` forces 1 or 3 channels.
    An unreadable file raises ``OSError`` naming it.
    """
    try:
        from PIL import Image
    except ImportError as error:  # pillow is an optional dependency
        raise ImportError("reading image files needs pillow: pip install pillow") from error
    if mode not in (None, "L", "RGB"):
        raise ValueError(f"mode: expected None, 'L' or 'RGB', got {mode!r}")
    try:
        with Image.open(path) as image:
            image.load()
            if mode is None and image.mode in _SIXTEEN_BIT_MODES:
                array = np.asarray(image, dtype=np.float32) / 65535.0
                return torch.from_numpy(array.copy()).unsqueeze(0)
            target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            if image.mode == "P" and target == "RGB":
                image = image.convert("RGBA")  # a palette with transparency must pass through RGBA
            array = np.array(image.convert(target), dtype=np.uint8)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise OSError(f"cannot read image file {os.fspath(path)}: {error}") from error
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor.to(torch.float32).div_(255.0)


class ImageFolder(Dataset):
    """Images in one sub-folder per class: ``root/<class>/**/<image>``; item ``i`` is ``(image, label)``.

    Class ids are the sorted sub-folder names numbered ``0..K-1`` (``classes``, ``class_to_idx``); files
    are found recursively with a case-insensitive extension match and sorted, so the order is stable.
    A *flat* folder (images directly in ``root``, no sub-folders) is an unlabelled set: every label is -1
    (OOD), as is every label with ``unlabelled=True`` (an OOD set kept in class sub-folders).

    Parameters
    ----------
    root : path
    transform : callable, optional
        Applied to the float image tensor ``[C, H, W]`` in ``[0, 1]``.
    extensions : tuple of str
    mode : None, "L" or "RGB"
        Channels, as in :func:`load_image`. A folder mixing grayscale and colour images gives tensors with
        different channel counts, which a DataLoader cannot stack: pass ``mode="RGB"`` (or ``"L"``) then.
    unlabelled : bool
        Label every image -1 (an OOD set), whatever the sub-folders.

    Attributes
    ----------
    classes : list of str
    class_to_idx : dict str -> int
    samples : list of (path, label)
    targets : list of int
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mode: str | None = None,
        unlabelled: bool = False,
    ) -> None:
        if mode not in (None, "L", "RGB"):
            raise ValueError(f"mode: expected None, 'L' or 'RGB', got {mode!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a directory")
        suffixes = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
        self.transform = transform
        self.mode = mode
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.samples: list[tuple[str, int]] = []
        if not self.classes:  # a flat folder: one unlabelled (OOD) set
            self.class_to_idx: dict[str, int] = {}
            flat = sorted(e.path for e in os.scandir(self.root) if e.is_file() and e.name.lower().endswith(suffixes))
            if not flat:
                raise FileNotFoundError(
                    f"root: {self.root} holds no sub-folders and no images with extensions {', '.join(suffixes)}"
                )
            self.samples = [(path, -1) for path in flat]
            self.targets = [-1] * len(flat)
            return
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        for name in self.classes:
            found: list[str] = []
            for directory, _, files in os.walk(self.root / name, followlinks=True):
                found.extend(os.path.join(directory, f) for f in files if f.lower().endswith(suffixes))
            if not found:
                raise FileNotFoundError(
                    f"class folder {self.root / name} holds no images with extensions {', '.join(suffixes)}; "
                    "remove it (class ids come from the sorted folder names) or add images"
                )
            label = -1 if unlabelled else self.class_to_idx[name]
            self.samples.extend((path, label) for path in sorted(found))
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path, self.mode)
        return (image if self.transform is None else self.transform(image)), label


def _parse_label(text: str, where: str) -> int:
    """An int, or (as OpenOOD allows) a Python dict literal holding ``'label'``."""
    try:
        value = ast.literal_eval(text)  # literals only: never executes code
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: cannot read the label {text!r}; expected an integer") from error
    if isinstance(value, dict):
        if "label" not in value:
            raise ValueError(f"{where}: the extras {text!r} have no 'label' key")
        value = value["label"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: the label {text!r} is not an integer")
    return value


class ImageList(Dataset):
    """Images listed in a text file in OpenOOD's ``benchmark_imglist`` format; item ``i`` is ``(image, label)``.

    Each line is ``relative/path label``, split at the **first** whitespace as OpenOOD's ``ImglistDataset``
    does (``line.split(' ', 1)``), so paths cannot contain spaces. The label is an integer (negative = OOD),
    or a Python dict literal with a ``'label'`` key (OpenOOD's extras form). Blank lines are ignored. As in
    OpenOOD, a path starting with ``/`` is refused when ``root`` is given. A malformed line raises
    ``ValueError`` with its line number; a missing or unreadable image raises ``OSError`` naming the file
    and line when it is loaded.

    Parameters
    ----------
    list_file : path
    root : path
        Directory the listed paths are relative to (``""`` for paths used as written).
    transform : callable, optional
    mode : None, "L" or "RGB"
        Channels, as in :func:`load_image`. (OpenOOD converts everything to RGB: pass ``mode="RGB"``.)

    Attributes
    ----------
    samples : list of (path, label)
    targets : list of int
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike,
        transform: Transform | None = None,
        mode: str | None = None,
    ) -> None:
        if mode not in (None, "L", "RGB"):
            raise ValueError(f"mode: expected None, 'L' or 'RGB', got {mode!r}")
        self.list_file = Path(list_file)
        self.root = os.fspath(root)
        self.samples: list[tuple[str, int]] = []
        self.line_numbers: list[int] = []
        with open(self.list_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                where = f"{self.list_file}, line {number}"
                tokens = line.split(None, 1)
                if len(tokens) != 2:
                    raise ValueError(f"{where}: expected 'relative/path label', got {line!r}")
                name, extra = tokens
                if self.root and name.startswith("/"):
                    raise ValueError(f"{where}: the path {name!r} is absolute; list paths relative to root")
                self.samples.append((os.path.join(self.root, name), _parse_label(extra, where)))
                self.line_numbers.append(number)
        if not self.samples:
            raise ValueError(f"{self.list_file} lists no images")
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image = load_image(path, self.mode)
        except OSError as error:
            raise OSError(f"{self.list_file}, line {self.line_numbers[index]}: {error}") from error
        return (image if self.transform is None else self.transform(image)), label


# ---------------------------------------------------------------------------------------------- CIFAR
def _numpy_attr(modules: Sequence[str], name: str) -> Any:
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What CIFAR pickles (Python 2 or 3, numpy 1 or 2) reference, and nothing else."""
    import builtins
    import codecs
    import collections

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Python 3 pickles bytes with protocol < 3 as _codecs.encode(text, 'latin1'); it only encodes text.
        ("_codecs", "encode"): codecs.encode,
    }
    for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "bool"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    # numpy's array and scalar reconstruction functions; numpy 2 moved numpy.core to numpy._core.
    for submodule, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        modules = (f"numpy._core.{submodule}", f"numpy.core.{submodule}")
        target = _numpy_attr(modules, name)
        if target is not None:
            for module in modules:
                allowed[(module, name)] = target
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts and lists only; every other global is refused (no code can run)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load {module}.{name}; CIFAR batch files hold only numpy arrays, "
                "lists and dicts, so this file is not a CIFAR batch (and may be malicious)"
            )
        return target


def _read_batch(path: Path) -> dict:
    with open(path, "rb") as handle:
        batch = _RestrictedUnpickler(handle, str(path)).load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    # Python 2 pickles give bytes keys; a file written by Python 3 may have str keys.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


_CIFAR_FILES = {
    "cifar10": ({True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}, "labels"),
    "cifar100": ({True: ["train"], False: ["test"]}, "fine_labels"),
}
_CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")


def _holds_cifar(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("data_batch_1", "test_batch", "train", "test"))


def load_cifar(path: str | os.PathLike, train: bool = True, coarse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 or CIFAR-100 in the python pickle format from disk (never downloads).

    Parameters
    ----------
    path : path
        The folder holding ``data_batch_1..5`` and ``test_batch`` (CIFAR-10) or ``train`` and ``test``
        (CIFAR-100), or its parent holding ``cifar-10-batches-py`` / ``cifar-100-python``.
    train : bool
        The training split (50000 images) or the test split (10000).
    coarse : bool
        CIFAR-100 only: the 20 superclass labels instead of the 100 fine labels.

    Returns
    -------
    images : uint8 array ``[N, 32, 32, 3]`` (height, width, RGB)
    labels : int64 array ``[N]``

    The files are pickles; they are read with a restricted unpickler that allows only numpy array
    reconstruction, dicts and lists and raises ``pickle.UnpicklingError`` on anything else.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a directory")
    if not _holds_cifar(folder):
        folder = next((folder / sub for sub in _CIFAR_FOLDERS if _holds_cifar(folder / sub)), folder)
    kind = "cifar10" if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file() else "cifar100"
    names, label_key = _CIFAR_FILES[kind]
    if coarse:
        if kind != "cifar100":
            raise ValueError("coarse: only CIFAR-100 has coarse labels")
        label_key = "coarse_labels"
    files = [folder / name for name in names[bool(train)]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR files not found: {', '.join(missing)}. Expected the extracted python version "
            "(cifar-10-batches-py/ or cifar-100-python/); oodguard never downloads data"
        )
    images, labels = [], []
    for file in files:
        batch = _read_batch(file)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{file}: expected keys 'data' and {label_key!r}, found {sorted(map(str, batch))}")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{file}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        batch_labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if batch_labels.shape[0] != data.shape[0]:
            raise ValueError(f"{file}: {data.shape[0]} images but {batch_labels.shape[0]} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class CIFAR(Dataset):
    """CIFAR-10/100 from disk (see :func:`load_cifar`); item ``i`` is ``(image [3, 32, 32] in [0, 1], label)``.

    Attributes
    ----------
    images : uint8 array ``[N, 32, 32, 3]``
    targets : int64 array ``[N]``
    """

    def __init__(
        self, path: str | os.PathLike, train: bool = True, transform: Transform | None = None, coarse: bool = False
    ) -> None:
        self.images, self.targets = load_cifar(path, train=train, coarse=coarse)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return (image if self.transform is None else self.transform(image)), int(self.targets[index])
