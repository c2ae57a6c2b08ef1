#!/usr/bin/env bash
# Run one diffpo-jax command as N cooperating processes on this machine, each over its own CPU
# devices, wired together by jax.distributed (diffpo_jax/distributed.py reads the DIFFPO_* variables).
# It is how the multi-process tests run, and a way to rehearse a multi-host job on one box.
#
# usage: launch/local_multiprocess.sh [--dry-run] [--port PORT] [--devices-per-process D] N -- COMMAND...
#   e.g. launch/local_multiprocess.sh 2 -- .venv/bin/python -m diffpo_jax.train --config configs/train/tiny.yaml
#
# Each process's output is prefixed with [pI]. When one process fails, the others are stopped and
# the script exits with that process's status.
set -euo pipefail

usage() { sed -n '/^# usage/,/^#$/p' "$0" | cut -c3- >&2; exit 2; }

dry_run=0
port=12355
devices=4
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --port) port="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && "$2" == "--" ]] || usage
n="$1"
shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "launch: N must be a positive integer, got '$n'" >&2; exit 2; }

env_for() {
  printf 'XLA_FLAGS=--xla_force_host_platform_device_count=%s JAX_PLATFORMS=cpu ' "$devices"
  printf 'DIFFPO_COORDINATOR=localhost:%s DIFFPO_NUM_PROCESSES=%s DIFFPO_PROCESS_ID=%s' "$port" "$n" "$1"
}

if [[ $dry_run -eq 1 ]]; then
  # shellcheck source=launch/common.sh
  source "$(dirname "$0")/common.sh"
  for ((i = 0; i < n; i++)); do
    echo "$(env_for "$i") $(show_cmd "$@")"
  done
  exit 0
fi

pids=()
for ((i = 0; i < n; i++)); do
  # shellcheck disable=SC2046  # env_for prints NAME=value words on purpose
  env $(env_for "$i") "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  code=0
  wait -n -p finished "${running[@]}" || code=$?
  left=()
  for pid in "${running[@]}"; do [[ "$pid" != "$finished" ]] && left+=("$pid"); done
  running=("${left[@]}")  # a reaped pid is no job of this shell any more: `wait` must not name it again
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    for ((i = 0; i < n; i++)); do [[ "${pids[$i]}" == "$finished" ]] && who=$i; done
    echo "launch: process ${who:-?} exited with status $code; stopping the others" >&2
    status=$code
    stop_all
  fi
done
exit "$status"
