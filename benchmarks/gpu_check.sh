#!/usr/bin/env bash
# The GPU check: on a CUDA machine, every GPU test and the kernel, step and sampler benchmarks,
# in under 8 minutes, with their figures, versions and hardware written to
# benchmarks/results/gpu_<date>/ (report.md holds everything; one .txt log per step).
#
#   bash benchmarks/gpu_check.sh              # from the repository root, project installed
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Without a CUDA GPU it prints one line and exits 2. Each step has its own time limit
# (`timeout`), cut to what is left of a 470 s budget for the whole check (a step with under
# 10 s left is skipped), so the script ends within 8 minutes. A step that fails, times out or is
# skipped is recorded, the others still run, and the script exits 1 at the end if any did.
# Steps and limits (seconds):
#   gpu-tests       180  pytest -m gpu (every test marked for a GPU)
#   kernel-tests     90  tests/diffusion/test_kernels_*.py natively on CUDA (Triton if installed)
#   bench-ce         60  bench_kernels_ce.py --device cuda (fused CE vs F.cross_entropy, bf16)
#   bench-sampler    60  bench_kernels_sampler.py --device cuda (fused/compiled sampler step)
#   bench-step       45  bench_memdlm_step.py (MemDLM vs standard step; runs on the CPU: the
#                        script has no --device option, so its ratio is the host CPU's)
#   bench-diffusion  90  bench_diffusion_sampler.py (sampler overhead; CPU-only script, likewise;
#                        93 s on the shared 2-core development machine)
set -euo pipefail

export OMP_NUM_THREADS=1
export MKL_NUM_THREADS=1
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v nvidia-smi >/dev/null 2>&1 \
  || ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi missing or torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi

DEADLINE=$(($(date +%s) + 470))
OUT="benchmarks/results/gpu_$(date -u +%Y-%m-%d_%H%M%S)"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FAILED=()

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '## Hardware and versions'
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi | head -n 4 | tail -n 2
  "$PYTHON" - <<'EOF'
import platform

import torch

print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
  echo "CPU: $(nproc) cores; OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo '```'
} >"$REPORT"

# step NAME LIMIT_SECONDS COMMAND...: run it under `timeout`, keep its output in $OUT/NAME.txt
# and in the report; a failure is recorded, not fatal.
step() {
  local name="$1" limit="$2"
  shift 2
  local log="$OUT/$name.txt" start rc=0
  start=$(date +%s)
  local left=$((DEADLINE - start))
  if [ "$left" -lt 10 ]; then
    FAILED+=("$name: SKIPPED (the 470 s budget is spent)")
    echo "gpu_check: $name: SKIPPED (the 470 s budget is spent)"
    printf '\n## %s: SKIPPED (the 470 s budget is spent)\n' "$name" >>"$REPORT"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit="$left"
  echo "gpu_check: $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  local took=$(($(date +%s) - start))
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMED OUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = "ok" ] || FAILED+=("$name: $status")
  echo "gpu_check: $name: $status in ${took}s"
  {
    echo
    echo "## $name: $status (${took}s)"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    tail -n 80 "$log"
    echo '```'
  } >>"$REPORT"
}

step gpu-tests 180 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
step kernel-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/diffusion/test_kernels_dispatch.py \
  tests/diffusion/test_kernels_linear_ce.py tests/diffusion/test_kernels_sampler.py
step bench-ce 60 "$PYTHON" benchmarks/bench_kernels_ce.py --device cuda --repeats 5 \
  --json "$OUT/bench_kernels_ce.json"
step bench-sampler 60 "$PYTHON" benchmarks/bench_kernels_sampler.py --device cuda --repeats 3
step bench-step 45 "$PYTHON" benchmarks/bench_memdlm_step.py --repeats 5
step bench-diffusion 90 "$PYTHON" benchmarks/bench_diffusion_sampler.py

{
  echo
  echo '## Summary'
  echo
  if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "Every step passed."
  else
    printf -- '- %s\n' "${FAILED[@]}"
  fi
} >>"$REPORT"

echo "gpu_check: report in $REPORT"
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "gpu_check: ${#FAILED[@]} step(s) failed: ${FAILED[*]}" >&2
  exit 1
fi
