"""The training loop: toy runs lower the loss, seeding, checkpoints round-trip and resume exactly, every method runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodguard.train import (
    METHODS,
    Recipe,
    add_absent_class,
    auto_margins,
    create_method,
    install_abet_head,
    load_checkpoint,
    save_checkpoint,
    train,
)


def toy_data(seed: int = 0):
    """Two Gaussian classes in 1x4x4 'images' (means +-1 on every pixel) and outliers spread around 0 and far out."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(64) % 2
    inputs = torch.randn(64, 1, 4, 4, generator=g) * 0.7 + (2.0 * labels - 1.0)[:, None, None, None]
    outliers = torch.randn(96, 1, 4, 4, generator=g) * 3.0
    return inputs, labels, outliers


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


def loaders(batch: int = 16, outlier_batch: int = 24, seed: int = 0):
    inputs, labels, outliers = toy_data()
    id_loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
    outlier_loader = DataLoader(TensorDataset(outliers), batch_size=outlier_batch, shuffle=True,
                                generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
    return id_loader, outlier_loader


def full_loss(model, method):
    inputs, labels, outliers = toy_data()
    model.eval()
    with torch.no_grad():
        return float(method.loss(model, inputs, labels, outliers[:64], torch.Generator().manual_seed(0)))


def test_outlier_exposure_on_a_toy_problem_lowers_the_loss():
    method = create_method("oe")
    model = toy_model()
    before = full_loss(model, method)
    id_loader, outlier_loader = loaders()
    result = train(model, id_loader, method, outlier_loader, recipe=Recipe(epochs=15, lr=0.05), progress=False)
    after = full_loss(result.model, method)
    assert after < 0.6 * before
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.steps == 15 * len(id_loader)
    assert not result.model.training


def test_same_seed_gives_the_same_weights_and_another_seed_differs():
    def weights(seed):
        id_loader, outlier_loader = loaders()
        model = train(toy_model(), id_loader, create_method("mixoe", mix_op="cutmix"), outlier_loader,
                      recipe=Recipe(epochs=2, lr=0.05), seed=seed, progress=False).model  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


@pytest.mark.parametrize("optimizer_type", [torch.optim.SGD, torch.optim.Adam])
def test_checkpoint_round_trips_model_optimizer_and_meta(tmp_path, optimizer_type):
    model = toy_model()
    kwargs = {"momentum": 0.9} if optimizer_type is torch.optim.SGD else {}
    optimizer = optimizer_type(model.parameters(), lr=0.1, **kwargs)
    inputs, labels, _ = toy_data()
    for _ in range(2):  # build some optimizer state (momentum buffers / Adam moments and step counts)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer, meta={"epoch": 2, "note": "x"},
                           tensors={"rng": rng})  # fmt: skip
    assert path.read_bytes()[:8]  # a safetensors file: 8-byte header length first, no pickle
    other = toy_model(seed=9)
    other_optimizer = optimizer_type(other.parameters(), lr=0.5, **kwargs)
    meta, extra = load_checkpoint(path, other, other_optimizer)
    assert meta == {"epoch": 2, "note": "x"}
    assert torch.equal(extra["rng"], rng)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            got = loaded["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got)), key


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    recipe = Recipe(epochs=3, lr=0.05)
    method = create_method("oe")
    id_loader, outlier_loader = loaders()
    straight = train(toy_model(), id_loader, method, outlier_loader, recipe=recipe, progress=False,
                     checkpoint_dir=tmp_path, checkpoint_every=1)  # fmt: skip
    assert [p.name for p in straight.checkpoints] == ["epoch-0001.safetensors", "epoch-0002.safetensors",
                                                      "epoch-0003.safetensors"]  # fmt: skip
    id_loader, outlier_loader = loaders()
    resumed = train(toy_model(seed=5), id_loader, method, outlier_loader, recipe=recipe, progress=False,
                    resume_from=tmp_path / "epoch-0001.safetensors")  # fmt: skip
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.epoch_losses == straight.epoch_losses
    with pytest.raises(ValueError, match="resume with the same method"):
        train(toy_model(), id_loader, method, outlier_loader, recipe=Recipe(epochs=4, lr=0.05), progress=False,
              resume_from=tmp_path / "epoch-0001.safetensors")  # fmt: skip


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_one_epoch_with_finite_losses(name):
    id_loader, outlier_loader = loaders()
    params = {"num_keep": 8, "num_clusters": 4, "n_init": 2} if name == "dos" else {}
    method = create_method(name, **params)
    result = train(toy_model(), id_loader, method, outlier_loader if method.needs_outliers else None,
                   recipe=Recipe(epochs=1, lr=0.01), progress=False)  # fmt: skip
    logits = result.model(toy_data()[0])
    assert torch.isfinite(logits).all()
    assert logits.shape[1] == (3 if name == "dos" else 2)  # DOS adds the absent class


def test_heads_keep_or_replace_the_classifier():
    model = toy_model()
    x = toy_data()[0]
    before = model(x)
    add_absent_class(model)
    after = model(x)
    torch.testing.assert_close(after[:, :2], before)  # the K known logits are unchanged
    assert torch.equal(after[:, 2], torch.zeros(len(x)))  # the absent row starts at zero
    abet = install_abet_head(toy_model()).eval()
    assert type(abet[3]).__name__ == "LearnedTemperatureHead"
    with pytest.raises(ValueError, match="head_name"):
        install_abet_head(nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=1)))


