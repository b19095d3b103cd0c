"""A saved guard runs no code from its folder, and every file and setting in it is covered by its seal (an HMAC
signature with a key): tampering is refused with a ValueError naming the file and the field."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

import guard_factory
from oodguard import Guard, load_guard
from oodguard.cli import main
from oodguard.guard_manifest import KEY_ENV, seal

from detector_data import far_outputs, id_outputs

KEY = "k" * 32


@pytest.fixture(scope="module")
def model_guard():
    torch.manual_seed(0)
    model = guard_factory.make_model()
    generator = torch.Generator().manual_seed(1)
    fit, calibration = torch.rand(120, 4, generator=generator), torch.rand(120, 4, generator=generator)
    return Guard(model, "knn", detector_params={"k": 5}).fit(fit).calibrate(calibration, alpha=0.1)


@pytest.fixture(scope="module")
def outputs_guard():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0))
    return guard.calibrate(id_outputs(60, seed=1), alpha=0.05)


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def read(directory):
    return json.loads((directory / "guard.json").read_text())


def write(directory, config, *, reseal: bool = False, key: bytes | None = None):
    """Write guard.json back; ``reseal``: recompute the seal as someone who can write the folder would."""
    if reseal:
        config["seal"] = seal({k: v for k, v in config.items() if k != "seal"}, key)
    (directory / "guard.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------- no code runs
PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
def payload():
    pathlib.Path({marker!r}).write_text("called")
"""


