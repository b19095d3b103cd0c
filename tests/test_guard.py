import copy
import dataclasses
import doctest
import json
import pickle
import time

import numpy as np
import pytest
import torch

import guard_factory
from oodguard import ModelOutputs
from oodguard import guard as guard_module
from oodguard.conformal import benjamini_hochberg, calibration_conditional, conformal_pvalues
from oodguard.detectors import NotFittedError, create
from oodguard.guard import Guard, GuardResult, load_guard
from oodguard.metrics import fpr_at_tpr

from detector_data import far_outputs, head, id_outputs


def scored(values):
    """Outputs whose maxlogit score (minus the largest logit) is exactly ``values``; predictions are class 0."""
    values = np.asarray(values, dtype=np.float64)
    return {"logits": np.stack([-values, -values - 100.0], axis=1)}


def calibrated(values, **kwargs):
    return Guard(detector="maxlogit").calibrate(scored(values), **kwargs)


@pytest.fixture(scope="module")
def knn_guard():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(30, seed=0))
    return guard.calibrate(id_outputs(30, seed=1), tpr=0.95)


def test_doctests():
    failures, attempted = doctest.testmod(guard_module)
    assert attempted > 0 and failures == 0


# ---------------------------------------------------------------------------------------------- decisions
def test_threshold_known_answers():
    guard = calibrated(np.arange(1, 21), tpr=0.95)  # 19 of 20 accepted at s <= 19
    assert guard.threshold_ == 19.0 and guard.rule_ == "threshold"
    assert guard.false_alarm_rate_ == pytest.approx(2 / 21)  # a fresh score lands above the 19th of 21 ranks
    result = guard.guard(scored([18.5, 19.0, 19.5, 25.0]))
    np.testing.assert_array_equal(result.is_ood, [False, False, True, True])
    np.testing.assert_array_equal(result.score, [18.5, 19.0, 19.5, 25.0])
    np.testing.assert_array_equal(result.pvalue, [3 / 21, 3 / 21, 2 / 21, 1 / 21])  # the tie at 19 counts
    np.testing.assert_array_equal(result.prediction, [0, 0, 0, 0])
    assert calibrated(np.arange(1, 21), tpr=1.0).threshold_ == 20.0
    assert calibrated(np.arange(1, 11), tpr=0.7).threshold_ == 7.0  # 0.7 * 10 is 7.000000000000001 in floats
    ties = calibrated([1.0, 2.0, 2.0, 2.0, 3.0], tpr=0.5)
    assert ties.threshold_ == 2.0 and ties.false_alarm_rate_ == pytest.approx(2 / 6)


def test_threshold_follows_the_id_tpr_convention_of_the_metrics(knn_guard):
    ood_scores = knn_guard.score(far_outputs(40, seed=2))
    mixed = id_outputs(5, seed=3).features[:20] * 0.6 + 0.4 * far_outputs(20, seed=4).features
    ood_scores = np.concatenate([ood_scores, knn_guard.score({"features": mixed})])
    accepted = np.mean(ood_scores <= knn_guard.threshold_)
    assert accepted == fpr_at_tpr(knn_guard.calibration_scores_, ood_scores, tpr=0.95)
    assert np.mean(knn_guard.calibration_scores_ <= knn_guard.threshold_) >= 0.95


def test_pvalue_rule_known_answer():
    guard = calibrated(np.arange(1, 20), alpha=0.1)  # n = 19: flag when 1 + #{S_i >= s} <= 2
    assert guard.rule_ == "pvalue" and guard.alpha_ == 0.1
    assert guard.false_alarm_rate_ == pytest.approx(0.1)
    result = guard.guard(scored([17.5, 18.0, 18.5, 30.0]))
    np.testing.assert_array_equal(result.pvalue, [3 / 20, 3 / 20, 2 / 20, 1 / 20])
    np.testing.assert_array_equal(result.is_ood, [False, False, True, True])


