#!/usr/bin/env bash
# The prepared device run for issue 3 (about 10 min at most on an H100/H200): from the repository
# root through the `run` tool, e.g.  run(command="bash benchmarks/device_run.sh", timeout_s=600,
# carry=[".device_carry"]). On an H200 (session 7) every step took 313 s, cold; with
# DEVICE_STEPS="checks table encoder blocks" and two table shapes, 284 s. Session 7 added descriptor
# configs for the projections, so a cold table compiles more than it did then.
# Session 8 (no device) added A/B rows for its untimed changes (timed in session 9; the zeros rows
# are gone since): "torch-op router" (encoder), "triton unshared" (decode); and a router check
# in gpu_check.
# Session 9 (H200): DEVICE_STEPS="checks table encoder decode", two table shapes, CHECK_S=90, took
# 326 s with the session-7 Triton cache carried in, but the checks need 200 s (run alone: 184 s,
# every check): the default now.
# Session 9 (after its runs) added the heads-removed deployment (static_prune) to the encoder
# table, and an A/B of a persistent compacted grid that session 10 timed (slower) and removed.
# Session 10 (H200, session-7+9 cache carried): checks 157 s, encoder 89 s (now with the compact
# A/B and the batch-of-one rows), table at two shapes 184 s; on a fresh machine with session 10's
# cache: exact 54 s, table at 32,12,512,64 32 s, encoder 60 s. .device_carry holds session 10's
# cache (23 MB).
# Session 11 (no device) added per-row rows to the timing (encoder A/B at p = .5/.25 and a
# 4 x 128 batch), so the encoder step's limit is 150 s. Step limits add up to 625 s (checks 240,
# table 200, encoder 150, decode 35; "profile" adds 40): split the run in two calls, e.g.
# DEVICE_STEPS="checks encoder" then DEVICE_STEPS="table decode" (the machine stays warm between). The checks got 240 s once the backward check went in
# (session 9, after its runs: not yet timed on a card). A cold table compiles roughly 90 kernel
# variants (forward configs x {causal, not} x head dims, and the projections), which is why it
# gets the most time.
# BENCH_ARGS narrows the timed table (e.g. "--shapes 32,12,512,64 --no-flex"), BENCH_S its limit.
# DEVICE_STEPS picks steps (default "checks table encoder decode"; "exact" the models' exactness
# alone, EXACT_S its limit; "profile" adds host time per
# call, "compiled" torch.compile(backend="dhp_fx") against plain torch.compile on BERT-base and a Llama
# (COMPILED_ARGS, COMPILED_S per model), "generate" generate() with a KV cache (GENERATE_ARGS,
# GENERATE_S), "blocks" the per-kernel block profile, two heads per program on and off, "survey" the
# full register survey under the card's triton), CHECK_S the checks' limit.
# The device machine is offline and has torch/triton/transformers but not dhp_fx, and
# `pip install -e .` needs a build backend from the network: the package-dir mapping
# (dhp_fx.kernels = kernels/, dhp_fx.passes = passes/) is reproduced with symlinks in this copy
# of the tree instead. Each step is its own process with its own time limit (DEVICE_SCALE
# multiplies them all), so a crash or a slow autotune in one cannot cost the others. Every log is
# its own file in $OUT, written as the step runs (at most 8 files come back).
#
# Compiles are most of a cold run: with TRITON_CACHE_OUT=1 the Triton cache comes back packed as
# $OUT/triton_cache.tar.xz.*; put one piece (15 MiB at most) in .device_carry/triton_cache.tar.xz
# (ignored by git) and name .device_carry in the next call's `carry` to start warm.
set -uo pipefail
OUT=${OUT:-/tmp/dhp_fx_device_out}
PY=${PY:-python3}  # the image's python3 holds torch; a bare `python` may not exist
S=${DEVICE_SCALE:-1}
mkdir -p "$OUT"
ln -sfn ../kernels dhp_fx/kernels
ln -sfn ../passes dhp_fx/passes
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$PWD/.triton_cache"
mkdir -p "$TRITON_CACHE_DIR"
[ -f .device_carry/triton_cache.tar.xz ] && xz -dc .device_carry/triton_cache.tar.xz | tar -C "$TRITON_CACHE_DIR" -xf -
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
lim() { echo $(( $1 * S )); }
STEPS=" ${DEVICE_STEPS:-checks table encoder decode} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "triton cache entries carried in: $(ls "$TRITON_CACHE_DIR" | wc -l)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Correctness, side by side (neither is timed): the integrated path (exactness per model and
# dtype, host syncs, training under autocast) and the CUDA-only tests (gates on the GPU, CUDA
# graph replay). First configs only: no tuning compiles.
if want checks; then
DHP_FX_TRITON_AUTOTUNE=0 timeout $(lim ${CHECK_S:-240}) $PY benchmarks/gpu_check.py --parts checks \
  > "$OUT/gpu_check.txt" 2>&1 & GPU_CHECK_PID=$!
DHP_FX_TRITON_AUTOTUNE=0 timeout $(lim ${CHECK_S:-240}) $PY -m pytest -q -p no:cacheprovider tests/test_gate_device.py \
  tests/test_cuda_graphs.py > "$OUT/pytest_gpu.txt" 2>&1 & PYTEST_PID=$!
wait $GPU_CHECK_PID; echo "gpu_check rc=$?" >> "$OUT/gpu_check.txt"
wait $PYTEST_PID; echo "pytest_gpu rc=$?" >> "$OUT/pytest_gpu.txt"
stamp "checks done"
fi
# The model-level exactness alone (gates open, keep masks, compact blocks): the short check to
# pair with timing when the full checks do not fit the call.
if want exact; then
DHP_FX_TRITON_AUTOTUNE=0 timeout $(lim ${EXACT_S:-60}) $PY benchmarks/gpu_check.py --parts exactness \
  > "$OUT/gpu_exact.txt" 2>&1
echo "gpu_exact rc=$?" >> "$OUT/gpu_exact.txt"
stamp "exactness done"
fi
# Most important first: a run cut short by the call's time limit still returns what it finished.
# The timed table, autotuned (pointer/TMA loads and plain/P@V-behind loops compete), with the
# attention block eager and replayed from CUDA graphs.
if want table; then
timeout $(lim ${BENCH_S:-200}) $PY benchmarks/bench_attention.py --block --graphs ${BENCH_ARGS:-} \
  > "$OUT/bench_attention.txt" 2>&1
echo "bench_attention rc=$?" >> "$OUT/bench_attention.txt"
stamp "table done"
fi
if want encoder; then
# The BERT-base encoder, eager and graphed, autotuned unless ENCODER_AUTOTUNE=0.
DHP_FX_TRITON_AUTOTUNE=${ENCODER_AUTOTUNE:-1} timeout $(lim ${ENCODER_S:-150}) $PY benchmarks/gpu_check.py \
  --parts timing --out "$OUT" > "$OUT/gpu_timing.txt" 2>&1
echo "gpu_timing rc=$?" >> "$OUT/gpu_timing.txt"
stamp "encoder done"
fi
if want decode; then
timeout $(lim 35) $PY benchmarks/bench_attention.py --no-prefill --no-flex --decode > "$OUT/bench_decode.txt" 2>&1
echo "bench_decode rc=$?" >> "$OUT/bench_decode.txt"
stamp "decode done"
fi
if want compiled; then
# torch.compile(backend="dhp_fx") against plain torch.compile (inductor both): static gates,
# compact blocks (BERT) and chains (Llama: RoPE) as opaque ops; session 19 timed these on CPU only.
for model in bert-base llama; do
  timeout $(lim ${COMPILED_S:-120}) $PY benchmarks/bench_end_to_end_cpu.py --device cuda --dtype bfloat16 \
    --compiler inductor --only static --p 1 0.5 0.25 --reps 20 --model $model ${COMPILED_ARGS:---batch 8 --seq 1024} \
    > "$OUT/compiled_$model.txt" 2>&1
  echo "compiled $model rc=$?" >> "$OUT/compiled_$model.txt"
done
stamp "compiled done"
fi
if want generate; then
# generate() with HF's default KV cache: query chains (K/V whole for the cache), per-token time
# against the dense model; session 20 timed it on CPU only. The "K/V not in place" rows are the
# chains with their decode copying the kept heads' cached K/V per step instead of the head-map
# kernels reading them in place (session 21, untimed on a card; one more row per p: GENERATE_S 90
# → 120). Since session 22 the "torch.compile eager" row compiles a copy's forward (before, it
# ran eager: generate() never called the compiled wrapper).
timeout $(lim ${GENERATE_S:-120}) $PY benchmarks/bench_generate.py --device cuda --dtype bfloat16 --reps 5 \
  ${GENERATE_ARGS:---batch 8 --prompt 1024 --new 64 --layers 8} > "$OUT/generate.txt" 2>&1
echo "generate rc=$?" >> "$OUT/generate.txt"
stamp "generate done"
fi
if want profile; then
# Host time per call and the kernels each call launches (short shapes and decode are host-bound).
timeout $(lim 40) $PY benchmarks/profile_overhead.py --calls 100 --top 8 > "$OUT/profile.txt" 2>&1
echo "profile rc=$?" >> "$OUT/profile.txt"
stamp "profile done"
fi
if want blocks; then
# Per kernel, the BERT-sized block with two heads per program and with one (A/B, same card).
for pairs in 1 0; do
  DHP_FX_HEAD_PAIRS=$pairs timeout $(lim 30) $PY benchmarks/profile_block.py --shapes 32,12,512,64 --p 1 0.5 \
    --variants "block dense" "block ops/shared" "block ops/row" > "$OUT/profile_block_pairs$pairs.txt" 2>&1
  echo "profile_block rc=$?" >> "$OUT/profile_block_pairs$pairs.txt"
done
stamp "blocks done"
fi
if want survey; then
# The full sm_90 register survey under the card's triton and ptxas (CI compiles under 3.9, each
# config once): every launch and weight layout at D = 64 and 128, one process per kernel, as many
# at once as the machine has cores (about 280 compiles of ~2.6 s: under a minute on 16 cores).
# SURVEY_ONLY narrows it to some kernels.
mkdir -p "$OUT/.survey"
printf '%s\n' ${SURVEY_ONLY:-fwd fwd_plain fwd_causal bwd_dq bwd_dkdv decode_split decode_packed proj_out proj_in \
  proj_out_pair proj_wgrad partition router_pool router_pool_finish router_vote router_head gather_heads gather_rows} |
  DHP_FX_TRITON_AUTOTUNE=1 timeout $(lim ${SURVEY_S:-150}) xargs -P "$(nproc)" -I{} sh -c \
  "$PY benchmarks/kernel_resources.py --only {} > '$OUT/.survey/{}.txt' 2>&1; echo 'survey {} rc='\$? >> '$OUT/.survey/{}.txt'"
echo "survey rc=$?" > "$OUT/kernel_resources.txt"
cat "$OUT"/.survey/*.txt >> "$OUT/kernel_resources.txt" 2>/dev/null
rm -rf "$OUT/.survey"
stamp "survey done"
fi
if [ "${TRITON_CACHE_OUT:-0}" = 1 ]; then
  tar -C "$TRITON_CACHE_DIR" -cf - . | xz -T0 -6 | split -b 15M -d - "$OUT/triton_cache.tar.xz."
fi
[ -f "$OUT/kernel_resources.txt" ] && grep -E "rc=|configs (spill|have)|SPILLS|SHARED>|SERIAL" "$OUT/kernel_resources.txt" | head -n 60
[ -f "$OUT/gpu_check.txt" ] && grep -v "^  PASS" "$OUT/gpu_check.txt" | tail -n 22
[ -f "$OUT/gpu_exact.txt" ] && tail -n 14 "$OUT/gpu_exact.txt"
[ -f "$OUT/pytest_gpu.txt" ] && tail -n 4 "$OUT/pytest_gpu.txt"
[ -f "$OUT/profile.txt" ] && tail -n 10 "$OUT/profile.txt"
[ -f "$OUT/bench_decode.txt" ] && tail -n 18 "$OUT/bench_decode.txt"
for f in "$OUT"/profile_block_pairs*.txt; do [ -f "$f" ] && grep -v "^  tune" "$f" | grep -E "===|head_linear|gated_attn|copy_|aten::mm|cudnn" ; done
[ -f "$OUT/gpu_timing.txt" ] && tail -n 40 "$OUT/gpu_timing.txt"
[ -f "$OUT/bench_attention.txt" ] && tail -n 60 "$OUT/bench_attention.txt"
true
