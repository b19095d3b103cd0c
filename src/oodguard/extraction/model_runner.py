"""Running a model for detectors that need more than cached outputs: input gradients, perturbed inputs and
gradients at inner layers.

:class:`ModelRunner` wraps a ``torch.nn.Module`` once (device, batch size, input normalisation, final linear
layer) and is the one place that runs the model with autograd. Detectors that need the model (ODIN, Mahalanobis
input preprocessing, NAC on inner layers, true-gradient GradNorm, ...) receive a runner instead of
:class:`~oodguard.outputs.ModelOutputs`; see :mod:`oodguard.detectors.model.gradient`.

Every method
------------
* takes inputs as a tensor or numpy array ``[N, ...]``, a ``Dataset``, a ``DataLoader`` or an iterable of
  batches (the forms :func:`oodguard.extraction.extract` accepts), cut into batches of ``batch_size``;
* runs the model in ``eval()`` mode and restores every submodule's training flag afterwards, also on error;
* differentiates with ``torch.autograd.grad`` with respect to the inputs or to layer outputs only, so the
  parameters' ``.grad`` are never created or changed (no ``backward()``, no ``zero_grad`` needed);
* returns detached tensors on the CPU, in the model's floating dtype.

Per-sample gradients from one batch
-----------------------------------
A loss is a callable ``loss(logits [B, C]) -> [B]`` giving one value per sample. The runner differentiates the
**sum** over the batch. That sum's gradient with respect to sample ``i``'s input (or activation) equals the
gradient of sample ``i``'s own loss exactly when samples do not interact inside the model, which holds in
``eval()`` mode for the usual layers. **It does not hold for a BatchNorm without running statistics**
(``track_running_stats=False`` uses the batch statistics even in eval mode) or any other layer that mixes
samples (batch-level attention, ...): scores would then depend on which samples share a batch. The runner warns
about the BatchNorm case when it is built.

Input normalisation
-------------------
``input_std`` is the per-channel standard deviation by which the inputs *given to the runner* were divided
(``x = (pixel - mean) / std`` done by the data transform, as in torchvision). :meth:`ModelRunner.perturb` divides
its sign step by it, so that ``epsilon`` is a step in raw pixel units (the official ODIN code). Leave it ``None``
(a divisor of 1) when the inputs are raw pixels, e.g. when the model normalises inside its ``forward``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from oodguard.extraction.batches import Batches, check_rows
from oodguard.extraction.extract import extract
from oodguard.extraction.forward import logits_of
from oodguard.extraction.modules import check_model_device, find_head, get_module, head_tensors, resolve_device
from oodguard.outputs import ModelOutputs

__all__ = ["ModelRunner", "GradientBatch", "FEATURES", "Direction", "sign_step", "std_divisor"]

#: Pseudo layer name for the input of the final linear layer (the features); module names never contain "<".
FEATURES = "<features>"

Loss = Callable[..., torch.Tensor]
Direction = Callable[[torch.Tensor], torch.Tensor]
_T = TypeVar("_T")

log = logging.getLogger(__name__)


@dataclass
class GradientBatch:
    """One batch of a gradient pass (on the runner's device, detached).

    Attributes
    ----------
    inputs : the inputs as fed to the model ``[B, ...]``.
    logits : ``[B, C]``.
    activations, gradients : layer name -> output ``[B, ...]`` and the gradient of the summed loss w.r.t. it.
    input_gradient : ``d(sum of loss)/d(inputs)`` ``[B, ...]``, or None when it was not asked for.
    labels : ``[B]`` or None.
    """

    inputs: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    input_gradient: torch.Tensor | None
    labels: torch.Tensor | None


def sign_step(gradient: torch.Tensor) -> torch.Tensor:
    """ODIN's step direction ``sign(g)`` with ``sign(0) := +1``, as the official code ((g >= 0) -> +1, else -1)."""
    return torch.where(gradient >= 0, 1.0, -1.0).to(gradient.dtype)


def std_divisor(std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``std`` (one value, or one per channel, dimension 1) shaped to divide ``x``, on its device and dtype."""
    if std.numel() > 1:
        if x.ndim < 2 or x.shape[1] != std.numel():
            raise ValueError(
                f"input_std: {std.numel()} per-channel values, but the inputs have shape {tuple(x.shape)} "
                f"(channels are dimension 1); give one std per channel or a single value"
            )
        std = std.reshape(1, -1, *([1] * (x.ndim - 2)))
    return std.to(device=x.device, dtype=x.dtype)


def _not_differentiable(what: str) -> ValueError:
    return ValueError(
        f"model: the {what} output is not differentiable with respect to the inputs (it does not require grad): "
        "the model runs under torch.no_grad() or detaches its output. Gradient-based detectors need a model whose "
        "forward keeps the autograd graph; remove the no_grad()/detach() from its forward"
    )


def _as_std(input_std: Any) -> torch.Tensor | None:
    if input_std is None:
        return None
    try:
        std = torch.as_tensor(np.asarray(input_std, dtype=np.float64) if not torch.is_tensor(input_std) else input_std)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"input_std: expected a positive number or one per input channel, got {input_std!r}"
        ) from error
    std = std.detach().to("cpu", torch.float64).reshape(-1)
    if std.numel() == 0 or not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
        raise ValueError(
            f"input_std: expected finite values > 0 (the std each input channel was divided by), got {input_std!r}"
        )
    return std


class ModelRunner:
    """Runs a model over inputs for forward passes, input gradients, ODIN-style perturbations and layer gradients.

    Parameters
    ----------
    model : torch.nn.Module
        Takes one tensor batch and returns logits ``[B, C]``. It must already be on ``device`` (never moved).
    input_std : float, sequence of floats or tensor, optional
        Per-channel std (dimension 1 of the inputs) the inputs were divided by before reaching the runner;
        a single value applies to every channel. ``None`` means 1 (raw inputs, or a model that normalises
        internally). Used only by :meth:`perturb` with ``scale_by_std=True``.
    device : "cpu", "cuda", "cuda:N", "mps" or torch.device
    batch_size : int
        Rows per batch for arrays and datasets (a given DataLoader keeps its own).
    feature_layer : str, optional
        Name of the final linear layer (found by :func:`oodguard.extraction.find_head` when omitted), or of any
        module whose pooled output are the features (see :func:`oodguard.extraction.extract`).
    output_key : str or int, optional
        Where the logits are in the model's output (dict key, namedtuple field, tuple index); see ``extract``.
    progress : bool
        Default for the ``progress`` argument of every method (a tqdm bar per pass).
    channels_last : bool
        Lay 4-D inputs out channels-last in gradient passes (default True): the same values up to float rounding,
        and a faster backward pass through convolutions on the CPU (ODIN on a ResNet-18: 3.3 instead of 3.5-3.6
        forward-pass equivalents, ``benchmarks/model_cost.py``). Tried on the first 4-D batch of this runner and
        remembered: when anything fails there in channels-last (a model that flattens with ``x.view(x.size(0),
        -1)``) and works in the contiguous layout, that batch runs again contiguous and every later one too, with
        no error, no warning (a debug log line) and no second pass over the data. Inputs are copied to the standard
        strides of the layout in use, so strided slices of arrays work too.
    cache_dir : path, optional
        Where :meth:`forward_views` caches the outputs of test-time views (see :mod:`oodguard.views.outputs`);
        gradient passes are never cached (they depend on the detector's loss).

    Attributes
    ----------
    head : ``(name, nn.Linear)`` of the final linear layer, or None when none was found.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> runner = ModelRunner(model)
    >>> x = torch.randn(5, 4)
    >>> g = runner.input_gradients(x, lambda logits: torch.logsumexp(logits, dim=1))
    >>> g.shape
    torch.Size([5, 4])
    >>> acts, grads = runner.layer_gradients(x, ["1"], lambda logits: logits.amax(dim=1))
    >>> acts["1"].shape == grads["1"].shape == (5, 8)
    True
    >>> all(p.grad is None for p in model.parameters())
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_std: Any = None,
        device: str | torch.device = "cpu",
        batch_size: int = 128,
        feature_layer: str | None = None,
        output_key: str | int | None = None,
        progress: bool = False,
        cache_dir: str | os.PathLike | None = None,
        channels_last: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.model = model
        self.device = resolve_device(device)
        self.input_dtype = check_model_device(model, self.device)
        self.batch_size = batch_size
        self.feature_layer = feature_layer
        self.output_key = output_key
        # feature_layer may name any module (extract pools its output); the head is then the final linear layer
        linear = feature_layer is None or isinstance(get_module(model, feature_layer, "feature_layer"), nn.Linear)
        self.head = find_head(model, feature_layer if linear else None)
        self.input_std = _as_std(input_std)
        self.progress = bool(progress)
        self.channels_last = bool(channels_last)
        # None until the first 4-D batch tries channels-last; then whether the model takes it.
        self._channels_last_works: bool | None = None
        self.cache_dir = cache_dir
        mixing = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None
        ]
        if mixing:
            warnings.warn(
                f"model: BatchNorm layer(s) {mixing} keep no running statistics, so they normalise with the batch "
                "statistics even in eval mode: outputs and gradients of one sample then depend on the other samples "
                "of its batch. Use batch_size=1 for exact per-sample results",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        head = None if self.head is None else self.head[0]
        return (
            f"ModelRunner({type(self.model).__name__}, device={str(self.device)!r}, batch_size={self.batch_size}, "
            f"head={head!r}, input_std={None if self.input_std is None else self.input_std.tolist()})"
        )

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def eval_mode(self, train: Iterable[nn.Module] = ()) -> Iterator[None]:
        """Hold the model in eval mode, with the submodules in ``train`` alone in training mode (MC dropout switches
        its dropout layers on this way); every submodule's flag is restored afterwards, also on error."""
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            self.model.eval()
            for module in train:
                module.training = True
            yield
        finally:
            for module, training in modes:
                module.training = training

    def batches(
        self, data: Any, labels: Any = None, *, progress: bool | None = None, desc: str = "batches"
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(inputs, labels)`` per non-empty batch of ``batch_size``, the inputs on the runner's device in the model's
        floating dtype: for detectors that run the model their own way (several stochastic passes, a layer's output
        replaced by a forward hook) inside :meth:`eval_mode`."""
        return self._batches(data, labels, progress, desc)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits ``[B, C]`` for one batch from :meth:`batches`, checked; the caller sets the mode and
        whether autograd records."""
        return self._check_logits(logits_of(self.model(x), self.output_key), x.shape[0])

    @contextlib.contextmanager
    def _hooks(self, layer_names: Sequence[str]) -> Iterator[dict[str, list]]:
        """Record the outputs of ``layer_names`` (and the head's input for :data:`FEATURES`) per forward call."""
        captured: dict[str, list] = {}
        handles = []

        def layer_hook(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                captured.setdefault(name, []).append(output)
                if isinstance(output, torch.Tensor):
                    # The rest of the model gets a copy: an in-place op downstream (ReLU(inplace=True)) must not
                    # change the recorded tensor, nor re-route its autograd history.
                    return output.clone()
                return None

            return hook

        def feature_hook(module: nn.Module, args: tuple) -> None:
            captured.setdefault(FEATURES, []).append(args[0] if args else None)

        try:
            for name in layer_names:
                if name == FEATURES:
                    if self.head is None:
                        raise ValueError(
                            f"layers: {FEATURES!r} asks for the features, but the model's final linear layer was not "
                            "found; pass feature_layer= to the ModelRunner"
                        )
                    handles.append(self.head[1].register_forward_pre_hook(feature_hook))
                else:
                    handles.append(get_module(self.model, name, "layers").register_forward_hook(layer_hook(name)))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _batches(self, data: Any, labels: Any, progress: bool | None, desc: str) -> Iterator[tuple[torch.Tensor, Any]]:
        batches = Batches(data, labels, self.batch_size)
        show = self.progress if progress is None else bool(progress)
        for inputs, batch_labels in tqdm(
            batches, total=batches.num_batches(), desc=desc, unit="batch", disable=not show
        ):
            if inputs.shape[0] == 0:
                continue
            x = inputs.to(self.device)
            if self.input_dtype is not None and x.dtype.is_floating_point and x.dtype != self.input_dtype:
                x = x.to(self.input_dtype)
            yield x, batch_labels

    @staticmethod
    def _check_logits(logits: Any, rows: int) -> torch.Tensor:
        fix = "wrap the model so that forward returns the logits tensor [B, C], or pass output_key="
        check_rows(logits, rows, "the model output", fix)
        if logits.ndim != 2:
            raise ValueError(f"the model output has shape {tuple(logits.shape)}; logits must be [B, C]. {fix}")
        return logits

    @staticmethod
    def _layer_output(captured: dict[str, list], name: str, rows: int, for_gradients: bool) -> torch.Tensor:
        calls = captured.get(name, [])
        what = "the features (input of the final linear layer)" if name == FEATURES else f"the module {name!r}"
        if not calls:
            raise ValueError(f"layers: {what} was not called during forward")
        if for_gradients and len(calls) > 1:
            raise ValueError(
                f"layers: {what} was called {len(calls)} times in one forward pass, so a gradient with respect to "
                "its output is ambiguous; name a module that runs once"
            )
        fix = "pick a submodule whose output is a single tensor with the batch first"
        return check_rows(calls[-1], rows, f"layers: the output of {what}", fix)

    @staticmethod
    def _call_loss(loss: Loss, logits: torch.Tensor, activations: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if not callable(loss):
            raise ValueError(f"loss: expected a callable (logits [B, C]) -> per-sample loss [B], got {loss!r}")
        value = loss(logits) if activations is None else loss(logits, activations)
        rows = logits.shape[0]
        if not isinstance(value, torch.Tensor) or value.shape != (rows,) or not value.dtype.is_floating_point:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"loss: must return one floating value per sample, shape [{rows}], got {got}; return the per-sample "
                "loss without reducing it over the batch"
            )
        return value

    def gradient_batches(
        self,
        data: Any,
        loss: Loss,
        *,
        layers: Sequence[str] | str = (),
        wrt_input: bool = True,
        wrt_layers: bool = True,
        labels: Any = None,
        progress: bool | None = None,
        desc: str = "gradients",
    ) -> Iterator[GradientBatch]:
        """Per batch: one forward with autograd and one ``torch.autograd.grad`` of ``loss(...).sum()``.

        The building block of :meth:`input_gradients`, :meth:`perturb` and :meth:`layer_gradients`, for detectors
        that reduce each batch at once instead of holding every gradient. With ``layers``, ``loss`` is called as
        ``loss(logits, activations)`` (``activations``: name -> output ``[B, ...]``, still in the graph), so a
        loss may depend on inner layers (e.g. a Mahalanobis distance); without, as ``loss(logits)``. Gradients
        w.r.t. the layer outputs are returned when ``wrt_layers``, w.r.t. the inputs when ``wrt_input``. A layer
        that does not influence the loss gets a zero gradient. The model stays in eval mode while the
        generator is open; training flags are restored when it finishes or is closed.
        """
        layer_names = [layers] if isinstance(layers, str) else list(layers)
        duplicates = sorted({name for name in layer_names if layer_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"layers: {duplicates} requested more than once; give each layer name once")
        if not wrt_input and not (wrt_layers and layer_names):
            raise ValueError("gradient_batches: nothing to differentiate; set wrt_input=True or name layers")
        with self.eval_mode(), self._hooks(layer_names) as captured:
            for x, batch_labels in self._batches(data, labels, progress, desc):
                if wrt_input and not x.dtype.is_floating_point:
                    raise ValueError(
                        f"data: input gradients need floating inputs, got dtype {x.dtype} (e.g. token ids); "
                        "differentiate with respect to a layer (e.g. the embeddings) with layer_gradients"
                    )
                x, logits, acts, grads = self._in_layout(
                    x,
                    lambda laid_out: self._gradient_pass(laid_out, loss, layer_names, captured, wrt_input, wrt_layers),
                )
                input_gradient = None
                if wrt_input:
                    if grads[0] is None:
                        raise _not_differentiable("model's")
                    input_gradient = grads[0]
                    grads = grads[1:]
                layer_grads = {}
                if wrt_layers:
                    for name, grad in zip(layer_names, grads, strict=True):
                        layer_grads[name] = torch.zeros_like(acts[name]) if grad is None else grad
                yield GradientBatch(
                    inputs=x.detach(),
                    logits=logits.detach(),
                    activations={name: value.detach() for name, value in acts.items()},
                    gradients=layer_grads,
                    input_gradient=input_gradient,
                    labels=batch_labels,
                )

    def _std_divisor(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.input_std is None else std_divisor(self.input_std, x)

    def _perturbed(
        self, batch: GradientBatch, epsilon: float, scale_by_std: bool, direction: Direction = sign_step
    ) -> torch.Tensor:
        gradient = batch.input_gradient
        assert gradient is not None
        if not bool(torch.isfinite(gradient).all()):
            raise FloatingPointError(
                "the input gradient has non-finite values (the loss overflowed); check the model's outputs and the loss"
            )
        step = direction(gradient).to(batch.inputs.dtype)
        divisor = self._std_divisor(batch.inputs) if scale_by_std else None
        if divisor is not None:
            step = step / divisor
        return batch.inputs - epsilon * step

    @staticmethod
    def _check_epsilon(epsilon: Any) -> float:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
            raise ValueError(f"epsilon: expected a finite number (the step size in input units), got {epsilon!r}")
        return float(epsilon)

    def _gradient_pass(
        self,
        x: torch.Tensor,
        loss: Loss,
        layer_names: Sequence[str],
        captured: dict[str, list],
        wrt_input: bool,
        wrt_layers: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor | None, ...]]:
        """One batch's forward with autograd and ``torch.autograd.grad``: ``(inputs, logits, activations, grads)``."""
        rows = x.shape[0]
        if x.dtype.is_floating_point:
            # Also for layer gradients: a frozen model (no parameter requires grad) still has a graph.
            x = x.detach().requires_grad_(True)
        captured.clear()
        with torch.enable_grad():
            logits = self._check_logits(logits_of(self.model(x), self.output_key), rows)
            if not logits.requires_grad:
                raise _not_differentiable("model's")
            acts = {name: self._layer_output(captured, name, rows, True) for name in layer_names}
            per_sample = self._call_loss(loss, logits, acts if layer_names else None)
            if not per_sample.requires_grad:
                raise ValueError(
                    "loss: its value does not require grad, so it cannot be differentiated; compute it from "
                    "the logits/activations it is given with differentiable torch operations"
                )
            targets = [x] if wrt_input else []
            if wrt_layers:
                for name in layer_names:
                    if not acts[name].requires_grad:
                        raise ValueError(
                            f"layers: the output of {name!r} is not differentiable (it does not require "
                            "grad); the model computes it under no_grad() or detaches it"
                        )
                    targets.append(acts[name])
            grads = torch.autograd.grad(per_sample.sum(), targets, allow_unused=True)
        return x, logits, acts, grads

    def _takes_channels_last(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes in channels-last: a 4-D floating batch, unless the model is known to refuse it."""
        return (
            x.ndim == 4 and x.dtype.is_floating_point and self.channels_last and self._channels_last_works is not False
        )

    def _laid_out(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the layout already chosen: channels-last when the model takes it, else contiguous."""
        if not x.dtype.is_floating_point:
            return x
        return _with_strides_of(x, torch.channels_last if self._takes_channels_last(x) else torch.contiguous_format)

    def _in_layout(self, x: torch.Tensor, step: Callable[[torch.Tensor], _T]) -> _T:
        """``step(x)`` in the layout the model takes, tried on the first 4-D batch and remembered.

        That batch runs channels-last; if anything in ``step`` fails, it runs again contiguous and, when that works,
        the model gets its own contiguous layout from then on (a failure there is the model's own error and is
        raised). Only that batch can run twice.
        """
        if not (self._channels_last_works is None and self._takes_channels_last(x)):
            return step(self._laid_out(x))
        try:
            result = step(_with_strides_of(x, torch.channels_last))
        except torch.cuda.OutOfMemoryError:
            raise  # says nothing about the layout
        except Exception as error:  # any failure: retried below in the model's own layout
            refusal = error
        else:
            self._channels_last_works = True
            return result
        # Retried outside the except block: an error in the contiguous layout is then not chained to this one.
        result = step(_with_strides_of(x, torch.contiguous_format))
        self._channels_last_works = False
        log.debug(
            "%s fails on channels-last inputs (%s: %s); using its contiguous layout",
            type(self.model).__name__,
            type(refusal).__name__,
            refusal,
        )
        return result

    def _forward_batch(self, x: torch.Tensor, layer_names: Sequence[str], captured: dict[str, list]) -> dict:
        rows = x.shape[0]

        def run(laid_out: torch.Tensor) -> torch.Tensor:
            captured.clear()
            return self._check_logits(logits_of(self.model(laid_out), self.output_key), rows)

        logits = self._in_layout(x, run)  # perturbed inputs keep the layout of the gradient pass
        fields: dict[str, Any] = {"logits": logits.detach().to("cpu")}
        if self.head is not None and FEATURES in captured:
            fields["features"] = self._layer_output(captured, FEATURES, rows, False).detach().to("cpu")
        fields["layers"] = {
            name: self._layer_output(captured, name, rows, False).detach().to("cpu") for name in layer_names
        }
        return fields

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        x: Any,
        layers: Sequence[str] | str = (),
        *,
        labels: Any = None,
        progress: bool | None = None,
        desc: str = "forward",
    ) -> ModelOutputs:
        """Logits, features, head, named layers and labels of ``x``, without gradients (:func:`extract`)."""
        return extract(
            self.model,
            x,
            labels=labels,
            layers=layers,
            feature_layer=self.feature_layer,
            output_key=self.output_key,
            device=self.device,
            batch_size=self.batch_size,
            progress=self.progress if progress is None else bool(progress),
            desc=desc,
        )

    def forward_views(
        self,
        x: Any,
        views: Sequence[Any],
        *,
        labels: Any = None,
        progress: bool | None = None,
        desc: str = "view",
    ) -> Iterator[tuple[Any, ModelOutputs]]:
        """``(view, outputs)`` per test-time view of the images ``x`` (cached under ``cache_dir`` when set).

        See :func:`oodguard.views.outputs.iter_view_outputs`.
        """
        from oodguard.views.outputs import iter_view_outputs

        return iter_view_outputs(
            self.model,
            x,
            views,
            labels=labels,
            cache_dir=self.cache_dir,
            progress=self.progress if progress is None else bool(progress),
            desc=desc,
            feature_layer=self.feature_layer,
            output_key=self.output_key,
            device=self.device,
            batch_size=self.batch_size,
        )

    def input_gradients(
        self,
        x: Any,
        loss: Loss,
        *,
        layers: Sequence[str] | str = (),
        progress: bool | None = None,
    ) -> torch.Tensor:
        """``d loss_i / d x_i`` for every sample, ``[N, ...]`` like the inputs (CPU, the model's dtype).

        ``loss(logits [B, C]) -> [B]``; with ``layers`` it is called as ``loss(logits, activations)``. Exact
        per-sample gradients from batches: see the module docstring (BatchNorm must use running statistics).
        """
        batches = self.gradient_batches(x, loss, layers=layers, wrt_layers=False, progress=progress)
        return _concat_rows(batch.input_gradient for batch in batches if batch.input_gradient is not None)

    def perturb(
        self,
        x: Any,
        loss: Loss,
        epsilon: float,
        scale_by_std: bool = True,
        *,
        layers: Sequence[str] | str = (),
        progress: bool | None = None,
    ) -> torch.Tensor:
        """The ODIN step ``x~ = x - epsilon * sign(d loss/d x) / std_ch`` with ``sign(0) := +1``, ``[N, ...]``.

        The step *decreases* the loss (for ODIN's cross-entropy to the predicted class it increases that class's
        softmax score). ``std_ch`` is ``input_std`` per channel (1 when ``input_std`` is None or
        ``scale_by_std=False``). No clamping to a valid pixel range, as the official code.
        """
        epsilon = self._check_epsilon(epsilon)
        batches = self.gradient_batches(x, loss, layers=layers, wrt_layers=False, progress=progress)
        return _concat_rows(self._perturbed(batch, epsilon, scale_by_std) for batch in batches)

    def perturbed_forward(
        self,
        x: Any,
        loss: Loss,
        epsilon: float,
        scale_by_std: bool = True,
        *,
        layers: Sequence[str] | str = (),
        loss_layers: Sequence[str] | str = (),
        labels: Any = None,
        progress: bool | None = None,
        direction: Direction = sign_step,
        desc: str = "perturb",
    ) -> ModelOutputs:
        """:meth:`perturb` then a forward pass of the perturbed inputs, batch by batch on the device.

        Costs one forward with autograd, one backward to the input and one forward without autograd per batch.
        Returns the perturbed inputs' logits, features and head (when the head is known), ``layers`` and labels.
        ``loss_layers`` are given to ``loss`` as in :meth:`gradient_batches`. ``direction`` maps the input gradient
        to the unscaled step (default ODIN's ``sign(g)``; i-ODIN moves one element); the step is then divided by
        ``std_ch`` as in :meth:`perturb`.
        """
        epsilon = self._check_epsilon(epsilon)
        layer_names = [layers] if isinstance(layers, str) else list(layers)
        want = [*layer_names, *([FEATURES] if self.head is not None and FEATURES not in layer_names else [])]
        pieces: list[dict] = []
        gradients = self.gradient_batches(
            x, loss, layers=loss_layers, wrt_layers=False, labels=labels, progress=progress, desc=desc
        )
        for batch in gradients:
            perturbed = self._perturbed(batch, epsilon, scale_by_std, direction)
            # The gradient pass holds eval mode; these hooks only add a no-grad forward of the perturbed batch.
            with torch.no_grad(), self._hooks(want) as captured:
                fields = self._forward_batch(perturbed, layer_names, captured)
            if batch.labels is not None:
                fields["labels"] = batch.labels
            pieces.append(fields)
        if not pieces:
            raise ValueError("data: produced no rows")
        outputs = ModelOutputs(
            logits=torch.cat([p["logits"] for p in pieces]),
            features=torch.cat([p["features"] for p in pieces]) if "features" in pieces[0] else None,
            labels=torch.cat([p["labels"] for p in pieces]) if "labels" in pieces[0] else None,
            layers={name: torch.cat([p["layers"][name] for p in pieces]) for name in layer_names} or None,
            head=None if self.head is None else head_tensors(self.head),
        )
        outputs.array_type = "torch"
        return outputs

    def layer_gradients(
        self,
        x: Any,
        layers: Sequence[str] | str,
        loss: Loss,
        *,
        progress: bool | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Outputs of ``layers`` and the gradients of ``loss`` with respect to them, each ``[N, ...]`` (CPU).

        Forward hooks record each layer's output; one ``torch.autograd.grad`` call per batch differentiates
        ``loss(logits).sum()`` with respect to all of them. ``layers`` are module names (as in
        ``model.named_modules()``) or :data:`FEATURES` for the input of the final linear layer. Each must run
        once per forward. ``loss`` here takes the logits only (use :meth:`gradient_batches` for a loss on
        layers).
        """
        layer_names = [layers] if isinstance(layers, str) else list(layers)
        if not layer_names:
            raise ValueError("layers: name at least one layer (module names as in model.named_modules())")
        if not callable(loss):
            raise ValueError(f"loss: expected a callable (logits [B, C]) -> per-sample loss [B], got {loss!r}")
        activations: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
        gradients: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
        gradient_batches = self.gradient_batches(
            x, lambda logits, acts: loss(logits), layers=layer_names, wrt_input=False, progress=progress
        )
        for batch in gradient_batches:
            for name in layer_names:
                activations[name].append(batch.activations[name].to("cpu"))
                gradients[name].append(batch.gradients[name].to("cpu"))
        if not activations[layer_names[0]]:
            raise ValueError("data: produced no rows")
        return (
            {name: torch.cat(parts) for name, parts in activations.items()},
            {name: torch.cat(parts) for name, parts in gradients.items()},
        )


def _with_strides_of(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` with the standard strides of ``memory_format``, copied only when its own differ.

    Not ``x.contiguous(memory_format=...)``: that keeps any strides that already qualify, and with one channel (or
    1x1 images) the same strides qualify as both layouts, so a model's convolutions would pick their output layout
    from how the caller happened to slice the array.
    """
    if x.stride() == torch.empty(x.shape, device="meta", memory_format=memory_format).stride():
        return x
    return x.clone(memory_format=memory_format)


def _concat_rows(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-batch results joined on the CPU; refuses data that produced no rows."""
    parts = [part.to("cpu") for part in parts]
    if not parts:
        raise ValueError("data: produced no rows")
    return torch.cat(parts)
