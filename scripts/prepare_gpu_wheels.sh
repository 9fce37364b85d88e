#!/usr/bin/env bash
# Downloads, on a machine WITH internet, the wheels that scripts/gpu_bench.sh installs (--no-deps) on the offline
# GPU machine (Python 3.12, x86_64 manylinux) so that the PyTorch reference, nvidia-modelopt 0.47.0, imports there.
# Everything else the reference needs (torch 2.11.0, transformers 5.17.0, numpy, PyYAML, typing-extensions, ...)
# is preinstalled on that machine. The wheels land in the git-ignored ./wheels folder (never commit a wheel);
# pass it to the device run with carry ["wheels"].
#
#   bash scripts/prepare_gpu_wheels.sh            # idempotent; re-downloads nothing that is already there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=wheels
mkdir -p "$DEST"
git check-ignore -q "$DEST/x.whl" || { echo "error: $DEST/ must be git-ignored (.gitignore)" >&2; exit 1; }

# Pinned set (the issue's list), at the versions the CPU parity venv runs the reference with. pydantic-core is the
# exact version pydantic 2.14.4 requires; omegaconf 2.4 no longer needs antlr4 (kept: the issue lists it).
PKGS=(
  "nvidia-modelopt==0.47.0"
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "omegaconf==2.4.0"
  "antlr4-python3-runtime==4.13.2"
  "pulp==3.3.2"
)
# --no-deps: only these packages (their other requirements are preinstalled on the GPU machine).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -q -d "$DEST" "${PKGS[@]}"
echo "wheels in $DEST/:"
ls -1 "$DEST"
for p in nvidia_modelopt-0.47.0 pydantic-2.14.4 pydantic_core-2.50.5-cp312 annotated_types-0.8.0 \
         typing_inspection-0.4.5 omegaconf-2.4.0 antlr4_python3_runtime-4.13.2 pulp-3.3.2; do
  ls "$DEST"/"$p"*.whl >/dev/null 2>&1 || { echo "error: no wheel for $p in $DEST/" >&2; exit 1; }
done
echo "ok: $(ls "$DEST"/*.whl | wc -l) wheels for cp312 manylinux x86_64"