def test_guard_result_agrees_with_its_parts(knn_guard):
    test = ModelOutputs.concat([id_outputs(5, seed=5), far_outputs(10, seed=6)])
    result = knn_guard.guard(test)
    assert isinstance(result, GuardResult) and len(result) == 40
    np.testing.assert_array_equal(result.prediction, test.logits.argmax(1).numpy())
    np.testing.assert_array_equal(result.score, knn_guard.detector.score(test))
    np.testing.assert_array_equal(result.pvalue, conformal_pvalues(knn_guard.calibration_scores_, result.score))
    np.testing.assert_array_equal(result.is_ood, result.score > knn_guard.threshold_)
    assert result.is_ood[30:].all() and result.is_ood[:30].mean() < 0.3
    np.testing.assert_array_equal(knn_guard.pvalues(test), result.pvalue)
    assert result.prediction.dtype == np.int64 and result.is_ood.dtype == bool


def test_records_are_plain_python(knn_guard):
    records = knn_guard.guard(far_outputs(2, seed=7)).to_records()
    assert len(records) == 2 and set(records[0]) == {"prediction", "score", "pvalue", "is_ood", "reason"}
    assert [type(v) for v in records[0].values()] == [int, float, float, bool, type(None)]
    json.dumps(records)


def test_features_only_inputs_predict_through_the_fitted_head(knn_guard):
    test = id_outputs(3, seed=8)
    result = knn_guard.guard({"features": test.features.numpy()})
    weight, bias = head()
    np.testing.assert_array_equal(result.prediction, (test.features.numpy() @ weight.T + bias).argmax(1))
    no_head = Guard(detector="knn", detector_params={"k": 3}).fit({"features": id_outputs(30, seed=0).features})
    no_head.calibrate({"features": id_outputs(30, seed=1).features})
    assert (no_head.guard({"features": test.features}).prediction == -1).all()


@pytest.mark.parametrize("correction", ["dkwm", "simes"])
def test_corrected_pvalues(correction):
    rng = np.random.default_rng(0)
    guard = calibrated(rng.normal(size=400), alpha=0.1, correction=correction, delta=0.1)
    test = np.array([-1.0, 1.0, 2.0, 2.5, 5.0])
    result = guard.guard(scored(test))
    marginal = conformal_pvalues(guard.calibration_scores_, test)
    np.testing.assert_allclose(result.pvalue, calibration_conditional(marginal, 400, 0.1, correction))
    np.testing.assert_array_equal(result.is_ood, result.pvalue <= 0.1)
    assert guard.correction_ == correction and guard.delta_ == 0.1
    assert 0 < guard.false_alarm_rate_ <= 0.1
    assert calibrated(rng.normal(size=100), correction="simes").delta_ == 0.05  # default, with the threshold rule


def test_guard_batch_uses_benjamini_hochberg(knn_guard):
    test = ModelOutputs.concat([id_outputs(10, seed=9), far_outputs(6, seed=10)])
    result = knn_guard.guard_batch(test, fdr=0.2)
    np.testing.assert_array_equal(result.is_ood, benjamini_hochberg(result.pvalue, 0.2))
    np.testing.assert_array_equal(result.pvalue, knn_guard.guard(test).pvalue)
    with pytest.raises(ValueError, match="fdr"):
        knn_guard.guard_batch(test, fdr=1.5)


def test_fresh_id_false_alarm_rate_is_near_the_calibrated_one():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(40, seed=11))
    guard.calibrate(id_outputs(60, seed=12), alpha=0.1)
    flagged = guard.guard(id_outputs(150, seed=13)).is_ood.mean()
    assert flagged <= 0.1 + 0.05  # one calibration draw: the rate given it varies by about sqrt(0.09 / 360)


# ---------------------------------------------------------------------------------------------- errors
def test_guard_before_fit_or_calibrate():
    guard = Guard(detector="knn")
    with pytest.raises(NotFittedError, match=r"fit\(id_data\) and then calibrate"):
        guard.guard({"features": np.zeros((1, 4))})
    with pytest.raises(NotFittedError, match=r"fit\(id_data\) before calibrate"):
        guard.calibrate({"features": np.zeros((10, 4))})
    guard.fit(id_outputs(10, seed=0))
    with pytest.raises(NotFittedError, match=r"call calibrate\(id_validation\) before guard"):
        guard.guard(id_outputs(1, seed=1))
    with pytest.raises(NotFittedError, match="calibrate"):
        _ = guard.threshold_
    with pytest.raises(NotFittedError, match="calibrate"):
        guard.save("unused")


def test_refitting_drops_the_calibration():
    guard = calibrated(np.arange(10.0))
    guard.fit(scored(np.arange(5.0)))
    assert not guard.is_calibrated


