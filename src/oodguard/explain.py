"""Which parts of an input drive its OOD score: gradient-based uncertainty attribution (UA-Backprop).

The OOD score of a guard whose detector reads the model's logits and/or features is a differentiable function of
the input: input -> network -> logits/features -> detector score. Following UA-Backprop, the score (the paper's
uncertainty) is backpropagated through the detector, the logits and the network to the input in **one forward
and one backward pass**, and the raw input gradient is then refined into a map over the input:

1. raw gradient ``g = d score / d x`` (:func:`score_gradients`);
2. gradient x input, ``g * (x - baseline)`` (baseline 0): a first-order share of the score per input value, in
   the score's units, so that the map sums (to first order) to the score's change from the baseline -- the
   paper's completeness property, which the raw gradient lacks;
3. channels summed (an image ``[C, H, W]`` gives one ``[H, W]`` map);
4. positive part: only what *raises* the OOD score is kept (regions that make the input look in-distribution are
   not what the user asked about);
5. optional Gaussian smoothing over the two last axes (``sigma`` in pixels; off by default: on 28 x 28 digits a
   blur of one pixel already merges strokes);
6. normalisation to a sum of 1 (a map that is 0 everywhere stays 0: nothing raises the score).

Steps 2-6 are :func:`refine`; each can be switched off. See ``docs/explain.md`` for what the map means, the
deviations from the paper and the measured cost.

Paper: Wang, Joshi, Wang & Ji, "Gradient-based Uncertainty Attribution for Explainable Bayesian Deep Learning",
CVPR 2023 (arXiv:2304.04824). Code: no official code was found; implemented from the paper.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from oodguard.detectors.base import Detector, OutputDetector
from oodguard.extraction.model_runner import FEATURES, ModelRunner
from oodguard.extraction.onnx_model import OnnxModel
from oodguard.outputs import ModelOutputs

__all__ = ["DIFFERENTIABLE_DETECTORS", "check_explainable", "score_gradients", "refine", "explain_inputs"]

#: Detectors whose score is a differentiable function of the logits and/or features, checked against finite
#: differences in the tests. Others (k-NN through FAISS, scores with in-place updates or fitted autoencoders run
#: under no-grad, detectors that read inner layers or run the model themselves) are refused by name.
DIFFERENTIABLE_DETECTORS = (
    "ash", "bam", "bats", "caref", "dice", "doctor", "energy", "entropy", "evidential", "fdbd", "gen", "gradnorm",
    "knn", "lts", "mahalanobis", "mahalanobis_pp", "maxlogit", "msp", "neco", "nnguide", "ocs", "openmax", "pnml",
    "react", "relation", "residual", "rmds", "rmds_pp", "scale", "she", "tempscale", "vim", "vra", "wdiscood",
)  # fmt: skip


def check_explainable(detector: Detector) -> None:
    """Raise a ValueError naming the supported detectors when ``detector``'s score cannot be backpropagated."""
    name = detector.name
    backend = getattr(detector, "backend", "torch")
    why = None
    if name not in DIFFERENTIABLE_DETECTORS or not isinstance(detector, OutputDetector):
        why = "its score is not a differentiable function of the model's logits or features"
    elif backend != "torch":
        why = f"with backend={backend!r} the neighbour search runs outside autograd; use backend='torch'"
    if why is not None:
        raise ValueError(
            f"explain: detector {name!r} cannot be explained ({why}). Supported detectors: "
            f"{', '.join(DIFFERENTIABLE_DETECTORS)}"
        )
    if not detector.is_fitted:
        raise ValueError(f"explain: detector {name!r} is not fitted; fit the guard first")


def _head_in_graph(runner: ModelRunner) -> tuple[torch.Tensor, torch.Tensor] | None:
    if runner.head is None:
        return None
    linear: nn.Linear = runner.head[1]
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


