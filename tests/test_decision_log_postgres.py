"""The decision log on a real PostgreSQL server: the same API and results as on SQLite.

The server (Debian's postgresql package) is started once per session on a free loopback port by the
``postgres_server`` fixture (tests/postgres_server.py); each test gets a database of its own.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from oodguard.serve.store import DecisionLog, read_decisions, read_info, summarise

from postgres_server import PostgresServer, PostgresUnavailable

_databases = itertools.count()


@pytest.fixture
def pg_url(postgres_server):
    """A fresh, empty database on the session's server (dropped afterwards): tests do not see each other's rows."""
    name = f"decisions_{next(_databases)}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


def log_batch(log: DecisionLog, request: str, n: int, timestamp: float, ood_every: int = 0) -> None:
    is_ood = [bool(ood_every) and i % ood_every == 0 for i in range(n)]
    log.log(request, predictions=list(range(n)), scores=np.linspace(0, 1, n), pvalues=np.full(n, 0.5),
            is_ood=is_ood, timestamp=timestamp)  # fmt: skip


def write_sample(url_or_path) -> None:
    with DecisionLog(url_or_path, alpha=0.05, significance=0.02) as log:
        log.log("a", predictions=np.array([2, 0]), scores=np.array([0.5, 3.0], dtype=np.float32),
                pvalues=None, is_ood=np.array([False, True]), timestamp=12.5)  # fmt: skip
        log.log("b", predictions=None, scores=[1.0], pvalues=[0.25], is_ood=[False], timestamp=13.0)
        log.log("c", predictions=[7], scores=[np.inf], pvalues=[float("nan")], is_ood=[True], timestamp=1e9 + 0.125)
        assert log.flush(timeout=10)
        assert log.rows_written == 4 and log.rows_failed == 0


def test_rows_and_info_round_trip(pg_url, tmp_path):
    write_sample(pg_url)
    frame = read_decisions(pg_url)
    assert frame[["request_id", "batch_index", "is_ood"]].values.tolist() == [
        ["a", 0, False], ["a", 1, True], ["b", 0, False], ["c", 0, True],
    ]  # fmt: skip
    assert frame["prediction"].tolist()[:2] == [2, 0] and pd.isna(frame["prediction"].iloc[2])
    assert frame["pvalue"].isna().tolist() == [True, True, False, True]
    assert frame["timestamp"].tolist() == [12.5, 12.5, 13.0, 1e9 + 0.125]  # double precision, not single
    assert frame["score"].tolist() == [0.5, 3.0, 1.0, np.inf]
    assert read_info(pg_url) == {"alpha": 0.05, "significance": 0.02}
    assert read_decisions(pg_url, since=13.0)["request_id"].tolist() == ["b", "c"]
    # The same writes to SQLite read back as the same frame, column types included.
    write_sample(tmp_path / "log.sqlite")
    pd.testing.assert_frame_equal(frame, read_decisions(tmp_path / "log.sqlite"))


def test_summarise_matches_sqlite(pg_url, tmp_path):
    for location in (pg_url, tmp_path / "log.sqlite"):
        with DecisionLog(location, alpha=0.05) as log:
            log_batch(log, "quiet-1", n=100, timestamp=0.0, ood_every=20)  # 5 % OOD: as calibrated
            log_batch(log, "quiet-2", n=100, timestamp=59.9, ood_every=20)
            log_batch(log, "shifted", n=100, timestamp=125.0, ood_every=2)  # 50 % OOD, two windows later
    summary = summarise(pg_url, window_seconds=60)
    assert summary.attrs["alpha"] == 0.05 and summary.attrs["significance"] == 0.01
    assert summary["requests"].tolist() == [2, 1]
    assert summary["n"].tolist() == [200, 100] and summary["n_ood"].tolist() == [10, 50]
    assert summary["alert"].tolist() == [False, True]
    assert summary["start"].iloc[1] == pd.Timestamp(120, unit="s", tz="UTC")
    pd.testing.assert_frame_equal(summary, summarise(tmp_path / "log.sqlite", window_seconds=60))
    pooled = summarise(pg_url, window_seconds=3600, alpha=0.5)
    assert pooled["n"].tolist() == [300] and pooled["alert"].tolist() == [False]


def test_empty_log_and_not_a_log(pg_url):
    with DecisionLog(pg_url):
        pass
    assert read_decisions(pg_url).empty and read_info(pg_url) == {}
    assert summarise(pg_url).empty
    other = pg_url.rsplit("/", 1)[0] + "/postgres"  # the server's default database: no decision log tables
    with pytest.raises(ValueError, match="not an oodguard decision log"):
        read_decisions(other)


def test_two_replicas_write_concurrently(pg_url):
    """Two DecisionLog instances on one database, as two service replicas, each fed by 4 request threads."""
    replicas = [DecisionLog(pg_url, alpha=0.05, max_pending=16, batch_rows=50) for _ in range(2)]

    def client(log: DecisionLog, k: int) -> None:
        for j in range(100):
            log_batch(log, f"{k}-{j}", n=1 + j % 3, timestamp=float(j), ood_every=2)

    threads = [threading.Thread(target=client, args=(replicas[k % 2], k)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in replicas:
        log.close()
    expected = 8 * sum(1 + j % 3 for j in range(100))
    assert sum(log.rows_written for log in replicas) == expected
    assert [log.rows_failed for log in replicas] == [0, 0]
    frame = read_decisions(pg_url)
    assert len(frame) == expected and frame["id"].is_unique
    assert frame.groupby("request_id").size().to_dict() == {f"{k}-{j}": 1 + j % 3 for k in range(8) for j in range(100)}
    assert summarise(pg_url, window_seconds=1000)["n"].tolist() == [expected]
    assert read_info(pg_url) == {"alpha": 0.05}


def open_at_once(url: str, replicas: int, **settings) -> list[BaseException]:
    """Start ``replicas`` DecisionLogs on ``url`` at the same moment, log 2 rows with each; the errors raised."""
    errors: list[BaseException] = []
    logs: list[DecisionLog] = []
    barrier = threading.Barrier(replicas)

    def replica() -> None:
        barrier.wait()
        try:
            logs.append(DecisionLog(url, **settings))
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=replica) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log_batch(log, "r", n=2, timestamp=0.0)
        log.close()
    return errors


# Replicas started together share the log: table creation retries and settings are stored by an upsert.
def test_replicas_start_together_on_a_new_database(pg_url):
    errors = open_at_once(pg_url, 4)
    assert errors == []
    assert len(read_decisions(pg_url)) == 8


def test_replicas_start_together_and_store_the_settings(pg_url):
    DecisionLog(pg_url).close()  # the tables exist: only the settings are written concurrently
    errors = open_at_once(pg_url, 8, alpha=0.05, significance=0.01)
    assert errors == []
    assert len(read_decisions(pg_url)) == 16
    assert read_info(pg_url) == {"alpha": 0.05, "significance": 0.01}


def test_password_is_hidden(postgres_server, pg_url):
    secret = "s3cret-pw"
    url = sa.engine.make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    assert secret in url
    with DecisionLog(url, alpha=0.05) as log:  # trust authentication: the password is accepted and unused
        assert secret not in repr(log) and "***" in repr(log)
        log_batch(log, "a", n=3, timestamp=0.0)
    assert len(read_decisions(url)) == 3
    closed = sa.engine.make_url(url).set(port=postgres_server.port, host="127.0.0.2")  # nothing listens there
    with pytest.raises(ValueError, match="cannot open") as refused:
        DecisionLog(closed.render_as_string(hide_password=False))
    assert secret not in str(refused.value)


def test_missing_programs_name_the_package(monkeypatch, tmp_path):
    import postgres_server

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_server, "DEBIAN_ROOT", tmp_path)
    with pytest.raises(PostgresUnavailable, match="install Debian's postgresql package"):
        PostgresServer()
