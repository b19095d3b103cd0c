"""Run a torch model over a dataset once and collect what detectors need into :class:`ModelOutputs`.

:func:`extract` produces the logits, the penultimate features (the input of the final linear layer),
the final linear layer itself (the *head*), any named intermediate layers (forward hooks) and the labels,
for inputs given as a ``DataLoader``, a ``Dataset``, an iterable of batches, or arrays. With
``cache_dir`` the outputs stream to disk in chunks and are reused on the next call with the same model,
data and layers; the cache key makes a stale entry impossible to hit silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from oodguard import persist
from oodguard.extraction.batches import Batches, KeywordInputs, check_rows
from oodguard.extraction.fingerprint import ContentHash, content_hash, model_fingerprint, tensor_bytes
from oodguard.extraction.forward import check_logits_not_probabilities, logits_of, pooled_features
from oodguard.extraction.modules import (
    check_head,
    check_model_device,
    find_head,
    get_module,
    head_tensors,
    resolve_device,
)
from oodguard.extraction.onnx_model import extract_onnx, is_onnx_model
from oodguard.outputs import ModelOutputs
from oodguard.ray_support import check_engine
from oodguard.shards import ShardWriter, write_shards

__all__ = ["extract", "find_head", "model_fingerprint", "content_hash", "CACHE_FORMAT_VERSION"]

#: Version of the on-disk cache layout; part of every cache key, so a layout change never reads old entries.
CACHE_FORMAT_VERSION = 1
_COMPLETE = "complete.json"
_HEAD_FILE = "head.safetensors"


# ---------------------------------------------------------------------------------------------- collecting
class _Collector:
    """Gathers per-batch outputs; with a directory, writes a part file every ``chunk_rows`` rows."""

    def __init__(self, directory: Path | None, chunk_rows: int, layer_names: Sequence[str]) -> None:
        self.directory = directory
        self.chunk_rows = chunk_rows
        self.layer_names = list(layer_names)
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered_rows = 0
        self.rows = 0
        self.parts: list[str] = []

    def add(self, fields: dict[str, torch.Tensor]) -> None:
        for key, value in fields.items():
            self.buffer.setdefault(key, []).append(value)
        rows = next(iter(fields.values())).shape[0]
        self.buffered_rows += rows
        self.rows += rows
        if self.directory is not None and self.buffered_rows >= self.chunk_rows:
            joined = self._take_all()
            start = 0
            while self.buffered_rows - start >= self.chunk_rows:
                self._write({key: value[start : start + self.chunk_rows] for key, value in joined.items()})
                start += self.chunk_rows
            self.buffer = {key: [value[start:]] for key, value in joined.items()} if start < self.buffered_rows else {}
            self.buffered_rows -= start

    def _take_all(self) -> dict[str, torch.Tensor]:
        joined = {key: values[0] if len(values) == 1 else torch.cat(values) for key, values in self.buffer.items()}
        self.buffer = {}
        return joined

    def _outputs(self, fields: dict[str, torch.Tensor]) -> ModelOutputs:
        layers = {name: fields[f"layer:{name}"] for name in self.layer_names}
        return ModelOutputs(
            logits=fields["logits"],
            features=fields.get("features"),
            labels=fields.get("labels"),
            layers=layers or None,
        )

    def _write(self, fields: dict[str, torch.Tensor]) -> None:
        assert self.directory is not None
        name = f"part-{len(self.parts):05d}.safetensors"
        self._outputs(fields).save(self.directory / name)
        self.parts.append(name)

    def finish(self) -> ModelOutputs | None:
        """In memory: all outputs (without head). On disk: flushes the last part and returns None."""
        if self.directory is None:
            return self._outputs(self._take_all()) if self.rows else None
        if self.buffered_rows:
            self._write(self._take_all())
            self.buffered_rows = 0
        return None


class _ShardCollector(_Collector):
    """Writes every ``chunk_rows`` rows as one shard of an ``out_dir`` folder."""

    def __init__(self, writer: ShardWriter, chunk_rows: int, layer_names: Sequence[str]) -> None:
        super().__init__(writer.directory, chunk_rows, layer_names)
        self.writer = writer

    def _write(self, fields: dict[str, torch.Tensor]) -> None:
        self.writer.write(self._outputs(fields))


def _linear_producing(calls: list[tuple[str, nn.Linear, Any, Any]], logits: torch.Tensor) -> int | None:
    """Index of the last linear layer called whose output is the model's logits, if any."""
    scale = 1e-5 * (1.0 + float(logits.abs().max()))
    for index in range(len(calls) - 1, -1, -1):
        output = calls[index][3]
        if isinstance(output, torch.Tensor) and output.shape == logits.shape:
            if float((output.to(logits.dtype) - logits).abs().max()) <= scale:
                return index
    return None


