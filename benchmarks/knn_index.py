"""knn with the exact torch search against FAISS flat, IVF and HNSW indexes: time, memory, recall, AUROC.

A bank of Gaussian-cluster features (``--bank`` rows of ``--dim``), ``--queries`` ID queries and as many OOD
queries (the clusters shifted by 0.15 per coordinate). For each backend: seconds to fit (build the index) and to
score both query sets for each ``--k``, the recall of the k-th neighbour distance (share of ID queries whose
distance equals the exact one within 1e-4) and the AUROC change against the exact search.

Each backend runs in its own process, which fits once and then scores for every k (and every ``--nprobe`` of
IVF, ``--ef-search`` of HNSW: search settings, no refit), so its peak resident set (the kernel's high-water
mark, reset before the fit and before each score) is its own. One run each after a warm-up.

    python benchmarks/knn_index.py --bank 200000 --dim 512 --queries 5000 --k 50
    python benchmarks/knn_index.py --bank 1000000 --dim 512 --queries 10000 --k 50 1000 \\
        --nprobe 16 64 256 --ef-search 128 512 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard.detectors import create
from oodguard.detectors.faiss_index import default_nlist
from oodguard.metrics import auroc

CONFIGS = [
    ("torch exact", {}),
    ("faiss flat", {"backend": "faiss"}),
    ("faiss ivf", {"backend": "faiss", "index": "ivf", "nprobe": 16}),
    ("faiss hnsw", {"backend": "faiss", "index": "hnsw", "M": 32, "ef_search": 128}),
]
#: The search setting each index can change after the fit, swept by ``--nprobe`` and ``--ef-search``.
SWEPT = {"ivf": "nprobe", "hnsw": "ef_search"}


def data(rows: int, dim: int, seed: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(100, dim, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 100, (rows,), generator=generator)
    return {"features": centres[labels] + torch.randn(rows, dim, generator=generator) + shift}


# ---------------------------------------------------------------------- memory
def _status_gib(field: str) -> float:
    """A ``/proc/self/status`` size in GiB (nan where there is none, e.g. off Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def reset_peak() -> None:
    """Lower the resident-set high-water mark (VmHWM) to the current RSS, so the next reading is one phase's."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # the reading is then the peak since the process started


# ---------------------------------------------------------------------- one backend
def settings(params: dict[str, Any], k: int, values: list[int] | None) -> list[dict[str, Any]]:
    """The search settings to score with at this k: the swept values, or the config's own (HNSW's ``ef_search``
    raised to k, which it must reach)."""
    name = SWEPT.get(params.get("index", "flat"))
    if name is None:
        return [{}]
    chosen = values or [params[name]]
    if name == "ef_search":
        chosen = sorted({max(value, k) for value in chosen})
    return [{name: value} for value in chosen]


def described(params: dict[str, Any], setting: dict[str, Any], bank: int) -> str:
    """The index settings of a row, e.g. ``nlist=4000, nprobe=16``."""
    index = params.get("index", "flat")
    if index == "ivf":
        nlist = params.get("nlist") or default_nlist(bank)
        return f"nlist={nlist}, nprobe={setting['nprobe']}"
    if index == "hnsw":
        return f"M={params['M']}, ef_search={setting['ef_search']}"
    return "—"


def warm_up(params: dict[str, Any], k: int, dim: int) -> None:
    """Load the libraries and run each code path once, on a small bank (IVF: 8 lists, all probed)."""
    small = dict(params)
    if params.get("index") == "ivf":
        small.update(nlist=8, nprobe=8)
    elif params.get("index") == "hnsw":
        small.update(ef_search=max(params["ef_search"], k))
    create("knn", k=k, **small).fit(data(max(2000, 4 * k), dim, 9)).score(data(10, dim, 8))


def measure(params: dict[str, Any], bank: int, dim: int, queries: int, ks: list[int], values: list[int] | None):
    """Fit one backend once, then score the ID and OOD queries for each k and search setting.

    Returns ``(rows, scores)``: per scored setting a dict of times and peak RSS, and the ID and OOD scores.
    """
    warm_up(params, ks[0], dim)
    fit, near, far = data(bank, dim, 1), data(queries, dim, 2), data(queries, dim, 3, shift=0.15)
    before = _status_gib("VmRSS:")
    reset_peak()
    started = time.perf_counter()
    detector = create("knn", **{**params, **settings(params, ks[0], values)[0], "k": ks[0]}).fit(fit)
    fit_s, fit_peak = time.perf_counter() - started, _status_gib("VmHWM:")
    rows, scores = [], []
    for k in ks:
        for setting in settings(params, k, values):
            detector.set_params(k=k, **setting)
            row = {"k": k, "search": described(params, setting, bank), "fit_s": fit_s, "rss_before_gib": before,
                   "fit_peak_gib": fit_peak, "failed": None}  # fmt: skip
            reset_peak()
            started = time.perf_counter()
            try:
                id_scores, ood_scores = detector.score(near), detector.score(far)
            except ValueError as error:  # an approximate index found fewer than k neighbours: a row saying so
                row["failed"], id_scores, ood_scores = str(error), torch.zeros(0), torch.zeros(0)
            row.update(score_s=time.perf_counter() - started, score_peak_gib=_status_gib("VmHWM:"))
            rows.append(row)
            scores.append((id_scores.numpy(), ood_scores.numpy()))
    return rows, scores


def measure_apart(params: dict[str, Any], bank: int, dim: int, queries: int, ks: list[int], values: list[int] | None):
    """:func:`measure` in a fresh process of this script, so that neither its time nor its memory is shared."""
    with tempfile.TemporaryDirectory() as folder:
        job = {"params": params, "bank": bank, "dim": dim, "queries": queries, "ks": ks, "values": values,
               "out": folder}  # fmt: skip
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job)], check=True)
        rows = json.loads((Path(folder) / "rows.json").read_text())
        with np.load(Path(folder) / "scores.npz") as saved:
            scores = [(saved[f"id{i}"], saved[f"ood{i}"]) for i in range(len(rows))]
    return rows, scores


def job(spec: str) -> None:
    """The child's side of :func:`measure_apart`: rows as JSON and scores as one ``.npz`` in the given folder."""
    given = json.loads(spec)
    rows, scores = measure(given["params"], given["bank"], given["dim"], given["queries"], given["ks"],
                           given["values"])  # fmt: skip
    arrays = {f"{kind}{i}": s for i, pair in enumerate(scores) for kind, s in zip(("id", "ood"), pair, strict=True)}
    np.savez(Path(given["out"]) / "scores.npz", **arrays)
    (Path(given["out"]) / "rows.json").write_text(json.dumps(rows))


