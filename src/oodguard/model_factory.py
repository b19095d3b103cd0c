"""Models named by a factory, ``'package.module:function'``, so that another process can build them.

A guard records the factory of its model (``load_guard`` builds it only from a factory the caller names), and the
Ray engine builds the model once in every worker from the model object or a factory.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FACTORY_PATTERN", "build_model", "factory_name", "resolve_factory"]

FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def factory_name(factory: str | Callable[[], torch.nn.Module]) -> str:
    if isinstance(factory, str):
        if not FACTORY_PATTERN.match(factory):
            raise ValueError(
                f"model_factory: expected 'package.module:function', got {factory!r}; the function is called with "
                "no arguments and returns the model (untrained weights are fine: the saved state dict replaces them)"
            )
        return factory
    if callable(factory):
        module = getattr(factory, "__module__", None)
        qualname = getattr(factory, "__qualname__", "")
        if not module or module == "__main__" or "<" in qualname:
            raise ValueError(
                f"model_factory: {factory!r} cannot be imported by name from another process (it is a lambda, a "
                "local function or defined in __main__); define it at module level in an importable module, or "
                "pass 'package.module:function'"
            )
        return f"{module}:{qualname}"
    raise ValueError(f"model_factory: expected 'package.module:function' or a function, got {type(factory).__name__}")


def resolve_factory(name: str) -> Callable[[], Any]:
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"model_factory {name!r}: cannot import module {module_name!r} ({error}); install or put on sys.path "
            "the package that defines the model, or pass model_factory= to load_guard"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model_factory {name!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model_factory {name!r}: {attribute!r} is not callable")
    return target


def build_model(name: str) -> torch.nn.Module:
    model = resolve_factory(name)()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model_factory {name!r}: returned a {type(model).__name__}, expected a torch.nn.Module")
    return model
