"""Cast/copy census of the plain and fused sCM steps on the CPU: Wan2.1-1.3B width, 2 blocks, 120 and 480 tokens
(bench/step_profile.py). Device-independent for what runs the same code on CPU and CUDA (parameter casts and
their gradients); the CPU-only attention and norm paths add activation casts that CUDA kernels do inside.

    PYTHONPATH=$PWD:$PWD/kernels:$PWD/steps python bench/census_cpu.py > bench/results/census_cpu.txt
"""
import sys, json, torch
sys.path.insert(0, "bench")
import bench_real
from step_profile import cast_census
from rcm_core.config import DistillConfig
from rcm_core.trainer import RCMTrainer
dev = torch.device("cpu")
for hw in ((96, 160), (192, 320)):
    teacher, text_dim = bench_real.build_teacher("wan2.1-1.3b", 5, hw[0], hw[1], dev, False, 2)
    C, T, H, W = teacher.latent_shape
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, C, T, H, W), generator=g, dtype=torch.float64)
    cond = torch.randn((1, 512, text_dim), generator=g); uncond = torch.randn((1, 512, text_dim), generator=g)
    tr = RCMTrainer(teacher, DistillConfig.preset(teacher.preset, method="scm", activation_checkpointing="full", batch_size=1,
                    dtype="bfloat16", tangent_warmup_steps=0, student_update_freq=2), device=dev)
    net, opt = tr.student.net, tr.opt_student
    def plain():
        s = torch.rand(1, generator=g, dtype=torch.float64); eps = torch.randn_like(x0); xs = (1 - s) * x0 + s * eps
        with tr._amp():
            v = tr.student.call(net, xs.float(), 1000 * s.float(), cond)
        loss = ((v.float() - (eps - x0).float()) ** 2).mean(); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    def scm():
        tr.step = 10; tr.student_step(x0, cond, uncond)
    for name, fn in (("plain", plain), ("scm_fused", scm)):
        fn()
        c = cast_census(fn, net.parameters())
        print("==", name, T * (H // 2) * (W // 2), "tokens", json.dumps({k: round(v["gb"], 3) for k, v in c["kinds"].items()}))
        for k, v in c["top_sites_gb"].items():
            print(f"   {v:7.3f} GB  {k}")
