# Two commands on a fresh machine:
#   make serve   set up what serving needs, build a model repository, serve it on 127.0.0.1:8000/8001/8002
#   make test    set up that and what the tests need, and run every test
# What each installs (scripts/setup.sh says it again as it runs):
#   make setup       (make serve's) no Debian packages; into $(VENV): the thin client
#                    (clients/, csm-tts-client) and the server (., csm-triton) at their exact
#                    pins, editable; the embedded tritonserver's backends assembled.
#   make setup-test  (make test's, and the load tools') that, plus Debian packages with
#                    apt-get (espeak-ng, sox, ffmpeg, chromium, docker-compose) and the dev
#                    extra (pytest, Locust, Playwright, the OpenAI client, the Helm SDK,
#                    matplotlib, the fine-tuning extra).
#   make setup-finetune  (make finetune's) make setup's, plus the fine-tuning extra.
# CSM_CHECKPOINT=<folder or hub id> serves real CSM-1B weights; without it a tiny
# random CSM is generated (its audio is noise, but every code path is the real one).
# CSM_ADMIN_TOKEN=<token> is the admin token voice writes need; without it make serve
# creates a development token in $(ADMIN_TOKEN_FILE) (mode 0600), which make locust,
# make gateway and csm-tts read when CSM_ADMIN_TOKEN is unset.

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
# Beside the voices: the runtime folder next to the repository (voice_dir runtime/voices).
ADMIN_TOKEN_FILE ?= $(patsubst %/,%,$(dir $(REPOSITORY)))/runtime/admin-token

.PHONY: setup setup-test setup-finetune serve test test-unit lint format repository tiny-checkpoint clean admin-token

setup:
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh serve

setup-test:
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh test

setup-finetune:
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh finetune

tiny-checkpoint: setup
	@test -f $(TINY_CHECKPOINT)/config.json || $(PY) -m export.tiny_checkpoint --out $(TINY_CHECKPOINT)

repository: setup $(if $(CSM_CHECKPOINT),,tiny-checkpoint)
	$(PY) -m export.build_repository --checkpoint $(CHECKPOINT) --profile $(PROFILE) --out $(REPOSITORY)

# On 127.0.0.1 only: LISTEN_ADDRESS=0.0.0.0 (or CSM_TRITON_LISTEN_ADDRESS) opens the ports.
# Loading/unloading models needs CSM_MODEL_CONTROL_KEY (header csm-model-control-key);
# unset, a random key per start keeps model control to the server's own supervisor.
LISTEN_ADDRESS ?=

serve: repository admin-token
	CSM_ADMIN_TOKEN="$${CSM_ADMIN_TOKEN:-$$(cat $(ADMIN_TOKEN_FILE))}" \
	$(PY) -m csm_triton.serving serve --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	  $(if $(LISTEN_ADDRESS),--listen-address $(LISTEN_ADDRESS))

# A development admin token, only when CSM_ADMIN_TOKEN is unset: created once (random,
# mode 0600, written under a temporary name then renamed), reused after. Deployments
# (compose, the Helm chart) never run this: they pass their own token or none.
admin-token:
	@if [ -n "$$CSM_ADMIN_TOKEN" ]; then \
	  echo "admin token: CSM_ADMIN_TOKEN from the environment"; \
	elif [ -s $(ADMIN_TOKEN_FILE) ]; then \
	  chmod 600 $(ADMIN_TOKEN_FILE) && echo "admin token (development): $(ADMIN_TOKEN_FILE)"; \
	else \
	  mkdir -p $(dir $(ADMIN_TOKEN_FILE)) && (umask 077 && \
	    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > $(ADMIN_TOKEN_FILE).$$$$ && echo >> $(ADMIN_TOKEN_FILE).$$$$ && \
	    mv -f $(ADMIN_TOKEN_FILE).$$$$ $(ADMIN_TOKEN_FILE)) && \
	  echo "admin token (development): created $(ADMIN_TOKEN_FILE) (make locust, make gateway and csm-tts read it)"; \
	fi

