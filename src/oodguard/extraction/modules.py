"""Finding things in a torch model: modules by name, the final linear layer (the head), and the device it runs on."""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["check_head", "check_model_device", "find_head", "get_module", "head_tensors", "resolve_device"]

_MAX_LISTED_NAMES = 200


# ---------------------------------------------------------------------------------------------- model lookup
def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    # remove_duplicate=False: a module shared under two names can be asked for by either name.
    return dict(model.named_modules(remove_duplicate=False))


def _missing_module_error(model: nn.Module, name: Any, argument: str) -> ValueError:
    names = [n for n in _module_table(model) if n]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, names, n=3)
        if close:
            hint = f"Did you mean {', '.join(repr(c) for c in close)}? "
    listed = ", ".join(names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        listed += f", ... ({len(names) - _MAX_LISTED_NAMES} more; print(dict(model.named_modules()).keys()))"
    return ValueError(
        f"{argument}: no module named {name!r} in {type(model).__name__}. {hint}"
        f"Available module names: {listed or '(the model has no submodules)'}"
    )


def get_module(model: nn.Module, name: Any, argument: str) -> nn.Module:
    table = _module_table(model)
    if not isinstance(name, str) or name not in table:
        raise _missing_module_error(model, name, argument)
    return table[name]


def find_head(model: nn.Module, feature_layer: str | None = None) -> tuple[str, nn.Linear] | None:
    """The final linear layer of ``model`` (its input is the feature), as ``(name, module)``.

    Parameters
    ----------
    model : torch.nn.Module
    feature_layer : str, optional
        Name (as in ``model.named_modules()``) of the final linear layer. When omitted, the head is the
        model's last module in ``named_modules()`` order if that module is an ``nn.Linear`` (true for
        ResNet ``fc``, ViT ``heads.head``, DenseNet ``classifier``, ``nn.Sequential(..., nn.Linear)``);
        for a bare ``nn.Linear`` model the name is ``""``.

    Returns
    -------
    ``(name, module)``, or ``None`` when ``feature_layer`` is omitted and the last module is not an
    ``nn.Linear`` (then only logits can be extracted; name the layer to get features and head).

    Raises
    ------
    ValueError
        ``feature_layer`` names no module (the message lists the available names) or names a module
        that is not an ``nn.Linear``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> find_head(model)[0]
    '2'
    >>> find_head(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))) is None
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if feature_layer is not None:
        module = get_module(model, feature_layer, "feature_layer")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"feature_layer: {feature_layer!r} is a {type(module).__name__}, not an nn.Linear. Name the final "
                "linear layer that produces the logits: its input is the feature and its weight and bias are the head"
            )
        return feature_layer, module
    name, module = list(model.named_modules())[-1]
    if isinstance(module, nn.Linear):
        return name, module
    return None


# ---------------------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise ValueError(
                f"device: {device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps'"
            ) from error
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise ValueError(f"device: expected a string such as 'cpu' or 'cuda', or a torch.device; got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {str(resolved)!r} was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use device='cpu' or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= count:
            raise ValueError(f"device: {str(resolved)!r} was requested but only {count} CUDA device(s) are visible")
        resolved = torch.device("cuda", index)
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device: 'mps' was requested but the Apple MPS backend is not available; use device='cpu'")
    return resolved


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index_a = torch.cuda.current_device() if a.index is None else a.index
        index_b = torch.cuda.current_device() if b.index is None else b.index
        return index_a == index_b
    return True


def check_model_device(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """Refuse a model that lives entirely on another device; return its floating dtype (for casting inputs)."""
    tensors = [*model.parameters(), *model.buffers()]
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        (model_device,) = devices
        if model_device.type != "meta" and not _same_device(model_device, device):
            raise ValueError(
                f"device: the model's parameters are on {model_device} but device={str(device)!r}; "
                f"move the model with model.to({str(device)!r}) or pass device={str(model_device)!r}"
            )
    return next((t.dtype for t in model.parameters() if t.dtype.is_floating_point), None)


def check_head(head: tuple[str, nn.Linear], features: torch.Tensor, logits: torch.Tensor, how: str) -> None:
    """Warn when logits != features @ W.T + b: detectors using the head would then see another model."""
    name, module = head
    predicted = nn.functional.linear(features.to(module.weight.dtype), module.weight, module.bias).to(logits.dtype)
    if predicted.shape != logits.shape:
        raise ValueError(
            f"the final linear layer {name!r} ({how}) outputs shape {tuple(predicted.shape)} but the model outputs "
            f"{tuple(logits.shape)}; pass feature_layer= naming the linear layer that produces the logits"
        )
    difference = float((predicted - logits).abs().max())
    scale = 1.0 + float(logits.abs().max())
    if not difference <= 1e-2 * scale:
        warnings.warn(
            f"the model's logits differ from features @ weight.T + bias of the final linear layer {name!r} ({how}) "
            f"by up to {difference:.3g}: the model changes the logits after that layer (scaling, softmax, ...). "
            "Detectors that use the head will assume logits = features @ weight.T + bias",
            stacklevel=4,
        )


def head_tensors(head: tuple[str, nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    module = head[1]
    weight = module.weight.detach().to("cpu", torch.float32).clone()
    if module.bias is None:
        bias = torch.zeros(weight.shape[0], dtype=torch.float32)
    else:
        bias = module.bias.detach().to("cpu", torch.float32).clone()
    return weight, bias
