"""What a model's forward returns, made into what detectors read: logits ``[B, C]`` and features ``[B, D]``.

Models return a tensor, a dict, a tuple or namedtuple, or a Hugging Face ``ModelOutput`` (a dict with
attributes); :func:`logits_of` finds the logits in any of them (``output_key`` chooses). :func:`pooled_features`
turns the output of any module into one feature row per input. :func:`check_logits_not_probabilities` refuses
outputs that already went through a softmax, whose scores every logit-based detector would misread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["logits_of", "pooled_features", "check_logits_not_probabilities", "describe_output"]

_PREFERRED_KEYS = ("logits", "logit", "output", "outputs", "out", "scores")


def describe_output(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return f"a {type(output).__name__} with fields {list(output._fields)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} items"
    return f"a {type(output).__name__}"


def logits_of(output: Any, output_key: str | int | None = None) -> torch.Tensor:
    """The logits tensor inside a model's output.

    ``output_key`` names a key (dict, ``ModelOutput``), a field or attribute (namedtuple, object) or an index
    (tuple, list). Without it: a tensor is the logits; a dict-like output its ``"logits"`` entry (or its only
    tensor); a namedtuple its ``logits`` field; a tuple or list its first item; an object its ``.logits``.

    Examples
    --------
    >>> logits_of({"logits": torch.zeros(2, 3), "features": torch.ones(2, 8)}).shape
    torch.Size([2, 3])
    >>> logits_of((torch.zeros(2, 3), torch.ones(2, 8)), output_key=1).shape
    torch.Size([2, 8])
    """
    found = _pick(output, output_key)
    if not isinstance(found, torch.Tensor):
        key = "" if output_key is None else f" at output_key={output_key!r}"
        raise ValueError(
            f"the model returned {describe_output(output)}; found {describe_output(found)}{key} where the logits "
            "[B, C] were expected. Pass output_key= naming the entry that holds the logits"
        )
    return found


def _pick(output: Any, output_key: str | int | None) -> Any:
    if isinstance(output, torch.Tensor):
        if output_key is not None:
            raise ValueError(f"output_key={output_key!r}: the model returns a single tensor; leave output_key out")
        return output
    if isinstance(output, Mapping):
        if output_key is not None:
            if output_key not in output:
                raise ValueError(
                    f"output_key={output_key!r}: the model returned a {type(output).__name__} with keys "
                    f"{list(output.keys())}"
                )
            return output[output_key]
        for key in _PREFERRED_KEYS:
            if key in output:
                return output[key]
        tensors = [value for value in output.values() if isinstance(value, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(
            f"the model returned a {type(output).__name__} with keys {list(output.keys())} and none is 'logits'; "
            "pass output_key= naming the entry that holds the logits"
        )
    if isinstance(output, (tuple, list)):
        fields = getattr(output, "_fields", None)
        if isinstance(output_key, str):
            if fields is None or output_key not in fields:
                raise ValueError(
                    f"output_key={output_key!r}: the model returned {describe_output(output)}; use an integer index"
                )
            return getattr(output, output_key)
        if output_key is not None:
            if not -len(output) <= output_key < len(output):
                raise ValueError(f"output_key={output_key!r}: the model returned {describe_output(output)}")
            return output[output_key]
        if fields is not None and "logits" in fields:
            return getattr(output, "logits")  # noqa: B009 - a namedtuple field, not known to the type checker
        if not output:
            raise ValueError("the model returned an empty tuple; it must return the logits")
        return output[0]
    if output_key is not None and isinstance(output_key, str) and hasattr(output, output_key):
        return getattr(output, output_key)
    if hasattr(output, "logits"):
        return output.logits
    return output


def pooled_features(value: Any, name: str) -> torch.Tensor:
    """One feature row per input from a module's output: ``[B, D]`` as is; ``[B, C, H, W]`` averaged over the
    spatial positions (global average pooling); ``[B, T, D]`` averaged over the tokens; other ranks flattened."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"feature_layer: the module {name!r} returned {describe_output(value)}; name a module whose output is "
            "one tensor with the batch first"
        )
    if value.ndim == 2:
        return value
    if value.ndim == 4:
        return value.mean(dim=(2, 3))
    if value.ndim == 3:
        return value.mean(dim=1)
    if value.ndim < 2:
        raise ValueError(f"feature_layer: the output of {name!r} has shape {list(value.shape)}; expected [B, ...]")
    return value.flatten(1)


def check_logits_not_probabilities(logits: torch.Tensor, where: str) -> None:
    """Refuse outputs that are probabilities or log-probabilities (every row sums to one, as such)."""
    if logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] == 0:
        return
    values = logits.detach().to(torch.float64)
    if bool((values <= 1e-6).all()) and bool(((values.exp().sum(1) - 1).abs() < 1e-4).all()):
        kind, layer = "log-probabilities", "LogSoftmax"
    elif bool(((values >= 0) & (values <= 1)).all()) and bool(((values.sum(1) - 1).abs() < 1e-4).all()):
        kind, layer = "probabilities", "Softmax"
    else:
        return
    raise ValueError(
        f"{where}: every row of the model output is {kind} (they sum to one), but detectors need the logits before "
        f"the softmax: on {kind} energy, MaxLogit and the like rank inputs almost at random. Remove the final "
        f"{layer} (or wrap the model so that forward returns the logits); if the model also returns logits, pass "
        "output_key= naming them"
    )
