"""``extract(..., engine="ray")``: the model runs on a pool of Ray actors, one shard of rows per task.

The driver cuts the rows into shards of ``chunk_rows`` and hands their ranges to Ray Data ``map_batches`` over an
actor pool: each actor builds the model once (a copy of the model object, or a factory called in the actor), runs
the ordinary local :func:`~oodguard.extraction.extract.extract` on its rows and returns the shard's file bytes.
The driver writes every shard as it arrives, into ``out_dir`` with a manifest written last, so its memory holds a
few shards at most and the folder is complete or reads as incomplete. Rows keep the order of the data.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset
from tqdm.auto import tqdm

from oodguard.model_factory import build_model, factory_name
from oodguard.outputs import ModelOutputs
from oodguard.ray_support import connect
from oodguard.shards import ShardedOutputs, ShardWriter

__all__ = ["extract_on_ray"]


# ---------------------------------------------------------------------------------------------- the data
class _RowSource:
    """Random access to the rows of the accepted data forms: ``part(start, stop)`` is something extract takes."""

    def __init__(self, data: Any, labels: Any) -> None:
        self.labels = (
            None
            if labels is None
            else torch.as_tensor(np.asarray(labels) if isinstance(labels, (list, tuple)) else labels)
        )
        self.collate: Callable | None = None
        self.batch_size: int | None = None
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None:
                raise ValueError(
                    "data: engine='ray' reads rows by index, so a DataLoader must read its dataset in order "
                    "(shuffle=False, no custom sampler); pass the Dataset itself"
                )
            self.collate, self.batch_size = data.collate_fn, data.batch_size
            data = data.dataset
        if isinstance(data, (np.ndarray, torch.Tensor)):
            self.rows = int(data.shape[0])
        elif isinstance(data, Mapping):
            lengths = {len(value) for value in data.values()}
            if len(lengths) != 1:
                raise ValueError(f"data: the arrays of the dict have different numbers of rows ({sorted(lengths)})")
            self.rows = lengths.pop()
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            self.rows = len(data)
        else:
            raise ValueError(
                "data: engine='ray' reads rows by index on the workers: pass an array, a dict of arrays, a map-style "
                f"Dataset (with __len__) or a DataLoader over one, not {type(data).__name__}"
            )
        if self.labels is not None and self.labels.shape[0] != self.rows:
            raise ValueError(f"labels: {self.labels.shape[0]} labels for {self.rows} rows; give one label per row")
        self.data = data

    def part(self, start: int, stop: int) -> tuple[Any, Any]:
        data = self.data
        if isinstance(data, (np.ndarray, torch.Tensor)):
            rows: Any = data[start:stop]
        elif isinstance(data, Mapping):
            rows = {key: value[start:stop] for key, value in data.items()}
        else:
            rows = Subset(data, range(start, stop))
            if self.collate is not None:
                rows = DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)
        return rows, None if self.labels is None else self.labels[start:stop]


# ---------------------------------------------------------------------------------------------- the actors
class _ShardExtractor:
    """A Ray Data actor: builds the model once, then extracts one shard of rows per call."""

    def __init__(self, model: Any, source: _RowSource, options: dict[str, Any]) -> None:
        built = build_model(model) if isinstance(model, str) else model
        self.model = built.to(options["device"])  # the actor's own copy: moved to its GPU when it has one
        self.source = source
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import ray

        from oodguard.extraction.extract import extract

        node = ray.get_runtime_context().get_node_id()
        results: dict[str, list] = {"shard": [], "file": [], "head_file": [], "error": [], "node": []}
        for index, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            results["shard"].append(int(index))
            results["node"].append(node)
            try:
                rows, labels = self.source.part(int(start), int(stop))
                outputs = extract(self.model, rows, labels=labels, progress=False, **self.options)
                if len(outputs) != stop - start:
                    raise ValueError(f"the data gave {len(outputs)} rows for rows {start}..{stop - 1}")
                head = outputs.head
                outputs.head = None
                results["file"].append(_file_bytes(outputs))
                results["head_file"].append(b"" if head is None else _file_bytes(ModelOutputs(head=head)))
                results["error"].append("")
            except Exception as error:  # reported by the driver with the shard it came from
                results["file"].append(b"")
                results["head_file"].append(b"")
                results["error"].append(f"{type(error).__name__}: {error}")
        return results


def _file_bytes(outputs: ModelOutputs) -> bytes:
    """The bytes of ``outputs.save`` (digest included), to travel back to the driver."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "outputs.safetensors"
        outputs.save(path)
        return path.read_bytes()


