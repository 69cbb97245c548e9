# Two commands on a fresh machine:
#   make serve   set everything up, build a model repository, serve it on 8000/8001/8002
#   make test    set everything up and run every test
# CSM_CHECKPOINT=<folder or hub id> serves real CSM-1B weights; without it a tiny
# random CSM is generated (its audio is noise, but every code path is the real one).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD ?= build
PROFILE ?= cpu
CSM_CHECKPOINT ?=
TINY_CHECKPOINT := $(BUILD)/tiny-csm
REPOSITORY ?= $(BUILD)/model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

CHECKPOINT := $(if $(CSM_CHECKPOINT),$(CSM_CHECKPOINT),$(TINY_CHECKPOINT))

.PHONY: setup serve test repository tiny-checkpoint clean

setup:
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh

tiny-checkpoint: setup
	@test -f $(TINY_CHECKPOINT)/config.json || $(PY) -m export.tiny_checkpoint --out $(TINY_CHECKPOINT)

repository: setup $(if $(CSM_CHECKPOINT),,tiny-checkpoint)
	$(PY) -m export.build_repository --checkpoint $(CHECKPOINT) --profile $(PROFILE) --out $(REPOSITORY)

serve: repository
	$(PY) -m csm_triton.serving serve --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(BUILD) .triton

# --- the REST gateway (README "Clients") -------------------------------------------------------
# The original system's API and page on :7860, calling a running Triton (make serve) over
# gRPC; voice uploads carry this shell's CSM_ADMIN_TOKEN.
GATEWAY_PORT ?= 7860
TRITON_GRPC_URL ?= localhost:$(GRPC_PORT)

.PHONY: gateway

gateway: setup
	$(PY) -m csm_clients.gateway --triton-url $(TRITON_GRPC_URL) --port $(GATEWAY_PORT)

# --- load tests and benchmarks (loadtest/README.md) ----------------------------------------
# locust / locust-ui drive a running server (make serve; give both shells the same
# CSM_ADMIN_TOKEN so the stored voices can be registered); bench and perf start their
# own server on free ports from $(REPOSITORY) and write their results to $(RESULTS).
LOCUST_HOST ?= http://localhost:$(HTTP_PORT)
USERS ?= 4
DURATION ?= 60s
LOCUST_CSV ?= $(BUILD)/locust/locust
LOCUST_WEB_PORT ?= 8089
RESULTS ?= loadtest/results
BENCH_ARGS ?=
PERF_ARGS ?=
LOCUST_MODEL := $(if $(CSM_CHECKPOINT),full,tiny)

.PHONY: locust locust-ui bench perf

locust: setup
	@mkdir -p $(dir $(LOCUST_CSV))
	CSM_LOCUST_MODEL=$${CSM_LOCUST_MODEL:-$(LOCUST_MODEL)} $(VENV)/bin/locust -f loadtest/locustfile.py \
	  --host $(LOCUST_HOST) --headless --users $(USERS) --spawn-rate $(USERS) --run-time $(DURATION) \
	  --stop-timeout 120 --csv $(LOCUST_CSV) --only-summary

locust-ui: setup
	CSM_LOCUST_MODEL=$${CSM_LOCUST_MODEL:-$(LOCUST_MODEL)} $(VENV)/bin/locust -f loadtest/locustfile.py \
	  --host $(LOCUST_HOST) --web-port $(LOCUST_WEB_PORT)

bench: repository
	$(PY) -m loadtest.bench --serve $(REPOSITORY) --out $(RESULTS) $(BENCH_ARGS)
	$(PY) -m loadtest.overhead --serve $(REPOSITORY) --out $(RESULTS)

perf: repository
	$(PY) -m loadtest.perf_analyzer.sweep --serve $(REPOSITORY) --out $(RESULTS) $(PERF_ARGS)