# ---------------------------------------------------------------------- all backends
def run(
    bank: int,
    dim: int,
    queries: int,
    k: int | list[int],
    configs: list[tuple[str, dict[str, Any]]] = CONFIGS,
    sweeps: dict[str, list[int] | None] | None = None,
    apart: bool = False,
) -> list[dict[str, Any]]:
    """One row per backend, k and search setting; the first config must be the exact search.

    ``sweeps`` maps ``"nprobe"``/``"ef_search"`` to the values to score with; ``apart`` runs each backend in its
    own process (and only then is its peak RSS its own).
    """
    ks = [k] if isinstance(k, int) else list(k)
    results, exact = [], {}
    for label, params in configs:
        values = (sweeps or {}).get(SWEPT.get(params.get("index", "flat"), ""))
        rows, scores = (measure_apart if apart else measure)(params, bank, dim, queries, ks, values)
        for row, (id_scores, ood_scores) in zip(rows, scores, strict=True):
            if row["failed"]:
                results.append({**row, "backend": label, "apart": apart})
                continue
            exact.setdefault(row["k"], (id_scores, ood_scores, row["score_s"]))
            truth = exact[row["k"]]
            value = auroc(id_scores, ood_scores)
            recall = float((np.abs(id_scores - truth[0]) <= 1e-4).mean())
            speedup, change = truth[2] / row["score_s"], value - auroc(truth[0], truth[1])
            results.append({**row, "backend": label, "recall": recall, "auroc": value, "auroc_change": change,
                            "speedup": speedup, "apart": apart})  # fmt: skip
    return results


def table(rows: list[dict[str, object]], bank: int, dim: int, queries: int, k: int | list[int]) -> str:
    lines = ["| backend | k | search | fit (index build), s | score, s | score speed-up | peak RSS fit, GiB | "
             "peak RSS score, GiB | recall of the k-th distance | AUROC | change |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["k"]):  # stable: backends in config order within each k
        memory = f"{r['fit_peak_gib']:.2f} | {r['score_peak_gib']:.2f}" if r["apart"] else "— | —"
        if r["failed"]:
            lines.append(f"| {r['backend']} | {r['k']} | {r['search']} | {r['fit_s']:.2f} | fewer than k "
                         f"neighbours found for some queries | | {memory} | | | |")  # fmt: skip
            continue
        lines.append(f"| {r['backend']} | {r['k']} | {r['search']} | {r['fit_s']:.2f} | "
                     f"{r['score_s']:.2f} | {r['speedup']:.1f}x | {memory} | {r['recall']:.3f} | {r['auroc']:.4f} | "
                     f"{r['auroc_change']:+.4f} |")  # fmt: skip
    ks = "k=" + ", ".join(str(value) for value in ([k] if isinstance(k, int) else k))
    lines.append(f"\nBank {bank} x {dim}, {queries} ID + {queries} OOD queries, {ks}, {os.cpu_count()} CPU cores.")
    if rows and rows[0]["apart"]:
        before = [r["rss_before_gib"] for r in rows]
        lines.append(f"RSS of each backend's process before its fit (interpreter, libraries, bank features, "
                     f"queries): {min(before):.2f}-{max(before):.2f} GiB.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--k", type=int, nargs="+", default=[50])
    parser.add_argument("--nlist", type=int, nargs="+", default=None, help="IVF lists, one fit each (default: knn's)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=None, help="IVF lists searched (default 16)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=None, help="HNSW candidates (default 128)")
    parser.add_argument("--backends", nargs="+", default=None, help="labels of the configs to run, e.g. 'faiss ivf'")
    parser.add_argument("--in-process", action="store_true", help="no process per backend (no memory figures)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.job)
        return
    configs = [c for c in CONFIGS if args.backends is None or c[0] in args.backends or c[0] == "torch exact"]
    if args.nlist:
        ivf = next((c for c in configs if c[0] == "faiss ivf"), None)
        if ivf is not None:
            at = configs.index(ivf)
            configs[at : at + 1] = [(ivf[0], {**ivf[1], "nlist": n}) for n in args.nlist]
    sweeps = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    rows = run(args.bank, args.dim, args.queries, args.k, configs, sweeps, apart=not args.in_process)
    print(table(rows, args.bank, args.dim, args.queries, args.k))


if __name__ == "__main__":
    main()