def test_bad_inputs_are_refused_with_clear_messages(knn_guard):
    with pytest.raises(ValueError, match=r"features: expected shape \[N, D\]"):
        knn_guard.guard({"features": np.zeros(32)})
    nan_row = knn_guard.guard({"features": np.full((1, 32), np.nan)})  # a broken input is decided OOD, with why
    assert nan_row.is_ood[0] and "NaN" in nan_row.reason[0]
    with pytest.raises(
        ValueError, match=r"features rows have shape \[5\], but the guard was fitted on rows of shape \[32\]"
    ):
        knn_guard.guard({"features": np.zeros((1, 5))})
    with pytest.raises(ValueError, match="D=5"):
        knn_guard.detector.score({"features": np.zeros((1, 5))})
    with pytest.raises(ValueError, match="needs features"):
        knn_guard.guard({"logits": np.zeros((1, 6))})
    with pytest.raises(ValueError, match="no model"):
        knn_guard.guard(np.zeros((1, 32)))
    with pytest.raises(ValueError, match="unknown output field"):
        knn_guard.guard({"feature": np.zeros((1, 32))})


def test_bad_calibration_arguments():
    values = np.arange(10.0)
    with pytest.raises(ValueError, match="at least 19 in-distribution"):
        calibrated(values, alpha=0.05)
    with pytest.raises(ValueError, match=r"at least \d+ .*correction='dkwm'|correction='dkwm'.*at least \d+"):
        calibrated(np.arange(50.0), alpha=0.1, correction="dkwm")
    with pytest.raises(ValueError, match="pass correction="):
        calibrated(values, delta=0.1)
    with pytest.raises(ValueError, match="correction"):
        calibrated(values, alpha=0.5, correction="bonferroni")
    with pytest.raises(ValueError, match="tpr"):
        calibrated(values, tpr=0.0)
    with pytest.raises(ValueError, match="alpha"):
        calibrated(values, alpha=1.0)
    labelled = {**scored(values), "labels": np.array([0] * 9 + [-1])}
    with pytest.raises(ValueError, match="labelled OOD"):
        Guard(detector="maxlogit").calibrate(labelled)


def test_calibrating_on_the_fit_data_warns():
    data = id_outputs(10, seed=0)
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(data)
    with pytest.warns(UserWarning, match="identical to the fit data"):
        guard.calibrate(data)


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown detector"):
        Guard(detector="nope")
    with pytest.raises(ValueError, match="detector_params"):
        Guard(detector=create("knn"), detector_params={"k": 2})
    with pytest.raises(TypeError, match="model"):
        Guard("knn")
    with pytest.raises(ValueError, match="only used with a model"):
        Guard(detector="knn", model_factory="guard_factory:make_model")
    with pytest.raises(ValueError, match="package.module:function"):
        Guard(guard_factory.make_model(), model_factory="not a factory")
    with pytest.raises(ValueError, match="cannot be imported by name"):
        Guard(guard_factory.make_model(), model_factory=lambda: guard_factory.make_model())


def test_single_sample_overhead_is_small(knn_guard):
    x = {"features": id_outputs(1, seed=14).features.numpy()[:1]}

    def median_seconds(call):
        times = []
        for _ in range(200):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    knn_guard.guard(x)
    overhead = median_seconds(lambda: knn_guard.guard(x)) - median_seconds(lambda: knn_guard.detector.score(x))
    assert overhead < 1e-3


# ---------------------------------------------------------------------------------------------- model mode
def model_and_data():
    torch.manual_seed(0)
    model = guard_factory.make_model()
    generator = torch.Generator().manual_seed(1)
    in_plane = torch.tensor([1.0, 1.0, 0.0, 0.0])  # ID inputs live in a plane; OOD inputs leave it

    def draw(rows):
        return torch.randn(rows, 4, generator=generator) * in_plane

    far = 4 * torch.randn(4, 4, generator=generator) * (1 - in_plane)
    return model, draw(150), draw(150), torch.cat([draw(6), far])


@pytest.fixture(scope="module")
def model_guard():
    model, fit, calibration, _ = model_and_data()
    guard = Guard(model, "knn", detector_params={"k": 5}, model_factory="guard_factory:make_model")
    return guard.fit(fit).calibrate(calibration, alpha=0.1)


