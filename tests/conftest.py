import pytest


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One cache for the digits benchmark's data, trained model and outputs, shared by every test module."""
    return tmp_path_factory.mktemp("digits-cache")
