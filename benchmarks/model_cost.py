"""Cost of the detectors that run the model, in forward-pass equivalents.

For every registered detector with ``needs_model=True`` (ODIN, i-ODIN, AdaSCALE, CoVer, the Mahalanobis ensemble,
RankFeat, MC dropout on a copy of each model with a dropout layer before its head) and the
model-based variants of ``gradnorm`` (``mode="autograd"``) and ``nac`` (``layers=[...]``), the time to score N inputs
divided by the time of one plain forward pass (:meth:`ModelRunner.forward`, i.e. :func:`oodguard.extraction.extract`)
over the same inputs, in the same process, on (a) the digits CNN (28 x 28 gray) and (b) a ResNet-18-sized network
(BasicBlock x [2, 2, 2, 2], 64-512 channels, CIFAR-style 3 x 32 x 32 input). Random weights: only the time matters.
Detectors with fitted state are fitted first on separate inputs (not timed). Each time is the best of ``--repeats``
runs after a warm-up; each detector's runs alternate with forward-pass runs, and its ratio uses the best forward time
measured beside it (robust to other load).

The rows ``explain (energy)`` and ``explain (mahalanobis)`` time :func:`oodguard.explain.explain_inputs` (what
``Guard.explain`` runs: one forward and one backward pass per batch, then the map refinements) against the same
forward pass; ``mahalanobis`` differentiates through the features hooked at the final linear layer.

    python benchmarks/model_cost.py
    python benchmarks/model_cost.py --digits-n 2048 --resnet-n 128 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from typing import Any

import torch
from torch import nn

from oodguard import detectors
from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.explain import explain_inputs
from oodguard.extraction.model_runner import ModelRunner

# Modules registering model-based detectors; those that do not exist (yet) are skipped.
DETECTOR_MODULES = ("oodguard.detectors.model",)

DIGITS, RESNET = "digits CNN 28x28", "ResNet-18 32x32"
#: Parameters a model detector needs on each model (those without usable defaults).
PARAMS = {
    "nac_layers": {
        DIGITS: {"layers": ["features.2", "features.5", "<features>"]},
        RESNET: {"layers": ["layer1", "layer2", "layer3", "<features>"]},  # the official ResNet-18 layers
    },
}


def with_dropout(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose final linear layer ``fc``/``head`` is preceded by ``nn.Dropout(0.5)`` (for MC dropout,
    which needs dropout layers; in eval mode the layer costs nothing, so the baseline forward pass barely changes)."""
    model = copy.deepcopy(model)
    name = "head" if hasattr(model, "head") else "fc"
    setattr(model, name, nn.Sequential(nn.Dropout(0.5), getattr(model, name)))
    return model


#: Output detectors whose attribution maps (``Guard.explain``) are timed, as rows ``explain (<name>)``.
EXPLAINED = ("energy", "mahalanobis")

#: Model detectors that need a variant of each model; their forward baseline is measured on that variant.
MODEL_VARIANTS = {"mcdropout": with_dropout}


