#!/usr/bin/env bash
# One single-GPU device call that measures issues 13-15 together (the device time is scarce: one start).
# Usage (on the GPU machine, repo root, diffusers wheel in .whl/):  bash bench/gpu_batch.sh "$OUT"
# Each part has its own time limit and writes its JSON/log under $OUT as it goes.
set -u
OUT=${1:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels:$PWD/steps
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
part() {  # part NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 ))s"; tail -n 25 "$OUT/$name.log"
}
# 1. GPU tests of the new paths (primal attention dispatch)
part gpu_tests 80 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/test_attention.py
# 2. primal attention before/after (issue 15) and the end-to-end sampling speed (issue 13), one process
part real 290 python3 bench/bench_real.py --phases primal,sampling --repeats 2 \
  --vae-variants fp32,bf16-cl3d-bench --out "$OUT/real_primal_sampling.json"
# 3. LoRA vs full (issue 14): Wan2.1-1.3B at 480p x 81
part lora 200 python3 bench/bench_lora.py --configs full,lora64,lora128 --iters 1 --json "$OUT/lora_13b.json"
