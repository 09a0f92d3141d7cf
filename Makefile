# Two entry points for a fresh machine: `make demo` (install + main job) and `make test` (install + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: install demo test lint bench clean

# torch 2.13.0 first: its CPU build is on this machine's index, and with it in place pip pulls no CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# Debian's Chromium for the browser test of the demo (Playwright drives it; it never downloads a browser).
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "note: chromium could not be installed; the browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/diffroute generate --model emoji --plan fora-3 --steps 20 --out $(OUT)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/diffroute bench overhead --model tiny-pixart

clean:
	rm -rf $(VENV) outputs .pytest_cache
