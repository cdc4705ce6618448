#!/usr/bin/env bash
# The GPU run, on a CUDA machine without network (the device machine): ComfyUI 0.33.0 from a carried source
# tarball, the host packages that machine lacks from a carried site folder, an import check that stops the run at
# once when something is missing, then bench/gpu_bench.py (Train B-LoRA: SDXL, then FLUX), then, in the time left,
# bench/gpu_check.py (the loaders' agreement) and the other CUDA benches. Everything it writes goes to $OUT.
#   bash bench/gpu_run.sh [CARRY]     CARRY (default .gpu) holds comfyui-0.33.0.tar.gz and site.tar.gz
# comfyui-0.33.0.tar.gz: ../shared/hosts' source minus what an in-process run never imports (tests, tests-unit,
# comfy_api_nodes, blueprints), to fit the device tool's 64 MiB; site.tar.gz: the unpacked cp312 wheels of
# av 19.0.2 (comfy_api.latest imports it), comfy-aimdo 0.4.13, comfy-kitchen 0.2.31 without its compiled
# backends (the CUDA one alone is 176 MB; the host then uses comfy-kitchen's triton/eager kernels, for rope on
# FLUX), torchsde, trampoline, kornia 0.9.0 and kornia_rs 0.2.0 (the image's Python 3.12 lacks them).
# Environment: PYTHON (default python3), TOTAL_S (default 560: the whole run's seconds, set-up included),
# GPU_BENCH_ARGS (gpu_bench.py arguments; default --timeout 170 --flux-timeout 150), GPU_CHECK=1 to run gpu_check.py --full in the time left,
# SITE=none to use the installed packages, DRY=1 for a CPU dry run of the whole script (toy sizes, no CUDA needed).
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${1:-.gpu}
OUT=${OUT:-/tmp/blora-gpu-out}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-560}
left() { echo $((TOTAL_S - SECONDS)); }
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
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# Import check: every module the benches load, so a missing package costs seconds, not the run.
if ! "$PYTHON" - > "$OUT/imports.txt" 2>&1 <<'EOF'
import os, sys
sys.path[:0] = [os.environ["COMFYUI_PATH"], os.getcwd(), os.path.join(os.getcwd(), "bench"),
                os.path.join(os.getcwd(), "tests")]
import torch
if os.environ.get("DRY") == "1":
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
else:
    assert torch.cuda.is_available(), "CUDA is not available"
import comfy.model_management, comfy.sd, comfy.ldm.flux.model, comfy_extras.nodes_train  # noqa: F401
import blora.host.train, minimal_train, benchkit, gpu_check, gpu_bench  # noqa: F401
print("imports ok:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)")
EOF
then
  cat "$OUT/imports.txt"; echo "import check failed after $SECONDS s: nothing was benchmarked"; exit 3
fi
cat "$OUT/imports.txt"

# Train B-LoRA's GPU benchmark (issues 16 and 17): its own table, bench/RESULTS-gpu-train.txt.
t0=$SECONDS
dry=(); [ "${DRY:-0}" = 1 ] && dry=(--device cpu --toy)
timeout "$(( $(left) - 20 ))" "$PYTHON" bench/gpu_bench.py "${dry[@]}" ${GPU_BENCH_ARGS:---timeout 170 --flux-timeout 150} \
  --out "$OUT/RESULTS-gpu-train.txt" > "$OUT/gpu_bench.log" 2>&1
echo "gpu_bench exit $? after $((SECONDS - t0)) s" >> "$OUT/gpu_bench.log"
cat "$OUT/gpu_bench.log"
for f in "$TMPDIR"/blora-gpu-bench-*/*; do
  [ -f "$f" ] && { echo "=== $f"; cat "$f"; }
done > "$OUT/gpu_bench_workers.txt" 2>&1

# The loaders' agreement (bench/RESULTS-gpu.txt), when asked for and time is left.
if [ "${GPU_CHECK:-0}" = 1 ] && [ "$(left)" -gt 120 ]; then
  t0=$SECONDS
  timeout "$(( $(left) - 10 ))" "$PYTHON" bench/gpu_check.py --full --timeout "$(( ($(left) - 20) / 2 ))" \
    --out "$OUT/RESULTS-gpu.txt" > "$OUT/gpu_check.log" 2>&1
  echo "gpu_check exit $? after $((SECONDS - t0)) s" >> "$OUT/gpu_check.log"
fi

# Other benchmarks that run on CUDA (they say so by naming it), each capped, in the time left; all in one file.
for b in bench/*.py; do
  case $(basename "$b") in gpu_check.py|gpu_bench.py|benchkit.py|minimal_train.py) continue ;; esac
  grep -q "cuda" "$b" || continue
  [ "$(left)" -gt 40 ] || { echo "=== $b: skipped, no time left"; continue; }
  echo "=== $b"
  args=(); "$PYTHON" "$b" --help 2>/dev/null | grep -q -- "--device" && args=(--device cuda)
  timeout "$(( $(left) - 20 ))" "$PYTHON" "$b" "${args[@]}" 2>&1 | tail -60
  echo "exit $?"
done > "$OUT/bench_cuda.txt" 2>&1
echo "gpu_run.sh done after $SECONDS s"
ls -la "$OUT"