def _head_from(data: bytes, folder: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = folder / ".head-incoming.safetensors"
    path.write_bytes(data)
    try:
        return ModelOutputs.load(path).head
    finally:
        path.unlink(missing_ok=True)


def _model_for_workers(model: Any) -> Any:
    """A module is sent as is (Ray copies it to each actor once); a factory is sent by name and called there."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str) or callable(model):
        return factory_name(model)
    raise TypeError(
        f"model: engine='ray' takes a torch.nn.Module or a factory ('package.module:function' or an importable "
        f"function returning the model), got {type(model).__name__}"
    )


# ---------------------------------------------------------------------------------------------- the driver
def extract_on_ray(
    model: Any,
    data: Any,
    *,
    labels: Any,
    out_dir: str | os.PathLike,
    num_workers: int | None,
    chunk_rows: int,
    address: str | None,
    device: str,
    progress: bool,
    desc: str | None,
    options: dict[str, Any],
) -> ShardedOutputs:
    source = _RowSource(data, labels)
    if source.rows == 0:
        raise ValueError("data: produced no rows; nothing to extract")
    sent_model = _model_for_workers(model)
    writer = ShardWriter(out_dir)  # refuses a folder of other files before any work starts
    ray = connect(address)
    workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"num_workers: expected a positive integer, got {num_workers!r}")
    gpus = 1 if str(device).startswith("cuda") else 0
    shards = [
        {"shard": index, "start": start, "stop": min(start + chunk_rows, source.rows)}
        for index, start in enumerate(range(0, source.rows, chunk_rows))
    ]
    with warnings.catch_warnings():  # Ray's own context reads its deprecated options
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True
    dataset = ray.data.from_items(shards, override_num_blocks=len(shards))
    results = dataset.map_batches(
        _ShardExtractor,
        fn_constructor_kwargs={"model": sent_model, "source": source, "options": {**options, "device": device}},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(workers, len(shards))),
        num_cpus=1,
        num_gpus=gpus,
    )
    bar = tqdm(total=source.rows, desc=desc or "extract (ray)", unit="row", disable=not progress)
    nodes: set[str] = set()
    try:
        for row in results.iter_rows():
            index = int(row["shard"])
            shard = shards[index]
            if row["error"]:
                raise RuntimeError(
                    f"extract (engine='ray'): shard {index} (rows {shard['start']}..{shard['stop'] - 1}) failed on a "
                    f"worker: {row['error']}"
                )
            writer.write_file(index, bytes(row["file"]))
            if row["head_file"]:
                writer.set_head(_head_from(bytes(row["head_file"]), writer.directory), index)
            nodes.add(str(row["node"]))
            bar.update(shard["stop"] - shard["start"])
    except RuntimeError:
        raise
    except Exception as error:  # an actor that died, a lost node: one error, the folder stays incomplete
        raise RuntimeError(f"extract (engine='ray'): the Ray job failed ({type(error).__name__}: {error})") from error
    finally:
        bar.close()
    return writer.close(extra={"engine": "ray", "workers": workers, "rows_per_shard": chunk_rows, "nodes": len(nodes),
                               "model": sent_model if isinstance(sent_model, str) else None})  # fmt: skip
