"""Command line: ``oodguard bench``, ``oodguard eval``, ``oodguard pt-ood`` and ``oodguard detectors``.

Errors are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from oodguard import __version__, detectors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="oodguard: out-of-distribution detection for trained models. Scores: higher = more likely OOD.",
)
console = Console()
if not console.is_terminal:  # piped or logged: no terminal width to respect, keep tables whole
    console = Console(width=140)
_SHORT_GROUP = {"covariate": "covar.", "synthetic": "synth."}
errors = Console(stderr=True)

ScoresOption = Annotated[
    Path | None, typer.Option("--scores", help="also write every per-sample score to this .csv or .parquet file")
]
DetectorsOption = Annotated[
    list[str] | None,
    typer.Option("--detectors", "-d", help="detector names, repeated or comma-separated (default: all that apply)"),
]


ParamsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="detector hyperparameter as DETECTOR.NAME=VALUE (VALUE read as JSON when it parses, else as text), "
        "repeated; e.g. -p knn.k=10 -p odin.temperature=100",
    ),
]


def _detector_params(values: list[str] | None) -> dict[str, dict]:
    """``DETECTOR.NAME=VALUE`` options as per-detector parameters; JSON values (numbers, lists, true) parsed."""
    import json

    params: dict[str, dict] = {}
    for value in values or []:
        key, sep, raw = value.partition("=")
        detector, dot, name = key.strip().partition(".")
        if not sep or not dot or not detector or not name:
            raise ValueError(f"--param {value!r}: expected DETECTOR.NAME=VALUE, e.g. --param knn.k=10")
        if detector not in detectors.available():
            raise ValueError(f"--param {value!r}: unknown detector {detector!r}; run `oodguard detectors` to list them")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        params.setdefault(detector, {})[name] = parsed
    return params


def _detector_names(values: list[str] | None, extra: tuple[str, ...] = ()) -> list[str] | None:
    """Detector names from ``--detectors`` (comma-separated, repeatable); ``extra``: a benchmark's own rows."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(detectors.available()) - set(extra))
    if unknown:
        raise ValueError(f"unknown detector(s) {', '.join(unknown)}; run `oodguard detectors` to list them")
    return names


def _show_leaderboard(results) -> None:
    board = results.leaderboard()
    columns = [c for c in board.columns if c.endswith("AUROC") or c.endswith("FPR@95")]
    protocol = "full-spectrum" if results.full_spectrum else "standard"
    table = Table(
        title=f"{results.benchmark}: ID accuracy {100 * results.id_accuracy:.2f} % ({protocol} protocol)",
        caption="AUROC ↑ and FPR@95 ↓ (% of OOD accepted at 95 % ID kept), in %; unweighted means per group",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("#", justify="right")
    table.add_column("detector", no_wrap=True)
    for column in columns:
        group, metric = column.rsplit(" ", 1)
        table.add_column(f"{_SHORT_GROUP.get(group, group)}\n{metric}", justify="right", no_wrap=True)
    for rank, row in enumerate(board.to_dict(orient="records"), start=1):
        if row["status"] != "ok":
            table.add_row("-", row["detector"], f"[red]failed: {row['error'][:80]}[/red]")
            continue
        cells = ["" if row[c] != row[c] else f"{100 * row[c]:.2f}" for c in columns]
        table.add_row(str(rank), row["detector"], *cells)
    console.print(table)


def _finish(results, out: Path, *, requested: bool, scores: Path | None = None) -> None:
    """Show and save the results; list what was skipped and why; exit non-zero when a requested detector failed."""
    _show_leaderboard(results)
    paths = results.save(out)
    if scores is not None:
        _write_scores(results, scores)
        console.print(f"per-sample scores: {scores}")
    if results.skipped:
        console.print(f"not run ({len(results.skipped)}):", highlight=False)
        for name, reason in sorted(results.skipped.items()):
            console.print(f"  {name}: {reason}", highlight=False, soft_wrap=True)
    failed = results.status[results.status["status"] != "ok"]
    for row in failed.itertuples(index=False):
        errors.print(f"{row.detector} failed: {row.error}", highlight=False, soft_wrap=True)
    console.print(f"report: {paths['html']}")
    console.print(f"tables: {paths['csv']}, {paths['markdown']}, {paths['json']}")
    if len(failed) and requested:
        raise typer.Exit(1)  # the user asked for these detectors: a failure must not look like success


def _write_scores(results, path: Path) -> None:
    frame = results.scores_frame()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        try:
            frame.to_parquet(path, index=False)
        except ImportError as error:
            raise RuntimeError(
                f"--scores {path}: writing parquet needs pyarrow ({error}); pip install pyarrow"
            ) from error
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"--scores {path}: expected a .csv or .parquet file name")