def test_model_mode_runs_the_model(model_guard):
    model, *_, test = model_and_data()
    result = model_guard.guard(test)
    scored = np.array([reason is None for reason in result.reason])
    assert scored[:6].all() and not scored.all()  # the far inputs lie outside the pixel range seen at fit
    with torch.no_grad():
        np.testing.assert_array_equal(result.prediction[scored], model(test).argmax(1).numpy()[scored])
    assert (result.prediction[~scored] == -1).all() and np.isinf(result.score[~scored]).all()
    assert (result.pvalue[~scored] == 0).all()
    assert result.is_ood[6:].all()
    assert model_guard.false_alarm_rate_ <= 0.1
    from oodguard.extraction.extract import extract

    outputs = extract(model_guard.model, test, progress=False)
    # the same rows, batched without the unscored ones: equal up to float32 rounding
    np.testing.assert_allclose(model_guard.guard(outputs).score[scored], result.score[scored], rtol=1e-6)
    unchecked = copy.copy(model_guard)  # the same guard with the range check off: every row is scored
    unchecked.input_contract_ = dataclasses.replace(model_guard.input_contract_, margin=None)
    everything = unchecked.guard(test)
    assert all(reason is None for reason in everything.reason)
    np.testing.assert_array_equal(everything.score, model_guard.guard(outputs).score)


# ---------------------------------------------------------------------------------------------- saving
@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every unpickling route fail, so a load that works provably never unpickles."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def assert_same_results(a, b):
    for field in ("prediction", "score", "pvalue", "is_ood"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_round_trip_model_agnostic(tmp_path, knn_guard, no_unpickling):
    knn_guard.save(tmp_path / "g")
    loaded = load_guard(tmp_path / "g")
    test = ModelOutputs.concat([id_outputs(5, seed=15), far_outputs(10, seed=16)])
    assert_same_results(knn_guard.guard(test), loaded.guard(test))
    assert_same_results(knn_guard.guard_batch(test), loaded.guard_batch(test))
    features_only = {"features": test.features}
    assert_same_results(knn_guard.guard(features_only), loaded.guard(features_only))  # the head came along
    assert loaded.threshold_ == knn_guard.threshold_ and loaded.false_alarm_rate_ == knn_guard.false_alarm_rate_
    config = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert config["format_version"] == guard_module.FORMAT_VERSION and config["model"] is None
    assert config["detector"] == {"name": "knn", "directory": "detector"}
    assert set(config["files"]) == {"calibration.safetensors", "detector/detector.safetensors"}


@pytest.mark.parametrize("correction", [None, "simes"])
def test_round_trip_pvalue_rule(tmp_path, correction):
    rng = np.random.default_rng(1)
    guard = calibrated(rng.normal(size=300), alpha=0.05, correction=correction)
    guard.save(tmp_path / "g")
    loaded = load_guard(tmp_path / "g")
    test = scored(rng.normal(size=50) * 2)
    assert_same_results(guard.guard(test), loaded.guard(test))
    assert (loaded.rule_, loaded.alpha_, loaded.correction_) == ("pvalue", 0.05, correction)


def test_round_trip_model_mode(tmp_path, model_guard, no_unpickling):
    *_, test = model_and_data()
    model_guard.save(tmp_path / "g")
    loaded = load_guard(tmp_path / "g", model_factory="guard_factory:make_model")
    assert loaded.model is not model_guard.model and loaded.model_factory == "guard_factory:make_model"
    assert_same_results(model_guard.guard(test), loaded.guard(test))
    config = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert config["model"]["factory"] == "guard_factory:make_model" and "model.safetensors" in config["files"]
    lambda_loaded = load_guard(tmp_path / "g", model_factory=lambda: guard_factory.make_model())
    assert_same_results(model_guard.guard(test), lambda_loaded.guard(test))
    assert lambda_loaded.model_factory is None  # a lambda cannot be named for the next save


def rewrite_as_version(directory, version, model=None):
    """Rewrite a saved guard as an older release wrote it: no seal, input contract or model fingerprints (and in
    version 1 plain safetensors files without an oodguard header)."""
    from safetensors.torch import save_file, save_model

    from oodguard import persist

    config = json.loads((directory / "guard.json").read_text())
    if version == 1:
        calibration, _ = persist.load(directory / "calibration.safetensors", kind="guard_calibration", versions=1)
        save_file(calibration, str(directory / "calibration.safetensors"))
        if model is not None:
            save_model(model, str(directory / "model.safetensors"))
    for name in ("seal", "input"):
        config.pop(name)
    if config["model"] is not None:
        for name in ("architecture_sha256", "weights_sha256"):
            config["model"].pop(name)
    config["format_version"] = version
    config["files"] = {name: persist.sha256_of_file(directory / name) for name in config["files"]}
    (directory / "guard.json").write_text(json.dumps(config, indent=2, sort_keys=True))


@pytest.mark.parametrize("version", [1, 2])
def test_a_guard_saved_by_the_previous_release_still_loads(tmp_path, model_guard, knn_guard, version, no_unpickling):
    """Versions 1 and 2 (the previous releases) load with the same decisions; their model guards need the factory
    from the caller, like every model guard now."""
    *_, test = model_and_data()
    directory = tmp_path / "g"
    model_guard.save(directory)
    rewrite_as_version(directory, version, model_guard.model)
    with pytest.raises(ValueError, match="Pass model_factory= to load_guard"):
        load_guard(directory)
    loaded = load_guard(directory, model_factory=guard_factory.make_model)
    unchecked = copy.copy(model_guard)  # old guards have no input contract: every row is scored
    unchecked.input_contract_ = None
    assert_same_results(unchecked.guard(test), loaded.guard(test))
    knn_guard.save(tmp_path / "k")
    rewrite_as_version(tmp_path / "k", version)
    test_outputs = ModelOutputs.concat([id_outputs(5, seed=15), far_outputs(10, seed=16)])
    old_guard = load_guard(tmp_path / "k")
    assert_same_results(knn_guard.guard(test_outputs), old_guard.guard(test_outputs))
    broken = test_outputs.features.numpy()[:2].copy()
    broken[1, 0] = np.inf  # no recorded range, but a row that is not finite is still decided OOD, not refused
    result = old_guard.guard({"features": broken})
    assert result.reason[0] is None and result.is_ood[1] and "infinite" in result.reason[1]


@pytest.mark.parametrize("name", ["calibration.safetensors", "detector/detector.safetensors", "model.safetensors"])
def test_tampered_file_is_refused(tmp_path, model_guard, name):
    model_guard.save(tmp_path / "g")
    path = tmp_path / "g" / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}: sha256 checksum mismatch"):
        load_guard(tmp_path / "g", model_factory=guard_factory.make_model)


