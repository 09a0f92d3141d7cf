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

# ---- Rebuilding the embedded emoji model and the figures the README shows (long; see README for times) ----
COMPARE_PLANS ?= full,fora-2,fora-3,fora-4,fbcache-0.1,dbcache-F1B1-0.1,teacache-0.3,taylor-3,emoji:fast,emoji:faster,emoji:fastest,diffusers:fbc-0.1,diffusers:pab-2,diffusers:faster,diffusers:taylorseer-3,cachedit:dbcache-F1B0-0.1,cachedit:dbcache-taylor-F1B0-0.1

.PHONY: data train quality calibrate search compare

data: install
	$(BIN)/python -m diffroute.zoo.emoji_data

train: install
	$(BIN)/python -m diffroute.zoo.train_emoji --out runs/emoji --transformer-steps 5500

quality: install
	$(BIN)/python -m diffroute.zoo.evaluate_emoji --out docs

calibrate: install
	$(BIN)/diffroute calibrate --model emoji

search: install
	$(BIN)/diffroute search --model emoji --steps 20 --n 32 --pop 24 --generations 8 --out runs/search/emoji --max-cost 0.4

compare: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/diffroute eval compare --model emoji --prompts heldout --n 64 --batch 32 --repeats 2 --plans $(COMPARE_PLANS) --out docs/compare
