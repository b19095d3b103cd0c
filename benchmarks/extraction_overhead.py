"""Overhead of :func:`oodguard.extraction.extract` over a bare forward loop, for tensor, dict and ModelOutput models.

The bare loop is what a user would write: ``model.eval()``, ``torch.no_grad()``, batches of the same size, the
forward pass, and the logits appended and concatenated. ``extract`` also records the features and head (a hook
on the final linear layer), copies to float32 on the CPU and checks the outputs. Same model, same data, same
batch size, best of ``--repeats`` runs each, measured alternately in one process.

    OMP_NUM_THREADS=2 python benchmarks/extraction_overhead.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.extraction import extract


class DictOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


class ModelOutputLike(dict):
    """The shape of a Hugging Face ``ModelOutput``: a dict whose entries are attributes."""

    def __getattr__(self, name: str) -> torch.Tensor:
        return self[name]


class HFOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> ModelOutputLike:
        return ModelOutputLike(logits=self.inner(x))


def bare_loop(model: nn.Module, images: torch.Tensor, batch_size: int, key: str | None) -> float:
    started = time.perf_counter()
    model.eval()
    collected = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            output = model(images[start : start + batch_size])
            collected.append(output if key is None else output[key])
    torch.cat(collected)
    return time.perf_counter() - started


def with_extract(model: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    extract(model, images, batch_size=batch_size, progress=False)
    return time.perf_counter() - started


def run(n: int = 5000, batch_size: int = 256, repeats: int = 5) -> list[dict[str, object]]:
    torch.manual_seed(0)
    images = torch.rand(n, 1, 28, 28)
    cnn = DigitsCNN().eval()
    rows = []
    for label, model, key in [("tensor", cnn, None), ("dict", DictOutput(cnn), "logits"),
                              ("ModelOutput-like", HFOutput(cnn), "logits")]:  # fmt: skip
        bare, extracted = [], []
        with_extract(model, images[:batch_size], batch_size)  # warm-up
        for _ in range(repeats):
            bare.append(bare_loop(model, images, batch_size, key))
            extracted.append(with_extract(model, images, batch_size))
        rows.append({"output": label, "bare_s": min(bare), "extract_s": min(extracted)})
    return rows


def table(rows: list[dict[str, object]], n: int) -> str:
    lines = ["| model output | bare forward loop, s | extract, s | overhead |", "|---|---:|---:|---:|"]
    for r in rows:
        overhead = 100 * (float(r["extract_s"]) / float(r["bare_s"]) - 1)  # type: ignore[arg-type]
        lines.append(f"| {r['output']} | {r['bare_s']:.3f} | {r['extract_s']:.3f} | {overhead:+.1f} % |")
    lines.append(f"\n{n} images 1x28x28, DigitsCNN, {os.cpu_count()} CPU cores, best of the repeats.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(table(run(args.n, args.batch_size, args.repeats), args.n))


if __name__ == "__main__":
    main()