def edit_config(directory, change):
    path = directory / "guard.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_unknown_version_and_format_are_refused(tmp_path, knn_guard):
    knn_guard.save(tmp_path / "g")
    edit_config(tmp_path / "g", lambda c: c.update(format_version=99))
    with pytest.raises(ValueError, match=r"guard.json: guard format version 99 is not supported"):
        load_guard(tmp_path / "g")
    edit_config(tmp_path / "g", lambda c: c.update(format_version=2) or c["decision"].pop("rule"))
    with pytest.raises(ValueError, match="field 'decision.rule' is missing"):
        load_guard(tmp_path / "g")
    edit_config(tmp_path / "g", lambda c: c.update(format="something.else"))
    with pytest.raises(ValueError, match="not an oodguard guard"):
        load_guard(tmp_path / "g")
    (tmp_path / "g" / "guard.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_guard(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="no saved guard"):
        load_guard(tmp_path / "missing")


def test_files_outside_the_directory_and_unlisted_files_are_refused(tmp_path, knn_guard):
    knn_guard.save(tmp_path / "g")
    rewrite_as_version(tmp_path / "g", 2)  # no seal: the path checks themselves must refuse
    edit_config(tmp_path / "g", lambda c: c.update(calibration="../elsewhere.safetensors"))
    with pytest.raises(ValueError, match="outside the guard directory"):
        load_guard(tmp_path / "g")
    edit_config(tmp_path / "g", lambda c: c.update(calibration="calibration.safetensors", files={}))
    with pytest.raises(ValueError, match="holds files the guard does not list"):
        load_guard(tmp_path / "g")


def test_model_factory_errors(tmp_path, model_guard):
    model_guard.save(tmp_path / "g")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_guard(tmp_path / "g", model_factory="no_such_module_xyz:make_model")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_guard(tmp_path / "g", model_factory="guard_factory:missing")
    with pytest.raises(ValueError, match="returned a int"):
        load_guard(tmp_path / "g", model_factory="guard_factory:not_a_model")
    with pytest.raises(ValueError, match="does not fit the model built by"):
        load_guard(tmp_path / "g", model_factory=guard_factory.make_other_model)
    loaded = load_guard(tmp_path / "g", model_factory=guard_factory.make_model)
    assert loaded.model_factory == "guard_factory:make_model"


def test_saving_a_model_guard_checks_a_given_factory(tmp_path, model_guard):
    model, fit, calibration, test = model_and_data()
    guard = Guard(model, "energy").calibrate(calibration)
    guard.save(tmp_path / "a")  # no factory needed to save: the caller names one at load
    assert json.loads((tmp_path / "a" / "guard.json").read_text())["model"]["factory"] is None
    assert_same_results(
        guard.guard(test), load_guard(tmp_path / "a", model_factory=guard_factory.make_model).guard(test)
    )
    guard.model_factory = "guard_factory:make_other_model"
    with pytest.raises(ValueError, match="does not match"):
        guard.save(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_save_does_not_clobber_directories(tmp_path, knn_guard):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        knn_guard.save(tmp_path / "other")
    with pytest.raises(ValueError, match="holds no saved guard"):
        knn_guard.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    knn_guard.save(tmp_path / "g")
    knn_guard.save(tmp_path / "g", overwrite=True)
    assert load_guard(tmp_path / "g").threshold_ == knn_guard.threshold_
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_fitted_detector_instance_needs_no_fit():
    detector = create("knn", k=3).fit(id_outputs(20, seed=0))
    guard = Guard(detector=detector).calibrate(id_outputs(20, seed=1))
    assert guard.detector is detector and guard.guard(far_outputs(3, seed=2)).is_ood.all()


def test_model_guard_is_safe_under_concurrent_calls(model_guard):
    """Extraction hooks the shared model, so concurrent requests must not see each other's features."""
    from concurrent.futures import ThreadPoolExecutor

    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(size, 4, generator=generator) for size in (1, 3, 8, 2, 5, 7, 4, 6) * 6]
    expected = [model_guard.guard(batch).score for batch in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda batch: model_guard.guard(batch).score, batches))
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want, have)


