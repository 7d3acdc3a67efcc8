# Two entry points (see README): `make sweep` and `make test`. Both set up everything they need and
# are fast when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Debian's Chromium: the browser the MLflow UI tests drive through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export RAY_AUTH_MODE ?= disabled

.PHONY: setup sweep test lint clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(DATASET):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

$(CHROMIUM):
	$(SUDO) apt-get install -y chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

setup: $(INSTALLED) $(DATASET)

sweep: setup
	$(BIN)/ofq-ray tune search_spaces/cga.yaml

test: setup $(CHROMIUM)  # the browser only the tests need
	$(BIN)/pytest -q --durations=15  # the slowest tests, to keep the suite within its time

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ofq_ray

clean:
	rm -rf ofq-runs test-output .pytest_cache .mypy_cache .ruff_cache