def _maps_to(linear: nn.Linear, features: torch.Tensor, logits: torch.Tensor) -> bool:
    if features.ndim != 2 or features.shape[1] != linear.in_features:
        return False
    predicted = nn.functional.linear(features.to(linear.weight.dtype), linear.weight, linear.bias).to(logits.dtype)
    return predicted.shape == logits.shape and bool(
        (predicted - logits).abs().max() <= 1e-3 * (1.0 + float(logits.abs().max()))
    )


def _no_head_warning(model: nn.Module) -> None:
    last = type(list(model.modules())[-1]).__name__
    warnings.warn(
        f"extract: no nn.Linear layer of {type(model).__name__} outputs its logits (its last module is a {last}; a "
        "cosine or scaled classifier, or a softmax after the head?), so only the logits are extracted and detectors "
        "that need features or the head (knn, vim, mahalanobis, ...) will refuse them. Pass feature_layer= naming "
        "the final linear layer, or the module whose output are the features",
        stacklevel=4,
    )


def _run(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    total: int | None,
    device: torch.device,
    input_dtype: torch.dtype | None,
    layer_names: Sequence[str],
    head: tuple[str, nn.Linear] | None,
    head_found_automatically: bool,
    feature_module: tuple[str, nn.Module] | None,
    output_key: str | int | None,
    collector: _Collector,
    content_hash: ContentHash | None,
    progress: bool,
    desc: str | None,
) -> tuple[str, nn.Linear] | None:
    """Run the model over every batch into ``collector``; returns the head (found on the first batch when the
    model's last module is not its final linear layer)."""
    captured: dict[str, Any] = {}
    handles = []
    # Without a head or a feature module named, the first batch looks for the linear layer that outputs the logits.
    search_head = head is None and feature_module is None and head_found_automatically
    linear_calls: list[tuple[str, nn.Linear, Any, Any]] = []

    def layer_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # clone: a later in-place op (ReLU(inplace=True)) must not change what was recorded, and a layer
            # that is a view of the features must not share their memory. A module called twice keeps its last.
            captured[f"layer:{name}"] = output.detach().clone() if isinstance(output, torch.Tensor) else output

        return hook

    def feature_hook(module: nn.Module, args: tuple) -> None:
        value = args[0] if args else None
        if isinstance(value, torch.Tensor):
            captured["features"] = value.detach().clone()

    def feature_module_hook(module: nn.Module, args: Any, output: Any) -> None:
        captured["feature_output"] = output.detach().clone() if isinstance(output, torch.Tensor) else output

    def linear_search_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = args[0] if args else None
            if isinstance(value, torch.Tensor) and isinstance(module, nn.Linear):
                linear_calls.append((name, module, value.detach().clone(), output.detach()))

        return hook

    modes = [(module, module.training) for module in model.modules()]
    search_handles = []
    try:
        for name in layer_names:
            handles.append(get_module(model, name, "layers").register_forward_hook(layer_hook(name)))
        if head is not None:
            handles.append(head[1].register_forward_pre_hook(feature_hook))
        if feature_module is not None:
            handles.append(feature_module[1].register_forward_hook(feature_module_hook))
        if search_head:
            search_handles = [
                module.register_forward_hook(linear_search_hook(name))
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear)
            ]
        model.eval()
        head_checked = False
        first = True
        with torch.no_grad():
            iterator = tqdm(batches, total=total, desc=desc or "extract", unit="batch", disable=not progress)
            for index, (inputs, labels) in enumerate(iterator):
                if inputs.shape[0] == 0:
                    continue
                if content_hash is not None:
                    content_hash.update(inputs, labels)
                rows = inputs.shape[0]
                captured.clear()
                x = inputs.to(device)
                if input_dtype is not None and x.dtype.is_floating_point and x.dtype != input_dtype:
                    x = x.to(input_dtype)
                logits = logits_of(model(**x) if isinstance(x, KeywordInputs) else model(x), output_key)
                fix = "wrap the model so that forward returns the logits tensor [B, C], or pass output_key="
                check_rows(logits, rows, f"batch {index}: the model output", fix)
                if logits.ndim != 2:
                    raise ValueError(
                        f"batch {index}: the model output has shape {tuple(logits.shape)}; logits must be [B, C]. {fix}"
                    )
                if first:
                    check_logits_not_probabilities(logits, f"batch {index}")
                    if search_head:
                        for handle in search_handles:
                            handle.remove()
                        search_handles = []
                        found = _linear_producing(linear_calls, logits)
                        if found is None:
                            _no_head_warning(model)
                        else:
                            name, module, features_in, _ = linear_calls[found]
                            head = (name, module)
                            captured["features"] = features_in
                            handles.append(module.register_forward_pre_hook(feature_hook))
                        linear_calls.clear()
                    first = False
                fields = {"logits": logits.detach().to("cpu", torch.float32)}
                if feature_module is not None:
                    if "feature_output" not in captured:
                        raise ValueError(
                            f"feature_layer: the module {feature_module[0]!r} was not called during forward"
                        )
                    features = pooled_features(captured["feature_output"], feature_module[0])
                    check_rows(features, rows, f"feature_layer: the output of {feature_module[0]!r}", "")
                    if head is not None and not head_checked:
                        # the final linear layer is the head only if it maps these features to the logits
                        if not _maps_to(head[1], features, logits):
                            head = None
                        head_checked = True
                    fields["features"] = features.detach().to("cpu", torch.float32)
                elif head is not None:
                    how = "found automatically" if head_found_automatically else "given as feature_layer"
                    if "features" not in captured:
                        raise ValueError(
                            f"the final linear layer {head[0]!r} ({how}) was not called during forward; "
                            "pass feature_layer= naming the linear layer that produces the logits"
                        )
                    features = check_rows(
                        captured["features"], rows, f"the input of the final linear layer {head[0]!r}", ""
                    )
                    if features.ndim != 2:
                        raise ValueError(
                            f"the input of the final linear layer {head[0]!r} ({how}) has shape "
                            f"{tuple(features.shape)}; features must be [B, D]. Pass feature_layer= naming the "
                            "linear layer that maps [B, D] features to the [B, C] logits"
                        )
                    if not head_checked:
                        check_head(head, features, logits, how)
                        head_checked = True
                    fields["features"] = features.detach().to("cpu", torch.float32)
                for name in layer_names:
                    key = f"layer:{name}"
                    if key not in captured:
                        raise ValueError(f"layers: the module {name!r} was not called during forward")
                    fix = "pick a submodule whose output is a single tensor with the batch first"
                    value = check_rows(captured[key], rows, f"layers: the output of {name!r}", fix)
                    fields[key] = value.detach().to("cpu", torch.float32)
                if labels is not None:
                    fields["labels"] = labels
                collector.add(fields)
    finally:
        for handle in handles + search_handles:
            handle.remove()
        for submodule, training in modes:
            submodule.training = training
    return head


