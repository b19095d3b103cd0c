"""ONNX models: logits, penultimate features and the head from a ``.onnx`` file or an ``onnxruntime`` session.

The features are the input of the final ``Gemm`` (or ``MatMul`` followed by ``Add``) that produces the logits,
found by walking back from the logits output, or any tensor named by ``feature_layer``; they are exposed as an
extra output of an in-memory copy of the graph, so one run gives both. The head's weight and bias are read from
the graph's initialisers (``Gemm``'s ``transB``, ``alpha`` and ``beta`` applied). Needs the ``onnx`` extra.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from oodguard.extraction.batches import Batches, check_rows
from oodguard.extraction.forward import check_logits_not_probabilities
from oodguard.outputs import ModelOutputs

__all__ = ["OnnxModel", "is_onnx_model", "extract_onnx"]


class OnnxModel(torch.nn.Module):
    """An ONNX file as a torch module, so that it can stand where a model goes (a :class:`Benchmark`, ``extract``).

    ``forward`` runs onnxruntime on CPU and returns the first output; there are no gradients through it, so model
    detectors (ODIN, CoVer, ...) do not apply. ``extract`` reads the file itself (features and head too).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"model: {self.path} is not a file")
        self._session: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            _, onnxruntime = _onnx()
            self._session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        array = x.detach().cpu().numpy()
        name = self._session.get_inputs()[0].name
        return torch.from_numpy(np.asarray(self._session.run(None, {name: array.astype(np.float32)})[0]))

    def __repr__(self) -> str:
        return f"OnnxModel({self.path!r})"


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"ONNX models need onnx and onnxruntime ({error}); pip install 'oodguard[onnx]'") from error
    return onnx, onnxruntime


def is_onnx_model(model: Any) -> bool:
    """A path to a ``.onnx`` file, an :class:`OnnxModel`, or an ``onnxruntime.InferenceSession``."""
    if isinstance(model, OnnxModel):
        return True
    if isinstance(model, (str, os.PathLike)):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "InferenceSession" and hasattr(model, "get_outputs")


def _load_proto(model: Any) -> Any:
    onnx, _ = _onnx()
    if isinstance(model, OnnxModel):
        model = model.path
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model: {path} is not a file")
        try:
            return onnx.load(str(path))
        except Exception as error:  # protobuf raises its own DecodeError for damaged or foreign files
            raise ValueError(f"model: {path} is not a readable ONNX model ({type(error).__name__}: {error})") from None
    model_path = getattr(model, "_model_path", None)
    if model_path:
        return onnx.load(str(model_path))
    data = getattr(model, "_model_bytes", None)
    if data:
        return onnx.load_from_string(data)
    return None  # a session built in a way that keeps no copy of the graph: logits only


def _initializers(graph: Any) -> dict[str, np.ndarray]:
    onnx, _ = _onnx()
    return {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}


