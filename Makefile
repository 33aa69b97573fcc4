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

# The tools the tests run for real: Debian's prometheus (server and promtool) and
# docker-compose (parses the compose file), kubectl's kustomize (present on these machines),
# and the custom-resource schemas from npm, pinned by tests/kubernetes/package-lock.json.
test-tools:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
			|| ! command -v docker-compose >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus docker-compose; \
	fi
	@command -v kubectl >/dev/null || (echo "kubectl (with kustomize) is needed: https://kubernetes.io/docs/tasks/tools/" >&2; exit 1)
	@test -d tests/kubernetes/node_modules || npm ci --prefix tests/kubernetes --no-audit --no-fund

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