@app.command()
def bench(
    name: Annotated[
        str, typer.Argument(help="embedded benchmark (e.g. digits), or a CONFIG.toml describing your model and folders")
    ],
    detector_names: DetectorsOption = None,
    param: ParamsOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default results/NAME)")] = None,
    full_spectrum: Annotated[bool, typer.Option(help="count covariate-shift sets as ID")] = False,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates for the 95 % intervals")] = 200,
    cache_dir: Annotated[Path | None, typer.Option(help="cache for trained models and outputs")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    model_detectors: Annotated[
        bool, typer.Option(help="include the model detectors, which run the model themselves (odin, cover, ...)")
    ] = True,
    scores: ScoresOption = None,
) -> None:
    """Run every detector on an embedded benchmark: leaderboard, tables and an HTML report."""
    from oodguard.benchmark import presets
    from oodguard.benchmark.runner import run

    names = _detector_names(detector_names, extra=presets.EXTRA_ROWS.get(name, ()))
    params = _detector_params(param)
    options: dict = {}
    if name.endswith(".toml") or Path(name).is_file():
        from oodguard.benchmark.custom import load_config

        benchmark, config = load_config(name)
        names = names if names is not None else _detector_names(config["detectors"])
        params = {**config["params"], **params}
        options = {key: config[key] for key in ("feature_layer", "output_key", "batch_size")}
    else:
        benchmark = presets.load(name, cache_dir=cache_dir, progress=not quiet)
    outputs_cache = presets.outputs_cache_dir(cache_dir)
    results = run(
        benchmark, names, params=params, full_spectrum=full_spectrum, n_boot=n_boot, device=device,
        cache_dir=outputs_cache, progress=not quiet, model_detectors=model_detectors, **options,
    )  # fmt: skip
    folder = out or Path("results") / benchmark.name
    _finish(results, folder, requested=names is not None, scores=scores)


@app.command("eval")
def evaluate(
    fit: Annotated[
        Path, typer.Option(help="outputs of ID data to fit detectors on (.safetensors, .npz or a shard folder)")
    ],
    id_: Annotated[Path, typer.Option("--id", help="outputs of the ID test set")],
    ood: Annotated[
        list[str],
        typer.Option(
            help="OOD set as [GROUP:]NAME=FILE, repeated; GROUP is near, far, covariate or synthetic (default far)"
        ),
    ],
    detector_names: DetectorsOption = None,
    param: ParamsOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("results/eval"),
    full_spectrum: Annotated[bool, typer.Option(help="count covariate-shift sets as ID")] = False,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates for the 95 % intervals")] = 200,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    scores: ScoresOption = None,
) -> None:
    """Evaluate detectors on outputs from any framework (arrays logits/features/labels, optional head), or on
    shard folders written by `oodguard extract` (scored shard by shard)."""
    from oodguard.benchmark.runner import run_on_outputs

    names = _detector_names(detector_names)
    params = _detector_params(param)
    sets = []
    for spec in ood:
        label, sep, file = spec.partition("=")
        if not sep or not label or not file:
            raise ValueError(f"--ood {spec!r}: expected [GROUP:]NAME=FILE, e.g. --ood far:textures=textures.npz")
        group, _, set_name = label.rpartition(":")
        sets.append((set_name, group or "far", _read_outputs(file)))
    results = run_on_outputs(
        "eval", _read_outputs(fit), _read_outputs(id_), sets, names, params=params,
        full_spectrum=full_spectrum, n_boot=n_boot, progress=not quiet,
        split_names=(str(fit), str(id_)),
    )  # fmt: skip
    _finish(results, out, requested=names is not None, scores=scores)


