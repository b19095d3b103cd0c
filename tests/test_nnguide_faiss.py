"""nnguide with FAISS inner-product indexes: flat equals the exact torch search, IVF and HNSW keep the guidance and
the AUROC, a trained index is saved as FAISS bytes and loads to the same scores, and bad settings are clear errors."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from oodguard import ModelOutputs
from oodguard.detectors import create, load
from oodguard.metrics import auroc

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs the faiss extra")


def clusters(n: int, seed: int, dim: int = 32, centres_seed: int = 0, dtype=torch.float32) -> ModelOutputs:
    """Non-negative (post-ReLU-like) features around 8 sparse centres, and a head whose rows are the ID centres.

    Another ``centres_seed`` gives OOD features: other directions, so lower energies and inner products."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=torch.Generator().manual_seed(centres_seed)).clamp_min(0.0) * 3
    labels = torch.randint(0, 8, (n,), generator=generator)
    features = (centres[labels] + torch.randn(n, dim, generator=generator)).clamp_min(0.0).to(dtype)
    head = torch.randn(8, dim, generator=torch.Generator().manual_seed(0)).clamp_min(0.0) / 2
    return ModelOutputs(features=features, head=(head.to(dtype), torch.zeros(8, dtype=dtype)))


@needs_faiss
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("react_percentile", [None, 90])
def test_a_flat_index_equals_the_exact_search(dtype, react_percentile):
    bank, queries = clusters(2000, seed=1, dtype=dtype), clusters(300, seed=2, dtype=dtype)
    params = {"bank_ratio": 0.5, "k": 10, "react_percentile": react_percentile}
    exact = create("nnguide", **params).fit(bank).score(queries)
    flat = create("nnguide", backend="faiss", **params).fit(bank).score(queries)
    # FAISS computes the inner products in float32: each of the D=32 products and sums rounds to 2^-24 relative,
    # so the scores agree to ~1e-6 relative; the top-k mean is continuous, so near-ties picked in another order
    # change nothing beyond that.
    torch.testing.assert_close(flat, exact, rtol=1e-5, atol=0.0)


@needs_faiss
@pytest.mark.parametrize(
    "index, params, least_recall",
    [("ivf", {"nlist": 16, "nprobe": 4}, 0.9), ("hnsw", {"M": 32, "ef_search": 400}, 0.75)],
)
def test_approximate_indexes_keep_the_guidance_and_the_auroc(index, params, least_recall):
    bank, queries, far = clusters(4000, seed=3), clusters(400, seed=4), clusters(400, seed=5, centres_seed=1)
    exact = create("nnguide", bank_ratio=1.0, k=10).fit(bank)
    approx = create("nnguide", bank_ratio=1.0, k=10, backend="faiss", index=index, **params).fit(bank)
    exact_near, approx_near = exact.score(queries), approx.score(queries)
    error = (approx_near - exact_near).abs() / exact_near.abs()
    # positive energies here, so a missed neighbour can only lower the guidance, i.e. raise the OOD score
    assert bool((approx_near >= exact_near - 1e-5 * exact_near.abs()).all())
    # the share of queries given the exact top k (up to float32 rounding); a maximum-inner-product search is harder
    # for HNSW's graph than a nearest-neighbour one, but the neighbours it finds instead are nearly as close
    recall = float((error <= 1e-5).double().mean())
    assert recall >= least_recall, recall
    assert float(error.mean()) <= 0.01
    gap = abs(auroc(exact_near, exact.score(far)) - auroc(approx_near, approx.score(far)))
    assert gap <= 0.01


@needs_faiss
def test_an_ivf_index_holds_the_bank_lifted_to_equal_norms():
    bank, queries = clusters(2000, seed=15), clusters(50, seed=16)
    detector = create("nnguide", bank_ratio=1.0, k=5, backend="faiss", index="ivf", nlist=8, nprobe=8).fit(bank)
    assert detector._search_index().d == 33  # D + 1: the extra coordinate sqrt(R^2 - |b|^2)
    exact = create("nnguide", bank_ratio=1.0, k=5).fit(bank)
    # every list probed: the lifted search is exact, so the extra coordinate left the inner products unchanged
    torch.testing.assert_close(detector.score(queries), exact.score(queries), rtol=1e-5, atol=0.0)


