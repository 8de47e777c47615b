#!/usr/bin/env bash
# The one script for a lent GPU session (the `device` tool: one command of at most 10 minutes,
# 15 minutes of device time per task, a fresh bare machine, at most 8 files under $OUT come
# back, at most two folders down). Nothing heavy is installed: the GPU image already has torch,
# triton, transformers, peft, pytest, matplotlib and tqdm; only this package goes in, editable
# and without dependencies.
#
#   bash bench/gpu_session.sh            # all: the GPU tests, the bench grid, the targets table
#   bash bench/gpu_session.sh tests      # the GPU tests alone (more time for them)
#   bash bench/gpu_session.sh bench      # the bench grid and the targets table alone
#   DRY_RUN=1 bash bench/gpu_session.sh  # on a CPU: the same steps and files, tiny (~1 min)
#
# With 15 minutes of device time per task: one call, `all`, timeout_s=600. Correctness comes
# first: the GPU-only tests (`pytest -m gpu`: decode, attention terms, TMA, the autotuner, a
# bf16 train step against the reference, CUDA graphs, host syncs, determinism), then the timed
# grid, then the targets table. Every step runs under `timeout -s INT` with its own limit
# (capped by what is left of BUDGET_S, RESERVE_S kept for the last steps): an interrupted
# pytest still prints and writes what ran, an interrupted bench keeps the cases it measured.
# Every file is written under $OUT as soon as its step ends (8 at most, all of them here):
#   session.log    machine, versions, install, each step's command, limit, exit and time
#   tests.log      the GPU tests' output          tests.xml   the same as JUnit XML
#   bench.log      both bench halves, the layer-call costs, the merges
#   results.json   the bench records, merged again after each half; results.md their tables
#   plots.tar      one PNG per op                 targets.md  the targets table
# Env: OUT (default /tmp/ptuning_fast_out), BUDGET_S (default 570), RESERVE_S (default 40),
# BENCH_ARGS (e.g. --quick), PY (default python3), DRY_RUN=1 (CPU: no install, the GPU tests
# collected and skipped, the bench at --quick on a few small ops).
set -uo pipefail

STAGE=${1:-all}
OUT=${OUT:-/tmp/ptuning_fast_out}
BUDGET_S=${BUDGET_S:-570}
RESERVE_S=${RESERVE_S:-40}
BENCH_ARGS=${BENCH_ARGS:-}
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
SESSION_LOG="$OUT/session.log"
WORK=$(mktemp -d)
FAILED=()                            # steps that exited non-zero (the session's exit status)

# What the bench runs: the model half (decode first, with its copy yardstick, then prompt
# embedding, the training steps and generation) and the attention grid, whose FlexAttention
# cases come last so that a time limit cuts those first. A dry run: a few small ops at --quick.
if [[ $DRY_RUN == 1 ]]; then
  MODEL_OPS=decode,prompt_embedding
  ATTENTION_ARGS=(--ops prefix_attention --providers fused,torch)
  BENCH_ARGS="--quick $BENCH_ARGS"
  LAYER_DEVICE=cpu
  TEST_WORKERS=0                    # pytest-xdist in-process: its options, no worker to start
else
  MODEL_OPS=train_step,generate,prompt_embedding,decode
  ATTENTION_ARGS=(--ops prefix_attention)
  LAYER_DEVICE=cuda
  # pytest-xdist workers (in the GPU image): each compiles its own kernels, in parallel on the
  # machine's 16 cores, where one process would spend most of the step in Triton's compiler.
  TEST_WORKERS=8
fi

# say LOG LINE: LINE on stdout, in session.log and in LOG.
say() {
  if [[ $1 == "$SESSION_LOG" ]]; then echo "$2" | tee -a "$1"; else echo "$2" | tee -a "$SESSION_LOG" "$1"; fi
}

# step NAME CAP_S LOG CMD...: CMD, its output appended to LOG, under a limit of
# min(CAP_S, seconds left in the budget - RESERVE_S); its header and exit also in session.log.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit=$((BUDGET_S - SECONDS - RESERVE_S))
  ((limit > cap)) && limit=$cap
  if ((limit < 10)); then
    say "$log" "== $name: not run, only ${limit}s of the budget left"
    FAILED+=("$name (not run)")
    return 1
  fi
  say "$log" "== $name (limit ${limit}s): $*"
  timeout -s INT -k 20 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  say "$log" "== $name: exit $rc ($SECONDS s into the session)"
  ((rc == 0)) || FAILED+=("$name (exit $rc)")
  return $rc
}