def _read_outputs(path: str | Path) -> Any:
    """A file of outputs, or a shard folder (opened memory-mapped)."""
    from oodguard.outputs import ModelOutputs, read_outputs

    return ModelOutputs.open(path) if Path(path).is_dir() else read_outputs(path)


@app.command("extract")
def extract_command(
    data: Annotated[
        Path,
        typer.Argument(
            help="a folder of images (class sub-folders give labels; a flat folder is unlabelled) or a .npy array"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="the shard folder to write")],
    config: Annotated[
        Path | None, typer.Option(help="a TOML file whose [model] and [transform] tables describe the model")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="'package.module:function' that builds the model (instead of --config)")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="the model's state dict (.safetensors, .pt or .pth)")] = None,
    engine: Annotated[str, typer.Option(help="local, or ray (the ray extra): the model runs on Ray actors")] = "local",
    address: Annotated[
        str | None, typer.Option(help="the Ray cluster to connect to (default: start a local one)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray actors (default: the cluster's CPUs)")] = None,
    feature_layer: Annotated[str | None, typer.Option(help="as extract(feature_layer=...)")] = None,
    output_key: Annotated[str | None, typer.Option(help="where the logits are in the model's output")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="also record this module's output, repeated")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass")] = 256,
    shard_rows: Annotated[int, typer.Option(help="rows per shard file")] = 8192,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a model once over a dataset and write its outputs as a shard folder (for eval, fit_distributed, ...)."""
    import numpy as np

    from oodguard.benchmark.custom import load_model_config, model_from_factory
    from oodguard.extraction import extract
    from oodguard.extraction.data import ImageFolder

    transform, mode = None, None
    if (config is None) == (model is None):
        raise ValueError("give the model either as --config FILE.toml or as --model package.module:function")
    if config is not None:
        if weights is not None:
            raise ValueError("--weights: the configuration file names the weights; leave --weights out")
        built, transform, mode, options = load_model_config(config)
        feature_layer = feature_layer or options["feature_layer"]
        output_key = output_key or options["output_key"]
    else:
        assert model is not None
        built = model_from_factory(model, weights, "--model")
    if data.is_dir():
        labelled = any(child.is_dir() for child in data.iterdir())
        inputs: Any = ImageFolder(data, transform=transform, mode=mode, unlabelled=not labelled)
    elif data.suffix == ".npy" and data.is_file():
        inputs = np.load(data, allow_pickle=False)
    else:
        raise ValueError(f"{data}: expected a folder of images or a .npy file of inputs")
    key: str | int | None = int(output_key) if output_key is not None and output_key.isdigit() else output_key
    sharded = extract(
        built, inputs, out_dir=out, engine=engine, address=address, num_workers=workers, feature_layer=feature_layer,
        output_key=key, layers=layer or (), batch_size=batch_size, chunk_rows=shard_rows, device=device,
        progress=not quiet,
    )  # fmt: skip
    console.print(
        f"{len(sharded)} rows in {sharded.num_shards} shard(s): {out} (fields: {', '.join(sharded.fields())})"
    )


@app.command("train-bench")
def train_bench(
    name: Annotated[str, typer.Argument(help="embedded benchmark: digits or digits-open-set")],
    methods: Annotated[
        str | None,
        typer.Option(help="comma-separated: oe, energy, mixoe-mixup, mixoe-cutmix, dos, logitnorm, abet (default all)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default results/NAME-train)")] = None,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates for the 95 % intervals")] = 200,
    cache_dir: Annotated[Path | None, typer.Option(help="cache for trained models and outputs")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Fine-tune the benchmark's model with each training-time OOD method; evaluate each beside the baseline."""
    from oodguard.benchmark.training import digits_training_benchmark

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    trained = digits_training_benchmark(name, chosen, n_boot=n_boot, cache_dir=cache_dir, progress=not quiet)
    paths = trained.save(out or Path("results") / f"{name}-train")
    console.print(trained.to_markdown(), highlight=False, soft_wrap=True)
    console.print(f"report: {paths['html']}")
    console.print(f"tables: {paths['csv']}, {paths['markdown']}, {paths['training']}")