# The tests by layer (tests/<layer>/): unit (logic, no model, no server: under a minute),
# model (the engine and export against transformers/peft/torch references), deploy (the
# packages, image, chart and embedded server as shipped), integration and security (a
# real tritonserver), load (Locust and perf_analyzer smoke runs). make test runs them all.
test: setup-test lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Two workers that steal queued tests from each other (the slow ones do not pile up on one),
# each with one OpenMP thread (two workers of two torch threads each fought over 2 CPUs),
# without cloudcoil's plugin (the deploy tests' Kubernetes fixtures: seconds of imports).
test-unit: setup-test
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest tests/unit -q -n 2 --dist worksteal -p no:cloudcoil $(PYTEST_ARGS)

# ruff (ruff.toml): lint and format, checked; `make format` rewrites.
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(BUILD) .triton

# --- the REST gateway (README "Clients") -------------------------------------------------------
# The original system's API and page on :7860 (127.0.0.1 only), calling a running Triton
# (make serve) over gRPC; voice uploads carry CSM_ADMIN_TOKEN (else make serve's
# development token) and need one of the gateway's API keys, CSM_GATEWAY_API_KEYS=k1,k2
# (with keys set, speech needs one too). Its limits come from CSM_GATEWAY_* variables
# (python -m csm_servers.gateway --help lists them), e.g. CSM_GATEWAY_MAX_CONCURRENCY_PER_KEY=2.
GATEWAY_PORT ?= 7860
TRITON_GRPC_URL ?= localhost:$(GRPC_PORT)

.PHONY: gateway

gateway: setup
	CSM_ADMIN_TOKEN_FILE=$${CSM_ADMIN_TOKEN_FILE:-$(ADMIN_TOKEN_FILE)} \
	$(PY) -m csm_servers.gateway --triton-url $(TRITON_GRPC_URL) --port $(GATEWAY_PORT)

# --- load tests and benchmarks (loadtest/README.md) ----------------------------------------
# locust / locust-ui drive a running server (make serve): they register their stored
# voices with CSM_ADMIN_TOKEN, else make serve's development token ($(ADMIN_TOKEN_FILE)),
# and only on $(LOCUST_HOST). The UI has no login and starts load from its form: it listens
# on this machine only (an SSH tunnel reaches it from elsewhere).
# bench and perf start their own server on free ports from $(REPOSITORY) and write their
# results to $(RESULTS).
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

locust: setup-test
	@mkdir -p $(dir $(LOCUST_CSV))
	CSM_ADMIN_TOKEN_FILE=$${CSM_ADMIN_TOKEN_FILE:-$(ADMIN_TOKEN_FILE)} \
	CSM_LOCUST_MODEL=$${CSM_LOCUST_MODEL:-$(LOCUST_MODEL)} $(VENV)/bin/locust -f loadtest/locustfile.py \
	  --host $(LOCUST_HOST) --headless --users $(USERS) --spawn-rate $(USERS) --run-time $(DURATION) \
	  --stop-timeout 120 --csv $(LOCUST_CSV) --only-summary

locust-ui: setup-test
	CSM_ADMIN_TOKEN_FILE=$${CSM_ADMIN_TOKEN_FILE:-$(ADMIN_TOKEN_FILE)} \
	CSM_LOCUST_MODEL=$${CSM_LOCUST_MODEL:-$(LOCUST_MODEL)} $(VENV)/bin/locust -f loadtest/locustfile.py \
	  --host $(LOCUST_HOST) --web-host 127.0.0.1 --web-port $(LOCUST_WEB_PORT)

bench: setup-test repository
	$(PY) -m loadtest.bench --serve $(REPOSITORY) --out $(RESULTS) $(BENCH_ARGS)
	$(PY) -m loadtest.overhead --serve $(REPOSITORY) --out $(RESULTS)

perf: repository
	$(PY) -m loadtest.perf_analyzer.sweep --serve $(REPOSITORY) --out $(RESULTS) $(PERF_ARGS)

