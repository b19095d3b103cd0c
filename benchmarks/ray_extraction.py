"""Extraction on Ray against local extraction on the same cores, and on a two-node Ray cluster on loopback.

The digits CNN (seeded weights) over ``--rows`` random 28 x 28 images. Local: ``extract`` in this process with
every core's threads. Ray: ``extract(engine="ray", num_workers=<cores>)`` on a local Ray started first (its start-up
is timed apart), one thread per actor. Two nodes (``--two-node``): ``ray start --head`` and a second
``ray start --address`` with its own temporary folder, one CPU each, then the same extraction connected to that
cluster by address; the manifest records how many nodes ran shards. Every result is checked against the local
outputs (atol 1e-5). One run each after a warm-up run of the local extraction.

    python benchmarks/ray_extraction.py --rows 60000 --two-node
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from oodguard.benchmark.digits_model import DigitsCNN
from oodguard.extraction import extract


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return DigitsCNN()


def check(sharded, local) -> None:
    back = sharded.to_memory()
    torch.testing.assert_close(back.logits, local.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.features, local.features, atol=1e-5, rtol=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def two_node(images, local, rows_per_shard: int) -> dict[str, float]:
    import ray

    port = free_port()
    head_dir, worker_dir = tempfile.mkdtemp(prefix="ray-head-"), tempfile.mkdtemp(prefix="ray-node2-")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", f"--temp-dir={head_dir}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)  # fmt: skip
        subprocess.run([ray_cli(), "start", f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                        f"--temp-dir={worker_dir}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)  # fmt: skip
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        out = Path(tempfile.mkdtemp(prefix="two-node-"))
        started = time.perf_counter()
        sharded = extract(model(), images, engine="ray", out_dir=out, num_workers=2, chunk_rows=rows_per_shard,
                          progress=False)  # fmt: skip
        seconds = time.perf_counter() - started
        check(sharded, local)
        nodes = sharded.manifest["extra"]["nodes"]
        shutil.rmtree(out, ignore_errors=True)
        return {"alive_nodes": alive, "nodes_used": nodes, "seconds": seconds}
    finally:
        ray.shutdown()
        subprocess.run([ray_cli(), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--rows-per-shard", type=int, default=5000)
    parser.add_argument("--two-node", action="store_true")
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 1
    images = torch.rand(args.rows, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    extract(model(), images[:2000], progress=False)  # warm-up
    started = time.perf_counter()
    local = extract(model(), images, progress=False)
    local_s = time.perf_counter() - started

    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    startup_s = time.perf_counter() - started
    out = Path(tempfile.mkdtemp(prefix="ray-extract-"))
    started = time.perf_counter()
    sharded = extract(model(), images, engine="ray", out_dir=out, num_workers=cores, chunk_rows=args.rows_per_shard,
                      progress=False)  # fmt: skip
    ray_s = time.perf_counter() - started
    check(sharded, local)
    shutil.rmtree(out, ignore_errors=True)
    ray.shutdown()
    print(f"{args.rows:,} images, {cores} cores, shards of {args.rows_per_shard:,} rows; outputs equal (atol 1e-5)\n")
    print("| engine | seconds | rows/s | vs local |\n|---|---|---|---|")
    print(f"| local ({cores} threads) | {local_s:.1f} | {args.rows / local_s:,.0f} | 1.00x |")
    print(f"| ray, {cores} actors (start-up {startup_s:.1f} s apart) | {ray_s:.1f} | {args.rows / ray_s:,.0f} "
          f"| {ray_s / local_s:.2f}x |")  # fmt: skip
    if args.two_node:
        result = two_node(images, local, args.rows_per_shard)
        seconds = result["seconds"]
        print(f"| ray, two nodes on loopback ({result['alive_nodes']} alive, {result['nodes_used']} ran shards) "
              f"| {seconds:.1f} | {args.rows / seconds:,.0f} | {seconds / local_s:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
