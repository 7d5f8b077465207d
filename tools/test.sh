#!/usr/bin/env bash
# Set up a virtualenv (.venv) and run every test: nbdev's processing of the notebooks for the docs
# (nbdev-proc-nbs, into _proc/), the notebooks (nbdev-test) and the pytest suite.
# CUDA tests skip without a GPU. Extra arguments go to pytest (-n 0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
t=$SECONDS; took() { echo "[tools/test.sh] $1: $(( SECONDS - t )) s"; t=$SECONDS; }   # each step's time, for CI's budget
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
took 'virtualenv and pip install'
export IPYTHONDIR="$PWD/.cache/ipython" MPLCONFIGDIR="$PWD/.cache/mpl"   # nothing lands in $HOME
mkdir -p "$IPYTHONDIR" "$MPLCONFIGDIR"
# The notebooks' fits are a few small batches in memory, and fastai's loaders start `defaults.cpus` worker processes
# at every epoch: starting them took most of the time. nbdev-proc-nbs runs in this one process (--n-workers 0: its
# workers are spawned, and the loaders' inside them were spawned too, each importing torch again: minutes, not
# seconds); nbdev-test forks its workers from a process where fastai's loaders load in-process (defaults.cpus = 0,
# as tests/conftest.py sets it for the suite; the forked workers inherit it).
.venv/bin/nbdev-proc-nbs --n-workers 0  # the docs build's first step: it must run clean (Quarto renders _proc/ where installed)
took nbdev-proc-nbs
.venv/bin/python -c 'from fastai.torch_core import defaults; defaults.cpus = 0; from nbdev.test import nbdev_test; nbdev_test.__wrapped__()'
took nbdev-test
.venv/bin/python -m pytest -q -n 2 "$@"   # both cores (pytest-xdist), one torch thread each; tests marked slow start first (tests/conftest.py)
took pytest
