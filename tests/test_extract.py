import copy
import json
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodguard import ModelOutputs
from oodguard.extraction.extract import extract, find_head, model_fingerprint


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


class Counting(nn.Module):
    """Wraps a model and counts forward calls (a private attribute: not part of the model's fingerprint)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self._calls = 0

    @property
    def calls(self):
        return self._calls

    def forward(self, x):
        self._calls += 1
        return self.inner(x)


def make_inputs(n=20, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator)


def run(model, data, **kwargs):
    kwargs.setdefault("progress", False)
    return extract(model, data, **kwargs)


# ---------------------------------------------------------------------------------------------- outputs
def test_features_head_and_logits_agree():
    model, x = make_model(), make_inputs()
    out = run(model, x, batch_size=6)
    assert isinstance(out, ModelOutputs) and out.array_type == "torch"
    assert out.logits.shape == (20, 5) and out.features.shape == (20, 4)
    assert out.logits.dtype == torch.float32 and out.features.dtype == torch.float32
    weight, bias = out.head
    assert torch.equal(weight, model[4].weight.detach()) and torch.equal(bias, model[4].bias.detach())
    torch.testing.assert_close(out.features @ weight.T + bias, out.logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.features, model[:4](x), atol=1e-6, rtol=0)
    assert out.labels is None and out.layers == {}


def test_find_head():
    model = make_model()
    assert find_head(model) == ("4", model[4])
    assert find_head(model, "4") == ("4", model[4])
    assert find_head(nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=1))) is None
    bare = nn.Linear(3, 2)
    assert find_head(bare) == ("", bare)
    with pytest.raises(ValueError, match="is a Conv2d, not an nn.Linear"):
        find_head(model, "0")


def test_layer_hooks_keep_full_shape():
    model, x = make_model(), make_inputs()
    out = run(model, x, layers=["1", "2"], batch_size=7)
    assert out.layers["1"].shape == (20, 4, 8, 8) and out.layers["2"].shape == (20, 4, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out.layers["1"], model[:2](x), atol=1e-6, rtol=0)
    assert list(run(model, x, layers="3").layers) == ["3"]


def test_layer_outputs_are_not_changed_by_later_inplace_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    out = run(model, x, layers=["0"])
    with torch.no_grad():
        torch.testing.assert_close(out.layers["0"], model[0](x))
    assert bool((out.layers["0"] < 0).any())


def test_unknown_names_list_available_modules():
    model, x = make_model(), make_inputs(4)
    with pytest.raises(ValueError, match=r"no module named 'relu'.*Available module names: 0, 1, 2, 3, 4"):
        run(model, x, layers=["relu"])
    with pytest.raises(ValueError, match=r"feature_layer: no module named '44'.*Did you mean '4'"):
        run(model, x, feature_layer="44")
    with pytest.raises(ValueError, match="more than once"):
        run(model, x, layers=["1", "1"])


class CosineClassifier(nn.Module):
    """logits = s * cos(features, class prototypes): no linear layer outputs them."""

    def __init__(self, dim: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(dim, 8), nn.ReLU())
        self.prototypes = nn.Parameter(torch.randn(classes, 8))

    def forward(self, x):
        z = nn.functional.normalize(self.backbone(x), dim=1)
        return 10 * z @ nn.functional.normalize(self.prototypes, dim=1).T


def test_without_a_linear_head_only_logits_with_a_warning_naming_feature_layer():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no nn.Linear layer of CosineClassifier outputs its logits.*feature_layer="):
        out = run(CosineClassifier(), torch.randn(5, 3, 2, 2))
    assert out.logits.shape == (5, 3) and out.features is None and out.head is None
    named = run(CosineClassifier(), torch.randn(5, 3, 2, 2), feature_layer="backbone")  # any module: its output
    assert named.features.shape == (5, 8) and named.head is None


@pytest.mark.parametrize("last", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1)])
def test_probabilities_and_log_probabilities_are_refused(last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), last)
    kind = "log-probabilities" if isinstance(last, nn.LogSoftmax) else "probabilities"
    with pytest.raises(
        ValueError, match=rf"every row of the model output is {kind}.*Remove the final {type(last).__name__}"
    ):
        run(model, torch.randn(5, 3, 2, 2))


def test_explicit_feature_layer_and_missing_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Hardtanh(-0.1, 0.1))
    x = torch.randn(9, 6)
    with pytest.warns(UserWarning, match="logits differ"):  # the clipping changes the logits after the layer
        out = run(model, x, feature_layer="2")
    assert out.features.shape == (9, 4) and torch.equal(out.head[1], torch.zeros(3))


def test_rescaled_logits_warn():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.body(x))) * 3.0

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="'fc' \\(found automatically\\)"):
        run(Scaled(), torch.randn(4, 4))


def test_eval_mode_during_run_and_restored():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), Probe(), nn.Linear(3, 2))
    model.train()
    model[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    run(model, torch.randn(8, 3), batch_size=4)
    assert seen == [False, False]
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError):
        run(model, [torch.randn(2, 3), (torch.randn(2, 3), torch.randn(2, 3), 1)])
    assert [m.training for m in model.modules()] == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_no_grad_during_run():
    class GradProbe(nn.Module):
        def forward(self, x):
            assert not torch.is_grad_enabled()
            return x

    run(nn.Sequential(GradProbe(), nn.Linear(3, 2)), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------- data forms
def test_labels_from_batches_and_from_argument():
    model, x = make_model(), make_inputs(10)
    y = torch.arange(10) % 3 - 1  # includes OOD (-1) rows
    from_pairs = run(model, [(x[:4], y[:4]), (x[4:], y[4:].tolist())])
    from_argument = run(model, [x[:4], x[4:]], labels=y.numpy())
    from_arrays = run(model, x.numpy(), labels=y, batch_size=3)
    for out in (from_pairs, from_argument, from_arrays):
        assert torch.equal(out.labels, y)
        torch.testing.assert_close(out.logits, from_pairs.logits)
    with pytest.raises(ValueError, match="given both"):
        run(model, [(x, y)], labels=y)
    with pytest.raises(ValueError, match="9 labels given but the data has more rows"):
        run(model, [x[:5], x[5:]], labels=y[:9])
    with pytest.raises(ValueError, match="9 labels for 10 input rows"):
        run(model, x, labels=y[:9])
    with pytest.raises(ValueError, match="integer class ids"):
        run(model, [(x, torch.rand(10))])


def test_dataloader_dataset_and_arrays_agree():
    model, x = make_model(), make_inputs(13)
    y = torch.arange(13) % 5
    reference = run(model, x, labels=y, batch_size=4)
    dataset = TensorDataset(x, y)
    for data in (DataLoader(dataset, batch_size=5), dataset, [(x, y)]):
        out = run(model, data, batch_size=6)
        torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.features, reference.features, atol=1e-6, rtol=0)
        assert torch.equal(out.labels, y)


def test_float64_numpy_inputs_are_cast_to_model_dtype():
    model, x = make_model(), make_inputs(6)
    out = run(model, x.double().numpy())
    torch.testing.assert_close(out.logits, run(model, x).logits, atol=1e-6, rtol=0)


def test_generator_input():
    model, x = make_model(), make_inputs(8)
    out = run(model, (x[i : i + 3] for i in range(0, 8, 3)))
    assert len(out) == 8


@pytest.mark.parametrize(
    "data, message",
    [
        ([(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2))], "multi|several inputs"),
        ([((torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)), torch.zeros(2))], "single-tensor inputs"),
        ([{"input": torch.zeros(2, 3, 8, 8), "mask": torch.ones(3, 8)}], "needs the same number of rows"),
        ([{"labels": torch.zeros(2)}], "holds only labels"),
        ([[1, 2]], "expected a torch tensor"),
        ("abc", "expected a DataLoader"),
        ([], "produced no rows"),
    ],
)
def test_bad_batches(data, message):
    with pytest.raises(ValueError, match=message):
        run(make_model(), data)


def test_model_output_must_be_logits_matrix():
    class Nested(nn.Module):
        def forward(self, x):
            return {"a": x, "b": x}

    with pytest.raises(ValueError, match=r"keys \['a', 'b'\] and none is 'logits'; pass output_key="):
        run(Nested(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"output_key='c': the model returned a dict with keys \['a', 'b'\]"):
        run(Nested(), torch.zeros(2, 3), output_key="c")
    with pytest.raises(ValueError, match="logits must be \\[B, C\\]"):
        run(nn.Identity(), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="returns a single tensor; leave output_key out"):
        run(make_model(), make_inputs(2), output_key="logits")


class Wrapped(nn.Module):
    """The test model, returning its logits inside another structure."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.inner = make_model()
        self.shape = shape

    def forward(self, x):
        logits = self.inner(x)
        extra = torch.ones(x.shape[0], 2)
        if self.shape == "dict":
            return {"embedding": extra, "logits": logits}
        if self.shape == "tuple":
            return (logits, extra)
        if self.shape == "namedtuple":
            return Outputs(extra, logits)
        if self.shape == "model_output":
            return FakeModelOutput(logits=logits, hidden_states=extra)
        if self.shape == "keyed":
            return {"main": logits, "aux": extra}
        raise AssertionError(self.shape)


