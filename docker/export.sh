#!/usr/bin/env bash
# The compose export job: `python -m export.build_repository "$@"`, with HF_TOKEN read
# from the compose secret (a file, so the token never shows in `docker inspect` or the
# process list). An empty secret is fine for a local checkpoint folder.
set -euo pipefail
secret="${HF_TOKEN_FILE:-/run/secrets/hf_token}"
if [ -z "${HF_TOKEN:-}" ] && [ -s "$secret" ]; then
  HF_TOKEN="$(tr -d '[:space:]' <"$secret")"
  export HF_TOKEN
fi
exec python3 -m export.build_repository "$@"
