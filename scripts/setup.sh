#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent and quick the second time:
# a venv with the pinned packages, Debian packages, and the embedded tritonserver.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
# chromium: the gateway page's browser test (headless, Debian's build; never a downloaded browser).
# ffmpeg: the OpenAI API tests decode AAC and streamed FLAC with Debian's ffmpeg/ffprobe, a
# decoder independent of the FFmpeg build inside PyAV that wrote them.
APT_PACKAGES=(${APT_PACKAGES:-espeak-ng sox docker-compose chromium ffmpeg})

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
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.csm-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "installing the project and its pinned dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  "$VENV/bin/python" -m pip check
  touch "$STAMP"
fi

"$VENV/bin/python" -m csm_triton.serving prepare
