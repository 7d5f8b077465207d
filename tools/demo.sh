#!/usr/bin/env bash
# Set up a virtualenv (.venv) and run the demo: `fastai-mix demo` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[demo]"
export MPLCONFIGDIR="$PWD/.cache/mpl"
mkdir -p "$MPLCONFIGDIR"
.venv/bin/fastai-mix demo "$@"
