#!/usr/bin/env bash
# Issue 22, first device call (written 2026-12-04 in a session without a device; NOT YET RUN):
# the GPU paths of this session's cuts, then the profile of every step kind with the cast census.
# Usage (GPU machine, repo root, wheels from bench/device_wheels.sh in .whl/):  OUT=$OUT bash bench/gpu_issue22.sh [PARTS]
# PARTS: "1 2" (first call, ~510 s) or "3 4" (second call, ~500 s); a call may run 600 s at most. Default: all.
PARTS=${1:-"1 2 3 4"}
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
. bench/gpu_common.sh
# 1. the fused RMSNorm path, the start checks and the Hopper kernel (now the default on sm90) on CUDA
want 1 && part gpu_tests 150 bash -c 'python3 -m pytest -q -p no:cacheprovider tests/test_norms.py tests/test_attention_request.py \
  "tests/test_real_teachers.py::test_bf16_autocast_step_with_project_attention"; python3 -m pytest -q -p no:cacheprovider \
  -m gpu tests/test_kernel_flash_jvp_hopper.py tests/test_norms.py' 
# the Hopper default only if its GPU tests passed in this call (else the step rows run the portable kernel)
want 1 && { grep -q -E "[0-9]+ passed" "$OUT/gpu_tests.log" && ! grep -q -E "[0-9]+ (failed|error)" "$OUT/gpu_tests.log" \
  || { export RCM_ATTN_KERNEL=portable; echo "gpu tests failed: RCM_ATTN_KERNEL=portable for the rows"; }; }
# 2. step times with their op-class profile and cast census (plain, sCM fused/separate, rCM n=1/3, critic)
want 2 && part steps 420 python3 bench/bench_real.py --phases steps,rcm --ac full --repeats 2 --profile \
  --out "$OUT/real_steps_profile.json" --label "issue22-cuts-1"
# 3. the FP8 teacher option (DistillConfig.teacher_fp8): the same rows with teacher_fp8=True
want 3 && part steps_fp8 300 python3 bench/bench_real.py --phases steps,rcm --ac full --repeats 2 --teacher-fp8 \
  --out "$OUT/real_steps_fp8.json" --label "issue22-teacher-fp8"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true
# 4. the FP8 teacher's error on g and on the DMD direction against bf16, same inputs
want 4 && part fp8_error 200 python3 bench/fp8_teacher_error.py --samples 4 --critic-steps 8 --out "$OUT/fp8_teacher_error.json"
tar czf "$OUT/results.tgz" -C "$OUT" . 2>/dev/null || true

