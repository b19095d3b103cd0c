"""Training-time OOD methods on an embedded benchmark: fine-tune its model with each method, evaluate beside it.

For each method (``oodguard.train``) the benchmark's trained model is fine-tuned on the fit split with auxiliary
outliers from a pool disjoint from every test OOD set (for ``digits``: ``digits_outliers``), then evaluated with
the ordinary runner, with the method's own score and with MSP and energy, next to the unchanged model
("baseline"). Every row carries bootstrap intervals; group-mean AUROC intervals come from one paired bootstrap
(the same resampled ID and OOD rows for every model), and each method gets a verdict against the baseline's
better score: *helped* / *hurt* when the 95 % interval of the paired difference (method minus reference, the
same resampled rows for both) excludes 0 from below / above, *no significant difference* when it contains 0.

Fine-tuned weights are cached as safetensors, keyed by the method, its parameters, the recipe, the seed, the
baseline model's fingerprint and the exact fit and outlier data, so a rerun only evaluates.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodguard import detectors as detector_registry
from oodguard import metrics, persist
from oodguard.benchmark.results import Results
from oodguard.benchmark.runner import extract_benchmark, run_on_outputs
from oodguard.benchmark.spec import Benchmark
from oodguard.extraction.extract import model_fingerprint
from oodguard.train import (
    METHODS,
    Method,
    Recipe,
    absent_class_score,
    auto_margins,
    create_method,
    load_checkpoint,
    save_checkpoint,
    train,
)
from oodguard.train.methods import recipe_dict

#: Bump when the fine-tuning procedure changes, so that cached fine-tuned weights are not reused.
TRAINING_VERSION = "train-bench-1"
BASELINE = "baseline"
ABSENT_CLASS = "absent-class"
VERDICT_GROUPS = ("near", "far")
FINE_TUNE_EPOCHS = 10
#: LogitNorm and AbeT replace the loss or the head and train from scratch officially; 10 epochs left AbeT's new
#: head unconverged on digits (ID accuracy 94.5 %, training loss 0.43), 30 epochs converge (< 20 CPU seconds).
RETRAIN_EPOCHS = 30


@dataclass(frozen=True)
class MethodRun:
    """One row group of the demonstration: a label, a method factory (given the context) and a recipe."""

    label: str
    build: Callable[[dict[str, Any]], Method]
    recipe: Recipe
    note: str = ""


def _energy(context: dict[str, Any]) -> Method:
    # the run.sh margins are for a CIFAR WRN; the authors' advice for another model: mean ID / outlier energies
    m_in, m_out = context["margins"]()
    return create_method("energy", m_in=m_in, m_out=m_out)


def demonstration_runs(epochs: int = FINE_TUNE_EPOCHS, retrain_epochs: int = RETRAIN_EPOCHS) -> dict[str, MethodRun]:
    """The fine-tuning runs of the demonstration: each method's official recipe, shortened.

    OE, energy and MixOE use their official fine-tuning recipes (lr 1e-3, SGD Nesterov, cosine; their batch
    sizes and weight decays). DOS's official recipe trains from scratch (lr 0.1, 100 epochs); here it fine-tunes
    with OE's learning rate (1e-3, cosine), keeping its batch 64, 384 candidates, k = 64 and n_init = 5.
    LogitNorm and AbeT change the loss or the head, which a learning rate of 1e-3 barely moves, so they keep
    their official learning rate (0.1) and schedule, shortened to ``retrain_epochs``. The regularisers
    (label smoothing, mixup, CutMix; official recipes train from scratch for 200-300 epochs at lr 0.1-0.25)
    fine-tune with OE's recipe, as OE does. Every run starts from the benchmark's trained model and uses no data
    augmentation.
    """
    fine_tune = Recipe(epochs=epochs)
    official = {name: METHODS[name].official_recipe() for name in METHODS}
    return {
        "oe": MethodRun("oe", lambda c: create_method("oe"), fine_tune, "weight 0.5"),
        "energy": MethodRun("energy", _energy, fine_tune, "margins = mean baseline energies of fit / outliers"),
        "mixoe-mixup": MethodRun("mixoe-mixup", lambda c: create_method("mixoe", mix_op="mixup"),
                                 dataclasses.replace(official["mixoe"], epochs=epochs), "alpha 1, oe_weight 5"),
        "mixoe-cutmix": MethodRun("mixoe-cutmix", lambda c: create_method("mixoe", mix_op="cutmix"),
                                  dataclasses.replace(official["mixoe"], epochs=epochs), "alpha 2, oe_weight 5"),
        "dos": MethodRun("dos", lambda c: create_method("dos"),
                         dataclasses.replace(official["dos"], epochs=epochs, lr=1e-3, schedule="cosine"),
                         "k 64, n_init 5, keep 64 of 384"),
        "logitnorm": MethodRun("logitnorm", lambda c: create_method("logitnorm"),
                               dataclasses.replace(official["logitnorm"], epochs=retrain_epochs), "tau 0.04"),
        "abet": MethodRun("abet", lambda c: create_method("abet"),
                          dataclasses.replace(official["abet"], epochs=retrain_epochs),
                          "learned-temperature head"),
        "label_smoothing": MethodRun("label_smoothing", lambda c: create_method("label_smoothing"), fine_tune,
                                     "eps 0.1"),
        "mixup": MethodRun("mixup", lambda c: create_method("mixup"), fine_tune, "alpha 1, pairs within the batch"),
        "cutmix": MethodRun("cutmix", lambda c: create_method("cutmix"), fine_tune,
                            "alpha 1, every batch, boxes from the batch"),
        "rotation": MethodRun("rotation", lambda c: create_method("rotation"), fine_tune,
                              "rotation head, weight 1 (released run)"),
    }  # fmt: skip


def _digest(*parts: Any) -> str:
    """A cache key over settings (JSON values) and arrays (tensors or numpy arrays: dtype, shape and bytes).

    Every part is framed by its kind and length, so neither adjacent parts nor arrays of other shapes that hold
    the same bytes collide. Anything else is refused: ``str`` of an object (numpy abbreviates long arrays with
    ``...``) does not identify its content.
    """
    digest = hashlib.sha256()
    for index, part in enumerate(parts):
        if isinstance(part, (torch.Tensor, np.ndarray)):
            array = torch.as_tensor(part).detach().cpu().contiguous()
            head = f"array {array.dtype} {tuple(array.shape)}".encode()
            body = array.flatten().view(torch.uint8).numpy().tobytes() if array.numel() else b""
        else:
            try:
                head, body = b"json", json.dumps(part, sort_keys=True, allow_nan=False).encode()
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"cache key part {index} ({type(part).__name__}) is neither an array nor a JSON value ({error}); "
                    "pass tensors, numpy arrays, numbers, strings, lists or dicts"
                ) from error
        for piece in (head, body):
            digest.update(len(piece).to_bytes(8, "little"))
            digest.update(piece)
    return digest.hexdigest()[:16]


def _fit_arrays(fit: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit split as ``(inputs [N, ...], integer labels [N])``: the fine-tuning loaders and the cache key need
    the data itself, not a Dataset or DataLoader (whose content cannot be hashed or reshuffled here)."""
    fix = ("run_training_benchmark needs the benchmark's fit split as an input tensor (or numpy array) [N, ...] "
           "with labels [N]: DataSplit(name, inputs, labels)")  # fmt: skip
    if not isinstance(fit.data, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{fix}; its data is a {type(fit.data).__name__}")
    if fit.labels is None:
        raise ValueError(f"{fix}; its labels are missing")
    data, labels = torch.as_tensor(fit.data), torch.as_tensor(fit.labels)
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"{fix}; its data has shape {tuple(data.shape)}, not a non-empty batch")
    if labels.shape != (data.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{fix}; its labels are {labels.dtype} {tuple(labels.shape)}, not {data.shape[0]} integers")
    return data, labels


def _loaders(benchmark: Benchmark, outliers: torch.Tensor, recipe: Recipe, seed: int) -> tuple[DataLoader, DataLoader]:
    id_set = TensorDataset(*_fit_arrays(benchmark.fit))
    id_loader = DataLoader(id_set, batch_size=recipe.id_batch, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
    outlier_loader = DataLoader(TensorDataset(outliers), batch_size=max(1, recipe.outlier_batch), shuffle=True,
                                generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
    return id_loader, outlier_loader


def fine_tune(
    benchmark: Benchmark,
    outliers: torch.Tensor,
    run: MethodRun,
    context: dict[str, Any],
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, Method, dict[str, Any]]:
    """Fine-tune a copy of the benchmark's model with one run (or load it from the cache).

    Returns the model (eval mode), the method, and facts about the run (seconds, epoch losses, cache hit).
    """
    method = run.build(context)
    recipe = run.recipe
    key = _digest(TRAINING_VERSION, run.label, method.config(), recipe_dict(recipe), seed, context["baseline_key"],
                  context["data_key"])  # fmt: skip
    path = None if cache_dir is None else Path(cache_dir) / f"{TRAINING_VERSION}-{run.label}-{key}.safetensors"
    if path is not None and path.is_file():
        torch.manual_seed(seed)
        model = method.prepare(copy.deepcopy(benchmark.model))
        try:
            meta, _ = load_checkpoint(path, model)
            return model.eval(), method, {**meta, "cached": True}
        except (ValueError, RuntimeError, OSError):
            pass  # unreadable or stale file: train again and overwrite it
    id_loader, outlier_loader = _loaders(benchmark, outliers, recipe, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is fastest, and weights do not depend on the core count
    try:
        started = time.process_time()
        result = train(copy.deepcopy(benchmark.model), id_loader, method, outlier_loader if method.needs_outliers
                       else None, recipe=recipe, seed=seed, progress=progress)  # fmt: skip
        cpu_seconds = time.process_time() - started
    finally:
        torch.set_num_threads(threads)
    meta = {"label": run.label, "method": method.config(), "recipe": recipe_dict(recipe), "seed": seed,
            "seconds": result.seconds, "cpu_seconds": cpu_seconds, "steps": result.steps,
            "epoch_losses": result.epoch_losses}  # fmt: skip
    if path is not None:
        save_checkpoint(path, result.model, meta=meta)
    return result.model, method, {**meta, "cached": False}


def group_auroc_bootstrap(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    groups: Mapping[str, list[str]],
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Paired bootstrap of group-mean AUROC: ``{row: array [n_boot + 1, n_groups]}`` (row 0 = full sample).

    Every replicate resamples the ID rows and each OOD set's rows once, with replacement, and applies the same
    indices to every row of ``scores`` (all rows score the same inputs), so differences between rows are paired:
    :func:`oodguard.metrics.paired_bootstrap` of each row's AUROC per OOD set, averaged over each group's sets.
    """
    rows = list(scores)
    sets = [name for members in groups.values() for name in members]  # the draws follow this order
    id_scores = [scores[row]["id"] for row in rows]
    ood_scores = [[scores[row][name] for row in rows] for name in sets]
    auroc = metrics.paired_bootstrap(id_scores, ood_scores, n_boot=n_boot, seed=seed)  # [n_boot + 1, rows, sets]
    column = {name: k for k, name in enumerate(sets)}
    out = {}
    for i, row in enumerate(rows):
        # row-major, so that every mean sums its sets in numpy's pairwise order (as np.mean of one list of values)
        means = [np.ascontiguousarray(auroc[:, i, [column[name] for name in members]]).mean(axis=1)
                 for members in groups.values()]  # fmt: skip
        out[row] = np.stack(means, axis=1)
    return out


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    """Full-sample estimate (row 0) and the 95 % percentile interval of the replicates."""
    return (float(values[0]), *metrics.percentile_interval(values[1:], 0.95))


def verdict(difference: tuple[float, float, float]) -> str:
    """``helped`` / ``hurt`` when the 95 % paired-bootstrap interval ``(estimate, low, high)`` of the method's
    AUROC minus the reference's lies wholly above / below 0, else ``no significant difference``.

    The paired interval is the right test: both rows score the same resampled test inputs, so the variation they
    share (which ID rows were drawn) cancels in the difference. Asking whether the two marginal intervals overlap
    ignores that pairing and misses real differences smaller than the shared variation.
    """
    _, low, high = difference
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "no significant difference"


@dataclass
class TrainingResults:
    """The combined evaluation (``results``: rows named ``LABEL: DETECTOR``), the per-method summary with
    intervals and verdicts, and facts about each fine-tuning run."""

    results: Results
    summary: pd.DataFrame
    runs: dict[str, dict[str, Any]]
    reference: str

    def to_markdown(self) -> str:
        """The summary as Markdown: every row with group AUROC intervals, then the paired differences."""
        groups = list(self.results.groups)
        lines = [
            f"Benchmark `{self.results.benchmark}`. AUROC in % with paired-bootstrap 95 % intervals "
            f"({self.results.settings['n_boot']} replicates) of the group mean; FPR@95 in % (ID-TPR convention); "
            "ID ECE in %: expected calibration error of the maximum softmax probability on the ID test set (15 "
            "equal-width bins); "
            "train s = CPU seconds of the fine-tuning. Verdict: the method's own score against the baseline's better "
            f"score (`{self.reference}`), helped / hurt when the paired-bootstrap 95 % interval of the AUROC "
            "difference (below) lies above / below 0, per group (near / far).",
            "",
            "| method | score | ID acc. | ID ECE | " + " | ".join(f"{g} AUROC" for g in groups)
            + " | near FPR@95 | far FPR@95 | train s | verdict (near / far) |",
            "|---|---|---:|---:|" + "---:|" * len(groups) + "---:|---:|---:|---|",
        ]  # fmt: skip
        for row in self.summary.to_dict(orient="records"):
            cells = [f"{100 * row[f'{g} AUROC']:.2f} [{100 * row[f'{g} low']:.2f}, {100 * row[f'{g} high']:.2f}]"
                     for g in groups]  # fmt: skip
            fpr = [f"{100 * row[f'{g} FPR@95']:.2f}" if f"{g} FPR@95" in row else "" for g in VERDICT_GROUPS]
            seconds = "" if pd.isna(row["train cpu s"]) else f"{row['train cpu s']:.1f}"
            lines.append(f"| {row['method']} | {row['score']} | {100 * row['id accuracy']:.2f} | "
                         f"{100 * row['id ece']:.2f} | " + " | ".join(cells)
                         + f" | {' | '.join(fpr)} | {seconds} | {row['verdict']} |")  # fmt: skip
        own = self.summary[self.summary["own score"] & (self.summary["method"] != BASELINE)]
        shown = [g for g in VERDICT_GROUPS if g in groups]
        if len(own) and shown:
            lines += [
                "",
                f"Paired difference of the method's own score minus `{self.reference}` (AUROC points, 95 % paired "
                "bootstrap interval; the same resampled test rows for both, so the shared ID test set cancels):",
                "",
                "| method | score | " + " | ".join(f"{g} ΔAUROC" for g in shown) + " |",
                "|---|---|" + "---:|" * len(shown),
            ]
            for row in own.to_dict(orient="records"):
                cells = [f"{100 * row[f'{g} delta']:+.2f} [{100 * row[f'{g} delta low']:+.2f}, "
                         f"{100 * row[f'{g} delta high']:+.2f}]" for g in shown]  # fmt: skip
                lines.append(f"| {row['method']} | {row['score']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write the runner's files (CSV, JSON, HTML report) plus ``leaderboard.md`` (this summary followed by
        the per-row group means) and ``training.json`` (summary and runs)."""
        paths = self.results.save(directory)
        markdown = self.to_markdown() + "\n## All rows\n\n" + self.results.to_markdown()
        persist.write_bytes_atomic(paths["markdown"], markdown.encode())
        paths["training"] = Path(directory) / "training.json"
        payload = {"reference": self.reference, "summary": self.summary.to_dict(orient="records"), "runs": self.runs}
        persist.write_bytes_atomic(paths["training"], json.dumps(payload, indent=2, default=str).encode())
        return paths


def run_training_benchmark(
    benchmark: Benchmark,
    outliers: torch.Tensor,
    methods: Iterable[str] | None = None,
    *,
    runs: Mapping[str, MethodRun] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    outputs_cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainingResults:
    """Fine-tune ``benchmark.model`` with each method and evaluate every model with its own score, MSP and energy.

    Parameters
    ----------
    benchmark : its ``fit`` split (an input tensor and labels) is the ID training data; its model the starting point.
    outliers : auxiliary outliers ``[N, ...]`` (same input shape as the benchmark's), disjoint from its OOD sets.
    methods : labels of ``runs`` (default: all of them).
    runs : the fine-tuning runs (default ``demonstration_runs()``).
    n_boot, seed : bootstrap replicates; seed of the training and of the bootstrap.
    cache_dir : where fine-tuned weights are cached (none when omitted).
    outputs_cache_dir : where extracted outputs are cached (none when omitted).
    """
    runs = dict(runs or demonstration_runs())
    labels = list(methods) if methods is not None else list(runs)
    unknown = [label for label in labels if label not in runs]
    if unknown:
        raise ValueError(f"unknown training method(s) {unknown}; available: {', '.join(runs)}")
    fit = benchmark.fit
    fit_data, fit_labels = _fit_arrays(fit)
    if not isinstance(outliers, (torch.Tensor, np.ndarray)):
        raise ValueError(f"outliers must be a tensor (or numpy array) of inputs [N, ...], got "
                         f"{type(outliers).__name__}")  # fmt: skip
    outliers = torch.as_tensor(outliers)
    if outliers.ndim < 2 or outliers.shape[0] == 0 or tuple(outliers.shape[1:]) != tuple(fit_data.shape[1:]):
        raise ValueError(f"outliers must be a non-empty batch of inputs shaped like the fit split's "
                         f"{tuple(fit_data.shape[1:])}, got {tuple(outliers.shape)}")  # fmt: skip
    context: dict[str, Any] = {
        "baseline_key": model_fingerprint(benchmark.model),
        "data_key": _digest(fit_data, fit_labels, outliers),
    }
    margins: list[tuple[float, float]] = []

    def compute_margins() -> tuple[float, float]:
        if not margins:
            margins.append(auto_margins(benchmark.model, DataLoader(TensorDataset(fit_data), batch_size=512),
                                        DataLoader(TensorDataset(outliers), batch_size=512)))  # fmt: skip
        return margins[0]

    context["margins"] = compute_margins
    plain = dataclasses.replace(benchmark, layers=[])
    evaluations: dict[str, Results] = {}
    calibration_errors: dict[str, float] = {}
    facts: dict[str, dict[str, Any]] = {BASELINE: {"score": "msp, energy", "seconds": None}}
    own_scores: dict[str, str | None] = {BASELINE: None}

    def evaluate(label: str, model: torch.nn.Module, own: str | None) -> None:
        outputs = extract_benchmark(dataclasses.replace(plain, model=model), cache_dir=outputs_cache_dir,
                                    progress=progress)  # fmt: skip
        calibration_errors[label] = id_calibration_error(outputs[benchmark.test.name])
        extra = {}
        if own == ABSENT_CLASS:  # DOS's own score is not a registered detector (it needs the (K+1)-way head)
            names = [benchmark.test.name, *(split.name for split in benchmark.ood)]

            def absent_job() -> dict[str, np.ndarray]:
                scores = {name: np.asarray(absent_class_score(_logits(outputs[name]).numpy())) for name in names}
                return {"id": scores.pop(benchmark.test.name), **scores}

            extra[ABSENT_CLASS] = absent_job
        elif own and detector_registry.info(own)["protocol"] == "model":  # e.g. rotation: runs the trained model
            extra[own] = _model_score_job(own, model, benchmark)
        detectors = [name for name in dict.fromkeys([*([own] if own else []), "msp", "energy"]) if name not in extra]
        evaluations[label] = run_on_outputs(
            label, outputs[fit.name], outputs[benchmark.test.name],
            [(split.name, split.group, outputs[split.name]) for split in benchmark.ood], detectors,
            n_boot=n_boot, seed=seed, progress=False, split_names=(fit.name, benchmark.test.name), extra_jobs=extra,
        )  # fmt: skip

    evaluate(BASELINE, benchmark.model, None)
    for label in labels:
        model, method, fact = fine_tune(benchmark, outliers, runs[label], context, seed=seed, cache_dir=cache_dir,
                                        progress=progress)  # fmt: skip
        facts[label] = {**fact, "score": method.score, "paper": method.paper, "code": method.code,
                        "note": runs[label].note}  # fmt: skip
        own_scores[label] = method.score
        evaluate(label, model, method.score)
    return _combine(benchmark.name, evaluations, own_scores, facts, n_boot, seed, calibration_errors)


def id_calibration_error(outputs: Any, n_bins: int = 15) -> float:
    """ECE of the maximum softmax probability on the rows with a known class (every class of the model's output,
    e.g. DOS's extra one: a prediction of it counts as wrong, as in the ID accuracy); NaN without logits or labels."""
    if outputs.logits is None or outputs.labels is None:
        return float("nan")
    known = outputs.labels >= 0
    if not bool(known.any()):
        return float("nan")
    probabilities = torch.softmax(outputs.logits[known].to(torch.float64), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == outputs.labels[known]).numpy()
    return metrics.expected_calibration_error(confidence.numpy(), correct, n_bins=n_bins)


def _model_score_job(name: str, model: torch.nn.Module, benchmark: Benchmark) -> Any:
    """A job scoring the ID test split and every OOD set with the model detector ``name`` run on ``model``."""
    from oodguard.detectors.model.base import ModelDetector
    from oodguard.extraction.model_runner import ModelRunner

    def job() -> dict[str, np.ndarray]:
        detector = detector_registry.create(name)
        assert isinstance(detector, ModelDetector)
        detector.attach(ModelRunner(model.eval())).fit(benchmark.fit.data, labels=benchmark.fit.labels)
        scores = {split.name: np.asarray(detector.score(split.data)) for split in benchmark.ood}
        return {"id": np.asarray(detector.score(benchmark.test.data)), **scores}

    return job


def _logits(outputs: Any) -> torch.Tensor:
    if outputs.logits is None:
        raise ValueError("the model's outputs hold no logits; the absent-class score needs them")
    return outputs.logits


def _combine(
    name: str,
    evaluations: dict[str, Results],
    own_scores: dict[str, str | None],
    facts: dict[str, dict[str, Any]],
    n_boot: int,
    seed: int,
    calibration_errors: Mapping[str, float] | None = None,
) -> TrainingResults:
    tables, statuses, scores = [], [], {}
    for label, res in evaluations.items():
        table = res.table.copy()
        table["detector"] = label + ": " + table["detector"]
        tables.append(table)
        status = res.status.copy()
        status["detector"] = label + ": " + status["detector"]
        statuses.append(status)
        scores.update({f"{label}: {det}": value for det, value in res.scores.items()})
    baseline = evaluations[BASELINE]
    groups = baseline.groups
    accuracy = {label: res.id_accuracy for label, res in evaluations.items()}
    results = Results(
        benchmark=f"{name} (training-time methods)",
        table=pd.concat(tables, ignore_index=True),
        status=pd.concat(statuses, ignore_index=True),
        scores=scores,
        groups=groups,
        id_accuracy=baseline.id_accuracy,
        settings={**baseline.settings, "id_accuracy_per_model": accuracy},
    )
    # rows per model in run order, each model's own score first
    order = {label: i for i, label in enumerate(evaluations)}
    ok = sorted(scores, key=lambda row: (order[row.partition(": ")[0]],
                                         row.partition(": ")[2] != own_scores[row.partition(": ")[0]]))  # fmt: skip
    boot = group_auroc_bootstrap({row: scores[row] for row in ok}, groups, n_boot=n_boot, seed=seed)
    group_names = list(groups)
    semantic = [group_names.index(g) for g in VERDICT_GROUPS if g in group_names] or list(range(len(group_names)))
    # the baseline's better score (by the mean semantic AUROC) is the reference every method must beat
    candidates = [f"{BASELINE}: msp", f"{BASELINE}: energy"]
    reference = max((c for c in candidates if c in boot), key=lambda c: boot[c][0, semantic].mean())
    board = results.leaderboard().set_index("detector")
    rows = []
    for row in ok:
        label, _, detector = row.partition(": ")
        entry: dict[str, Any] = {"method": label, "score": detector, "row": row, "id accuracy": accuracy[label],
                                 "id ece": (calibration_errors or {}).get(label, np.nan),
                                 "own score": detector == own_scores[label] or label == BASELINE}  # fmt: skip
        for g, group in enumerate(group_names):
            estimate, low, high = _interval(boot[row][:, g])
            entry.update({f"{group} AUROC": estimate, f"{group} low": low, f"{group} high": high})
            entry[f"{group} FPR@95"] = board.loc[row, f"{group} FPR@95"]
            delta = _interval(boot[row][:, g] - boot[reference][:, g])
            entry.update({f"{group} delta": delta[0], f"{group} delta low": delta[1], f"{group} delta high": delta[2]})
        for key, fact in (("train s", "seconds"), ("train cpu s", "cpu_seconds")):
            value = facts[label].get(fact)
            entry[key] = np.nan if value is None else float(value)
        if label == BASELINE:
            entry["verdict"] = "reference" if row == reference else ""
        elif entry["own score"]:
            parts = [verdict((entry[f"{g} delta"], entry[f"{g} delta low"], entry[f"{g} delta high"]))
                     for g in VERDICT_GROUPS if g in group_names]  # fmt: skip
            entry["verdict"] = " / ".join(parts)
        else:
            entry["verdict"] = ""
        rows.append(entry)
    summary = pd.DataFrame(rows)
    return TrainingResults(results=results, summary=summary, runs=facts, reference=reference)


def digits_training_benchmark(
    name: str = "digits",
    methods: Iterable[str] | None = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    pool_size: int | None = None,
) -> TrainingResults:
    """The demonstration on an embedded digits benchmark with the ``digits_outliers`` pool (cached runs)."""
    from oodguard.benchmark import presets
    from oodguard.benchmark.digits_outliers import DEFAULT_POOL_SIZE, outlier_pool

    if name not in ("digits", "digits-open-set"):
        raise ValueError(f"train-bench runs on the digits benchmarks (digits, digits-open-set), got {name!r}")
    methods = list(methods) if methods is not None else None
    unknown = sorted(set(methods or ()) - set(demonstration_runs()))
    if unknown:  # before any data is built or model trained
        raise ValueError(f"unknown training method(s) {unknown}; available: {', '.join(demonstration_runs())}")
    benchmark = presets.load(name, cache_dir=cache_dir, progress=progress)
    outliers = outlier_pool(pool_size or DEFAULT_POOL_SIZE, seed=seed)
    root = presets.cache_root(cache_dir)
    return run_training_benchmark(
        benchmark, outliers, methods, n_boot=n_boot, seed=seed, cache_dir=root / "trained",
        outputs_cache_dir=presets.outputs_cache_dir(cache_dir), progress=progress,
    )  # fmt: skip
