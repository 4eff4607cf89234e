# Every target installs what is missing into .venv first, so a fresh clone needs only `make`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: install demo test test-fast test-gpu check lint format typecheck serve worker services screenshot clean

# The dashboard's browser tests drive Debian's Chromium (tests/test_dashboard.py); as root.
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[train,dev]'
	# DeepSpeed builds against the torch already installed (it needs g++ and ninja at run time).
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	touch $(STAMP)

$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

install: $(STAMP) $(CHROMIUM)

demo: install
	$(BIN)/alignd demo

# Postgres and Redis must be up for the service tests; .ci/run starts them when they are down.
test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The CUDA checks alone (tests/gpu); `make test` collects them too and skips them without CUDA.
test-gpu: install
	$(BIN)/pytest -q -m gpu tests/gpu

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

serve: install
	$(BIN)/alignd serve

worker: install
	$(BIN)/alignd worker

services:
	bash .ci/services

# docs/dashboard.png, the README's picture of a job page (a real job on a tiny model).
screenshot: install
	$(BIN)/python docs/screenshot.py docs/dashboard.png

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
