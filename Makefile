# Two commands on a fresh machine: `make run` and `make test` (README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ModelScope's own MGeo classes, the reference in tests/test_modelscope.py; they need transformers<5,
# so they live apart from the service's venv.
MODELSCOPE_VENV := .venv-modelscope
MODELSCOPE_STAMP := $(MODELSCOPE_VENV)/.installed

.PHONY: install run test test-tools bench pretrain train train-teacher clean

install: $(STAMP)

# Idempotent: re-runs only when the package's declared dependencies change. What serving needs only:
# the test tools come with `make test`, training's with `make train`.
# torch is pinned to the CPU build that lies on disk here; any other spec pulls CUDA packages.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(STAMP)

TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

run: install
	$(VENV)/bin/mgeo-service serve

$(MODELSCOPE_STAMP):
	test -x $(MODELSCOPE_VENV)/bin/python || $(PYTHON) -m venv $(MODELSCOPE_VENV)
	$(MODELSCOPE_VENV)/bin/pip install -q torch==2.13.0
	$(MODELSCOPE_VENV)/bin/pip install -q modelscope==1.40.2 'transformers<5' addict
	touch $(MODELSCOPE_STAMP)

# The tools the tests run for real: Debian's prometheus (server and promtool),
# prometheus-alertmanager (server and amtool), prometheus-node-exporter (the dashboard's host row),
# docker-compose (parses the compose file), nginx (the compose file's proxy, run in front of a live
# service) and chromium (renders the /docs page headless),
# kubectl's kustomize (present on these machines), the custom-resource schemas from npm, pinned
# by tests/kubernetes/package-lock.json, and ModelScope's venv (above).
test-tools: $(MODELSCOPE_STAMP)
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
			|| ! command -v prometheus-alertmanager >/dev/null || ! command -v amtool >/dev/null \
			|| ! command -v prometheus-node-exporter >/dev/null || ! command -v docker-compose >/dev/null \
			|| ! command -v nginx >/dev/null || ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			prometheus prometheus-alertmanager prometheus-node-exporter docker-compose nginx chromium; \
	fi
	@command -v kubectl >/dev/null || (echo "kubectl (with kustomize) is needed: https://kubernetes.io/docs/tasks/tools/" >&2; exit 1)
	@test -d tests/kubernetes/node_modules || npm ci --prefix tests/kubernetes --no-audit --no-fund

test: $(TEST_STAMP) test-tools
	$(PY) -m pytest

# BentoML, a peer of the overload bench, in its own venv: it pins its own OpenTelemetry and Starlette.
BENTOML_VENV := .venv-bentoml
BENTOML_STAMP := $(BENTOML_VENV)/.installed
$(BENTOML_STAMP):
	test -x $(BENTOML_VENV)/bin/python || $(PYTHON) -m venv $(BENTOML_VENV)
	$(BENTOML_VENV)/bin/pip install -q torch==2.13.0
	$(BENTOML_VENV)/bin/pip install -q bentoml==1.4.40 transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')
	touch $(BENTOML_STAMP)

# wrk drives the HTTP loads (the open-loop generator's uvloop comes with the test extra); LitServe,
# prometheus_flask_exporter and BentoML are the peers compared against.
bench: $(TEST_STAMP) $(BENTOML_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

# The pretraining stage: the student's encoder taught address text by masked-language modelling
# (2 CPU cores: 12 minutes on a Xeon with AMX, where it runs in bf16; 27-32 in float32 on AVX2 CPUs).
# Not committed: a fixed seed and step count reproduce it.
PRETRAINED := run/pretrained
$(PRETRAINED)/encoder.safetensors: $(STAMP)
	$(PY) -m pip install -q -e '.[train]'
	$(VENV)/bin/mgeo-service train --stage pretrain --data ../shared/data --out $(PRETRAINED) --splits run/splits \
		--steps 2000 --batch-size 64 --learning-rate 2e-4 --threads 2

pretrain: $(PRETRAINED)/encoder.safetensors

# The student stage: the default model, from the pretrained encoder and the committed teacher soft labels,
# 8 epochs over the pairs in canonical order (the shipped run: 44 minutes on the 2 cores of a Xeon with AMX,
# in bf16; 4 epochs of an earlier recipe took 54 minutes in float32 on an AVX2 EPYC's 2 cores). Progress
# is saved after each epoch and every 200 batches, so `make train` run again after an interruption goes on
# where it stopped.
# It ends with the ONNX export the model ships (float32 and int8, in seconds).
train: pretrain
	$(VENV)/bin/mgeo-service train --data ../shared/data --out mgeo_service/models/default --splits run/splits \
		--init $(PRETRAINED) --resume run/student-progress.pt
	$(VENV)/bin/mgeo-service export --model mgeo_service/models/default

# The teacher stage, run once to write mgeo_service/train/distillation/ (a GPU: about 6 minutes).
train-teacher: install
	$(PY) -m pip install -q -e '.[train]'
	$(VENV)/bin/mgeo-service train --stage teacher --data ../shared/data --splits run/splits --device $(or $(DEVICE),cuda) \
		--epochs 4 --batch-size 64 --learning-rate 5e-5 --shenzhen 16000 --contrast 12000 --unlabelled 6000

clean:
	rm -rf $(VENV) $(MODELSCOPE_VENV) $(BENTOML_VENV) run *.egg-info
