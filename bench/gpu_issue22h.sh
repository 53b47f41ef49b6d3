#!/usr/bin/env bash
# Written 2026-12-05 (session 2) for the next device call, NOT YET RUN (~450 s): what the graph-break fix in compiled
# blocks should change, each with its baseline in the same call.  OUT=$OUT bash bench/gpu_issue22h.sh
. bench/gpu_common.sh
# 1. every network's no-grad passes compiled (DistillConfig.compile_nograd) against eager, keep_attention both
part rcm_compile_nograd 330 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention \
  --fused-only --compile-nograd --repeats 2 --out "$OUT/real_compile_nograd.json" --label "issue22-compile-nograd"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
# 2. the serving compile option after the fix (one graph per block), bf16 baseline in the same process
part serving_nobreak 150 python3 bench/serving.py --repeats 2 --steps 4,1 --variants bf16,compile,fp8-static+compile \
  --out "$OUT/serving_nobreak.json" --label "issue23-serving-4 (no graph breaks)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
