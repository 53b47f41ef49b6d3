#!/usr/bin/env bash
# One call on a 4-GPU machine: four single-GPU jobs side by side (one per GPU, each its own process
# and card; nothing shared but the host's 64 cores), issues 13, 14 and 15.
# Usage (repo root on the GPU machine): OUT=$OUT bash bench/gpu4_parallel.sh
source bench/gpu_common.sh
export OMP_NUM_THREADS=8
gpu0() {  # issue 15: Hopper kernels, correctness then speed (baseline: SDPA default backend, same process)
  part hopper_tests 200 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/test_kernel_flash_jvp_hopper.py
  part attention 330 python3 bench/bench_attention.py --cases 4096x4096,16384x16384,32760x32760 --rep 30 \
    --out "$OUT/attention_hopper.json"
}
gpu1() {  # issue 14: LoRA vs full, Wan2.1-1.3B 480p x 81
  part lora_13b 540 python3 bench/bench_lora.py --configs full,lora64,lora128 --iters 1 --json "$OUT/lora_13b.json"
}
gpu2() {  # issue 13: end-to-end sampling with the decode variants (teacher baseline in the same process)
  part sampling 545 python3 bench/bench_real.py --phases sampling --repeats 2 \
    --vae-variants fp32,bf16-cl3d-bench,bf16-cl3d-bench-chunk3,bf16-cl3d-bench-chunk5,bf16-cl3d-bench-compile,bf16-cl3d-bench-chunk5-compile \
    --out "$OUT/real_sampling.json"
}
gpu3() {  # issue 13: pyfunc on the GPU; issue 14: Wan2.1-14B LoRA on one GPU; issue 15: critic row
  PYTHONPATH=/tmp/site_mlflow:$PYTHONPATH part pyfunc_gpu 150 python3 -m pytest -q -m gpu -x -p no:cacheprovider \
    tests/test_export.py -k pyfunc_and_evaluate_decode_on_the_gpu
  part lora_14b 390 python3 bench/bench_lora.py --arch wan2.1-14b --configs lora64 --iters 0 --json "$OUT/lora_14b.json"
}
CUDA_VISIBLE_DEVICES=0 gpu0 > "$OUT/gpu0.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 gpu1 > "$OUT/gpu1.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=2 gpu2 > "$OUT/gpu2.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=3 gpu3 > "$OUT/gpu3.txt" 2>&1 &
wait
for g in 0 1 2 3; do echo "######## GPU $g"; cat "$OUT/gpu$g.txt"; done
