#!/usr/bin/env bash
# The container's tritonserver launch: `csm-triton-server run`, which starts the image's
# tritonserver (the one on PATH) with the flags `csm-triton-server args` prints for the
# same arguments: server_arguments, i.e. the shared flags of
# src/csm_triton/serving/tritonserver.args plus the deployment's own. The arguments are
# those of `csm-triton-server args` (see its --help), e.g.
#   serve.sh --model-repository /models/model_repository --model-control none --gpu
#
# Not `exec tritonserver`: on SIGTERM (docker stop, compose, a Kubernetes rollout) `run`
# stops the server as `csm-triton-server serve` does (csm_triton.serving.foreground): it
# creates the stop file the python stubs watch (no new stream; open streams end with a
# final response); forwards SIGTERM once no stub has open work (at most 5 s: Triton 2.51
# unloads models whose streams still send, and crashed); kills tritonserver and its stubs,
# with a log line, if still running --exit-timeout + 5 + 5 s after the signal (40 s with
# the image's 30: inside compose's 60 s and the chart's 120 s grace); exits 0 after a
# clean stop. It restarts nothing: the container's restart policy does.
#
# Listening: 127.0.0.1, the container's own loopback, unless CSM_TRITON_LISTEN_ADDRESS
# opens it (compose and the chart set 0.0.0.0 for the gateway and the kubelet's probes
# to reach it; a one-line warning is printed then).
# Model control (load/unload/index, shared memory, logging, trace): only with the key in
# CSM_MODEL_CONTROL_KEY, sent as the `csm-model-control-key` header; unset or empty,
# each start makes a random key that nobody learns: model control is refused to
# everyone (nothing in the container needs it: its repository is static). The logged
# command line shows the key as <hidden>.
set -euo pipefail
exec csm-triton-server run "$@"
