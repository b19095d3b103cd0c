"""Benchmarks: specifications, embedded presets, the runner and the report."""
