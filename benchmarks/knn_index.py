"""knn with the exact torch search against FAISS flat, IVF and HNSW indexes: time, recall, AUROC.

A bank of Gaussian-cluster features (``--bank`` rows of ``--dim``), ``--queries`` ID queries and as many OOD
queries (the clusters shifted). For each backend: seconds to fit (build the index) and to score both query sets,
the recall of the k-th neighbour distance (share of ID queries whose distance equals the exact one within 1e-4)
and the AUROC change against the exact search. Same process, same data, one run each after a warm-up.

    python benchmarks/knn_index.py --bank 200000 --dim 512 --queries 5000 --k 50
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from oodguard.detectors import create
from oodguard.metrics import auroc

CONFIGS = [
    ("torch exact", {}),
    ("faiss flat", {"backend": "faiss"}),
    ("faiss ivf", {"backend": "faiss", "index": "ivf", "nprobe": 16}),
    ("faiss hnsw", {"backend": "faiss", "index": "hnsw", "M": 32, "ef_search": 128}),
]


def data(rows: int, dim: int, seed: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(100, dim, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 100, (rows,), generator=generator)
    return {"features": centres[labels] + torch.randn(rows, dim, generator=generator) + shift}


def reset_peak_memory() -> None:
    """Reset this process's peak resident memory (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_gb() -> float:
    """Peak resident memory since the last reset, in GB (VmHWM), or NaN where /proc is not there."""
    try:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) * 1024 / 1e9


def configs(nprobes: tuple[int, ...], skip: set[str], k: int = 50) -> list[tuple[str, dict]]:
    """The torch exact search first (the reference), then the FAISS indexes not skipped; IVF once per nprobe."""
    chosen = []
    for label, params in CONFIGS:
        if label == "faiss ivf":
            chosen += [(f"faiss ivf, nprobe={n}", {**params, "nprobe": n}) for n in nprobes]
        elif label == "faiss hnsw" and "hnsw" not in skip:  # HNSW explores at least k candidates
            chosen.append((label, {**params, "ef_search": max(int(params["ef_search"]), 2 * k)}))
        elif label == "torch exact" or label.split()[-1] not in skip:
            chosen.append((label, params))
    return chosen


def run(
    bank: int, dim: int, queries: int, k: int, nprobes: tuple[int, ...] = (16,), skip: frozenset[str] = frozenset()
) -> list[dict[str, object]]:
    fit, near, far = data(bank, dim, 1), data(queries, dim, 2), data(queries, dim, 3, shift=0.15)
    rows, exact = [], None
    trained_ivf = None  # one IVF index serves every nprobe: nprobe only changes the search
    for label, params in configs(nprobes, set(skip), k):
        create("knn", k=k, **params).fit(data(max(2000, 4 * k), dim, 9)).score(data(10, dim, 8))  # warm-up
        reset_peak_memory()
        started = time.perf_counter()
        reused = params.get("index") == "ivf" and trained_ivf is not None
        if reused:
            assert trained_ivf is not None
            detector, fit_s = trained_ivf
            detector.nprobe = params["nprobe"]
        else:
            detector = create("knn", k=k, **params).fit(fit)
        fitted = time.perf_counter()
        if not reused:
            fit_s = fitted - started
        if params.get("index") == "ivf":
            trained_ivf = (detector, fit_s)
        id_scores, ood_scores = detector.score(near), detector.score(far)
        done = time.perf_counter()
        if exact is None:
            exact = (id_scores, ood_scores)
        recall = float(((id_scores - exact[0]).abs() <= 1e-4).double().mean())
        value = auroc(id_scores, ood_scores)
        rows.append({"backend": label, "fit_s": fit_s, "score_s": done - fitted, "recall": recall,
                     "auroc": value, "auroc_change": value - auroc(*exact), "peak_gb": peak_memory_gb()})  # fmt: skip
        del detector
    return rows


def table(rows: list[dict[str, object]], bank: int, dim: int, queries: int, k: int) -> str:
    lines = ["| backend | fit (index build), s | score, s | recall of the k-th distance | AUROC | change "
             "| peak memory, GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['backend']} | {r['fit_s']:.2f} | {r['score_s']:.2f} | {r['recall']:.3f} | "
                     f"{r['auroc']:.4f} | {r['auroc_change']:+.4f} | {r['peak_gb']:.1f} |")  # fmt: skip
    lines.append(
        f"\nBank {bank} x {dim}, {queries} ID + {queries} OOD queries, k={k}, {os.cpu_count()} CPU cores; "
        "peak memory: the process's resident peak during that row (data included), reset before each row."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--nprobe", default="16", help="comma-separated nprobe values for IVF (one row each)")
    parser.add_argument("--skip", default="", help="comma-separated: flat, hnsw (indexes not to measure)")
    args = parser.parse_args()
    nprobes = tuple(int(n) for n in args.nprobe.split(","))
    skip = frozenset(s.strip() for s in args.skip.split(",") if s.strip())
    rows = run(args.bank, args.dim, args.queries, args.k, nprobes, skip)
    print(table(rows, args.bank, args.dim, args.queries, args.k))


if __name__ == "__main__":
    main()