def test_auto_margins_are_mean_energies():
    model = toy_model()
    inputs, _, _ = toy_data()
    outliers = 0.01 * inputs  # near-zero inputs: small logits, so higher energy than the ID inputs
    m_in, m_out = auto_margins(model, [inputs[:32], inputs[32:]], [(outliers,)])
    with torch.no_grad():
        assert m_in == pytest.approx(float(-torch.logsumexp(model(inputs), 1).mean()), rel=1e-6)
        assert m_out == pytest.approx(float(-torch.logsumexp(model(outliers), 1).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="pass margins by hand"):
        auto_margins(model, [outliers], [inputs])


def test_loop_refuses_bad_setups():
    id_loader, outlier_loader = loaders()
    with pytest.raises(ValueError, match="pass outlier_loader"):
        train(toy_model(), id_loader, create_method("oe"), None, progress=False)
    with pytest.raises(TypeError, match="Method"):
        train(toy_model(), id_loader, "oe", outlier_loader, progress=False)
    with pytest.raises(ValueError, match="unknown training method"):
        create_method("vos")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(toy_model(), id_loader, create_method("logitnorm"), checkpoint_every=1, progress=False)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(toy_model(), id_loader, create_method("logitnorm"), recipe=Recipe(epochs=1, lr=1e30), progress=False)


def test_recipe_schedules():
    cosine = Recipe(epochs=2, lr=0.1, lr_min=1e-6)
    assert cosine.learning_rate(0, 0, 10) == pytest.approx(0.1)
    assert cosine.learning_rate(5, 0, 10) == pytest.approx((0.1 + 1e-6) / 2)
    assert cosine.learning_rate(10, 1, 10) == pytest.approx(1e-6)
    steps = Recipe(epochs=10, lr=0.1, schedule="multistep", milestones=(0.5, 0.75, 0.9), gamma=0.1)
    assert [round(steps.learning_rate(0, e, 100), 8) for e in (0, 4, 5, 7, 9)] == [0.1, 0.1, 0.01, 0.001, 0.0001]
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="linear")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"momentum": 1.0}, "momentum must lie in \\[0, 1\\)"),
        ({"momentum": -0.1}, "momentum must lie in"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"lr": 1e-3, "lr_min": 1e-2}, "lr_min .* must be <= lr"),
        ({"lr_min": -1.0}, "lr_min must be >= 0"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"milestones": (0.5, 0.5)}, "milestones must be strictly increasing"),
        ({"milestones": (0.5, 1.0)}, "milestones must be strictly increasing fractions of the epochs in \\(0, 1\\)"),
        ({"milestones": (0.75, 0.5)}, "milestones"),
        ({"id_batch": 0}, "id_batch must be an integer >= 1"),
        ({"outlier_batch": -1}, "outlier_batch must be an integer >= 0"),
        ({"nesterov": "yes"}, "nesterov must be True or False"),
    ],
)
def test_recipe_refuses_out_of_range_settings_naming_them(params, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**params)


def test_recipe_accepts_the_official_recipes_and_normalises_milestones():
    for cls in METHODS.values():
        cls.official_recipe()  # no error
    assert Recipe(lr=1e-7, schedule="constant").lr == 1e-7  # lr_min is only read by the cosine schedule
    assert Recipe(milestones=[0.5, 0.8]).milestones == (0.5, 0.8)
    assert Recipe(momentum=0.0).momentum == 0.0


