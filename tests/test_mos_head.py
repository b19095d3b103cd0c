"""MOS head training: the group-softmax loss against plain loops, training, the detector, saving, errors."""

import math

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.detectors import create
from oodguard.detectors.openset import mos_predict
from oodguard.extraction.extract import extract
from oodguard.heads.mos import MOSHead, default_groups, mos_loss, official_schedule, train_mos_head

GROUPS = [2, 1, 3]  # 6 classes -> 9 logits: [o, c0, c1 | o, c2 | o, c3, c4, c5]


def loss_reference(logits, labels, group_sizes):
    """Per sample, a plain loop over groups: sum of each group's softmax cross-entropy against its target."""
    losses = []
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        total, start, first_class = 0.0, 0, 0
        for size in group_sizes:
            group = row[start : start + size + 1]
            target = label - first_class + 1 if first_class <= label < first_class + size else 0
            peak = max(group)
            lse = peak + math.log(sum(math.exp(v - peak) for v in group))
            total += lse - group[target]
            start += size + 1
            first_class += size
        losses.append(total)
    return np.array(losses)


def clusters(seed=0, per_class=40, num_classes=6, dim=8, spread=8.0):
    """Separable Gaussian clusters: class c around spread * e_c, unit noise (dims >= num_classes are noise)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = rng.normal(size=(len(labels), dim)) + spread * np.eye(dim)[labels]
    return features.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained():
    features, labels = clusters()
    return features, labels, train_mos_head(features, labels, GROUPS, progress=False)


# ------------------------------------------------------------------------------------------------ the loss
def test_loss_hand_worked():
    # groups [1, 1]: logits [o0, a | o1, b]. Label 0 (class a): group 0 target 1, group 1 target 0 ("others").
    # Group 0 = [0, ln 2]: CE = ln(1 + 2) - ln 2; group 1 = [0, 0]: CE = ln 2. Sum = ln 3.
    logits = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    assert mos_loss(logits, torch.tensor([0]), [1, 1]).item() == pytest.approx(math.log(3.0), abs=1e-12)


def test_loss_matches_plain_loop_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(7, 9, dtype=torch.float64, generator=generator)
    logits[0, 3] = 800.0  # a huge logit must not overflow
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2])
    expected = loss_reference(logits.numpy(), labels.numpy(), GROUPS)
    np.testing.assert_allclose(mos_loss(logits, labels, GROUPS, reduction="none").numpy(), expected, rtol=1e-12)
    assert mos_loss(logits, labels, GROUPS).item() == pytest.approx(expected.mean(), rel=1e-12)
    assert mos_loss(logits, labels, GROUPS, reduction="sum").item() == pytest.approx(expected.sum(), rel=1e-12)
    # gradient of a group CE w.r.t. its logits: softmax - one-hot(target), group by group
    leaf = logits.clone().requires_grad_(True)
    mos_loss(leaf, labels, GROUPS, reduction="sum").backward()
    expected_grad = np.zeros((7, 9))
    for i, label in enumerate(labels.tolist()):
        start, first_class = 0, 0
        for size in GROUPS:
            group = logits[i, start : start + size + 1].tolist()
            peak = max(group)
            exps = [math.exp(v - peak) for v in group]
            target = label - first_class + 1 if first_class <= label < first_class + size else 0
            for j in range(size + 1):
                expected_grad[i, start + j] = exps[j] / sum(exps) - (j == target)
            start += size + 1
            first_class += size
    np.testing.assert_allclose(leaf.grad.numpy(), expected_grad, atol=1e-12)


def test_zero_head_loss_is_sum_of_log_group_widths():
    features, labels = clusters()
    width = sum(GROUPS) + len(GROUPS)
    zero = MOSHead(np.zeros((width, 8), np.float32), np.zeros(width, np.float32), GROUPS)
    assert zero.loss(features, labels) == pytest.approx(sum(math.log(s + 1) for s in GROUPS), rel=1e-6)


# ------------------------------------------------------------------------------------------------ training
def test_training_lowers_loss_and_classifies(trained):
    features, labels, head = trained
    assert head.weight.shape == (9, 8) and head.bias.shape == (9,) and head.group_sizes == GROUPS
    start_loss = sum(math.log(s + 1) for s in GROUPS)  # the zero-initialised head
    assert head.loss(features, labels) < 0.05 * start_loss
    assert head.training["epoch_loss"][-1] < head.training["epoch_loss"][0]
    assert head.training["steps"] == official_schedule(len(labels))[-1] == 500
    predictions = head.predict(features)
    assert isinstance(predictions, np.ndarray)
    assert (predictions == labels).mean() > 0.98
    np.testing.assert_array_equal(predictions, mos_predict(head.logits(features), GROUPS))
    # held-out rows of the same clusters
    test_features, test_labels = clusters(seed=1)
    assert (head.predict(test_features) == test_labels).mean() > 0.97


def test_trained_head_with_mos_detector_ranks_far_cluster_as_ood(trained):
    _, _, head = trained
    test_features, _ = clusters(seed=1)
    rng = np.random.default_rng(2)
    far = (rng.normal(size=(100, 8)) + 6.0 * (np.eye(8)[6] + np.eye(8)[7])).astype(np.float32)  # unused dims
    detector = create("mos", group_sizes=head.group_sizes)
    id_scores = detector.score(head.outputs(test_features))
    ood_scores = detector.score(head.outputs(far))
    assert np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()
    # AUROC as the fraction of (ID, OOD) pairs ranked correctly (ties count half)
    pairs = (ood_scores[None, :] > id_scores[:, None]).mean() + 0.5 * (ood_scores[None, :] == id_scores[:, None]).mean()
    assert pairs > 0.9
    np.testing.assert_array_equal(head.detector().score(head.outputs(far)), ood_scores)


def test_outputs_layout_and_array_types(trained):
    features, labels, head = trained
    out = head.outputs(features, labels)
    assert out.array_type == "numpy" and out.logits.shape == (len(labels), 9)
    torch.testing.assert_close(out.logits, out.features @ out.head[0].T + out.head[1])
    np.testing.assert_array_equal(out.labels.numpy(), labels)
    torch_logits = head.logits(torch.from_numpy(features))
    assert isinstance(torch_logits, torch.Tensor)
    np.testing.assert_array_equal(torch_logits.numpy(), head.logits(features))
    # ModelOutputs in: labels and features kept, logits and head replaced
    again = head.outputs(ModelOutputs(features=features, labels=labels, logits=np.zeros((len(labels), 3))))
    np.testing.assert_array_equal(again.logits.numpy(), out.logits.numpy())
    np.testing.assert_array_equal(again.labels.numpy(), labels)


def test_modeloutputs_input_and_float64():
    features, labels = clusters(per_class=10)
    outputs = ModelOutputs(features=features.astype(np.float64), labels=labels)
    head = train_mos_head(outputs, None, GROUPS, epochs=3, progress=False)
    assert head.weight.dtype == torch.float64 and head.training["epochs"] == 3
    assert head.training["steps"] == 3  # 60 rows, one batch per pass


def test_determinism_with_seed():
    features, labels = clusters(per_class=20)
    options = {"epochs": 4, "batch_size": 16, "progress": False}
    first = train_mos_head(features, labels, GROUPS, seed=3, **options)
    second = train_mos_head(features, labels, GROUPS, seed=3, **options)
    other = train_mos_head(features, labels, GROUPS, seed=4, **options)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.training == second.training
    assert not torch.equal(first.weight, other.weight)  # the seed decides the data order
    mixed = [train_mos_head(features, labels, GROUPS, seed=3, mixup=0.2, **options) for _ in range(2)]
    assert torch.equal(mixed[0].weight, mixed[1].weight) and not torch.equal(mixed[0].weight, first.weight)


@pytest.mark.slow  # SGD needs many steps
def test_sgd_official_optimiser_runs_and_learns():
    features, labels = clusters(per_class=20)
    head = train_mos_head(features, labels, GROUPS, optimizer="sgd", lr=0.003, progress=False)
    assert head.training["optimizer"] == "sgd"
    assert (head.predict(features) == labels).mean() > 0.95


def test_official_schedule_shape():
    assert official_schedule(19_999) == (100, 200, 300, 400, 500)
    assert official_schedule(20_000) == (500, 3_000, 6_000, 9_000, 10_000)
    assert official_schedule(1_281_167) == (500, 6_000, 12_000, 18_000, 20_000)
    from oodguard.heads.mos import _lr_factor

    supports = official_schedule(100)
    # official get_lr: base * step / warmup during warm-up, then base / 10 per support strictly passed
    for step in range(supports[0], supports[-1]):
        official = 0.1 ** sum(support < step for support in supports[1:])
        assert _lr_factor(step, supports) == pytest.approx(official)
    assert _lr_factor(0, supports) == pytest.approx(1 / supports[0])  # documented: warm-up skips lr 0


# ------------------------------------------------------------------------------------------------ saving
def test_save_load_round_trip(trained, tmp_path):
    features, _, head = trained
    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = MOSHead.load(path)
    assert loaded.group_sizes == head.group_sizes and loaded.training == head.training
    np.testing.assert_array_equal(loaded.logits(features), head.logits(features))
    assert "MOSHead(C=6, K=3, D=8" in repr(loaded)
    ModelOutputs(features=features).save(tmp_path / "outputs.safetensors")
    with pytest.raises(ValueError, match="holds a 'outputs', not a 'mos_head'"):
        MOSHead.load(tmp_path / "outputs.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MOSHead.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        MOSHead.load(tmp_path / "missing.safetensors")


def test_a_head_saved_by_the_first_release_still_loads(trained, tmp_path):
    """MOSHead.save of the first release, line for line: a "format" header, no kind, no digest."""
    import json

    from safetensors.torch import save_file

    features, _, head = trained
    header = {"format": "oodguard.MOSHead", "format_version": 1, "group_sizes": head.group_sizes,
              "training": head.training}  # fmt: skip
    tensors = {"weight": head.weight.detach().contiguous().cpu(), "bias": head.bias.detach().contiguous().cpu()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"oodguard": json.dumps(header)})
    loaded = MOSHead.load(tmp_path / "old.safetensors")
    assert loaded.group_sizes == head.group_sizes and loaded.training == head.training
    np.testing.assert_array_equal(loaded.logits(features), head.logits(features))


# ------------------------------------------------------------------------------------------------ a real CNN
def test_end_to_end_on_digits_cnn_features():
    torch.manual_seed(0)
    model = DigitsCNN(num_classes=10).eval()
    images = torch.rand(48, 1, 28, 28)
    labels = torch.arange(48) % 10
    outputs = extract(model, images, labels=labels, batch_size=16, progress=False)
    assert outputs.features.shape == (48, 64)
    groups = default_groups(10, 3)
    head = train_mos_head(outputs, None, groups, epochs=5, batch_size=16, progress=False)
    mos_outputs = head.outputs(outputs)
    assert mos_outputs.logits.shape == (48, 13) and torch.isfinite(mos_outputs.logits).all()
    scores = head.detector().score(mos_outputs)
    assert scores.shape == (48,) and torch.isfinite(scores).all()
    predictions = head.predict(outputs)
    assert int(predictions.min()) >= 0 and int(predictions.max()) < 10


# ------------------------------------------------------------------------------------------------ groups, errors
def test_default_groups():
    assert default_groups(10, 3) == [4, 3, 3]
    assert default_groups(1000, 8) == [125] * 8
    assert default_groups(5, 5) == [1] * 5 and default_groups(7, 1) == [7]
    for num_classes in range(1, 30):
        for num_groups in range(1, num_classes + 1):
            sizes = default_groups(num_classes, num_groups)
            assert sum(sizes) == num_classes and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="num_groups=4 exceeds num_classes=3"):
        default_groups(3, 4)
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        default_groups(3, 0)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        default_groups(2.5, 1)


def test_bad_inputs():
    features, labels = clusters(per_class=5)
    with pytest.raises(ValueError, match=r"labels must lie in 0..5 \(group_sizes sum to C=6\)"):
        train_mos_head(features, np.where(labels == 5, 6, labels), GROUPS, progress=False)
    with pytest.raises(ValueError, match="negative labels mark OOD rows"):
        train_mos_head(features, np.where(labels == 5, -1, labels), GROUPS, progress=False)
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        train_mos_head(features, labels, [2, 2], progress=False)  # group_sizes do not cover the 6 classes
    broken = features.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="features: contains 1 NaN"):
        train_mos_head(broken, labels, GROUPS, progress=False)
    with pytest.raises(ValueError, match="labels are required"):
        train_mos_head(features, None, GROUPS, progress=False)
    with pytest.raises(ValueError, match="fields disagree on the number of samples"):
        train_mos_head(features, labels[:-1], GROUPS, progress=False)
    with pytest.raises(ValueError, match="group_sizes"):
        train_mos_head(features, labels, [3, 0, 3], progress=False)
    with pytest.raises(ValueError, match="no features"):
        train_mos_head(ModelOutputs(logits=np.zeros((30, 6))), labels, GROUPS, progress=False)
    for option, value in [("epochs", 0), ("lr", -1.0), ("batch_size", 2.5), ("weight_decay", -1), ("mixup", np.nan)]:
        with pytest.raises(ValueError, match=f"train_mos_head: {option} must be"):
            train_mos_head(features, labels, GROUPS, progress=False, **{option: value})
    with pytest.raises(ValueError, match="optimizer must be one of adam, sgd"):
        train_mos_head(features, labels, GROUPS, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="describe 10 logits"):
        MOSHead(np.zeros((9, 8)), np.zeros(9), [4, 4])
    head = MOSHead(np.zeros((9, 8)), np.zeros(9), GROUPS)
    with pytest.raises(ValueError, match="D=5 columns but this head was trained on D=8"):
        head.logits(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="features: contains"):
        head.outputs(np.full((2, 8), np.inf))
    with pytest.raises(ValueError, match="labels are required"):
        head.loss(features)
    with pytest.raises(ValueError, match="i.e. 9 logits"):
        mos_loss(torch.zeros(2, 8), torch.tensor([0, 1]), GROUPS)
    with pytest.raises(ValueError, match="labels must have shape"):
        mos_loss(torch.zeros(2, 9), torch.tensor([0, 1, 2]), GROUPS)
