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
	$(PY) -m csm_triton.embedded serve --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(BUILD) .triton