# --- soak (not in CI) -------------------------------------------------------------------------
# Mixed load for DURATION (make soak DURATION=10m) against a server started here; requests,
# failures and RSS growth per 1,000 requests per process into $(RESULTS)/soak_*.md.
.PHONY: soak
soak: repository
	$(PY) -m loadtest.soak --serve $(REPOSITORY) --duration $(DURATION) --out $(RESULTS)

# --- watermark decision (loadtest/results/watermark_eval.md) -----------------------------
# Builds a clean corpus (espeak-ng speech, tones, chords, chirps, noise colours, clicks,
# music-like synthesis, hiss, hum), marks the speech, scores everything under each
# transform (resampling, +-6 dB, noise at 20 dB SNR, MP3/Opus 64 kbit/s, trimming) with
# watermark_detect's rule; ~5 min on 2 cores. WATERMARK_EVAL_ARGS=--quick for a smoke run.
WATERMARK_EVAL_ARGS ?=

.PHONY: watermark-eval

watermark-eval: setup-test
	$(PY) -m loadtest.watermark_eval --out $(RESULTS) $(WATERMARK_EVAL_ARGS)

# --- the GPU proof (docs/performance.md "GPU check: one command") ---------------------------
# make gpu-check: every step on this machine's GPU into $(OUT) (summary.md beside the
# results, rewritten as each step finishes), most valuable first, in at most 300 s: half a
# 600 s device call, so a rerun fits (the plan's length is printed first).
# make gpu-check SMOKE=1: every step on the tiny model on the CPU, as CI runs it.
# make gpu-bundle: what the bare GPU machine lacks, packed into $(GPU_BUNDLE) (~47 MiB) to
# travel with the device run; GPU_CHECK_BUNDLE=$(GPU_BUNDLE) makes gpu-check install it first.
# No .venv on the GPU machine: there the script runs with its own python3 and torch.
OUT ?= $(BUILD)/gpu-check
SMOKE ?=
GPU_BUNDLE ?= $(BUILD)/gpu-bundle
GPU_CHECK_BUNDLE ?=
GPU_CHECK_ARGS ?=
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: gpu-check gpu-bundle

gpu-check:
	$(GPU_CHECK_PYTHON) -m loadtest.gpu_check --out $(OUT) $(if $(SMOKE),--smoke) \
	  $(if $(GPU_CHECK_BUNDLE),--bundle $(GPU_CHECK_BUNDLE)) $(GPU_CHECK_ARGS)

gpu-bundle: setup-test
	$(PY) -m loadtest.gpu_bundle --out $(GPU_BUNDLE)

# --- LoRA fine-tuning (docs/fine-tuning.md) ------------------------------------------------
# make finetune DATA=<folder | manifest.jsonl/.csv | datasets folder / parquet> OUT=<folder>
#   [CSM_CHECKPOINT=<folder>] [STEPS=500] [FINETUNE_ARGS="--context --lr 1e-4"]
# leaves OUT/adapter (peft), OUT/merged (a checkpoint: make repository CSM_CHECKPOINT=OUT/merged),
# OUT/metrics.jsonl and OUT/loss.png. The tiny random CSM when no checkpoint is named.
# OUT given on the command line wins; otherwise $(BUILD)/finetune (OUT's own default is gpu-check's).
DATA ?=
STEPS ?= 500
FINETUNE_ARGS ?=
FINETUNE_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),$(BUILD)/finetune)

.PHONY: finetune

finetune: setup-finetune $(if $(CSM_CHECKPOINT),,tiny-checkpoint)
	@test -n "$(DATA)" || { echo "make finetune needs DATA=<dataset> (docs/fine-tuning.md)"; exit 2; }
	$(PY) -m finetune.train --data $(DATA) --out $(FINETUNE_OUT) --checkpoint $(CHECKPOINT) \
	  --steps $(STEPS) --merge $(FINETUNE_ARGS)
