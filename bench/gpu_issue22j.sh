#!/usr/bin/env bash
# Session 4 (2026-12-05), ~520 s on one H100/H200: the GPU tests of the RoPE op and the fused LayerNorm/modulation/
# residual ops (rcm_core/nets/block_ops.py); the ops against diffusers' expressions (bench_block_ops.py); then the
# fused-tangent steps with both off (diffusers' formulas, the default) and both on (RCM_ROPE_KERNEL=1 RCM_NORM_KERNEL=1), in this one call.  OUT=$OUT bash bench/gpu_issue22j.sh
. bench/gpu_common.sh
part gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rope.py tests/test_block_ops.py
part block_ops 45 python3 bench/bench_block_ops.py --out "$OUT/block_ops.json"
STEPS=(python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention --fused-only --repeats "${REPEATS:-2}")
RCM_ROPE_KERNEL=0 RCM_NORM_KERNEL=0 part steps_formulas "${STEP_LIMIT:-175}" "${STEPS[@]}" --out "$OUT/real_formulas.json" \
  --label "issue22j-formulas (default)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
RCM_ROPE_KERNEL=1 RCM_NORM_KERNEL=1 part steps_kernels "${STEP_LIMIT:-175}" "${STEPS[@]}" --out "$OUT/real_kernels.json" \
  --label "issue22j-rope+block-ops kernels"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
