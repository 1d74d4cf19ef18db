#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU, in one run of under 8 minutes on one GPU:
#   1. the CUDA-marked tests (pytest -m cuda): runtime and service in fp16/bf16, a train step under
#      autocast (fp16 + GradScaler, bf16), DDP over NCCL on one GPU, torchrun on one GPU;
#   2. make bench BENCH_DEVICE=cuda BENCH_DTYPE=float16 BENCH_SHORT=1 (model, service and producer rows).
# Writes one summary file, $OUT/summary.md (default build/gpu-check/), with each step's status, time and
# log tail; exits non-zero if a step failed or ran out of time.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS]
#   --dry-run   no GPU needed: checks the set-up (pytest collects the CUDA tests, make knows the bench
#               target) and writes the summary with each step's command, running nothing on a GPU
set -uo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
OUT=build/gpu-check
DRY=0
BUDGET=470   # seconds for both steps; the rest of the 8 minutes is start-up and the summary
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a directory" >&2; exit 2; }; OUT=$2; shift ;;
    --budget) [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "error: --budget needs a number of seconds" >&2; exit 2; }; BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

VENV=${VENV:-.venv}
PY=${PY:-$VENV/bin/python}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
START=$SECONDS
FAILED=0
{
  echo "# gpu-check"
  echo
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $DRY = 1 ] && echo ' (dry run: nothing ran on a GPU)')"
  echo
  echo "| step | status | seconds | command |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# step NAME SHARE_OF_BUDGET_PERCENT COMMAND...: run with what is left of the budget (at most its share)
step() {
  local name=$1 share=$2; shift 2
  local left=$(( BUDGET - (SECONDS - START) )) limit=$(( BUDGET * share / 100 )) log="$OUT/$name.log" status t0=$SECONDS
  [ $limit -gt $left ] && limit=$left
  if [ $DRY = 1 ]; then
    status="dry-run"; echo "would run (limit ${limit}s): $*" > "$log"
  elif [ $limit -le 0 ]; then
    status="skipped: out of time"; FAILED=1; : > "$log"
  else
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    case $? in
      0) status="ok" ;;
      124|137) status="timed out after ${limit}s"; FAILED=1 ;;
      *) status="failed"; FAILED=1 ;;
    esac
  fi
  echo "| $name | $status | $(( SECONDS - t0 )) | \`$*\` |" >> "$SUMMARY"
  echo "[$name] $status"
}

if [ $DRY = 1 ]; then
  # what can be checked without a GPU: the CUDA tests collect, the bench target exists
  "$PY" -m pytest --collect-only -q -m cuda tests/test_cuda.py > "$OUT/collect.log" 2>&1 \
    && echo "| collect | ok: $(grep -c '::' "$OUT/collect.log") CUDA tests | 0 | \`pytest --collect-only -m cuda\` |" >> "$SUMMARY" \
    || { echo "| collect | failed | 0 | \`pytest --collect-only -m cuda\` |" >> "$SUMMARY"; FAILED=1; }
  make -n bench BENCH_DEVICE=cuda BENCH_DTYPE=float16 BENCH_SHORT=1 > "$OUT/make-n.log" 2>&1 \
    || { echo "| make -n bench | failed | 0 | |" >> "$SUMMARY"; FAILED=1; }
elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "| cuda | failed: torch sees no CUDA device (a CUDA build of torch? TORCH_SPEC in the Makefile) | 0 | |" >> "$SUMMARY"
  echo "error: no CUDA device visible to $PY" >&2
  cat "$SUMMARY"
  exit 1
fi

step cuda-tests 40 "$PY" -m pytest -q -m cuda -rs tests/test_cuda.py -p no:cacheprovider
step bench 60 make bench BENCH_DEVICE=cuda BENCH_DTYPE=float16 BENCH_SHORT=1 VENV="$VENV"

{
  echo
  echo "total $(( SECONDS - START )) s; $([ $FAILED = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
  for log in "$OUT"/cuda-tests.log "$OUT"/bench.log; do
    [ -s "$log" ] || continue
    echo; echo "## $(basename "$log") (last 25 lines)"; echo; echo '```'; tail -n 25 "$log"; echo '```'
  done
  [ -f bench-results/bench-producer.md ] && { echo; echo "## producer row"; echo; cat bench-results/bench-producer.md; }
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
