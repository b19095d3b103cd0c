"""Run detectors on a benchmark: extract every dataset once, fit and score each detector on the outputs."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from oodguard import detectors as detector_registry
from oodguard import metrics
from oodguard.benchmark.results import REPORTED, Results
from oodguard.benchmark.side_views import side_views
from oodguard.benchmark.spec import GROUPS, Benchmark, DataSplit
from oodguard.detectors.base import Source
from oodguard.detectors.model.base import ModelDetector
from oodguard.outputs import ModelOutputs
from oodguard.shards import ShardedOutputs


def extract_benchmark(
    benchmark: Benchmark,
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 256,
    feature_layer: str | None = None,
    output_key: str | int | None = None,
) -> dict[str, ModelOutputs]:
    """Run the model once over every dataset of the benchmark (cached on disk when ``cache_dir`` is set)."""
    from oodguard.extraction.extract import extract

    splits: list[DataSplit] = [benchmark.fit, benchmark.test, *benchmark.ood]
    if benchmark.validation is not None:
        splits.insert(1, benchmark.validation)
    from oodguard.extraction.onnx_model import is_onnx_model

    if is_onnx_model(benchmark.model):
        cache_dir = None  # onnxruntime outputs are not cached (the model file is not fingerprinted yet)
    outputs: dict[str, Any] = {}
    for split in splits:
        if isinstance(split.data, ShardedOutputs):  # extracted already (oodguard extract): read shard by shard
            outputs[split.name] = split.data
            continue
        outputs[split.name] = extract(
            benchmark.model,
            split.data,
            labels=split.labels,
            layers=benchmark.layers,
            feature_layer=feature_layer,
            output_key=output_key,
            device=device,
            batch_size=batch_size,
            progress=progress,
            cache_dir=cache_dir,
            desc=f"extract {split.name}",
        )
    return outputs


def run(
    benchmark: Benchmark,
    detectors: Iterable[str] | None = None,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    full_spectrum: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    model_detectors: bool = True,
    feature_layer: str | None = None,
    output_key: str | int | None = None,
    batch_size: int = 256,
    ocs_curve: bool = True,
) -> Results:
    """Evaluate detectors on a benchmark; a detector that fails is reported as failed and the run goes on.

    Each dataset goes through the model once (cached on disk when ``cache_dir`` is set). Every detector is then
    fitted on the fit split and scores the ID test split and every OOD set through the detector protocol
    (:meth:`~oodguard.detectors.Detector.fit_from`): output detectors read the cached outputs, model detectors
    (``info(name)["protocol"] == "model"``: input or inner-layer gradients, test-time views) run the benchmark's
    model on the splits' inputs.

    Parameters
    ----------
    benchmark : the data and model.
    detectors : registry names; default every output detector whose requirements the outputs meet (and MOS with a
        trained head), plus every model detector that takes the benchmark's inputs (CoVer needs images) and, when
        the splits carry their texts and the benchmark its text encoder (``Benchmark.text_encoder()``), every
        detector that embeds texts itself (``ahm``), unless ``model_detectors`` is false.
    params : per-detector hyperparameters, e.g. ``{"knn": {"k": 10}}``; merged over the benchmark's own
        ``detector_params`` (the user's value wins per parameter).

    The benchmark's own rows (``benchmark.extra_jobs``, e.g. ``bam_lora`` on ``text``) run by default beside the
    detectors, or when ``detectors`` names them; they take no ``params``.
    full_spectrum : count covariate-shift sets as ID (full-spectrum OOD detection) instead of as OOD.
    n_boot, seed : bootstrap replicates and seed of the 95 % intervals.
    feature_layer, output_key, batch_size : how to run the model (see :func:`oodguard.extraction.extract`).
    ocs_curve : on image benchmarks with labels, also measure how the model's predictions approach the optimal
        constant solution under corruption (:func:`oodguard.diagnostics.ocs_curve`, 26 forward passes over the ID
        test images; not with ``model_detectors=False``), kept in ``Results.diagnostics["ocs_curve"]`` and drawn in the
        report.
    """
    from oodguard.extraction.model_runner import ModelRunner

    params = merge_params(benchmark.detector_params, params)
    check_params(list(params), params)  # a typo must not cost the extraction
    requested = None if detectors is None else list(detectors)
    extra = _benchmark_rows(benchmark, requested, params)
    detectors = None if requested is None else [name for name in requested if name not in extra]
    outputs = extract_benchmark(
        benchmark, device=device, cache_dir=cache_dir, progress=progress, batch_size=batch_size,
        feature_layer=feature_layer, output_key=output_key,
    )  # fmt: skip
    fit = outputs[benchmark.fit.name]
    from oodguard.extraction.onnx_model import is_onnx_model

    onnx = is_onnx_model(benchmark.model)  # run by onnxruntime: outputs, but no gradients or views through it
    splits = [benchmark.fit, benchmark.test, *benchmark.ood]
    from_shards = [split.name for split in splits if isinstance(split.data, ShardedOutputs)]
    no_inputs = onnx or bool(from_shards)  # model detectors need a torch model and the inputs of every split
    encoder = benchmark.text_encoder()
    if detectors is None:
        names = default_detectors(fit, params)
        if model_detectors and not no_inputs:
            names += _model_detectors_for(benchmark.fit.data, params, benchmark.model)
        if model_detectors:
            names += _text_detectors_for(encoder, params)
        if fit.has("features") and fit.has("labels") and MOS_HEAD not in names:
            names.append(MOS_HEAD)
    else:
        names = list(detectors)
    skipped = (
        skipped_detectors(
            fit,
            names,
            params,
            inputs=None if no_inputs else benchmark.fit.data,
            model_detectors=model_detectors,
            text_encoder=encoder,
            model=benchmark.model,
        )
        if detectors is None
        else {}  # the user chose: the others were not asked for
    )
    asked = [n for n in names if n in detector_registry.available(protocol="model") and _input_kind(n) == "tensors"]
    if onnx and asked:
        raise ValueError(f"{', '.join(asked)} run the model themselves (gradients, views): not an ONNX model")
    if from_shards and asked:
        raise ValueError(
            f"{', '.join(asked)} run the model on the inputs, but {', '.join(from_shards)} are shard folders of outputs"
        )
    # The runner shares the outputs cache: the outputs of test-time views (CoVer) are cached like datasets.
    runner = (
        None
        if onnx
        else ModelRunner(
            benchmark.model, device=device, cache_dir=cache_dir, feature_layer=feature_layer, output_key=output_key
        )
    )

    def source(split: DataSplit) -> Source:
        return Source(outputs[split.name], data=split.data, labels=split.labels, runner=runner, texts=split.texts,
                      encoder=benchmark.encoder)  # fmt: skip

    results = _evaluate(
        benchmark.name,
        source(benchmark.fit),
        source(benchmark.test),
        [(split.name, split.group, source(split)) for split in benchmark.ood],
        names,
        params=params,
        full_spectrum=full_spectrum,
        n_boot=n_boot,
        seed=seed,
        progress=progress,
        split_names=(benchmark.fit.name, benchmark.test.name),
        skipped=skipped,
        cache_dir=cache_dir,
        validation=(benchmark.validation.name, source(benchmark.validation)) if benchmark.validation else None,
        extra_jobs=extra,
    )
    if runner is not None and not from_shards and ocs_curve and model_detectors:  # it runs the model too
        results.diagnostics["ocs_curve"] = _ocs_diagnostic(runner, benchmark, fit)
    results.diagnostics["explanations"] = _explanations(
        benchmark, outputs, onnx=onnx, from_shards=bool(from_shards), model_detectors=model_detectors, device=device,
        feature_layer=feature_layer, output_key=output_key,
    )  # fmt: skip
    return results


def _explanations(
    benchmark: Benchmark, outputs: Mapping[str, Any], *, onnx: bool, from_shards: bool, model_detectors: bool,
    device: str, feature_layer: str | None, output_key: str | int | None,
) -> dict[str, Any]:  # fmt: skip
    """Attribution maps of the top-scoring OOD inputs for the report, or why there are none (never fails the run)."""
    from oodguard.benchmark.explanations import explanation_maps

    reason = None
    if onnx:
        reason = "the model runs in onnxruntime (no gradients through it)"
    elif from_shards:
        reason = "outputs were read from shard folders (no inputs to attribute to)"
    elif not model_detectors:
        reason = "the run was asked not to run the model again (--no-model-detectors)"
    try:
        return explanation_maps(benchmark, outputs, skip_reason=reason, device=device, feature_layer=feature_layer,
                                output_key=output_key)  # fmt: skip
    except (ValueError, RuntimeError) as error:  # a diagnostic: said in the report, the leaderboard still stands
        return {"skipped": f"failed: {' '.join(str(error).split())[:300]}"}


def _ocs_diagnostic(runner: Any, benchmark: Benchmark, fit: ModelOutputs | ShardedOutputs) -> dict[str, Any] | None:
    """The model's OCS curve on the ID test images (None for inputs other than image tensors or without labels)."""
    from oodguard.detectors.ocs import optimal_constant_solution
    from oodguard.diagnostics import ocs_curve

    images, labels = benchmark.test.data, benchmark.test.labels
    if getattr(images, "ndim", None) != 4 or fit.labels is None or labels is None or not fit.has("logits"):
        return None
    num_classes = fit.num_classes or int(fit.labels.max()) + 1
    curve = ocs_curve(runner, images, optimal_constant_solution(fit.labels, num_classes), labels=labels)
    return {
        "corruptions": list(curve.corruptions),
        "severities": list(curve.severities),
        "distance": curve.distance.tolist(),
        "accuracy": None if curve.accuracy is None else curve.accuracy.tolist(),
        "split": benchmark.test.name,
    }


def _benchmark_rows(
    benchmark: Benchmark, detectors: Iterable[str] | None, params: Mapping[str, Mapping[str, Any]]
) -> dict[str, Callable[[], dict]]:
    """The benchmark's own rows to run: every one by default, else those ``detectors`` names."""
    own = dict(benchmark.extra_jobs)
    clash = sorted(set(own) & set(detector_registry.available()))
    if clash:
        raise ValueError(f"{benchmark.name}: its own rows {clash} have the names of registered detectors; rename them")
    fixed = sorted(set(own) & set(params))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)}: computed by the {benchmark.name!r} benchmark itself with fixed settings (see its "
            "notes); parameters do not apply"
        )
    if detectors is None:
        return own
    return {name: own[name] for name in detectors if name in own}


