#!/usr/bin/env bash
# Written 2026-12-05 (session 4) for the next device call, NOT YET RUN (~520 s on one H200, the card of issue 22's
# goals): the GPU tests of the RoPE and block ops (bf16, now also the 14B width 5120 and the split RoPE kernel); the
# ops and the three RoPE variants alone (bench_block_ops.py); then the fused-tangent steps at today's defaults (RoPE
# and block-op kernels on) and with the split RoPE kernel (RCM_ROPE_SPLIT=1), in this one call. Make the split kernel
# the default (rcm_kernels.rope.rotate) only if its GPU test passes and it is faster. The both-off baseline of the
# defaults is in BENCHMARKS.md (H100, same bench); with budget to spare, add it here too
# (RCM_ROPE_KERNEL=0 RCM_NORM_KERNEL=0). Session 5 added the overlap option's CUDA stream test (tests/test_overlap.py).
#   OUT=$OUT bash bench/gpu_issue22l.sh
. bench/gpu_common.sh
part gpu_tests 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rope.py tests/test_block_ops.py tests/test_overlap.py
part block_ops 50 python3 bench/bench_block_ops.py --out "$OUT/block_ops.json"
STEPS=(python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention --fused-only --repeats "${REPEATS:-2}")
part steps_default "${STEP_LIMIT:-170}" "${STEPS[@]}" --out "$OUT/real_default.json" --label "issue22l-defaults (kernels on)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
RCM_ROPE_SPLIT=1 part steps_rope_split "${STEP_LIMIT:-170}" "${STEPS[@]}" --out "$OUT/real_rope_split.json" \
  --label "issue22l-defaults + split RoPE kernel"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
