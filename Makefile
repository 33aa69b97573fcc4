# Two commands on a fresh machine: `make run` and `make test` (README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-tools bench train clean

install: $(STAMP)

# Idempotent: re-runs only when the package's declared dependencies change.
# torch is pinned to the CPU build that lies on disk here; any other spec pulls CUDA packages.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/mgeo-service serve

# Debian's prometheus package brings the real server and promtool the tests use.
test-tools:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	fi

test: install test-tools
	$(PY) -m pytest

# wrk drives the HTTP loads; LitServe and prometheus_flask_exporter are the peers compared against.
bench: install
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

train: install
	$(PY) -m pip install -q -e '.[train]'
	$(VENV)/bin/mgeo-service train --data ../shared/data --out mgeo_service/models/default --splits run/splits

clean:
	rm -rf $(VENV) run *.egg-info
