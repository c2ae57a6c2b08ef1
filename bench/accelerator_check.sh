#!/usr/bin/env bash
# The accelerator check: every figure a GPU (or TPU VM) session owes, in one run from a fresh clone,
# each benchmark writing its own file in bench/results/ with the device named in it.
#
# usage: bench/accelerator_check.sh [--dry-run] [--python PY] [--install cuda12|cuda13|tpu] [--model SPEC]
#   --python PY     the interpreter (default: .venv/bin/python if present, else python3); it needs this
#                   project's requirements and an accelerator jax
#   --install KIND  first pip-install jax for that accelerator and the project (-e .) into PY's environment
#                   (needs the package index; skip it on a machine that has them, e.g. a lent H200 image)
#   --model SPEC    the model every step uses (default: the embedded SmolLM2-135M-Instruct)
#   --dry-run       print each command, run nothing
#
# Steps (about 8 minutes on one H100/H200 with the embedded model):
#   1. the devices jax sees (fails when it sees no accelerator)
#   2. verify: logits against transformers in float32 and bfloat16
#   3. bench.refine_speed with its defaults (Jacobi refine vs the official loop, transformers generate, AR)
#   4. bench.train_speed (the train step vs a PyTorch CLLM-style step)
#   5. bench.score_speed (reward scoring vs transformers' sequence classifier)
#   6. bench.bf16_agreement (bf16 Jacobi vs bf16 AR and fp32 greedy, token agreement)
#   7. bench.refine_speed --mixed (refine's sorted-window scheduling vs input order, mixed lengths)
#   8. bench.pass_cost --profile (a W-token Jacobi pass against the AR step)
#   9. bench.decode_memory (the decode loops' temp and donated-state aliasing on the accelerator's compiler)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '/^# usage/,/^#$/p' "$0" | cut -c3- >&2; exit 2; }

dry_run=0
python=""
install=""
model=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --python) python="$2"; shift 2 ;;
    --install) install="$2"; shift 2 ;;
    --model) model=(--model "$2"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "accelerator_check: unknown argument '$1'" >&2; usage ;;
  esac
done
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
case "$install" in
  "") ;;
  cuda12|cuda13) jax_extra="jax[$install]" ;;
  tpu) jax_extra="jax[tpu]" ;;
  *) echo "accelerator_check: --install takes cuda12, cuda13 or tpu, got '$install'" >&2; exit 2 ;;
esac

# shellcheck source=launch/common.sh
source launch/common.sh

step() {
  echo "+ $(show_cmd "$@")"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

if [[ -n "$install" ]]; then
  step "$python" -m pip install -q -r requirements.txt -r requirements-test.txt "$jax_extra"
  step "$python" -m pip install -q --no-deps -e .
fi
step "$python" -c "import jax; d = jax.devices(); print(d); assert d[0].platform != 'cpu', 'no accelerator: jax sees only the CPU'"
step "$python" -m diffpo_jax.verify "${model[@]}" --dtype float32
step "$python" -m diffpo_jax.verify "${model[@]}" --dtype bfloat16
step "$python" -m bench.refine_speed "${model[@]}"
step "$python" -m bench.train_speed "${model[@]}"
step "$python" -m bench.score_speed "${model[@]}"
step "$python" -m bench.bf16_agreement "${model[@]}"
step "$python" -m bench.refine_speed "${model[@]}" --mixed
step "$python" -m bench.pass_cost "${model[@]}" --profile
step "$python" -m bench.decode_memory
echo "accelerator_check: done; each run's file in bench/results/ names the device"