class Outputs(NamedTuple):
    embedding: torch.Tensor
    logits: torch.Tensor


class FakeModelOutput(dict):
    """Like transformers' ModelOutput: a dict whose entries are also attributes."""

    def __getattr__(self, name):
        return self[name]


@pytest.mark.parametrize("shape, key", [("dict", None), ("tuple", None), ("namedtuple", None),
                                        ("model_output", None), ("keyed", "main"), ("tuple", 0)])  # fmt: skip
def test_dicts_tuples_namedtuples_and_model_outputs_give_the_same_outputs(shape, key):
    inputs = make_inputs(7)
    plain = run(make_model(), inputs)
    wrapped = Wrapped(shape)
    wrapped.inner.load_state_dict(make_model().state_dict())
    out = run(wrapped, inputs, output_key=key)
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.features, plain.features)  # the final linear layer is found in any case
    torch.testing.assert_close(out.head[0], plain.head[0])


def test_the_head_is_found_by_its_output_when_it_is_registered_before_the_backbone():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

        def forward(self, x):
            return self.fc(self.backbone(x))

    torch.manual_seed(0)
    model, x = HeadFirst(), torch.randn(6, 4)
    out = run(model, x)  # the last registered module is a ReLU: the head is the linear layer that outputs the logits
    torch.testing.assert_close(out.features, model.backbone(x).detach())
    torch.testing.assert_close(out.head[0], model.fc.weight.detach())
    torch.testing.assert_close(out.features @ out.head[0].T + out.head[1], out.logits)


