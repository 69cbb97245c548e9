#!/usr/bin/env bash
# The container's tritonserver launch. Its flags come from the same function as the
# embedded server's (`python -m csm_triton.embedded serve`): server_arguments, i.e. the
# shared flags of deploy/tritonserver.args plus the deployment's own. The arguments
# are those of `python -m csm_triton.embedded args` (see its --help), e.g.
#   serve.sh --model-repository /models/model_repository --model-control none --gpu
set -euo pipefail
flags="$(python3 -m csm_triton.embedded args "$@")"
mapfile -t argv <<<"$flags"
echo "\$ tritonserver ${argv[*]}" >&2
exec tritonserver "${argv[@]}"
