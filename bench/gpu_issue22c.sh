#!/usr/bin/env bash
# 2026-12-05, last device call of the session (what was left): the compiled serving rows after the FlashAttention-3
# lookup fix (no graph break), the compiled teacher's sCM rows, the FP8 teacher's error. OUT=$OUT bash bench/gpu_issue22c.sh
. bench/gpu_common.sh
part serving_after_fix 170 python3 bench/serving.py --repeats 2 --steps 4,1 --variants bf16,compile,fp8-static+compile \
  --out "$OUT/serving_after_fix.json" --label "issue23-serving-2 (fa3 lookup fix)"
part steps_teacher_compile 220 python3 bench/bench_real.py --phases steps --ac full --repeats 1 --teacher-compile \
  --out "$OUT/real_steps_teacher_compile.json" --label "issue22-teacher-compile"
part fp8_error 150 python3 bench/fp8_teacher_error.py --samples 4 --critic-steps 8 --out "$OUT/fp8_teacher_error.json"
