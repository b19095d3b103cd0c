"""Run detectors on a benchmark: extract every dataset once, fit and score each detector on the outputs."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from oodguard import detectors as detector_registry
from oodguard import metrics
from oodguard.benchmark.spec import GROUPS, Benchmark, DataSplit
from oodguard.outputs import ModelOutputs

#: Metrics reported per detector and OOD set, each with a bootstrap interval.
REPORTED = {
    "auroc": "auroc",
    "fpr95": "fpr_at_tpr",  # ID-TPR convention: OOD accepted when 95 % of ID is kept
    "aupr_in": "aupr_in",
    "aupr_out": "aupr_out",
}


@dataclass
class Results:
    """What a benchmark run produced: per-set metrics, per-detector status, and the raw scores."""

    benchmark: str
    table: pd.DataFrame
    status: pd.DataFrame
    scores: dict[str, dict[str, np.ndarray]]
    groups: dict[str, list[str]]
    id_accuracy: float
    full_spectrum: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def leaderboard(self) -> pd.DataFrame:
        """One row per detector: mean AUROC and FPR@95 per group (unweighted over sets), sorted best first.

        Sorted by the mean AUROC over the semantic groups (near, far) when present, else over all groups.
        Failed detectors come last with their error.
        """
        rows = []
        for detector, status in self.status.set_index("detector").iterrows():
            row: dict[str, Any] = {"detector": detector}
            subset = self.table[self.table["detector"] == detector]
            for group in self.groups:
                in_group = subset[subset["group"] == group]
                row[f"{group} AUROC"] = in_group["auroc"].mean() if len(in_group) else np.nan
                row[f"{group} FPR@95"] = in_group["fpr95"].mean() if len(in_group) else np.nan
            row["status"] = status["status"]
            row["error"] = status["error"]
            rows.append(row)
        board = pd.DataFrame(rows)
        semantic = [f"{g} AUROC" for g in ("near", "far") if g in self.groups] or [f"{g} AUROC" for g in self.groups]
        board["_rank"] = board[semantic].mean(axis=1)
        board.loc[board["status"] != "ok", "_rank"] = -np.inf
        board = board.sort_values("_rank", ascending=False, kind="stable").drop(columns="_rank")
        return board.reset_index(drop=True)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write CSV, JSON, Markdown and the HTML report; return their paths."""
        from oodguard.benchmark.report import write_report

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": directory / "results.csv",
            "json": directory / "results.json",
            "markdown": directory / "leaderboard.md",
            "html": directory / "report.html",
        }
        self.table.to_csv(paths["csv"], index=False)
        payload = {
            "benchmark": self.benchmark,
            "id_accuracy": self.id_accuracy,
            "full_spectrum": self.full_spectrum,
            "settings": self.settings,
            "groups": self.groups,
            "status": self.status.to_dict(orient="records"),
            "results": self.table.to_dict(orient="records"),
            "leaderboard": self.leaderboard().to_dict(orient="records"),
        }
        import json

        paths["json"].write_text(json.dumps(payload, indent=2, default=_json_default))
        paths["markdown"].write_text(self.to_markdown())
        write_report(self, paths["html"])
        return paths

    def to_markdown(self) -> str:
        """The leaderboard as a Markdown table (AUROC and FPR@95 in percent)."""
        board = self.leaderboard()
        columns = [c for c in board.columns if c.endswith("AUROC") or c.endswith("FPR@95")]
        lines = [
            f"Benchmark `{self.benchmark}`; ID accuracy {100 * self.id_accuracy:.2f} %; "
            f"{'full-spectrum (covariate sets count as ID)' if self.full_spectrum else 'standard'} protocol. "
            "AUROC higher is better; FPR@95 = % of OOD accepted when 95 % of ID is kept (lower is better); "
            "group means are unweighted over the group's OOD sets.",
            "",
            "| rank | detector | " + " | ".join(columns) + " |",
            "|---:|---|" + "---:|" * len(columns),
        ]
        for rank, values in enumerate(board.to_dict(orient="records"), start=1):
            if values["status"] != "ok":
                lines.append(f"| - | {values['detector']} | failed: {_one_line(values['error'])} |")
                continue
            cells = " | ".join("" if pd.isna(values[c]) else f"{100 * values[c]:.2f}" for c in columns)
            lines.append(f"| {rank} | {values['detector']} | {cells} |")
        return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def extract_benchmark(
    benchmark: Benchmark,
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> dict[str, ModelOutputs]:
    """Run the model once over every dataset of the benchmark (cached on disk when ``cache_dir`` is set)."""
    from oodguard.extraction.extract import extract

    splits: list[DataSplit] = [benchmark.fit, benchmark.test, *benchmark.ood]
    if benchmark.validation is not None:
        splits.insert(1, benchmark.validation)
    outputs = {}
    for split in splits:
        outputs[split.name] = extract(
            benchmark.model,
            split.data,
            labels=split.labels,
            layers=benchmark.layers,
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
) -> Results:
    """Evaluate detectors on a benchmark; a detector that fails is reported as failed and the run goes on.

    Each dataset goes through the model once (cached on disk when ``cache_dir`` is set); every output-based
    detector is then fitted on the fit split's outputs and scores the ID test split and every OOD set.
    Detectors that run the model themselves (``detectors.needs_model(name, params)``: input or inner-layer
    gradients, e.g. ``odin`` or ``gradnorm`` with ``mode="autograd"``) are attached to the benchmark's model
    and fitted and scored on the splits' inputs.

    Parameters
    ----------
    benchmark : the data and model.
    detectors : registry names; default every output-based detector whose requirements the outputs meet
        (and MOS with a trained head), plus every model-based detector that takes the benchmark's inputs (CoVer
        needs images) unless ``model_detectors`` is false; then a benchmark default that would make an
        output-based detector run the model (``nac`` on layers) is dropped, and it runs on the cached outputs.
        Model-based detectors run the model again on every split (their work cannot come from the cache).
    params : per-detector hyperparameters, e.g. ``{"knn": {"k": 10}}``; merged over the benchmark's own
        ``detector_params`` (the user's value wins per parameter).
    full_spectrum : count covariate-shift sets as ID (full-spectrum OOD detection) instead of as OOD.
    n_boot, seed : bootstrap replicates and seed of the 95 % intervals.
    """
    outputs = extract_benchmark(benchmark, device=device, cache_dir=cache_dir, progress=progress)
    fit = outputs[benchmark.fit.name]
    defaults = dict(benchmark.detector_params)
    if not model_detectors:  # a benchmark's default that selects a model-based variant (nac on layers) is dropped
        defaults = {n: p for n, p in defaults.items() if not _selects_model_variant(n, p, (params or {}).get(n, {}))}
    params = merge_params(defaults, params)
    if detectors is None:
        names = default_detectors(fit, params)
        if model_detectors:
            names += _model_detectors_for(benchmark.fit.data)
        if fit.features is not None and fit.labels is not None and MOS_HEAD not in names:
            names.append(MOS_HEAD)
    else:
        names = list(detectors)
    check_params(names, params)
    model_jobs = {
        name: _model_job(benchmark, name, params.get(name, {}), device, cache_dir)
        for name in names
        if name in detector_registry.available() and detector_registry.needs_model(name, params.get(name))
    }
    return run_on_outputs(
        benchmark.name,
        fit,
        outputs[benchmark.test.name],
        [(split.name, split.group, outputs[split.name]) for split in benchmark.ood],
        [name for name in names if name not in model_jobs],
        params=params,
        full_spectrum=full_spectrum,
        n_boot=n_boot,
        seed=seed,
        progress=progress,
        split_names=(benchmark.fit.name, benchmark.test.name),
        extra_jobs=model_jobs,
    )


def _selects_model_variant(name: str, defaults: Mapping[str, Any], user: Mapping[str, Any]) -> bool:
    """Whether a benchmark's defaults turn an output-based detector into its model-based variant."""
    if name not in detector_registry.available() or detector_registry.info(name)["needs_model"]:
        return False
    return detector_registry.needs_model(name, {**defaults, **user}) and not detector_registry.needs_model(name, user)


def _model_detectors_for(data: Any) -> list[str]:
    """Model-based detectors that can take these inputs (CoVer's corruptions need images ``[N, C, H, W]``)."""
    ndim = getattr(data, "ndim", None)  # tensors and arrays; datasets and loaders are not inspected
    chosen = []
    for name in detector_registry.available(needs_model=True):
        wanted = getattr(detector_registry.implementation(name), "input_ndim", None)
        if wanted is None or ndim is None or ndim == wanted:
            chosen.append(name)
    return chosen


def _model_job(
    benchmark: Benchmark, name: str, params: dict[str, Any], device: str, cache_dir: str | Path | None
) -> Callable[[], dict]:
    """Fit a model-based detector on the fit split's inputs and score every split's inputs.

    The model runner shares the outputs cache: the outputs of test-time views (CoVer) are cached like datasets.
    """

    def job() -> dict[str, np.ndarray]:
        from oodguard.extraction.model_runner import ModelRunner

        runner = ModelRunner(benchmark.model, device=device, cache_dir=cache_dir)
        detector = detector_registry.create(name, **params).attach(runner)
        detector.fit(benchmark.fit.data, labels=benchmark.fit.labels)
        scores = {"id": np.asarray(detector.score(benchmark.test.data))}
        for split in benchmark.ood:
            scores[split.name] = np.asarray(detector.score(split.data))
        return scores

    return job


#: The runner trains a group-softmax head for MOS on the frozen fit features (models seldom have one).
MOS_HEAD = "mos"


def _mos_job(
    fit: ModelOutputs, test: ModelOutputs, ood: list[tuple[str, str, ModelOutputs]], params: dict[str, Any]
) -> Callable[[], dict]:
    """MOS needs a head trained with the group softmax: train one on the fit features, then score its logits.

    Groups: ``params["group_sizes"]`` when given, else ``default_groups(C, round(sqrt(C)))`` (contiguous class
    ids; the official ImageNet head uses the WordNet taxonomy instead).
    """

    def job() -> dict[str, np.ndarray]:
        from oodguard.heads.mos import default_groups, train_mos_head

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
        scores = {"id": np.asarray(detector.score(head.outputs(test.features)))}
        for set_name, _, outputs in ood:
            scores[set_name] = np.asarray(detector.score(head.outputs(outputs.features)))
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

    ``mos`` is evaluated with a group-softmax head trained on the fit features (see ``_mos_job``);
    ``extra_jobs`` maps further detector names to callables returning their scores per set (``"id"`` and
    every OOD set name), e.g. model-based detectors.
    """
    params = {key: dict(value) for key, value in (params or {}).items()}
    extra_jobs = dict(extra_jobs or {})
    if not ood:
        raise ValueError("no OOD sets given; pass at least one")
    for set_name, group, _ in ood:
        if group not in GROUPS:
            raise ValueError(f"OOD set {set_name!r}: group must be one of {', '.join(GROUPS)}, got {group!r}")
    names = list(detectors) if detectors is not None else default_detectors(fit, params)
    if detectors is None and fit.features is not None and fit.labels is not None and MOS_HEAD not in names:
        names.append(MOS_HEAD)
    unknown = sorted(set(names) - set(detector_registry.available()))
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; available: {', '.join(detector_registry.available())}")
    if not names and not extra_jobs:
        raise ValueError("no detector to run: the outputs lack what every detector needs")
    check_params(names, params)
    model_based = [n for n in names if detector_registry.needs_model(n, params.get(n))]
    if model_based:
        raise ValueError(
            f"{', '.join(model_based)} run the model themselves (gradients through it); evaluate them with "
            "oodguard.benchmark.runner.run on a Benchmark that holds the model"
        )
    if test.labels is not None and bool(test.is_ood.any()):
        raise ValueError(
            f"the ID test outputs contain {int(test.is_ood.sum())} OOD-labelled row(s) (label < 0); move them to "
            "an OOD set"
        )
    if fit.labels is not None and bool(fit.is_ood.any()):
        raise ValueError(
            f"the fit outputs contain {int(fit.is_ood.sum())} OOD-labelled row(s) (label < 0); fit on "
            "in-distribution data only"
        )

    def output_job(detector_name: str) -> Callable[[], dict]:
        def job() -> dict[str, np.ndarray]:
            detector = detector_registry.create(detector_name, **params.get(detector_name, {}))
            detector.fit(fit)
            scores = {"id": np.asarray(detector.score(test))}
            for set_name, _, outputs in ood:
                scores[set_name] = np.asarray(detector.score(outputs))
            return scores

        return job

    jobs = {n: _mos_job(fit, test, ood, params.get(n, {})) if n == MOS_HEAD else output_job(n) for n in names}
    jobs.update(extra_jobs)

    id_accuracy = _accuracy(test)
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
        status=pd.DataFrame(status_rows),
        scores=all_scores,
        groups=groups,
        id_accuracy=id_accuracy,
        full_spectrum=full_spectrum,
        settings={"n_boot": n_boot, "seed": seed, "params": _describe_params(params), "fit_split": split_names[0],
                  "id_split": split_names[1]},
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
        needs = set(meta["fit_requires"]) | set(meta["requires"])
        if needs <= available and set(meta.get("required_params") or ()) <= set(params.get(name, {})):
            chosen.append(name)
    return chosen


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


def _accuracy(outputs: ModelOutputs) -> float:
    if outputs.logits is None or outputs.labels is None:
        return float("nan")
    known = outputs.labels >= 0
    if not bool(known.any()):
        return float("nan")
    predictions = outputs.logits[known].argmax(dim=1)
    return float((predictions == outputs.labels[known]).double().mean())
