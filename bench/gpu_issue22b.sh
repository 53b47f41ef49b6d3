#!/usr/bin/env bash
# Issue 22, third device call of 2026-12-05: the compiled teacher (DistillConfig.teacher_compile) on the sCM rows,
# then the FP8 teacher's error on g and on the DMD direction. Usage: OUT=$OUT bash bench/gpu_issue22b.sh
. bench/gpu_common.sh
part steps_teacher_compile 250 python3 bench/bench_real.py --phases steps --ac full --repeats 1 --teacher-compile \
  --out "$OUT/real_steps_teacher_compile.json" --label "issue22-teacher-compile"
part fp8_error 170 python3 bench/fp8_teacher_error.py --samples 4 --critic-steps 8 --out "$OUT/fp8_teacher_error.json"
