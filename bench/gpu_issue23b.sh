#!/usr/bin/env bash
# 2026-12-05, session 2, call B (~400 s): sliding-tile sparse attention (GPU tests, kernel bench), the backward
# choices for kept attention, then the serving table with sparse/compile/FP8 variants.  OUT=$OUT bash bench/gpu_issue23b.sh
. bench/gpu_common.sh
part sparse_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_attention.py
part sparse_bench 120 python3 bench/sparse_attention.py --out "$OUT/sparse_attention.json"
part kept_bwd 60 python3 bench/kept_attention_backward_probe.py --out "$OUT/kept_attention_backward.json"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
part serving 270 python3 bench/serving.py --repeats 2 --steps 4,1 \
  --variants bf16,compile,sta:t3x8x8:w3x3x5,compile+sta:t3x8x8:w3x3x5,fp8-static+compile+sta:t3x8x8:w3x3x5 \
  --out "$OUT/serving_sparse.json" --label "issue23-serving-3 (sparse)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