def test_abet_head_takes_the_replaced_layers_dtype():
    model = install_abet_head(toy_model().double())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    logits = model.train()(toy_data()[0].double())  # a float32 head would fail on float64 features here
    assert logits.dtype == torch.float64


def test_abet_with_a_last_batch_of_one_says_drop_last():
    inputs, labels, _ = toy_data()
    id_loader = DataLoader(TensorDataset(inputs[:17], labels[:17]), batch_size=16)  # batches of 16 and 1
    with pytest.raises(ValueError, match="drop_last=True"):
        train(toy_model(), id_loader, create_method("abet"), recipe=Recipe(epochs=1, lr=0.01), progress=False)
    dropped = DataLoader(TensorDataset(inputs[:17], labels[:17]), batch_size=16, drop_last=True)
    result = train(toy_model(), dropped, create_method("abet"), recipe=Recipe(epochs=1, lr=0.01), progress=False)
    assert result.steps == 1
    assert torch.isfinite(result.model(inputs[:1])).all()  # eval mode: one row is fine


def test_a_checkpoint_of_a_model_with_tied_weights_round_trips(tmp_path):
    def tied(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        model[2].weight = model[0].weight
        return model

    model = tied(0)
    path = save_checkpoint(tmp_path / "tied.safetensors", model, torch.optim.SGD(model.parameters(), lr=0.1))
    other = tied(1)
    load_checkpoint(path, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_the_first_release_still_loads(tmp_path):
    """save_checkpoint of the first release, line for line: a "format" header, no kind, no digest."""
    import json

    from safetensors.torch import save_file

    model = toy_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, labels, _ = toy_data()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    state = optimizer.state_dict()
    stored = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    stored.update({f"optimizer.{i}.{k}": v.clone() for i, e in state["state"].items() for k, v in e.items()})
    stored["extra.rng"] = torch.get_rng_state()
    optimizer_json = {"type": "SGD", "param_groups": state["param_groups"], "scalars": {}}
    header = {"format": "oodguard.train.checkpoint", "format_version": 1, "optimizer": optimizer_json,
              "meta": {"epoch": 1}}  # fmt: skip
    save_file(stored, str(tmp_path / "old.safetensors"), metadata={"oodguard": json.dumps(header, sort_keys=True)})
    other = toy_model(seed=9)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    meta, extra = load_checkpoint(tmp_path / "old.safetensors", other, other_optimizer)
    assert meta == {"epoch": 1} and torch.equal(extra["rng"], stored["extra.rng"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other_optimizer.state_dict()["param_groups"] == state["param_groups"]
    for index, entry in state["state"].items():
        assert torch.equal(other_optimizer.state_dict()["state"][index]["momentum_buffer"], entry["momentum_buffer"])


def test_truncated_or_foreign_checkpoints_raise_value_errors_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", toy_model(), meta={"epoch": 1})
    data = path.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("tiny", data[:5]), ("text", b"not a checkpoint")):
        broken = tmp_path / f"{name}.safetensors"
        broken.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable safetensors file"):
            load_checkpoint(broken, toy_model())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_dos_and_cutmix_train_on_cuda():
    id_loader, outlier_loader = loaders()
    for method in (create_method("dos", num_keep=8, num_clusters=4, n_init=2), create_method("mixoe", mix_op="cutmix")):
        result = train(toy_model(), id_loader, method, outlier_loader, recipe=Recipe(epochs=1, lr=0.01),
                       device="cuda", progress=False)  # fmt: skip
        assert next(result.model.parameters()).is_cuda
    model = install_abet_head(toy_model().cuda())
    assert all(p.is_cuda for p in model.parameters())


@needs_cuda
def test_a_resumed_cuda_run_with_dropout_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _compare_resumed_cuda_run(tmp_path)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _compare_resumed_cuda_run(tmp_path):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))

    recipe = Recipe(epochs=2, lr=0.05)
    method = create_method("oe")
    id_loader, outlier_loader = loaders()
    straight = train(model(), id_loader, method, outlier_loader, recipe=recipe, progress=False, device="cuda",
                     checkpoint_dir=tmp_path, checkpoint_every=1)  # fmt: skip
    _, extra = load_checkpoint(tmp_path / "epoch-0001.safetensors")
    assert "rng_cuda" in extra  # dropout draws from the CUDA generator: without its state the masks would differ
    id_loader, outlier_loader = loaders()
    resumed = train(model(), id_loader, method, outlier_loader, recipe=recipe, progress=False, device="cuda",
                    resume_from=tmp_path / "epoch-0001.safetensors")  # fmt: skip
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
