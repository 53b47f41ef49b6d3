#!/usr/bin/env bash
# Written 2026-12-05 (sessions 2-3) for the next device call, NOT YET RUN (~470 s on one H100/H200): the fused RoPE
# (rcm_core/nets/rope.py, Triton) against diffusers' formula, both in this call, and the op-class profile with the
# corrected kernel accounting (bench/step_profile.py: no autograd.Function double count, the profiler's own
# "Command Buffer Full" records apart).  OUT=$OUT bash bench/gpu_issue22h.sh
. bench/gpu_common.sh
part rope_gpu_tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rope.py
# 1. the RoPE formula (the default), fused-tangent steps, keep_attention
RCM_ROPE_KERNEL=0 part steps_rope_formula 170 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention \
  --rcm-ac keep_attention --fused-only --repeats 2 --out "$OUT/real_rope_formula.json" --label "issue22-rope-formula"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
# 2. the RoPE kernel (opt-in: RCM_ROPE_KERNEL=1), the same rows, then each step kind profiled
RCM_ROPE_KERNEL=1 part steps_rope_kernel_profile 230 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention \
  --rcm-ac keep_attention --fused-only --repeats 2 --profile --out "$OUT/real_rope_kernel_profile.json" \
  --label "issue22-rope-kernel+profile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
