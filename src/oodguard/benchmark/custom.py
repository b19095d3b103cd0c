"""Your model on your data: a benchmark from a TOML file (``oodguard bench CONFIG.toml``) or from Python objects
(:func:`evaluate_model`), with the leaderboard, intervals and report of the embedded benchmarks.

The file (paths relative to it)::

    name = "my-model"                       # optional, default: the file's stem
    [model]
    factory = "package.module:Class"        # called with no arguments; builds the architecture
    weights = "weights.safetensors"         # or a state-dict .pt/.pth, loaded with torch.load(weights_only=True)
    # path = "model.onnx"                   # instead of factory and weights: an ONNX model (the onnx extra)
    feature_layer = "fc"                    # optional, as in oodguard.extraction.extract
    output_key = "logits"                   # optional
    [transform]                             # optional
    grayscale = true                        # load images as one channel ("L"); false: three ("RGB")
    size = [28, 28]                         # resize to height, width
    mean = [0.0]                            # normalise per channel after resizing
    std = [1.0]
    [data]
    fit = "images/train"                    # class sub-folders: the ID training set the detectors fit on
    id = "images/test"                      # class sub-folders: the ID test set
    batch_size = 256                        # optional
    [ood]
    "near:letters" = "images/letters"       # GROUP:NAME = folder (flat, or nested: every image counts as OOD)
    "far:noise" = "images/noise"            # GROUP is near, far, covariate or synthetic (default far)
    [detectors]                             # optional
    names = ["msp", "energy", "knn"]        # default: every detector the outputs allow
    params = { knn = { k = 10 } }

Unknown keys are refused with the closest known key. The model factory is code named by the person who wrote the
file, like a ``--model-factory``: run configuration files you trust.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodguard.benchmark.results import Results
from oodguard.benchmark.spec import GROUPS, Benchmark, DataSplit
from oodguard.outputs import ModelOutputs
from oodguard.shards import is_shard_folder

__all__ = ["load_config", "load_model_config", "model_from_factory", "evaluate_model", "ConfigError"]

_SECTIONS = {
    "name": None,
    "model": {"factory", "path", "weights", "feature_layer", "output_key"},
    "transform": {"grayscale", "size", "mean", "std"},
    "data": {"fit", "id", "batch_size"},
    "ood": None,
    "detectors": {"names", "params"},
}


class ConfigError(ValueError):
    """A configuration file that cannot describe a benchmark; the message names the file and the key."""


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli  # the backport, a dependency on Python 3.10

    return tomli


def _unknown(where: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{where}: missing key {key!r}")
        return None
    value = table[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        list: "a list",
        dict: "a table",
        float: "a number",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _folder(base: Path, value: str, where: str) -> Path:
    path = (base / value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: {path} is not a folder")
    return path


def _build_model(spec: Mapping[str, Any], base: Path, where: str) -> nn.Module:
    onnx_path = _get(spec, "path", str, where)
    if onnx_path is not None:
        if "factory" in spec or "weights" in spec:
            raise ConfigError(f"{where}: give either path (an ONNX model) or factory and weights, not both")
        path = (base / onnx_path).expanduser()
        if path.suffix.lower() != ".onnx" or not path.is_file():
            raise ConfigError(f"{where}.path: {path} is not an .onnx file")
        from oodguard.extraction.onnx_model import OnnxModel

        return OnnxModel(path)
    factory = _get(spec, "factory", str, where, required=True)
    weights = _get(spec, "weights", str, where)
    if str(base) not in sys.path:  # a factory in a module beside the file
        sys.path.insert(0, str(base))
    return model_from_factory(factory, None if weights is None else (base / weights).expanduser(), where)


def model_from_factory(factory: str, weights: str | Path | None, where: str) -> nn.Module:
    """The module ``factory`` ('package.module:Callable') builds, with the state dict in ``weights`` loaded (a
    ``.safetensors`` file, or a ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``), in eval mode."""
    module_name, sep, attribute = factory.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{where}.factory: expected 'package.module:Callable', got {factory!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{where}.factory: cannot import {factory!r} ({error})") from error
    model = target()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}.factory: {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"{where}.weights: {path} is not a file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # a state dict saved by torch.save: tensors only, never arbitrary objects
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ConfigError(
                f"{where}.weights: {path} does not fit the model built by {factory!r} ({error})"
            ) from None
    return model.eval()


def _transform(spec: Mapping[str, Any], where: str) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
    from oodguard.extraction.data import Normalize, Resize

    grayscale = _get(spec, "grayscale", bool, where)
    size = _get(spec, "size", (list, int), where)
    mean, std = _get(spec, "mean", list, where), _get(spec, "std", list, where)
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if size is not None:
        try:
            steps.append(Resize(tuple(size) if isinstance(size, list) else size))
        except ValueError as error:
            raise ConfigError(f"{where}.size: {error}") from None
    if (mean is None) != (std is None):
        raise ConfigError(f"{where}: give both mean and std, or neither")
    if mean is not None and std is not None:
        try:
            steps.append(Normalize(mean, std))
        except (ValueError, TypeError, RuntimeError) as error:
            raise ConfigError(f"{where}.mean/std: {error}") from None
    mode = None if grayscale is None else ("L" if grayscale else "RGB")

    def apply(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    return (apply if steps else None), mode


def load_model_config(path: str | Path) -> tuple[nn.Module, Any, str | None, dict[str, Any]]:
    """The model, the image transform and image mode, and ``{"feature_layer", "output_key"}`` of a configuration
    file's [model] and [transform] tables (its other tables, if any, are checked but not needed)."""
    path = Path(path)
    config = _read_checked(path)
    if "model" not in config:
        raise ConfigError(f"{path}: missing section [model]")
    model_spec = config["model"]
    model = _build_model(model_spec, path.parent, f"{path} [model]")
    transform, mode = _transform(config.get("transform", {}), f"{path} [transform]")
    options = {
        "feature_layer": _get(model_spec, "feature_layer", str, f"{path} [model]"),
        "output_key": _get(model_spec, "output_key", (str, int), f"{path} [model]"),
    }
    return model, transform, mode, options


