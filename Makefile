# fedpi: common developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

ROUNDS ?= 5
OUT ?= runs/local

# Deployment settings: make deploy OVERLAY=pi WORKERS=3 IMAGE=registry.example/fedpi TAG=0.1.0
KUBECTL ?= kubectl
export KUBECONFIG
NAMESPACE ?= fedpi
OVERLAY ?= pi
IMAGE ?= fedpi
TAG ?= 0.1.0
WORKERS ?= 3
POD ?= 0
PLATFORMS ?= linux/arm64,linux/amd64
RENDER = KUBECTL=$(KUBECTL) k3s/render $(OVERLAY) $(NAMESPACE) $(IMAGE) $(TAG) $(WORKERS)
K = $(KUBECTL) -n $(NAMESPACE)

CERTS ?= certs

.PHONY: help venv proto run tasks test test-scenarios lint docs fuzz runs model bench bench-learning bench-async bench-privacy bench-secure clean lock image image-tar image-test render certs secrets deploy train status undeploy probe

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP)  ## create .venv and install fedpi with its test tools

# The example tasks are installed too: `make run TASK=breast-cancer`, and their tests run with `make test`.
EXAMPLES := examples/tabular examples/fashion

$(STAMP): pyproject.toml $(EXAMPLES:%=%/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(EXAMPLES:%=-e %)
	touch $(STAMP)

proto: $(STAMP)  ## regenerate generated/ from proto/
	$(PY) -m grpc_tools.protoc -Igenerated=proto --python_out=. --pyi_out=. --grpc_python_out=. \
		$(shell find proto -name '*.proto')

TASK ?=

run: $(STAMP)  ## three local workers + a coordinator on 127.0.0.1: a real training run [TASK=breast-cancer]
	$(PY) -m coordinator_service demo --rounds $(ROUNDS) --output-dir $(OUT) $(if $(TASK),--task $(TASK))

tasks: $(STAMP)  ## list the installed tasks (make run TASK=NAME trains one)
	$(PY) -m coordinator_service tasks

test: lint docs  ## the test suite (after lint and the docs build), without the long scenarios
	$(PY) -m pytest -m "not scenario"

test-scenarios: $(STAMP)  ## the long end-to-end scenarios: faults, poisoning, async and board health, secure aggregation and privacy, Fashion-MNIST
	$(PY) -m pytest -m scenario

lint: $(STAMP)  ## ruff (lint, format), the import contracts (lint-imports) and type checks (mypy)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

docs: $(STAMP)  ## build the documentation site into site/, strictly: a broken link or anchor fails
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

FUZZ_EXAMPLES ?= 10000

fuzz: $(STAMP)  ## throw FUZZ_EXAMPLES random and nearly-valid RunSpecs at a live `fedpi serve` (about 2 minutes)
	FEDPI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/integration/test_control_fuzz.py

BENCH ?=

bench: $(STAMP)  ## benchmarks: wire (loopback and Pi LAN vs raw TCP, compression), transport, memory, reference workload, faults, poison, robust-memory, scale [BENCH="wire scale"]
	$(PY) -m bench $(BENCH)

bench-learning: $(STAMP)  ## strategies x partitions on real MNIST / Fashion-MNIST, and a mixed Pi LAN (about 2 hours)
	$(PY) -m bench.learning $(BENCH_LEARNING_ARGS)

bench-privacy: $(STAMP)  ## accuracy under DP-SGD at epsilon 1, 3 and 8 beside the non-private run (real MNIST)
	$(PY) -m bench.privacy $(BENCH_PRIVACY_ARGS)

bench-secure: $(STAMP)  ## what secure aggregation costs: round wall, bytes, memory from 5 to 10 workers, Pi LAN
	$(PY) -m bench.secure $(BENCH_SECURE_ARGS)

bench-async: $(STAMP)  ## async vs sync rounds on an emulated Pi LAN with a slow board (90 minutes; needs root, pilan)
	$(PY) -m bench.asynchronous $(BENCH_ASYNC_ARGS)

# The image carries fedpi[secure]: secure aggregation works on every Pi (docs/deploy.md: what fedpi[privacy] would cost).
LOCK = $(VENV)/bin/uv pip compile pyproject.toml --extra secure --python-version 3.11 --generate-hashes --quiet

lock: $(STAMP)  ## pin the image's dependencies with hashes: requirements/image-arm64.txt, image-amd64.txt
	$(LOCK) --python-platform aarch64-manylinux_2_28 --override requirements/torch-arm64.txt -o requirements/image-arm64.txt
	$(LOCK) --python-platform x86_64-manylinux_2_28 --override requirements/torch-amd64.txt \
		--no-emit-package torch --no-emit-package torchvision -o requirements/image-amd64.txt

image:  ## build the multi-arch image and push it: make image IMAGE=registry.example/fedpi TAG=0.1.0
	docker buildx build --platform $(PLATFORMS) -t $(IMAGE):$(TAG) --push .

image-tar:  ## build the arm64 image into fedpi-TAG-arm64.tar, for `k3s ctr images import` without a registry
	docker buildx build --platform linux/arm64 -t $(IMAGE):$(TAG) -o type=docker,dest=fedpi-$(TAG)-arm64.tar .

IMAGE_TEST_PLATFORM ?= linux/amd64
TORCH_WHEEL ?=
IMAGE_TEST_RUN_ARGS ?=

image-test: $(STAMP)  ## build the image and train one round in containers: [IMAGE_TEST_PLATFORM=linux/arm64] [TORCH_WHEEL=file]
	$(PY) -m tests.image_check --platform $(IMAGE_TEST_PLATFORM) $(if $(TORCH_WHEEL),--torch-wheel $(TORCH_WHEEL)) \
		$(if $(IMAGE_TEST_RUN_ARGS),--run-args "$(IMAGE_TEST_RUN_ARGS)")

render:  ## print the manifests `make deploy` would apply
	@$(RENDER)

# Certificates need only `cryptography`, in a small venv of their own: not torch and the rest of the dev tools.
CERTS_VENV ?= .venv-certs
CERTS_PY = PYTHONPATH=. $(CERTS_VENV)/bin/python -m fedpi.net.certs --out $(CERTS) --workers $(WORKERS) --namespace $(NAMESPACE)

$(CERTS_VENV)/.stamp:
	$(PYTHON) -m venv $(CERTS_VENV)
	$(CERTS_VENV)/bin/pip install --quiet 'cryptography>=42'
	touch $@

certs: $(CERTS_VENV)/.stamp  ## create a CA, coordinator and per-worker certificates and a token in certs/
	$(CERTS_PY)

secrets: $(CERTS_VENV)/.stamp  ## store the token and certificates as the Kubernetes Secrets the pods mount
	$(KUBECTL) create namespace $(NAMESPACE) --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(CERTS_PY) --print-secrets | $(KUBECTL) apply -f -

deploy: secrets  ## put a worker on every Pi and the coordinator service on the server; wait until all are Ready
	$(RENDER) | $(KUBECTL) apply -f -
	for i in $$(seq 0 $$(($(WORKERS) - 1))); do $(K) rollout status statefulset/fedpi-worker-$$i --timeout=20m || exit 1; done
	$(K) rollout status deployment/fedpi-coordinator --timeout=10m

# The coordinator's control API, reached through kubectl port-forward with the operator's credentials from $(CERTS)/.
API_PORT ?= 50050
RUNS = $(VENV)/bin/fedpi runs --coordinator 127.0.0.1:$(API_PORT) --tls-ca $(CERTS)/ca.crt \
	--tls-cert $(CERTS)/operator.crt --tls-key $(CERTS)/operator.key --tls-server-name fedpi-coordinator \
	--token-file $(CERTS)/operator-token
FORWARD = $(K) port-forward service/fedpi-coordinator $(API_PORT):50050 >/dev/null & pf=$$!; sleep 3
# `make train` starts a run with fedpi.env's settings, SET="lr=0.1 local-seconds=20" overriding them for this run;
# `make train RESUME=RUN` continues a stopped or interrupted run. Either way it follows the run's events to its end.
RESUME ?=
SET ?=
RUN ?=

train: $(STAMP)  ## start a run on the coordinator (or RESUME=RUN) and follow its events to the end
	@$(FORWARD); $(RUNS) $(if $(RESUME),resume $(RESUME),start $(if $(RUN),--run-id $(RUN)) $(foreach s,$(SET),--set $(s))) \
	  --watch; status=$$?; kill $$pf; exit $$status

runs: $(STAMP)  ## list the coordinator's runs
	@$(FORWARD); $(RUNS) list; status=$$?; kill $$pf; exit $$status

model: $(STAMP)  ## download a run's model (RUN=ID, its digest checked) to model-ID.pt
	@test -n "$(RUN)" || { echo "make model RUN=ID (make runs lists them)"; exit 2; }
	@$(FORWARD); $(RUNS) model $(RUN) -o model-$(RUN).pt; status=$$?; kill $$pf; exit $$status

status:  ## workers, coordinator and volumes
	$(K) get deployment,statefulset,pods,pvc -o wide

undeploy:  ## remove fedpi but keep its volumes (dataset caches, results); `kubectl delete namespace` drops those too
	$(K) delete --ignore-not-found deployment/fedpi-coordinator service/fedpi-coordinator service/fedpi-worker \
	  networkpolicy/fedpi-worker-ingress networkpolicy/fedpi-coordinator-ingress networkpolicy/fedpi-coordinator-egress \
	  networkpolicy/fedpi-worker-egress networkpolicy/fedpi-dataset-download
	$(K) delete --ignore-not-found statefulset -l app.kubernetes.io/component=worker
	$(K) delete --ignore-not-found configmap -l app.kubernetes.io/name=fedpi

# grpcurl as the coordinator: mutual TLS and the token from $(CERTS)/ (what `make secrets` deployed); the worker's
# certificate must name the worker.
GRPCURL_AUTH = -cacert $(CERTS)/ca.crt -cert $(CERTS)/coordinator.crt -key $(CERTS)/coordinator.key \
	-servername fedpi-worker-$(POD) -H "authorization: Bearer $$(cat $(CERTS)/token)"

# make venv installs grpcurl into the venv; a grpcurl on PATH does as well.
GRPCURL = $(or $(wildcard $(VENV)/bin/grpcurl),grpcurl)

probe:  ## grpcurl health and GetInfo of worker POD through kubectl port-forward
	@$(K) port-forward pod/fedpi-worker-$(POD)-0 50051:50051 50052:50052 >/dev/null & pf=$$!; sleep 3; \
	$(GRPCURL) -plaintext localhost:50052 grpc.health.v1.Health/Check; \
	$(GRPCURL) $(GRPCURL_AUTH) localhost:50051 fedpi.v1.Worker/GetInfo; status=$$?; kill $$pf; exit $$status

clean:  ## remove the virtualenv and run outputs
	rm -rf $(VENV) $(CERTS_VENV) runs .pytest_cache
