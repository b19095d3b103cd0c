"""`oodguard bench CONFIG.toml` and `oodguard.evaluate_model`: a user's model on a user's folders of PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import oodguard
from oodguard.benchmark.custom import ConfigError, load_config
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.cli import main
from oodguard.extraction.data import ImageFolder


def write_pngs(folder: Path, n: int, seed: int, bright: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 80, (20, 20)) if not bright else rng.integers(150, 256, (20, 20))
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Folders as a user has them: class sub-folders for ID, a flat and a nested folder for OOD; weights file."""
    root = tmp_path_factory.mktemp("project")
    for split, seed in (("train", 0), ("test", 100)):
        for label in range(10):
            write_pngs(root / "images" / split / f"class{label}", 4, seed + label)
    write_pngs(root / "images" / "noise", 12, 7, bright=True)  # flat
    write_pngs(root / "images" / "letters" / "a", 5, 8, bright=True)  # nested: every image OOD
    write_pngs(root / "images" / "letters" / "b", 5, 9, bright=True)
    torch.manual_seed(0)
    save_file(DigitsCNN().state_dict(), str(root / "weights.safetensors"))
    return root


CONFIG = """
name = "my-digits"
[model]
factory = "oodguard.benchmark.digits_model:DigitsCNN"
weights = "weights.safetensors"
[transform]
grayscale = true
size = [28, 28]
mean = [0.0]
std = [1.0]
[data]
fit = "images/train"
id = "images/test"
[ood]
"near:letters" = "images/letters"
"far:noise" = "images/noise"
[detectors]
names = ["msp", "energy", "knn", "odin"]
params = { knn = { k = 3 } }
"""


def test_a_config_file_runs_as_a_benchmark(project, tmp_path, capsys):
    config = project / "bench.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["bench", str(config), "--out", str(out), "--n-boot", "5", "-q"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["benchmark"] == "my-digits" and payload["groups"] == {"near": ["letters"], "far": ["noise"]}
    assert {row["detector"] for row in payload["leaderboard"]} == {"msp", "energy", "knn", "odin"}
    assert all(row["status"] == "ok" for row in payload["status"]), payload["status"]
    assert payload["settings"]["params"]["knn"] == {"k": 3}
    assert (out / "report.html").is_file() and "| rank | detector |" in (out / "leaderboard.md").read_text()
    assert all(np.isfinite(row["auroc_low"]) for row in payload["results"])  # intervals, as for embedded benchmarks
    benchmark, _ = load_config(config)
    assert len(benchmark.fit.data) == 40 and set(benchmark.ood[0].data.targets) == {-1}
    assert benchmark.fit.data[0][0].shape == (1, 28, 28)  # grayscale, resized from 20 x 20


BAD = [
    (
        "[model]\nfactori = 'x:y'\n[data]\nfit='a'\nid='b'\n[ood]\na='c'",
        r"\[model\]: unknown key 'factori' \(did you mean 'factory'\?\)",
    ),
    ("[modle]\n", r"unknown key 'modle' \(did you mean 'model'\?\)"),
    (
        "[model]\nfactory = 'oodguard.benchmark.digits_model:DigitsCNN'\n[ood]\na = 'images/noise'",
        r"missing section \[data\]",
    ),
    (CONFIG.replace('"far:noise"', '"faraway:noise"'), r"\[ood\]\.faraway:noise: group must be one of near, far"),
    (
        CONFIG.replace('fit = "images/train"', 'fit = "images/noise"'),
        r"\[data\]\.fit: an ID set needs one sub-folder per class",
    ),
    (CONFIG.replace('fit = "images/train"', 'fit = "images/nowhere"'), r"\[data\]\.fit: .*nowhere is not a folder"),
    (
        CONFIG.replace('weights = "weights.safetensors"', 'weights = "missing.pt"'),
        r"\[model\]\.weights: .*missing.pt is not a file",
    ),
    (
        CONFIG.replace("oodguard.benchmark.digits_model:DigitsCNN", "no_such_module:Net"),
        r"\[model\]\.factory: cannot import",
    ),
    (CONFIG.replace("grayscale = true", 'grayscale = "yes"'), r"\[transform\]\.grayscale: expected true or false"),
    ("[model\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_config_errors_name_the_key(project, text, message):
    config = project / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_evaluate_model_is_the_python_twin(project, tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN().eval()

    def folder(name: str, **options):
        from oodguard.extraction.data import Resize

        return ImageFolder(project / "images" / name, transform=Resize((28, 28)), mode="L", **options)

    results = oodguard.evaluate_model(
        model, fit=folder("train"), id=folder("test"), ood={"near:letters": folder("letters", unlabelled=True),
        "noise": folder("noise")}, detectors=["msp", "energy"], n_boot=5, progress=False,
    )  # fmt: skip
    board = results.leaderboard()
    assert isinstance(board, pd.DataFrame) and set(board["detector"]) == {"msp", "energy"}
    assert results.groups == {"near": ["letters"], "far": ["noise"]}
    assert results.report(tmp_path / "r" / "report.html").read_text().startswith("<!")


def test_an_onnx_model_in_a_config_file(project, tmp_path):
    pytest.importorskip("onnxruntime")
    import warnings

    model = DigitsCNN().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"x": {0: "n"}, "logits": {0: "n"}}
        torch.onnx.export(model, (torch.rand(2, 1, 28, 28),), str(project / "model.onnx"), dynamo=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes=axes)  # fmt: skip
    text = CONFIG.replace('factory = "oodguard.benchmark.digits_model:DigitsCNN"\nweights = "weights.safetensors"',
                          'path = "model.onnx"').replace("[detectors]", "[unused]")  # fmt: skip
    text = text.split("[unused]")[0]
    config = project / "onnx.toml"
    config.write_text(text)
    out = tmp_path / "onnx"
    assert main(["bench", str(config), "--out", str(out), "--n-boot", "5", "-q"]) == 0
    payload = json.loads((out / "results.json").read_text())
    ran = {row["detector"] for row in payload["status"] if row["status"] == "ok"}
    assert {"vim", "energy", "mahalanobis"} <= ran and "odin" not in ran  # (40 random images: knn's k=50 fails)
    assert "runs the model itself" in payload["skipped"]["odin"]
    config.write_text(text.replace('path = "model.onnx"', 'path = "model.onnx"\nfactory = "x:y"'))
    with pytest.raises(ConfigError, match="either path .* or factory and weights"):
        load_config(config)
