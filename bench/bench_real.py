"""Real-size speed and memory: Wan2.1-1.3B architecture, random weights, bf16, one GPU.

    python bench/bench_real.py [--teacher wan2.1-1.3b] [--frames 81 --height 480 --width 832]
                               [--phases steps,rcm,sampling,vae] [--ac none,full] [--repeats 2]
                               [--out bench/results/real.json]

Phases (each writes the JSON as it goes, so a killed run keeps what it measured):

* ``steps``: teacher forward (one sample; and the CFG pair), a plain fwd+bwd training step
  of the student (rectified-flow loss + AdamW: the baseline), the sCM student step with the
  fused tangent and with a separate JVP pass; for each activation-checkpointing mode in
  ``--ac`` (an out-of-memory is recorded as such).
* ``rcm``: the rCM student step (sCM + DMD through a 1-4 step rollout) and the critic step.
* ``primal``: primal-only attention (no tangent) on the project's kernel (``RCM_ATTN_PRIMAL=op``,
  before issue 15) and on the fastest backend (``auto``: FA3 if installed, else PyTorch's default
  SDPA): attention alone at this token count, the teacher's CFG-pair forward, the network's
  forward + backward (the critic's pass), the 4-step student sampling.
* ``sampling``: the 4-step student vs the teacher's 50-step x 2 (CFG) UniPC sampler, DiT only
  and followed by the Wan VAE decode to 81 x 480 x 832 pixels, for each decode variant in
  ``--vae-variants`` (``rcm_core.real.fast_vae``; error against the fp32 decode recorded).

Times are medians after one warm-up; memory is ``torch.cuda.max_memory_allocated`` over
the timed calls (weights, optimiser states and activations together). ``--tiny`` runs a
tiny config on the CPU to check the script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

GiB = 2 ** 30


def size_args(ap) -> None:
    """The benches' shared options: ``--teacher`` (a registered architecture, random weights) and the clip size
    ``--frames``/``--height``/``--width`` (default Wan2.1 480p: 81 x 480 x 832)."""
    ap.add_argument("--teacher", default="wan2.1-1.3b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)


TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32)   # --tiny


def build_teacher(name: str, frames: int, height: int, width: int, device, tiny: bool = False, layers: int = 0):
    """A :class:`rcm_core.teachers.Teacher` with the registered architecture and random weights."""
    import diffusers
    from rcm_core.denoiser import Parameterization
    from rcm_core.real import SPECS, diffusers_rf_call, install_rcm_attention
    from rcm_core.teachers import Teacher
    try:                                      # as the loader does (absent in trees before 2026-11-26)
        from rcm_core.real import install_fp32_time_embedding
    except ImportError:
        install_fp32_time_embedding = None

    spec = SPECS[name]
    cfg = dict(spec.transformer_config)
    if tiny:
        cfg.update(TINY_CONFIG)
    if layers:
        cfg.update(num_layers=layers)
    torch.manual_seed(0)
    host = torch.device(device).type == "cpu" and not tiny and not layers
    old_dtype = torch.get_default_dtype()
    if host:    # random init straight in bf16 in host memory (14B: 28 GB, not 56 GB of fp32 per process)
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            net = getattr(diffusers, spec.transformer_class)(**cfg)
    finally:
        torch.set_default_dtype(old_dtype)
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or [])   # as from_pretrained(torch_dtype=bf16)
    for n, p in list(net.named_parameters()) + list(net.named_buffers()):
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if keep.intersection(n.split(".")) else torch.bfloat16)
    net = net.eval().requires_grad_(False)
    install_rcm_attention(net)
    from rcm_core.nets.block_ops import install_fused_block_ops
    if install_fused_block_ops(net):      # unless RCM_NORM_KERNEL=0
        print("block ops: Triton LayerNorm/modulation/residual on CUDA (RCM_NORM_KERNEL=0 turns them off)", flush=True)
    if install_fp32_time_embedding is not None:
        install_fp32_time_embedding(net)
    lat = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return Teacher(name=f"{name}-random", version="random", net=net, param=Parameterization("rf", 1000.0),
                   encode_text=None, decode=None, latent_shape=lat, guidance=spec.guidance,
                   sample_steps=spec.sample_steps, shift=spec.shift, solver=spec.solver, preset=spec.preset,
                   call=diffusers_rf_call), cfg["text_dim"]


class Bench:
    def __init__(self, device, repeats: int, out: Path, meta: dict):
        self.dev, self.repeats, self.out = device, repeats, out
        self.rows: list[dict] = []
        self.meta = meta

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self, what: str, fn, repeats: int | None = None, warmup=None, **info) -> dict:
        """Median seconds of ``fn`` after one warm-up call (of ``warmup`` if given: same kernels, shorter)."""
        row = {"what": what, **info}
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        try:
            (warmup or fn)()
            self.sync()
            ts = []
            for _ in range(repeats or self.repeats):
                t0 = time.perf_counter()
                fn()
                self.sync()
                ts.append(time.perf_counter() - t0)
            row["s"] = statistics.median(ts)
            row["all_s"] = ts
        except torch.OutOfMemoryError as e:
            row["s"] = None
            row["error"] = "out of memory: " + str(e).split("\n")[0][:160]
        if self.dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(self.dev) / GiB
        self.rows.append(row)
        s = f"{row['s'] * 1e3:10.1f} ms" if row["s"] is not None else "       OOM   "
        mem = f"{row['peak_gib']:7.1f} GiB" if "peak_gib" in row else ""
        print(f"{what:58s} {s} {mem}", flush=True)
        self.save()
        return row

    def save(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1))


def vae_variant(vae, v: str, flag: str):
    """The Wan VAE prepared for decode as the variant name ``v`` says: options joined by ``-``: ``bf16`` (else
    float32), ``cl3d`` (channels-last 3-D), ``bench`` (cuDNN autotuning), ``compile``, ``chunk<N>`` (latent frames
    per decoder call); ``SystemExit`` naming ``flag`` for anything else."""
    from rcm_core.real.fast_vae import prepare_vae_for_decode

    opts = v.split("-")
    chunks = [int(o[5:]) for o in opts if o.startswith("chunk") and o[5:].isdigit()]
    unknown = [o for o in opts if o not in ("bf16", "fp32", "cl3d", "bench", "compile")
               and not (o.startswith("chunk") and o[5:].isdigit())]
    if unknown or len(chunks) > 1:
        raise SystemExit(f"{flag}: cannot parse {v!r} (options: bf16, fp32, cl3d, bench, compile, chunk<N>)")
    dtype = torch.bfloat16 if "bf16" in opts else torch.float32
    return prepare_vae_for_decode(vae, dtype, channels_last="cl3d" in opts, compile="compile" in opts,
                                  cudnn_benchmark="bench" in opts, chunk=chunks[0] if chunks else 1)


def primal_phase(b: Bench, teacher, x0, cond, uncond, dev) -> None:
    """Rows for primal-only attention on ``RCM_ATTN_PRIMAL=op`` (before) and ``auto`` (after)."""
    import os

    import torch.nn.functional as F
    from rcm_core.attention import attention, primal_backend
    from rcm_core.denoiser import TrigFlowDenoiser
    from rcm_core.sampling import sample_student

    den = TrigFlowDenoiser(teacher.net, teacher.param, teacher.call)
    C, T, H, W = teacher.latent_shape
    n_tok, heads = T * (H // 2) * (W // 2), teacher.net.config.num_attention_heads
    dh = teacher.net.config.attention_head_dim
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1, heads, n_tok, dh, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    t1 = torch.full((2,), 1.0, dtype=torch.float64, device=dev)
    params = [p for p in teacher.net.parameters() if p.dtype == torch.bfloat16]

    from rcm_core.parallel import ParallelConfig, parallelize
    parallelize(teacher.net, ParallelConfig(activation_checkpointing="full"))   # as the trainer's critic

    def fwd_bwd():                                          # the critic's pass: grads to the weights
        for p in params:
            p.requires_grad_(True)
        try:
            out = den(x0, t1[:1], cond)
            torch.autograd.backward(out.float().square().mean(), inputs=params)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    sdpa_ref = b.run(f"SDPA forward, default backend (B=1, H={heads}, N={n_tok}, D={dh})",
                     lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach()), kind="primal_ref")
    old = os.environ.get("RCM_ATTN_PRIMAL")
    res = {}
    try:
        for choice in ("op", "auto"):
            os.environ["RCM_ATTN_PRIMAL"] = choice
            cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (0, 0)
            name = primal_backend(dev.type, torch.bfloat16, (dh, dh), cap)
            tag = dict(kind="primal", choice=choice, backend=name)
            with torch.no_grad():
                res[choice, "attn"] = b.run(f"attention forward [{choice}: {name}]", lambda: attention(q, k, v), **tag)
            res[choice, "attn_bwd"] = b.run(f"attention forward + backward [{choice}: {name}]", lambda: torch.autograd.grad(
                attention(q, k, v).float().sum(), (q, k, v)), **tag)
            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
                res[choice, "teacher"] = b.run(f"teacher forward, CFG pair (batch 2) [{choice}: {name}]",
                                               lambda: den(torch.cat([x0, x0]), t1, torch.cat([cond, uncond])), **tag)
            with torch.autocast(dev.type, torch.bfloat16):
                res[choice, "critic"] = b.run(f"network forward + backward (critic pass) [{choice}: {name}]",
                                              fwd_bwd, **tag)
            res[choice, "sampling"] = b.run(f"student 4-step sampling (DiT only) [{choice}: {name}]",
                                            lambda: sample_student(den, cond, x0, 4), **tag)
    finally:
        if old is None:
            os.environ.pop("RCM_ATTN_PRIMAL", None)
        else:
            os.environ["RCM_ATTN_PRIMAL"] = old
    for what in ("attn", "attn_bwd", "teacher", "critic", "sampling"):
        before, after = res["op", what]["s"], res["auto", what]["s"]
        if before and after:
            b.meta[f"primal_speedup_{what}"] = before / after
    if sdpa_ref["s"] and res["op", "attn"]["s"]:
        b.meta["primal_kernel_fwd_x_sdpa"] = res["op", "attn"]["s"] / sdpa_ref["s"]


PEAK_CARDS = ("H100", "H200")   # one dense bf16 peak (flop_floor.PEAK_TFLOPS): the steps' share is given for these
_FLOOR_KEYS = {"full": "full_ac", "keep_attention": "keep_attention"}


def peak_shares(b: Bench, a) -> None:
    """Each step row's tensor-core work (``bench/flop_floor.py``: FLOPs counted on meta tensors, the step's passes
    as its ``step_floors`` counts them) as ``tflop``, ``tflops_per_s`` and, on an H100/H200, ``share_of_peak``:
    plain, fused sCM, rCM student at rollout 1 and the critic at step 11 (rollout 2), under AC full or
    keep_attention."""
    import flop_floor

    names = {("plain", None): "plain", ("scm", True): "scm_fused", ("rcm", 1): "rcm_student_rollout1",
             ("critic", None): "critic_rollout2"}

    def name(r):
        kind = r.get("kind")
        return names.get((kind, r.get("fused") if kind == "scm" else r.get("rollout")))

    wanted = [(r, name(r)) for r in b.rows if r.get("s") and r.get("ac") in _FLOOR_KEYS and name(r)]
    if not wanted:
        return
    over = {**(TINY_CONFIG if a.tiny else {}), **({"num_layers": a.layers} if a.layers else {})}
    fwd = flop_floor.dit_forward_flops(a.teacher, a.frames, a.height, a.width, overrides=over, text_len=512)
    floors = flop_floor.step_floors(fwd)
    peak = flop_floor.PEAK_TFLOPS["h200_bf16"] if any(c in str(b.meta.get("device", "")) for c in PEAK_CARDS) \
        else None
    for r, step in wanted:
        flop = floors[f"{step}_{_FLOOR_KEYS[r['ac']]}"]
        r["tflop"], r["tflops_per_s"] = flop / 1e12, flop / 1e12 / r["s"]
        if peak:
            r["share_of_peak"] = r["tflops_per_s"] / peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    size_args(ap)
    ap.add_argument("--phases", default="steps,rcm,sampling", help="any of primal,steps,rcm,sampling,vae")
    ap.add_argument("--ac", default="none,full", help="activation checkpointing for the steps phase: none, full, keep_attention, "
                    "selective:K (every K-th block)")
    ap.add_argument("--rcm-ac", default="full", help="activation checkpointing for the rcm phase (comma list: "
                    "full, keep_attention, ...)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--vae-variants", default="fp32,bf16,bf16-cl3d",
                    help="VAE decode variants, dash-joined options: fp32 (diffusers' decode, the reference) or "
                         "bf16/fp32 plus cl3d (channels_last_3d), bench (cuDNN autotuning), compile (torch.compile "
                         "of the decoder), chunk<N> (N latent frames per decoder call), e.g. bf16-cl3d-bench, "
                         "bf16-cl3d-bench-chunk5, bf16-cl3d-bench-chunk5-compile")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    ap.add_argument("--layers", type=int, default=0, help="transformer blocks (0: the architecture's); with --cpu, "
                    "the real width at a few blocks for the cast census")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --layers: the census at real width)")
    ap.add_argument("--out", default="bench/results/real.json")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the code version measured)")
    ap.add_argument("--teacher-fp8", action="store_true",
                    help="steps/rcm phases: the teacher's no-grad passes in FP8 (DistillConfig.teacher_fp8); rows get "
                         "teacher_fp8=True")
    ap.add_argument("--compile-nograd", action="store_true",
                    help="DistillConfig.compile_nograd=True (every network's no-grad passes through compiled blocks: "
                         "teacher targets, rollouts, the fake score's DMD pass); rows get compile_nograd: true")
    ap.add_argument("--fused-only", action="store_true", help="steps phase: no separate-JVP sCM row")
    ap.add_argument("--teacher-compile", action="store_true",
                    help="DistillConfig.teacher_compile=True (the teacher's blocks compiled for its no-grad passes); "
                         "rows get teacher_compile: true")
    ap.add_argument("--profile", action="store_true",
                    help="steps/rcm phases: after the timed calls, one call under torch.profiler (time by op class) "
                         "and one under a cast/copy census (bench/step_profile.py), stored in the row")
    a = ap.parse_args(argv)

    from rcm_core.config import DistillConfig
    from rcm_core.sampling import sample_student, sample_teacher
    from rcm_core.trainer import RCMTrainer

    dev = torch.device("cpu" if a.tiny or a.cpu else "cuda")
    teacher, text_dim = build_teacher(a.teacher, a.frames, a.height, a.width, dev, a.tiny, a.layers)
    n_params = sum(p.numel() for p in teacher.net.parameters())
    C, T, H, W = teacher.latent_shape
    tokens = T * (H // 2) * (W // 2)
    meta = {"teacher": a.teacher, "weights": "random", "params": n_params, "layers": a.layers or None, "latent_shape": [C, T, H, W],
            "tokens": tokens, "pixels": [a.frames, a.height, a.width], "batch": 1, "dtype": "bfloat16 (autocast, fp32 master weights)",
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "label": a.label,
            "env": {k: os.environ[k] for k in ("RCM_ROPE_KERNEL", "RCM_ROPE_SPLIT", "RCM_NORM_KERNEL",
                                               "RCM_ATTN_PRIMAL") if k in os.environ}}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    b = Bench(dev, a.repeats, Path(a.out), meta)
    print(f"{a.teacher} random weights, {n_params / 1e9:.2f}B params, latents {tuple(teacher.latent_shape)}, "
          f"{tokens} tokens, {meta['device']}, torch {torch.__version__}", flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64)
    cond = torch.randn((1, 512, text_dim), generator=g, device=dev)
    uncond = torch.randn((1, 512, text_dim), generator=g, device=dev)
    phases = a.phases.split(",")
    base = dict(batch_size=1, dtype="bfloat16", tangent_warmup_steps=0, student_update_freq=2,
                teacher_fp8=a.teacher_fp8, teacher_compile=a.teacher_compile, compile_nograd=a.compile_nograd)
    fp8 = {k: True for k in ("teacher_fp8", "teacher_compile", "compile_nograd") if getattr(a, k)}

    def profiled(row: dict, fn, params) -> None:
        """--profile: the op-class profile and the cast census of one more call, in ``row``."""
        if not a.profile or row.get("s") is None:
            return
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from step_profile import cast_census, format_profile, profile_call
        row["profile"] = profile_call(fn, dev)
        row["census"] = cast_census(fn, params)
        print(format_profile(row["what"], row["profile"], row["census"]), flush=True)
        b.save()

    def step_fn(tr, step):
        def run():
            tr.step = step
            (tr.student_step if tr.is_student_step() else tr.critic_step)(x0, cond, uncond)
        return run

    if "primal" in phases:
        primal_phase(b, teacher, x0, cond, uncond, dev)

    if "steps" in phases:
        for ac in a.ac.split(","):
            mode, _, every = ac.partition(":")
            tr = RCMTrainer(teacher, DistillConfig.preset(teacher.preset, method="scm", activation_checkpointing=mode,
                                                          ac_every=int(every or 2), **base), device=dev)
            den = tr.teacher
            t1 = torch.full((1,), 1.0, dtype=torch.float64, device=dev)
            if ac == a.ac.split(",")[0]:
                with torch.no_grad(), tr._amp():
                    b.run("teacher forward (1 sample)", lambda: den(x0, t1, cond))
                    b.run("teacher forward, CFG pair (batch 2)",
                          lambda: den(torch.cat([x0, x0]), torch.cat([t1, t1]), torch.cat([cond, uncond])))
            net, opt = tr.student.net, tr.opt_student

            def plain_step():
                s = torch.rand(1, device=dev, generator=g, dtype=torch.float64)
                eps = torch.randn_like(x0)
                x_s = (1 - s) * x0 + s * eps
                with tr._amp():
                    v = tr.student.call(net, x_s.to(torch.float32), 1000 * s.float(), cond)
                loss = ((v.float() - (eps - x0).float()) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            trained = list(net.parameters())
            profiled(b.run(f"plain fwd+bwd step [AC {ac}]", plain_step, kind="plain", ac=ac), plain_step, trained)
            for fused in (True,) if a.fused_only else (True, False):
                tr.cfg = tr.cfg.replace(fused_tangent=fused)
                profiled(b.run(f"sCM student step, {'fused' if fused else 'separate JVP'} tangent [AC {ac}]",
                               step_fn(tr, 10), kind="scm", fused=fused, ac=ac, **fp8), step_fn(tr, 10), trained)
            del tr, den, net, opt
            gc.collect()

    if "rcm" in phases:
        for rcm_ac in a.rcm_ac.split(","):
            tr = RCMTrainer(teacher, DistillConfig.preset(teacher.preset, method="rcm", activation_checkpointing=rcm_ac,
                                                          **base), device=dev)
            # The rollout length n is fixed per row so that trees of different versions compare: the current
            # trainer cycles n over each network's own updates (H = 0, K = 2: student step s has n = s/2 % 4 + 1),
            # the version before 2026-11-26 used n = s % 4 + 1 of the shared step (only n = 1, 3 for students).
            own_counts = hasattr(tr, "updates_before")
            trained = list(tr.student.parameters()) + list(tr.fake.parameters())
            for n in (1, 3):
                step = 2 * (n - 1) if own_counts else n - 1
                row = b.run(f"rCM student step (sCM + DMD, rollout {n}) [AC {rcm_ac}]", step_fn(tr, step),
                            repeats=a.repeats, kind="rcm", rollout=n, ac=rcm_ac, **fp8)
                if n == 1:
                    profiled(row, step_fn(tr, step), trained)
            profiled(b.run(f"critic step (rollout from step 11, fake-score fwd+bwd) [AC {rcm_ac}]", step_fn(tr, 11),
                           repeats=a.repeats, kind="critic", ac=rcm_ac, **fp8), step_fn(tr, 11), trained)
            del tr
            gc.collect()

    if "sampling" in phases or "vae" in phases:
        import diffusers
        from rcm_core.denoiser import TrigFlowDenoiser
        den = TrigFlowDenoiser(teacher.net, teacher.param, teacher.call)   # bf16 weights, as deployed
        noise = torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64)
        from rcm_core.real.fast_vae import decode, decode_error
        with torch.device(dev):
            vae = diffusers.AutoencoderKLWan(**({"base_dim": 8} if a.tiny else {})).eval().requires_grad_(False)
        student = lambda: sample_student(den, cond, noise, 4)
        teach = lambda: sample_teacher(den, cond, uncond, noise, steps=a.teacher_steps, guidance=teacher.guidance,
                                       shift=teacher.shift, solver="unipc")
        dit = "sampling" in phases                    # "vae" alone: decode variants only
        if dit:
            rs = b.run("student 4-step sampling (DiT only)", student, kind="student_dit")
            warm = lambda: sample_teacher(den, cond, uncond, noise, steps=2, guidance=teacher.guidance,
                                          shift=teacher.shift, solver="unipc")
            rt = b.run(f"teacher {a.teacher_steps}-step x 2 CFG UniPC sampling (DiT only)", teach, repeats=1,
                       warmup=warm, kind="teacher_dit")
            z = student().float()
            b.meta["speedup_dit"] = rt["s"] / rs["s"]
        else:
            z = noise.float()
        vaes = {"fp32": vae}
        for v in a.vae_variants.split(","):
            if v == "fp32":
                continue
            vaes[v] = vae_variant(vae, v, "--vae-variants")
        for v, m in vaes.items():
            info = {"kind": "vae", "variant": v}
            if v != "fp32":
                info["rel_err_vs_fp32"] = decode_error(m, vae, z)
            rv = b.run(f"Wan VAE decode {v}", lambda m=m: decode(m, z), **info)
            if rv["s"] and dit:
                b.meta[f"speedup_with_vae_{v}"] = (rt["s"] + rv["s"]) / (rs["s"] + rv["s"])
        best = min((r for r in b.rows if r.get("kind") == "vae" and r["s"]), key=lambda r: r["s"])
        m = vaes[best["variant"]]
        e2e = {"s": None} if not dit else b.run(f"student 4-step + VAE decode {best['variant']} (measured together)",
                    lambda: decode(m, student()), kind="student_e2e", variant=best["variant"])
        if e2e["s"]:
            b.meta["speedup_end_to_end_measured"] = (rt["s"] + best["s"]) / e2e["s"]
            b.meta["frames_per_s_end_to_end_4step"] = a.frames / e2e["s"]
            for n in (2, 1):        # fewer student steps, the same decode, measured together
                rn = b.run(f"student {n}-step + VAE decode {best['variant']} (measured together)",
                           lambda n=n: decode(m, sample_student(den, cond, noise, n)), kind="student_e2e",
                           variant=best["variant"], steps=n)
                if rn["s"]:
                    b.meta[f"speedup_end_to_end_measured_{n}step"] = (rt["s"] + best["s"]) / rn["s"]
                    b.meta[f"frames_per_s_end_to_end_{n}step"] = a.frames / rn["s"]

    plain = {r["ac"]: r["s"] for r in b.rows if r.get("kind") == "plain" and r["s"]}
    for r in b.rows:
        if r.get("kind") in ("scm", "rcm", "critic") and r["s"] and r.get("ac") in plain:
            r["x_plain_same_ac"] = r["s"] / plain[r["ac"]]
    if plain:
        best_plain = min(plain.values())
        for r in b.rows:
            if r.get("kind") in ("scm", "rcm", "critic") and r["s"]:
                r["x_fastest_plain"] = r["s"] / best_plain
    peak_shares(b, a)
    b.save()
    print("\nratios:")
    for r in b.rows:
        if "x_plain_same_ac" in r:
            print(f"  {r['what']:58s} {r['x_plain_same_ac']:5.2f}x plain (same AC), {r['x_fastest_plain']:5.2f}x fastest plain")
    for r in b.rows:
        if "tflops_per_s" in r:
            share = f", {100 * r['share_of_peak']:.1f} % of the dense bf16 peak" if "share_of_peak" in r else ""
            print(f"  {r['what']:58s} {r['tflop']:8.1f} TFLOP, {r['tflops_per_s']:6.1f} TFLOP/s{share}")
    for k, v in b.meta.items():
        if k.startswith(("speedup", "primal_", "frames_per_s")):
            print(f"  {k}: {v:.1f}" + ("" if k.startswith("frames_per_s") else "x"))
    return b.meta


if __name__ == "__main__":
    main()
