"""knn with FAISS indexes (flat equals the exact torch search; IVF and HNSW recall), saved without pickle, and
partial fits that grow the bank with linear, not quadratic, copying."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.detectors import create, load
from oodguard.metrics import auroc

faiss = pytest.importorskip("faiss")


def clusters(n: int, seed: int, dim: int = 32, shift: float = 0.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.randint(0, 8, (n,), generator=generator)
    return {"features": centres[labels] + torch.randn(n, dim, generator=generator) + shift}


def test_a_flat_index_equals_the_exact_search():
    bank, queries = clusters(2000, seed=1), clusters(300, seed=2)
    exact = create("knn", k=10).fit(bank).score(queries)
    flat = create("knn", k=10, backend="faiss").fit(bank).score(queries)
    torch.testing.assert_close(flat, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index, params", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {"M": 16, "ef_search": 64})])
def test_approximate_indexes_find_the_kth_neighbour_and_keep_the_auroc(index, params):
    bank, queries, far = clusters(4000, seed=3), clusters(400, seed=4), clusters(400, seed=5, shift=2.0)
    exact = create("knn", k=20).fit(bank)
    approx = create("knn", k=20, backend="faiss", index=index, **params).fit(bank)
    exact_near, approx_near = exact.score(queries), approx.score(queries)
    # the k-th neighbour distance is never underestimated (an index can only miss closer neighbours)
    assert bool((approx_near >= exact_near - 1e-5).all())
    recall = float(((approx_near - exact_near).abs() <= 1e-4).double().mean())
    assert recall >= 0.9, recall
    gap = abs(auroc(exact_near, exact.score(far)) - auroc(approx_near, approx.score(far)))
    assert gap <= 0.01


def test_a_saved_index_loads_without_rebuilding_and_scores_the_same(tmp_path):
    bank, queries = clusters(3000, seed=6), clusters(100, seed=7)
    detector = create("knn", k=5, backend="faiss", index="ivf", nlist=20, nprobe=3, seed=1).fit(bank)
    assert detector.state_["faiss_index"].dtype == torch.uint8  # FAISS's own bytes, in the safetensors file
    detector.save(tmp_path / "knn")
    loaded = load(tmp_path / "knn")
    torch.testing.assert_close(loaded.score(queries), detector.score(queries))
    again = create("knn", k=5, backend="faiss", index="ivf", nlist=20, nprobe=3, seed=1).fit(bank)
    torch.testing.assert_close(again.score(queries), detector.score(queries))  # the seeded training repeats


def test_partial_fits_grow_the_bank_in_place():
    chunks = [clusters(50, seed=10 + i) for i in range(64)]
    streamed = create("knn", k=5)
    pointers = set()
    for chunk in chunks:
        streamed.partial_fit(chunk)
        pointers.add(streamed.stats_["bank"].data_ptr())
    assert len(pointers) <= 8  # a doubling buffer: a handful of reallocations for 64 chunks, not one each
    whole = create("knn", k=5).fit({"features": torch.cat([c["features"] for c in chunks])})
    queries = clusters(50, seed=99)
    torch.testing.assert_close(streamed.score(queries), whole.score(queries))
    other = create("knn", k=5).partial_fit(chunks[0])
    other.merge(create("knn", k=5).partial_fit(chunks[1]))
    both = create("knn", k=5).fit({"features": torch.cat([chunks[0]["features"], chunks[1]["features"]])})
    torch.testing.assert_close(other.score(queries), both.score(queries))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"index": "ivf"}, "parameter 'index'"),
        ({"backend": "faiss", "index": "hnsw", "k": 50, "ef_search": 10}, "parameter 'ef_search'"),
        ({"backend": "annoy"}, "parameter 'backend'"),
    ],
)
def test_bad_index_settings_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        create("knn", **params)


def test_too_few_probes_are_a_clear_error():
    bank = clusters(500, seed=11)
    detector = create("knn", k=200, backend="faiss", index="ivf", nlist=50, nprobe=1).fit(bank)
    with pytest.raises(ValueError, match="fewer than k=200 neighbours.*raise nprobe"):
        detector.score(clusters(5, seed=12))
    assert np.isfinite(np.asarray(create("knn", k=200).fit(bank).score(clusters(5, seed=12)))).all()


def test_a_seed_beyond_faiss_int_range_trains_an_ivf_index():
    # FAISS's k-means seed is a C int: larger seeds are folded into its range instead of overflowing
    detector = create("knn", k=5, backend="faiss", index="ivf", nlist=8, seed=2**40).fit(clusters(1000, seed=13))
    assert detector.score(clusters(20, seed=14)).shape == (20,)


def test_a_faiss_search_takes_the_queries_in_large_chunks(monkeypatch):
    # no [n, N_bank] product to bound: FAISS gets thousands of queries per call, not the torch search's few
    bank, queries = clusters(20000, seed=15, dim=8), clusters(3000, seed=16, dim=8)
    detector = create("knn", k=5, backend="faiss").fit(bank)
    sizes, search = [], detector._faiss_top
    monkeypatch.setattr(detector, "_faiss_top", lambda z, k: sizes.append(len(z)) or search(z, k))
    exact = create("knn", k=5).fit(bank).score(queries)
    torch.testing.assert_close(detector.score(queries), exact, rtol=1e-4, atol=1e-5)
    assert sizes == [3000]
