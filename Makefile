# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit bench-select bench-load

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[ml,dev]'
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright never downloads a browser here).
CHROMIUM := /usr/lib/chromium/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null; \
	else echo "chromium missing: install Debian's chromium to run the browser tests"; fi

# Label Studio in its own venv, as a real peer for tests/interop (never a project dependency).
LS_VENV := .ls-venv
$(LS_VENV)/bin/label-studio:
	CORELOOP_LS_VENV=$(LS_VENV) bash scripts/setup_label_studio.sh

install: $(STAMP)

demo: install
	$(BIN)/coreloop demo --simulate

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install $(CHROMIUM) $(LS_VENV)/bin/label-studio
	$(BIN)/pytest

test: lint typecheck unit

bench-select: install
	$(BIN)/coreloop bench select --n 100000 --dim 512 --labeled 10000 --budget 5000

bench-load: install
	$(BIN)/python -m benchmarks.load --db sqlite
	$(BIN)/python -m benchmarks.load --db postgresql