def _read_checked(path: Path) -> dict[str, Any]:
    """The TOML file's tables, every key known (an unknown one is refused with the closest known key)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such configuration file")
    try:
        config = _toml().loads(path.read_text())
    except Exception as error:  # tomllib.TOMLDecodeError, or a file that is not text
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    for key, value in config.items():
        if key not in _SECTIONS:
            raise _unknown(str(path), key, _SECTIONS)
        known = _SECTIONS[key]
        if known is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            for inner in value:
                if inner not in known:
                    raise _unknown(f"{path} [{key}]", inner, known)
    return config


def load_config(path: str | Path) -> tuple[Benchmark, dict[str, Any]]:
    """The :class:`Benchmark` a TOML file describes, and ``{"detectors": names or None, "params": {...},
    "batch_size": int}``. Raises :class:`ConfigError` naming the key for anything it cannot use."""
    from oodguard.extraction.data import ImageFolder

    path = Path(path)
    config = _read_checked(path)
    for section in ("model", "data", "ood"):
        if section not in config:
            raise ConfigError(f"{path}: missing section [{section}]")
    base = path.parent
    name = _get(config, "name", str, str(path)) or path.stem
    model_spec = config["model"]
    model = _build_model(model_spec, base, f"{path} [model]")
    transform, mode = _transform(config.get("transform", {}), f"{path} [transform]")
    data = config["data"]
    where = f"{path} [data]"

    def images(value: str, place: str, unlabelled: bool = False) -> Any:
        folder = _folder(base, value, place)
        if is_shard_folder(folder):  # outputs extracted already (oodguard extract), read shard by shard
            return ModelOutputs.open(folder)
        try:
            return ImageFolder(_folder(base, value, place), transform=transform, mode=mode, unlabelled=unlabelled)
        except FileNotFoundError as error:
            raise ConfigError(f"{place}: {error}") from None

    fit = images(_get(data, "fit", str, where, required=True), f"{where}.fit")
    test = images(_get(data, "id", str, where, required=True), f"{where}.id")
    for split, place in ((fit, "fit"), (test, "id")):
        if isinstance(split, ImageFolder) and not split.classes:
            raise ConfigError(f"{where}.{place}: an ID set needs one sub-folder per class; {split.root} is flat")
    ood_table = config["ood"]
    if not isinstance(ood_table, dict) or not ood_table:
        raise ConfigError(f'{path}: [ood] must list at least one OOD set as "GROUP:NAME" = "folder"')
    ood = []
    for label, folder in ood_table.items():
        if not isinstance(folder, str):
            raise ConfigError(f"{path} [ood].{label}: expected a folder path, got {folder!r}")
        group, _, set_name = label.rpartition(":")
        group = group or "far"
        if group not in GROUPS:
            raise ConfigError(f"{path} [ood].{label}: group must be one of {', '.join(GROUPS)}, got {group!r}")
        ood.append(DataSplit(set_name, images(folder, f"{path} [ood].{label}", unlabelled=True), group=group))
    detectors = config.get("detectors", {})
    names = _get(detectors, "names", list, f"{path} [detectors]")
    params = _get(detectors, "params", dict, f"{path} [detectors]") or {}
    batch_size = _get(data, "batch_size", int, where) or 256
    if batch_size < 1:
        raise ConfigError(f"{where}.batch_size: expected a positive integer, got {batch_size}")
    benchmark = Benchmark(
        name=name,
        model=model,
        fit=DataSplit("fit", fit),
        test=DataSplit("id", test),
        ood=ood,
        description=f"from {path}",
    )
    options = {
        "detectors": names,
        "params": params,
        "batch_size": batch_size,
        "feature_layer": _get(model_spec, "feature_layer", str, f"{path} [model]"),
        "output_key": _get(model_spec, "output_key", (str, int), f"{path} [model]"),
    }
    return benchmark, options


def _split(name: str, value: Any, group: str = "id") -> DataSplit:
    """A split from data, or ``(data, labels)``."""
    if isinstance(value, DataSplit):
        return value
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], (int, float)):
        return DataSplit(name, value[0], labels=value[1], group=group)
    return DataSplit(name, value, group=group)


def evaluate_model(
    model: nn.Module,
    *,
    fit: Any,
    id: Any,  # noqa: A002 - the name users read in the docs: the ID test set
    ood: Mapping[str, Any],
    detectors: Iterable[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "model",
    n_boot: int = 200,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    model_detectors: bool = True,
    feature_layer: str | None = None,
    output_key: str | int | None = None,
    batch_size: int = 256,
) -> Results:
    """Every detector (or ``detectors``) on ``model``: fitted on ``fit``, scored on ``id`` and each OOD set.

    ``fit`` and ``id`` are anything :func:`oodguard.extraction.extract` takes (arrays, Datasets such as
    :class:`~oodguard.extraction.data.ImageFolder`, DataLoaders) or ``(inputs, labels)`` pairs; ``ood`` maps
    ``"GROUP:NAME"`` (or ``"NAME"``, group far) to OOD data. Returns the :class:`Results`: ``leaderboard()`` (a
    pandas DataFrame), ``table``, ``report(path)`` (the HTML report) and ``save(folder)``.
    """
    from oodguard.benchmark.runner import run

    splits = []
    for label, value in ood.items():
        group, _, set_name = label.rpartition(":")
        splits.append(_split(set_name, value, group or "far"))
    benchmark = Benchmark(name=name, model=model, fit=_split("fit", fit), test=_split("id", id), ood=splits)
    return run(
        benchmark,
        detectors,
        params=params,
        n_boot=n_boot,
        device=device,
        cache_dir=cache_dir,
        progress=progress,
        model_detectors=model_detectors,
        feature_layer=feature_layer,
        output_key=output_key,
        batch_size=batch_size,
    )
