"""What a guard expects as input: per field, the row shape, dtype and value range seen while fitting it.

A guard fitted on pixels in [0, 1] says nothing trustworthy about pixels in [0, 255], and a detector fed
values far beyond anything it saw can overflow. :class:`InputContract` records, for every field a guard takes
(``inputs`` for a model guard; ``logits`` and/or ``features`` for a model-agnostic one), the shape of one row,
the dtype, and the smallest and largest value seen at fit and calibration. At run time a row with a value
outside ``[low - margin * span, high + margin * span]`` (``span = high - low``), or with NaN or infinity, is
decided OOD with a reason instead of being scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["FieldContract", "InputContract", "DEFAULT_MARGIN"]

#: Widening of the seen range, as a fraction of its span, before a value counts as out of range.
DEFAULT_MARGIN = 0.25


@dataclass
class FieldContract:
    """Row shape, dtype and seen value range of one input field."""

    shape: tuple[int, ...]
    dtype: str
    low: float
    high: float

    def bounds(self, margin: float) -> tuple[float, float]:
        span = self.high - self.low
        if span <= 0:  # one value seen: widen by a share of its magnitude (or by the margin itself around 0)
            span = max(abs(self.high), 1.0)
        return self.low - margin * span, self.high + margin * span

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high}


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()  # numpy has no bfloat16; the dtype is recorded from the tensor itself
        return values.numpy()
    return np.asarray(values)


def _dtype_name(values: Any, array: np.ndarray) -> str:
    if isinstance(values, torch.Tensor):
        return str(values.dtype).removeprefix("torch.")
    return str(array.dtype)


@dataclass
class InputContract:
    """The fields a guard takes, with their row shapes, dtypes and value ranges.

    Examples
    --------
    >>> contract = InputContract(margin=0.25)
    >>> contract.observe("inputs", np.array([[0.0, 0.5], [1.0, 0.2]], dtype=np.float32))
    >>> contract.fields["inputs"].to_json()
    {'shape': [2], 'dtype': 'float32', 'low': 0.0, 'high': 1.0}
    >>> contract.out_of_range("inputs", np.array([[0.1, 0.9], [255.0, 3.0]]))
    [None, 'inputs: value 255 outside [-0.25, 1.25] (the range seen at fit, widened by 25 % of its span)']
    """

    margin: float | None = DEFAULT_MARGIN
    fields: dict[str, FieldContract] = field(default_factory=dict)

    def observe(self, name: str, values: Any) -> None:
        """Widen the contract of ``name`` to cover a batch ``[N, ...]`` (its shape and dtype must agree)."""
        array = _as_array(values)
        if array.ndim < 1 or array.shape[0] == 0 or array.dtype.kind not in "iuf":
            return
        finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        if finite.size == 0:
            return
        low, high = float(finite.min()), float(finite.max())
        shape, dtype = tuple(int(n) for n in array.shape[1:]), _dtype_name(values, array)
        known = self.fields.get(name)
        if known is None:
            self.fields[name] = FieldContract(shape, dtype, low, high)
            return
        if known.shape != shape:  # variable-size inputs: no fixed row shape to promise
            known.shape = ()
        known.low, known.high = min(known.low, low), max(known.high, high)

    def check_shape(self, name: str, array: np.ndarray, argument: str) -> None:
        known = self.fields.get(name)
        if known is None or not known.shape:
            return
        if tuple(array.shape[1:]) != known.shape:
            raise ValueError(
                f"{argument}: {name} rows have shape {list(array.shape[1:])}, but the guard was fitted on rows of "
                f"shape {list(known.shape)} (send [N, {', '.join(map(str, known.shape))}])"
            )

    def out_of_range(self, name: str, values: Any) -> list[str | None]:
        """Per row, ``None`` when inside the contract's range, else the reason it is not."""
        array = _as_array(values)
        known = self.fields.get(name)
        rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
        reasons: list[str | None] = [None] * rows.shape[0]
        with np.errstate(invalid="ignore", over="ignore"):
            nonfinite = ~np.isfinite(rows).all(axis=1) if rows.dtype.kind == "f" else np.zeros(len(rows), bool)
            if known is not None and self.margin is not None:
                low, high = known.bounds(self.margin)
                beyond = (rows < low) | (rows > high)
                outside = beyond.any(axis=1) & ~nonfinite
            else:
                outside = np.zeros(rows.shape[0], dtype=bool)
        for i in np.flatnonzero(nonfinite):
            reasons[i] = f"{name}: contains NaN or infinite values (or numbers too large to represent)"
        for i in np.flatnonzero(outside):
            row = rows[i]
            worst = row[np.argmax(np.maximum(low - row, row - high))]
            reasons[i] = (
                f"{name}: value {float(worst):.6g} outside [{low:.6g}, {high:.6g}] (the range seen at fit, widened by "
                f"{100 * (self.margin or 0.0):.0f} % of its span)"
            )
        return reasons

    def to_json(self) -> dict[str, Any]:
        return {"margin": self.margin, "fields": {name: c.to_json() for name, c in sorted(self.fields.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> InputContract:
        """Rebuild from :meth:`to_json`; a ValueError names the field of ``where`` that is malformed."""
        if not isinstance(data, Mapping) or set(data) != {"margin", "fields"}:
            raise ValueError(f"{where}: expected 'margin' and 'fields'")
        margin = data["margin"]
        if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0):
            raise ValueError(f"{where}.margin: expected null or a number >= 0, got {margin!r}")
        fields: dict[str, FieldContract] = {}
        if not isinstance(data["fields"], Mapping):
            raise ValueError(f"{where}.fields: expected an object")
        for name, entry in data["fields"].items():
            place = f"{where}.fields.{name}"
            if name not in ("inputs", "logits", "features"):
                raise ValueError(f"{place}: unknown input field {name!r}")
            if not isinstance(entry, Mapping) or set(entry) != {"shape", "dtype", "low", "high"}:
                raise ValueError(f"{place}: expected 'shape', 'dtype', 'low' and 'high'")
            shape, dtype, low, high = entry["shape"], entry["dtype"], entry["low"], entry["high"]
            if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
                raise ValueError(f"{place}.shape: expected a list of positive integers, got {shape!r}")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise ValueError(f"{place}.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
            numbers = [v for v in (low, high) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) != 2 or not np.isfinite(numbers).all() or low > high:
                raise ValueError(f"{place}: expected finite numbers low <= high, got low={low!r}, high={high!r}")
            fields[name] = FieldContract(tuple(shape), dtype, float(low), float(high))
        return cls(margin=None if margin is None else float(margin), fields=fields)

    def describe(self) -> dict[str, Any]:
        """The contract for people and clients: per field, shape, dtype, seen and accepted ranges."""
        described = {}
        for name, known in sorted(self.fields.items()):
            entry: dict[str, Any] = {
                "row_shape": list(known.shape) if known.shape else None,
                "dtype": known.dtype,
                "seen_range": [known.low, known.high],
            }
            entry["accepted_range"] = None if self.margin is None else list(known.bounds(self.margin))
            described[name] = entry
        return described

    def example(self) -> dict[str, Any]:
        """A request body of one row per field, every value the middle of the seen range."""
        body: dict[str, Any] = {}
        for name, known in sorted(self.fields.items()):
            middle = round((known.low + known.high) / 2, 4)
            row: Any = middle
            for size in reversed(known.shape or (1,)):
                row = [row] * size
            body[name] = [row]
        return body


_DTYPES = frozenset(
    ["float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]
)
