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


class HashTokenizer:
    """Whitespace words to ids ``4 + sha256(word) % (vocabulary - 4)``, between [CLS] = 1 and [SEP] = 2, padding 0
    on the right: a deterministic stand-in for a real tokenizer (called as transformers tokenizers are)."""

    def __init__(self, vocabulary: int) -> None:
        self.vocabulary = vocabulary

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        import hashlib

        assert padding is True and truncation is True and return_tensors == "pt"
        rows = []
        for text in texts:
            ids = [
                4 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % (self.vocabulary - 4) for word in text.split()
            ]
            rows.append([1, *ids][: max_length - 1] + [2])
        width = max(len(row) for row in rows)
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        }


@pytest.fixture(scope="session")
def tiny_bert():
    """A BERT with seeded random weights (2 layers of 4 heads, 32-d) and a hashing tokenizer, as a text encoder."""
    transformers = pytest.importorskip("transformers")
    from oodguard.encoders import HuggingFaceEncoder

    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
    return HuggingFaceEncoder(model, HashTokenizer(97), max_length=32, batch_size=8, identity="tiny-bert-1")


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: on tiny models a second thread only waits on the first (and the
    shared CPU makes that costly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