# ------------------------------------------------------------------------------------------------ ResNet-18
class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity (or 1x1 conv) shortcut, as in He et al. (2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, BasicBlock x [2, 2, 2, 2] at 64/128/256/512 channels, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers = []
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)  # registered last: found as the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------------------ timing
def model_detectors() -> list[str]:
    for module in DETECTOR_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    return detectors.available(needs_model=True)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(forward, score, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` times of ``forward`` and ``score``, run alternately so that both see the same load of a
    shared machine (timing them in two separate blocks lets a burst of other work bias the ratio)."""
    forward_s, score_s = [], []
    for _ in range(repeats):
        forward_s.append(_seconds(forward))
        score_s.append(_seconds(score))
    return min(forward_s), min(score_s)


def run(
    names: list[str] | None = None,
    *,
    digits_n: int = 2048,
    resnet_n: int = 128,
    repeats: int = 3,
    batch_size: int = 128,
    seed: int = 0,
    explained: tuple[str, ...] = EXPLAINED,
) -> list[dict[str, Any]]:
    """Rows ``{detector, model, n, seconds, forward_s, forward_passes}``, or ``skipped`` with the reason."""
    registered = model_detectors()  # imports the modules that register model detectors
    names = registered if names is None else list(names)
    unknown = [name for name in names if name not in registered]
    if unknown:
        raise ValueError(f"detectors: {unknown} are not model-based detectors; choose from {', '.join(registered)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    setups = [
        (DIGITS, DigitsCNN(num_classes=10), (1, 28, 28), digits_n),
        (RESNET, ResNet18(num_classes=10), (3, 32, 32), resnet_n),
    ]
    rows: list[dict[str, Any]] = []
    for model_name, model, shape, n in setups:
        model.eval()
        runner = ModelRunner(model, batch_size=batch_size)
        x = torch.rand(n, *shape, generator=generator)
        fit_x = torch.rand(max(n, 64), *shape, generator=generator)
        fit_labels = torch.arange(fit_x.shape[0]) % 10
        forward = lambda runner=runner, x=x: runner.forward(x)  # noqa: E731
        forward()  # warm-up (allocator, lazy initialisation)
        baseline = {"detector": "forward (baseline)", "model": model_name, "n": n, "forward_passes": 1.0}
        rows.append(baseline)
        forward_times = []
        for name in names:
            row: dict[str, Any] = {"detector": name, "model": model_name, "n": n}
            try:
                own_forward = forward
                own_runner = runner
                if name in MODEL_VARIANTS:
                    own_runner = ModelRunner(MODEL_VARIANTS[name](model).eval(), batch_size=batch_size)
                    own_forward = lambda runner=own_runner, x=x: runner.forward(x)  # noqa: E731
                    own_forward()  # warm-up
                det = detectors.create(name, **PARAMS.get(name, {}).get(model_name, {})).attach(own_runner)
                if det.needs_fit:
                    det.fit(fit_x, labels=fit_labels)
                det.score(x[:2])  # fails fast when the detector cannot run on this model
                forward_s, seconds = _interleaved(own_forward, lambda det=det, x=x: det.score(x), repeats)
            except Exception as error:  # a detector that cannot run with defaults on this model: say why
                row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            else:
                forward_times.append(forward_s)
                row.update(seconds=seconds, forward_s=forward_s, forward_passes=seconds / forward_s)
            rows.append(row)
        for name in explained:
            row = {"detector": f"explain ({name})", "model": model_name, "n": n}
            det = detectors.create(name)
            if det.needs_fit:
                det.fit(runner.forward(fit_x, labels=fit_labels))
            explain = lambda det=det, model=model, x=x: explain_inputs(model, det, x, batch_size=batch_size)  # noqa: E731
            explain()  # warm-up
            forward_s, seconds = _interleaved(forward, explain, repeats)
            forward_times.append(forward_s)
            row.update(seconds=seconds, forward_s=forward_s, forward_passes=seconds / forward_s)
            rows.append(row)
        if not forward_times:
            forward_times.append(min(_seconds(forward) for _ in range(repeats)))
        baseline.update(seconds=min(forward_times), forward_s=min(forward_times))
    return rows


def table(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "| detector | model | N | seconds | forward passes equivalent |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['detector']} | {row['model']} | {row['n']} | - | skipped ({row['skipped']}) |")
        else:
            lines.append(
                f"| {row['detector']} | {row['model']} | {row['n']} | {row['seconds']:.3f} | "
                f"{row['forward_passes']:.2f} |"
            )
    lines.append("")
    lines.append(f"Command: `{command}` (torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s))")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits-n", type=int, default=2048, help="inputs scored on the digits CNN")
    parser.add_argument("--resnet-n", type=int, default=128, help="inputs scored on the ResNet-18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads; 1 (default) keeps ratios stable on shared cores"
    )
    parser.add_argument("--detectors", nargs="*", default=None, help="registry names (default: every model-based)")
    parser.add_argument(
        "--explain", nargs="*", default=list(EXPLAINED), help="detectors whose Guard.explain maps are timed"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(
        args.detectors, digits_n=args.digits_n, resnet_n=args.resnet_n, repeats=args.repeats,
        batch_size=args.batch_size, explained=tuple(args.explain),
    )  # fmt: skip
    print(table(rows, "python " + " ".join(["benchmarks/model_cost.py", *sys.argv[1:]])))
    for row in rows:
        if row["detector"] == "mcdropout" and "forward_passes" in row:
            passes = detectors.create("mcdropout").samples
            print(f"mcdropout on {row['model']}: {row['forward_passes']:.2f} forward passes for T = {passes} passes")
    for row in rows:
        if row["detector"].startswith("explain") and "forward_passes" in row:
            verdict = "within" if row["forward_passes"] <= 3.0 else "ABOVE"
            passes = row["forward_passes"]
            print(f"{row['detector']} on {row['model']}: {passes:.2f} forward passes ({verdict} the 3 bound)")
    odin = [row for row in rows if row["detector"] == "odin" and "forward_passes" in row]
    for row in odin:
        verdict = "within" if row["forward_passes"] <= 3.5 else "ABOVE"
        print(f"ODIN on {row['model']}: {row['forward_passes']:.2f} forward passes ({verdict} the 3.5 bound)")


if __name__ == "__main__":
    main()