def test_saving_over_a_guard_keeps_other_files(tmp_path, knn_guard):
    knn_guard.save(tmp_path / "g")
    (tmp_path / "g" / "decisions.sqlite").write_bytes(b"log")
    knn_guard.save(tmp_path / "g", overwrite=True)
    assert (tmp_path / "g" / "decisions.sqlite").read_bytes() == b"log"
    load_guard(tmp_path / "g")  # the service's decision log is the one file a guard folder may hold besides its own


class DictModel(torch.nn.Module):
    """The guarded test model returning a dict, as many real models do."""

    def __init__(self):
        super().__init__()
        self.inner = guard_factory.make_model()

    def forward(self, x):
        return {"embedding": x.sum(1, keepdim=True), "scores": self.inner(x)}


@pytest.mark.parametrize("detector, params", [("knn", {"k": 5}), ("odin", {"temperature": 10.0, "epsilon": 0.001})])
def test_a_model_returning_a_dict_is_guarded_saved_and_loaded_with_output_key(tmp_path, detector, params):
    model, fit, calibration, test = model_and_data()
    wrapped = DictModel()
    wrapped.inner.load_state_dict(model.state_dict())
    guard = Guard(wrapped, detector, detector_params=params, output_key="scores").fit(fit).calibrate(calibration)
    plain = Guard(model, detector, detector_params=params).fit(fit).calibrate(calibration)
    np.testing.assert_allclose(guard.score(test), plain.score(test), rtol=1e-5, atol=1e-6)
    guard.save(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "guard.json").read_text())["model"]["output_key"] == "scores"
    loaded = load_guard(tmp_path / "g", model_factory=DictModel)
    assert loaded.output_key == "scores"
    assert_same_results(guard.guard(test), loaded.guard(test))
    with pytest.raises(ValueError, match="output_key"):
        Guard(detector="energy", output_key="scores")
