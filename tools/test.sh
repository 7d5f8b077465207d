#!/usr/bin/env bash
# Set up a virtualenv (.venv) and run every test: nbdev's processing of the notebooks for the docs
# (nbdev-proc-nbs, into _proc/), the notebooks (nbdev-test) and the pytest suite.
# CUDA tests skip without a GPU. Extra arguments go to pytest (-n 0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
export IPYTHONDIR="$PWD/.cache/ipython" MPLCONFIGDIR="$PWD/.cache/mpl"   # nothing lands in $HOME
mkdir -p "$IPYTHONDIR" "$MPLCONFIGDIR"
.venv/bin/nbdev-proc-nbs                # the docs build's first step: it must run clean (Quarto renders _proc/ where installed)
.venv/bin/nbdev-test
.venv/bin/python -m pytest -q -n 2 "$@"          # both cores (pytest-xdist), one torch thread each
