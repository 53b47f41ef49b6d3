#!/usr/bin/env bash
# 2026-12-05, a short last call (~200 s): the compiled teacher's sCM rows, then the compiled serving rows after the
# FlashAttention-3 lookup fix. OUT=$OUT bash bench/gpu_issue22d.sh
. bench/gpu_common.sh
part steps_teacher_compile 150 python3 bench/bench_real.py --phases steps --ac full --repeats 1 --teacher-compile \
  --out "$OUT/real_steps_teacher_compile.json" --label "issue22-teacher-compile"
part serving_after_fix 90 python3 bench/serving.py --repeats 2 --steps 4 --variants bf16,compile \
  --out "$OUT/serving_after_fix.json" --label "issue23-serving-2 (fa3 lookup fix)"
