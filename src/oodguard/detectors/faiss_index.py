"""FAISS indexes for the largest-inner-product searches of ``knn`` and ``nnguide``.

Both detectors search a bank (a ``bank`` state tensor) for the ``k`` largest inner products with normalised
queries: ``knn``'s bank vectors have unit norm, so the largest inner product is the nearest neighbour, while
``nnguide``'s are scaled by a confidence (a maximum-inner-product search). :class:`FaissSearch` gives them the
``backend``, ``index``, ``nlist``, ``nprobe``, ``M`` and ``ef_search`` parameters: ``backend="faiss"`` searches
a FAISS index with the inner-product metric, exact (``"flat"``) or approximate (``"ivf"``, ``"hnsw"``). A trained
IVF or HNSW index is kept in the state as FAISS's own serialisation (uint8 bytes, covered by the detector file's
digest), never pickled. FAISS is imported only when it is used (the ``faiss`` extra).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from oodguard.detectors.base import OutputDetector
from oodguard.detectors.params import Integral, Interval, Options

#: The index parameters' rules, merged into each detector's ``_parameter_constraints``.
INDEX_CONSTRAINTS: dict[str, list] = {
    "backend": [Options(("torch", "faiss"))],
    "index": [Options(("flat", "ivf", "hnsw"))],
    "nlist": [None, Interval(Integral, 1, None)],
    "nprobe": [Interval(Integral, 1, None)],
    "M": [Interval(Integral, 2, None)],
    "ef_search": [Interval(Integral, 1, None)],
}

#: FAISS's k-means seed is a C ``int``; larger detector seeds are folded into its range.
_FAISS_SEED_RANGE = 2**31


def faiss_module() -> Any:
    """The ``faiss`` module, or an ImportError that names the extra to install."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"backend='faiss' needs FAISS ({error}); pip install 'oodguard[faiss]'") from error
    return faiss


