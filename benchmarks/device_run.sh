#!/usr/bin/env bash
# The prepared device run for issue 3 (at most about 9.5 min on an H100/H200): run from the
# repository root through the `run` tool, e.g.  run(command="bash benchmarks/device_run.sh", timeout_s=590).
# The device machine is offline and has torch/triton/transformers but not dhp_fx, and
# `pip install -e .` needs a build backend from the network: the package-dir mapping
# (dhp_fx.kernels = kernels/, dhp_fx.passes = passes/) is reproduced with symlinks in this copy
# of the tree instead. Each step is its own process with its own time limit, so a crash or a slow
# autotune in one cannot cost the others; everything lands in $OUT and the tables print last.
set -uo pipefail
OUT=${OUT:-/tmp/dhp_fx_device_out}
mkdir -p "$OUT"
ln -sfn ../kernels dhp_fx/kernels
ln -sfn ../passes dhp_fx/passes
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Correctness first, first configs only (no tuning compiles): pointer and TMA variants.
DHP_FX_TRITON_AUTOTUNE=0 timeout 100 python benchmarks/bench_attention.py --check-only --no-flex \
  > "$OUT/bench_check.txt" 2>&1
echo "bench_check rc=$?" >> "$OUT/bench_check.txt"
# The timed table, autotuned (pointer and TMA configs compete), with the attention block.
timeout 260 python benchmarks/bench_attention.py --block > "$OUT/bench_attention.txt" 2>&1
echo "bench_attention rc=$?" >> "$OUT/bench_attention.txt"
timeout 60 python benchmarks/bench_attention.py --no-prefill --no-flex --decode > "$OUT/bench_decode.txt" 2>&1
echo "bench_decode rc=$?" >> "$OUT/bench_decode.txt"
# First configs only: a dozen models x dtypes would each autotune every kernel (bench_attention
# above times the tuned kernels).
DHP_FX_TRITON_AUTOTUNE=0 timeout 130 python benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.txt" 2>&1
echo "gpu_check rc=$?" >> "$OUT/gpu_check.txt"
tail -n 40 "$OUT/bench_check.txt"
tail -n 80 "$OUT/bench_attention.txt"
tail -n 20 "$OUT/bench_decode.txt"
tail -n 40 "$OUT/gpu_check.txt"
