#!/usr/bin/env bash
# Written 2026-12-05 (session 3) for a later device call, NOT YET RUN (~500 s on one H100/H200): every no-grad pass
# compiled after the graph-break fix (DistillConfig.compile_nograd: the student's and fake score's rollouts and score
# passes; teacher_compile: the frozen teacher's), against eager in the same call.  OUT=$OUT bash bench/gpu_issue22i.sh
. bench/gpu_common.sh
part steps_eager 170 python3 bench/bench_real.py --phases rcm --rcm-ac keep_attention --repeats 2 \
  --out "$OUT/real_eager.json" --label "issue22-eager (baseline of compile_nograd)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
part rcm_compile_nograd 320 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention \
  --fused-only --compile-nograd --teacher-compile --repeats 2 --out "$OUT/real_compile_nograd.json" \
  --label "issue22-compile-nograd+teacher-compile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
