#!/usr/bin/env bash
# Written 2026-12-05 (session 3) for a later device call, NOT YET RUN (~500 s on one H100/H200): the serving rows after
# the graph-break fix, with the compiled chunked decode (its 2-3 min compile is paid once, in the first-call latency)
# and CUDA graphs per block (reduce-overhead), bf16 baseline first in the same process; session 5 added --clips 4 (a
# request of 4 clips, the overlap option off and on: student_request rows).  OUT=$OUT bash bench/gpu_issue23c.sh
. bench/gpu_common.sh
part serving_nobreak 330 python3 bench/serving.py --repeats 2 --steps 4,2,1 --clips 4 \
  --variants bf16,compile,compile-reduce-overhead,fp8-static+compile \
  --out "$OUT/serving_nobreak.json" --label "issue23-serving-4 (no graph breaks)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
part serving_decode_compiled 280 python3 bench/serving.py --repeats 2 --steps 4,1 --decode bf16-cl3d-bench-chunk5-compile \
  --variants bf16,fp8-static+compile --out "$OUT/serving_decode_compiled.json" \
  --label "issue23-serving-5 (compiled, autotuned decode)"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
