#!/usr/bin/env bash
# Session 4 (2026-12-05), ~560 s on one H100/H200, after gpu_issue22j.sh: (1) the op-class profile of each step kind
# with the RoPE and block-op kernels on (corrected accounting: bench/step_profile.py); (2) the serving rows after the
# graph-break fix (the first part of gpu_issue23c.sh), bf16 baseline first in the same process.
# OUT=$OUT bash bench/gpu_issue22k.sh
. bench/gpu_common.sh
RCM_ROPE_KERNEL=1 RCM_NORM_KERNEL=1 part steps_kernels_profile 230 python3 bench/bench_real.py --phases steps,rcm \
  --ac keep_attention --rcm-ac keep_attention --fused-only --repeats 1 --profile --out "$OUT/real_kernels_profile.json" \
  --label "issue22k-rope+block-ops kernels, profile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
part serving_nobreak 300 python3 bench/serving.py --repeats 2 --steps 4,2,1 \
  --variants bf16,compile,compile-reduce-overhead,fp8-static+compile \
  --out "$OUT/serving_nobreak.json" --label "issue23-serving-4 (no graph breaks)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
