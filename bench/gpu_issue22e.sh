#!/usr/bin/env bash
# 2026-12-05, session 2: keep_attention checkpointing (GPU test + step rows against full AC in the same call), then
# the compiled serving rows after the FlashAttention-3 lookup fix.  OUT=$OUT bash bench/gpu_issue22e.sh
. bench/gpu_common.sh
part gpu_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_keep_attention.py
part steps_keep 420 python3 bench/bench_real.py --phases steps,rcm --ac full,keep_attention --rcm-ac full,keep_attention \
  --repeats 2 --out "$OUT/real_steps_keep_attention.json" --label "issue22-keep-attention"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
