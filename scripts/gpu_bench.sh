#!/usr/bin/env bash
# Issue 8 on one H100/H200 without internet: dflash_jax vs nvidia-modelopt 0.47.0, same shapes, same GPU, one run.
#
#   bash scripts/prepare_gpu_wheels.sh     # once, with internet: the reference's wheels into git-ignored wheels/
#   bash scripts/gpu_bench.sh              # on the GPU machine (wheels/ carried along); about 5-8 minutes
#   bash scripts/gpu_bench.sh --dry-run    # CPU smoke test: the same code path at the CI-sized "tiny" shape
#
# Each (system, config) runs in its own process, one after the other: jax (no preallocation) exits before torch
# starts. Records go to $GPU_BENCH_OUT (default runs/gpu_bench/, git-ignored); the report is printed last and saved
# as report.txt beside them. A jax process that fails (e.g. out of memory) is retried once with --remat.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
CONFIGS="qwen3-1.7b qwen3-8b"
if [ "${1:-}" = "--dry-run" ]; then
  CONFIGS="tiny"
  export JAX_PLATFORMS=cpu
fi
OUT=${GPU_BENCH_OUT:-runs/gpu_bench}
T_JAX=${GPU_BENCH_TIMEOUT_JAX:-150}   # seconds per jax process (compile + 13 steps + loss programs)
T_REF=${GPU_BENCH_TIMEOUT_REF:-100}   # seconds per reference process
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.json

# Our package from the work tree (no install needed); the reference's wheels into a private folder (--no-deps).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import modelopt.torch.speculative" >/dev/null 2>&1; then
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "error: nvidia-modelopt is not importable and wheels/ is empty: run scripts/prepare_gpu_wheels.sh" >&2
    exit 1
  fi
  "$PY" -m pip install -q --upgrade --no-deps --no-index --target "$OUT/site" wheels/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # jax takes memory on demand; torch runs after it exits anyway
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"   # a --remat retry or a rerun on a warm machine reuses it
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export TOKENIZERS_PARALLELISM=false

echo "# gpu_bench $(date -u '+%Y-%m-%d %H:%M UTC') host=$(hostname) configs=[$CONFIGS]"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import importlib.metadata as md, platform
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "torch", "transformers", "nvidia-modelopt"]
def ver(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("# python", platform.python_version(), " ".join(f"{n}={ver(n)}" for n in names))
EOF

status=0
for c in $CONFIGS; do
  echo "## $c: jax"
  if ! timeout "$T_JAX" "$PY" scripts/gpu_bench.py --system jax --config "$c" --out "$OUT/$c.jax.json"; then
    echo "## $c: jax failed or timed out; retrying once with --remat"
    timeout "$T_JAX" "$PY" scripts/gpu_bench.py --system jax --config "$c" --out "$OUT/$c.jax.json" --remat \
      || status=1
  fi
  echo "## $c: jax, train.attention=dense (beside auto)"
  timeout "$T_JAX" "$PY" scripts/gpu_bench.py --system jax --config "$c" --out "$OUT/$c.jax-dense.json" \
    --attention dense || echo "## $c: jax dense failed or timed out (no jax[dense] line in the report)"
  echo "## $c: reference"
  timeout "$T_REF" "$PY" scripts/gpu_bench.py --system reference --config "$c" --out "$OUT/$c.reference.json" \
    || status=1
done
echo "## report"
"$PY" scripts/gpu_bench.py --report "$OUT" | tee "$OUT/report.txt" || status=1
exit $status
