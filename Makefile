# The two commands a new user types: `make run` and `make test`.
# Both bootstrap .venv themselves; re-running them reinstalls only when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite uses as real peers: serf (membership interop), prometheus
# (promtool and the real server), chromium (the status page), iptables and iproute2 (partitions).
TEST_DEBS := serf iproute2 procps iptables prometheus chromium

IMGPROXY_ARGS ?=

.PHONY: run test test-docker lint bench docker-base docker-wheelhouse docker-build docker-up docker-down clean venv

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

# The compose end-to-end test: builds the images (base image made locally when no registry
# is reachable), brings up a scaled cluster, kills and scales it, tears it down.
test-docker: $(STAMP) docker-base
	IMGPROXY_DOCKER_TESTS=1 $(BIN)/python -m pytest -q tests/cluster/test_compose.py

docker-base:
	./scripts/docker-base

docker-wheelhouse: $(STAMP)
	PYTHON=$(BIN)/python ./scripts/wheelhouse

docker-build: docker-base docker-wheelhouse
	./scripts/compose build

GATEWAYS ?= 1
WORKERS ?= 1
docker-up: docker-build
	./scripts/compose up --scale gateway=$(GATEWAYS) --scale worker=$(WORKERS)

docker-down:
	./scripts/compose down -v

# Side-by-side benchmarks (thumbor, nginx, raw Pillow, serf); rewrites bench/results/.
bench: $(STAMP)
	./bench/run-all $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check imgproxy tests bench twisted

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp
