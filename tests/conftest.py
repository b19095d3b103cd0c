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
