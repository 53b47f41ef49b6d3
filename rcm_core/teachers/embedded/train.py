"""Train the embedded teacher: a rectified-flow VideoDiT on moving-digit clips.

    python -m rcm_core.teachers.embedded.train --steps 1200 --batch 32 --out rcm_core/teachers/embedded/assets

Objective: ``s ~ mix(logit-normal(0, 1), uniform)``, ``x_s = (1 - s) x0 + s eps``,
target ``v = eps - x0``, MSE; the network sees ``timestep = 1000 s``. CFG dropout:
with probability ``--cfg-drop`` the text embedding is replaced by the empty-prompt
embedding ``encode([""])``. AdamW with linear warm-up; an EMA of the weights is saved
as the teacher (``teacher.safetensors`` + ``teacher.json``). Checkpoints are written
every ``--save-every`` steps, so a stopped run still leaves a usable teacher.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from rcm_core.teachers.embedded import data as D
from rcm_core.teachers.embedded.dit import VideoDiT, VideoDiTConfig
from rcm_core.teachers.embedded.text import TextEncoder

DEFAULT_CONFIG = VideoDiTConfig(dim=96, heads=2, layers=4, ffn_dim=384, text_dim=64, freq_dim=64)


def sample_s(n: int, gen: torch.Generator, uniform_frac: float = 0.25) -> torch.Tensor:
    """RF time: logit-normal(0, 1), mixed with uniform so the ends are covered."""
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    un = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < uniform_frac
    return torch.where(pick, un, ln).clamp(1e-4, 1 - 1e-4)


def save_teacher(ema: VideoDiT, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in ema.state_dict().items()}
    tmp = out / "teacher.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "teacher.safetensors")
    (out / "teacher.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", type=str, default="cpu", help="cpu (default) or cuda; data and noise are drawn on the CPU either way")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this wall time; 0 = off")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--dim", type=int, default=DEFAULT_CONFIG.dim)
    ap.add_argument("--heads", type=int, default=DEFAULT_CONFIG.heads)
    ap.add_argument("--layers", type=int, default=DEFAULT_CONFIG.layers)
    ap.add_argument("--ffn-dim", type=int, default=DEFAULT_CONFIG.ffn_dim)
    ap.add_argument("--out", type=str, default=str(Path(__file__).parent / "assets"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = VideoDiTConfig(dim=args.dim, heads=args.heads, layers=args.layers, ffn_dim=args.ffn_dim,
                         text_dim=64, freq_dim=DEFAULT_CONFIG.freq_dim)
    dev = torch.device(args.device)
    net = VideoDiT(cfg).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False)
    enc = TextEncoder(dim=cfg.text_dim)
    prompts = D.embedded_prompts()
    table = enc.encode(prompts).to(dev)  # (80, L, D)
    index = {p: i for i, p in enumerate(prompts)}
    empty = enc.encode([""])[0].to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    out = Path(args.out)
    cmd = "python -m rcm_core.teachers.embedded.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"[train] {cmd}\n[train] config {cfg.to_dict()}  params {net.num_params()}", flush=True)

    t0 = time.time()
    smooth = None
    losses = []
    step = 0
    bar = tqdm(range(1, args.steps + 1), mininterval=10, file=sys.stdout)
    for step in bar:
        clips, ps, _ = D.make_clips(args.batch, seed=args.seed * 1_000_003 + step)
        x0 = D.to_latent(clips).to(dev)
        ctx = table[torch.tensor([index[p] for p in ps])]
        drop = (torch.rand(args.batch, generator=gen) < args.cfg_drop).to(dev)
        ctx = torch.where(drop[:, None, None], empty[None], ctx)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        s = sample_s(args.batch, gen).to(dev)
        sb = s.view(-1, 1, 1, 1, 1)
        xs = (1 - sb) * x0 + sb * eps
        v = net(xs, 1000.0 * s, ctx)
        loss = (v - (eps - x0)).pow(2).mean()
        lr = args.lr * min(1.0, step / max(1, args.warmup))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        li = loss.item()
        losses.append(li)
        smooth = li if smooth is None else 0.98 * smooth + 0.02 * li
        if step % args.log_every == 0 or step == 1:
            print(f"[train] step {step} loss {li:.4f} smooth {smooth:.4f} gnorm {gn:.3f} lr {lr:.2e} "
                  f"elapsed {time.time() - t0:.0f}s", flush=True)
        stop = args.max_minutes > 0 and time.time() - t0 > 60 * args.max_minutes
        if step % args.save_every == 0 or step == args.steps or stop:
            meta = {
                "model_config": cfg.to_dict(),
                "data_config": D.DATA_CONFIG,
                "text_encoder": {"class": "rcm_core.embedded.text.TextEncoder", "dim": enc.dim,
                                 "max_tokens": enc.max_tokens, "seed": enc.seed},
                "training_command": cmd,
                "args": vars(args),
                "objective": "rectified flow: x_s=(1-s)x0+s*eps, v=eps-x0, timestep=1000*s, MSE; "
                             "s ~ 0.75 logit-normal(0,1) + 0.25 uniform; CFG dropout to encode([''])",
                "steps": step,
                "final_loss": li,
                "final_loss_smoothed": smooth,
                "mean_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
                "seed": args.seed,
                "torch_version": torch.__version__,
                "train_seconds": round(time.time() - t0, 1),
                "threads": args.threads,
                "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
                "num_params": net.num_params(),
                "weights": "EMA of the trained weights (fp32)",
            }
            save_teacher(ema, out, meta)
            print(f"[train] saved {out}/teacher.safetensors at step {step}", flush=True)
        if stop:
            print(f"[train] stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    print(f"[train] done: {step} steps in {time.time() - t0:.0f}s, final loss {losses[-1]:.4f}, "
          f"smoothed {smooth:.4f}", flush=True)


if __name__ == "__main__":
    main()
