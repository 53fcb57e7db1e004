# The two set-up commands of the README: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Command-line settings for `make serve`, e.g. `make serve ARGS="--port 9000"`.
ARGS ?=

.PHONY: serve test

serve: $(VENV)/.serve-deps
	$(BIN)/foalnet serve --device auto $(ARGS)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest $(ARGS)

# ffmpeg comes with the imageio-ffmpeg wheel (a static build); no system package needed to serve.
$(VENV)/.serve-deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

$(VENV)/.test-deps: pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh ffmpeg espeak-ng sox chromium prometheus
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,train,test,otel,bench]'
	touch $@ $(VENV)/.serve-deps
