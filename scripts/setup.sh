#!/usr/bin/env bash
# What a fresh machine needs, idempotent and quick the second time. Two levels:
#
#   scripts/setup.sh [serve]   (make setup)       what serving needs and no more
#   scripts/setup.sh finetune  (make finetune)    that, plus the fine-tuning extra (peft, datasets...)
#   scripts/setup.sh test      (make setup-test)  that, plus what the tests and load tools need
#
# serve: no Debian packages (the python3.11/3.12 built with --enable-shared must be there
#   already); a venv with the two distributions, editable, at their exact pins: the thin
#   client (clients/pyproject.toml: csm_clients, csm-tts) and the server (pyproject.toml:
#   torch, transformers, ONNX, the embedded tritonserver, the gateway's FastAPI/uvicorn/PyAV);
#   then the embedded tritonserver's backends assembled (csm-triton-server prepare).
# test: also the Debian packages the tests use (below) and the `dev` extra (pytest, Locust,
#   Playwright, the OpenAI client, the Helm SDK, matplotlib, the fine-tuning extra).
#   .ci/run (make test) gets everything from here.
set -euo pipefail
cd "$(dirname "$0")/.."

LEVEL="${1:-serve}"
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
case "$LEVEL" in
  serve) EXTRAS="" ;;
  finetune) EXTRAS="[finetune]" ;;
  test) EXTRAS="[dev]" ;;
  *) echo "usage: $0 [serve|finetune|test]" >&2; exit 2 ;;
esac
# Only for `test`. espeak-ng, sox: the tests' speech and reference clips. chromium: the
# gateway page's browser test (headless, Debian's build; never a downloaded browser).
# ffmpeg: the OpenAI API tests decode AAC and streamed FLAC with Debian's ffmpeg/ffprobe, a
# decoder independent of the FFmpeg build inside PyAV that wrote them. docker-compose: the
# compose file validated by the deployment tests.
TEST_APT_PACKAGES=(${TEST_APT_PACKAGES:-espeak-ng sox docker-compose chromium ffmpeg})
APT_PACKAGES=()
[ "$LEVEL" = test ] && APT_PACKAGES=("${TEST_APT_PACKAGES[@]}")

echo "setup ($LEVEL): Debian packages: ${APT_PACKAGES[*]:-none}; Python packages into $VENV:" \
     "csm-tts-client (clients/) and csm-triton$EXTRAS (.), editable, exact pins; then the" \
     "embedded tritonserver's backends (csm-triton-server prepare)"

if ! command -v "$PYTHON" >/dev/null; then
  echo "error: $PYTHON not found; the embedded tritonserver stub needs CPython 3.11 or 3.12" >&2
  exit 1
fi
# The python backend's stub loads libpython3.X.so: a static interpreter cannot host it.
if ! "$PYTHON" -c 'import sys, sysconfig; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)'; then
  echo "error: $PYTHON was built without --enable-shared; tritonserver's python stub needs libpython" >&2
  exit 1
fi

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing Debian packages (apt-get): ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# One stamp per level: `make test` after `make serve` still installs the dev extra.
STAMP="$VENV/.csm-installed-$LEVEL"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ clients/pyproject.toml -nt "$STAMP" ]; then
  echo "installing csm-tts-client and csm-triton$EXTRAS with their pinned dependencies into $VENV"
  # One command: csm-triton depends on csm-tts-client, which is not on PyPI but here.
  "$VENV/bin/python" -m pip install -q -e ./clients -e ".$EXTRAS"
  # A venv from before the split had csm-tts in csm-triton's files: replacing that
  # install removes the script the client just installed.
  [ -x "$VENV/bin/csm-tts" ] || "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall -e ./clients
  "$VENV/bin/python" -m pip check
  touch "$STAMP"
fi

"$VENV/bin/python" -m csm_triton.serving prepare