def test_a_planted_payload_never_runs(tmp_path, model_guard, monkeypatch):
    directory = tmp_path / "evil_guard"
    model_guard.save(directory)
    marker = tmp_path / "marker"
    (directory / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    config = read(directory)
    config["model"]["factory"] = "evil:payload"
    write(directory, config, reseal=True)
    monkeypatch.chdir(directory)  # the folder is importable, as with `PYTHONPATH=. oodguard serve evil_guard`
    monkeypatch.syspath_prepend(str(directory))
    with pytest.raises(ValueError, match=r"holds files the guard does not list: evil\.py"):
        load_guard(directory)
    assert main(["serve", str(directory)]) == 1
    (directory / "evil.py").unlink()
    with pytest.raises(ValueError, match="saved with model_factory='evil:payload'. Pass model_factory= to load_guard"):
        load_guard(directory)
    assert main(["serve", str(directory), "--port", "1"]) == 1  # refused before anything listens
    assert not marker.exists() and "evil" not in sys.modules
    loaded = load_guard(directory, model_factory=guard_factory.make_model)  # the caller's factory: fine
    assert loaded.model_factory == "guard_factory:make_model"


@pytest.mark.parametrize("recorded", ["os:abort", "builtins:exit", "shutil:rmtree", "subprocess:getoutput"])
def test_standard_library_callables_named_in_the_folder_are_never_called(tmp_path, model_guard, recorded):
    directory = tmp_path / "g"
    model_guard.save(directory)
    config = read(directory)
    config["model"]["factory"] = recorded
    write(directory, config, reseal=True)
    with pytest.raises(ValueError, match="Pass model_factory= to load_guard"):
        load_guard(directory)
    assert load_guard(directory, model_factory=guard_factory.make_model).model is not None


@pytest.mark.parametrize("factory", ["builtins:dict", "os:getcwd", os.getcwd, dict, "collections:OrderedDict"])
def test_standard_library_callables_as_factories_are_refused(tmp_path, model_guard, factory):
    model_guard.save(tmp_path / "g")
    with pytest.raises(ValueError, match=r"returned a \w+, expected a torch.nn.Module"):
        load_guard(tmp_path / "g", model_factory=factory)


def test_the_factory_must_build_the_saved_architecture_and_weights(tmp_path, model_guard):
    model_guard.save(tmp_path / "g")

    def tanh_instead_of_relu():  # the same state dict, another architecture
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    with pytest.raises(ValueError, match="field 'model.architecture_sha256'.*other architecture"):
        load_guard(tmp_path / "g", model_factory=tanh_instead_of_relu)

    def ignores_the_saved_weights():
        model = guard_factory.make_model()
        model[0] = torch.nn.Linear(4, 8)
        model[0]._load_from_state_dict = lambda *args, **kwargs: None
        return model

    with pytest.raises(ValueError, match="field 'model.weights_sha256'.*other weights"):
        load_guard(tmp_path / "g", model_factory=ignores_the_saved_weights)


def test_a_factory_for_a_model_agnostic_guard_is_refused(tmp_path, outputs_guard):
    outputs_guard.save(tmp_path / "g")
    with pytest.raises(ValueError, match="model-agnostic guard"):
        load_guard(tmp_path / "g", model_factory=guard_factory.make_model)


# ---------------------------------------------------------------------------------------------- every setting
EDITS = [
    ("decision.alpha", lambda c: c["decision"].update(alpha=0.999)),
    ("decision.correction", lambda c: c["decision"].update(correction="simes", delta=0.05)),
    ("decision.rule", lambda c: c["decision"].update(rule="threshold", alpha=None)),
    ("decision.threshold", lambda c: c["decision"].update(threshold=1e9)),
    ("model", lambda c: c.update(model=None)),
    ("input.margin", lambda c: c["input"].update(margin=1000.0)),
    ("input.fields.inputs.high", lambda c: c["input"]["fields"]["inputs"].update(high=255.0)),
    ("detector.name", lambda c: c["detector"].update(name="energy")),
    ("oodguard_version", lambda c: c.update(oodguard_version="9.9")),
]


@pytest.mark.parametrize("field, edit", EDITS, ids=[name for name, _ in EDITS])
def test_an_edited_setting_is_refused_naming_the_field(tmp_path, model_guard, field, edit):
    directory = tmp_path / "g"
    model_guard.save(directory)
    config = read(directory)
    edit(config)
    write(directory, config)
    with pytest.raises(
        ValueError, match=r"guard\.json: field '[\w.]+' was edited after the guard was saved"
    ) as refused:
        load_guard(directory, model_factory=guard_factory.make_model)
    assert f"{field} is " in str(refused.value)  # every edited field is named with its saved value


def test_edited_checksums_seal_unknown_and_missing_fields_are_refused(tmp_path, outputs_guard):
    directory = tmp_path / "g"
    outputs_guard.save(directory)
    original = read(directory)
    cases = [
        (lambda c: c["files"].update({"calibration.safetensors": "0" * 64}), "field 'seal'"),
        (lambda c: c["seal"].update(value="0" * 64), "field 'seal'"),
        (lambda c: c.pop("seal"), "field 'seal' is missing"),
        (lambda c: c.update(extra=1), "field 'extra' is not a setting"),
        (lambda c: c["decision"].update(extra=1), "field 'decision.extra' was edited"),
        (lambda c: c["seal"].update(algorithm="md5"), "field 'seal.algorithm'"),
    ]
    for edit, message in cases:
        config = json.loads(json.dumps(original))
        edit(config)
        write(directory, config)
        with pytest.raises(ValueError, match=message):
            load_guard(directory)
    write(directory, original)
    load_guard(directory)


def test_resealed_but_inconsistent_settings_are_refused(tmp_path, outputs_guard):
    """Without a key anyone can recompute the seal; values that contradict the calibration are still refused."""
    directory = tmp_path / "g"
    outputs_guard.save(directory)
    original = read(directory)
    cases = [
        (lambda c: c["decision"].update(alpha=0.999), "field 'decision.false_alarm_rate'"),
        (lambda c: c["decision"].update(num_calibration=5), "field 'decision.num_calibration'"),
        (lambda c: c["decision"].update(correction="bonferroni", delta=0.1), "field 'decision.correction'"),
        (lambda c: c["input"].update(margin=-1), "field 'input'.margin"),
        (lambda c: c["input"]["fields"]["features"].update(dtype="object"), "features.dtype"),
        (lambda c: c["detector"].update(name="energy"), "field 'detector.name' records 'energy'"),
    ]
    for edit, message in cases:
        config = json.loads(json.dumps(original))
        edit(config)
        write(directory, config, reseal=True)
        with pytest.raises(ValueError, match=message):
            load_guard(directory)


def test_unexpected_files_links_and_folders_are_refused(tmp_path, outputs_guard):
    directory = tmp_path / "g"
    outputs_guard.save(directory)
    for name in ("notes.txt", "detector/extra.safetensors"):
        (directory / name).write_text("x")
        with pytest.raises(ValueError, match=f"holds files the guard does not list: {name}"):
            load_guard(directory)
        (directory / name).unlink()
    (directory / "sub").mkdir()
    with pytest.raises(ValueError, match=r"sub/ \(a folder\)"):
        load_guard(directory)
    (directory / "sub").rmdir()
    (directory / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match=r"link \(a symbolic link\)"):
        load_guard(directory)
    (directory / "link").unlink()
    for name in ("decisions.sqlite", "decisions.sqlite-wal"):  # the service's own log may live beside the guard
        (directory / name).write_bytes(b"")
    load_guard(directory)


# ---------------------------------------------------------------------------------------------- the signing key
def test_a_signed_guard_needs_its_key_and_refuses_any_other(tmp_path, outputs_guard, monkeypatch):
    directory = tmp_path / "g"
    outputs_guard.save(directory, key=KEY)
    assert read(directory)["seal"]["algorithm"] == "hmac-sha256"
    test = far_outputs(3, seed=5)
    np.testing.assert_array_equal(load_guard(directory, key=KEY).guard(test).is_ood, outputs_guard.guard(test).is_ood)
    monkeypatch.setenv(KEY_ENV, KEY)
    load_guard(directory)  # the key from the environment
    with pytest.raises(ValueError, match="field 'seal'.*signature does not match.*another key"):
        load_guard(directory, key="another-key-of-enough-length")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"the guard is signed; set {KEY_ENV}"):
        load_guard(directory)
    # someone who can write the folder but has no key: edits and re-hashes; or signs with a key of their own
    config = read(directory)
    config["decision"]["alpha"] = 0.5
    write(directory, config, reseal=True)
    with pytest.raises(ValueError, match="not signed but a signing key is set"):
        load_guard(directory, key=KEY)
    write(directory, config, reseal=True, key=b"attacker-key-0123456789")
    with pytest.raises(ValueError, match="field 'decision.alpha' was edited"):
        load_guard(directory, key=KEY)


