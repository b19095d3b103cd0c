import os

import pytest
import torch


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One cache for the digits benchmark's data, trained model and outputs, shared by every test module."""
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def cnn():
    """The digits CNN with seeded random weights (a fresh one per test module): model-based detector tests."""
    from oodguard.benchmark.digits_model import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN(num_classes=10)


@pytest.fixture(scope="module")
def images():
    """12 seeded random 28 x 28 gray images in [0, 1]."""
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's postgresql package) on a free loopback port, for the whole session.

    Without the server programs (or the psycopg driver) the tests that use it are skipped, except under CI
    (the CI environment variable set), where they fail: the CI script installs the package.
    """
    from postgres_server import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
    except PostgresUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI: {error}", pytrace=False)
        pytest.skip(f"no PostgreSQL to test against: {error}")
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """SQLAlchemy URL of the session's PostgreSQL database: ``postgresql+psycopg://user@127.0.0.1:PORT/db``."""
    return postgres_server.url


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session (the tests' folder on the workers' import path)."""
    import logging
    from pathlib import Path

    ray = pytest.importorskip("ray", reason="the ray extra is not installed") if not os.environ.get("CI") else None
    if ray is None:
        import ray
    if ray.is_initialized():
        ray.shutdown()
    tests = str(Path(__file__).parent)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": tests}},
    )  # fmt: skip
    yield ray
    ray.shutdown()
