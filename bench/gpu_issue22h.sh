#!/usr/bin/env bash
# Written 2026-12-05 (sessions 2-3) for the next device call, NOT YET RUN (~560 s on one H100/H200): what the graph-break
# fix in compiled blocks changes for training, with its eager baseline in the same call, and the op-class profile
# with the corrected kernel accounting (bench/step_profile.py: no autograd.Function double count, the profiler's own
# "Command Buffer Full" records apart).  OUT=$OUT bash bench/gpu_issue22h.sh
. bench/gpu_common.sh
# 1. baseline: keep_attention, eager, profiled (one more call per step kind under torch.profiler)
part steps_keep_profile 230 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention \
  --fused-only --repeats 2 --profile --out "$OUT/real_keep_profile.json" --label "issue22-keep-attention-profile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
# 2. every no-grad pass compiled: the student's and fake score's (compile_nograd) and the frozen teacher's
part rcm_compile_nograd 320 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention \
  --fused-only --compile-nograd --teacher-compile --repeats 2 --out "$OUT/real_compile_nograd.json" \
  --label "issue22-compile-nograd+teacher-compile"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
