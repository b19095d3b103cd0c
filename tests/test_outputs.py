import numpy as np
import pytest
import torch

from oodguard import ModelOutputs
from oodguard.outputs import as_outputs


def make(n=6, c=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(c, d)).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    features = rng.normal(size=(n, d)).astype(np.float32)
    return ModelOutputs(
        logits=features @ weight.T + bias,
        features=features,
        labels=np.arange(n) % c,
        layers={"block": rng.normal(size=(n, 2, 3, 3)).astype(np.float32)},
        head=(weight, bias),
    )


def test_fields_and_dims():
    out = make()
    assert len(out) == 6 and out.num_classes == 3 and out.feature_dim == 4
    assert out.fields() == ["logits", "features", "labels", "layers", "head"]
    assert out.array_type == "numpy"
    assert ModelOutputs(logits=torch.zeros(2, 3)).array_type == "torch"


def test_dtypes_are_normalised():
    out = ModelOutputs(logits=np.zeros((2, 3), dtype=np.float16), labels=np.array([0.0, 1.0]))
    assert out.logits.dtype == torch.float32 and out.labels.dtype == torch.int64
    assert ModelOutputs(features=np.zeros((2, 3))).features.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logits": np.zeros(3)}, "logits: expected shape"),
        ({"features": np.zeros((2, 3, 4))}, "features: expected shape"),
        ({"labels": np.zeros((2, 2), dtype=int)}, "labels: expected shape"),
        ({"logits": np.array([[0.0, np.nan]])}, "logits: contains 1 NaN"),
        ({"features": np.array([[np.inf, 0.0]])}, "features: contains 1 NaN or infinite"),
        ({"logits": np.zeros((2, 3)), "features": np.zeros((3, 4))}, "disagree on the number of samples"),
        ({"labels": np.array([0.5, 1.0])}, "non-integer"),
        ({"labels": np.array([True, False])}, "integer class ids"),
        ({"logits": np.array([["a", "b"]])}, "numeric array"),
        ({"logits": np.zeros((2, 3)), "head": (np.zeros((4, 5)), np.zeros(4))}, "logits have C=3"),
        ({"features": np.zeros((2, 3)), "head": (np.zeros((4, 5)), np.zeros(4))}, "features have D=3"),
        ({"head": (np.zeros((4, 5)), np.zeros(3))}, "bias has 3"),
        ({"head": np.zeros((4, 5))}, "head: expected a pair"),
        ({"layers": {"a": np.zeros(3)}}, "layers\\['a'\\]"),
        ({"logits": "abc"}, "logits: expected a numpy array"),
    ],
)
def test_bad_input_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelOutputs(**kwargs)


def test_slicing_masks_and_ood_rows():
    out = ModelOutputs(features=np.arange(10.0).reshape(5, 2), labels=np.array([0, 1, -1, 0, -1]))
    assert len(out[1:3]) == 2
    assert torch.equal(out[np.array([4, 0])].features, torch.tensor([[8.0, 9.0], [0.0, 1.0]], dtype=torch.float64))
    assert out.is_ood.tolist() == [False, False, True, False, True]
    assert out.id_only().labels.tolist() == [0, 1, 0]
    assert len(out[-1]) == 1 and out[-1].labels.tolist() == [-1]
    with pytest.raises(IndexError):
        out[torch.tensor([True, False])]


def test_concat_round_trip_and_mismatch():
    out = make(n=8)
    joined = ModelOutputs.concat([out[:3], out[3:]])
    assert torch.equal(joined.features, out.features) and torch.equal(joined.layers["block"], out.layers["block"])
    assert joined.array_type == "numpy"
    with pytest.raises(ValueError, match="same fields"):
        ModelOutputs.concat([out, ModelOutputs(logits=out.logits)])
    with pytest.raises(ValueError, match="no ModelOutputs"):
        ModelOutputs.concat([])


def test_save_load_round_trip(tmp_path):
    out = make()
    out.save(tmp_path / "o.safetensors")
    back = ModelOutputs.load(tmp_path / "o.safetensors")
    for field in ("logits", "features", "labels"):
        assert torch.equal(getattr(back, field), getattr(out, field))
    assert torch.equal(back.layers["block"], out.layers["block"])
    assert torch.equal(back.head[0], out.head[0]) and back.array_type == "numpy"


def test_load_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="foreign.safetensors was not written by oodguard"):
        ModelOutputs.load(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file format")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        ModelOutputs.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        ModelOutputs.load(tmp_path / "missing.safetensors")


def test_load_refuses_unknown_version(tmp_path):
    import json

    from safetensors.torch import save_file

    header = {"format": "oodguard.ModelOutputs", "format_version": 99, "layer_names": []}
    save_file({"logits": torch.zeros(2, 2)}, str(tmp_path / "v.safetensors"), metadata={"oodguard": json.dumps(header)})
    with pytest.raises(ValueError, match="version 99"):
        ModelOutputs.load(tmp_path / "v.safetensors")


def write_first_release(outputs, path):
    """ModelOutputs.save of the first release, line for line: a "format" header, no kind, no digest."""
    import json

    from safetensors.torch import save_file

    tensors = {f: getattr(outputs, f).contiguous().cpu() for f in ("logits", "features", "labels")}
    for index, value in enumerate(outputs.layers.values()):
        tensors[f"layers.{index}"] = value.contiguous().cpu()
    tensors["head.weight"] = outputs.head[0].contiguous().cpu()
    tensors["head.bias"] = outputs.head[1].contiguous().cpu()
    header = {
        "format": "oodguard.ModelOutputs",
        "format_version": 1,
        "layer_names": list(outputs.layers),
        "array_type": outputs.array_type,
        "num_rows": len(outputs),
    }
    save_file(tensors, str(path), metadata={"oodguard": json.dumps(header)})


def test_files_of_the_first_release_still_load(tmp_path):
    from oodguard.outputs import read_outputs

    out = make()
    write_first_release(out, tmp_path / "old.safetensors")
    for back in (ModelOutputs.load(tmp_path / "old.safetensors"), read_outputs(tmp_path / "old.safetensors")):
        for field in ("logits", "features", "labels"):
            assert torch.equal(getattr(back, field), getattr(out, field))
        assert torch.equal(back.layers["block"], out.layers["block"]) and torch.equal(back.head[1], out.head[1])
        assert back.array_type == "numpy"


def test_read_outputs_refuses_an_edited_outputs_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from oodguard.outputs import read_outputs

    make().save(tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["logits"][0, 0] += 1
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="modified after it was written"):
        read_outputs(tmp_path / "o.safetensors")


def test_as_outputs_from_mapping_and_npz(tmp_path):
    np.savez(tmp_path / "o.npz", logits=np.zeros((3, 2)), labels=np.array([0, 1, 0]))
    out = as_outputs(np.load(tmp_path / "o.npz"))
    assert len(out) == 3 and out.num_classes == 2
    with pytest.raises(ValueError, match="unknown output field"):
        as_outputs({"logit": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="expected a ModelOutputs"):
        as_outputs(np.zeros(3))


def test_numpy_and_tensor_integer_indices_keep_the_row_dimension():
    out = make()
    for index in (np.int64(2), torch.tensor(2), 2):
        row = out[index]
        assert len(row) == 1 and row.logits.shape == (1, 3)
        assert torch.equal(row.logits, out.logits[2:3])