# ---------------------------------------------------------------------------------------------- cache
def _load_entry(entry: Path, key: str) -> ModelOutputs:
    meta = json.loads((entry / _COMPLETE).read_text())
    if meta.get("format") != "oodguard.extraction.extract-cache" or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"unsupported cache format {meta.get('format')!r} version {meta.get('format_version')!r}")
    if meta.get("key") != key:
        raise ValueError(f"the entry records key {meta.get('key')!r}")
    outputs = _load_parts(entry, meta["parts"], bool(meta.get("head")))
    if len(outputs) != meta["num_rows"]:
        raise ValueError(f"the parts hold {len(outputs)} rows, complete.json records {meta['num_rows']}")
    return outputs


def _load_parts(directory: Path, parts: Sequence[str], has_head: bool) -> ModelOutputs:
    outputs = ModelOutputs.concat([ModelOutputs.load(directory / name) for name in parts])
    if has_head:
        outputs = outputs.with_fields(head=ModelOutputs.load(directory / _HEAD_FILE).head)
    outputs.array_type = "torch"
    return outputs


def _commit(temporary: Path, entry: Path) -> None:
    """Move a finished temporary directory into place (complete.json is already inside it)."""
    if entry.exists():
        if (entry / _COMPLETE).is_file():  # another process finished the same key first
            shutil.rmtree(temporary, ignore_errors=True)
            return
        shutil.rmtree(entry)
    os.replace(temporary, entry)


