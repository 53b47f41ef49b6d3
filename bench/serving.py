"""Serving speed and its quality cost (issue 23): the student's few-step sampler + Wan VAE decode, end to end,
under each serving option (``rcm_core.nets.serving.ServingOptions``), against the plain bf16 path measured in
the same process.

    python bench/serving.py [--teacher wan2.1-1.3b] [--frames 81 --height 480 --width 832]
        [--variants bf16,fp8-dynamic,fp8-static,compile,fp8-static+compile] [--steps 4,2,1]
        [--decode bf16-cl3d-chunk5] [--clips 4] [--repeats 3] [--out bench/results/serving.json]

For each variant a fresh network with the same random weights (seed 0) is built, the option applied as the
registered model applies it (``apply_serving_options``), then:

* ``first_call_s``: the first 4-step clip (sampling + decode) after loading: compilation and autotuning included;
* ``student_dit`` rows: the 4-step sampler alone (median of ``--repeats``);
* ``student_e2e`` rows: sampler + decode measured together, for each of ``--steps`` (keys ``steps``, ``fp8``,
  ``compile``; the rows of ``bench_real.py --phases sampling`` have the same kind), with frames/s;
* quality against the bf16 variant, same noise: relative L2 of the latents and of the decoded clip, and the
  clip's PSNR (pixels in [0, 1]);
* ``student_request`` rows (``--clips N`` > 1): a request of N 4-step clips (N noises) as the registered model
  serves it, each clip decoded and copied to the host, with the ``overlap`` option off and on
  (``rcm_core.nets.overlap``: clip k decodes on a worker thread and CUDA stream while clip k+1 samples), the
  same clips either way (``max_abs_diff_vs_overlap_off``), with frames/s over the request.

Static FP8 scales are calibrated as a flow run calibrates them: the network's own activations while it samples
(here 2 other noises at 4 steps; ``rcm_core.nets.fp8.activation_scales``). The weights are random: the
quality numbers say how far FP8 moves a network's output, not a trained student's FD (the embedded quality
benchmark measures that). ``--tiny`` checks the script on the CPU (FP8 emulated, ``RCM_FP8_EMULATE=1``).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real import Bench, build_teacher, size_args, vae_variant  # noqa: E402


def parse_variant(v: str):
    """``bf16`` | ``fp8-dynamic`` | ``fp8-static`` | ``compile`` | ``compile-<mode>`` | ``sta:t..:w..`` (sliding-tile
    self-attention, the ``sparse`` option), joined with ``+``: :func:`rcm_core.nets.serving.parse_variant`,
    its error as the command's."""
    from rcm_core.nets.serving import parse_variant as parse

    try:
        return parse(v)
    except ValueError as e:
        raise SystemExit(f"--variants: {e}") from None


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((a.double() - ref.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser("bench/serving.py")
    size_args(ap)
    ap.add_argument("--variants", default="bf16,fp8-dynamic,fp8-static,compile,fp8-static+compile")
    ap.add_argument("--steps", default="4,2,1")
    ap.add_argument("--decode", default="bf16-cl3d-chunk5", help="decode variant, as bench_real.py --vae-variants: bf16 (else fp32), cl3d, bench, compile, chunk<N>")
    ap.add_argument("--clips", type=int, default=0,
                    help="also time a request of this many 4-step clips, overlap off and on (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    ap.add_argument("--out", default="bench/results/serving.json")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)

    import diffusers
    from rcm_core.denoiser import TrigFlowDenoiser
    from rcm_core.nets.fp8 import activation_scales, fp8_layers
    from rcm_core.nets.serving import apply_serving_options
    from rcm_core.real.fast_vae import decode
    from rcm_core.sampling import sample_student

    dev = torch.device("cpu" if a.tiny else "cuda")
    if a.tiny:
        os.environ.setdefault("RCM_FP8_EMULATE", "1")
    variants = [(v, parse_variant(v)) for v in a.variants.split(",")]
    if variants[0][0] != "bf16":
        raise SystemExit("--variants: the first variant must be bf16 (the baseline the others are compared with)")
    steps = [int(s) for s in a.steps.split(",")]
    teacher, text_dim = build_teacher(a.teacher, a.frames, a.height, a.width, dev, a.tiny)
    C, T, H, W = teacher.latent_shape
    meta = {"teacher": a.teacher, "weights": "random", "latent_shape": [C, T, H, W], "tokens": T * (H // 2) * (W // 2),
            "pixels": [a.frames, a.height, a.width], "batch": 1, "decode": a.decode,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"), "label": a.label}
    b = Bench(dev, a.repeats, Path(a.out), meta)
    print(f"{a.teacher}, latents {(C, T, H, W)}, {meta['tokens']} tokens, {meta['device']}, torch {torch.__version__}",
          flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    noise = torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64)
    cond = torch.randn((1, 512, text_dim), generator=g, device=dev)
    calib = [torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64) for _ in range(2)]

    with torch.device(dev):
        vae = diffusers.AutoencoderKLWan(**({"base_dim": 8} if a.tiny else {})).eval().requires_grad_(False)
    vae = vae_variant(vae, a.decode, "--decode")

    def to_pixels(lat):
        return ((decode(vae, lat.float()) + 1) / 2).clamp(0, 1)

    ref = {}
    for name, opts in variants:
        if name != "bf16":          # a fresh network with the same weights (the options change it in place)
            del teacher
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            teacher, _ = build_teacher(a.teacher, a.frames, a.height, a.width, dev, a.tiny)
        den = TrigFlowDenoiser(teacher.net, teacher.param, teacher.call)
        scales = None
        if opts.fp8 == "static":
            t0 = time.perf_counter()
            with torch.no_grad(), activation_scales(den.net) as scales:
                for z in calib:
                    sample_student(den, cond, z, 4)
            b.meta[f"calibration_s_{name}"] = time.perf_counter() - t0
        apply_serving_options(den, opts, scales)
        info = {"variant": name, "fp8": opts.fp8, "compile": opts.compile, "fp8_layers": len(fp8_layers(den.net))}

        def clip(n, den=den):
            with torch.no_grad():      # the same renoising noise in every variant
                lat = sample_student(den, cond, noise, n, generator=torch.Generator(device=dev).manual_seed(1))
                return lat, to_pixels(lat)

        b.sync()
        t0 = time.perf_counter()
        lat, px = clip(4)
        b.sync()
        first = time.perf_counter() - t0
        print(f"{name}: first 4-step clip after loading {first:.2f} s", flush=True)
        if name == "bf16":
            ref = {"lat": lat.float().cpu(), "px": px.float().cpu()}
            quality = {}
        else:
            quality = {"rel_l2_latents_vs_bf16": rel_l2(lat.float().cpu(), ref["lat"]),
                       "rel_l2_clip_vs_bf16": rel_l2(px.float().cpu(), ref["px"]),
                       "psnr_clip_vs_bf16_db": psnr(px.float().cpu(), ref["px"])}
            print("   " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()), flush=True)
        del lat, px
        with torch.no_grad():
            b.run(f"[{name}] student 4-step sampling (DiT only)", lambda: sample_student(den, cond, noise, 4),
                  kind="student_dit", steps=4, first_call_s=first, **info, **quality)
        for n in steps:
            row = b.run(f"[{name}] student {n}-step + decode {a.decode} (measured together)", lambda n=n: clip(n),
                        kind="student_e2e", steps=n, first_call_s=first, **info, **quality)
            if row["s"]:
                row["frames_per_s"] = a.frames / row["s"]
        if a.clips > 1:
            request_rows(b, a, den, cond, info, lambda lat: to_pixels(lat).cpu(), dev)
        b.save()
        del den

    print("\nstudent_e2e (s; frames/s):")
    for r in b.rows:
        if r["kind"] == "student_e2e" and r["s"]:
            print(f"  {r['variant']:24s} {r['steps']} steps  {r['s']:7.3f} s  {r['frames_per_s']:6.1f} f/s")
        if r["kind"] == "student_request" and r["s"]:
            print(f"  {r['variant']:24s} {r['clips']} clips, overlap {r['overlap']:3s} {r['s']:7.3f} s  "
                  f"{r['frames_per_s']:6.1f} f/s")
    return b.meta


def request_rows(b, a, den, cond, info, decode, dev):
    """``student_request`` rows: ``a.clips`` 4-step clips of other noises, decoded to host memory, overlap off
    then on (the registered model's predict loop), and the largest difference between the two requests' clips."""
    from rcm_core.nets.overlap import OverlappedDecode
    from rcm_core.sampling import sample_student

    C, T, H, W = b.meta["latent_shape"]
    noises = [torch.randn((1, C, T, H, W), generator=torch.Generator(device=dev).manual_seed(100 + i), device=dev,
                          dtype=torch.float64) for i in range(a.clips)]
    clips = {}

    def request(overlap):
        with torch.no_grad(), OverlappedDecode(decode, dev, enabled=overlap == "on") as dec:
            for z in noises:
                dec.submit(sample_student(den, cond, z, 4, generator=torch.Generator(device=dev).manual_seed(1)).float())
            clips[overlap] = dec.results()

    for overlap in ("off", "on"):
        row = b.run(f"[{info['variant']}] request of {a.clips} 4-step clips + decode, overlap {overlap}",
                    lambda o=overlap: request(o), kind="student_request", steps=4, clips=a.clips, overlap=overlap,
                    **info)
        if row["s"]:
            row["frames_per_s"] = a.clips * a.frames / row["s"]
    if len(clips) == 2:
        b.rows[-1]["max_abs_diff_vs_overlap_off"] = max(float((x - y).abs().max())
                                                          for x, y in zip(clips["on"], clips["off"]))


if __name__ == "__main__":
    main()
