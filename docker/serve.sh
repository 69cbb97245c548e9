#!/usr/bin/env bash
# The container's tritonserver launch. Its flags come from the same function as the
# embedded server's (`csm-triton-server serve`): server_arguments, i.e. the
# shared flags of src/csm_triton/serving/tritonserver.args plus the deployment's own. The arguments
# are those of `csm-triton-server args` (see its --help), e.g.
#   serve.sh --model-repository /models/model_repository --model-control none --gpu
set -euo pipefail
flags="$(csm-triton-server args "$@")"
mapfile -t argv <<<"$flags"
echo "\$ tritonserver ${argv[*]}" >&2
exec tritonserver "${argv[@]}"
