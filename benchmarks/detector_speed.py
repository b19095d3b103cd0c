"""Fit and score time of every detector against the bare operations each method cannot avoid.

For each detector the same run times, on the same synthetic outputs, a *lower bound*: the matrix
products (and top-k selections) that any implementation of the method must perform, e.g.
``[N_test, D] x [D, N_fit]`` plus top-k for KNN or ``[N_test, D] x [D, D]`` for Mahalanobis. The ratio
score time / lower bound is the number that matters; targets are 2x (1.5x for KNN). Peak extra memory of
a score call is read from the kernel's resident-set high-water mark, reset before each call.

    python benchmarks/detector_speed.py --scale cifar
    python benchmarks/detector_speed.py --scale imagenet --out docs/performance.md
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors.sdm import DEFAULT_MAX_Q as SDM_MAX_Q

SCALES = {
    "cifar": {"n_fit": 50_000, "dim": 512, "classes": 10, "n_test": 20_000, "negatives": 2_000},
    "imagenet": {"n_fit": 100_000, "dim": 2048, "classes": 1000, "n_test": 10_000, "negatives": 10_000},
    "tiny": {"n_fit": 2_000, "dim": 64, "classes": 10, "n_test": 1_000, "negatives": 500},
}
#: Zero-shot detectors score the features as input embeddings against text embeddings (labels, negatives, "no").
ZERO_SHOT = ("mcm", "neglabel", "clipn", "lapt")
#: Detectors that train on intermediate layers but score the features alone: the features stand in for one layer.
LAYER_FIT = ("early_exit",)
MOS_GROUPS = 8
CHUNK = 4096  # row chunk of the lower-bound loops, so they too stay in bounded memory


@dataclass
class Data:
    fit: ModelOutputs
    test: ModelOutputs
    mos_fit: ModelOutputs
    mos_test: ModelOutputs
    weight: torch.Tensor
    text: dict[str, torch.Tensor]


def text_embeddings(classes: int, dim: int, negatives: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Unit label, negative-label and "no" embeddings for the zero-shot detectors."""

    def unit(rows: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)

    return {"labels": unit(classes), "negatives": unit(negatives), "no_labels": unit(classes)}


