#!/usr/bin/env bash
# The GPU check (benchmarks/README.md, "GPU check"): <= 8 minutes on one GPU, nothing installed beyond `make venv`.
#   bash benchmarks/gpu_check.sh             stages 1-4 on a CUDA machine; numbers to gpu_check.json
#   bash benchmarks/gpu_check.sh --dry-run   on any machine: every command exists, the CUDA tests collect,
#                                            gpu_bench.py runs every measurement with tiny sizes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=.venv/bin/python
CUDA_TESTS=(tests/data/test_tasks_contract.py -k test_sampling_happens_on_the_generator_device)
OUT=${GPU_CHECK_JSON:-gpu_check.json}

stage() { echo; echo "=== stage $1: $2"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "gpu_check: error: '$1' not found; $2" >&2; exit 2; }; }

[ -x "$PY" ] || { echo "gpu_check: error: no .venv; run make venv first" >&2; exit 2; }
need timeout "coreutils' timeout is needed"
[ "$DRY" = 1 ] || need nvidia-smi "this is not a CUDA machine (use --dry-run to check the script)"
for exe in .venv/bin/toylens-train .venv/bin/toylens-analyze; do
  [ -x "$exe" ] || { echo "gpu_check: error: $exe missing; run make venv" >&2; exit 2; }
done

stage 1 "the GPU"
if [ "$DRY" = 1 ]; then echo "dry run: would run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv"
else timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi

stage 2 "CUDA-only tests"
if [ "$DRY" = 1 ]; then
  n=$(timeout 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${CUDA_TESTS[@]}" 2>/dev/null | grep -c "::" || true)
  [ "$n" -gt 0 ] || { echo "gpu_check: error: the CUDA test selection collects no test" >&2; exit 1; }
  echo "dry run: $n CUDA-only tests collected"
else timeout 60 "$PY" -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}"; fi

stage 3 "train and analyse on the device (toylens-train device=cuda, toylens-analyze device=cuda)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$DRY" = 1 ]; then echo "dry run: would run toylens-train experiment=no_pos_prev_token debug=fast device=cuda, then toylens-analyze device=cuda"
else
  run=$(timeout 60 .venv/bin/toylens-train experiment=no_pos_prev_token debug=fast device=cuda train.progress=false \
        "checkpoint_root=$tmp" | tail -n 1)
  timeout 90 .venv/bin/toylens-analyze "run=$run" device=cuda progress=false batch.size=500 reference.size=500
fi

stage 4 "speed and memory, one process (benchmarks/gpu_bench.py)"
if [ "$DRY" = 1 ]; then timeout 180 "$PY" benchmarks/gpu_bench.py --dry-run --json "${GPU_CHECK_JSON:-$tmp/dry.json}"
else timeout 240 "$PY" benchmarks/gpu_bench.py --json "$OUT"; fi
echo
echo "gpu_check: $([ "$DRY" = 1 ] && echo "dry run passed" || echo "done; numbers in $OUT")"
