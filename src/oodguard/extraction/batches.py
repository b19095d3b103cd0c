"""Iterating model inputs in batches: tensors, arrays, Datasets, DataLoaders and iterables of batches, with labels."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

__all__ = ["Batches", "KeywordInputs", "check_rows"]

#: Keys of a dict batch that hold the labels rather than model inputs.
LABEL_KEYS = ("labels", "label")


class KeywordInputs(dict):
    """A batch of keyword inputs (``input_ids``, ``attention_mask``, ...): the model is called as ``model(**batch)``.

    Every value is a tensor with the same number of rows; ``shape`` is ``(rows,)`` so that code counting rows
    treats it like a tensor batch.
    """

    @property
    def shape(self) -> torch.Size:
        return torch.Size([next(iter(self.values())).shape[0]])

    @property
    def ndim(self) -> int:
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64  # never cast to the model's floating dtype as a whole

    def to(self, device: Any) -> KeywordInputs:
        return KeywordInputs({key: value.to(device) for key, value in self.items()})


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


def _split_batch(batch: Any, index: int) -> tuple[Any, Any]:
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
    elif isinstance(batch, Mapping):
        return _keyword_batch(batch, where)
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


def _keyword_batch(batch: Mapping[str, Any], where: str) -> tuple[KeywordInputs, Any]:
    """A dict batch (a tokenizer's output, a collated dict Dataset): keyword inputs, and labels under 'labels'."""
    labels = next((batch[key] for key in LABEL_KEYS if key in batch), None)
    inputs = KeywordInputs(
        {key: _as_tensor(value, f"{where} input {key!r}") for key, value in batch.items() if key not in LABEL_KEYS}
    )
    if not inputs:
        raise ValueError(f"{where}: the dict batch holds only labels; add the model's inputs")
    rows = {key: value.shape[0] if value.ndim else None for key, value in inputs.items()}
    if None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"{where}: every input of a dict batch needs the same number of rows, got {rows}")
    return inputs, labels


class _DictSlices:
    """One dict of arrays ``{name: [N, ...]}`` cut into dict batches of ``batch_size`` rows (re-iterable)."""

    def __init__(self, data: Mapping[str, Any], batch_size: int) -> None:
        self.tensors = {
            key: _as_tensor(np.asarray(value) if isinstance(value, (list, tuple)) else value, f"data[{key!r}]")
            for key, value in data.items()
        }
        rows = {key: value.shape[0] if value.ndim else None for key, value in self.tensors.items()}
        if not rows or None in rows.values() or len(set(rows.values())) != 1:
            raise ValueError(f"data: every entry of a dict of inputs needs the same number of rows, got {rows}")
        self.rows = int(next(iter(self.tensors.values())).shape[0])
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.rows, self.batch_size):
            yield {key: value[start : start + self.batch_size] for key, value in self.tensors.items()}


def _dict_batches(data: Mapping[str, Any], labels: Any, batch_size: int) -> _DictSlices:
    return _DictSlices(data, batch_size)


class Batches:
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
        elif isinstance(data, Mapping):  # one dict of arrays (a tokenizer's output for the whole set)
            self.iterable = _dict_batches(data, self.labels, batch_size)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
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
        if not isinstance(self.iterable, Sized):  # a generator or iterator; callers handle the TypeError
            raise TypeError(f"{type(self.iterable).__name__} has no len()")
        return len(self.iterable)

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
        assert self.iterable is not None  # set on construction whenever arrays is not
        offset = 0
        has_labels: bool | None = None
        for index, batch in enumerate(self.iterable):
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


def check_rows(value: Any, rows: int, what: str, fix: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} is a {type(value).__name__}, expected a tensor; {fix}")
    if value.ndim == 0 or value.shape[0] != rows:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, expected the batch of {rows} rows first "
            f"(shape [{rows}, ...]); {fix}"
        )
    return value
