"""Decision log: every decision of the service written to a database, and summaries of the log.

SQLite by default (a file; WAL mode so that readers such as ``oodguard monitor`` never block the
writer), any SQLAlchemy URL otherwise (e.g. ``postgresql+psycopg://...``, with its driver installed).
One row per decision: time, request id, index in the request's batch, prediction, score, p-value,
decision, the reason of a decision made without scoring, the replica (host and process) that made it,
so that several replicas behind a load balancer can share one log (PostgreSQL, or SQLite on one machine),
and, for a guard with a failure monitor, its failure probability and flag (null otherwise). Columns added
since the first release are added, nullable, to an existing log when it is opened; no row is rewritten.

Writes go through a single writer thread fed by a bounded queue: request threads never contend for the
database. The writer takes everything queued and commits it in one transaction (group commit), then
resolves the :class:`~concurrent.futures.Future` that :meth:`DecisionLog.log` returned for each request,
so that the service acknowledges a request only once its rows are committed. SQLite runs in WAL mode with
``synchronous=FULL``: a committed row survives a crash of the process and of the machine.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite

from oodguard.serve.monitor import ood_rate_pvalue

__all__ = ["DecisionLog", "DecisionLogError", "database_url", "read_decisions", "read_info", "summarise"]

log = logging.getLogger("oodguard.serve")

_metadata = sa.MetaData()
decisions_table = sa.Table(
    "oodguard_decisions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("timestamp", sa.Float, nullable=False, index=True, comment="seconds since the Unix epoch (UTC)"),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("batch_index", sa.Integer, nullable=False, comment="row of the input within its request"),
    sa.Column("prediction", sa.Integer, nullable=True, comment="the model's predicted class"),
    sa.Column("score", sa.Float, nullable=False, comment="OOD score, higher = more likely OOD (inf: not scored)"),
    sa.Column("pvalue", sa.Float, nullable=True, comment="conformal p-value"),
    sa.Column("is_ood", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True, comment="why the input was decided OOD without scoring"),
    sa.Column("replica", sa.String(128), nullable=True, comment="host:pid of the service replica that decided"),
    sa.Column(
        "failure_probability", sa.Float, nullable=True, comment="failure monitor's probability (null: no monitor)"
    ),
    sa.Column("failure_flag", sa.Boolean, nullable=True, comment="failure monitor's flag (null: no monitor)"),
)
#: Columns added since the first release: added to an existing log when it is opened.
_ADDED_COLUMNS = ("reason", "replica", "failure_probability", "failure_flag")
# Settings the summary needs to test the OOD rate: the guard's false-alarm rate and the test's level.
info_table = sa.Table(
    "oodguard_log_info",
    _metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def database_url(path_or_url: str | Path) -> str:
    """A SQLAlchemy URL for a SQLite file path, or the URL itself when given one (``dialect://...``).

    Examples
    --------
    >>> database_url("sqlite:///decisions.db"), database_url("postgresql://db/log")
    ('sqlite:///decisions.db', 'postgresql://db/log')
    """
    text = str(path_or_url)
    if "://" in text:
        return text
    if not text or text == ":memory:":
        raise ValueError("decision log: give a file path or a database URL (an in-memory database is not shared)")
    return sa.engine.URL.create("sqlite", database=str(Path(text).expanduser().resolve())).render_as_string()


def _engine(path_or_url: str | Path, *, create_dirs: bool) -> sa.Engine:
    url = sa.engine.make_url(database_url(path_or_url))
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database in (None, "", ":memory:"):
        raise ValueError("decision log: an in-memory SQLite database is not shared between threads; give a file")
    if is_sqlite and create_dirs:
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(url)
    except (ImportError, sa.exc.ArgumentError) as error:
        raise ValueError(f"decision log: cannot use database URL {url!r} ({error})") from error
    if is_sqlite:

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            # WAL: readers (monitoring) and the writer do not block each other.
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row (and so an acknowledged request) survives a power loss, not only a crash.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    return engine


def _nullable(values: Any, n: int, kind: type) -> list[Any]:
    if values is None:
        return [None] * n
    array = np.asarray(values).reshape(-1)
    out: list[Any] = []
    for v in array.tolist():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        else:
            out.append(kind(v))
    return out


class DecisionLogError(RuntimeError):
    """The decision log could not take or commit a request's rows (full queue, database refused them, closed)."""


def _add_missing_columns(engine: sa.Engine) -> None:
    """Bring a log written by an earlier release up to the current columns (nullable ones only, no data rewritten)."""
    present = {column["name"] for column in sa.inspect(engine).get_columns(decisions_table.name)}
    with engine.begin() as connection:
        for name in _ADDED_COLUMNS:
            if name not in present:
                column = decisions_table.c[name]
                kind = column.type.compile(dialect=engine.dialect)
                connection.execute(sa.text(f"ALTER TABLE {decisions_table.name} ADD COLUMN {name} {kind}"))


def _create_tables(engine: sa.Engine, attempts: int = 5) -> None:
    """Create the log's tables if missing. Replicas starting together race between 'does it exist' and 'create' (a
    unique violation in PostgreSQL's catalogue): whoever loses finds the tables there on the next attempt."""
    for attempt in range(attempts):
        try:
            _metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _store_setting(connection: sa.Connection, key: str, value: str) -> None:
    """Insert or replace one setting in a single statement (replicas store theirs concurrently)."""
    dialect = connection.dialect.name
    if dialect in ("postgresql", "sqlite"):
        module = sa.dialects.postgresql if dialect == "postgresql" else sa.dialects.sqlite
        statement = module.insert(info_table).values(key=key, value=value)
        connection.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": value}))
    else:
        connection.execute(sa.delete(info_table).where(info_table.c.key == key))
        connection.execute(sa.insert(info_table).values(key=key, value=value))


class DecisionLog:
    """Append-only log of guard decisions in a database, written by one background thread with group commit.

    Parameters
    ----------
    path_or_url : str or Path
        A SQLite file (created with its folder if missing) or a SQLAlchemy database URL.
    alpha : float, optional
        The guard's false-alarm rate, stored with the log so that :func:`summarise` can test it.
    significance : float, optional
        Level of the alert test, stored likewise.
    max_pending : int, default 10_000
        Requests waiting to be written; beyond it :meth:`log` waits (``block=True``) or raises
        :class:`DecisionLogError` (``block=False``, as the service does: it answers 503 rather than stall).
    batch_rows : int, default 5_000
        Most rows committed in one transaction.
    replica : str, optional
        Name of this writer in the ``replica`` column; default ``host:pid``.

    Attributes
    ----------
    url : str
        The database URL.
    rows_written, rows_failed : int
        Rows committed so far, and rows the database refused after retries (their requests' futures fail).

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> with DecisionLog(os.path.join(folder, "log.db"), alpha=0.05) as decisions:
    ...     committed = decisions.log("req-1", predictions=[3, 1], scores=[0.2, 4.0], pvalues=[0.4, 0.001],
    ...                               is_ood=[False, True], timestamp=0.0)
    ...     committed.result(timeout=10)  # rows committed
    2
    >>> read_decisions(os.path.join(folder, "log.db"))[["batch_index", "prediction", "is_ood"]].values.tolist()
    [[0, 3, False], [1, 1, True]]
    """

    def __init__(
        self,
        path_or_url: str | Path,
        *,
        alpha: float | None = None,
        significance: float | None = None,
        max_pending: int = 10_000,
        batch_rows: int = 5_000,
        replica: str | None = None,
    ) -> None:
        self.url = database_url(path_or_url)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._engine = _engine(path_or_url, create_dirs=True)
        try:
            _create_tables(self._engine)
            with self._engine.begin() as connection:
                for key, value in (("alpha", alpha), ("significance", significance)):
                    if value is not None:
                        _store_setting(connection, key, repr(float(value)))
        except sa.exc.SQLAlchemyError as error:
            self._engine.dispose()
            raise ValueError(
                f"decision log: cannot open {self._safe_url()} ({error.__class__.__name__}: {error})"
            ) from error
        self.batch_rows = batch_rows
        self.rows_written = 0
        self.rows_failed = 0
        self._rows_queued = 0
        self._queue: queue.Queue[tuple[list[dict[str, Any]], Future[int]] | None] = queue.Queue(maxsize=max_pending)
        self._done = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="oodguard-decision-log", daemon=True)
        self._writer.start()

    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # ------------------------------------------------------------------ writing
    def log(
        self,
        request_id: str,
        *,
        predictions: Sequence[int | None] | np.ndarray | None,
        scores: Sequence[float | None] | np.ndarray,
        pvalues: Sequence[float | None] | np.ndarray | None,
        is_ood: Sequence[bool] | np.ndarray,
        reasons: Sequence[str | None] | None = None,
        failure_probabilities: Sequence[float | None] | np.ndarray | None = None,
        failure_flags: Sequence[bool | None] | np.ndarray | None = None,
        timestamp: float | None = None,
        block: bool = True,
    ) -> Future[int]:
        """Queue one request's decisions (row ``i`` of each array is input ``i`` of the request).

        ``failure_probabilities`` and ``failure_flags`` come from a guard with a failure monitor; without them the
        columns hold null.

        Returns a future that resolves to the number of rows once they are committed, or fails with
        :class:`DecisionLogError` when the database refused them. ``block=False``: raise
        :class:`DecisionLogError` at once when the queue is full instead of waiting. A score of ``None`` (an input
        decided without scoring) is stored as ``inf``.
        """
        if self._closed:
            raise DecisionLogError("decision log: already closed")
        scores_list = [math.inf if v is None else float(v) for v in np.asarray(scores, dtype=object).reshape(-1)]
        n = len(scores_list)
        decisions = np.asarray(is_ood, dtype=bool).reshape(-1).tolist()
        predicted = _nullable(predictions, n, int)
        pvals = _nullable(pvalues, n, float)
        why = [None] * n if reasons is None else list(reasons)
        failure = _nullable(failure_probabilities, n, float)
        flags = _nullable(failure_flags, n, bool)
        if not (len(decisions) == len(predicted) == len(pvals) == len(why) == len(failure) == len(flags) == n):
            raise ValueError(
                "decision log: predictions, scores, pvalues, is_ood, reasons and failure probabilities and flags must "
                "have the same length"
            )
        when = time.time() if timestamp is None else float(timestamp)
        rows = [
            {
                "timestamp": when,
                "request_id": request_id,
                "batch_index": i,
                "prediction": predicted[i],
                "score": scores_list[i],
                "pvalue": pvals[i],
                "is_ood": decisions[i],
                "reason": why[i],
                "replica": self.replica,
                "failure_probability": failure[i],
                "failure_flag": flags[i],
            }
            for i in range(n)
        ]
        committed: Future[int] = Future()
        if not rows:
            committed.set_result(0)
            return committed
        try:
            self._queue.put((rows, committed), block=block)  # blocking: back pressure, never dropped rows
        except queue.Full:
            raise DecisionLogError(
                f"decision log: {self._queue.maxsize} requests already wait to be written; the database is too slow"
            ) from None
        with self._done:
            self._rows_queued += n
        return committed

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            size = len(first[0])
            while size < self.batch_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
                size += len(more[0])
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[list[dict[str, Any]], Future[int]]]) -> None:
        """One transaction for every request in ``batch`` (group commit), then resolve their futures."""
        rows = [row for request_rows, _ in batch for row in request_rows]
        failure: Exception | None = None
        for attempt in range(3):
            try:
                with self._engine.begin() as connection:
                    connection.execute(sa.insert(decisions_table), rows)
                failure = None
                break
            except sa.exc.SQLAlchemyError as error:
                failure = error
                if attempt < 2:
                    time.sleep(0.05 * (attempt + 1))
        if failure is not None:
            log.error("decision log: %d row(s) not written to %s: %s", len(rows), self._safe_url(), failure)
        with self._done:
            if failure is None:
                self.rows_written += len(rows)
            else:
                self.rows_failed += len(rows)
            self._done.notify_all()
        for request_rows, committed in batch:
            if not committed.set_running_or_notify_cancel():
                continue  # its request stopped waiting (cancelled): nobody to tell
            if failure is None:
                committed.set_result(len(request_rows))
            else:
                message = f"decision log: the database refused the rows ({failure.__class__.__name__}: {failure})"
                committed.set_exception(DecisionLogError(message))

    @property
    def pending_rows(self) -> int:
        """Rows queued and not yet written (or failed)."""
        with self._done:
            return self._rows_queued - self.rows_written - self.rows_failed

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is written; return False if ``timeout`` seconds passed first."""
        with self._done:
            target = self._rows_queued
            return self._done.wait_for(lambda: self.rows_written + self.rows_failed >= target, timeout=timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Write everything queued, stop the writer thread and release the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.error("decision log: %d row(s) still pending after %s s at shutdown", self.pending_rows, timeout)
        self._engine.dispose()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DecisionLog({self._safe_url()!r}, rows_written={self.rows_written})"


# ---------------------------------------------------------------------- reading
def _open_existing(path_or_url: str | Path) -> sa.Engine:
    url = database_url(path_or_url)
    if url.startswith("sqlite") and "://" not in str(path_or_url) and not Path(path_or_url).is_file():
        raise FileNotFoundError(f"no decision log at {path_or_url}")
    engine = _engine(path_or_url, create_dirs=False)
    if not sa.inspect(engine).has_table(decisions_table.name):
        engine.dispose()
        raise ValueError(f"{path_or_url}: not an oodguard decision log (no table {decisions_table.name})")
    return engine


def read_info(path_or_url: str | Path) -> dict[str, float]:
    """The settings stored with a log (``alpha``, ``significance``) as floats."""
    engine = _open_existing(path_or_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(info_table.c.key, info_table.c.value)).all()
    finally:
        engine.dispose()
    return {key: float(value) for key, value in rows}


def read_decisions(path_or_url: str | Path, *, since: float | None = None) -> pd.DataFrame:
    """Every logged decision (optionally from time ``since`` on), oldest first, as a DataFrame."""
    engine = _open_existing(path_or_url)
    query = sa.select(decisions_table).order_by(decisions_table.c.id)
    if since is not None:
        query = query.where(decisions_table.c.timestamp >= since)
    try:
        with engine.connect() as connection:
            result = connection.execute(query)
            frame = pd.DataFrame(result.all(), columns=list(result.keys()))
    finally:
        engine.dispose()
    return frame.astype({"is_ood": bool})


def summarise(
    path_or_url: str | Path,
    window_seconds: float = 60.0,
    *,
    alpha: float | None = None,
    significance: float | None = None,
) -> pd.DataFrame:
    """OOD rate per time window of a decision log, each window tested against the false-alarm rate.

    Windows are consecutive intervals of ``window_seconds`` aligned on the Unix epoch; windows without
    decisions are left out. ``alpha`` and ``significance`` default to the values stored with the log
    (by the service), ``significance`` to 0.01 if none is stored; without ``alpha`` the ``pvalue`` and
    ``alert`` columns are missing values.

    Returns
    -------
    pandas.DataFrame
        One row per window: ``start``, ``end`` (UTC timestamps), ``replicas`` (service processes that
        wrote to the log in it), ``requests``, ``n``, ``n_ood``,
        ``ood_rate``, ``mean_score``, ``pvalue`` (exact one-sided binomial test of rate <= alpha) and
        ``alert`` (``pvalue < significance``). ``frame.attrs`` holds ``alpha`` and ``significance``.
    """
    if not (isinstance(window_seconds, (int, float)) and math.isfinite(window_seconds) and window_seconds > 0):
        raise ValueError(f"window_seconds: expected a positive number of seconds, got {window_seconds!r}")
    info = read_info(path_or_url)
    alpha = info.get("alpha") if alpha is None else alpha
    significance = info.get("significance", 0.01) if significance is None else significance
    decisions = read_decisions(path_or_url)
    columns = ["start", "end", "replicas", "requests", "n", "n_ood", "ood_rate", "mean_score", "pvalue", "alert"]
    if decisions.empty:
        frame = pd.DataFrame(columns=columns)
    else:
        window = np.floor(decisions["timestamp"].to_numpy() / window_seconds).astype(np.int64)
        finite = decisions["score"].where(np.isfinite(decisions["score"]))
        grouped = decisions.assign(window=window, finite_score=finite).groupby("window", sort=True)
        frame = pd.DataFrame(
            {
                "replicas": grouped["replica"].nunique(),  # service processes that decided (all share the log)
                "requests": grouped["request_id"].nunique(),
                "n": grouped.size(),
                "n_ood": grouped["is_ood"].sum().astype(np.int64),
                "mean_score": grouped["finite_score"].mean(),  # inputs decided without scoring have score inf
            }
        )
        starts = frame.index.to_numpy() * window_seconds
        frame.insert(0, "start", pd.to_datetime(starts, unit="s", utc=True))
        frame.insert(1, "end", pd.to_datetime(starts + window_seconds, unit="s", utc=True))
        frame["ood_rate"] = frame["n_ood"] / frame["n"]
        if alpha is None:
            frame["pvalue"] = np.nan
            frame["alert"] = pd.array([pd.NA] * len(frame), dtype="boolean")
        else:
            frame["pvalue"] = [
                ood_rate_pvalue(int(k), int(n), alpha) for k, n in zip(frame["n_ood"], frame["n"], strict=True)
            ]
            frame["alert"] = frame["pvalue"] < significance
        frame = frame[columns].reset_index(drop=True)
    frame.attrs.update(alpha=alpha, significance=significance, window_seconds=float(window_seconds))
    return frame
