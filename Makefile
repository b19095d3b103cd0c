# The README's two commands: `make bench` (the main job) and `make test` (the whole test suite).
# Each creates or reuses the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench bench-text speed speed-imagenet reuse latency test test-fast lint typecheck format env clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/oodguard bench digits --out results/digits

# Training-time OOD methods fine-tuned on the digits model, beside the baseline (docs/training.md).
.PHONY: train-bench
train-bench: $(STAMP)
	$(VENV)/bin/oodguard train-bench digits --out results/digits-train

bench-text: $(STAMP)
	$(VENV)/bin/oodguard bench text --out results/text

# Performance measurements (docs/performance.md records their output).
speed: $(STAMP)
	$(PY) benchmarks/detector_speed.py --scale cifar

speed-imagenet: $(STAMP)
	$(PY) benchmarks/detector_speed.py --scale imagenet --repeats 2

reuse: $(STAMP)
	$(PY) benchmarks/extraction_reuse.py --benchmark digits

latency: $(STAMP)
	$(PY) benchmarks/service_latency.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts

typecheck: $(STAMP)
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks scripts
	$(PY) -m ruff check --fix src tests benchmarks scripts

test: $(STAMP) lint typecheck
	$(PY) -m pytest

# The inner loop: everything but the slow end-to-end tests (browser, live server, benchmark runs).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
