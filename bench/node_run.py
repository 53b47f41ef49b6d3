"""Issue 16's node run as one script: the distill entrypoint launched exactly as the flow launches it
on a node (torchrun through ``rcm_steps.launcher.run_torchrun``, ``python -m rcm_steps.distill``),
on an architecture with random weights.

    # the run (one 8-GPU node: nvidia-h100-x8 / nvidia-h200-x8)
    python bench/node_run.py --device cuda --parts rcm,scaling,kill,hsdp
    # the rehearsal on the CPU (gloo, tiny Wan-shaped configuration, 8 ranks)
    OMP_NUM_THREADS=1 python bench/node_run.py --device cpu --tiny --parts rcm

Parts (``--parts``, in this order; each prints a table and adds to ``--out`` as soon as it has a row,
so a killed script keeps what it measured):

* ``rcm``: the rCM iteration (1 student step + K - 1 critic steps, K of the preset) with the parallel
  plan of the 14B preset: FSDP2 over all ranks, context parallel as ``rcm_steps.teacher.plan_mesh``
  picks for the GPU run (Wan2.1-14B at 480p x 81 on ``--nproc`` x ``--gpu-mem-gib``), full activation
  checkpointing; ``--arch`` (default wan2.1-14b) on the GPU, a tiny Wan-shaped configuration with 8
  heads on the CPU (``--tiny``). Reports s per rCM iteration, train steps/s, peak memory per rank
  (CUDA ``max_memory_allocated``; on the CPU the max RSS of each worker process) and the memory
  model's prediction (``plan_mesh``) beside it.
* ``scaling``: ``--scaling-arch`` (wan2.1-1.3b; tiny on the CPU) with its preset's plan on 1, 2, 4, 8
  ranks, batch 1 per data-parallel rank: samples/s and scaling efficiency (samples/s per rank
  relative to 1 rank).
* ``kill``: FSDP (+ CP 2) on ``--nproc`` ranks with sharded DCP checkpoints every ``--ckpt-every``
  steps: SIGKILL of one worker once the first checkpoint is complete; the retried launch (same
  ``--out``, as Metaflow's ``@retry``) must resume from the newest complete checkpoint, lose at most
  the checkpoint interval, and give the same per-step losses and final EMA weights as an
  uninterrupted run (the trainer's randomness is keyed by (seed, step, global sample index) and the
  batch draw by (seed, step, data-parallel rank)); then the 8-rank checkpoint resumes on ``--nproc // 2``
  ranks (resharded DCP load; checked: the step it resumes at, finite losses; not compared with a
  run: the batch draw depends on the data-parallel world size).
* ``hsdp``: two "nodes" on one machine: two torchrun gangs of ``--nproc // 2`` ranks with
  ``--nnodes 2 --node_rank 0/1`` and node 0's store on 127.0.0.1 (the flow's ``--nodes 2`` command,
  ``flows/distill_flow.py`` ``distill``), HSDP (``fsdp_shard_size`` = ranks per node: replicate over
  nodes, shard within); the per-step losses and final EMA weights must equal the single-node run of
  the same configuration (the kill part's uninterrupted run, reused when present).

The teacher is a random-weight checkpoint in diffusers layout written to ``--work`` (the transformer of
the chosen architecture, a small UMT5 encoder, tokenizer and VAE of the right factors), given as
``--teacher <dir>``; the cache is synthetic latents of the teacher's shape in the cache's shard format.
Per-step metrics come from the MLflow run the entrypoint logs to (``--mlflow-run-id``, a sqlite store
in ``--work``), peak memory from ``result.json`` (``peak_memory``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30

# tiny Wan-shaped transformer: 8 heads (CP up to 8), 2 blocks; with the tiny VAE (factors 2 / 2) and
# 5 x 32 x 32 pixels: latents (4, 3, 16, 16) -> 3 x 8 x 8 = 192 tokens (divisible by 8)
TINY_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
                        freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
TINY_SIZE = dict(frames=5, height=32, width=32, text_len=16)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True],
                latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
WORDS = "a cat dog red blue runs on the beach sky video of big small".split()


# ----------------------------------------------------------------------------- teacher and cache
def write_teacher(root: Path, arch: str, tiny: bool, device: str) -> Path:
    """A random-weight checkpoint of ``arch`` (or the tiny configuration) in diffusers layout under ``root``."""
    import diffusers
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from rcm_core.real.specs import SPECS

    if (root / "model_index.json").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spec = SPECS[arch]
    cfg = dict(spec.transformer_config)
    if tiny:
        cfg.update(TINY_TRANSFORMER)
    dev = torch.device(device if torch.device(device).type == "cpu" or torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(dev):
        net = diffusers.WanTransformer3DModel(**cfg)
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or [])
    g = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():          # random values everywhere (zero-initialised gates would hide attention)
        for n, p in net.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, device=dev) / math.sqrt(max(1, p.shape[-1]))
                    + (p == 1) * 1.0)
            if not tiny and not keep.intersection(n.split(".")):
                p.data = p.data.to(torch.bfloat16)      # as the released checkpoints (bf16 on disk)
    net.save_pretrained(tmp / "transformer", max_shard_size="5GB")
    del net
    text_dim = int(cfg["text_dim"])
    torch.manual_seed(2)
    enc = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=text_dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    enc.save_pretrained(tmp / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                         model_max_length=512).save_pretrained(tmp / "tokenizer")
    torch.manual_seed(3)
    # full size: the Wan2.1 VAE architecture (diffusers' defaults: z_dim 16, factors 4 / 8), random weights
    vae = diffusers.AutoencoderKLWan(**TINY_VAE) if tiny else diffusers.AutoencoderKLWan()
    vae.save_pretrained(tmp / "vae")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_name_or_path": f"{arch}-random{'-tiny' if tiny else ''}",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    tmp.rename(root)
    return root


def write_cache(url: str, info: Dict[str, Any], samples: int, text_len: int, text_dim: int) -> str:
    """Synthetic teacher cache (random latents of the teacher's shape) in the cache step's shard format:
    one shard, so every data-parallel rank holds every sample (the batch draw is then independent of
    how the shards split)."""
    from rcm_steps.storage import ShardSet, Storage

    st = Storage(url)
    if st.exists("manifest.json"):
        return url
    shape = [int(x) for x in info["latent_shape"]]
    spec = {"teacher": info["name"], "teacher_version": info["version"], "latent_shape": shape,
            "prompts_hash": "synthetic", "n_prompts": samples, "samples_per_prompt": 1, "seed": 0, "steps": 0,
            "guidance": info["guidance"], "shift": info["shift"], "solver": "synthetic", "shard_size": samples}
    shards = ShardSet.open(st, spec=spec)
    shards.manifest.setdefault("extra", {})["prompts"] = [f"prompt {i}" for i in range(samples)]
    g = torch.Generator().manual_seed(0)
    shards.write("uncond", {"uncond": torch.randn((1, text_len, text_dim), generator=g)}, meta={"aux": True})
    shards.write("shard-00000", {"latents": torch.randn((samples, *shape), generator=g),
                                 "cond": torch.randn((samples, text_len, text_dim), generator=g),
                                 "prompt_idx": torch.arange(samples)})
    return url


class Node:
    """The work folder: teachers, caches, an MLflow store, run outputs; results JSON written as it goes."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(a.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(a.out)
        self.results: Dict[str, Any] = json.loads(self.out.read_text()) if self.out.exists() and a.append else {}
        self.results.setdefault("meta", {}).update(self.meta())
        self.mlflow_uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self._client = None

    def meta(self) -> Dict[str, Any]:
        import diffusers

        dev = self.a.device
        return {"date": time.strftime("%Y-%m-%d"), "device": dev, "tiny": self.a.tiny, "torch": torch.__version__,
                "diffusers": diffusers.__version__, "python": sys.version.split()[0],
                "card": (torch.cuda.get_device_name(0) if dev == "cuda" and torch.cuda.is_available()
                         else f"cpu ({os.cpu_count()} cores)"),
                "gpus": torch.cuda.device_count() if dev == "cuda" else 0,
                "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}

    def save(self, part: str, value: Any) -> None:
        self.results[part] = value
        self.results.setdefault("commands", {})[part] = self.results["meta"]["command"]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out)

    # --- the teacher of an architecture, its description and its cache
    def teacher(self, arch: str) -> Dict[str, Any]:
        from rcm_steps.teacher import describe_teacher

        tiny = self.a.tiny
        root = write_teacher(self.work / f"teacher-{arch}{'-tiny' if tiny else ''}", arch, tiny, self.a.device)
        opts = dict(TINY_SIZE) if tiny else {}
        info = describe_teacher(str(root), opts)
        tcfg = info["transformer_config"]
        text_len = opts.get("text_len", info["text_len"])
        cache = write_cache(str(self.work / f"cache-{arch}{'-tiny' if tiny else ''}"), info, self.a.samples,
                            text_len, int(tcfg["text_dim"]))
        return {"dir": str(root), "options": opts, "info": info, "cache": cache}

    def mlflow_run(self, name: str) -> str:
        import mlflow

        if self._client is None:
            mlflow.set_tracking_uri(self.mlflow_uri)
            self._client = mlflow.MlflowClient(self.mlflow_uri)
            from rcm_steps.mlflow_run import experiment_id
            self._exp = experiment_id(self._client, "node-run", (self.work / "mlruns").as_uri())
        return self._client.create_run(self._exp, run_name=name).info.run_id

    def history(self, run_id: str, key: str = "loss") -> Dict[int, float]:
        """step -> value of ``train/<key>`` (the last logged value of each step); ``loss``: the step's loss,
        ``train/student_loss`` or ``train/critic_loss`` (one series each in MLflow)."""
        keys = ["student_loss", "critic_loss"] if key == "loss" else [key]
        hist = [m for k in keys for m in self._client.get_metric_history(run_id, f"train/{k}")]
        out: Dict[int, float] = {}
        for m in sorted(hist, key=lambda m: (m.step, m.timestamp)):
            out[int(m.step)] = float(m.value)
        return out

    # --- one launch of the entrypoint, as the flow's distill step makes it
    def distill_args(self, t: Dict[str, Any], out: str, iterations: int, batch: int, config: Dict[str, Any],
                     run_id: str) -> List[str]:
        return ["--teacher", t["dir"], "--teacher-options", json.dumps(t["options"]), "--cache", t["cache"],
                "--out", out, "--method", "rcm", "--iterations", str(iterations), "--batch-size", str(batch),
                "--seed", "0", "--config", json.dumps(config), "--ckpt-every", str(self.a.ckpt_every),
                "--log-every", "1", "--mlflow-run-id", run_id, "--previews", "0"]     # training only, no samples

    def env(self) -> Dict[str, str]:
        env = {"MLFLOW_TRACKING_URI": self.mlflow_uri, "TQDM_DISABLE": "1", "RCM_FAULT_AT_STEP": "0"}
        if self.a.device == "cpu":
            env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        return env

    def launch(self, args: List[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
               master_port: Optional[int] = None) -> float:
        from rcm_steps.launcher import run_torchrun

        t0 = time.perf_counter()
        run_torchrun("rcm_steps.distill", args, env=self.env(), nnodes=nnodes, node_rank=node_rank,
                     master_addr="127.0.0.1", master_port=master_port, nproc_per_node=nproc)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- plans
def preset_config(preset: str, device: str, **over) -> Dict[str, Any]:
    """The preset's DistillConfig as explicit overrides (a tiny custom checkpoint would otherwise get the
    preset of the nearest known size), with the schedule warm-ups off (measure the steady iteration)."""
    from rcm_core.config import DistillConfig

    d = DistillConfig.preset(preset).to_dict()
    for k in ("iterations", "batch_size", "seed", "method"):     # the entrypoint's own arguments (--config wins)
        d.pop(k, None)
    d.update(tangent_warmup_steps=0, lr_warmup_steps=0)
    if device == "cpu":
        d["dtype"] = "float32"          # as the entrypoint does on the CPU
    d.update(over)
    return d


def gpu_plan(arch: str, gpus: int, mem_gib: float, batch: int = 1, cp: Optional[int] = None) -> Dict[str, Any]:
    """``plan_mesh`` for ``arch`` at its own size (480p x 81 for Wan2.1) on ``gpus`` x ``mem_gib``: what the flow's
    start picks for the GPU run (context parallel degree) and the memory model's GiB per GPU."""
    from rcm_core.config import DistillConfig
    from rcm_core.real.specs import SPECS

    from rcm_steps.teacher import plan_mesh

    spec = SPECS[arch]
    cfg = DistillConfig.preset(spec.preset)
    info = {"transformer_config": {**spec.transformer_config, "_class_name": spec.transformer_class},
            "frames": spec.frames, "height": spec.height, "width": spec.width}
    return plan_mesh(info, batch, gpus, mem_gib, dtype=cfg.dtype, sharded=True, context_parallel=cp)


def iteration_stats(node: Node, run_id: str, K: int, skip: int) -> Dict[str, Any]:
    """Seconds per rCM iteration (K consecutive steps: 1 student + K-1 critic), from the entrypoint's per-step
    ``step_time_s`` after the first ``skip`` steps (warm-up)."""
    st = node.history(run_id, "step_time_s")
    steps = sorted(s for s in st if s > skip)
    iters = [sum(st[s] for s in steps[i:i + K]) for i in range(0, len(steps) - K + 1, K)]
    if not iters:
        return {"s_per_iteration": None, "steps_per_s": None, "iterations": 0}
    s = statistics.median(iters)
    return {"s_per_iteration": s, "steps_per_s": K / s, "iterations": len(iters), "all_s": iters}


def peak(res: Dict[str, Any], device: str) -> List[Optional[float]]:
    pm = res.get("peak_memory") or []
    key = "cuda_max_allocated_gib" if device == "cuda" else "max_rss_gib"
    return [p.get(key) for p in pm]


def table(title: str, header: List[str], rows: List[List[Any]]) -> None:
    def f(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[f(v) for v in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(header)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(r)) + " |")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- parts
def part_rcm(node: Node) -> None:
    a = node.a
    t = node.teacher(a.arch)
    plan = gpu_plan(a.arch, a.plan_gpus, a.gpu_mem_gib)        # the GPU node's plan (also for the rehearsal)
    cp = a.cp or math.gcd(plan["context_parallel"], a.nproc)
    K = a.K or preset_config("wan2.1-14b", a.device)["student_update_freq"]
    cfg = preset_config("wan2.1-14b", a.device, fsdp=True, activation_checkpointing="full", context_parallel=cp,
                        student_update_freq=K)
    dp = a.nproc // cp
    steps = (a.iters + 1) * K                      # one warm-up iteration
    run_id = node.mlflow_run(f"rcm-{a.nproc}")
    out = str(node.work / "out-rcm")
    shutil.rmtree(out, ignore_errors=True)
    wall = node.launch(node.distill_args(t, out, steps, dp, cfg, run_id), a.nproc)
    res = json.load(open(Path(out) / "result.json"))
    it = iteration_stats(node, run_id, K, K)
    peaks = peak(res, a.device)
    row = {"arch": a.arch + (" (tiny)" if a.tiny else ""), "ranks": a.nproc, "fsdp": a.nproc, "cp": cp, "dp": dp,
           "K": K, "latent_shape": t["info"]["latent_shape"], "steps": steps, **it, "wall_s": wall,
           "peak_per_rank": peaks, "peak_kind": "cuda max_memory_allocated GiB" if a.device == "cuda"
           else "max RSS GiB (CPU process)", "config": cfg,
           "plan": {"arch": a.arch, "size": f"{t['info']['frames']}x{t['info']['height']}x{t['info']['width']}"
                    if not a.tiny else "81x480x832 (the GPU run)", "gpus": a.plan_gpus, "gpu_mem_gib": a.gpu_mem_gib,
                    "context_parallel": plan["context_parallel"], "predicted_gib_per_gpu": plan["gib_per_gpu"]},
           "losses_finite": all(math.isfinite(v) for v in node.history(run_id).values())}
    if a.device == "cuda" and not a.tiny:
        here = gpu_plan(a.arch, a.nproc, a.gpu_mem_gib, cp=cp)        # raises MemoryError if the model says no
        row["predicted_gib_per_gpu"] = here["gib_per_gpu"]
    node.save("rcm", row)
    pk = [p for p in peaks if p is not None]
    table("rcm: rCM iteration, 14B preset plan", ["arch", "ranks", "mesh", "K", "s/iteration", "steps/s",
                                                   "peak/rank (max)", "model (GPU plan)"],
          [[row["arch"], a.nproc, f"FSDP{a.nproc} x CP{cp} (dp {dp})", K, it["s_per_iteration"], it["steps_per_s"],
            (max(pk) if pk else "n/a"), f"{plan['gib_per_gpu']:.1f} GiB/GPU ({a.arch} 480p x 81, "
                                        f"{a.plan_gpus} x {a.gpu_mem_gib:g} GiB, CP{plan['context_parallel']})"]])


def part_scaling(node: Node) -> None:
    a = node.a
    t = node.teacher(a.scaling_arch)
    K = a.K or preset_config(a.scaling_arch, a.device)["student_update_freq"]
    rows, table_rows = [], []
    base = None
    for n in [int(x) for x in a.scaling_ranks.split(",")]:
        cfg = preset_config(a.scaling_arch, a.device, student_update_freq=K)
        steps = (a.iters + 1) * K
        run_id = node.mlflow_run(f"scaling-{n}")
        out = str(node.work / f"out-scaling-{n}")
        shutil.rmtree(out, ignore_errors=True)
        wall = node.launch(node.distill_args(t, out, steps, n, cfg, run_id), n)
        res = json.load(open(Path(out) / "result.json"))
        it = iteration_stats(node, run_id, K, K)
        sps = n * K / it["s_per_iteration"] if it["s_per_iteration"] else None
        if n == 1:
            base = sps
        eff = (sps / n) / base if sps and base else None
        pk = [p for p in peak(res, a.device) if p is not None]
        rows.append({"ranks": n, "arch": a.scaling_arch + (" (tiny)" if a.tiny else ""), "K": K,
                     "fsdp": cfg["fsdp"], "samples_per_s": sps, "efficiency": eff, **it, "wall_s": wall,
                     "peak_per_rank": peak(res, a.device)})
        table_rows.append([n, it["s_per_iteration"], sps, eff, max(pk) if pk else "n/a"])
        node.save("scaling", rows)
    table(f"scaling: {a.scaling_arch}{' (tiny)' if a.tiny else ''}, preset plan, batch 1 per rank",
          ["ranks", "s/iteration", "samples/s", "efficiency", "peak/rank"], table_rows)


def _kill_config(a) -> Dict[str, Any]:
    return preset_config(a.scaling_arch, a.device, fsdp=True, activation_checkpointing="full", context_parallel=2,
                         student_update_freq=a.K or 2)


def _worker_pids(parent: int) -> Dict[int, int]:
    """RANK -> pid of the distill workers below ``parent`` (this script's torchrun child)."""
    import psutil

    found = {}
    for p in psutil.Process(parent).children(recursive=True):
        try:
            env = p.environ()
            if "RANK" in env and "rcm_steps.distill" in " ".join(p.cmdline()):
                found[int(env["RANK"])] = p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def reference(node: Node, t: Dict[str, Any], steps: int, cfg: Dict[str, Any], defer: bool = False):
    """The uninterrupted single-node run of the kill/hsdp configuration (reused when its result is there).
    ``defer``: return (record, launch) with the launch not yet made (None when reused)."""
    a = node.a
    out = node.work / f"out-ref-{a.nproc}-{steps}"
    key = json.dumps(cfg, sort_keys=True)
    info = out / "node_run_ref.json"
    if (out / "result.json").exists() and info.exists() and json.loads(info.read_text())["config"] == key:
        ref = json.loads(info.read_text())
        return (ref, None) if defer else ref
    shutil.rmtree(out, ignore_errors=True)
    run_id = node.mlflow_run(f"reference-{a.nproc}")
    ref = {"config": key, "run_id": run_id, "out": str(out)}

    def launch():
        ref["wall_s"] = node.launch(node.distill_args(t, str(out), steps, a.nproc // cfg["context_parallel"], cfg,
                                                      run_id), a.nproc)
        info.write_text(json.dumps(ref))
    if defer:
        return ref, launch
    launch()
    return ref


def compare(node: Node, run_a: str, run_b: str, out_a: str, out_b: str, steps: List[int]) -> Dict[str, Any]:
    """Per-step loss differences and the final EMA weights' largest difference."""
    from safetensors.torch import load_file

    ha, hb = node.history(run_a), node.history(run_b)
    diffs = {s: abs(ha[s] - hb[s]) / max(1e-12, abs(hb[s])) for s in steps if s in ha and s in hb}
    missing = [s for s in steps if s not in ha or s not in hb]
    ea, eb = load_file(Path(out_a) / "student_ema.safetensors"), load_file(Path(out_b) / "student_ema.safetensors")
    wmax = max(float((ea[k].double() - eb[k].double()).abs().max()) for k in eb) if set(ea) == set(eb) else float("inf")
    wscale = max(float(v.double().abs().max()) for v in eb.values())
    return {"steps_compared": sorted(diffs), "missing_steps": missing,
            "max_rel_loss_diff": max(diffs.values()) if diffs else None,
            "loss_a": [ha.get(s) for s in steps], "loss_b": [hb.get(s) for s in steps],
            "ema_max_abs_diff": wmax, "ema_max_abs": wscale}


def part_kill(node: Node) -> None:
    import psutil

    from rcm_core.checkpoint import is_complete, read_meta
    from rcm_steps.launcher import TorchrunError

    a = node.a
    t = node.teacher(a.scaling_arch)
    cfg = _kill_config(a)
    steps = a.kill_steps
    ref = reference(node, t, steps, cfg)
    out = node.work / "out-kill"
    shutil.rmtree(out, ignore_errors=True)
    run1 = node.mlflow_run("kill-attempt-1")
    args1 = node.distill_args(t, str(out), steps, a.nproc // cfg["context_parallel"], cfg, run1)
    failed: Dict[str, Any] = {}

    def attempt():
        try:
            node.launch(args1, a.nproc)
        except TorchrunError as e:
            failed["error"] = str(e).splitlines()[0]
    th = threading.Thread(target=attempt)
    th.start()
    victim, killed_at, first = a.nproc - 1, None, None
    while th.is_alive():
        ck = sorted((out / "ckpt").glob("step-*.dcp")) if (out / "ckpt").exists() else []
        done = [c for c in ck if is_complete(str(c))]
        if done:
            first = done[0].name
            pids = {}
            for child in psutil.Process().children():
                pids.update(_worker_pids(child.pid))
            if victim in pids:
                os.kill(pids[victim], signal.SIGKILL)
                killed_at = time.time()
                print(f"node_run: SIGKILL rank {victim} (pid {pids[victim]}) after {first} was complete", flush=True)
                break
        time.sleep(0.05)
    th.join()
    if killed_at is None:
        raise RuntimeError("the run ended before a checkpoint was complete: raise --kill-steps")
    reached = max(node.history(run1) or {0: 0})          # the last step the killed attempt logged
    run2 = node.mlflow_run("kill-attempt-2")
    args2 = node.distill_args(t, str(out), steps, a.nproc // cfg["context_parallel"], cfg, run2)
    node.launch(args2, a.nproc)                                # the retry, as Metaflow's @retry: same --out
    res = json.load(open(out / "result.json"))
    resumed = res["resumed_from"]
    after = list(range(resumed + 1, steps + 1))
    cmp = compare(node, run2, ref["run_id"], str(out), ref["out"], after)
    row = {"ranks": a.nproc, "config": cfg, "steps": steps, "ckpt_every": a.ckpt_every, "killed_rank": victim,
           "first_checkpoint": first, "attempt1_failed": failed.get("error"), "attempt1_last_logged_step": reached,
           "resumed_from": resumed, "lost_steps": reached - resumed, "lost_within_interval": reached - resumed <= a.ckpt_every,
           "vs_uninterrupted": cmp}
    node.save("kill", row)
    # resume on half the ranks from the checkpoint the retry wrote on all of them
    half = a.nproc // 2
    out4 = node.work / f"out-kill-resume{half}"
    shutil.rmtree(out4, ignore_errors=True)
    shutil.copytree(out, out4)
    src = out4 / res["checkpoint"]
    src_world = read_meta(str(src))["world_size"]
    (out4 / "result.json").unlink()
    run3 = node.mlflow_run(f"kill-resume-{half}")
    more = steps + (a.K or 2) * 2
    cfg4 = dict(cfg, context_parallel=min(cfg["context_parallel"], half))
    node.launch(node.distill_args(t, str(out4), more, half // cfg4["context_parallel"], cfg4, run3), half)
    res4 = json.load(open(out4 / "result.json"))
    h3 = node.history(run3)
    row["resume_half"] = {"ranks": half, "from_checkpoint": res["checkpoint"], "checkpoint_world_size": src_world,
                          "resumed_from": res4["resumed_from"], "steps": res4["steps"],
                          "world_size": res4["world_size"], "losses": [h3.get(s) for s in range(steps + 1, more + 1)],
                          "losses_finite": all(math.isfinite(h3.get(s, float("nan"))) for s in range(steps + 1, more + 1))}
    node.save("kill", row)
    table("kill: SIGKILL of one worker, retry, resume", ["check", "value"], [
        ["killed", f"rank {victim} of {a.nproc} after {first} was complete"],
        ["attempt 1 last logged step", reached], ["retry resumed from", resumed],
        ["steps lost (<= ckpt interval %d)" % a.ckpt_every, reached - resumed],
        ["losses after resume vs uninterrupted (max rel diff)", cmp["max_rel_loss_diff"]],
        ["final EMA max |diff| (max |w|)", f"{cmp['ema_max_abs_diff']:.3g} ({cmp['ema_max_abs']:.3g})"],
        [f"resume on {half} from {src_world}-rank {res['checkpoint']}",
         f"resumed_from {res4['resumed_from']}, ran to {res4['steps']} on {res4['world_size']} ranks, "
         f"losses finite: {row['resume_half']['losses_finite']}"]])


def part_hsdp(node: Node) -> None:
    from rcm_steps.launcher import free_port

    a = node.a
    t = node.teacher(a.scaling_arch)
    cfg = _kill_config(a)
    steps = a.kill_steps
    # on the CPU the single-node reference runs at the same time as the two gangs (no accelerator to share)
    ref, ref_launch = reference(node, t, steps, cfg, defer=True)
    if ref_launch is not None and a.device != "cpu":
        ref_launch()
        ref_launch = None
    per_node = a.nproc // 2
    hcfg = dict(cfg, fsdp_shard_size=per_node)
    out = node.work / "out-hsdp"
    shutil.rmtree(out, ignore_errors=True)
    run_id = node.mlflow_run("hsdp-2x%d" % per_node)
    args = node.distill_args(t, str(out), steps, a.nproc // cfg["context_parallel"], hcfg, run_id)
    port = free_port()
    errors: List[str] = []
    walls: Dict[int, float] = {}

    def gang(rank):
        try:
            t0 = time.perf_counter()
            if rank == "ref":
                ref_launch()
            else:
                node.launch(args, per_node, nnodes=2, node_rank=rank, master_port=port)
            walls[rank] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{'reference' if rank == 'ref' else f'node {rank}'}: {str(e).splitlines()[0]}")
    ths = [threading.Thread(target=gang, args=(r,)) for r in [0, 1] + (["ref"] if ref_launch else [])]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    res = json.load(open(out / "result.json"))
    cmp = compare(node, run_id, ref["run_id"], str(out), ref["out"], list(range(1, steps + 1)))
    row = {"nodes": 2, "ranks_per_node": per_node, "config": hcfg, "steps": steps, "world_size": res["world_size"],
           "wall_s": max(walls[0], walls[1]), "reference_wall_s": ref.get("wall_s"),
           "concurrent_with_reference": "ref" in walls, "vs_single_node": cmp}
    node.save("hsdp", row)
    table(f"hsdp: 2 nodes x {per_node} ranks (replicate x shard {per_node}) vs one node of {a.nproc} (FSDP{a.nproc})",
          ["check", "value"], [["world size", res["world_size"]],
                               ["max rel loss diff over %d steps" % steps, cmp["max_rel_loss_diff"]],
                               ["final EMA max |diff| (max |w|)", f"{cmp['ema_max_abs_diff']:.3g} ({cmp['ema_max_abs']:.3g})"]])


PARTS = {"rcm": part_rcm, "scaling": part_scaling, "kill": part_kill, "hsdp": part_hsdp}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="rcm,scaling,kill,hsdp")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny Wan-shaped configuration (the CPU rehearsal)")
    ap.add_argument("--iters", type=int, default=3, help="measured rCM iterations (after one warm-up iteration)")
    ap.add_argument("--nproc", type=int, default=8, help="ranks of the node (GPUs)")
    ap.add_argument("--arch", default="wan2.1-14b", help="architecture of part rcm")
    ap.add_argument("--scaling-arch", default="wan2.1-1.3b", help="architecture of parts scaling, kill, hsdp")
    ap.add_argument("--scaling-ranks", default="1,2,4,8")
    ap.add_argument("--cp", type=int, default=0, help="part rcm: CP degree (0: as plan_mesh picks for the GPU run)")
    ap.add_argument("--K", type=int, default=0, help="student update frequency (0: the preset's; kill/hsdp: 2)")
    ap.add_argument("--plan-gpus", type=int, default=8, help="part rcm: GPUs of the plan_mesh plan (the node's 8)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory for plan_mesh (H100: 80)")
    ap.add_argument("--samples", type=int, default=16, help="samples in the synthetic cache")
    ap.add_argument("--kill-steps", type=int, default=8, help="kill/hsdp: steps of a run")
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--work", default=None, help="work folder (teachers, caches, runs); default /tmp/node_run_<device>")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/node_run_<device>.json)")
    ap.add_argument("--append", action="store_true", help="keep the other parts' results already in --out")
    a = ap.parse_args(argv)
    a.work = a.work or f"/tmp/node_run_{a.device}{'_tiny' if a.tiny else ''}"
    a.out = a.out or str(ROOT / "bench" / "results" / f"node_run_{a.device}.json")
    bad = [p for p in a.parts.split(",") if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; known: {list(PARTS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --tiny for the rehearsal)")
    if a.device == "cpu" and not a.tiny:
        ap.error("--device cpu needs --tiny (the real architectures do not train on a CPU)")
    if a.nproc < 2 or a.nproc % 2:
        ap.error("--nproc must be even (kill resumes on half, hsdp runs two nodes of half)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    node = Node(a)
    for p in a.parts.split(","):
        t0 = time.perf_counter()
        print(f"\n=== part {p} ===", flush=True)
        PARTS[p](node)
        print(f"part {p}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nresults: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
