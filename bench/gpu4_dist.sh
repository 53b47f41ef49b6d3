#!/usr/bin/env bash
# Calls on a 4-GPU machine (NCCL, one host), issue 11: `bash bench/gpu4_dist.sh tests|fused|14b-lora|14b-full ...`
#   tests     the -m gpu NCCL tests (FSDP2 vs data parallel, FSDP2 x CP, DCP under CP)
#   fused     Wan2.1-1.3B sCM step under FSDP2 x 4: fused tangent vs the separate no-grad pass (same call)
#   14b-lora  Wan2.1-14B, 480p x 81, FSDP2 x CP4: rCM with LoRA rank 64 (the row measured in session 5)
#   14b-full  the same with full fine-tuning, sCM alone (the memory model says it does not fit: OOM rows)
source bench/gpu_common.sh
export OMP_NUM_THREADS=8
TR="python3 -m torch.distributed.run --nproc_per_node 4"
for what in "$@"; do case $what in
  tests)
    part gpu_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fsdp.py tests/test_cp_trainer.py ;;
  fused)
    part scm_sep 150 $TR bench/bench_scale.py --fsdp --method scm --K 1 --iterations 3 --out "$OUT/scale_fused.json"
    part scm_fused 150 $TR bench/bench_scale.py --fsdp --fused --method scm --K 1 --iterations 3 --out "$OUT/scale_fused.json" ;;
  14b-lora)
    part 14b_rcm_lora64 330 $TR bench/bench_scale.py --teacher wan2.1-14b --fsdp --fused --lora 64 --cp 4 --K 2 \
      --iterations 1 --out "$OUT/scale_14b.json" ;;
  14b-full)
    part 14b_scm_full 240 $TR bench/bench_scale.py --teacher wan2.1-14b --fsdp --fused --method scm --cp 4 --K 1 \
      --iterations 1 --out "$OUT/scale_14b.json" ;;
esac; done
ls "$OUT"; cat "$OUT"/*.oom.* 2>/dev/null | head -40