def make_data(n_fit: int, dim: int, classes: int, n_test: int, negatives: int = 500, seed: int = 0) -> Data:
    """Non-negative class-clustered features, a linear head, logits; MOS-layout logits too."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.rand(classes, dim, generator=generator) * 2.0
    weight = means - means.mean(0)
    # scale the head so logits spread like a trained classifier's (std ~4, so top gaps of ~10-20), not into
    # the hundreds, where exponentials underflow to slow denormals and timings stop meaning anything
    probe_labels = torch.randint(0, classes, (256,), generator=generator)
    probe = (means[probe_labels] + torch.randn(256, dim, generator=generator)).clamp_min(0) @ weight.T
    weight = weight * (4.0 / probe.std())
    bias = torch.zeros(classes)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=generator)
        features = (means[labels] + torch.randn(n, dim, generator=generator)).clamp_min_(0)
        return features, labels

    fit_features, fit_labels = draw(n_fit)
    test_features, test_labels = draw(n_test)
    head = (weight, bias)
    fit = ModelOutputs(logits=fit_features @ weight.T, features=fit_features, labels=fit_labels, head=head)
    test = ModelOutputs(logits=test_features @ weight.T, features=test_features)
    width = classes + MOS_GROUPS
    mos_weight = torch.randn(width, dim, generator=generator) / dim**0.5
    mos_fit = ModelOutputs(logits=fit_features[:1000] @ mos_weight.T)
    mos_test = ModelOutputs(logits=test_features @ mos_weight.T)
    return Data(fit, test, mos_fit, mos_test, weight, text_embeddings(classes, dim, negatives, generator))


def group_sizes(classes: int) -> list[int]:
    base, extra = divmod(classes, MOS_GROUPS)
    return [base + (1 if g < extra else 0) for g in range(MOS_GROUPS)]


def chunked(x: torch.Tensor, op: Callable[[torch.Tensor], object]) -> None:
    for start in range(0, x.shape[0], CHUNK):
        op(x[start : start + CHUNK])


def lower_bounds(data: Data, params: dict[str, dict]) -> dict[str, Callable[[], None]]:
    """The unavoidable work of each method at score time, as bare torch calls."""
    z, f = data.test.features, data.test.logits
    n_fit, dim = data.fit.features.shape
    classes = f.shape[1]
    dd = torch.randn(dim, dim)
    cc = torch.randn(classes, classes)
    w = data.weight
    bank = torch.nn.functional.normalize(data.fit.features, dim=1)
    nn_bank = bank[: max(1, int(n_fit * 0.01))]
    bank_sq = bank.square().sum(1)
    perturbed = torch.randn(100 * classes, dim)  # weiper's 100 perturbed copies of the head
    k_vim = _vim_dim(dim)
    sub = torch.randn(dim, min(k_vim, dim - k_vim))

    edges = torch.linspace(0, 1, 50)
    coverage = torch.rand(50 * dim)
    mean = data.fit.features.mean(0)
    log_weights = torch.rand(classes).log()
    neco_basis = torch.randn(dim, _neco_dim(data.fit.features))
    # gmm's stacked per-class whitening maps [D, C D]: C D^2 floats, left out where they would not fit in memory
    class_maps = torch.randn(dim, classes * dim) if classes * dim * dim * 4 <= 2**31 else None

    def op(fn: Callable[[torch.Tensor], object], x: torch.Tensor = z) -> Callable[[], None]:
        return lambda: chunked(x, fn)

    def head(x: torch.Tensor) -> torch.Tensor:
        return x @ w.T

    def knn(bank_: torch.Tensor, k: int) -> Callable[[torch.Tensor], object]:
        return lambda x: torch.topk(x @ bank_.T, k, dim=1)

    def quadratic(times: int) -> Callable[[torch.Tensor], object]:
        def run(x: torch.Tensor) -> torch.Tensor:
            for _ in range(times):
                x @ dd
            return x @ w.T

        return run

    def fisher_rao_bound(x: torch.Tensor) -> None:
        # one asinh per (sample, class, unit), in steps that keep the [rows, C, D] block near 64 MB
        step = max(1, 2**24 // (classes * dim))
        for start in range(0, x.shape[0], step):
            rows = x[start : start + step]
            (rows[:, None, :] - class_means).abs_().asinh_().square_().sum(dim=2).amin(dim=1)

    def she_bound() -> None:
        # the predicted class from the logits, then the inner product with that class's stored pattern
        for start in range(0, z.shape[0], CHUNK):
            x, predicted = z[start : start + CHUNK], f[start : start + CHUNK].argmax(dim=1)
            if classes <= 64:
                (x @ w.T).gather(1, predicted[:, None])
            else:
                (x * w.index_select(0, predicted)).sum(dim=1)

    def nac_bound(x: torch.Tensor) -> torch.Tensor:
        # every unit's state needs the gradient product and a sigmoid, a bin search and a coverage look-up
        states = torch.sigmoid(((x @ w.T) @ w).mul_(x))
        return coverage.take(torch.bucketize(states, edges)).mean(dim=1)

    def openmax_bound(x: torch.Tensor) -> torch.Tensor:
        # distances to the mean logit vectors of the alpha = 3 top classes, then a softmax over C + 1
        ranked = torch.topk(x, min(3, classes), dim=1).indices
        distances = (x[:, None, :] - cc[ranked]).norm(dim=2)
        return torch.logsumexp(x, dim=1) + distances.sum(dim=1)

    def mlp(*sizes: int) -> Callable[[torch.Tensor], torch.Tensor]:
        # a float64 MLP (the auxiliary networks score in float64) with random weights of the detector's sizes
        layers = [torch.randn(a, b, dtype=torch.float64) / a**0.5 for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

        def forward(x: torch.Tensor) -> torch.Tensor:
            x = x.to(torch.float64)
            for layer in layers[:-1]:
                x = (x @ layer).relu_()
            return x @ layers[-1]

        return forward

    autoencoder = (mlp(dim, 128, 16), mlp(16, 128, dim))  # ae_mahalanobis's encoder and decoder
    supervised = (mlp(dim, 128, 32), mlp(32, 128, dim))  # sage's
    codes = torch.randn(n_fit, 32, dtype=torch.float64)
    score_network = mlp(dim + 10, 256, 256, dim)  # msma's, once per noise level
    evidential_head = torch.randn(dim, classes, dtype=torch.float64) / dim**0.5  # evidential's linear head

    sdm_k = min(SDM_MAX_Q, n_fit)
    boxes, half_widths = torch.randn(3 * classes, dim), torch.rand(3 * classes, dim) + 0.5

    def sdm_bound(x: torch.Tensor) -> object:
        return torch.topk(x @ data.fit.features.T, sdm_k, dim=1), torch.softmax(x @ w.T, dim=1)

    def sage_bound(x: torch.Tensor) -> object:
        latent = supervised[0](x)
        return supervised[1](latent), torch.topk(torch.cdist(latent, codes, p=1), 25, dim=1, largest=False)

    def msma_bound(x: torch.Tensor) -> object:
        inputs = torch.cat([x.to(torch.float64), torch.zeros(x.shape[0], 10, dtype=torch.float64)], dim=1)
        return [score_network(inputs).norm(dim=1) for _ in range(10)]

    def similarities(text: torch.Tensor) -> Callable[[torch.Tensor], object]:
        # unit input embeddings against every text embedding, then one exponential per similarity
        return lambda x: torch.logsumexp(torch.nn.functional.normalize(x, dim=1) @ text.T, dim=1)

    labels, no_labels = data.text["labels"], data.text["no_labels"]
    with_negatives = torch.cat([labels, data.text["negatives"]])

    def topk_head(percent: float) -> Callable[[torch.Tensor], object]:
        keep = dim - round(dim * percent / 100)
        return lambda x: (torch.topk(x, keep, dim=1), x @ w.T)

    def paired(fn: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        # features and logits of the same rows, chunk by chunk
        def run() -> None:
            for start in range(0, z.shape[0], CHUNK):
                fn(z[start : start + CHUNK], f[start : start + CHUNK])

        return run

    low, high = z.quantile(0.6, dim=0), z.quantile(0.9, dim=0)
    class_means = torch.randn(classes, dim)
    signs = torch.sign(w)

    def relative_error(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # the predicted class's mean feature, then an l1 distance and the features' l1 norm
        return (x - class_means.index_select(0, logits.argmax(dim=1))).abs().sum(dim=1) / x.abs().sum(dim=1)

    def decoupled_error(x: torch.Tensor, logits: torch.Tensor) -> object:
        predicted = logits.argmax(dim=1)
        aligned = (x - class_means.index_select(0, predicted)) * signs.index_select(0, predicted)
        return aligned.clamp(min=0).sum(dim=1), x.abs().sum(dim=1), torch.logsumexp(logits, dim=1)

    def pnml_bound(x: torch.Tensor, logits: torch.Tensor) -> object:
        # the quadratic form with the D x D projector, and every logit's exponential
        return ((x @ dd) * x).sum(dim=1), torch.log_softmax(logits, dim=1)

    probability_bank = torch.softmax(data.fit.logits, dim=1)

    def relation_bound(x: torch.Tensor, logits: torch.Tensor) -> object:
        # the feature kernel and the softmax kernel against every fit sample
        return (x @ bank.T) * (torch.softmax(logits, dim=1) @ probability_bank.T)

    def lts_bound(x: torch.Tensor, logits: torch.Tensor) -> object:
        # the top-k mass of the features, and every logit's exponential
        return torch.topk(x, dim - round(dim * 0.65), dim=1).values.sum(dim=1), torch.logsumexp(logits, dim=1)

    # Per method, the work no implementation can skip: every logit's exponential for softmax-based scores,
    # the products with the head or the fit statistics, top-k selections, one pass over the features for
    # norms, and the binning of every unit for NAC.
    return {
        "maxlogit": op(lambda x: x.max(dim=1), f),
        "msp": op(lambda x: torch.logsumexp(x, dim=1), f),
        "energy": op(lambda x: torch.logsumexp(x, dim=1), f),
        "tempscale": op(lambda x: torch.logsumexp(x, dim=1), f),
        "mos": op(lambda x: torch.logsumexp(x, dim=1), data.mos_test.logits),
        "gen": op(lambda x: torch.topk(torch.softmax(x, dim=1), min(100, classes), dim=1), f),
        "klm": op(lambda x: torch.softmax(x, dim=1) @ cc, f),
        "openmax": op(openmax_bound, f),
        "mahalanobis": op(quadratic(1)),
        "rmds": op(quadratic(2)),
        "wdiscood": op(quadratic(1)),
        "knn": op(knn(bank, params.get("knn", {}).get("k", 50))),
        "nnguide": op(lambda x: (knn(nn_bank, 10)(x), x @ w.T)),
        "she": she_bound,
        "vim": op(lambda x: (x @ w.T, x @ sub)),
        "residual": op(lambda x: x @ sub),
        "react": op(lambda x: x.clamp(max=1.0) @ w.T),
        "dice": op(head),
        "gradnorm": op(lambda x: (x @ w.T, torch.linalg.vector_norm(x, ord=1, dim=1))),
        "fdbd": op(lambda x: (x @ w.T, (x - mean).norm(dim=1))),
        "nac": op(nac_bound),
        "ash": op(topk_head(90)),
        "scale": op(topk_head(85)),
        "mcm": op(similarities(labels)),
        "neglabel": op(similarities(with_negatives)),
        "lapt": op(similarities(with_negatives)),
        "clipn": op(similarities(torch.cat([labels, no_labels]))),
        "ae_mahalanobis": op(lambda x: autoencoder[1](autoencoder[0](x))),
        "sage": op(sage_bound),
        "msma": op(msma_bound),
        "evidential": op(lambda x: torch.exp(x.to(torch.float64) @ evidential_head).sum(dim=1)),
        "ocs": op(lambda x: torch.logsumexp(x, dim=1), f),
        # one ensemble member per layer (one here): a gated copy of the features through its own head, a softmax
        "early_exit": op(lambda x: torch.logsumexp(torch.relu(x) @ w.T, dim=1)),
        # the nearest max_q fit rows by L2 (as a product with the bank, sorted), and a softmax of the logits
        "sdm": op(sdm_bound),
        # the normalised distance to every box (3 per class), its largest column, the smallest over boxes
        "bam": op(lambda x: ((x[:, None, :] - boxes) / half_widths).abs().amax(dim=2).amin(dim=1)),
        # two-sided per-unit thresholds, the head, and the energy of the recomputed logits
        "vra": op(lambda x: torch.logsumexp(torch.minimum(x, high).masked_fill_(x < low, 0.0) @ w.T, dim=1)),
        "bats": op(lambda x: torch.logsumexp(torch.clamp(x, min=low, max=high) @ w.T, dim=1)),
        "lts": paired(lts_bound),
        "caref": paired(relative_error),
        "cadref": paired(decoupled_error),
        "pnml": paired(pnml_bound),
        # the softmax roots, their products with the C centroid roots and one arccos per (sample, class) pair
        "igeood": op(lambda x: torch.arccos((torch.softmax(x, dim=1).sqrt() @ cc).clamp_(0.0, 1.0)).sum(dim=1), f),
        "relation": paired(relation_bound),
        # every logit's exponential and one product with it (entropy: LSE - sum p f; DOCTOR: sum p^2)
        "entropy": op(lambda x: (torch.softmax(x, dim=1) * x).sum(dim=1), f),
        "doctor": op(lambda x: torch.softmax(x, dim=1).square().sum(dim=1), f),
        "webo": op(lambda x: torch.logsumexp(x + log_weights, dim=1), f),
        "mahalanobis_pp": op(quadratic(1)),
        "rmds_pp": op(quadratic(2)),
        # the projection on the principal subspace of the fitted dimension, and the full norm
        "neco": op(lambda x: ((x @ neco_basis).norm(dim=1), x.norm(dim=1))),
        # the predicted class from the head, then a norm of the centred feature
        "nci": op(lambda x: (head(x).argmax(dim=1), (x - mean).norm(dim=1))),
        # the nearest of the fit rows' gradients (a bank as large as the fit set): one product with it, a minimum
        "grood": op(lambda x: torch.addmm(bank_sq, x, bank.T, alpha=-2.0).amin(dim=1)),
        # the product with the 100 perturbed heads; one bin index per feature and per perturbed logit, and one
        # exponential per perturbed logit (the softmax of each copy)
        "weiper": op(lambda x: (lambda y: ((x * 0.1).floor_(), (y * 0.1).floor_(), y.exp()))(x @ perturbed.T)),
        "igeood_features": op(fisher_rao_bound),
        # one whitening product per class (stacked), the squared norms, a log-sum-exp over the classes
        **(
            {"gmm": op(lambda x: torch.logsumexp((x @ class_maps).square_().view(x.shape[0], classes, -1).sum(2), 1))}
            if class_maps is not None
            else {}
        ),
    }


def zero_shot_params(data: Data) -> dict[str, dict]:
    """Text-side parameters of the zero-shot detectors (LAPT trains 1 epoch: this script times scoring)."""
    text = data.text
    negative = {"label_embeddings": text["labels"], "negative_embeddings": text["negatives"]}
    return {
        "mcm": {"label_embeddings": text["labels"]},
        "neglabel": dict(negative),
        "lapt": {**negative, "epochs": 1},
        "clipn": {"label_embeddings": text["labels"], "no_label_embeddings": text["no_labels"]},
    }


def _neco_dim(features: torch.Tensor) -> int:
    """NECO's default subspace dimension on these features (90 % of the standardised variance)."""
    from oodguard.detectors.collapse import explained_variance_dim

    sample = features[:20_000].to(torch.float64)
    standardised = (sample - sample.mean(0)) / sample.std(0).clamp_min(1e-12)
    return explained_variance_dim(torch.linalg.eigvalsh(standardised.T @ standardised))


