# The two newcomer commands: `make quickstart` (train -> steer -> export -> serve on digits) and `make test`.
# Both create .venv on first use. torch/torchvision are pinned to the builds pip finds on this machine's disk.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test test-fast clean-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[train,serve,loadtest,dev]'
	touch $@

quickstart: $(BIN)/.installed
	$(BIN)/steerprune quickstart

test: $(BIN)/.installed
	$(BIN)/pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -m "not slow and not http"

clean-venv:
	rm -rf $(VENV)
