#!/usr/bin/env bash
# One call on a 4-GPU machine (device time is scarce: one start).
# Phase 1: four single-GPU jobs side by side (one per card, each its own process; nothing shared but the
# host's cores): issues 13, 14, 15. Phase 2: NCCL over the four cards: issue 11 (and 14's 14B question).
# What it runs is what the session-5 runs left open (BENCHMARKS.md "Session 5 GPU runs"): the Hopper kernels
# without warp specialisation, 14B LoRA on one card, 1-/2-step students end to end, the served model at
# decode chunk 5, the bf16 NCCL equalities after the sg(F_theta) fix, fused vs separate tangent under FSDP2,
# and the 14B full fine-tuning row (OOM rows expected: memory per component).
# Usage (repo root on the GPU machine): OUT=$OUT VAE_CHUNK=5 bash bench/gpu4_parallel.sh
source bench/gpu_common.sh
export OMP_NUM_THREADS=8
C=${VAE_CHUNK:-5}
gpu0() {  # issue 15: Hopper kernels, correctness then speed (baseline: SDPA default backend, same process)
  part ws_lse_probe 90 python3 bench/hopper_ws_lse_probe.py --out "$OUT/ws_probe.json"
  part hopper_tests 90 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/test_kernel_flash_jvp_hopper.py
  part attention 180 python3 bench/bench_attention.py --cases 4096x4096,16384x16384,32760x32760 --rep 20 \
    --out "$OUT/attention_hopper.json"
}
gpu1() {  # issue 14: Wan2.1-14B with LoRA rank 64 on ONE card (memory model: 71.0 GiB)
  part lora_14b_one_gpu 275 python3 bench/bench_lora.py --arch wan2.1-14b --configs lora64 --iters 1 \
    --json "$OUT/lora_14b.json"
}
gpu2() {  # issue 13: end-to-end sampling with the decode variants (teacher baseline in the same process)
  part sampling 290 python3 bench/bench_real.py --phases sampling --repeats 2 \
    --vae-variants fp32,bf16-cl3d-bench,bf16-cl3d-bench-chunk$C-compile \
    --out "$OUT/real_sampling.json"
}
gpu3() {  # issue 13: the registered model through mlflow.pyfunc on the GPU
  PYTHONPATH=/tmp/site_mlflow:$PYTHONPATH part pyfunc_gpu 120 python3 -m pytest -q -m gpu -x -p no:cacheprovider \
    tests/test_export.py -k pyfunc_and_evaluate_decode_on_the_gpu
}
CUDA_VISIBLE_DEVICES=0 gpu0 > "$OUT/gpu0.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 gpu1 > "$OUT/gpu1.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=2 gpu2 > "$OUT/gpu2.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=3 gpu3 > "$OUT/gpu3.txt" 2>&1 &
wait
for g in 0 1 2 3; do echo "######## GPU $g"; cat "$OUT/gpu$g.txt"; done
echo "######## 4 GPUs"
bash bench/gpu4_dist.sh tests fused 14b-full
