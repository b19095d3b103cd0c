"""Peer parity: oodguard's detectors against pytorch-ood 0.4's on identical inputs.

For every detector that both libraries ship, both are fitted on the same fit rows and score the same test rows
(ID test + OOD), and the table gives each one's AUROC, their difference and the Spearman correlation of the
per-sample scores (both libraries score higher = more OOD; a pair whose peer uses the other sign says so in
``PAIRS``). Two input sets: ``digits`` (the digits benchmark's model outputs: fit split, ID test split, every OOD
set but ``ambiguous``) and ``synthetic`` (Gaussian class clusters through a ReLU, a fixed random head, shifted
clusters as OOD). Model detectors run a network on both sides: ODIN and RankFeat the digits CNN on the digits test
images (traced to TorchScript; for RankFeat also as two parts, cut after the last feature maps), MC dropout a small
MLP with dropout trained (seeded) on each input set's fit features, its ``state_dict`` loaded on the peer side, with
the RNG seeded the same way so that both draw the same dropout masks.

pytorch-ood is never a dependency of oodguard: it runs in its own virtual environment (``make peer-venv``:
``.venv-peers`` with the same local CPU torch, torchvision and pytorch-ood installed without their dependencies,
and no oodguard). This script runs twice: in the project's environment it writes the inputs (``inputs-*.npz``),
runs itself in the peers' environment with ``--peer-side`` (which imports only numpy, torch and pytorch-ood),
reads back the peer's scores and writes the table::

    make peer-venv
    .venv/bin/python benchmarks/peer_parity.py --out docs/peer_parity.md

torchvision's compiled operators do not load beside the CPU torch wheel, and pytorch-ood imports torchvision;
the peer side therefore defines ``torchvision::nms`` and ``torchvision::qnms`` (the two whose fake kernels
torchvision registers on import) with ``torch.library`` before importing it. No detector compared here calls them.

A pair is one line of ``PAIRS``; a pair whose oodguard detector is not registered is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
TOLERANCE = 1e-4
MIN_SPEARMAN = 0.99


@dataclass(frozen=True)
class Pair:
    """One detector both libraries ship: the oodguard name and parameters, the peer runner and its parameters."""

    oodguard: str
    peer: str
    params: dict[str, Any] = field(default_factory=dict)
    peer_params: dict[str, Any] = field(default_factory=dict)
    #: -1 where the peer scores higher = more in-distribution
    peer_sign: int = 1
    #: why the two may differ (shown in the table)
    note: str = ""
    #: ``correct``: pytorch-ood is fitted on the correctly classified fit rows only (to test an explanation)
    peer_fit: str = "all"
    #: an attribute of the fitted oodguard detector to report beside the peer's (e.g. a fitted temperature)
    fitted: str = ""
    #: a model detector: both run the same network (``network``) on the same test inputs
    model: bool = False
    #: ``digits``: the digits CNN on the digits test images (other inputs skip the pair); ``dropout``: a small MLP
    #: with dropout trained (seeded) on each input set's fit features, scoring the test features
    network: str = "digits"


# Parameters are set to the same values on both sides; where the libraries' defaults differ the note says so.
PAIRS: list[Pair] = [
    Pair("msp", "MaxSoftmax"),
    Pair("maxlogit", "MaxLogit"),
    Pair("energy", "EnergyBased"),
    Pair("gen", "GEN", {"gamma": 0.1, "M": 100}, {"gamma": 0.1, "M": 100},
         note="pytorch-ood averages the top-M terms where oodguard sums them: a constant factor"),
    Pair("tempscale", "TemperatureScaling", fitted="temperature_",
         note="both fit T to the fit rows' NLL; pytorch-ood stops after 50 L-BFGS iterations of lr 0.01"),
    Pair("klm", "KLMatching"),
    Pair("mahalanobis", "Mahalanobis"),
    Pair("rmds", "RMD"),
    Pair("vim", "ViM", {"dim": "half"}, {"d": "half"},
         note="principal dimension D/2 on both sides (oodguard's default for D < 768)"),
    Pair("knn", "KNN", {"k": 50}, {"k": 50}),
    Pair("react", "ReAct", {"percentile": 90}, {"percentile": 0.9}),
    Pair("ash", "ASH", {"variant": "s", "percentile": 90}, {"variant": "ash-s", "percentile": 0.9},
         note="defaults differ: pytorch-ood 0.65, oodguard 90 (the paper's); compared at 90"),
    Pair("ash", "ASH", {"variant": "p", "percentile": 90}, {"variant": "ash-p", "percentile": 0.9}),
    Pair("ash", "ASH", {"variant": "b", "percentile": 90}, {"variant": "ash-b", "percentile": 0.9}),
    Pair("scale", "SCALE", {"percentile": 85}, {"percentile": 0.85},
         note="defaults differ: pytorch-ood 0.65, oodguard 85 (the paper's); compared at 85"),
    Pair("dice", "DICE", {"percentile": 90}, {"p": 0.9}),
    Pair("she", "SHE"),
    Pair("fdbd", "fDBD"),
    Pair("nnguide", "NNGuide", {"bank_ratio": 1.0, "k": 10}, {"k": 10},
         note="oodguard's default bank is a 1% sample of the fit rows; compared with the whole fit set as bank"),
    Pair("openmax", "OpenMax", {"tailsize": 20, "alpha": 3, "distance": "euclidean"},
         {"tailsize": 20, "alpha": 3, "euclid_weight": 1.0},
         note="defaults differ (pytorch-ood tailsize 25, alpha 10; oodguard 20, 3, OpenOOD's); compared at 20, 3, "
              "euclidean. pytorch-ood fits the class means and Weibull tails on every fit row of the class, "
              "oodguard (like OSDN and OpenOOD) on the correctly classified ones only: next row"),
    Pair("openmax", "OpenMax", {"tailsize": 20, "alpha": 3, "distance": "euclidean"},
         {"tailsize": 20, "alpha": 3, "euclid_weight": 1.0}, peer_fit="correct",
         note="pytorch-ood fitted on the correctly classified fit rows only"),
    Pair("gradnorm", "GradNorm", {"temperature": 1.0}, {"temperature": 1.0},
         note="pytorch-ood's GradNorm backpropagates through a model: here the head, on the features, with the "
              "gradient of its weight only (the paper's choice); oodguard's gradnorm is the closed form of that"),
    Pair("odin", "ODIN", {"temperature": 1000.0, "epsilon": 0.0014}, {"temperature": 1000.0, "eps": 0.0014},
         model=True, note="the digits model normalises inside its forward, so neither side divides the step by a std"),
    Pair("lts", "LTS", {"percentile": 65}, {"p": 0.35},
         note="oodguard's percentile p leaves out p% of the units, pytorch-ood's p keeps that fraction: 65 = 0.35; "
              "oodguard's default (the official lts function's)"),
    Pair("lts", "LTS", {"percentile": 95}, {"p": 0.05}, note="pytorch-ood's default p = 0.05"),
    Pair("nci", "NCI", {"alpha": 1e-4}, {"alpha": 1e-4}, note="defaults differ: pytorch-ood alpha 0, oodguard 1e-4"),
    Pair("nci", "NCI", {"alpha": 0.0}, {"alpha": 0.0}),
    Pair("mcdropout", "MCD", {"samples": 30, "uncertainty": "msp"}, {"samples": 30, "mode": "mean"}, model=True,
         network="dropout",
         note="the same dropout masks on both sides: the global RNG seeded with 0, then batches of 128 rows in the "
              "same order, 30 passes each; oodguard returns log((1 - max p)/max p), pytorch-ood -max p (same ranks)"),
    Pair("mcdropout", "MCD", {"samples": 30, "uncertainty": "variance"}, {"samples": 30, "mode": "var"},
         model=True, network="dropout"),
    Pair("mcdropout", "MCD", {"samples": 30, "uncertainty": "msp", "seed": 0},
         {"samples": 30, "mode": "mean", "seed": 1}, model=True, network="dropout",
         note="control: pytorch-ood's masks drawn from seed 1, independent of oodguard's: how far two independent "
              "30-pass estimates of the same expectation lie apart"),
    Pair("rankfeat", "RankFeat", model=True,
         note="oodguard hooks the digits CNN's last feature maps (features.5, 32 x 7 x 7); pytorch-ood gets the same "
              "network cut there into a backbone and the rest"),
    # Being added to oodguard: listed as skipped until registered.
    Pair("entropy", "Entropy"),
    Pair("gmm", "GMM"),
    Pair("pnml", "PNML"),
    Pair("vra", "VRA"),
    Pair("webo", "WeightedEBO", {"weights": "ones"}, {"weights": "ones"}),
]  # fmt: skip

# pytorch-ood 0.4 detectors with no pair here (model detectors over several layers, zero-shot, methods oodguard
# lacks) are listed with the reason in docs/peer_parity.md, "Not compared".


# --------------------------------------------------------------------------------------------------- metrics
def auroc(scores: np.ndarray, is_ood: np.ndarray) -> float:
    """Area under the ROC curve for OOD = positive, ties counted half (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    is_ood = np.asarray(is_ood, dtype=bool)
    ranks = _average_ranks(scores)
    n_pos, n_neg = int(is_ood.sum()), int((~is_ood).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both ID and OOD rows")
    return float((ranks[is_ood].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties; nan where either side is constant."""
    ra, rb = _average_ranks(np.asarray(a, dtype=np.float64)), _average_ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # first index of each run of equal values, and the run lengths
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    average = starts + (lengths + 1) / 2.0  # 1-based average rank of each run
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, lengths)
    return ranks


def compare(ours: np.ndarray, theirs: np.ndarray, is_ood: np.ndarray, peer_sign: int = 1) -> dict[str, float]:
    """Both AUROCs, their absolute difference and the Spearman correlation after aligning the peer's sign."""
    theirs = peer_sign * np.asarray(theirs, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"score shapes differ: {ours.shape} vs {theirs.shape}")
    a, b = auroc(ours, is_ood), auroc(theirs, is_ood)
    return {"oodguard": a, "pytorch_ood": b, "difference": abs(a - b), "spearman": spearman(ours, theirs)}


def agrees(result: dict[str, float]) -> bool:
    """The AUROCs agree within TOLERANCE and the Spearman correlation is at least MIN_SPEARMAN."""
    return result["difference"] <= TOLERANCE and result["spearman"] >= MIN_SPEARMAN


def verdict(float32: dict[str, float], float64: dict[str, float] | None) -> str:
    """``same`` on the saved float32 inputs; ``same in float64`` where only pytorch-ood fed the same values in
    float64 agrees (oodguard computes in float64 itself); else ``differs``."""
    if agrees(float32):
        return "same"
    return "same in float64" if float64 is not None and agrees(float64) else "differs"


def tied_fraction(scores: np.ndarray) -> float:
    """The share of rows whose score equals another row's (a saturated score ties many rows)."""
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T), in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


# --------------------------------------------------------------------------------------------------- inputs
def synthetic_inputs(seed: int = 0, classes: int = 10, dim: int = 64, per_class: int = 300) -> dict[str, np.ndarray]:
    """Gaussian class clusters through a ReLU (non-negative like post-ReLU features), a fixed random head whose
    logits favour each cluster's class, and shifted clusters plus wide noise as OOD."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, dim)) + 1.0

    def draw(n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, n)
        return np.maximum(centres[labels] + shift + rng.normal(0.0, 0.7, (n, dim)), 0.0), labels

    fit, fit_labels = draw(classes * per_class)
    test, _ = draw(1000)
    near, _ = draw(500, shift=0.8)
    far = np.maximum(rng.normal(0.5, 1.5, (500, dim)), 0.0)
    weight = (centres - centres.mean(0)) + rng.normal(0.0, 0.3, (classes, dim))
    bias = rng.normal(0.0, 0.5, classes)
    return _pack(fit, fit_labels, np.concatenate([test, near, far]), 1000, weight, bias)


def _pack(fit: np.ndarray, fit_labels: np.ndarray, test: np.ndarray, n_id: int, weight: np.ndarray,
          bias: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
    fit, test = fit.astype(np.float32), test.astype(np.float32)
    weight, bias = weight.astype(np.float32), bias.astype(np.float32)
    is_ood = np.zeros(len(test), dtype=bool)
    is_ood[n_id:] = True
    return {
        "fit_features": fit,
        "fit_logits": fit @ weight.T + bias,
        "fit_labels": fit_labels.astype(np.int64),
        "test_features": test,
        "test_logits": test @ weight.T + bias,
        "is_ood": is_ood,
        "head_weight": weight,
        "head_bias": bias,
    }


MODEL_FILE = "digits-model.pt"


def digits_inputs(work: Path) -> dict[str, np.ndarray]:
    """The digits benchmark's outputs: fit split, ID test split and every OOD set but ``ambiguous``; also the
    test rows' images, and the model traced to ``work / MODEL_FILE`` (TorchScript, so that the peers' environment
    loads it without oodguard)."""
    import torch

    from oodguard.benchmark.digits import digits_benchmark
    from oodguard.benchmark.runner import extract_benchmark

    bench = digits_benchmark(progress=False, ambiguous=False)
    images = torch.cat([bench.test.data, *(split.data for split in bench.ood)])
    with torch.no_grad():
        traced = torch.jit.trace(bench.model, images[:8])
        if not torch.equal(traced(images[:256]), bench.model(images[:256])):
            raise RuntimeError("the traced digits model's logits differ from the model's")
    traced.save(str(work / MODEL_FILE))
    _save_split_digits_model(bench.model, images, work)
    _MODELS["digits"] = bench.model
    outputs = extract_benchmark(bench, progress=False)
    fit, test = outputs[bench.fit.name], outputs[bench.test.name]
    ood = [outputs[split.name] for split in bench.ood]
    assert fit.head is not None and fit.features is not None and fit.logits is not None and fit.labels is not None
    features = [test.features, *(o.features for o in ood)]
    weight, bias = (t.detach().cpu().numpy() for t in fit.head)
    packed = _pack(
        fit.features.cpu().numpy(),
        fit.labels.cpu().numpy(),
        np.concatenate([f.cpu().numpy() for f in features if f is not None]),
        len(test),
        weight,
        bias,
    )
    # the model's own logits (not recomputed from the head) on both sides
    packed["fit_logits"] = fit.logits.cpu().numpy().astype(np.float32)
    logits = [test.logits, *(o.logits for o in ood)]
    packed["test_logits"] = np.concatenate([t.cpu().numpy() for t in logits if t is not None]).astype(np.float32)
    packed["test_images"] = images.numpy()
    return packed


_MODELS: dict[str, Any] = {}  # input name -> the model whose outputs they are
_DROPOUT_MODELS: dict[str, Any] = {}  # input name -> the MC-dropout network trained on its fit features

#: the digits CNN cut after its last feature maps (``features.5``, where oodguard's RankFeat finds them)
BACKBONE_FILE, REST_FILE = "digits-backbone.pt", "digits-rest.pt"


def _save_split_digits_model(model: Any, images: Any, work: Path) -> None:
    """Trace the digits CNN as two parts (input to the last feature maps, and the rest) for pytorch-ood's RankFeat,
    which takes a backbone and a head; their composition must give the model's logits."""
    import torch

    backbone = torch.nn.Sequential(model.normalize, *model.features[:6])
    rest = torch.nn.Sequential(*model.features[6:], model.head)
    with torch.no_grad():
        maps = backbone(images[:8])
        if maps.ndim != 4:
            raise RuntimeError(f"the digits CNN's features[:6] gives {tuple(maps.shape)}, not feature maps")
        traced_backbone, traced_rest = torch.jit.trace(backbone, images[:8]), torch.jit.trace(rest, maps)
        if not torch.allclose(traced_rest(traced_backbone(images[:256])), model(images[:256]), atol=1e-5):
            raise RuntimeError("the two traced parts of the digits model do not compose to the model")
    traced_backbone.save(str(work / BACKBONE_FILE))
    traced_rest.save(str(work / REST_FILE))


# --------------------------------------------------------------------------------------------------- MC dropout
DROPOUT_SEED, DROPOUT_BATCH = 0, 128


def dropout_file(input_name: str) -> str:
    return f"dropout-mlp-{input_name}.pt"


def dropout_mlp(dim: int, classes: int) -> Any:
    """The MC-dropout network, built the same way on both sides: features -> 128 -> ReLU -> dropout 0.5 -> classes.
    Only torch: the peers' environment builds it too and loads the weights oodguard's side trained."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(dim, 128), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(128, classes)
    )


def train_dropout_mlp(inputs: dict[str, np.ndarray], path: Path, steps: int = 300) -> Any:
    """Train :func:`dropout_mlp` with dropout on (full-batch Adam, seeded) on the fit features and labels; save its
    ``state_dict`` to ``path`` and return it in eval mode."""
    import torch

    features = torch.from_numpy(inputs["fit_features"])
    labels = torch.from_numpy(inputs["fit_labels"])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(DROPOUT_SEED)
    model = dropout_mlp(features.shape[1], int(inputs["head_weight"].shape[0]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    torch.random.set_rng_state(generator_state)
    torch.save(model.state_dict(), path)
    return model.eval()


def resolve(params: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Parameters that depend on the inputs: ``"half"`` (feature dimension // 2) and ``"ones"`` (one per class)."""
    resolved = dict(params)
    for key, value in params.items():
        if value == "half":
            resolved[key] = inputs["fit_features"].shape[1] // 2
        elif value == "ones":
            resolved[key] = np.ones(inputs["head_weight"].shape[0], dtype=np.float32)
    return resolved


# --------------------------------------------------------------------------------------------------- oodguard side
def oodguard_scores(pair: Pair, inputs: dict[str, np.ndarray], model: Any = None) -> tuple[np.ndarray, float | None]:
    """oodguard's scores of the test rows after fitting on the fit rows, and the ``fitted`` attribute if any."""
    from oodguard.detectors import create
    from oodguard.outputs import ModelOutputs

    if pair.model:
        x = inputs["test_images"] if pair.network == "digits" else inputs["test_features"]
        detector = create(pair.oodguard, **resolve(pair.params, inputs)).attach(model, batch_size=DROPOUT_BATCH).fit()
        return np.asarray(detector.score(x, progress=False), dtype=np.float64), None

    head = (inputs["head_weight"], inputs["head_bias"])
    fit = ModelOutputs(inputs["fit_logits"], inputs["fit_features"], inputs["fit_labels"], head=head)
    test = ModelOutputs(inputs["test_logits"], inputs["test_features"], head=head)
    detector = create(pair.oodguard, **resolve(pair.params, inputs)).fit(fit)
    value = float(getattr(detector, pair.fitted)) if pair.fitted else None
    return np.asarray(detector.score(test), dtype=np.float64), value


# --------------------------------------------------------------------------------------------------- peer side
def _stub_torchvision_operators() -> None:
    """Define the torchvision operators whose fake kernels torchvision registers on import (its compiled library
    does not load beside the CPU torch wheel). The schemas are torchvision's; nothing here calls them."""
    import torch

    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)  # the definitions live as long as the library object


_KEEP: list[Any] = []


def _peer_runners() -> dict[str, Callable[[Any, dict[str, Any], dict[str, Any]], Any]]:
    """pytorch-ood 0.4 fitted on the fit rows and scoring the test rows, one function per detector class."""
    import torch

    detector: Any = __import__("pytorch_ood.detector", fromlist=["detector"])

    def head(d: dict[str, Any]) -> torch.nn.Linear:
        linear = torch.nn.Linear(d["head_weight"].shape[1], d["head_weight"].shape[0], dtype=d["head_weight"].dtype)
        with torch.no_grad():
            linear.weight.copy_(d["head_weight"])
            linear.bias.copy_(d["head_bias"])
        return linear

    def maps(x: torch.Tensor) -> torch.Tensor:  # features as 1x1 feature maps, for the activation shapers
        return x[:, :, None, None]

    def map_head(d: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        linear = head(d)
        return lambda x: linear(x.flatten(1))

    def logits_only(cls: str) -> Callable[[Any, dict[str, Any], dict[str, Any]], Any]:
        def run(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
            return getattr(detector, cls)(None, **p).predict_logits(d["test_logits"])

        return run

    def temperature(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        det = detector.TemperatureScaling(None).fit_logits(d["fit_logits"], d["fit_labels"])
        return det.predict_logits(d["test_logits"]), float(det.t.detach())

    def fitted_logits(cls: str) -> Callable[[Any, dict[str, Any], dict[str, Any]], Any]:
        def run(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
            det = getattr(detector, cls)(None, **p)
            return det.fit_logits(d["fit_logits"], d["fit_labels"]).predict_logits(d["test_logits"])

        return run

    def fitted_features(cls: str, with_head: str = "") -> Callable[[Any, dict[str, Any], dict[str, Any]], Any]:
        def run(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
            if with_head == "wb":
                det = getattr(detector, cls)(None, w=d["head_weight"], b=d["head_bias"], **p)
            elif with_head == "head":
                det = getattr(detector, cls)(None, head(d), **p)
            else:
                det = getattr(detector, cls)(None, **p)
            return det.fit_features(d["fit_features"], d["fit_labels"]).predict_features(d["test_features"])

        return run

    def feature_maps(cls: str, fit: bool) -> Callable[[Any, dict[str, Any], dict[str, Any]], Any]:
        def run(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
            det = getattr(detector, cls)(backbone=None, head=map_head(d), **p)
            if fit:
                det.fit_feature_maps(maps(d["fit_features"]), d["fit_labels"])
            return det.predict_feature_maps(maps(d["test_features"]))

        return run

    def dice(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        det = detector.DICE(None, w=d["head_weight"], b=d["head_bias"], **p)
        return det.fit_features(d["fit_features"], d["fit_labels"]).predict_features(d["test_features"])

    def fdbd(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        return detector.fDBD(None, head(d)).fit_features(d["fit_features"]).predict_features(d["test_features"])

    def odin(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        model = torch.jit.load(d["model_path"]).eval()
        det = detector.ODIN(model, **p)
        with torch.enable_grad():
            return torch.cat([det.predict(batch) for batch in d["test_images"].split(256)])

    def gradnorm(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        # the head is the model and the features its input; only the head's weight, as in the paper
        det = detector.GradNorm(head(d), param_filter=lambda name: name == "weight", **p)
        return det.predict(d["test_features"])

    def webo(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        return detector.WeightedEBO(None, weights=torch.as_tensor(p["weights"])).predict_logits(d["test_logits"])

    def lts(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        return detector.LTS(None, head(d), **p).predict_features(d["test_features"])

    def mcd(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        # the network oodguard's side trained, its weights loaded; the global RNG seeded as oodguard seeds it, and
        # the same batches in the same order, so that every pass draws the same dropout masks
        model = dropout_mlp(d["test_features"].shape[1], d["head_weight"].shape[0])
        model.load_state_dict(torch.load(d["dropout_path"], weights_only=True))
        seed = p.pop("seed", DROPOUT_SEED)
        det = detector.MCD(model.eval(), **p)
        torch.manual_seed(seed)
        return torch.cat([det.predict(batch) for batch in d["test_features"].split(DROPOUT_BATCH)])

    def rankfeat(_: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        backbone, rest = (torch.jit.load(d[key]).eval() for key in ("backbone_path", "rest_path"))
        det = detector.RankFeat(backbone, rest, **p)
        return torch.cat([det.predict(batch) for batch in d["test_images"].split(256)])

    return {
        "MaxSoftmax": logits_only("MaxSoftmax"),
        "MaxLogit": logits_only("MaxLogit"),
        "EnergyBased": logits_only("EnergyBased"),
        "GEN": logits_only("GEN"),
        "Entropy": logits_only("Entropy"),
        "TemperatureScaling": temperature,
        "KLMatching": fitted_logits("KLMatching"),
        "OpenMax": fitted_logits("OpenMax"),
        "Mahalanobis": fitted_features("Mahalanobis"),
        "RMD": fitted_features("RMD"),
        "KNN": fitted_features("KNN"),
        "GMM": fitted_features("GMM"),
        "ViM": fitted_features("ViM", "wb"),
        "SHE": fitted_features("SHE", "head"),
        "NNGuide": fitted_features("NNGuide", "head"),
        "PNML": fitted_features("PNML", "head"),
        "DICE": dice,
        "fDBD": fdbd,
        "ReAct": feature_maps("ReAct", fit=True),
        "VRA": feature_maps("VRA", fit=True),
        "ASH": feature_maps("ASH", fit=False),
        "SCALE": feature_maps("SCALE", fit=False),
        "WeightedEBO": webo,
        "ODIN": odin,
        "GradNorm": gradnorm,
        "LTS": lts,
        "NCI": fitted_features("NCI", "head"),
        "MCD": mcd,
        "RankFeat": rankfeat,
    }


def peer_side(work: Path) -> None:
    """Run every pair's pytorch-ood detector on the saved inputs; write ``peer-<input>.npz`` and errors."""
    import torch

    _stub_torchvision_operators()
    runners = _peer_runners()
    jobs = json.loads((work / "jobs.json").read_text())
    for input_name in jobs["inputs"]:
        with np.load(work / f"inputs-{input_name}.npz") as archive:
            arrays = {key: archive[key] for key in archive.files}
        scores: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        fitted: dict[str, float] = {}
        for precision in ("float32", "float64"):  # the saved inputs, and the same values in float64
            tensors = {
                key: torch.from_numpy(value.astype(precision) if value.dtype == np.float32 else value)
                for key, value in arrays.items()
            }
            for key, job in jobs["pairs"].items():
                if job["model"] and (
                    precision != "float32" or (job["network"] == "digits" and "test_images" not in arrays)
                ):
                    continue  # a model detector runs the model in its own precision, once
                params = resolve(job["peer_params"], arrays)
                paths = {"model_path": MODEL_FILE, "backbone_path": BACKBONE_FILE, "rest_path": REST_FILE,
                         "dropout_path": dropout_file(input_name)}  # fmt: skip
                data = dict(tensors, **{key: str(work / name) for key, name in paths.items()})
                if job["peer_fit"] == "correct":
                    correct = data["fit_logits"].argmax(dim=1) == data["fit_labels"]
                    data |= {name: data[name][correct] for name in ("fit_logits", "fit_features", "fit_labels")}
                try:
                    with torch.no_grad() if job["peer"] != "TemperatureScaling" else torch.enable_grad():
                        out = runners[job["peer"]](None, data, params)
                    if isinstance(out, tuple):
                        out, fitted[f"{precision}/{key}"] = out
                    out = out.detach().double().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
                    scores[f"{precision}/{key}"] = out
                except Exception as error:  # noqa: BLE001  every failure is reported in the table
                    errors[f"{precision}/{key}"] = f"{type(error).__name__}: {error}"
        np.savez(work / f"peer-{input_name}.npz", **scores)
        (work / f"peer-errors-{input_name}.json").write_text(json.dumps(errors, indent=1))
        (work / f"peer-fitted-{input_name}.json").write_text(json.dumps(fitted, indent=1))


# --------------------------------------------------------------------------------------------------- main side
def pair_key(pair: Pair) -> str:
    """The pair's name in the table: the oodguard detector with its parameters (and how the peer was fitted)."""
    suffix = ",".join(f"{k}={v}" for k, v in pair.params.items())
    key = f"{pair.oodguard}({suffix})" if suffix else pair.oodguard
    return key if pair.peer_fit == "all" else f"{key}, peer fit on {pair.peer_fit} rows"


def run_peer(work: Path, python: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    subprocess.run([str(python), str(Path(__file__).resolve()), "--peer-side", str(work)], check=True, env=env)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| input | oodguard | pytorch-ood | AUROC oodguard | AUROC pytorch-ood | abs. difference | Spearman "
        "| tied rows (oodguard / pytorch-ood) | float64: abs. difference | float64: Spearman | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['input']} | {row['key']} | {row['peer']} | | | | | | | | {row['error']} |")
            continue
        ours_ties, their_ties = row["ties"]
        wide = "n/a (runs the model) | n/a" if row.get("model") else "n/a (float32 inside) | n/a"
        if "difference64" in row:
            wide = f"{row['difference64']:.1e} | {row['spearman64']:.6f}"
        lines.append(
            f"| {row['input']} | {row['key']} | {row['peer']} | {row['oodguard']:.6f} | {row['pytorch_ood']:.6f} "
            f"| {row['difference']:.1e} | {row['spearman']:.6f} | {ours_ties:.1%} / {their_ties:.1%} | {wide} "
            f"| {row['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown table here (default: print it)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "peer-parity", help="inputs and peer scores")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="the peers' environment's python")
    parser.add_argument("--inputs", nargs="+", default=["digits", "synthetic"], choices=["digits", "synthetic"])
    parser.add_argument("--peer-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_side is not None:
        peer_side(args.peer_side)
        return 0

    from oodguard.detectors import available

    if not args.peer_python.exists():
        parser.error(f"{args.peer_python} does not exist: run `make peer-venv` first")
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    registered = set(available())
    pairs = [pair for pair in PAIRS if pair.oodguard in registered]
    skipped = [pair for pair in PAIRS if pair.oodguard not in registered]
    inputs: dict[str, dict[str, np.ndarray]] = {}
    for name in args.inputs:
        inputs[name] = digits_inputs(work) if name == "digits" else synthetic_inputs()
        np.savez(work / f"inputs-{name}.npz", **inputs[name])
        if any(pair.network == "dropout" for pair in pairs):
            _DROPOUT_MODELS[name] = train_dropout_mlp(inputs[name], work / dropout_file(name))
    jobs = {
        "inputs": args.inputs,
        "pairs": {
            pair_key(p): {
                "peer": p.peer,
                "peer_params": p.peer_params,
                "peer_fit": p.peer_fit,
                "model": p.model,
                "network": p.network,
            }
            for p in pairs
        },
    }
    (work / "jobs.json").write_text(json.dumps(jobs, indent=1))
    start = time.perf_counter()
    run_peer(work, args.peer_python)
    peer_seconds = time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    fitted_notes: list[str] = []
    for name, data in inputs.items():
        with np.load(work / f"peer-{name}.npz") as archive:
            theirs = {key: archive[key] for key in archive.files}
        errors = json.loads((work / f"peer-errors-{name}.json").read_text())
        peer_fitted = json.loads((work / f"peer-fitted-{name}.json").read_text())
        for pair in pairs:
            key = pair_key(pair)
            row: dict[str, Any] = {"input": name, "key": key, "peer": _peer_label(pair)}
            if pair.model and pair.network == "digits" and name not in _MODELS:
                continue  # no model behind these inputs
            row["model"] = pair.model
            if f"float32/{key}" in errors:
                row["error"] = f"pytorch-ood failed: {errors[f'float32/{key}']}"
                rows.append(row)
                continue
            try:
                network = _MODELS.get(name) if pair.network == "digits" else _DROPOUT_MODELS.get(name)
                ours, value = oodguard_scores(pair, data, network)
            except Exception as error:  # noqa: BLE001  reported in the table
                row["error"] = f"oodguard failed: {type(error).__name__}: {error}"
                rows.append(row)
                continue
            row |= compare(ours, theirs[f"float32/{key}"], data["is_ood"], pair.peer_sign)
            row["ties"] = (tied_fraction(ours), tied_fraction(theirs[f"float32/{key}"]))
            wide = None
            if f"float64/{key}" in theirs:
                wide = compare(ours, theirs[f"float64/{key}"], data["is_ood"], pair.peer_sign)
                row["difference64"], row["spearman64"] = wide["difference"], wide["spearman"]
            row["verdict"] = verdict(row, wide)
            if value is not None:
                theirs_value = peer_fitted[f"float32/{key}"]
                line = f"- {name}, {key}: fitted {pair.fitted.rstrip('_')} oodguard {value:.4f}, "
                line += f"pytorch-ood {theirs_value:.4f}"
                if pair.fitted == "temperature_":
                    nll = [temperature_nll(data["fit_logits"], data["fit_labels"], t) for t in (value, theirs_value)]
                    line += f"; fit rows' NLL at these: {nll[0]:.6f}, {nll[1]:.6f}"
                fitted_notes.append(line)
            rows.append(row)

    report = [table(rows), ""]
    notes = [f"- {pair_key(p)}: {p.note}" for p in pairs if p.note]
    if notes:
        report += ["Parameter notes:", "", *notes, ""]
    if fitted_notes:
        report += ["Fitted values:", "", *fitted_notes, ""]
    if skipped:
        report.append("Not registered in oodguard yet (skipped): " + ", ".join(sorted({p.oodguard for p in skipped})))
        report.append("")
    report.append(f"pytorch-ood side: {peer_seconds:.0f} s.")
    text = "\n".join(report)
    if args.out is None:
        print(text)
    else:
        _write_section(args.out, text)
        print(text)
    return 0


def _peer_label(pair: Pair) -> str:
    params = ", ".join(f"{k}={v}" for k, v in pair.peer_params.items())
    sign = " (sign flipped)" if pair.peer_sign < 0 else ""
    return f"{pair.peer}({params}){sign}"


BEGIN, END = "<!-- peer-parity:begin -->", "<!-- peer-parity:end -->"


def _write_section(path: Path, text: str) -> None:
    """Replace the generated section of ``path`` (between the markers), or append one."""
    content = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = head + block + rest.split(END, 1)[1]
    else:
        content = content + ("\n" if content else "") + block + "\n"
    path.write_text(content)


if __name__ == "__main__":
    sys.exit(main())
