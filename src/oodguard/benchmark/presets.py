"""Embedded benchmarks that run on a fresh machine with no network: ``digits``, ``digits-open-set`` and ``text``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from oodguard.benchmark.spec import Benchmark


def _digits(open_set: bool) -> Callable[..., Benchmark]:
    def build(cache_dir: Path | None = None, progress: bool = True) -> Benchmark:
        from oodguard.benchmark.digits import digits_benchmark

        return digits_benchmark(open_set=open_set, cache_dir=cache_dir, progress=progress)

    return build


def _text(cache_dir: Path | None = None, progress: bool = True) -> Benchmark:
    from oodguard.benchmark.text import text_benchmark

    return text_benchmark(cache_dir=cache_dir, progress=progress)


PRESETS: dict[str, Callable[..., Benchmark]] = {
    "digits": _digits(open_set=False),
    "digits-open-set": _digits(open_set=True),
    "text": _text,
}


#: Rows an embedded benchmark computes itself (``Benchmark.extra_jobs``), by benchmark: ``--detectors`` may name them.
EXTRA_ROWS: dict[str, tuple[str, ...]] = {"text": ("bam_lora",)}


def available() -> list[str]:
    return sorted(PRESETS)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where trained models and extracted outputs are cached: the argument, $OODGUARD_CACHE, or ~/.cache/oodguard."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("OODGUARD_CACHE") or Path.home() / ".cache" / "oodguard")


def outputs_cache_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "outputs"


def load(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Benchmark:
    """Build an embedded benchmark by name (training its model on first use, cached after)."""
    if name not in PRESETS:
        raise ValueError(f"unknown benchmark {name!r}; embedded benchmarks: {', '.join(available())}")
    return PRESETS[name](cache_dir=cache_root(cache_dir), progress=progress)
