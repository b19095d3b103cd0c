"""One extraction for all detectors versus re-running the model for each detector (OpenOOD's evaluator).

Both arms do the same detector work on the same benchmark; the only difference is whether the model's
outputs are computed once and shared, or recomputed for every detector (no cache in either arm).

    python benchmarks/extraction_reuse.py --benchmark digits
"""

from __future__ import annotations

import argparse
import time

from oodguard.benchmark import presets
from oodguard.benchmark.runner import default_detectors, extract_benchmark, run_on_outputs


def evaluate(benchmark, outputs, names):
    ood = [(split.name, split.group, outputs[split.name]) for split in benchmark.ood]
    return run_on_outputs(
        benchmark.name, outputs[benchmark.fit.name], outputs[benchmark.test.name], ood, names,
        n_boot=1, progress=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="digits", choices=presets.available())
    args = parser.parse_args()
    benchmark = presets.load(args.benchmark, progress=False)

    start = time.perf_counter()
    outputs = extract_benchmark(benchmark, progress=False)
    names = default_detectors(outputs[benchmark.fit.name])
    evaluate(benchmark, outputs, names)
    shared = time.perf_counter() - start

    start = time.perf_counter()
    for name in names:
        evaluate(benchmark, extract_benchmark(benchmark, progress=False), [name])
    repeated = time.perf_counter() - start

    print("| benchmark | detectors | one extraction, s | extraction per detector, s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.benchmark} | {len(names)} | {shared:.1f} | {repeated:.1f} | {repeated / shared:.1f}x |")


if __name__ == "__main__":
    main()
