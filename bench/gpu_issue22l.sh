#!/usr/bin/env bash
# Written 2026-12-05 (session 4) for the next device call, NOT YET RUN (~400 s on one H200, the card of issue 22's
# goals): the GPU tests of the RoPE and block ops (bf16, now also the 14B width 5120 and the split RoPE kernel), the
# ops and the three RoPE variants alone (bench_block_ops.py), then the fused-tangent steps at today's defaults (both
# kernels on) and with both off, in this one call. Make the split RoPE kernel the default (rcm_kernels.rope.rotate)
# only if its GPU test passes and bench_block_ops shows it faster.  OUT=$OUT bash bench/gpu_issue22l.sh
. bench/gpu_common.sh
part gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rope.py tests/test_block_ops.py
part block_ops 60 python3 bench/bench_block_ops.py --out "$OUT/block_ops.json"
STEPS=(python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention --fused-only --repeats "${REPEATS:-2}")
part steps_default "${STEP_LIMIT:-175}" "${STEPS[@]}" --out "$OUT/real_default.json" --label "issue22l-defaults (kernels on)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
RCM_ROPE_KERNEL=0 RCM_NORM_KERNEL=0 part steps_formulas "${STEP_LIMIT:-175}" "${STEPS[@]}" --out "$OUT/real_formulas.json" \
  --label "issue22l-formulas (both kernels off)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
