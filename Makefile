# The README's two commands: `make bench` (the main job) and `make test` (the whole test suite).
# Each creates or reuses the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: peer-venv peer-parity bench bench-text speed speed-imagenet reuse latency test test-fast lint typecheck format env clean

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

# pytorch-ood, for benchmarks/peer_parity.py only, in its own environment beside the same CPU torch (never a
# dependency of oodguard). torchvision and pytorch-ood come without their dependencies so that pip pulls no other
# torch; torchvision 0.28.0 is the release for torch 2.13.
PEERS ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): constraints.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps torchvision==0.28.0 pytorch-ood==0.4.0
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt numpy scipy "typing_extensions>=4" pillow scikit-learn
	touch $(PEERS_STAMP)

peer-venv: $(PEERS_STAMP)

peer-parity: $(STAMP) $(PEERS_STAMP)
	$(PY) benchmarks/peer_parity.py --out docs/peer_parity.md

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
