"""`oodguard extract` writes shard folders from a folder of images or an array; `oodguard eval` reads them."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.cli import main
from oodguard.extraction import extract
from oodguard.extraction.data import ImageFolder
from oodguard.outputs import ModelOutputs

FACTORY = "oodguard.benchmark.digits_model:DigitsCNN"


def _images(folder, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        target = folder / f"class{c}" if classes > 1 else folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.random((28, 28)) * 90 + 50 * c
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(target / f"{i:03d}.png")


@pytest.fixture()
def project(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    _images(tmp_path / "train", 3, 12, 0)
    _images(tmp_path / "test", 3, 6, 1)
    _images(tmp_path / "noise", 1, 10, 2)
    (tmp_path / "model.toml").write_text(
        f'[model]\nfactory = "{FACTORY}"\nweights = "weights.safetensors"\n[transform]\ngrayscale = true\n'
    )
    return tmp_path, model


def test_extract_writes_the_outputs_extract_gives_in_memory(project, capsys):
    root, model = project
    code = main(["extract", str(root / "train"), "--config", str(root / "model.toml"), "--out", str(root / "s"),
                 "--shard-rows", "10", "-q"])  # fmt: skip
    assert code == 0
    assert "36 rows in 4 shard(s)" in capsys.readouterr().out
    expected = extract(model, ImageFolder(root / "train", mode="L"), progress=False)
    got = ModelOutputs.open(root / "s", verify=True).to_memory()
    torch.testing.assert_close(got.logits, expected.logits)
    assert torch.equal(got.labels, expected.labels) and got.labels.tolist()[:13] == [0] * 12 + [1]
    assert main(["extract", str(root / "noise"), "--model", FACTORY, "--weights", str(root / "weights.safetensors"),
                 "--out", str(root / "n"), "-q"]) == 0  # fmt: skip
    assert ModelOutputs.open(root / "n").labels.tolist() == [-1] * 10  # a flat folder: unlabelled, OOD
    np.save(root / "arrays.npy", torch.rand(7, 1, 28, 28).numpy())
    assert main(["extract", str(root / "arrays.npy"), "--model", FACTORY, "--out", str(root / "a"), "-q"]) == 0
    assert len(ModelOutputs.open(root / "a")) == 7


def test_eval_reads_shard_folders(project, capsys):
    root, _ = project
    for split in ("train", "test", "noise"):
        out = str(root / split) + "-s"
        assert main(["extract", str(root / split), "--config", str(root / "model.toml"), "--out", out,
                     "--shard-rows", "8", "-q"]) == 0  # fmt: skip
    code = main(["eval", "--fit", str(root / "train-s"), "--id", str(root / "test-s"), "--ood",
                 f"far:noise={root / 'noise-s'}", "-d", "msp,energy,knn", "--param", "knn.k=5", "--n-boot", "10",
                 "--out", str(root / "ev"), "-q"])  # fmt: skip
    assert code == 0
    table = pd.read_csv(root / "ev" / "results.csv")
    assert set(table["detector"]) == {"msp", "energy", "knn"} and set(table["ood_set"]) == {"noise"}
    (root / "test-s" / "manifest.json").unlink()  # an interrupted extraction is refused, not read
    assert main(["eval", "--fit", str(root / "train-s"), "--id", str(root / "test-s"), "--ood",
                 f"noise={root / 'noise-s'}", "-q", "--out", str(root / "ev2")]) == 1  # fmt: skip
    assert "an interrupted extraction" in " ".join(capsys.readouterr().err.split())


def test_extract_errors_name_what_to_fix(project, capsys):
    root, _ = project
    (root / "bad.toml").write_text(f'[model]\nfactory = "{FACTORY}"\nweights = "missing.safetensors"\n')
    cases = [
        (["--config", str(root / "bad.toml")], "[model].weights:"),  # brackets survive the console
        ([], "give the model either as --config FILE.toml or as --model"),
        (["--model", FACTORY, "--engine", "spark"], "engine: expected one of 'local', 'ray'"),
        (["--model", "nodots"], "expected 'package.module:Callable'"),
    ]
    for extra, message in cases:
        assert main(["extract", str(root / "test"), "--out", str(root / "x"), "-q", *extra]) == 1
        assert message in " ".join(capsys.readouterr().err.split())


def test_bench_takes_shard_folders_in_its_configuration(project, capsys):
    root, _ = project
    for split in ("train", "test", "noise"):
        out = str(root / f"{split}-s")
        assert main(["extract", str(root / split), "--config", str(root / "model.toml"), "--out", out, "-q"]) == 0
    config = (
        root / "model.toml"
    ).read_text() + '[data]\nfit = "train-s"\nid = "test-s"\n[ood]\n"far:noise" = "noise-s"\n'
    (root / "shards.toml").write_text(config)
    out = root / "bench-out"
    assert main(["bench", str(root / "shards.toml"), "--out", str(out), "-q", "--n-boot", "5", "-d", "msp,energy"]) == 0
    assert set(pd.read_csv(out / "results.csv")["detector"]) == {"msp", "energy"}
    assert main(["bench", str(root / "shards.toml"), "--out", str(out), "-q", "--n-boot", "5", "-d", "odin"]) == 1
    assert "odin run the model on the inputs, but fit, id, noise are shard folders" in " ".join(
        capsys.readouterr().err.split()
    )
