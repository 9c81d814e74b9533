# The two commands a new user types: `make run` and `make test`.
# Both bootstrap .venv themselves; re-running them reinstalls only when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite uses as real peers.
TEST_DEBS := serf iproute2 procps

IMGPROXY_ARGS ?=

.PHONY: run test test-fast lint bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { ./scripts/ensure-debs python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	# compat mode: a .pth file puts the checkout on sys.path, so Twisted's plugin
	# scan finds twisted/plugins/imgproxy_plugin.py right here.
	$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n imgproxy $(IMGPROXY_ARGS)

test: $(STAMP)
	./scripts/ensure-debs $(TEST_DEBS)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check imgproxy tests bench twisted

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp
