#!/usr/bin/env bash
# Issue 23, serving speed and its quality cost on one GPU (written 2026-12-05).
# Usage (GPU machine, repo root, wheels from bench/device_wheels.sh in .whl/):  OUT=$OUT bash bench/gpu_issue23.sh
. bench/gpu_common.sh
part serving 540 python3 bench/serving.py --repeats 2 \
  --variants bf16,fp8-dynamic,fp8-static,compile,fp8-static+compile --out "$OUT/serving.json" --label "issue23-serving-1"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
