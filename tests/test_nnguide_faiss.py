"""nnguide with FAISS: a flat index equals the exact search, approximate indexes recall most neighbours, saved
detectors keep the trained index, and bad settings are refused."""

import builtins

import pytest
import torch

from oodguard import detectors
from oodguard.outputs import ModelOutputs

pytest.importorskip("faiss")


def _outputs(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 8, (n,), generator=g)
    features = (centres[labels] + torch.randn(n, 32, generator=g) + shift).relu()
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * 0.2
    bias = torch.zeros(8)
    return ModelOutputs(logits=features @ weight.T + bias, features=features, labels=labels, head=(weight, bias))


@pytest.fixture(scope="module")
def data():
    return _outputs(20000, 1), _outputs(2000, 2), _outputs(2000, 3, shift=0.5)


def test_a_flat_index_equals_the_exact_search(data):
    fit, near, _ = data
    exact = detectors.create("nnguide", bank_ratio=0.2).fit(fit)
    flat = detectors.create("nnguide", bank_ratio=0.2, backend="faiss").fit(fit)
    assert "faiss_index" not in flat.state_  # a flat index is rebuilt from the bank, not stored twice
    # both sum the same k float32 inner products, FAISS in its own order: float32 rounding of the scores
    torch.testing.assert_close(flat.score(near), exact.score(near), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index, params", [("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 64})])
def test_approximate_indexes_keep_the_ranking(data, index, params):
    fit, near, far = data
    exact = detectors.create("nnguide", bank_ratio=0.2).fit(fit)
    approximate = detectors.create("nnguide", bank_ratio=0.2, backend="faiss", index=index, **params).fit(fit)
    assert approximate.state_["faiss_index"].dtype == torch.uint8
    for outputs in (near, far):
        got, want = approximate.score(outputs), exact.score(outputs)
        # the guidance is a mean of the k largest similarities: a missed neighbour lowers it a little
        assert float(((got - want).abs() <= 1e-4 * want.abs().clamp_min(1)).double().mean()) >= 0.8
        assert float(torch.corrcoef(torch.stack([got, want]))[0, 1]) > 0.999


def test_a_saved_detector_keeps_its_trained_index(tmp_path, data):
    fit, near, _ = data
    detector = detectors.create("nnguide", bank_ratio=0.2, backend="faiss", index="ivf", nlist=40, seed=3).fit(fit)
    detector.save(tmp_path / "nn")
    loaded = detectors.load(tmp_path / "nn")
    assert torch.equal(loaded.state_["faiss_index"], detector.state_["faiss_index"])
    assert torch.equal(loaded.score(near), detector.score(near))


def test_bad_settings_and_a_missing_faiss_are_clear_errors(data, monkeypatch):
    fit, near, _ = data
    with pytest.raises(ValueError, match="'flat' with backend='torch'"):
        detectors.create("nnguide", index="ivf")
    with pytest.raises(ValueError, match="ef_search"):
        detectors.create("nnguide", backend="faiss", index="hnsw", k=50, ef_search=10)
    with pytest.raises(ValueError, match="nlist=5000 exceeds the 200 bank rows"):
        detectors.create("nnguide", backend="faiss", index="ivf", nlist=5000).fit(fit)
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"pip install 'oodguard\[faiss\]'"):
        detectors.create("nnguide", backend="faiss").fit(fit).score(near)
