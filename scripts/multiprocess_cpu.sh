#!/usr/bin/env bash
# Run one dflash-jax command as several local JAX processes on simulated CPU devices: a multi-host rehearsal on
# one machine (gloo CPU collectives, coordinator on 127.0.0.1), through the same environment variables a real
# multi-host launch sets (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; docs/multihost.md).
#
#   scripts/multiprocess_cpu.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- ARGS...
#
# ARGS are dflash-jax arguments, e.g.
#   scripts/multiprocess_cpu.sh -n 2 -d 2 -- train --config tiny --set 'mesh.shape=[2,2,1]' --run-dir /tmp/mp
# Each process logs to LOG_DIR/process<i>.log (default: a new temporary directory, printed). The exit status is
# the first non-zero one; when a process fails the others are stopped. PYTHON selects the interpreter
# (default: python).
set -euo pipefail

procs=2 devices=2 port="" logdir=""
while getopts "n:d:p:l:" opt; do
  case "$opt" in
    n) procs=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    l) logdir=$OPTARG ;;
    *) echo "usage: $0 [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
python=${PYTHON:-python}
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logdir=${logdir:-$(mktemp -d)}
mkdir -p "$logdir"
echo "multiprocess_cpu: $procs processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logdir" >&2

pids=()
for ((i = 0; i < procs; i++)); do
  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$procs" JAX_PROCESS_ID="$i" \
    "$python" -m dflash_jax.cli "$@" >"$logdir/process$i.log" 2>&1 &
  pids+=("$!")
done

status=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "multiprocess_cpu: a process exited with status $rc; stopping the others" >&2
      for other in "${pids[@]}"; do kill "$other" 2>/dev/null || true; done
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [ "${#running[@]}" -gt 0 ] && sleep 1
done
exit "$status"