install() {
  {
    echo "== machine (dry run: $DRY_RUN)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    else
      echo "nvidia-smi: not found"
    fi
    $PY - <<'PYEOF'
import importlib, sys
import torch
print("python", sys.version.split()[0],
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for name in ("torch", "triton", "transformers", "peft", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed" + (" (its provider reports itself skipped)"
                                       if name == "flash_attn" else ""))
PYEOF
  } >>"$SESSION_LOG" 2>&1
  if [[ $DRY_RUN == 1 ]]; then       # the package is installed here already: only prove it imports
    step install 60 "$SESSION_LOG" $PY -c "import ptuning_fast.kernels, ptuning_fast.benchmarks"
    return
  fi
  # No build isolation: the machine reaches no package index, and its setuptools builds this.
  step install 120 "$SESSION_LOG" $PY -m pip install --no-deps --no-build-isolation -e . &&
    return 0
  # If the image's setuptools cannot build it, a copy of the package with kernels/ placed where
  # the install would map it (the repo root stays off sys.path: its kernels/ is no package).
  local src=/tmp/ptuning_fast_src
  rm -rf "$src" && mkdir -p "$src" && cp -r ptuning_fast "$src/" && rm -rf "$src/ptuning_fast/kernels" &&
    cp -r kernels "$src/ptuning_fast/kernels" || { echo "install failed, see $SESSION_LOG"; return 1; }
  export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
  echo "== install: pip failed; using a copy of the package on PYTHONPATH ($src)" | tee -a "$SESSION_LOG"
  $PY -c "import ptuning_fast.kernels, ptuning_fast.benchmarks" >>"$SESSION_LOG" 2>&1 ||
    { echo "install failed, see $SESSION_LOG"; tail -n 20 "$SESSION_LOG"; return 1; }
  unset 'FAILED[-1]'                 # the copy works: pip's failure is not the session's
}

# The GPU image's transformers / triton are older than this machine's: a test module that fails
# to import there must not stop the others (--continue-on-collection-errors).
gpu_tests() {
  local cap=$1
  step tests "$cap" "$OUT/tests.log" $PY -m pytest tests -m gpu -q -ra -p no:cacheprovider \
    -n "$TEST_WORKERS" --durations=15 --junitxml="$OUT/tests.xml" --continue-on-collection-errors
  echo "== tests summary" | tee -a "$SESSION_LOG"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?)" "$OUT/tests.log" | tail -n 40 |
    tee -a "$SESSION_LOG"
}

# merge WHAT: the bench halves written so far -> $OUT/results.{json,md} and plots.tar.
merge() {
  local parts=()
  for f in "$WORK/models.json" "$WORK/attention.json"; do [[ -f $f ]] && parts+=("$f"); done
  if ((${#parts[@]} == 0)); then
    echo "== merge $1: no bench results yet, see bench.log" | tee -a "$SESSION_LOG"
    return 1
  fi
  rm -f "$OUT"/results*.png
  step "merge $1" 60 "$OUT/bench.log" $PY -m ptuning_fast.cli bench --from-json "${parts[@]}" \
    --out "$OUT/results.json" || return 1
  (cd "$OUT" && if ls ./*.png >/dev/null 2>&1; then tar -cf plots.tar ./*.png && rm -f ./*.png; fi)
}

bench() {
  local models_cap=$1 attention_cap=$2 log="$OUT/bench.log"
  # shellcheck disable=SC2086
  step bench-models "$models_cap" "$log" $PY -m ptuning_fast.cli bench $BENCH_ARGS \
    --ops "$MODEL_OPS" --out "$WORK/models.json"
  merge models
  # The host's cost of one decoding step's attention call, ours vs transformers' (a few s).
  step layer-call 40 "$log" $PY bench/layer_call_cost.py "$LAYER_DEVICE"
  # shellcheck disable=SC2086
  step bench-attention "$attention_cap" "$log" $PY -m ptuning_fast.cli bench $BENCH_ARGS \
    "${ATTENTION_ARGS[@]}" --out "$WORK/attention.json"
  RESERVE_S=0                        # the last steps run in the time kept for them
  merge all
  if [[ -f $OUT/results.json ]]; then
    step targets 30 "$OUT/session.log" sh -c "$PY bench/targets_table.py '$OUT/results.json' \
      > '$OUT/targets.md'"
  fi
  echo "== bench summary (full table: results.md)"
  grep -E "^(skipped|interrupted|[0-9]+ case)" "$log" | sort | uniq | tail -n 20
  [[ -f $OUT/targets.md ]] && cat "$OUT/targets.md"
}

case "$STAGE" in
  all) install && { gpu_tests 150; bench 140 170; } ;;
  tests) install && gpu_tests 450 ;;
  bench) install && bench 200 250 ;;
  *)
    echo "usage: [DRY_RUN=1] bash bench/gpu_session.sh [all|tests|bench]" >&2
    exit 2
    ;;
esac
rm -rf "$WORK"
echo "== files under $OUT ($SECONDS s):"
ls -l "$OUT"
if ((${#FAILED[@]})); then
  echo "== steps that failed: ${FAILED[*]}" | tee -a "$SESSION_LOG"
  exit 1
fi
echo "== every step passed" | tee -a "$SESSION_LOG"
