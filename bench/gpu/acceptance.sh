#!/usr/bin/env bash
# GPU acceptance in one command (docs/perf/gpu/README.md):
#
#   bench/gpu/acceptance.sh [--dry-run] [--out DIR] [--work DIR]
#
# On a bare H100/H200: makes sure JAX sees the GPU (installs jax[cuda13] or jax[cuda12] from
# PyPI as the driver allows, or wheels carried in .whl/, when none is there), prints the
# device and versions, then runs each step of bench/gpu/acceptance.py in its own process
# under its own `timeout` (budgets below, overridable as BUDGET_<STEP>=seconds), keeping each
# step's results in WORK/results.jsonl even when a later one fails, and writes the report
# OUT/<date>-<chip>.md and .json (OUT defaults to docs/perf/gpu). About 7-8 minutes.
#
# --dry-run: the same steps on CPU at toy sizes (Pallas interpreted), report in a temp dir.
# Exit status: 0 when every step finished and every check passed.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 2
dry=0 out="" work="${ACCEPTANCE_WORK:-}"
command_line="bench/gpu/acceptance.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --work) work=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "acceptance.sh: unknown argument '$1' (want --dry-run, --out DIR, --work DIR)" >&2
       exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

has_gpu_jax() {
  "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null
}

install() {
  if has_gpu_jax; then
    echo "== JAX already sees the GPU: nothing installed"
  elif ls .whl/*.whl >/dev/null 2>&1; then  # a machine without a registry: carried wheels
    echo "== installing the wheels in .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    # CUDA 13 wheels need driver >= 580, CUDA 12 >= 525 (JAX's installation guide).
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    extra=cuda12
    [ "${driver%%.*}" -ge 580 ] 2>/dev/null && extra=cuda13
    echo "== driver $driver: pip install -e . jax[$extra]"
    "$PY" -m pip install -q -e . "jax[$extra]" || return 1
  fi
  # hpllm's own needs for these steps (the rest of its dependencies are not imported here).
  "$PY" -c 'import optax, yaml' 2>/dev/null || "$PY" -m pip install -q optax pyyaml
}

if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
  out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/hpllm-acceptance.XXXXXX")}
  dry_flag=--dry-run
  budgets=(env=120 kernels=300 attention=300 train=300 decode=300)
else
  out=${out:-docs/perf/gpu}
  dry_flag=
  nvidia-smi || echo "nvidia-smi failed"
  install || { echo "install failed: no GPU JAX" >&2; exit 3; }
  has_gpu_jax || { echo "JAX does not see a GPU after the install" >&2; exit 3; }
  budgets=(env=45 kernels=75 attention=100 train=120 decode=140)
fi
work=${work:-$(mktemp -d "${TMPDIR:-/tmp}/hpllm-acceptance-work.XXXXXX")}
mkdir -p "$work" "$out"
echo "== versions: $("$PY" -c 'import sys, jax, jaxlib; print(sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())')"
echo "== results: $work/results.jsonl; report: $out"

for entry in "${budgets[@]}"; do
  step=${entry%%=*}
  var="BUDGET_${step^^}"
  budget=${!var:-${entry#*=}}
  echo "== step $step (budget ${budget}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$budget" "$PY" bench/gpu/acceptance.py --step "$step" \
    --work "$work" $dry_flag
  rc=$?
  echo "$step $rc $(( $(date +%s) - start )) $budget" >> "$work/steps.tsv"
  echo "== step $step: exit $rc after $(( $(date +%s) - start ))s"
done

"$PY" bench/gpu/report.py --work "$work" --out "$out" \
  --command "$command_line"