def _vim_dim(dim: int) -> int:
    return 1000 if dim >= 2048 else 512 if dim >= 768 else dim // 2


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory above the level before ``fn`` (Linux; nan elsewhere)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the high-water mark VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) / 1024


def run(scale: str, names: list[str], repeats: int) -> list[dict]:
    config = SCALES[scale]
    print(f"generating {scale}-like outputs: {config}", file=sys.stderr)
    data = make_data(config["n_fit"], config["dim"], config["classes"], config["n_test"], config["negatives"])
    params = {
        "mos": {"group_sizes": group_sizes(config["classes"])},
        "webo": {"weights": torch.rand(config["classes"], generator=torch.Generator().manual_seed(1))},
        **zero_shot_params(data),
    }
    bounds = lower_bounds(data, params)
    skipped = [name for name in names if name not in bounds]
    if skipped:  # e.g. detectors on intermediate layers: these synthetic outputs have none
        print(f"no synthetic data or bound for: {', '.join(skipped)}", file=sys.stderr)
    rows = []
    for name in (n for n in names if n in bounds):
        fit_data, test_data = (data.mos_fit, data.mos_test) if name == "mos" else (data.fit, data.test)
        if name in LAYER_FIT:
            fit_data = fit_data.with_fields(layers={"penultimate": fit_data.features})
        detector = detectors.create(name, **params.get(name, {}))
        fit_seconds = best_time(lambda d=detector, x=fit_data: d.fit(x), 1)
        detector.score(test_data[:256])  # warm caches (state casts) outside the timing
        memory = peak_extra_mib(lambda d=detector, x=test_data: d.score(x))
        score_seconds = best_time(lambda d=detector, x=test_data: d.score(x), repeats)
        bound_seconds = best_time(bounds[name], repeats)
        target = 1.5 if name == "knn" else 2.0
        ratio = score_seconds / bound_seconds
        rows.append(
            {
                "detector": name,
                "fit_s": fit_seconds,
                "score_s": score_seconds,
                "bound_s": bound_seconds,
                "ratio": ratio,
                "target": target,
                "peak_mib": memory,
                "ok": ratio <= target and not memory > 512,
            }
        )
        print(format_row(rows[-1]), file=sys.stderr)
    return rows


