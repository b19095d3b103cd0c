"""Objects the Ray tests send to workers, in a module the workers can import (tests/ is on their PYTHONPATH)."""

import torch
from torch import nn
from torch.utils.data import Dataset


def seeded_model() -> nn.Module:
    """A factory: the same weights in every process that calls it."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


class BrokenRows(Dataset):
    """Rows of random inputs, except that reading row ``bad`` fails."""

    def __init__(self, rows: int, bad: int) -> None:
        self.inputs = torch.randn(rows, 6, generator=torch.Generator().manual_seed(0))
        self.bad = bad

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        if index == self.bad:
            raise OSError(f"cannot read image {index}: truncated file")
        return self.inputs[index], index % 3


class DictOutput(torch.nn.Module):
    """A model that answers with a dict, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = seeded_model()

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.inner(x), "hidden": x}