@needs_faiss
@pytest.mark.parametrize("index, params", [("ivf", {"nlist": 20, "nprobe": 3}), ("hnsw", {"M": 8, "ef_search": 16})])
def test_a_saved_index_loads_without_rebuilding_and_scores_the_same(tmp_path, monkeypatch, index, params):
    bank, queries = clusters(3000, seed=6), clusters(100, seed=7)
    detector = create("nnguide", bank_ratio=0.5, k=5, seed=1, backend="faiss", index=index, **params).fit(bank)
    assert detector.state_["faiss_index"].dtype == torch.uint8  # FAISS's own bytes, in the safetensors file
    detector.save(tmp_path / "nnguide")
    loaded = load(tmp_path / "nnguide")

    def rebuild(bank):
        raise AssertionError("the loaded detector rebuilt its index instead of reading the saved one")

    monkeypatch.setattr(loaded, "_build_index", rebuild)
    torch.testing.assert_close(loaded.score(queries), detector.score(queries), rtol=0.0, atol=0.0)
    again = create("nnguide", bank_ratio=0.5, k=5, seed=1, backend="faiss", index=index, **params).fit(bank)
    if index == "ivf":  # the seeded k-means repeats (HNSW's graph depends on the insertion threads' order)
        torch.testing.assert_close(again.score(queries), detector.score(queries), rtol=0.0, atol=0.0)


@needs_faiss
def test_a_seed_beyond_faiss_int_range_trains_an_ivf_index():
    bank, queries = clusters(1000, seed=8), clusters(20, seed=9)
    detector = create("nnguide", bank_ratio=1.0, k=5, seed=2**32 - 1, backend="faiss", index="ivf", nlist=8)
    assert detector.fit(bank).score(queries).shape == (20,)


@pytest.mark.parametrize(
    "params, param",
    [
        ({"index": "ivf"}, "index"),
        ({"nlist": 16}, "index"),
        ({"backend": "faiss", "index": "hnsw", "k": 50, "ef_search": 10}, "ef_search"),
        ({"backend": "annoy"}, "backend"),
        ({"backend": "faiss", "index": "lsh"}, "index"),
        ({"backend": "faiss", "index": "ivf", "nlist": 0}, "nlist"),
        ({"backend": "faiss", "index": "ivf", "nprobe": 0}, "nprobe"),
        ({"backend": "faiss", "index": "hnsw", "M": 1}, "M"),
    ],
)
def test_bad_index_settings_are_refused(params, param):
    with pytest.raises(ValueError, match=rf"^nnguide: parameter '{param}' must be .*; got "):
        create("nnguide", **params)


@needs_faiss
def test_too_many_lists_or_too_few_probes_are_clear_errors():
    bank = clusters(500, seed=11)
    with pytest.raises(ValueError, match="nlist=600 exceeds the 500 bank rows; lower nlist"):
        create("nnguide", bank_ratio=1.0, backend="faiss", index="ivf", nlist=600).fit(bank)
    detector = create("nnguide", bank_ratio=1.0, k=200, backend="faiss", index="ivf", nlist=50, nprobe=1).fit(bank)
    with pytest.raises(ValueError, match="fewer than k=200 neighbours.*raise nprobe"):
        detector.score(clusters(5, seed=12))


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    bank, queries = clusters(200, seed=13), clusters(5, seed=14)
    extra = re.escape("pip install 'oodguard[faiss]'")
    flat = create("nnguide", bank_ratio=1.0, k=3, backend="faiss").fit(bank)  # a flat index is built at first score
    with pytest.raises(ImportError, match=extra):
        flat.score(queries)
    with pytest.raises(ImportError, match=extra):  # an IVF index is trained at fit
        create("nnguide", bank_ratio=1.0, k=3, backend="faiss", index="ivf", nlist=4).fit(bank)


@needs_faiss
def test_a_faiss_search_takes_the_queries_in_large_chunks(monkeypatch):
    # no [n, N_bank] product to bound: FAISS gets thousands of queries per call, not the torch search's few
    bank, queries = clusters(40000, seed=17, dim=8), clusters(3000, seed=18, dim=8)
    detector = create("nnguide", bank_ratio=1.0, k=5, backend="faiss").fit(bank)
    sizes, search = [], detector._faiss_top
    monkeypatch.setattr(detector, "_faiss_top", lambda z, k: sizes.append(len(z)) or search(z, k))
    detector.score(queries)
    assert sizes == [3000]
