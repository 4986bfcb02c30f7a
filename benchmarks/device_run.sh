#!/usr/bin/env bash
# The prepared device run for issue 3 (about 9 min at most on an H100/H200): from the repository
# root through the `run` tool, e.g.  run(command="bash benchmarks/device_run.sh", timeout_s=560).
# The device machine is offline and has torch/triton/transformers but not dhp_fx, and
# `pip install -e .` needs a build backend from the network: the package-dir mapping
# (dhp_fx.kernels = kernels/, dhp_fx.passes = passes/) is reproduced with symlinks in this copy
# of the tree instead. Each step is its own process with its own time limit, so a crash or a slow
# autotune in one cannot cost the others; everything lands in $OUT and the tables print last.
#
# Compiles are most of a cold run. Triton's cache lives in .triton_cache/ (ignored by git) and
# comes back packed in $OUT/triton_cache.tar.xz.*: unpack it into the tree and name .triton_cache
# in the next call's `carry` to skip them.
set -uo pipefail
OUT=${OUT:-/tmp/dhp_fx_device_out}
PY=${PY:-python3}  # the image's python3 holds torch; a bare `python` may not exist
mkdir -p "$OUT"
ln -sfn ../kernels dhp_fx/kernels
ln -sfn ../passes dhp_fx/passes
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$PWD/.triton_cache" TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "triton cache entries carried in: $(ls "$TRITON_CACHE_DIR" | wc -l)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Correctness, side by side: both are compile-bound (16 cores) and neither is timed. First configs
# only (no tuning compiles); the kernel check runs the pointer and the TMA variants.
DHP_FX_TRITON_AUTOTUNE=0 timeout 120 $PY benchmarks/bench_attention.py --check-only --no-flex \
  > "$OUT/bench_check.txt" 2>&1 & CHECK_PID=$!
DHP_FX_TRITON_AUTOTUNE=0 timeout 120 $PY benchmarks/gpu_check.py --parts checks --out "$OUT" \
  > "$OUT/gpu_check.txt" 2>&1 & GPU_CHECK_PID=$!
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gate_device.py > "$OUT/pytest_gpu.txt" 2>&1 & PYTEST_PID=$!
wait $CHECK_PID; echo "bench_check rc=$?" >> "$OUT/bench_check.txt"
wait $GPU_CHECK_PID; echo "gpu_check rc=$?" >> "$OUT/gpu_check.txt"
wait $PYTEST_PID; echo "pytest_gpu rc=$?" >> "$OUT/pytest_gpu.txt"
stamp "checks done"
# Host time per call and the kernels each call launches (short shapes and decode are host-bound).
timeout 60 $PY benchmarks/profile_overhead.py > "$OUT/profile.txt" 2>&1
echo "profile rc=$?" >> "$OUT/profile.txt"
stamp "profile done"
# The timed table, autotuned (pointer and TMA configs compete), with the attention block.
timeout ${BENCH_S:-200} $PY benchmarks/bench_attention.py --block > "$OUT/bench_attention.txt" 2>&1
echo "bench_attention rc=$?" >> "$OUT/bench_attention.txt"
stamp "table done"
timeout 45 $PY benchmarks/bench_attention.py --no-prefill --no-flex --decode > "$OUT/bench_decode.txt" 2>&1
echo "bench_decode rc=$?" >> "$OUT/bench_decode.txt"
stamp "decode done"
DHP_FX_TRITON_AUTOTUNE=0 timeout 60 $PY benchmarks/gpu_check.py --parts timing --out "$OUT" \
  > "$OUT/gpu_timing.txt" 2>&1
echo "gpu_timing rc=$?" >> "$OUT/gpu_timing.txt"
stamp "encoder done"
# HF's own [B, L, H, D] views: is the descriptor path worth making the default for them?
for tma in on off; do
  timeout 50 $PY benchmarks/bench_attention.py --shapes 8,32,2048,128 32,12,512,64 --p 1 0.5 --layout model \
    --tma $tma --no-flex > "$OUT/bench_model_tma_$tma.txt" 2>&1
  echo "bench_model_tma_$tma rc=$?" >> "$OUT/bench_model_tma_$tma.txt"
done
stamp "layouts done"
# At most 8 files come back: the logs as one archive, the cache in 15 MiB pieces.
stamp "packing $(du -sh "$TRITON_CACHE_DIR" | cut -f1) of triton cache"
tar -C "$TRITON_CACHE_DIR" -cf - . | xz -T0 -6 | split -b 15M -d - "$OUT/triton_cache.tar.xz."
(cd "$OUT" && tar -czf logs.tar.gz --remove-files ./*.txt ./*.json)
ls -la "$OUT"
tar -xzOf "$OUT/logs.tar.gz" ./bench_check.txt | grep -v "^  PASS" | tail -n 20
tar -xzOf "$OUT/logs.tar.gz" ./gpu_check.txt | tail -n 22
tar -xzOf "$OUT/logs.tar.gz" ./pytest_gpu.txt | tail -n 4
tar -xzOf "$OUT/logs.tar.gz" ./profile.txt | tail -n 12
tar -xzOf "$OUT/logs.tar.gz" ./bench_model_tma_on.txt ./bench_model_tma_off.txt | grep -v "^---" | tail -n 16
tar -xzOf "$OUT/logs.tar.gz" ./bench_attention.txt | tail -n 80
tar -xzOf "$OUT/logs.tar.gz" ./bench_decode.txt | tail -n 20
tar -xzOf "$OUT/logs.tar.gz" ./gpu_timing.txt | tail -n 15
