"""Inner-product search of a feature bank with FAISS (``pip install 'oodguard[faiss]'``), shared by knn and nnguide.

``backend="faiss"`` with ``index="flat"`` (exact), ``"ivf"`` (``nlist`` k-means cells trained on a seeded sample,
``nprobe`` searched) or ``"hnsw"`` (a graph of ``M`` links per node, ``ef_search`` candidates). A trained index is
kept in the detector's state as FAISS's own serialisation of its bytes (covered by the detector file's digest;
nothing is pickled); a flat index is rebuilt from the bank. GPU FAISS is used for flat and IVF searches when it is
installed and sees a GPU; it is never required.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from oodguard.detectors.params import Integral, Interval, Options

__all__ = ["FAISS_PARAMETERS", "FaissSearch", "import_faiss"]

#: The parameters of the search, as ``_parameter_constraints`` entries.
FAISS_PARAMETERS: dict[str, list] = {
    "backend": [Options(("torch", "faiss"))],
    "index": [Options(("flat", "ivf", "hnsw"))],
    "nlist": [None, Interval(Integral, 1, None)],
    "nprobe": [Interval(Integral, 1, None)],
    "M": [Interval(Integral, 2, None)],
    "ef_search": [Interval(Integral, 1, None)],
}


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"backend='faiss' needs FAISS ({error}); pip install 'oodguard[faiss]'") from error
    return faiss


def _as_float32(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().to(torch.float32).numpy())


class FaissSearch:
    """Mixin for a detector whose state holds ``bank`` ``[N, D]`` searched by largest inner product.

    The detector sets ``backend``, ``index``, ``nlist``, ``nprobe``, ``M``, ``ef_search``, ``seed`` and ``k``, and
    calls ``_check_search_params`` from ``_check_param_combination``.
    """

    _faiss_index: Any = None
    if TYPE_CHECKING:  # set by the detector class
        name: ClassVar[str]
        backend: str
        index: str
        nlist: int | None
        nprobe: int
        M: int
        ef_search: int
        seed: int
        k: int
        state_: dict[str, torch.Tensor] | None

        def _param_error(self, param: str, must: str) -> ValueError: ...

    def _set_search(self, *, backend: str, index: str, nlist: int | None, nprobe: int, M: int, ef_search: int) -> None:
        """Store the search parameters as given (the constructor's arguments, scikit-learn style)."""
        self.backend, self.index, self.nlist, self.nprobe, self.M, self.ef_search = (
            backend, index, nlist, nprobe, M, ef_search
        )  # fmt: skip
        self._faiss_index = None

    def _check_search_params(self) -> None:
        if self.backend == "torch" and (self.index != "flat" or self.nlist is not None):
            raise self._param_error("index", "'flat' with backend='torch' (approximate indexes need backend='faiss')")
        if self.backend == "faiss" and self.index == "hnsw" and self.ef_search < self.k:
            raise self._param_error("ef_search", f"at least k={self.k} (HNSW explores ef_search candidates)")

    def _index_state(self, bank: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trained index's bytes for the state (none for the torch search or a flat index, rebuilt on use)."""
        self._faiss_index = None
        if self.backend != "faiss" or self.index == "flat":
            return {}
        return {"faiss_index": torch.from_numpy(import_faiss().serialize_index(self._build_index(bank)))}

    def _build_index(self, bank: torch.Tensor) -> Any:
        faiss = import_faiss()
        vectors = _as_float32(bank)
        rows, dim = vectors.shape
        if self.index == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.index == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(self.M), faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = int(self.nlist) if self.nlist is not None else max(1, min(rows // 39, int(4 * math.sqrt(rows))))
            if nlist > rows:
                raise ValueError(f"{self.name}: nlist={nlist} exceeds the {rows} bank rows; lower nlist")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(self.seed)
            sample = min(rows, 256 * nlist)  # k-means on a seeded sample, as FAISS itself recommends
            chosen = torch.randperm(rows, generator=torch.Generator().manual_seed(int(self.seed)))[:sample]
            index.train(vectors[np.sort(chosen.numpy())])
        index.add(vectors)
        return index

    def _search_index(self) -> Any:
        if self._faiss_index is None:
            state = self.state_ or {}
            if "faiss_index" in state:
                raw = state["faiss_index"].cpu().numpy().astype(np.uint8)
                index = import_faiss().deserialize_index(raw)
            else:
                index = self._build_index(state["bank"])
            self._faiss_index = _on_gpu(index) if self.index != "hnsw" else index
        index = self._faiss_index
        if self.index == "ivf":
            index.nprobe = int(self.nprobe)
        elif self.index == "hnsw":
            index.hnsw.efSearch = int(self.ef_search)
        return index

    def _faiss_top_k(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` largest inner products of each query with the bank, descending ``[n, k]``."""
        similarities, found = self._search_index().search(_as_float32(queries), k)
        if (found[:, -1] < 0).any():  # an approximate index found fewer than k neighbours
            missing = int((found[:, -1] < 0).sum())
            raise ValueError(
                f"{self.name}: the {self.index} index returned fewer than k={k} neighbours for {missing} "
                "query(ies); raise nprobe (ivf) or ef_search (hnsw)"
            )
        return torch.from_numpy(similarities).to(device=queries.device, dtype=queries.dtype)


def _on_gpu(index: Any) -> Any:
    """A GPU copy of ``index`` when GPU FAISS is installed and sees a GPU, else ``index``."""
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError:  # an index type the GPU build cannot hold: search on the CPU
        return index
