#!/usr/bin/env bash
# 2026-12-05, session 2, call D: keep_attention with cuDNN's backward on the kept O/LSE of the fused sCM step
# (GPU test, then the steps and rCM rows), then, if time is left, the rCM rows with compile_nograd.
# OUT=$OUT bash bench/gpu_issue22g.sh
. bench/gpu_common.sh
part gpu_tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_keep_attention.py
part steps_keep_cudnn 200 python3 bench/bench_real.py --phases steps,rcm --ac keep_attention --rcm-ac keep_attention \
  --fused-only --repeats 2 --out "$OUT/real_steps_keep_attention_cudnn_bwd.json" --label "issue22-keep-attention-cudnn-bwd"
part rcm_compile_nograd 300 python3 bench/bench_real.py --phases rcm --rcm-ac keep_attention --compile-nograd \
  --repeats 2 --out "$OUT/real_rcm_compile_nograd.json" --label "issue22-compile-nograd"
