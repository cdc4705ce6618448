#!/usr/bin/env bash
# The GPU run, on a CUDA machine without network (the device machine): ComfyUI 0.33.0 from a carried source
# tarball, the host packages that machine lacks from a carried site folder, then bench/gpu_check.py and every
# other bench/*.py that runs on CUDA (capped in time). Everything it writes goes to $OUT.
#   bash bench/gpu_run.sh [CARRY]     CARRY (default .gpu) holds comfyui-0.33.0.tar.gz and site.tar.gz
# comfyui-0.33.0.tar.gz: ../shared/hosts' source minus what an in-process run never imports (tests, tests-unit,
# comfy_api_nodes, blueprints), to fit the device tool's 64 MiB; site.tar.gz: the unpacked cp312 wheels of
# comfy-aimdo 0.4.13, comfy-kitchen 0.2.31 (without its ROCm backend library, loaded only on HIP builds of torch),
# torchsde, trampoline, kornia 0.9.0 and kornia_rs 0.2.0 (the image's Python 3.12 lacks them).
# Environment: PYTHON (default python3), GPU_CHECK_ARGS (default --full), SITE=none to use the installed packages.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${1:-.gpu}
OUT=${OUT:-/tmp/blora-gpu-out}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/blora-gpu-run.XXXXXX")
mkdir -p "$OUT" "$work/host" "$work/site" "$work/tmp"
tar -xzf "$carry/comfyui-0.33.0.tar.gz" -C "$work/host" || { echo "no ComfyUI tarball in $carry"; exit 2; }
if [ "${SITE:-}" != none ]; then
  tar -xzf "$carry/site.tar.gz" -C "$work/site" || { echo "no site.tar.gz in $carry"; exit 2; }
  export PYTHONPATH="$work/site"
fi
export COMFYUI_PATH="$work/host/ComfyUI" PYTHONUNBUFFERED=1 TMPDIR="$work/tmp"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PYTHON" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PYTHON" -c "import comfy_aimdo, comfy_kitchen, torchsde; print('comfy_aimdo, comfy_kitchen, torchsde import')" 2>&1 | tail -1
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

t0=$SECONDS
timeout "${GPU_CHECK_S:-480}" "$PYTHON" bench/gpu_check.py ${GPU_CHECK_ARGS:---full} --timeout "${GPU_MODE_S:-230}" \
  --out "$OUT/RESULTS-gpu.txt" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $? after $((SECONDS - t0)) s" >> "$OUT/gpu_check.log"
cat "$OUT/gpu_check.log"
for f in "$TMPDIR"/blora-gpu-check-*/*.json "$TMPDIR"/blora-gpu-check-*/*.log; do
  [ -f "$f" ] && { echo "=== $f"; cat "$f"; }
done > "$OUT/gpu_check_workers.txt"

# Train B-LoRA's GPU benchmark (issues 16, 17): its own table, bench/RESULTS-gpu-train.txt: two SDXL processes
# (GPU_BENCH_MODE_S each) and the FLUX one (GPU_BENCH_FLUX_S); the outer cap leaves room for all three (the script
# writes the table after each process, so a cut keeps what finished).
t0=$SECONDS
timeout "${GPU_BENCH_S:-560}" "$PYTHON" bench/gpu_bench.py --timeout "${GPU_BENCH_MODE_S:-190}" \
  --flux-timeout "${GPU_BENCH_FLUX_S:-150}" --out "$OUT/RESULTS-gpu-train.txt" > "$OUT/gpu_bench.log" 2>&1
echo "gpu_bench exit $? after $((SECONDS - t0)) s" >> "$OUT/gpu_bench.log"
cat "$OUT/gpu_bench.log"

# Other benchmarks that run on CUDA (they say so by naming it), each capped; all in one file.
for b in bench/*.py; do
  case $(basename "$b") in gpu_check.py|gpu_bench.py|benchkit.py) continue ;; esac
  grep -q "cuda" "$b" || continue
  echo "=== $b"
  args=(); "$PYTHON" "$b" --help 2>/dev/null | grep -q -- "--device" && args=(--device cuda)
  timeout "${BENCH_S:-90}" "$PYTHON" "$b" "${args[@]}" 2>&1 | tail -60
  echo "exit $?"
done > "$OUT/bench_cuda.txt" 2>&1
ls -la "$OUT"
