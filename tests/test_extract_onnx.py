"""ONNX models through extract: logits, features and head equal to the torch model's, from a file or a session."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.detectors import create
from oodguard.extraction import extract

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def export(model: nn.Module, example: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the older one
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})  # fmt: skip
    return str(path)


class MatMulHead(nn.Module):
    """A head written as x @ W + b: MatMul then Add in the graph."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.weight = nn.Parameter(torch.randn(8, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.body(x) @ self.weight + self.bias


@pytest.mark.parametrize("kind", ["cnn", "mlp", "matmul"])
def test_onnx_outputs_equal_the_torch_model(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "cnn":
        model, data = DigitsCNN().eval(), torch.rand(20, 1, 28, 28)
    elif kind == "mlp":
        model, data = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(20, 6)
    else:
        model, data = MatMulHead().eval(), torch.randn(20, 6)
    path = export(model, data[:2], tmp_path / "model.onnx")
    labels = torch.arange(20) % 3
    from_onnx = extract(path, data, labels=labels, batch_size=7, progress=False)
    if kind == "matmul":
        with torch.no_grad():
            features = model.body(data)
        torch.testing.assert_close(from_onnx.features, features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_onnx.head[0], model.weight.detach().T)
    else:
        from_torch = extract(model, data, labels=labels, progress=False)
        for field in ("logits", "features"):
            np.testing.assert_allclose(getattr(from_onnx, field), getattr(from_torch, field), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_onnx.head[0], from_torch.head[0])
        torch.testing.assert_close(from_onnx.head[1], from_torch.head[1])
    assert torch.equal(from_onnx.labels, labels)
    reproduced = from_onnx.features @ from_onnx.head[0].T + from_onnx.head[1]
    torch.testing.assert_close(reproduced, from_onnx.logits, rtol=1e-4, atol=1e-4)
    assert np.isfinite(create("vim", dim=2).fit(from_onnx).score(from_onnx)).all()  # detectors take them as they are


def test_a_session_feature_layer_and_errors(tmp_path):
    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(10, 6)
    path = export(model, data[:2], tmp_path / "mlp.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    from_session = extract(session, data, progress=False)
    torch.testing.assert_close(from_session.logits, extract(path, data, progress=False).logits)
    import onnx

    relu_output = next(node.output[0] for node in onnx.load(path).graph.node if node.op_type == "Relu")
    named = extract(path, data, feature_layer=relu_output, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(named.features, model[1](model[0](data)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_layer: no tensor named 'nope' in the graph"):
        extract(path, data, feature_layer="nope", progress=False)
    with pytest.raises(ValueError, match="output_key='scores': the graph has outputs \\['logits'\\]"):
        extract(path, data, output_key="scores", progress=False)
    with pytest.raises(ValueError, match="cache_dir and layers: not supported for ONNX"):
        extract(path, data, cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "damaged.onnx").write_bytes(open(path, "rb").read()[:100])  # a truncated download
    with pytest.raises(ValueError, match="damaged.onnx is not a readable ONNX model"):
        extract(tmp_path / "damaged.onnx", data, progress=False)
    softmax = export(nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1)).eval(), data[:2], tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="is probabilities"):
        extract(softmax, data, progress=False)