# ---------------------------------------------------------------------------------------------- extract
def extract(
    model: nn.Module | str | os.PathLike | Any,
    data: Any,
    *,
    labels: Any = None,
    layers: Sequence[str] | str = (),
    feature_layer: str | None = None,
    output_key: str | int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    dataset_key: str | None = None,
    chunk_rows: int = 8192,
    desc: str | None = None,
    out_dir: str | os.PathLike | None = None,
    engine: str = "local",
    num_workers: int | None = None,
    address: str | None = None,
) -> Any:
    """Run ``model`` once over ``data`` and return logits, features, head, layers and labels.

    Parameters
    ----------
    model : torch.nn.Module, a ``.onnx`` path or an ``onnxruntime.InferenceSession``
        An ONNX model runs in onnxruntime (``pip install 'oodguard[onnx]'``): the features are the input of the
        final Gemm/MatMul, exposed as an extra output of the graph, and the head is read from its initialisers
        (see :mod:`oodguard.extraction.onnx_model`; no ``cache_dir`` or ``layers``). A torch module is any
        module whose ``forward`` takes one tensor batch and returns the logits ``[B, C]``: as a tensor, or
        inside a dict, a tuple or namedtuple, or a Hugging Face ``ModelOutput`` (see ``output_key``). Outputs
        that are probabilities or log-probabilities (every row sums to one) are refused: detectors need the
        logits before the softmax. The model must already be on ``device`` (it is never moved). It runs in
        ``eval()`` mode under ``torch.no_grad()``; the training flag of every submodule is restored afterwards,
        also on error.
    data : DataLoader, Dataset, iterable of batches, or array
        A ``DataLoader`` is iterated as is; a ``Dataset`` is wrapped in ``DataLoader(data, batch_size,
        shuffle=False)``; an array (numpy or torch) of inputs ``[N, ...]`` is cut into batches. Otherwise
        ``data`` is an iterable whose batches are a tensor of inputs, ``(inputs,)`` or ``(inputs, labels)``.
        Models with several inputs are not supported yet (wrap them to take one tensor). Floating inputs are
        cast to the floating dtype of the model's parameters; integer inputs (token ids) are left as they are.
    labels : integer array ``[N]``, optional
        Labels when the batches carry none (a negative label marks an OOD row). Giving labels both here and
        in the batches is an error.
    layers : sequence of str
        Module names (as in ``model.named_modules()``) whose outputs to record, each kept at its full shape
        ``[N, ...]`` in ``outputs.layers[name]``. Each must return one tensor with the batch first.
    feature_layer : str, optional
        A module name. An ``nn.Linear``: the final linear layer; its input becomes ``features`` and its
        ``(weight, bias)`` the head (bias zeros when the layer has none). Any other module: its output, pooled to
        one row per input (``[B, D]`` as is, ``[B, C, H, W]`` averaged over positions, ``[B, T, D]`` averaged
        over tokens, other ranks flattened), becomes ``features``; the head is then the model's final linear
        layer if it maps those features to the logits (checked on the first batch), else there is none. When
        omitted the head is the model's last module if it is an ``nn.Linear``, else the linear layer whose
        output is the logits (found on the first batch); when there is none (a cosine classifier, say) only
        logits are extracted, with a warning naming ``feature_layer``. A warning is also given when the logits
        differ from ``features @ weight.T + bias`` (a model that rescales its logits).
    output_key : str or int, optional
        Where the logits are in the model's output: a key of a dict or ``ModelOutput``, a field of a namedtuple,
        an index of a tuple. Default: ``"logits"`` (or the only tensor) of a dict, the ``logits`` field of a
        namedtuple, the first item of a tuple, the ``.logits`` attribute of other objects.
    device : "cpu", "cuda", "cuda:N", "mps" or torch.device
        Where the model runs; inputs are moved there, outputs come back to the CPU as float32.
    batch_size : int
        Batch size for datasets and arrays (a given DataLoader keeps its own).
    progress : bool
        Show a tqdm progress bar (with ``desc`` as its label).
    cache_dir : path, optional
        Cache the outputs under ``cache_dir/<key>/`` and reuse them on a later call with the same key. The key
        is a sha256 over (a) :func:`model_fingerprint` (class, structure, every weight), (b) the data and (c)
        ``layers`` and the final linear layer's name. By default (b) is the content hash of every input batch
        and label fed to the model, after any transform, so a changed pixel, label or transform always misses;
        this costs a first pass over the data without the model (the model then runs only on a miss, and the
        hash is checked again during that run: data that changes between passes, e.g. a random augmentation,
        is extracted but not cached, with a warning). ``data`` must then be re-iterable (not a generator).
    dataset_key : str, optional
        A string naming the dataset and its transform, used for (b) instead of the content hash, which skips
        the extra pass. **You are then responsible for changing it whenever the data or transform change**;
        the model and layers are still fingerprinted. Labels given as ``labels=`` are always hashed.
    chunk_rows : int
        With ``cache_dir``, outputs are written to ``part-00000.safetensors``, ``part-00001...`` every
        ``chunk_rows`` rows while the model runs, so memory holds at most one chunk during extraction.
        ``complete.json`` is written last and the entry appears under its key only once complete, so an
        interrupted run is never a cache hit.
    desc : str, optional
        Label of the progress bar.
    out_dir : path, optional
        Write the outputs as a shard folder (``shard-00000.safetensors`` every ``chunk_rows`` rows, the head, and a
        ``manifest.json`` written last) while the model runs, and return them memory-mapped
        (:class:`~oodguard.shards.ShardedOutputs`, see :meth:`ModelOutputs.open`): memory holds one shard, whatever
        the number of rows. The folder must be new, empty or an earlier shard folder (replaced).
    engine : "local" or "ray"
        ``"ray"`` (``pip install 'oodguard[ray]'``; needs ``out_dir``) runs the shards on a pool of Ray actors with
        Ray Data ``map_batches``: each actor builds the model once, from the module (copied to it) or from a
        factory (``model`` given as ``'package.module:function'`` or an importable function), and on ``device``
        ``"cuda"`` takes one GPU. It uses the Ray this process is connected to (``ray.init(address=...)``, or
        ``address=``) and starts a local one only when there is none. ``data`` must be readable by row index (an
        array, a dict of arrays, a map-style Dataset, or an in-order DataLoader over one). The result equals local
        extraction; a failing shard raises one RuntimeError naming the shard and the cause.
    num_workers : int, optional
        Actors in the pool (``engine="ray"``; default: the cluster's CPUs).
    address : str, optional
        The Ray cluster to connect to (``engine="ray"``), when not connected yet.

    Returns
    -------
    ModelOutputs, or ShardedOutputs with ``out_dir``
        With ``array_type == "torch"``: ``logits [N, C]``, and where available ``features [N, D]``, ``head``,
        ``layers`` and ``labels [N]``.

    Raises
    ------
    ValueError
        A layer or feature_layer name that does not exist (the message lists the available names), an
        unavailable device, a model on another device, malformed batches or labels, non-finite outputs.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> out = extract(model, torch.randn(10, 4), labels=torch.arange(10) % 3, layers=["1"], progress=False)
    >>> out.logits.shape, out.features.shape, out.layers["1"].shape, out.head[0].shape
    (torch.Size([10, 3]), torch.Size([10, 8]), torch.Size([10, 8]), torch.Size([3, 8]))
    """
    check_engine(engine)
    if engine == "ray" or num_workers is not None or address is not None:
        if engine != "ray":
            raise ValueError("num_workers and address: only for engine='ray'; pass engine='ray' or leave them out")
        if out_dir is None:
            raise ValueError("engine='ray' writes shards: give out_dir= (a folder the workers' results are written to)")
        if cache_dir is not None:
            raise ValueError("cache_dir: not with engine='ray' (out_dir keeps the outputs); leave it out")
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows!r}")
        from oodguard.extraction.ray_extract import extract_on_ray

        options = dict(layers=layers, feature_layer=feature_layer, output_key=output_key, batch_size=batch_size)
        return extract_on_ray(
            model, data, labels=labels, out_dir=out_dir, num_workers=num_workers, chunk_rows=chunk_rows,
            address=address, device=str(device), progress=progress, desc=desc, options=options,
        )  # fmt: skip
    if out_dir is not None and cache_dir is not None:
        raise ValueError("out_dir and cache_dir: give one (out_dir keeps the outputs as shards)")
    if is_onnx_model(model):  # a .onnx file or an onnxruntime session: run by onnxruntime
        if cache_dir is not None or layers:
            raise ValueError("cache_dir and layers: not supported for ONNX models yet; leave them out")
        onnx_outputs = extract_onnx(
            model, data, labels=labels, feature_layer=feature_layer, output_key=output_key, batch_size=batch_size,
            progress=progress, desc=desc,
        )  # fmt: skip
        return onnx_outputs if out_dir is None else write_shards(onnx_outputs, out_dir, chunk_rows)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, a .onnx path or an onnxruntime session, got "
                        f"{type(model).__name__}")  # fmt: skip
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows!r}")
    if dataset_key is not None and (not isinstance(dataset_key, str) or not dataset_key.strip()):
        raise ValueError("dataset_key: expected a non-empty string naming the dataset and its transform")
    resolved_device = resolve_device(device)
    input_dtype = check_model_device(model, resolved_device)

    layer_names = [layers] if isinstance(layers, str) else list(layers)
    duplicates = sorted({name for name in layer_names if layer_names.count(name) > 1})
    if duplicates:
        raise ValueError(f"layers: {duplicates} requested more than once; give each layer name once")
    for name in layer_names:
        get_module(model, name, "layers")
    feature_module: tuple[str, nn.Module] | None = None
    if feature_layer is not None and not isinstance(get_module(model, feature_layer, "feature_layer"), nn.Linear):
        # any module: its output, pooled, are the features; the final linear layer is the head if it reads them
        feature_module = (feature_layer, get_module(model, feature_layer, "feature_layer"))
        head = find_head(model)
    else:
        head = find_head(model, feature_layer)
    batches = Batches(data, labels, batch_size)
    total = batches.num_batches()
    run_args: dict[str, Any] = dict(
        total=total,
        device=resolved_device,
        input_dtype=input_dtype,
        layer_names=layer_names,
        head=head,
        head_found_automatically=feature_layer is None,
        feature_module=feature_module,
        output_key=output_key,
        progress=progress,
        desc=desc,
    )

    if out_dir is not None:
        writer = ShardWriter(out_dir)
        shard_collector = _ShardCollector(writer, chunk_rows, layer_names)
        head = _run(model, batches, collector=shard_collector, content_hash=None, **run_args)
        shard_collector.finish()
        if not shard_collector.rows:
            raise ValueError("data: produced no rows; nothing to extract")
        if head is not None:
            writer.set_head(head_tensors(head))
        return writer.close(extra={"engine": "local", "rows_per_shard": chunk_rows})

    if cache_dir is None:
        collector = _Collector(None, chunk_rows, layer_names)
        head = _run(model, batches, collector=collector, content_hash=None, **run_args)
        outputs = collector.finish()
        if outputs is None:
            raise ValueError("data: produced no rows; nothing to extract")
        if head is not None:
            outputs = outputs.with_fields(head=head_tensors(head))
        outputs.array_type = "torch"
        return outputs

    # ---- cached extraction
    key_data: dict[str, Any] = {}
    first_pass: ContentHash | None = None
    if dataset_key is None:
        if batches.one_shot:
            raise ValueError(
                "cache_dir: data is a one-shot iterator (e.g. a generator), but the content hash needs a first pass "
                "over the data; pass a list, Dataset or DataLoader, or give dataset_key="
            )
        first_pass = ContentHash()
        label = f"{desc or 'extract'}: hashing inputs"
        hashing = tqdm(batches, total=total, desc=label, unit="batch", disable=not progress, leave=False)
        for inputs, batch_labels in hashing:
            if inputs.shape[0]:
                first_pass.update(inputs, batch_labels)
        key_data = {"content": first_pass.hexdigest()}
    else:
        key_data = {"dataset_key": dataset_key}
        if batches.labels is not None:
            key_data["labels"] = hashlib.sha256(tensor_bytes(batches.labels)).hexdigest()
    key_payload = {
        "cache_format": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "data": key_data,
        "layers": layer_names,
        # the head's name; a named module that is not linear; or a marker for "the linear layer that outputs the
        # logits, found on the first batch" (older entries of such models hold no features: a new key)
        "feature_layer": feature_layer if feature_module is not None else head[0] if head else "(found by its output)",
    }
    if output_key is not None:  # only when given, so that existing entries keep their keys
        key_payload["output_key"] = output_key
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir)
    entry = root / key
    if (entry / _COMPLETE).is_file():
        try:
            return _load_entry(entry, key)
        except Exception as error:  # a damaged entry is rebuilt, never trusted
            warnings.warn(f"cache entry {entry} is damaged ({error}); extracting again", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        collector = _Collector(temporary, chunk_rows, layer_names)
        second_pass = None if first_pass is None else ContentHash()
        head = _run(model, batches, collector=collector, content_hash=second_pass, **run_args)
        collector.finish()
        if not collector.rows:
            raise ValueError("data: produced no rows; nothing to extract")
        if head is not None:
            ModelOutputs(head=head_tensors(head)).save(temporary / _HEAD_FILE)
        outputs = _load_parts(temporary, collector.parts, head is not None)
        if second_pass is not None and second_pass.hexdigest() != key_data["content"]:
            warnings.warn(
                "cache_dir: the data differed between the hashing pass and the extraction pass (a random transform "
                "or changing files?), so these outputs are not cached; use a deterministic transform or dataset_key=",
                stacklevel=2,
            )
            shutil.rmtree(temporary, ignore_errors=True)
            return outputs
        meta = {
            "format": "oodguard.extraction.extract-cache",
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "key_payload": key_payload,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "num_rows": collector.rows,
            "parts": collector.parts,
            "head": head is not None,
            "chunk_rows": chunk_rows,
        }
        persist.write_json_atomic(temporary / _COMPLETE, meta)
        _commit(temporary, entry)
        return outputs
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