def test_feature_layer_may_name_any_module_whose_output_is_pooled():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.body(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model, x = Conv(), torch.randn(5, 1, 6, 6)
    out = run(model, x, feature_layer="body")  # [B, 4, 6, 6] -> global average pooling -> [B, 4]
    torch.testing.assert_close(out.features, model.body(x).mean(dim=(2, 3)).detach())
    assert out.head is not None  # the final linear layer reads these features: it is the head
    torch.testing.assert_close(out.features @ out.head[0].T + out.head[1], out.logits, rtol=1e-5, atol=1e-5)
    tokens = run(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Flatten(1), nn.Linear(18, 2)), torch.randn(3, 3, 4),
                 feature_layer="1")  # fmt: skip
    assert tokens.features.shape == (3, 6) and tokens.head is None  # [B, T, D] -> mean over tokens


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(make_model(), make_inputs(2), device="cuda")


def test_bad_device_names():
    with pytest.raises(ValueError, match="not a device name"):
        run(make_model(), make_inputs(2), device="gpu0")
    with pytest.raises(ValueError, match="expected a string"):
        run(make_model(), make_inputs(2), device=3)


def test_cpu_device_object_and_progress_bar(capsys):
    out = extract(make_model(), make_inputs(4), device=torch.device("cpu"), progress=True, desc="probe")
    assert len(out) == 4
    assert "probe" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cache
def entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir())


def test_cache_hit_does_not_run_the_model(tmp_path):
    model, x = Counting(make_model()), make_inputs(10)
    y = torch.arange(10) % 5
    first = run(model, x, labels=y, layers=["inner.1"], cache_dir=tmp_path, batch_size=4)
    assert model.calls == 3
    (entry,) = entries(tmp_path)
    assert (entry / "complete.json").is_file() and (entry / "part-00000.safetensors").is_file()
    second = run(model, x, labels=y, layers=["inner.1"], cache_dir=tmp_path, batch_size=5)
    assert model.calls == 3  # a hit, even with another batch size
    assert second.array_type == "torch"
    for field in ("logits", "features", "labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert torch.equal(first.layers["inner.1"], second.layers["inner.1"])
    assert all(torch.equal(a, b) for a, b in zip(first.head, second.head, strict=True))
    # other layers are another entry
    run(model, x, labels=y, layers=["inner.2"], cache_dir=tmp_path)
    assert model.calls == 4 and len(entries(tmp_path)) == 2


def test_cache_misses_when_one_weight_changes(tmp_path):
    model, x = Counting(make_model()), make_inputs(6)
    run(model, x, cache_dir=tmp_path)
    with torch.no_grad():
        model.inner[0].weight[0, 0, 0, 0] += 1e-3
    changed = run(model, x, cache_dir=tmp_path)
    assert model.calls == 2 and len(entries(tmp_path)) == 2
    with torch.no_grad():
        torch.testing.assert_close(changed.logits, model(x))


def test_cache_misses_when_one_pixel_or_label_changes(tmp_path):
    model, x = Counting(make_model()), make_inputs(6)
    y = torch.zeros(6, dtype=torch.long)
    run(model, x, labels=y, cache_dir=tmp_path)
    x2 = x.clone()
    x2[3, 1, 4, 4] += 1e-4
    run(model, x2, labels=y, cache_dir=tmp_path)
    assert model.calls == 2
    y2 = y.clone()
    y2[5] = -1
    out = run(model, x, labels=y2, cache_dir=tmp_path)
    assert model.calls == 3 and int(out.labels[5]) == -1
    # the hash covers the transformed inputs a Dataset produces, not only its raw storage
    from oodguard.extraction.data import ArrayDataset

    run(model, ArrayDataset(x, transform=lambda t: t * 2), cache_dir=tmp_path)
    calls = model.calls
    run(model, ArrayDataset(x, transform=lambda t: t * 3), cache_dir=tmp_path)
    assert model.calls == calls + 1


def test_dataset_key_skips_hashing_but_fingerprints_model(tmp_path):
    model, x = Counting(make_model()), make_inputs(6)
    run(model, x, cache_dir=tmp_path, dataset_key="toy-v1")
    run(model, x + 1, cache_dir=tmp_path, dataset_key="toy-v1")  # the user's responsibility: a hit
    assert model.calls == 1
    run(model, x + 1, cache_dir=tmp_path, dataset_key="toy-v2")
    assert model.calls == 2
    other = Counting(make_model(seed=5))
    run(other, x, cache_dir=tmp_path, dataset_key="toy-v1")
    assert other.calls == 1
    # a one-shot generator needs dataset_key when caching
    with pytest.raises(ValueError, match="one-shot iterator"):
        run(model, (b for b in [x]), cache_dir=tmp_path)
    run(model, (b for b in [x]), cache_dir=tmp_path, dataset_key="toy-v2")
    assert model.calls == 2


def test_incomplete_cache_is_not_used(tmp_path):
    model, x = Counting(make_model()), make_inputs(6)
    run(model, x, cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    (entry / "complete.json").unlink()
    again = run(model, x, cache_dir=tmp_path)
    assert model.calls == 2 and (entry / "complete.json").is_file() and len(again) == 6


def test_interrupted_extraction_leaves_no_entry(tmp_path):
    class FailsOnThirdCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("interrupted")
            return self.fc(x)

    model, x = FailsOnThirdCall(), torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(model, x, cache_dir=tmp_path, batch_size=2, chunk_rows=2)
    assert entries(tmp_path) == []  # neither an entry nor a leftover temporary directory
    out = run(model, x, cache_dir=tmp_path, batch_size=2, chunk_rows=2)
    assert len(out) == 10 and len(entries(tmp_path)) == 1


def test_damaged_entry_is_rebuilt(tmp_path):
    model, x = Counting(make_model()), make_inputs(6)
    run(model, x, cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    (entry / "part-00000.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        out = run(model, x, cache_dir=tmp_path)
    assert model.calls == 2 and len(out) == 6


def test_chunked_streaming_matches_in_memory(tmp_path):
    model, x = make_model(), make_inputs(20)
    y = torch.arange(20) % 5
    memory = run(model, x, labels=y, layers=["0"], batch_size=4)
    streamed = run(model, x, labels=y, layers=["0"], batch_size=4, cache_dir=tmp_path, chunk_rows=7)
    (entry,) = entries(tmp_path)
    parts = sorted(p.name for p in entry.glob("part-*.safetensors"))
    assert parts == ["part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    assert [len(ModelOutputs.load(entry / p)) for p in parts] == [7, 7, 6]
    meta = json.loads((entry / "complete.json").read_text())
    assert meta["num_rows"] == 20 and meta["parts"] == parts
    for field in ("logits", "features", "labels"):
        assert torch.equal(getattr(memory, field), getattr(streamed, field))
    assert torch.equal(memory.layers["0"], streamed.layers["0"])
    assert all(torch.equal(a, b) for a, b in zip(memory.head, streamed.head, strict=True))
    hit = run(model, x, labels=y, layers=["0"], cache_dir=tmp_path, chunk_rows=7)
    assert torch.equal(hit.logits, memory.logits) and torch.equal(hit.layers["0"], memory.layers["0"])


def test_random_transform_is_extracted_but_not_cached(tmp_path):
    from oodguard.extraction.data import ArrayDataset

    model, x = make_model(), make_inputs(6)
    noisy = ArrayDataset(x, transform=lambda t: t + torch.rand(()))
    with pytest.warns(UserWarning, match="not cached"):
        out = run(model, noisy, cache_dir=tmp_path)
    assert len(out) == 6 and entries(tmp_path) == []


def test_model_fingerprint():
    model = make_model()
    assert model_fingerprint(model) == model_fingerprint(copy.deepcopy(model))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[4].bias[0] += 1e-6
    assert model_fingerprint(changed) != model_fingerprint(model)
    other_activation = copy.deepcopy(model)
    other_activation[1] = nn.GELU()
    assert model_fingerprint(other_activation) != model_fingerprint(model)


def test_no_warnings_on_plain_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(make_model(), make_inputs(4), labels=np.zeros(4, dtype=int))


def test_fingerprint_sees_attributes_forward_code_and_non_persistent_buffers():
    from oodguard.extraction.extract import model_fingerprint

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.scale = 1.0
            self.register_buffer("offset", torch.zeros(2), persistent=False)

        def forward(self, x):
            return self.linear(x) * self.scale + self.offset

    model = Scaled()
    before = model_fingerprint(model)
    model.scale = 5.0
    assert model_fingerprint(model) != before
    model.scale = 1.0
    assert model_fingerprint(model) == before
    model.offset += 1
    assert model_fingerprint(model) != before

    class Tanh(Scaled):
        def forward(self, x):
            return torch.tanh(self.linear(x))

    twin = Tanh()
    twin.load_state_dict(Scaled().state_dict())
    assert model_fingerprint(twin) != model_fingerprint(Scaled())
