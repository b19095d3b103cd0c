"""Out of core: fit Mahalanobis on, and score, millions of memory-mapped rows with bounded resident memory.

Writes ``--rows`` x ``--dim`` float32 features (Gaussian classes, seeded) as a shard folder of ``--shard-rows`` rows
per shard, then, in a fresh process, opens the folder (``ModelOutputs.open``), fits ``mahalanobis`` shard by shard
and scores every row. Reports the seconds of each step and the peak resident memory of that process
(``ru_maxrss``: everything it ever held, mapped file pages included), against the size of the data.

    python benchmarks/out_of_core.py --rows 4000000 --dim 512 --folder /tmp/oodguard-4m
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from oodguard.outputs import ModelOutputs
from oodguard.shards import ShardWriter


def write(folder: Path, rows: int, dim: int, shard_rows: int, classes: int = 10) -> float:
    started = time.perf_counter()
    writer = ShardWriter(folder)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=generator) * 0.5 + 3.0  # far from 0, as real features are
    for start in range(0, rows, shard_rows):
        count = min(shard_rows, rows - start)
        labels = torch.randint(0, classes, (count,), generator=generator)
        features = centres[labels] + torch.randn(count, dim, generator=generator)
        writer.write(ModelOutputs(features=features, labels=labels))
    writer.close()
    return time.perf_counter() - started


MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    from oodguard import detectors
    from oodguard.outputs import ModelOutputs
    started = time.perf_counter()
    shards = ModelOutputs.open(sys.argv[1])
    opened = time.perf_counter()
    detector = detectors.create("mahalanobis").fit(shards)
    fitted = time.perf_counter()
    scores = detector.score(shards)
    scored = time.perf_counter()
    assert scores.shape == (len(shards),) and bool(torch.isfinite(scores).all())
    print(json.dumps({"open_s": opened - started, "fit_s": fitted - opened, "score_s": scored - fitted,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rows": len(shards), "shards": shards.num_shards}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=32768)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/oodguard-out-of-core"))
    parser.add_argument("--keep", action="store_true", help="keep the folder (default: removed afterwards)")
    args = parser.parse_args()
    gigabytes = args.rows * args.dim * 4 / 1e9
    print(f"writing {args.rows:,} x {args.dim} float32 = {gigabytes:.1f} GB in shards of {args.shard_rows:,} rows")
    wrote = write(args.folder, args.rows, args.dim, args.shard_rows)
    print(f"written in {wrote:.1f} s")
    try:
        done = subprocess.run([sys.executable, "-c", MEASURE, str(args.folder)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    print(
        f"| rows | data | open | fit (mahalanobis) | score | peak resident memory |\n|---|---|---|---|---|---|\n"
        f"| {result['rows']:,} x {args.dim} ({result['shards']} shards) | {gigabytes:.1f} GB "
        f"| {result['open_s']:.2f} s | {result['fit_s']:.1f} s | {result['score_s']:.1f} s "
        f"| {result['peak_rss_mb']:.0f} MB |"
    )


if __name__ == "__main__":
    main()
