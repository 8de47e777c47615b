#!/usr/bin/env bash
# The one script for a lent GPU session (the `device` tool: 10 minutes per command, 30 minutes of
# device time per session, a fresh bare machine per lease, files under $OUT come back: at most 8,
# at most two folders down). Nothing heavy is installed: the GPU image already has torch, triton,
# transformers, peft, pytest(-benchmark), matplotlib and tqdm; only this package goes in, editable
# and without dependencies.
#
#   bash bench/gpu_session.sh check   # install, the test suite, `ptuning-fast verify`   (~3-5 min)
#   bash bench/gpu_session.sh bench   # install, the full `ptuning-fast bench`            (< 9.5 min)
#   bash bench/gpu_session.sh all     # both in one command, every step cut to fit 9.5 minutes
#
# With the present 15 minutes of device time per task: one call, `all` (timeout_s=600). With
# more, two calls, `check` then `bench` (timeout_s=600 each). Every step runs under
# `timeout -s INT`: an interrupted bench still writes the cases it measured (the rest are recorded
# as not run). Comes back under $OUT (4 files at most):
#   check.log            install, nvidia-smi, versions, pytest, verify
#   bench.log            install, versions, both bench runs, the layer-call costs, the merge
#   results.json / .md   the merged results and their markdown table
#   plots.tar            one PNG per op (re-creatable here with `ptuning-fast bench --from-json`)
# Env: OUT (default /tmp/ptuning_fast_out), BUDGET_S (default 570), BENCH_ARGS (e.g. --quick).
set -uo pipefail

STAGE=${1:-all}
OUT=${OUT:-/tmp/ptuning_fast_out}
BUDGET_S=${BUDGET_S:-570}
BENCH_ARGS=${BENCH_ARGS:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1

# step NAME CAP_S LOG CMD...: CMD under a limit of min(CAP_S, seconds left in the budget - 15).
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit=$((BUDGET_S - SECONDS - 15))
  ((limit > cap)) && limit=$cap
  if ((limit < 20)); then
    echo "== $name: not run, only ${limit}s of the budget left" | tee -a "$log"
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout -s INT -k 20 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc ($SECONDS s into the session)" | tee -a "$log"
  return $rc
}

install() {
  local log=$1
  {
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())"
    $PY -c "import peft; print('peft', peft.__version__)"
    $PY -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null ||
      echo "flash_attn: not installed (its provider reports itself skipped)"
  } >>"$log" 2>&1
  # No build isolation: the machine reaches no package index, and its setuptools builds this.
  step install 120 "$log" $PY -m pip install --no-deps --no-build-isolation -e . && return 0
  # If the image's setuptools cannot build it (no index to fetch a newer one), fall back to a
  # copy of the package with kernels/ placed where the install would map it.
  local src=/tmp/ptuning_fast_src
  rm -rf "$src" && mkdir -p "$src" && cp -r ptuning_fast "$src/" && rm -rf "$src/ptuning_fast/kernels" &&
    cp -r kernels "$src/ptuning_fast/kernels" || { echo "install failed, see $log"; return 1; }
  export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
  echo "== install: pip failed; using a copy of the package on PYTHONPATH ($src)" | tee -a "$log"
  $PY -c "import ptuning_fast.kernels, ptuning_fast.benchmarks" >>"$log" 2>&1 ||
    { echo "install failed, see $log"; tail -n 20 "$log"; return 1; }
}

check() {
  local log="$OUT/check.log" tests_cap=$1 verify_cap=$2
  install "$log" || return 1
  step tests "$tests_cap" "$log" $PY -m pytest tests -q -ra -p no:cacheprovider
  step verify "$verify_cap" "$log" $PY -m ptuning_fast.cli verify
  echo "== check summary"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|errors?)" "$log" | tail -n 15
  tail -n 15 "$log"
}

bench() {
  local log="$OUT/bench.log" kernels_cap=$1 models_cap=$2 work
  work=$(mktemp -d)
  install "$log" || return 1
  # The PEFT comparison and the memory-bound ops first (they are few), then the attention grid,
  # whose FlexAttention cases come last so a time limit cuts those first.
  # shellcheck disable=SC2086
  step bench-models "$models_cap" "$log" $PY -m ptuning_fast.cli bench $BENCH_ARGS \
    --ops train_step,generate,prompt_embedding,decode --out "$work/models.json"
  # The host's cost of one decoding step's attention call, ours vs transformers' (a few s).
  step layer-call 40 "$log" env PYTHONPATH="$PWD" $PY bench/layer_call_cost.py cuda
  # shellcheck disable=SC2086
  step bench-attention "$kernels_cap" "$log" $PY -m ptuning_fast.cli bench $BENCH_ARGS \
    --ops prefix_attention --out "$work/attention.json"
  local parts=()
  for f in "$work/models.json" "$work/attention.json"; do [[ -f $f ]] && parts+=("$f"); done
  if ((${#parts[@]} == 0)); then
    echo "no results were written, see $log"
    tail -n 30 "$log"
    return 1
  fi
  $PY -m ptuning_fast.cli bench --from-json "${parts[@]}" --out "$OUT/results.json" >>"$log" 2>&1
  (cd "$OUT" && ls ./*.png >/dev/null 2>&1 && tar -cf plots.tar ./*.png && rm -f ./*.png)
  echo "== bench summary (full table: results.md)"
  grep -E "^(skipped|interrupted|[0-9]+ case)" "$log" | sort | uniq | tail -n 20
  grep -A 4 "^| batch | ours" "$log"
  cat "$OUT/results.md" | head -c 6000
}

case "$STAGE" in
  check) check 330 150 ;;
  bench) bench 330 200 ;;
  all) check 120 45 && bench 200 180 ;;
  *)
    echo "usage: bash bench/gpu_session.sh {check|bench|all}" >&2
    exit 2
    ;;
esac