def default_nlist(rows: int) -> int:
    """``min(N / 39, 4 sqrt(N))`` lists, at least 1: FAISS warns below 39 training rows per centroid."""
    return max(1, min(rows // 39, int(4 * math.sqrt(rows))))


def training_rows(rows: int, nlist: int, seed: int) -> np.ndarray:
    """Sorted indices of the seeded sample of at most ``256 * nlist`` rows that IVF's k-means trains on."""
    sample = min(rows, 256 * nlist)  # as FAISS itself recommends: more rows only slow k-means down
    chosen = torch.randperm(rows, generator=torch.Generator().manual_seed(int(seed)))[:sample]
    return np.sort(chosen.numpy())


def lift_to_equal_norms(vectors: np.ndarray) -> np.ndarray:
    """``[b, sqrt(R^2 - |b|^2)]`` per row, ``R`` the largest row norm: every row gets norm ``R`` (float32).

    A query with 0 in the extra coordinate keeps its inner products, and among rows of one norm the largest inner
    product is the nearest neighbour: the maximum-inner-product search becomes a nearest-neighbour search on a
    sphere (Bachrach et al., "Speeding Up the Xbox Recommender System Using a Euclidean Transformation for
    Inner-Product Spaces", RecSys 2014). IVF needs it: its (spherical) k-means groups rows by direction, so unlifted
    the large-norm rows that win a query's search sit in lists it does not probe. HNSW is not lifted: measured on
    clustered banks it found no more of the exact neighbours lifted and missed by more (docs/detectors.md,
    ``nnguide``).
    """
    squared = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    extra = np.sqrt(np.maximum(squared.max() - squared, 0.0)).astype(np.float32)
    return np.concatenate([vectors, extra[:, None]], axis=1)


class FaissSearch(OutputDetector):
    """Base of the detectors whose ``bank`` state tensor is searched for the ``k`` largest inner products.

    A subclass declares ``k``, ``seed`` and the index parameters (rules: :data:`INDEX_CONSTRAINTS`), adds
    :meth:`_index_state` to every state it builds, and, when ``backend == "faiss"``, scores with
    :meth:`_faiss_top` instead of a torch product and ``topk``.
    """

    k: int
    seed: int
    backend: str
    index: str
    nlist: int | None
    nprobe: int
    M: int
    ef_search: int
    #: The built or deserialised index of the current state (built once, searched by every ``score``).
    _faiss_index: Any = None
    #: Whether every bank row has the same norm (knn's unit vectors). If not (nnguide), an IVF index holds the
    #: bank lifted to equal norms: see :func:`lift_to_equal_norms`.
    _equal_norm_bank: ClassVar[bool] = True

    def _set_search(self, *, backend: str, index: str, nlist: int | None, nprobe: int, M: int, ef_search: int) -> None:
        """Store the search parameters as given (the constructor's arguments, scikit-learn style)."""
        self.backend, self.index, self.nlist, self.nprobe, self.M, self.ef_search = (
            backend, index, nlist, nprobe, M, ef_search
        )  # fmt: skip
        self._faiss_index = None

    def _check_param_combination(self) -> None:
        if self.backend == "torch" and (self.index != "flat" or self.nlist is not None):
            raise self._param_error("index", "'flat' with backend='torch' (approximate indexes need backend='faiss')")
        if self.backend == "faiss" and self.index == "hnsw" and self.ef_search < self.k:
            raise self._param_error("ef_search", f"at least k={self.k} (HNSW explores ef_search candidates)")

    def _index_state(self, bank: torch.Tensor) -> dict[str, torch.Tensor]:
        """State entries for a new bank: a trained IVF/HNSW index as FAISS bytes (flat indexes are rebuilt)."""
        self._faiss_index = None  # the cached index belongs to the previous bank
        if self.backend != "faiss" or self.index == "flat":
            return {}
        # FAISS's own serialisation (bytes, covered by the file's digest): no pickle
        return {"faiss_index": torch.from_numpy(faiss_module().serialize_index(self._build_index(bank)))}

    def _build_index(self, bank: torch.Tensor) -> Any:
        faiss = faiss_module()
        vectors = np.ascontiguousarray(bank.detach().cpu().to(torch.float32).numpy())
        if not self._equal_norm_bank and self.index == "ivf":
            vectors = lift_to_equal_norms(vectors)
        rows, dim = vectors.shape
        if self.index == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.index == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(self.M), faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = int(self.nlist) if self.nlist is not None else default_nlist(rows)
            if nlist > rows:
                raise ValueError(f"{self.name}: nlist={nlist} exceeds the {rows} bank rows; lower nlist")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(self.seed) % _FAISS_SEED_RANGE
            index.train(vectors[training_rows(rows, nlist, int(self.seed))])
        index.add(vectors)
        return index

    def _search_index(self) -> Any:
        if self._faiss_index is None:
            state = self.state_ or {}
            if "faiss_index" in state:
                raw = state["faiss_index"].cpu().numpy().astype(np.uint8)
                self._faiss_index = faiss_module().deserialize_index(raw)
            else:
                self._faiss_index = self._build_index(state["bank"])
        index = self._faiss_index
        if self.index == "ivf":
            index.nprobe = int(self.nprobe)
        elif self.index == "hnsw":
            index.hnsw.efSearch = int(self.ef_search)
        return index

    def _faiss_row_bytes(self, dim: int) -> int:
        """Bytes per scored row of a FAISS search: the float32 query copies and the ``k`` results (float32
        similarity, int64 id). No ``[n, N_bank]`` product is formed, so chunks can be large: FAISS searches a
        chunk of 32 queries several times slower per query than one of thousands (it blocks queries itself)."""
        return 12 * int(self.k) + 8 * (dim + 1)

    def _faiss_top(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` largest inner products of each (normalised) query with the bank, descending, ``[n, k]``.

        In float32 (FAISS's dtype), returned on the queries' device and in their dtype. An approximate index
        that finds fewer than ``k`` bank rows for some query is an error naming the setting to raise.
        """
        vectors = np.ascontiguousarray(queries.detach().cpu().to(torch.float32).numpy())
        index = self._search_index()
        if index.d == vectors.shape[1] + 1:  # a lifted bank: 0 in the extra coordinate keeps the inner products
            vectors = np.concatenate([vectors, np.zeros((len(vectors), 1), dtype=np.float32)], axis=1)
        similarities, found = index.search(vectors, k)
        if (found[:, -1] < 0).any():
            missing = int((found[:, -1] < 0).sum())
            raise ValueError(
                f"{self.name}: the {self.index} index returned fewer than k={k} neighbours for {missing} "
                "query(ies); raise nprobe (ivf) or ef_search (hnsw)"
            )
        return torch.from_numpy(similarities).to(device=queries.device, dtype=queries.dtype)


__all__ = ["INDEX_CONSTRAINTS", "FaissSearch", "default_nlist", "faiss_module", "lift_to_equal_norms", "training_rows"]
