# `make run` and `make test` work on a fresh machine: they create .venv and install what they need.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test lint typecheck compose-check browser pytest bench clean

# pip's warnings about this machine's unused local package indexes are filtered out; its status is kept.
PIP := $(BIN)/python -m pip install -q --progress-bar off
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip $(QUIET)
	@# torch first and pinned: pip then takes the CPU build from local disk instead of a CUDA one.
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e '.[dev]' $(QUIET)
	$(BIN)/llm-router --help > /dev/null
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llm-router serve --config $${CONFIG_FILE:-config.dev.yaml}

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench migrations scripts
	$(BIN)/ruff format --check gateway tests bench migrations scripts

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# Validates docker-compose.yml for every profile with whichever Compose is installed (v2 or v1), and
# always against the compose specification's schema and a rendering in Python (scripts/compose_check.py),
# so that no Compose is needed. A fresh clone has no .env: .env.example stands in for it.
compose-check: $(STAMP)
	$(BIN)/python scripts/compose_check.py docker-compose.yml $$(test -f .env || echo --env GATEWAY_ENV_FILE=.env.example)

# The dashboard's browser tests drive Debian's chromium through Playwright (never `playwright
# install`, which would download a browser): installed here when missing and we may (root, apt).
browser:
	@command -v chromium > /dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "make: the dashboard's browser tests need Chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

test: lint typecheck compose-check browser pytest

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