def _model_detectors_for(
    data: Any, params: Mapping[str, Mapping[str, Any]] | None = None, model: Any = None
) -> list[str]:
    """Model detectors that can take these inputs (CoVer's corruptions need images ``[N, C, H, W]``), whose required
    parameters ``params`` gives and that can run on ``model`` when given (MC dropout needs dropout layers)."""
    ndim = getattr(data, "ndim", None)  # tensors and arrays; datasets and loaders are not inspected
    chosen = []
    for name in detector_registry.available(protocol="model"):
        cls = detector_registry.implementation(name)
        wanted = getattr(cls, "input_ndim", None)
        if getattr(cls, "needs_auxiliary_head", False) or cls.not_by_default:  # asked for by name only
            continue
        if _input_kind(name) != "tensors":  # texts: see _text_detectors_for
            continue
        if (
            (wanted is None or ndim is None or ndim == wanted)
            and _has_required(name, params)
            and (model is None or _unsupported(cls, model) is None)
        ):
            chosen.append(name)
    return chosen


def _input_kind(name: str) -> str:
    return detector_registry.implementation(name).input_kind


def _text_detectors_for(encoder: Any, params: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Detectors that embed raw texts themselves and can use ``encoder`` (none without an encoder)."""
    if encoder is None:
        return []
    chosen = []
    for name in detector_registry.available(protocol="model"):
        cls = detector_registry.implementation(name)
        if (
            issubclass(cls, ModelDetector)
            and cls.input_kind == "texts"
            and not cls.not_by_default
            and cls.encoder_problem(encoder) is None
            and _has_required(name, params)
        ):
            chosen.append(name)
    return chosen


def _unsupported(cls: type, model: Any) -> str | None:
    check = getattr(cls, "unsupported", None)
    return check(model) if check is not None else None


def _has_required(name: str, params: Mapping[str, Mapping[str, Any]] | None) -> bool:
    required = set(detector_registry.info(name)["required_params"])
    return required <= set((params or {}).get(name, {}))


#: The runner trains a group-softmax head for MOS on the frozen fit features (models seldom have one).
MOS_HEAD = "mos"


def _mos_job(
    fit: ModelOutputs, test: ModelOutputs, ood: list[tuple[str, str, ModelOutputs]], params: Mapping[str, Any]
) -> Callable[[], dict]:
    """MOS needs a head trained with the group softmax: train one on the fit features, then score its logits.

    Groups: ``params["group_sizes"]`` when given, else ``default_groups(C, round(sqrt(C)))`` (contiguous class
    ids; the official ImageNet head uses the WordNet taxonomy instead).
    """

    def job() -> dict[str, np.ndarray]:
        from oodguard.heads.mos import default_groups, train_mos_head

        nonlocal fit, test, ood
        # the head trains on all fit features at once: shard folders are read into memory for it
        fit, test = _in_memory(fit), _in_memory(test)
        ood = [(set_name, group, _in_memory(outputs)) for set_name, group, outputs in ood]
        if fit.features is None or fit.labels is None:
            raise ValueError("mos: the runner trains its group-softmax head on fit features and labels; extract both")
        num_classes = fit.num_classes or int(fit.labels.max()) + 1
        sizes = params.get("group_sizes") or default_groups(num_classes, max(2, round(num_classes**0.5)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # hundreds of small steps: a thread pool's spin-waits cost more than they save
        try:
            head = train_mos_head(fit, None, sizes, seed=0, progress=False)
        finally:
            torch.set_num_threads(threads)
        detector = head.detector()
        scores = {"id": np.asarray(detector.score(head.outputs(test)))}  # the head reads their features
        for set_name, _, outputs in ood:
            scores[set_name] = np.asarray(detector.score(head.outputs(outputs)))
        return scores

    return job


def _detector_job(
    name: str,
    params: Mapping[str, Any],
    fit: Source,
    test: Source,
    ood: list[tuple[str, str, Source]],
    cache_dir: str | Path | None = None,
    validation: Source | None = None,
) -> Callable[[], dict]:
    """Fit one detector on the fit source and score the test source and every OOD source (either protocol).

    Detectors that train networks and take a ``cache_dir`` (``ae_mahalanobis``, ``sage``, ``msma``, ...) cache
    their fitted state under ``cache_dir/detectors`` unless the caller chose their cache. Detectors with a
    ``calibrate(outputs)`` step (``sdm``) are calibrated on the ``validation`` outputs when there are any."""

    def job() -> dict[str, np.ndarray]:
        detector = detector_registry.create(name, **params)
        if cache_dir is not None and "cache_dir" in detector.param_names() and params.get("cache_dir") is None:
            detector.set_params(cache_dir=str(Path(cache_dir) / "detectors"))
        detector.fit_from(fit)
        calibrate = getattr(detector, "calibrate", None)
        if callable(calibrate) and validation is not None and validation.outputs is not None:
            calibrate(validation.outputs)
        scores = {"id": np.asarray(detector.score_from(test))}
        for set_name, _, source in ood:
            scores[set_name] = np.asarray(detector.score_from(source))
        return scores

    return job


def run_on_outputs(
    name: str,
    fit: ModelOutputs,
    test: ModelOutputs,
    ood: list[tuple[str, str, ModelOutputs]],
    detectors: Iterable[str] | None = None,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    full_spectrum: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = True,
    split_names: tuple[str, str] = ("fit", "test"),
    extra_jobs: Mapping[str, Callable[[], dict]] | None = None,
) -> Results:
    """The same evaluation from outputs already extracted: ``ood`` lists ``(name, group, outputs)``.

    Only output detectors apply (model detectors need the model: use :func:`run` on a Benchmark). ``mos`` is
    evaluated with a group-softmax head trained on the fit features (see ``_mos_job``); ``extra_jobs`` maps further
    names to callables returning their scores per set (``"id"`` and every OOD set name).
    """
    names = list(detectors) if detectors is not None else default_detectors(fit, params)
    if detectors is None and fit.features is not None and fit.labels is not None and MOS_HEAD not in names:
        names.append(MOS_HEAD)
    model_detectors = [n for n in names if n in detector_registry.available(protocol="model")]
    if model_detectors:
        raise ValueError(
            f"{', '.join(model_detectors)} run the model themselves (gradients through it); evaluate them with "
            "oodguard.benchmark.runner.run on a Benchmark that holds the model"
        )
    skipped = skipped_detectors(fit, [*names, *(extra_jobs or {})], params) if detectors is None else {}
    return _evaluate(
        name,
        Source(fit),
        Source(test),
        [(set_name, group, Source(outputs)) for set_name, group, outputs in ood],
        names,
        params=params,
        full_spectrum=full_spectrum,
        n_boot=n_boot,
        seed=seed,
        progress=progress,
        split_names=split_names,
        extra_jobs=extra_jobs,
        skipped=skipped,
    )


def _evaluate(
    name: str,
    fit: Source,
    test: Source,
    ood: list[tuple[str, str, Source]],
    names: list[str],
    *,
    params: Mapping[str, Mapping[str, Any]] | None,
    full_spectrum: bool,
    n_boot: int,
    seed: int,
    progress: bool,
    split_names: tuple[str, str],
    extra_jobs: Mapping[str, Callable[[], dict]] | None = None,
    skipped: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    validation: tuple[str, Source] | None = None,
) -> Results:
    params = {key: dict(value) for key, value in (params or {}).items()}
    extra_jobs = dict(extra_jobs or {})
    if not ood:
        raise ValueError("no OOD sets given; pass at least one")
    for set_name, group, _ in ood:
        if group not in GROUPS:
            raise ValueError(f"OOD set {set_name!r}: group must be one of {', '.join(GROUPS)}, got {group!r}")
    unknown = sorted(set(names) - set(detector_registry.available()))
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; available: {', '.join(detector_registry.available())}")
    if not names and not extra_jobs:
        raise ValueError("no detector to run: the outputs lack what every detector needs")
    check_params(names, params)
    test_outputs, fit_outputs = test.outputs, fit.outputs
    if test_outputs.labels is not None and bool(test_outputs.is_ood.any()):
        raise ValueError(
            f"the ID test outputs contain {int(test_outputs.is_ood.sum())} OOD-labelled row(s) (label < 0); move "
            "them to an OOD set"
        )
    if fit_outputs.labels is not None and bool(fit_outputs.is_ood.any()):
        raise ValueError(
            f"the fit outputs contain {int(fit_outputs.is_ood.sum())} OOD-labelled row(s) (label < 0); fit on "
            "in-distribution data only"
        )

    jobs = {
        n: _mos_job(fit_outputs, test_outputs, [(s, g, src.outputs) for s, g, src in ood], params.get(n, {}))
        if n == MOS_HEAD
        else _detector_job(n, params.get(n, {}), fit, test, ood, cache_dir, validation[1] if validation else None)
        for n in names
    }
    jobs.update(extra_jobs)

    id_accuracy = _accuracy(test_outputs)
    covariate = [set_name for set_name, group, _ in ood if group == "covariate"]
    evaluated = [(n, g) for n, g, _ in ood if not (full_spectrum and g == "covariate")]
    groups = {g: [n for n, gg in evaluated if gg == g] for g in GROUPS if any(gg == g for _, gg in evaluated)}
    if not evaluated:
        raise ValueError("full-spectrum mode counts covariate sets as ID, which leaves no OOD set to evaluate")

    rows, status_rows, all_scores = [], [], {}
    for detector_name, job in tqdm(list(jobs.items()), desc="detectors", disable=not progress):
        started = time.perf_counter()
        try:
            scores = job()
        except Exception as error:  # a failing detector is reported, the run goes on
            status_rows.append(
                {"detector": detector_name, "status": "failed", "error": f"{type(error).__name__}: {error}",
                 "seconds": np.nan, "traceback": traceback.format_exc(limit=3)}
            )  # fmt: skip
            continue
        elapsed = time.perf_counter() - started
        id_scores = scores["id"]
        if full_spectrum and covariate:
            id_scores = np.concatenate([id_scores, *(scores[c] for c in covariate)])
        for set_name, group in evaluated:
            ci = metrics.bootstrap(id_scores, scores[set_name], metrics=tuple(REPORTED.values()),
                                   n_boot=n_boot, seed=seed)  # fmt: skip
            row = {"detector": detector_name, "ood_set": set_name, "group": group}
            for column, metric in REPORTED.items():
                estimate, low, high = ci[metric]
                row.update({column: estimate, f"{column}_low": low, f"{column}_high": high})
            rows.append(row)
        all_scores[detector_name] = scores
        status_rows.append(
            {"detector": detector_name, "status": "ok", "error": "", "seconds": elapsed, "traceback": ""}
        )
    return Results(
        benchmark=name,
        table=pd.DataFrame(rows, columns=_table_columns()),
        views=side_views(all_scores, groups, _correct(test_outputs)),
        status=pd.DataFrame(status_rows),
        scores=all_scores,
        groups=groups,
        id_accuracy=id_accuracy,
        full_spectrum=full_spectrum,
        settings={"n_boot": n_boot, "seed": seed, "params": _describe_params(params), "fit_split": split_names[0],
                  "id_split": split_names[1],
                  "calibration_split": validation[0] if validation is not None else None},
        skipped=dict(skipped or {}),
    )  # fmt: skip


def _table_columns() -> list[str]:
    columns = ["detector", "ood_set", "group"]
    for column in REPORTED:
        columns += [column, f"{column}_low", f"{column}_high"]
    return columns


def default_detectors(outputs: ModelOutputs, params: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Every registered detector whose fit requirements the outputs meet and whose required parameters
    (``info(name)["required_params"]``) are all given in ``params``."""
    available = set(outputs.fields())
    params = params or {}
    chosen = []
    for name in detector_registry.available(needs_model=False):
        meta = detector_registry.info(name)
        if detector_registry.implementation(name).not_by_default:
            continue
        needs = set(meta["fit_requires"]) | set(meta["requires"])
        if needs <= available and set(meta.get("required_params") or ()) <= set(params.get(name, {})):
            chosen.append(name)
    return chosen


def skipped_detectors(
    outputs: ModelOutputs,
    chosen: Iterable[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    inputs: Any = None,
    model_detectors: bool = True,
    text_encoder: Any = None,
    model: Any = None,
) -> dict[str, str]:
    """Every registered detector not in ``chosen``, with why it was not run (missing fields, parameters, model).

    ``inputs`` are the fit split's model inputs when a model is available (``None``: outputs only);
    ``text_encoder`` is the encoder behind the splits' texts when every split carries them (``None``: no texts);
    ``model`` the model itself, when given, for detectors that cannot run on some models.
    """
    chosen = set(chosen)
    available = set(outputs.fields())
    reasons = {}
    for name in detector_registry.available():
        if name in chosen:
            continue
        meta = detector_registry.info(name)
        missing_params = sorted(set(meta.get("required_params") or ()) - set((params or {}).get(name, {})))
        reason = detector_registry.implementation(name).not_by_default
        if reason:
            reasons[name] = f"{reason}; ask for it by name (-d {name})"
            continue
        cls = detector_registry.implementation(name)
        if issubclass(cls, ModelDetector) and cls.input_kind == "texts":
            if not model_detectors:
                reasons[name] = "a model detector, and model detectors were turned off"
                continue
            if text_encoder is None:
                reasons[name] = (
                    "embeds raw texts with a text encoder; these splits carry no texts (a Benchmark with encoder= "
                    "and texts on every DataSplit, as the text benchmark has)"
                )
                continue
            problem = cls.encoder_problem(text_encoder)
            if problem is not None:
                reasons[name] = problem
                continue
        elif meta["protocol"] == "model":
            if inputs is None:
                reasons[name] = "runs the model itself (gradients or test-time views); these are outputs only"
                continue
            if not model_detectors:
                reasons[name] = "a model detector, and model detectors were turned off"
                continue
            if getattr(detector_registry.implementation(name), "needs_auxiliary_head", False):
                reasons[name] = "needs a model trained with its auxiliary head (oodguard.train's method of that name)"
                continue
            wanted = getattr(detector_registry.implementation(name), "input_ndim", None)
            ndim = getattr(inputs, "ndim", None)
            if wanted is not None and ndim is not None and ndim != wanted:
                reasons[name] = f"needs inputs of rank {wanted} (images [N, C, H, W]); these have rank {ndim}"
                continue
            why = None if model is None else _unsupported(detector_registry.implementation(name), model)
            if why is not None:
                reasons[name] = why
                continue
        else:
            needs = sorted((set(meta["fit_requires"]) | set(meta["requires"])) - available)
            if needs:
                reasons[name] = (
                    f"needs {', '.join(needs)}, which the outputs lack (they hold {', '.join(sorted(available))})"
                )
                continue
        if missing_params:
            given = " ".join(f"--param {name}.{p}=..." for p in missing_params)
            reasons[name] = f"needs parameter {', '.join(missing_params)} ({given})"
    return reasons


def check_params(names: Iterable[str], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse bad hyperparameters before any work starts (a typo should not cost a whole run).

    Each chosen detector given parameters is constructed once, which runs its own validation; MOS takes the
    runner's head-training parameters too, which are checked where they are used.
    """
    for name in names:
        if name in params and name != MOS_HEAD and name in detector_registry.available():
            detector_registry.create(name, **params[name])


def merge_params(
    defaults: Mapping[str, Mapping[str, Any]] | None, overrides: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Per-detector parameters: ``overrides`` (the user's) over ``defaults`` (the benchmark's), per parameter."""
    merged = {key: dict(value) for key, value in (defaults or {}).items()}
    for key, value in (overrides or {}).items():
        merged.setdefault(key, {}).update(value)
    return merged


def _describe_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parameters as results record them: tensors and arrays by shape and dtype (they can be large)."""

    def describe(value: Any) -> Any:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return f"{type(value).__name__}(shape={list(value.shape)}, dtype={value.dtype})"
        return value

    return {name: {key: describe(value) for key, value in values.items()} for name, values in params.items()}


def _in_memory(outputs: ModelOutputs | ShardedOutputs) -> ModelOutputs:
    return outputs.to_memory() if isinstance(outputs, ShardedOutputs) else outputs


def _correct(outputs: ModelOutputs | ShardedOutputs) -> np.ndarray | None:
    """Whether the model classifies each ID test row correctly; None without logits or labels for every row."""
    if not outputs.has("logits") or outputs.labels is None or not bool((outputs.labels >= 0).all()):
        return None
    rows = outputs if isinstance(outputs, ShardedOutputs) else [outputs]
    parts = [(shard.logits.argmax(dim=1) == shard.labels).cpu().numpy() for shard in rows]  # type: ignore[union-attr]
    return np.concatenate(parts)


def _accuracy(outputs: ModelOutputs | ShardedOutputs) -> float:
    if isinstance(outputs, ShardedOutputs):  # shard by shard, weighted by the rows with a known class
        labels = outputs.labels
        if not outputs.has("logits") or labels is None or not bool((labels >= 0).any()):
            return float("nan")
        correct = 0
        for shard in outputs:
            assert shard.logits is not None and shard.labels is not None
            known = shard.labels >= 0
            correct += int((shard.logits[known].argmax(dim=1) == shard.labels[known]).sum())
        return correct / int((labels >= 0).sum())
    if outputs.logits is None or outputs.labels is None:
        return float("nan")
    known = outputs.labels >= 0
    if not bool(known.any()):
        return float("nan")
    predictions = outputs.logits[known].argmax(dim=1)
    return float((predictions == outputs.labels[known]).double().mean())