def _attribute(node: Any, name: str, default: Any) -> Any:
    onnx, _ = _onnx()
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _linear_before(graph: Any, output: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(features tensor, weight [C, D], bias [C])`` of the Gemm or MatMul(+Add) that produces ``output``."""
    producers = {name: node for node in graph.node for name in node.output}
    weights = _initializers(graph)
    node = producers.get(output)
    while node is not None and node.op_type in ("Identity", "Flatten") and node.input[0] in producers:
        node = producers[node.input[0]]  # pass-throughs after the head
    if node is None:
        return None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in weights:
        weight = weights[node.input[1]].astype(np.float32)
        if int(_attribute(node, "transA", 0)):
            return None
        if not int(_attribute(node, "transB", 0)):
            weight = weight.T  # stored [D, C]
        weight = float(_attribute(node, "alpha", 1.0)) * weight
        bias = weights.get(node.input[2]) if len(node.input) > 2 else None
        bias_vector = np.zeros(weight.shape[0], np.float32) if bias is None else np.broadcast_to(bias, weight.shape[:1])
        return node.input[0], weight, float(_attribute(node, "beta", 1.0)) * bias_vector.astype(np.float32)
    if node.op_type == "Add":
        first, second = node.input[0], node.input[1]
        matmul_output, bias = (first, weights.get(second)) if second in weights else (second, weights.get(first))
        matmul = producers.get(matmul_output)
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in weights and bias is not None:
            weight = weights[matmul.input[1]].astype(np.float32).T  # MatMul stores [D, C]
            return matmul.input[0], weight, np.broadcast_to(bias, weight.shape[:1]).astype(np.float32)
    if node.op_type == "MatMul" and node.input[1] in weights:
        weight = weights[node.input[1]].astype(np.float32).T
        return node.input[0], weight, np.zeros(weight.shape[0], np.float32)
    return None


def extract_onnx(
    model: Any,
    data: Any,
    *,
    labels: Any = None,
    feature_layer: str | None = None,
    output_key: str | int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    desc: str | None = None,
) -> ModelOutputs:
    """:func:`oodguard.extraction.extract` for an ONNX model (a ``.onnx`` path or an ``InferenceSession``).

    ``output_key`` names the logits output (name or index; default the first output). ``feature_layer`` names a
    tensor of the graph to use as the features (default: the input of the final Gemm/MatMul). Inputs are fed to
    the graph's first input as float32 (or as they are when integer).
    """
    onnx, onnxruntime = _onnx()
    proto = _load_proto(model)
    if proto is None:
        session = model
        outputs_names = [o.name for o in session.get_outputs()]
    else:
        outputs_names = [o.name for o in proto.graph.output]
    if output_key is None:
        logits_name = outputs_names[0]
    elif isinstance(output_key, int) and not isinstance(output_key, bool):
        if not -len(outputs_names) <= output_key < len(outputs_names):
            raise ValueError(f"output_key={output_key}: the graph has outputs {outputs_names}")
        logits_name = outputs_names[output_key]
    elif output_key in outputs_names:
        logits_name = str(output_key)
    else:
        raise ValueError(f"output_key={output_key!r}: the graph has outputs {outputs_names}")
    head: tuple[np.ndarray, np.ndarray] | None = None
    features_name: str | None = None
    if proto is not None:
        found = _linear_before(proto.graph, logits_name)
        tensors = {name for node in proto.graph.node for name in node.output} | {i.name for i in proto.graph.input}
        if feature_layer is not None:
            if feature_layer not in tensors:
                shown = ", ".join(sorted(tensors)[:40])
                raise ValueError(f"feature_layer: no tensor named {feature_layer!r} in the graph; tensors: {shown}")
            features_name = feature_layer
            if found is not None and found[0] == feature_layer:
                head = (found[1], found[2])
        elif found is not None:
            features_name, head = found[0], (found[1], found[2])
        else:
            warnings.warn(
                "extract: no Gemm or MatMul produces the ONNX graph's logits, so only logits are extracted; pass "
                "feature_layer= naming the tensor that holds the features",
                stacklevel=3,
            )
        if features_name is not None and features_name not in outputs_names:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(features_name, onnx.TensorProto.FLOAT, None))
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    elif feature_layer is not None:
        raise ValueError("feature_layer: this InferenceSession keeps no copy of its graph; give the .onnx path instead")
    input_name = session.get_inputs()[0].name
    wanted = [logits_name] + ([features_name] if features_name is not None else [])
    batches = Batches(data, labels, batch_size)
    collected: dict[str, list[torch.Tensor]] = {"logits": [], "features": [], "labels": []}
    first = True
    for index, (inputs, batch_labels) in enumerate(
        tqdm(batches, total=batches.num_batches(), desc=desc or "extract", unit="batch", disable=not progress)
    ):
        if isinstance(inputs, dict):
            raise ValueError("data: dict batches are not supported for ONNX models yet; feed one input tensor")
        rows = inputs.shape[0]
        if rows == 0:
            continue
        array = inputs.detach().cpu().numpy()
        if array.dtype.kind == "f":
            array = array.astype(np.float32, copy=False)
        results = session.run(wanted, {input_name: array})
        logits = check_rows(
            torch.from_numpy(np.asarray(results[0], dtype=np.float32)), rows, f"batch {index}: logits", ""
        )
        if logits.ndim != 2:
            raise ValueError(
                f"batch {index}: the ONNX output {logits_name!r} has shape {tuple(logits.shape)}; expected [B, C]"
            )
        if first:
            check_logits_not_probabilities(logits, f"batch {index}")
            first = False
        collected["logits"].append(logits)
        if features_name is not None:
            features = torch.from_numpy(np.asarray(results[1], dtype=np.float32))
            collected["features"].append(check_rows(features, rows, f"feature_layer {features_name!r}", "").flatten(1))
        if batch_labels is not None:
            collected["labels"].append(batch_labels)
    if not collected["logits"]:
        raise ValueError("data: produced no rows; nothing to extract")
    outputs = ModelOutputs(
        logits=torch.cat(collected["logits"]),
        features=torch.cat(collected["features"]) if collected["features"] else None,
        labels=torch.cat(collected["labels"]) if collected["labels"] else None,
        head=None
        if head is None
        else (torch.from_numpy(np.ascontiguousarray(head[0])), torch.from_numpy(np.ascontiguousarray(head[1]))),
    )
    outputs.array_type = "torch"
    return outputs