@app.command("pt-ood")
def pt_ood(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="also write the table to this markdown file")] = None,
    k: Annotated[int, typer.Option(help="neighbours of the kNN detector")] = 50,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates for the 95 % intervals")] = 200,
    cache_dir: Annotated[Path | None, typer.Option(help="cache for embeddings, heads and fine-tuned layers")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """PT-OOD on the text benchmark: familiar vs unfamiliar OOD text, pre-trained vs fine-tuned features."""
    from oodguard.benchmark import presets
    from oodguard.benchmark.text import pt_ood_table

    result = pt_ood_table(cache_dir=presets.cache_root(cache_dir), progress=not quiet, k=k, n_boot=n_boot)
    text = result.markdown()
    console.print(text, highlight=False, soft_wrap=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"table: {out}")


@app.command("detectors")
def list_detectors(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the markdown table of docs/detectors.md (defaults included)")
    ] = False,
) -> None:
    """List the detectors with what they need and their papers."""
    if markdown:
        from oodguard.detectors.catalogue import markdown_table

        sys.stdout.write(markdown_table())
        return
    table = Table(show_lines=True)
    for column in ("name", "protocol", "what it scores", "needs (fit)", "partial fit", "paper"):
        table.add_column(column)
    for name in detectors.available():
        meta = detectors.info(name)
        needs = ", ".join(meta["fit_requires"] if meta["needs_fit"] else meta["requires"])
        if meta["required_params"]:
            needs += "; params: " + ", ".join(meta["required_params"])
        partial = "yes" if meta["partial_fit"] else "no"
        table.add_row(name, meta["protocol"], meta["summary"], needs, partial, meta["paper"])
    console.print(table)


_DEFAULT_LOG = "decisions.sqlite"  # inside the guard folder, where `oodguard monitor DIR` looks


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="saved guard folder (written by Guard.save)")],
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    model_factory: Annotated[
        str | None,
        typer.Option(help="for a guard with a model: 'module:function' of your code that builds the architecture"),
    ] = None,
    workers: Annotated[int, typer.Option(help="worker processes, each with the guard, sharing the decision log")] = 1,
    log: Annotated[
        str | None,
        typer.Option("--log", help=f"decision log: SQLite file or SQLAlchemy URL (default DIR/{_DEFAULT_LOG})"),
    ] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="do not log decisions")] = False,
    allow_unlogged: Annotated[
        bool, typer.Option(help="answer 200 when the log cannot commit a decision (default: 503, nothing lost)")
    ] = False,
    max_body_bytes: Annotated[int, typer.Option(help="larger request bodies are refused (413)")] = 1 << 20,
    body_timeout: Annotated[float, typer.Option(help="seconds a client has to send its body (else 408)")] = 10.0,
    max_bodies_in_flight: Annotated[int, typer.Option(help="bodies received at once; more get 503")] = 64,
    shutdown_timeout: Annotated[int, typer.Option(help="seconds open requests get to finish on shutdown")] = 5,
    docs: Annotated[bool, typer.Option(help="serve /docs and /openapi.json (behind the token when one is set)")] = True,
    window: Annotated[float, typer.Option(help="rolling window of the OOD-rate alert, in seconds")] = 60.0,
    significance: Annotated[float, typer.Option(help="level of the OOD-rate alert's binomial test")] = 0.01,
    token_env: Annotated[str, typer.Option(help="environment variable holding the bearer token")] = "OODGUARD_TOKEN",
) -> None:
    """Serve a saved guard over HTTP: POST /v1/score, GET /v1/schema, GET /healthz, GET /metrics, docs at /docs."""
    try:
        import uvicorn

        from oodguard.serve.app import SETTINGS_ENV, create_app
    except ImportError as error:
        raise RuntimeError(f"serving needs FastAPI and uvicorn ({error}); pip install 'oodguard[serve]'") from error
    import json
    import os

    from oodguard.guard import load_guard

    if log is not None and no_log:
        raise ValueError("--log and --no-log exclude each other")
    if workers < 1:
        raise ValueError(f"--workers: expected at least 1, got {workers}")
    log_url = None if no_log else (log or str(directory / _DEFAULT_LOG))
    guard = load_guard(directory, model_factory=model_factory)  # refuses a tampered guard before anything listens
    settings: dict[str, Any] = {
        "token_env": token_env, "max_body_bytes": max_body_bytes, "log_url": log_url, "window_seconds": window,
        "significance": significance, "allow_unlogged": allow_unlogged, "docs": docs, "body_timeout": body_timeout,
        "max_bodies_in_flight": max_bodies_in_flight,
    }  # fmt: skip
    service: Any = create_app(guard, **settings) if workers == 1 else "oodguard.serve.app:app_from_environment"
    if workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps({"directory": str(directory.resolve()), "model_factory": model_factory,
                                              **settings})  # fmt: skip
    if token_env not in os.environ and host not in ("127.0.0.1", "localhost", "::1"):
        errors.print(f"warning: listening on {host} without authentication; set {token_env} to require a token")
    console.print(f"serving {guard!r} on http://{host}:{port} with {workers} worker(s) (decision log: "
                  f"{log_url or 'off'})", highlight=False, soft_wrap=True)  # fmt: skip
    uvicorn.run(service, host=host, port=port, log_level="warning", access_log=False, workers=workers,
                factory=workers > 1, timeout_graceful_shutdown=shutdown_timeout)  # fmt: skip


