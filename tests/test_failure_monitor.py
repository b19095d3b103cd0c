"""The learned failure monitor: known answers (scikit-learn's logistic regression, calibration on a well-specified
model, AUROC 1 on a deterministic failure rule), the guard's results and service responses carrying it, saving and
loading with the guard's integrity checks, and bad input."""

from __future__ import annotations

import json
import sqlite3
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from oodguard import Guard, load_guard
from oodguard.failure_monitor import FEATURES, FailureMonitor, fit_logistic, summary_features
from oodguard.guard_manifest import KEY_ENV, seal
from oodguard.serve import create_app, read_decisions
from oodguard.serve.store import DecisionLog

from detector_data import far_outputs, id_outputs

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------- the features
def test_summary_features_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    x = summary_features(np.array([0.5, -1.0]), logits)
    e = np.exp(2.0)
    p = np.array([e, 1.0, 1.0]) / (e + 2.0)
    entropy = -float(np.sum(p * np.log(p)))
    np.testing.assert_allclose(x[0], [0.5, p[0], p[0] - p[1], entropy], rtol=1e-12)
    np.testing.assert_allclose(x[1], [-1.0, 1 / 3, 0.0, np.log(3.0)], rtol=1e-12, atol=1e-15)
    assert summary_features(np.array([1.0]), None).tolist() == [[1.0]]


# ---------------------------------------------------------------------------------------------- known answers
def test_logistic_regression_matches_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 4)) * [1.0, 3.0, 0.2, 1.0]
    y = (rng.random(1500) < sigmoid(x @ [1.0, -0.5, 2.0, 0.0] - 0.7)).astype(float)
    for c in (1.0, 0.05):
        coef, intercept, _ = fit_logistic(x, y, c)
        reference = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(x, y)
        np.testing.assert_allclose(coef, reference.coef_[0], atol=1e-6)
        assert intercept == pytest.approx(reference.intercept_[0], abs=1e-6)


def test_the_monitor_fits_scikit_learn_on_its_standardised_summaries():
    rng = np.random.default_rng(1)
    scores, logits = rng.normal(size=800), rng.normal(size=(800, 5)) * 2
    x = summary_features(scores, logits)
    failed = rng.random(800) < sigmoid(1.5 * scores - 2.0 * x[:, 1])
    monitor = FailureMonitor().fit(scores, logits, failed)
    assert monitor.features_ == FEATURES
    standardised = (x - x.mean(axis=0)) / x.std(axis=0)
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(standardised, failed)
    np.testing.assert_allclose(monitor.coef_, reference.coef_[0], atol=1e-6)
    np.testing.assert_allclose(monitor.predict_proba(scores, logits), reference.predict_proba(standardised)[:, 1],
                               atol=1e-6)  # fmt: skip


