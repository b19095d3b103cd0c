"""Model factories that saved guards in the tests name as ``guard_factory:make_model`` (importable by name)."""

import torch
from torch import nn


def make_model() -> nn.Module:
    """The architecture of the guarded test model; the saved state dict supplies the weights."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def make_other_model() -> nn.Module:
    """A different architecture, whose state dict does not match."""
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def make_dropout_cnn() -> nn.Module:
    """The digits CNN with a dropout layer before its head (no parameters: it loads the digits CNN's weights)."""
    from oodguard.benchmark.digits_model import DigitsCNN

    model = DigitsCNN(num_classes=10)
    model.features.append(nn.Dropout(0.5))
    return model


def not_a_model():
    return 42


def make_rotation_cnn() -> nn.Module:
    """The digits CNN with the auxiliary rotation head of oodguard.train's 'rotation' method (seeded head)."""
    from oodguard.benchmark.digits_model import DigitsCNN
    from oodguard.train import RotationNet

    torch.manual_seed(0)
    return RotationNet(DigitsCNN(num_classes=10))