def test_unsigned_and_old_guards_are_refused_when_a_key_is_set(tmp_path, outputs_guard):
    outputs_guard.save(tmp_path / "g")
    with pytest.raises(ValueError, match="not signed but a signing key is set"):
        load_guard(tmp_path / "g", key=KEY)
    config = read(tmp_path / "g")
    for name in ("seal", "input"):
        config.pop(name)
    config["format_version"] = 2
    write(tmp_path / "g", config)
    with pytest.raises(ValueError, match="has no signature, but a signing key is set.*save it again"):
        load_guard(tmp_path / "g", key=KEY)


def test_short_keys_are_refused(tmp_path, outputs_guard, monkeypatch):
    with pytest.raises(ValueError, match="at least 16 bytes"):
        outputs_guard.save(tmp_path / "g", key="short")
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{KEY_ENV}: a signing key needs at least 16 bytes"):
        outputs_guard.save(tmp_path / "g")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["params"].update(k=-1), "parameter 'k' must be"),
        (lambda h: h["params"].update(evil=1), "damaged or was edited"),
        (lambda h: h.update(name="os.system"), "unknown detector 'os.system'"),
        (lambda h: h.update(params=[1]), "damaged or was edited"),
    ],
)
def test_a_detector_rewritten_with_every_digest_recomputed_is_refused_with_a_value_error(
    tmp_path, outputs_guard, edit, message
):
    """Someone who rewrites the detector's header, its digest, the guard's checksum and the seal (no key set) still
    cannot make load_guard fail with anything but a ValueError naming the problem."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from oodguard import persist

    directory = tmp_path / "g"
    outputs_guard.save(directory)
    path = directory / "detector" / "detector.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = json.loads(handle.metadata()[persist.HEADER_KEY])
    edit(header)
    text = json.dumps(header, sort_keys=True)
    digest = persist._digest(text, tensors)
    save_file(tensors, str(path), metadata={persist.HEADER_KEY: text, persist.DIGEST_KEY: digest})
    config = read(directory)
    config["files"]["detector/detector.safetensors"] = persist.sha256_of_file(path)
    write(directory, config, reseal=True)
    with pytest.raises(ValueError, match=message):
        load_guard(directory)