@pytest.mark.filterwarnings("ignore:fit_failure_monitor")
def test_probabilities_are_calibrated_when_failure_follows_a_logistic_law_of_the_score():
    """failed ~ Bernoulli(sigmoid(2 s - 1)): the monitor's model is then exact, and its probabilities must recover
    the true ones. With 20,000 rows the maximum-likelihood estimate of (slope, intercept) has standard errors of
    about 0.03 and 0.02, so the fitted probability differs from the true one by at most about 0.01 (three standard
    errors) over s in [-2, 2]; 0.02 leaves room for the small L2 penalty. The binned reliability (mean predicted vs
    observed failure rate in deciles of the prediction, 2,000 rows each: binomial standard error <= 0.011) must agree
    within 0.035, and the mean prediction equals the failure rate exactly (unpenalised intercept)."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=20_000)
    truth = sigmoid(2.0 * scores - 1.0)
    failed = rng.random(20_000) < truth
    monitor = FailureMonitor().fit(scores, None, failed)
    probability = monitor.predict_proba(scores, None)
    grid = np.linspace(-2, 2, 41)
    np.testing.assert_allclose(monitor.predict_proba(grid, None), sigmoid(2.0 * grid - 1.0), atol=0.02)
    assert probability.mean() == pytest.approx(failed.mean(), abs=1e-9)
    deciles = np.array_split(np.argsort(probability), 10)
    for rows in deciles:
        assert abs(probability[rows].mean() - failed[rows].mean()) < 0.035
    assert monitor.fit_auroc_ > 0.8


def test_a_failure_rule_of_the_score_is_learned_perfectly():
    """failed = (s > 0.7): from the score alone the probability is increasing in the score, so it ranks every
    failure above every success (AUROC exactly 1); with softmax summaries that carry no information beside it, their
    small fitted coefficients may swap a few pairs at the boundary (AUROC >= 0.9999). The flag at recall 0.95
    catches at least 95% of the failures."""
    rng = np.random.default_rng(3)
    scores, logits = rng.normal(size=2000), rng.normal(size=(2000, 4))
    failed = scores > 0.7
    with pytest.warns(UserWarning, match="OOD score alone"):
        assert FailureMonitor().fit(scores, None, failed).fit_auroc_ == 1.0
    monitor = FailureMonitor(recall=0.95).fit(scores, logits, failed)
    assert monitor.fit_auroc_ >= 0.9999
    probability = monitor.predict_proba(scores, logits)
    flags = monitor.flag(probability)
    assert flags[failed].mean() >= 0.95 and monitor.fit_recall_ >= 0.95
    assert flags[~failed].mean() < 0.05  # the rule is sharp: few successes are flagged
    assert monitor.fit_flag_rate_ == pytest.approx(flags.mean())


def test_deterministic():
    rng = np.random.default_rng(4)
    scores, logits = rng.normal(size=300), rng.normal(size=(300, 3))
    failed = rng.random(300) < sigmoid(scores)
    a, b = FailureMonitor().fit(scores, logits, failed), FailureMonitor().fit(scores, logits, failed)
    assert a.coef_.tobytes() == b.coef_.tobytes() and a.threshold_ == b.threshold_


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.filterwarnings("ignore:fit_failure_monitor")
@pytest.mark.parametrize(
    ("failed", "message"),
    [
        (np.zeros(99, bool), "99 outcomes for 100 rows"),
        (np.zeros(100, bool), "all 100 outcomes are successes"),
        (np.ones(100, bool), "all 100 outcomes are failures"),
        (np.r_[np.ones(3, bool), np.zeros(97, bool)], "3 failures and 97 successes"),
        (np.r_[np.nan, np.ones(50), np.zeros(49)], "row 0 is NaN"),
        (np.r_[2.0, np.ones(50), np.zeros(49)], "booleans or 0/1"),
        (np.array(["yes"] * 100), "dtype"),
        (np.zeros((100, 1), bool), "1-D"),
    ],
)
def test_bad_outcomes_are_refused(failed, message):
    with pytest.raises(ValueError, match=message):
        FailureMonitor().fit(np.linspace(0, 1, 100), None, failed)


@pytest.mark.filterwarnings("ignore:fit_failure_monitor")
def test_non_finite_scores_and_bad_parameters_are_refused():
    failed = np.arange(100) % 2 == 0
    with pytest.raises(ValueError, match="row 5 has a non-finite OOD score"):
        FailureMonitor().fit(np.where(np.arange(100) == 5, np.nan, 1.0), None, failed)
    for params, name in [({"c": 0}, "c"), ({"recall": 1.5}, "recall"), ({"min_per_class": 0}, "min_per_class")]:
        with pytest.raises(ValueError, match=name):
            FailureMonitor(**params)


# ---------------------------------------------------------------------------------------------- in a guard
def production(n: int, seed: int):
    """``n`` logged production outputs (n a multiple of 12): half ID, half far; the system fails on the far half and
    on every tenth ID row."""
    half = n // 2
    inside, far = id_outputs(half // 6, seed=seed), far_outputs(half, seed=seed)
    logits = np.concatenate([inside.logits.numpy(), far.logits.numpy()])
    features = np.concatenate([inside.features.numpy(), far.features.numpy()])
    failed = np.r_[np.arange(half) % 10 == 0, np.ones(half, bool)]
    return {"logits": logits, "features": features}, failed


@pytest.fixture(scope="module")
def monitored():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0))
    guard.calibrate(id_outputs(60, seed=1), alpha=0.05)
    logged, failed = production(204, seed=5)
    return guard.fit_failure_monitor(logged, failed)


def test_guard_results_carry_the_failure_probability(monitored):
    logged, _ = production(48, seed=9)
    result = monitored.guard(logged)
    expected = monitored.failure_monitor_.predict_proba(monitored.score(logged), logged["logits"])
    np.testing.assert_allclose(result.failure_probability, expected, rtol=1e-12)
    assert result.failure_flag.tolist() == (expected >= monitored.failure_monitor_.threshold_).tolist()
    assert result.failure_flag[24:].all()  # far rows: the system failed on all of those in the log
    frame = result.to_pandas()
    assert list(frame.columns)[-2:] == ["failure_probability", "failure_flag"]
    record = result.to_records()[0]
    assert record["failure_probability"] == pytest.approx(expected[0]) and isinstance(record["failure_flag"], bool)
    batch = monitored.guard_batch(logged, fdr=0.1)
    np.testing.assert_allclose(batch.failure_probability, expected, rtol=1e-12)


def test_unscored_rows_get_no_probability_and_are_flagged(monitored):
    logged, _ = production(12, seed=9)
    logged["logits"][1] = 1e9  # far outside the range seen at fit: decided OOD without scoring
    result = monitored.guard(logged)
    assert result.reason[1] is not None and np.isnan(result.failure_probability[1]) and result.failure_flag[1]
    assert result.to_records()[1]["failure_probability"] is None
    assert not np.isnan(np.delete(result.failure_probability, 1)).any()


def test_a_guard_without_a_monitor_is_unchanged(tmp_path):
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0)).calibrate(id_outputs(60, 1))
    result = guard.guard(production(12, seed=3)[0])
    assert result.failure_probability is None and result.failure_flag is None
    assert list(result.to_pandas().columns) == ["prediction", "score", "pvalue", "is_ood", "reason"]
    assert set(result.to_records()[0]) == {"prediction", "score", "pvalue", "is_ood", "reason"}
    guard.save(tmp_path / "g")
    assert "failure_monitor" not in json.loads((tmp_path / "g" / "guard.json").read_text())
    assert not (tmp_path / "g" / "failure_monitor.safetensors").exists()


def test_refitting_the_detector_drops_the_monitor():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0))
    logged, failed = production(120, seed=5)
    guard.fit_failure_monitor(logged, failed)
    assert guard.failure_monitor_ is not None
    with pytest.warns(UserWarning, match="failure monitor .* is dropped"):
        assert guard.fit(id_outputs(60, seed=2)).failure_monitor_ is None


def test_rows_outside_the_input_contract_are_named_when_fitting():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0))
    guard.calibrate(id_outputs(60, seed=1), alpha=0.05)
    logged, failed = production(120, seed=5)
    logged["logits"][[3, 7]] = 1e9  # decided OOD without scoring at run time
    outside = sum(reason is not None for reason in guard.guard(logged).reason)
    assert outside >= 2
    with pytest.warns(UserWarning, match=f"{outside} of 120 rows are outside the input contract"):
        guard.fit_failure_monitor(logged, failed)


def test_a_guard_without_logits_learns_from_the_score_and_says_so():
    guard = Guard(detector="knn", detector_params={"k": 3}).fit({"features": id_outputs(60, 0).features})
    logged, failed = production(120, seed=5)
    with pytest.warns(UserWarning, match="OOD score alone"):
        guard.fit_failure_monitor({"features": logged["features"]}, failed)
    assert guard.failure_monitor_.features_ == ("ood_score",)


def test_fit_failure_monitor_needs_a_fitted_detector():
    with pytest.raises(Exception, match="fit"):
        Guard(detector="knn").fit_failure_monitor(production(120, 5)[0], production(120, 5)[1])


# ---------------------------------------------------------------------------------------------- saving
def test_save_load_round_trip(monitored, tmp_path):
    monitored.save(tmp_path / "g")
    loaded = load_guard(tmp_path / "g")
    a, b = monitored.failure_monitor_, loaded.failure_monitor_
    for name in ("mean_", "scale_", "coef_"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert (a.intercept_, a.threshold_, a.features_, a.n_fit_, a.fit_auroc_) == (
        b.intercept_, b.threshold_, b.features_, b.n_fit_, b.fit_auroc_)  # fmt: skip
    logged, _ = production(24, seed=11)
    first, second = monitored.guard(logged), loaded.guard(logged)
    assert first.failure_probability.tobytes() == second.failure_probability.tobytes()
    assert first.failure_flag.tolist() == second.failure_flag.tolist()


def test_a_tampered_monitor_is_refused(monitored, tmp_path):
    monitored.save(tmp_path / "g")
    path = tmp_path / "g" / "failure_monitor.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="failure_monitor.safetensors: sha256 checksum mismatch"):
        load_guard(tmp_path / "g")


@pytest.mark.filterwarnings("ignore:fit_failure_monitor")
def test_a_rewritten_monitor_with_a_matching_checksum_is_refused_when_signed(monitored, tmp_path, monkeypatch):
    """Someone who rewrites the monitor and updates its checksum must also re-seal; with a key they cannot."""
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    monitored.save(tmp_path / "g")
    other = FailureMonitor(recall=0.5).fit(*(lambda s: (s, None, s > 0))(np.linspace(-1, 1, 100)))
    other.save(tmp_path / "g" / "failure_monitor.safetensors")
    config = json.loads((tmp_path / "g" / "guard.json").read_text())
    from oodguard.persist import sha256_of_file

    config["files"]["failure_monitor.safetensors"] = sha256_of_file(tmp_path / "g" / "failure_monitor.safetensors")
    config["seal"] = seal({k: v for k, v in config.items() if k != "seal"}, None)
    (tmp_path / "g" / "guard.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="seal"):
        load_guard(tmp_path / "g")


def test_removing_the_monitor_setting_is_refused(monitored, tmp_path):
    monitored.save(tmp_path / "g")
    config = json.loads((tmp_path / "g" / "guard.json").read_text())
    del config["failure_monitor"]
    (tmp_path / "g" / "guard.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="failure_monitor"):
        load_guard(tmp_path / "g")


# ---------------------------------------------------------------------------------------------- the service
def test_service_responses_and_decision_log_carry_the_monitor(monitored, tmp_path):
    logged, _ = production(12, seed=13)
    rows = {"logits": logged["logits"].tolist(), "features": logged["features"].tolist()}
    log = tmp_path / "decisions.sqlite"
    with TestClient(create_app(monitored, log_url=str(log))) as client:
        body = client.post("/v1/score", json=rows).json()
        schema = client.get("/openapi.json").json()["components"]["schemas"]["ScoreResponse"]["properties"]
    expected = monitored.guard({name: np.asarray(v, np.float32) for name, v in rows.items()})
    assert body["failure_probabilities"] == pytest.approx(expected.failure_probability.tolist())
    assert body["failure_flags"] == expected.failure_flag.tolist()
    assert {"failure_probabilities", "failure_flags"} <= set(schema)
    logged_rows = read_decisions(log)
    assert logged_rows["failure_probability"].tolist() == pytest.approx(body["failure_probabilities"])
    assert logged_rows["failure_flag"].astype(bool).tolist() == body["failure_flags"]


def test_service_without_a_monitor_answers_as_before(tmp_path):
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(id_outputs(60, seed=0)).calibrate(id_outputs(60, 1))
    with TestClient(create_app(guard, log_url=str(tmp_path / "d.sqlite"))) as client:
        body = client.post("/v1/score", json={"features": id_outputs(2, 3).features.tolist()}).json()
    assert set(body) == {"request_id", "predictions", "scores", "pvalues", "is_ood", "reasons"}
    assert read_decisions(tmp_path / "d.sqlite")["failure_probability"].isna().all()


def test_an_old_decision_log_gains_the_new_columns(tmp_path):
    """A log written before the failure monitor existed (no such columns) is migrated when opened."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE oodguard_decisions (id INTEGER PRIMARY KEY, timestamp FLOAT NOT NULL, request_id VARCHAR(64) "
            "NOT NULL, batch_index INTEGER NOT NULL, prediction INTEGER, score FLOAT NOT NULL, pvalue FLOAT, is_ood "
            "BOOLEAN NOT NULL, reason TEXT, replica VARCHAR(128))"
        )
        connection.execute("INSERT INTO oodguard_decisions VALUES (1, 0.0, 'old', 0, 1, 0.5, 0.3, 0, NULL, 'h:1')")
    with DecisionLog(path) as decisions:
        decisions.log("new", predictions=[2], scores=[0.1], pvalues=[0.9], is_ood=[False], failure_probabilities=[0.25],
                      failure_flags=[True], timestamp=1.0).result(timeout=10)  # fmt: skip
    frame = read_decisions(path)
    assert frame["request_id"].tolist() == ["old", "new"]
    assert np.isnan(frame["failure_probability"][0]) and frame["failure_probability"][1] == 0.25
    assert frame["failure_flag"].tolist()[1] in (True, 1)


def test_monitor_on_model_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(200, 4)).astype(np.float32))
    guard = Guard(model, detector="energy").fit(x[:60]).calibrate(x[60:120])
    logged = torch.cat([x[120:], 6 * x[120:]])
    failed = np.r_[np.zeros(80, bool), np.ones(80, bool)]
    guard.fit_failure_monitor(logged, failed)
    result = guard.guard(logged[:5])
    with torch.no_grad():
        logits = model(logged[:5])
    expected = guard.failure_monitor_.predict_proba(guard.score(logged[:5]), logits)
    np.testing.assert_allclose(result.failure_probability, expected, rtol=1e-6)


def test_fitting_the_monitor_on_the_detectors_fit_data_warns():
    fit = id_outputs(20, seed=0)
    guard = Guard(detector="knn", detector_params={"k": 3}).fit(fit)
    failed = np.arange(len(fit)) % 3 == 0
    with pytest.warns(UserWarning, match="identical to the detector's fit data"):
        guard.fit_failure_monitor(fit, failed)
