"""The command line (`oodguard eval`, `oodguard detectors`, errors) and the feature-file reader."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file

from oodguard import ModelOutputs
from oodguard.cli import main
from oodguard.outputs import read_outputs

from detector_data import far_outputs, id_outputs


def write_npz(path, outputs: ModelOutputs, with_head: bool = True) -> None:
    arrays = {"logits": outputs.logits.numpy(), "features": outputs.features.numpy()}
    if outputs.labels is not None:
        arrays["labels"] = outputs.labels.numpy()
    if with_head and outputs.head is not None:
        arrays["head_weight"], arrays["head_bias"] = (t.numpy() for t in outputs.head)
    np.savez(path, **arrays)


def test_read_outputs_formats(tmp_path):
    data = id_outputs(4, seed=1)
    write_npz(tmp_path / "a.npz", data)
    save_file({"logits": data.logits.numpy(), "head.weight": data.head[0].numpy(), "head.bias": data.head[1].numpy(),
               "features": data.features.numpy()}, str(tmp_path / "b.safetensors"))  # fmt: skip
    data.save(tmp_path / "c.safetensors")
    for name in ("a.npz", "b.safetensors", "c.safetensors"):
        loaded = read_outputs(tmp_path / name)
        assert torch.equal(loaded.features, data.features) and torch.equal(loaded.head[0], data.head[0])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"logit": np.zeros((2, 3))}, "unknown array"),
        ({"logits": np.zeros((2, 3)), "head_weight": np.zeros((3, 4))}, "both its weight and its bias"),
        ({"logits": np.array([[np.nan, 0.0]])}, "logits: contains 1 NaN"),
    ],
)
def test_read_outputs_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        read_outputs(tmp_path / "x.npz")


def test_read_outputs_refuses_pickles_and_unknown_types(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "objects.npy").rename(tmp_path / "objects.npz")
    with pytest.raises(ValueError, match="npz"):
        read_outputs(tmp_path / "objects.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_outputs(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        read_outputs(tmp_path / "missing.npz")


def test_eval_command_end_to_end(tmp_path, capsys):
    write_npz(tmp_path / "fit.npz", id_outputs(40, seed=1))
    write_npz(tmp_path / "id.npz", id_outputs(10, seed=2), with_head=False)
    write_npz(tmp_path / "far.npz", far_outputs(50, seed=3), with_head=False)
    write_npz(tmp_path / "near.npz", id_outputs(5, seed=4).with_fields(labels=None), with_head=False)
    code = main(["eval", "--fit", str(tmp_path / "fit.npz"), "--id", str(tmp_path / "id.npz"),
                 "--ood", f"far:cluster={tmp_path / 'far.npz'}", "--ood", f"near:copy={tmp_path / 'near.npz'}",
                 "-d", "msp,energy", "-d", "vim", "--out", str(tmp_path / "out"), "--n-boot", "20", "-q",
                 "-p", "vim.dim=3", "-p", "energy.temperature=2.5"])  # fmt: skip
    assert code == 0
    shown = capsys.readouterr().out
    assert "vim" in shown and "report:" in shown
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {row["detector"] for row in payload["leaderboard"]} == {"msp", "energy", "vim"}
    assert {row["ood_set"] for row in payload["results"]} == {"cluster", "copy"}
    assert payload["settings"]["params"] == {"vim": {"dim": 3}, "energy": {"temperature": 2.5}}


def test_eval_lists_what_it_skipped_and_fails_loudly_on_requested_detectors(tmp_path, capsys):
    write_npz(tmp_path / "fit.npz", id_outputs(40, seed=1), with_head=False)  # no head: several detectors cannot run
    write_npz(tmp_path / "id.npz", id_outputs(10, seed=2), with_head=False)
    write_npz(tmp_path / "far.npz", far_outputs(50, seed=3), with_head=False)
    common = ["eval", "--fit", str(tmp_path / "fit.npz"), "--id", str(tmp_path / "id.npz"), "--ood",
              f"far:cluster={tmp_path / 'far.npz'}", "--n-boot", "5", "-q"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "all"), "--scores", str(tmp_path / "scores.csv")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    payload = json.loads((tmp_path / "all" / "results.json").read_text())
    skipped = payload["skipped"]
    assert "needs head, which the outputs lack" in skipped["vim"] and "vim: needs head" in shown
    assert "needs parameter label_embeddings (--param mcm.label_embeddings=...)" in skipped["mcm"]
    assert "runs the model itself" in skipped["odin"]
    ran = {row["detector"] for row in payload["leaderboard"]}
    assert not ran & set(skipped) and len(ran) + len(skipped) >= 30
    assert "Not run (" in (tmp_path / "all" / "leaderboard.md").read_text()
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert set(scores.columns) == {"detector", "set", "index", "score"}
    ok = {row["detector"] for row in payload["status"] if row["status"] == "ok"}
    assert set(scores["detector"]) == ok and ok
    msp_id = scores[(scores["detector"] == "msp") & (scores["set"] == "id")].sort_values("index")
    assert len(msp_id) == len(id_outputs(10, seed=2)) and msp_id["index"].tolist() == list(range(len(msp_id)))
    code = main([*common, "--out", str(tmp_path / "asked"), "-d", "vim,msp"])  # vim needs the head: it fails
    assert code == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "vim failed: ValueError:" in error and "head" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "nope"], "unknown benchmark 'nope'"),
        (["bench", "digits", "-d", "msp,bogus"], "unknown detector(s) bogus"),
        (["eval", "--fit", "missing.npz", "--id", "x.npz", "--ood", "a=b.npz"], "no such file"),
        (["eval", "--fit", "f.npz", "--id", "x.npz", "--ood", "nonsense"], "expected [GROUP:]NAME=FILE"),
        (["bench"], "Missing argument"),
        (["eval", "--fit", "f.npz", "--id", "x.npz", "--ood", "a=x.npz", "-p", "knn=3"], "expected DETECTOR.NAME="),
        (["eval", "--fit", "f.npz", "--id", "x.npz", "--ood", "a=x.npz", "-p", "nope.k=3"], "unknown detector 'no"),
        (
            ["eval", "--fit", "f.npz", "--id", "x.npz", "--ood", "a=x.npz", "-d", "knn", "-p", "knn.k=0"],
            "knn: parameter 'k'",
        ),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("f.npz", "x.npz"):
        write_npz(tmp_path / name, id_outputs(3, seed=1))
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_detectors_command_lists_the_registry(capsys):
    assert main(["detectors"]) == 0
    shown = capsys.readouterr().out
    for name in ("msp", "vim", "knn", "mos"):
        assert name in shown