def format_row(row: dict) -> str:
    return (
        f"| {row['detector']} | {row['fit_s']:.3f} | {row['score_s']:.3f} | {row['bound_s']:.3f} | "
        f"{row['ratio']:.2f} | {row['target']:.1f} | {row['peak_mib']:.0f} | {'yes' if row['ok'] else 'NO'} |"
    )


def table(rows: list[dict], scale: str) -> str:
    config = SCALES[scale]
    header = (
        f"### {scale}-like: N_fit={config['n_fit']:,}, D={config['dim']}, C={config['classes']}, "
        f"N_test={config['n_test']:,} (torch threads: {torch.get_num_threads()})\n\n"
        "| detector | fit s | score s | lower bound s | score / bound | target | peak extra MiB | within target |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join([header, *(format_row(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cifar")
    parser.add_argument("--detectors", nargs="*", default=None, help="registry names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="score timings take the best of this many runs")
    parser.add_argument("--out", help="append the Markdown table to this file")
    # the score / bound ratio hardly depends on the row counts (both grow linearly in N_test), so a scale's D and C
    # can be measured with fewer rows where a full run would take hours (e.g. weiper's 100 x C perturbed logits)
    parser.add_argument("--n-fit", type=int, help="override the scale's N_fit")
    parser.add_argument("--n-test", type=int, help="override the scale's N_test")
    args = parser.parse_args()
    overrides = {"n_fit": args.n_fit, "n_test": args.n_test}
    SCALES[args.scale] = {**SCALES[args.scale], **{key: value for key, value in overrides.items() if value}}
    names = args.detectors or detectors.available()
    unknown = sorted(set(names) - set(detectors.available()))
    if unknown:
        parser.error(f"unknown detector(s) {unknown}; available: {', '.join(detectors.available())}")
    rows = run(args.scale, names, args.repeats)
    text = table(rows, args.scale)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            command = f"python benchmarks/{os.path.basename(__file__)} --scale {args.scale}"
            command += "".join(f" --{key.replace('_', '-')} {value}" for key, value in overrides.items() if value)
            handle.write(f"\n{text}\n\nCommand: `{command}`\n")
    failing = [row["detector"] for row in rows if not row["ok"]]
    if failing:
        print(f"outside target: {', '.join(failing)}", file=sys.stderr)


if __name__ == "__main__":
    main()
