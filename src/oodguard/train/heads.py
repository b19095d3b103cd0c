"""Architecture changes made before training: AbeT's learned-temperature head and DOS's absent-class output.

Both replace the model's final linear layer (found like ``oodguard.extraction.find_head``: the last module when it
is an ``nn.Linear``, or the one named by ``head_name``) in place, so they work on any ``torch.nn.Module`` whose
logits come from such a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from oodguard.extraction.extract import find_head


def _replace_head(model: nn.Module, head_name: str | None, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    found = find_head(model, head_name)
    if found is None:
        raise ValueError(
            "the model's last module is not an nn.Linear, so its final layer cannot be found automatically; pass "
            "head_name= naming the linear layer that produces the logits"
        )
    name, linear = found
    replacement = make(linear)
    if name == "":  # the model is the linear layer itself
        return replacement
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, replacement)
    return model


class LearnedTemperatureHead(nn.Module):
    """AbeT's head: cosine logits divided by a learned, input-dependent temperature in (0, 1).

    ``c_k(h) = <h/||h||, w_k/||w_k||>`` (no bias; computed in float64), ``T(h) = sigmoid(BN1d(a^T h + b)) + 1e-12``
    and the logits are ``c_k(h) / T(h)``, returned in the input's dtype. The cosine weights use Kaiming-normal
    initialisation. The test score is the ablated energy ``-LSE(logits)`` (the energy without the leading T(x)),
    which is the registered ``energy`` detector applied to this head's logits.

    Paper: LeVine, Pikus, Phillips, Norman, Amat Gil & Hendryx, AbeT (Ablated Learned Temperature Energy),
    arXiv 2401.12129, 2024. Code: anonymousoodauthor/abet ``nets.py``
    (``LearnedTemperatureClassificationNet``, ``CosineClassificationHead``).

    Parameters
    ----------
    in_features : feature dimension D.
    num_classes : number of outputs K.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cosine = nn.Linear(in_features, num_classes, bias=False)
        nn.init.kaiming_normal_(self.cosine.weight, nonlinearity="relu")
        # Registered last: the head's last module is not an nn.Linear, so feature extraction does not mistake
        # the temperature's linear layer for the classifier.
        self.temperature_net = nn.Sequential(nn.Linear(in_features, 1), nn.BatchNorm1d(1), nn.Sigmoid())

    def temperature(self, features: torch.Tensor) -> torch.Tensor:
        """``T(h) [N]`` in (0, 1]."""
        if self.training and features.shape[0] < 2:
            # BatchNorm's batch statistics need two rows; torch's own error does not say where the one row came from
            raise ValueError(
                f"AbeT's temperature has a BatchNorm, which cannot train on a batch of {features.shape[0]} row(s); "
                "a loader whose size leaves a last batch of one needs DataLoader(..., drop_last=True) (or another "
                "batch size)"
            )
        return self.temperature_net(features).squeeze(1) + 1e-12

    def cosine_similarity(self, features: torch.Tensor) -> torch.Tensor:
        """``c_k(h) [N, K]`` in float64."""
        weight = F.normalize(self.cosine.weight.to(torch.float64), dim=1)
        return F.normalize(features.to(torch.float64), dim=1) @ weight.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.cosine_similarity(features) / self.temperature(features).to(torch.float64)[:, None]
        return logits.to(features.dtype)


def install_abet_head(model: nn.Module, head_name: str | None = None) -> nn.Module:
    """Replace the final linear layer by a ``LearnedTemperatureHead`` of the same shape (in place; returns the model).

    AbeT's head must be installed before training: it is not a post-hoc method (spec, Appendix pitfall 4). The
    head takes the replaced layer's device and dtype (its weights are drawn on the CPU first, so a seed gives the
    same initial head on every device).
    """

    def make(linear: nn.Linear) -> LearnedTemperatureHead:
        head = LearnedTemperatureHead(linear.in_features, linear.out_features)
        return head.to(device=linear.weight.device, dtype=linear.weight.dtype)

    return _replace_head(model, head_name, make)


def add_absent_class(model: nn.Module, head_name: str | None = None) -> nn.Module:
    """Give the final linear layer a (K+1)-th output, DOS's absent category (in place; returns the model).

    The K existing rows keep their weights and biases, so a pretrained classifier keeps its predictions; the new
    row starts at zero weight and bias (the official DOS trains from scratch and has no such choice to make).
    """

    def widen(linear: nn.Linear) -> nn.Linear:
        wider = nn.Linear(linear.in_features, linear.out_features + 1, bias=True)
        wider = wider.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            wider.weight.zero_()
            wider.bias.zero_()
            wider.weight[: linear.out_features] = linear.weight
            if linear.bias is not None:
                wider.bias[: linear.out_features] = linear.bias
        return wider

    return _replace_head(model, head_name, widen)


# ---------------------------------------------------------------------------------------------- rotation head
class TappedLinear(nn.Linear):
    """An ``nn.Linear`` that keeps its last input (the penultimate features) for an auxiliary head to read."""

    last_input: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (nn.Linear's own argument name)
        self.last_input = input
        return super().forward(input)


class RotationNet(nn.Module):
    """A classifier with the auxiliary 4-way rotation head of self-supervised OOD training (Hendrycks et al.,
    NeurIPS 2019) on its penultimate features.

    ``forward(x)`` returns the classifier's logits, so the model stays a plain classifier for every detector;
    :meth:`logits_and_rotation` also returns the rotation logits ``[B, 4]`` (0, 90, 180 and 270 degrees). The
    final linear layer becomes a :class:`TappedLinear` (same weights) that keeps its input for the rotation head.
    """

    def __init__(self, model: nn.Module, head_name: str | None = None) -> None:
        super().__init__()
        found = find_head(model, head_name)
        if found is None:
            raise ValueError(
                "rotation: the model's last module is not an nn.Linear, so its penultimate features cannot be found; "
                "pass head_name= naming the linear layer that produces the logits"
            )
        linear = found[1]
        # registered first, so that the model's own final layer stays the last module (find_head reads that)
        self.rotation_head = nn.Linear(linear.in_features, 4).to(linear.weight.device, linear.weight.dtype)

        def tapped(old: nn.Linear) -> nn.Module:
            new = TappedLinear(old.in_features, old.out_features, bias=old.bias is not None)
            new.to(old.weight.device, old.weight.dtype).load_state_dict(old.state_dict())
            return new

        self.model = _replace_head(model, head_name, tapped)
        found = find_head(self.model, head_name)
        assert found is not None and isinstance(found[1], TappedLinear)
        self._tap = found[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def logits_and_rotation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        features = self._tap.last_input
        assert features is not None
        self._tap.last_input = None  # do not keep a batch (and its graph) alive
        return logits, self.rotation_head(features.flatten(1))


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four rotations of square images ``[B, C, H, H]``: ``[4B, C, H, H]`` (all 0 degrees first, then 90, 180,
    270) and their labels ``[4B]`` (0, 1, 2, 3)."""
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"rotation: needs square images [B, C, H, H], got {tuple(images.shape)}")
    batch = images.shape[0]
    turned = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(batch)
    return turned, labels