@app.command()
def monitor(
    source: Annotated[
        str, typer.Argument(help=f"guard folder (reads DIR/{_DEFAULT_LOG}), SQLite file or database URL")
    ],
    window: Annotated[float, typer.Option(help="window length in seconds")] = 60.0,
    significance: Annotated[
        float | None, typer.Option(help="level of the binomial test (default: the service's)")
    ] = None,
    last: Annotated[int, typer.Option(help="show the last N windows (0: all)")] = 50,
) -> None:
    """Summarise a decision log: OOD rate per time window, tested against the guard's false-alarm rate."""
    import pandas as pd

    from oodguard.serve.store import summarise

    location = Path(source) / _DEFAULT_LOG if Path(source).is_dir() else source
    summary = summarise(location, window, significance=significance)
    if summary.empty:
        console.print(f"no decisions logged yet in {location}")
        return
    alpha, level = summary.attrs["alpha"], summary.attrs["significance"]
    shown = summary.tail(last) if last > 0 else summary
    alerts = int(summary["alert"].fillna(False).sum())
    table = Table(
        title=f"{location}: {int(summary['n'].sum())} decisions in {len(summary)} windows of {window:g} s, "
        f"{alerts} alert(s)",
        caption=(f"alert: OOD rate above the false-alarm rate {alpha:.4g} (exact binomial test, p < {level:g})"
                 if alpha is not None else "no false-alarm rate stored with the log: no alerts")
        + (f"; last {len(shown)} windows shown" if len(shown) < len(summary) else ""),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )  # fmt: skip
    table.add_column("window start (UTC)", no_wrap=True)
    for column in ("replicas", "requests", "decisions", "OOD", "OOD rate", "p-value"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("alert")
    for row in shown.itertuples(index=False):
        alert = "" if pd.isna(row.alert) else ("[red]ALERT[/red]" if row.alert else "ok")
        pvalue = "" if pd.isna(row.pvalue) else f"{row.pvalue:.2g}"
        table.add_row(row.start.strftime("%Y-%m-%d %H:%M:%S"), str(row.replicas), str(row.requests), str(row.n),
                      str(row.n_ood),
                      f"{100 * row.ood_rate:.2f} %", pvalue, alert)  # fmt: skip
    console.print(table)


def _version(value: bool) -> None:
    if value:
        console.print(f"oodguard {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns every error into one line and a non-zero exit code."""
    try:
        returned = app(args=argv, prog_name="oodguard", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        errors.print("interrupted")
        return 130
    except Exception as error:
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):  # usage errors
            if error.format_message():  # empty when the help text was shown instead
                errors.print(f"error: {error.format_message()}", highlight=False, soft_wrap=True, markup=False)
            return int(error.exit_code) or 2
        message = " ".join(str(error).split()) or type(error).__name__
        errors.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
        return 1
    return returned if isinstance(returned, int) else 0


if __name__ == "__main__":
    sys.exit(main())
