#!/usr/bin/env bash
# 2026-12-05, session 2, call C (~450 s): the FP8 + compiled teacher under keep_attention (sCM and rCM rows; the bf16 teacher
# rows are call A's, bench/gpu_issue22e.sh), then the FP8 teacher's error on g and the DMD direction.  OUT=$OUT bash bench/gpu_issue22f.sh
. bench/gpu_common.sh
part steps_teacher_fp8c 400 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention --repeats 2 \
  --teacher-fp8 --teacher-compile --out "$OUT/real_steps_teacher_fp8_compile.json" --label "issue22-teacher-fp8+compile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
part fp8_error 140 python3 bench/fp8_teacher_error.py --samples 4 --critic-steps 8 --out "$OUT/fp8_teacher_error.json"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
