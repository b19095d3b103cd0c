"""Declared hyperparameters: each detector lists the rules its constructor's parameters obey, and one validator
checks them with one error format.

A detector class declares ``_parameter_constraints = {"k": [Interval(Integral, 1, None)], "dim": [None,
Interval(Integral, 1, None)]}``: each parameter maps to a list of alternatives, any one of which may hold. An
alternative is a constraint object (:class:`Interval`, :class:`Options`, :class:`SequenceOf`, :class:`Mapping`,
:class:`ArrayLike`, :class:`Boolean`, :class:`Text`) or ``None`` (the value may be None).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from collections.abc import Mapping as MappingABC
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "Boolean",
    "Constraint",
    "Integral",
    "Interval",
    "Mapping",
    "Options",
    "Real",
    "SequenceOf",
    "Text",
    "describe",
    "shown",
    "validate_params",
]


class Constraint:
    """One rule a parameter value may satisfy; ``str(constraint)`` completes "must be ..."."""

    def is_satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


class Interval(Constraint):
    """A finite number of type ``kind`` (``Integral`` or ``Real``; never a bool) between ``left`` and ``right``.

    ``closed`` is ``"both"``, ``"left"``, ``"right"`` or ``"neither"``; a bound of None is open.
    """

    def __init__(self, kind: type, left: float | None, right: float | None, *, closed: str = "both") -> None:
        if kind not in (Integral, Real):
            raise TypeError("Interval kind must be numbers.Integral or numbers.Real")
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be both, left, right or neither, got {closed!r}")
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, self.kind):
            return False
        if not math.isfinite(value):
            return False
        if self.left is not None:
            if value < self.left or (value == self.left and self.closed in ("right", "neither")):
                return False
        if self.right is not None:
            if value > self.right or (value == self.right and self.closed in ("left", "neither")):
                return False
        return True

    def __str__(self) -> str:
        kind = "an integer" if self.kind is Integral else "a finite number"
        parts = []
        if self.left is not None:
            parts.append((">= " if self.closed in ("both", "left") else "> ") + _number(self.left))
        if self.right is not None:
            parts.append(("<= " if self.closed in ("both", "right") else "< ") + _number(self.right))
        return kind + (" " + " and ".join(parts) if parts else "")


class Options(Constraint):
    """One of a fixed set of values (compared with ``==``; bools never match numbers)."""

    def __init__(self, values: Collection[Any]) -> None:
        self.values = tuple(values)

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)) and not any(isinstance(option, bool) for option in self.values):
            return False
        try:
            return bool(value in self.values)
        except (TypeError, ValueError):  # unhashable or array-valued comparisons
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


class Boolean(Constraint):
    """True or False."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def __str__(self) -> str:
        return "True or False"


class Text(Constraint):
    """A non-empty string."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    def __str__(self) -> str:
        return "a non-empty string"


class SequenceOf(Constraint):
    """A list or tuple of at least ``min_length`` items, each satisfying ``item`` (a constraint or a type)."""

    def __init__(self, item: Constraint | type, *, min_length: int = 1) -> None:
        self.item, self.min_length = item, min_length

    def _item_ok(self, value: Any) -> bool:
        if isinstance(self.item, Constraint):
            return self.item.is_satisfied_by(value)
        return isinstance(value, self.item) and not (self.item is not bool and isinstance(value, bool))

    def is_satisfied_by(self, value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) >= self.min_length
            and all(self._item_ok(item) for item in value)
        )

    def __str__(self) -> str:
        item = str(self.item) if isinstance(self.item, Constraint) else getattr(self.item, "__name__", str(self.item))
        return f"a list of at least {self.min_length} item(s), each {item}"


class Mapping(Constraint):
    """A dict with string keys."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, MappingABC) and all(isinstance(key, str) for key in value)

    def __str__(self) -> str:
        return "a dict with string keys"


class ArrayLike(Constraint):
    """A tensor or numpy array with ``ndim`` dimensions (any when None)."""

    def __init__(self, ndim: int | None = None) -> None:
        self.ndim = ndim

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, (torch.Tensor, np.ndarray)) and (self.ndim is None or value.ndim == self.ndim)

    def __str__(self) -> str:
        return "a tensor or numpy array" + (f" with {self.ndim} dimensions" if self.ndim is not None else "")


def describe(alternatives: Iterable[Constraint | None]) -> str:
    """The "must be ..." text of a list of alternatives."""
    return " or ".join("None" if a is None else str(a) for a in alternatives)


def validate_params(owner: str, constraints: MappingABC[str, list], params: MappingABC[str, Any]) -> None:
    """Raise ``ValueError("{owner}: parameter 'p' must be ...; got ...")`` for the first parameter breaking its rules.

    Parameters without declared constraints are not checked (the contract tests require a declaration for every
    parameter of every registered detector).
    """
    for name, value in params.items():
        if name not in constraints:
            continue
        alternatives = constraints[name]
        if any(value is None if a is None else a.is_satisfied_by(value) for a in alternatives):
            continue
        raise ValueError(f"{owner}: parameter {name!r} must be {describe(alternatives)}; got {shown(value)}")


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def shown(value: Any) -> str:
    """A parameter value as error messages show it: arrays by type and shape, long values cut."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
