#!/usr/bin/env bash
# The container's tritonserver launch. Its flags come from the same function as the
# embedded server's (`csm-triton-server serve`): server_arguments, i.e. the
# shared flags of src/csm_triton/serving/tritonserver.args plus the deployment's own. The arguments
# are those of `csm-triton-server args` (see its --help), e.g.
#   serve.sh --model-repository /models/model_repository --model-control none --gpu
#
# Listening: 127.0.0.1, the container's own loopback, unless CSM_TRITON_LISTEN_ADDRESS
# opens it (compose and the chart set 0.0.0.0 for the gateway and the kubelet's probes
# to reach it; `args` then prints a one-line warning).
# Model control (load/unload/index, shared memory, logging, trace): only with the key in
# CSM_MODEL_CONTROL_KEY, sent as the `csm-model-control-key` header; unset or empty,
# `args` makes a random key per start that nobody learns: model control is refused to
# everyone (nothing in the container needs it: its repository is static).
set -euo pipefail
flags="$(csm-triton-server args "$@")"
mapfile -t argv <<<"$flags"
# The flags hold the key: the log line shows them with it hidden.
shown="$(printf '%s\n' "${argv[@]}" | sed -E 's/^(--(http-restricted-api|grpc-restricted-protocol)=[^=]*=).*/\1<hidden>/')"
echo "\$ tritonserver ${shown//$'\n'/ }" >&2
exec tritonserver "${argv[@]}"