def _score_loss(detector: Detector, runner: ModelRunner) -> Callable[..., torch.Tensor]:
    """``loss(logits, activations) -> [B]``: the detector's score with the logits and features still in the graph.

    The outputs are validated on detached copies (validation detaches), then the graph tensors are put in their
    place, so the detector's own score code runs on them: one implementation of each score."""
    assert isinstance(detector, OutputDetector)  # check_explainable ran first
    head = _head_in_graph(runner)
    needs_features = "features" in detector.requires
    score = detector._score  # noqa: SLF001  (the per-chunk score of an output detector, on tensors)

    def loss(logits: torch.Tensor, activations: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        features = activations[FEATURES].flatten(1) if needs_features and activations else None
        outputs = ModelOutputs(
            logits=logits.detach(),
            features=None if features is None else features.detach(),
            head=None if head is None else (head[0].to(logits.dtype), head[1].to(logits.dtype)),
        )
        outputs.logits = logits
        if features is not None:
            outputs.features = features
        with warnings.catch_warnings():  # a detector's float(...) check on a graph tensor reads the value only
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            values = score(outputs)
        if not values.requires_grad:
            raise ValueError(
                f"explain: the score of detector {detector.name!r} does not depend differentiably on the model's "
                "outputs with these parameters"
            )
        return values

    return loss


def score_gradients(runner: ModelRunner, detector: Detector, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs as fed to the model and the raw gradient ``d score / d inputs`` (both ``[N, ...]``, on the CPU).

    One forward and one backward pass per batch (``runner.batch_size`` rows). Samples do not interact in an
    eval-mode model, so the gradient of the batch's summed score w.r.t. one input is that input's own gradient.
    """
    check_explainable(detector)
    layers = [FEATURES] if "features" in detector.requires else []
    if layers and runner.head is None:
        raise ValueError(
            f"explain: detector {detector.name!r} reads the features (the input of the final linear layer), but the "
            "model's final linear layer was not found; give the guard feature_layer= naming it"
        )
    xs, grads = [], []
    for batch in runner.gradient_batches(
        inputs, _score_loss(detector, runner), layers=layers, wrt_input=True, wrt_layers=False, desc="explain"
    ):
        assert batch.input_gradient is not None
        xs.append(batch.inputs.cpu())
        grads.append(batch.input_gradient.cpu())
    if not grads:
        raise ValueError("x: no rows to explain; pass at least one input")
    x, gradient = torch.cat(xs), torch.cat(grads)
    # A model may mask a NaN input (nan_to_num, attention masks): its gradient is then finite, but gradient x input
    # would turn the whole map into NaN.
    bad_rows = (~torch.isfinite(x).flatten(1).all(dim=1)).nonzero().flatten()
    if len(bad_rows):
        raise ValueError(
            f"x: {len(bad_rows)} input(s) contain NaN or infinite values (rows {bad_rows[:10].tolist()}); "
            "repair or remove them before explaining"
        )
    if not bool(torch.isfinite(gradient).all()):
        bad = int((~torch.isfinite(gradient).flatten(1).all(dim=1)).sum())
        raise ValueError(
            f"explain: the gradient of the {detector.name!r} score is not finite for {bad} input(s) (a score at a "
            "point where it is not differentiable, e.g. a k-NN distance of exactly 0); explain other inputs"
        )
    return x, gradient


def _gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the two last axes of ``maps [N, ..., H, W]`` (edges replicated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    flat = nn.functional.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = nn.functional.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = nn.functional.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


def refine(
    gradient: torch.Tensor,
    inputs: torch.Tensor,
    *,
    times_input: bool = True,
    positive: bool = True,
    sigma: float = 0.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Turn raw input gradients into attribution maps (steps 2-6 of the module docstring).

    Parameters
    ----------
    gradient, inputs : ``[N, ...]`` of the same shape. Images ``[N, C, H, W]`` give maps ``[N, H, W]`` (channels
        summed); any other shape keeps its shape (``[N, D]`` vectors, ``[N, H, W]`` single-channel images).
    times_input : multiply by the input (gradient x input); False keeps the raw gradient.
    positive : keep only the positive part (what raises the OOD score).
    sigma : standard deviation in pixels of a Gaussian smoothing over the two last axes (0: none; only for maps of
        rank >= 2 per input; at most a third of the maps' larger side).
    normalize : divide each map by its sum of absolute values (a map of zeros stays zeros).

    Returns
    -------
    float32 tensor ``[N, H, W]`` for images, else the input's shape.

    Examples
    --------
    >>> g = torch.tensor([[[[1.0, -2.0]], [[0.5, 1.0]]]])  # [1, 2 channels, 1, 2]
    >>> x = torch.tensor([[[[2.0, 1.0]], [[2.0, 1.0]]]])
    >>> refine(g, x, normalize=False).tolist()  # channel sums 1*2 + 0.5*2 = 3 and -2 + 1 = -1 -> positive part
    [[[3.0, 0.0]]]
    """
    if gradient.shape != inputs.shape or gradient.ndim < 2:
        raise ValueError(
            f"refine: gradient {tuple(gradient.shape)} and inputs {tuple(inputs.shape)} must have the same shape "
            "[N, ...]"
        )
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma < float("inf"):
        raise ValueError(f"sigma: expected a number of pixels >= 0, got {sigma!r}")
    maps = gradient.to(torch.float64)
    if times_input:
        maps = maps * inputs.to(torch.float64)
    if maps.ndim == 4:
        maps = maps.sum(dim=1)
    if positive:
        maps = maps.clamp_min(0.0)
    if sigma > 0:
        if maps.ndim < 3:
            raise ValueError(f"sigma: smoothing needs spatial maps [N, H, W]; these are {tuple(maps.shape)}")
        # The kernel reaches 3 sigma on each side and the map is padded by as much: a sigma beyond the map's size
        # flattens the map and, unbounded, would allocate padding of any size (1e5 asks for terabytes).
        largest = max(maps.shape[-2:]) / 3
        if sigma > largest:
            raise ValueError(
                f"sigma: {sigma!r} pixels blurs beyond these {tuple(maps.shape[-2:])} maps; give at most "
                f"{largest:.4g} (a third of the larger side, so that the kernel's 3 sigma fits in the map)"
            )
        maps = _gaussian_smooth(maps, float(sigma))
    if normalize:
        total = maps.abs().flatten(1).sum(dim=1)
        total = torch.where(total > 0, total, torch.ones_like(total))
        maps = maps / total.view(-1, *([1] * (maps.ndim - 1)))
    return maps.to(torch.float32)


def explain_inputs(
    model: nn.Module,
    detector: Detector,
    inputs: Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    feature_layer: str | None = None,
    output_key: str | int | None = None,
    times_input: bool = True,
    positive: bool = True,
    sigma: float = 0.0,
    normalize: bool = True,
) -> np.ndarray:
    """Attribution maps ``[N, H, W]`` (images) or ``[N, ...]`` of a detector's OOD score, as float32 numpy.

    ``model`` and the extraction settings are those the detector was fitted with; see :func:`refine` for the rest.
    """
    dtype = getattr(inputs, "dtype", None)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and not (
        inputs.dtype.is_floating_point if isinstance(inputs, torch.Tensor) else inputs.dtype.kind == "f"
    ):
        raise ValueError(
            f"x: explain differentiates the score with respect to the inputs, which must be floating point, got "
            f"{dtype}; pass them as the model receives them (e.g. 0-255 uint8 images as float32 scaled like the fit "
            "data)"
        )
    if isinstance(model, OnnxModel):
        raise ValueError(
            "explain: the guard's model is an ONNX file run by onnxruntime, which gives no gradients; explain needs "
            "the torch model (build the guard with the nn.Module the ONNX file was exported from)"
        )
    if feature_layer is not None and "features" in detector.requires:
        from oodguard.extraction.modules import get_module

        if not isinstance(get_module(model, feature_layer, "feature_layer"), nn.Linear):
            raise ValueError(
                f"explain: feature_layer {feature_layer!r} is not the final linear layer; explain differentiates the "
                "features at the input of the final linear layer, so name that layer (or use a logit detector)"
            )
    runner = ModelRunner(
        model, device=device, batch_size=batch_size, feature_layer=feature_layer, output_key=output_key
    )
    x, gradient = score_gradients(runner, detector, inputs)
    return refine(gradient, x, times_input=times_input, positive=positive, sigma=sigma, normalize=normalize).numpy()
