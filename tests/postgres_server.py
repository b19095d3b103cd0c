"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` package, started on a free loopback port.

:class:`PostgresServer` finds the server programs (``initdb``, ``pg_ctl``, ``postgres``) on ``PATH`` or in
``/usr/lib/postgresql/<version>/bin`` (the newest version), creates a cluster in a temporary folder
(trust authentication, one superuser), starts ``postgres`` listening on 127.0.0.1 only (its Unix socket in
that folder too), waits until it accepts connections and creates a database. Leaving the ``with`` block
stops the server (``pg_ctl stop -m fast``, then SIGKILL if it is still alive) and removes the folder.

PostgreSQL refuses to run as root: under root the server programs run as the unprivileged ``postgres``
user that the Debian package creates, and the temporary folder belongs to that user.

Connections go through psycopg 3 (``pip install 'oodguard[postgres]'``); the URLs are SQLAlchemy's
``postgresql+psycopg://user@127.0.0.1:PORT/dbname``.

Example::

    with PostgresServer() as server:
        engine = sqlalchemy.create_engine(server.url)
        other = server.create_database("other")  # the URL of a second, empty database
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir"]

PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian's programs: <version>/bin
INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql)"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be run here: its programs, the ``postgres`` user (under root) or the driver are missing."""


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: "15", "16", or an old "9.6"; names that are not versions sort first.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_bindir() -> Path:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``: that of ``initdb`` on ``PATH``, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates += [Path(os.path.realpath(on_path)).parent, Path(on_path).parent]  # often a link into the bin folder
    candidates += sorted(DEBIAN_ROOT.glob("*/bin"), key=_version_key, reverse=True)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) and (folder / name).is_file() for name in PROGRAMS):
            return folder
    raise PostgresUnavailable(
        f"PostgreSQL server programs ({', '.join(PROGRAMS)}) not found on PATH nor in {DEBIAN_ROOT}/*/bin: "
        f"{INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as error:
        raise PostgresUnavailable(
            f"the PostgreSQL driver psycopg is not installed ({error}): pip install 'oodguard[postgres]'"
        ) from error
    return psycopg


class PostgresServer:
    """A PostgreSQL server in a temporary folder, listening on 127.0.0.1 only; use it as a context manager.

    Parameters
    ----------
    user : str, default "oodguard"
        The superuser the cluster is created with (trust authentication: no password).
    database : str, default "oodguard"
        The database created once the server is up; :attr:`url` points at it.
    startup_timeout : float, default 30
        Seconds to wait for the server to accept connections.

    Attributes
    ----------
    url : str
        ``postgresql+psycopg://user@127.0.0.1:PORT/database`` (set by :meth:`start`).
    port : int
        The loopback port the server listens on.
    """

    def __init__(self, user: str = "oodguard", database: str = "oodguard", *, startup_timeout: float = 30.0) -> None:
        for name in (user, database):
            if not _NAME.fullmatch(name):
                raise ValueError(f"PostgreSQL name {name!r}: use lowercase letters, digits and underscores")
        self.user = user
        self.database = database
        self.startup_timeout = startup_timeout
        self.bindir = find_bindir()
        self._psycopg = _psycopg()
        self._run_as = self._unprivileged_user()
        self.port = 0
        self.url = ""
        self.folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _unprivileged_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root, and PostgreSQL refuses to run as root: no 'postgres' user to run it as; "
                f"{INSTALL_HINT} (it creates that user)"
            ) from None

    def _spawn_kwargs(self) -> dict[str, Any]:
        assert self.folder is not None
        # No PG* variables of the caller (PGDATA, PGPORT, ...), a locale that always exists, and a working folder
        # the server's user can read (the programs look up their own path and fail under an unreadable one).
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        kwargs: dict[str, Any] = {"env": env, "cwd": self.folder}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
            env.update(HOME=self._run_as.pw_dir, USER=self._run_as.pw_name, LOGNAME=self._run_as.pw_name)
        return kwargs

    def _run(self, *args: str | os.PathLike[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **self._spawn_kwargs()
        )

    def _log_tail(self, lines: int = 20) -> str:
        if self.folder is None:
            return ""
        try:
            text = (self.folder / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def connect(self, database: str | None = None) -> Any:
        """A psycopg connection (autocommit) to ``database`` (default: the one of :attr:`url`)."""
        return self._psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname=database or self.database,
            connect_timeout=2,
            autocommit=True,
        )

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    # ------------------------------------------------------------------ life cycle
    def start(self) -> str:
        """Create the cluster, start the server and create :attr:`database`; returns :attr:`url`."""
        if self._process is not None:
            raise RuntimeError("PostgreSQL server: already started")
        self.folder = Path(tempfile.mkdtemp(prefix="oodguard-pg-"))
        atexit.register(self.stop)
        try:
            if self._run_as is not None:
                os.chown(self.folder, self._run_as.pw_uid, self._run_as.pw_gid)
            data = self.folder / "data"
            initdb = self._run(
                self.bindir / "initdb", "-D", data, "-U", self.user, "--auth=trust", "--no-sync",
                "--encoding=UTF8", "--locale=C",
            )  # fmt: skip
            if initdb.returncode != 0:
                raise RuntimeError(f"PostgreSQL initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")
            for attempt in range(3):  # another process may take the free port before the server binds it
                self.port = _free_port()
                if self._start_server(data, last_try=attempt == 2):
                    break
            with self.connect("postgres") as connection:
                connection.execute(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.stop()
            raise
        self.url = self.url_for(self.database)
        return self.url

    def _start_server(self, data: Path, *, last_try: bool) -> bool:
        assert self.folder is not None
        command = [
            str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.folder}",
            # Throwaway data: no flushing to disk.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]  # fmt: skip
        with open(self.folder / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # out of reach of the terminal's Ctrl-C: the fixture's teardown stops it
                **self._spawn_kwargs(),
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                tail = self._log_tail()
                self._process = None
                if not last_try and ("could not bind" in tail or "already in use" in tail):
                    return False
                raise RuntimeError(f"PostgreSQL server exited on start; its log ends with:\n{tail}")
            try:
                with self.connect("postgres") as connection:
                    connection.execute("SELECT 1")
                return True
            except self._psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL server not accepting connections on 127.0.0.1:{self.port} after "
                        f"{self.startup_timeout} s ({error}); its log ends with:\n{self._log_tail()}"
                    ) from error
                time.sleep(0.05)

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"PostgreSQL name {name!r}: use lowercase letters, digits and underscores")
        with self.connect("postgres") as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing connections still open to it."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"PostgreSQL name {name!r}: use lowercase letters, digits and underscores")
        with self.connect("postgres") as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and remove its folder; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None and self.folder is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._run(self.bindir / "pg_ctl", "stop", "-D", self.folder / "data", "-m", "fast", "-w", "-t", "20",
                          timeout=30)  # fmt: skip
            # Still running: immediate shutdown (the server passes SIGQUIT on to its children), then SIGKILL (its
            # children, each in a process group of its own, exit when they see the server gone).
            for sig in (signal.SIGQUIT, signal.SIGKILL):
                try:
                    process.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)
            process.wait(timeout=10)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        atexit.unregister(self.stop)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port {self.port}" if self._process is not None else "stopped"
        return f"PostgresServer({self.bindir}, {state})"
