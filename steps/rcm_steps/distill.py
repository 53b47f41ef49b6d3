"""Distillation entrypoint, run under torchrun: ``python -m rcm_steps.distill ...``.

* Initialises the process group when launched by torchrun (gloo on CPU, NCCL on GPU).
* Reads and verifies the cache shards through fsspec (each rank its share).
* Trains with :class:`rcm_core.trainer.RCMTrainer` (gradients averaged across ranks).
* Rank 0 logs to MLflow (params, per-step losses, grad norms, NaN counts, samples/s): :func:`train_metrics`
  names each step's loss after the network it trained (``train/student_loss``, ``train/critic_loss``: their
  steps alternate, so one series each); the step is MLflow's own.
* Samples over training (the distill card): the EMA student samples a few fixed prompts and noises at the start
  and at every checkpoint (``--previews``, :mod:`rcm_steps.previews`, ``previews.safetensors``).
* Checkpoints under ``--out`` (any fsspec URL): with FSDP a DCP directory
  ``ckpt/step-XXXXXXX.dcp/`` that every rank writes its own shards into (nothing gathered;
  loadable on any number of ranks, see :mod:`rcm_core.checkpoint`), else one file
  ``ckpt/step-XXXXXXX.pt`` written by rank 0; then the pointer ``ckpt/latest.json``. A rerun with
  the same ``--out`` (e.g. a Metaflow retry) resumes from the newest *complete* checkpoint of
  either format (a DCP directory counts once its marker file is in it), on any number of ranks.
* A two-expert teacher (Wan2.2 A14B) gets the student ``DistillConfig.moe_student`` says
  (:func:`rcm_core.teachers.student_networks`): by default ONE network started from the low-noise expert
  (student and fake score), ``"two"``: copies of both experts; ``result.json`` states it (``student_layout``).
* At the end rank 0 writes ``student_ema.safetensors`` (the EMA student, float32, with exactly the
  student network's state-dict names, e.g. a diffusers transformer's; a one-network A14B student has one
  expert's names, a two-expert one ``transformer.*`` / ``transformer_2.*``) and ``result.json``; LoRA runs
  (``DistillConfig.lora``: merged weights there) also ``student_lora.safetensors``, the EMA adapter in the
  peft/diffusers LoRA format (``lora_url`` in ``result.json``); a two-expert (A14B) student's ``transformer``
  adapter there and its ``transformer_2`` adapter in ``student_lora_2.safetensors`` (``lora_2_url``).
* Rank 0 also collects the trainer's per-step diagnostics (DMD/sCM gradient ratios, critic loss relative to
  its start and ``critic_behind``, NaN-masked fractions, the phase of a staged schedule) into
  ``diagnostics.json`` beside ``result.json`` (at each checkpoint and at the end; a resumed run keeps the
  earlier steps; :mod:`rcm_steps.diagnostics`), logs each planned phase as param ``distill.stage_<i>`` =
  ``method:updates`` and tags the MLflow run ``rcm.current_stage`` = ``<i>:<method>`` as each phase begins.
* A failure prints a short ``rCM: distill worker (rank r) failed: ...`` block first (see
  :mod:`rcm_steps.errors`); the launcher passes it on to the flow step.

The flow keys ``--out`` on the *origin* run of a chain of ``resume``s, so a resumed run finds
the checkpoints of the run it resumes (not only a ``@retry`` inside one run).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .storage import Storage

__all__ = ["main", "build_config", "parse_args", "train_metrics"]

# trainer metrics that MLflow does not get: the step (MLflow's own step), the loss (logged as student_loss /
# critic_loss: the two networks' steps alternate, one series each) and loss_fake (= critic_loss)
_NOT_LOGGED = ("step", "loss", "loss_fake")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser("rcm_steps.distill", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher name (rcm_core.teachers) or module:factory")
    p.add_argument("--teacher-options", default="{}",
                   help="JSON options of a real teacher: frames, height, width, text_len, dtype")
    p.add_argument("--cache", required=True, help="URL of the teacher cache folder (with manifest.json)")
    p.add_argument("--out", required=True, help="URL of this run's output folder (checkpoints, weights)")
    p.add_argument("--method", default="rcm", choices=["rcm", "scm", "dmd", "dcm"])
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split across ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", help="JSON overrides of DistillConfig")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--mlflow-run-id", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--previews", type=int, default=2,
                   help="samples over training: prompts the EMA student samples at the start and every checkpoint "
                        "(previews.safetensors, the distill card); 0: none")
    p.add_argument("--preview-steps", type=int, default=4, help="student steps of those samples")
    # test hook, not for users: exit(17) after this step on a fresh (non-resumed) attempt
    p.add_argument("--fault-at-step", type=int, default=int(os.environ.get("RCM_FAULT_AT_STEP", "0") or 0),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_config(teacher_name: str, method: str, iterations: Optional[int], batch_size: Optional[int],
                 seed: int, overrides: Dict[str, Any]):
    from rcm_core.config import PRESETS, DistillConfig

    base = DistillConfig.preset(teacher_name).to_dict() if teacher_name in PRESETS else DistillConfig().to_dict()
    base.update(method=method, seed=seed)
    if iterations is not None:
        base["iterations"] = iterations
    if batch_size is not None:
        base["batch_size"] = batch_size
    base.update(overrides)
    return DistillConfig.from_dict(base)


def train_metrics(m: Dict[str, Any]) -> Dict[str, Any]:
    """A trainer step's metrics as logged (MLflow ``train/*``, diagnostics): the step's ``loss`` under the name of
    the network it trained, ``student_loss`` (loss_scale x sCM + loss_scale_dmd x DMD) or ``critic_loss`` (the
    fake score's), never one sawtooth series of both; no ``step`` (MLflow has its own). Non-numbers (``kind``,
    ``stage_method``) are kept for the diagnostics; the MLflow logger drops them."""
    out = {k: v for k, v in m.items() if k not in _NOT_LOGGED}
    if m.get("kind") in ("student", "critic") and "loss" in m:
        out[f"{m['kind']}_loss"] = m["loss"]
    return out


def _init_dist():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), backend
    return 0, 1, None


def _device(arg: str) -> torch.device:
    if arg == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(arg)


class _MlflowLogger:
    """Rank-0 MLflow logging with batched per-step metrics."""

    def __init__(self, run_id: Optional[str], enabled: bool):
        self.enabled = enabled and run_id is not None
        self.buf = []
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(), run_id

    def params(self, d: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        from .mlflow_run import param_value

        new = [Param(f"distill.{k}", param_value(v)) for k, v in d.items() if f"distill.{k}" not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, str(value)[:5000])

    def metrics(self, step: int, d: Dict[str, float]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buf += [Metric(f"train/{k}", float(v), ts, step) for k, v in d.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]

    def flush(self) -> None:
        if self.enabled and self.buf:
            for i in range(0, len(self.buf), 900):
                self.client.log_batch(self.run_id, metrics=self.buf[i:i + 900])
            self.buf = []


_CKPT_NAME = re.compile(r"^step-(\d{7})\.(pt|dcp)$")


def _checkpoints(out: Storage) -> List[Tuple[int, str, bool]]:
    """(step, key, complete) of the checkpoints under ``ckpt/``, oldest first (either format; a DCP
    directory is complete once its marker is written, a file once it exists: it is renamed into place)."""
    from rcm_core.checkpoint import is_complete

    found = []
    for name in out.list("ckpt"):
        m = _CKPT_NAME.match(name)
        if m:
            key = f"ckpt/{name}"
            found.append((int(m.group(1)), key, is_complete(out.url(key), out.storage_options)))
    return sorted(found)


def _latest(out: Storage) -> Optional[Dict[str, Any]]:
    """The newest complete checkpoint, ``{"step", "file"}``; half-written ones are never returned."""
    done = [(step, key) for step, key, complete in _checkpoints(out) if complete]
    if not done:
        return None
    return {"step": done[-1][0], "file": done[-1][1]}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except Exception as e:
        from .errors import report

        report(e, f"distill worker (rank {os.environ.get('RANK', '0')})")
        raise


def _run(args: argparse.Namespace) -> int:
    from rcm_core.trainer import RCMTrainer

    from .cache import load_cache
    from .diagnostics import FILE as DIAG_FILE, DiagnosticsCollector, load as load_diagnostics
    from .previews import FILE as PREVIEWS_FILE
    from .teacher import is_real_teacher, load_teacher

    rank, world, backend = _init_dist()
    device = _device(args.device)
    out = Storage(args.out)
    opts = json.loads(args.teacher_options or "{}")
    load_device = device
    if device.type == "cuda" and is_real_teacher(args.teacher):
        # the trainer copies the teacher network to the GPU (teacher, student, fake score, EMA; sharded under
        # FSDP); the loaded teacher stays in host memory, with its text encoder and VAE, which distillation
        # never calls: on the GPU they would sit beside the copies (Wan2.1-14B: the bf16 network, 28.6 GB, plus
        # the fp32 student copy before sharding exceed 80 GB)
        opts.setdefault("dtype", "bfloat16")          # what loading on the GPU picks
        load_device = torch.device("cpu")
    teacher = load_teacher(args.teacher, device=str(load_device), options=opts)
    overrides = json.loads(args.config or "{}")
    cfg = build_config(getattr(teacher, "preset", None) or getattr(teacher, "name", args.teacher), args.method,
                       args.iterations, args.batch_size, args.seed, overrides)
    if device.type == "cpu" and cfg.dtype in ("bfloat16", "float16") and "dtype" not in overrides:
        # the real-teacher presets train in bf16 autocast on GPUs; on the CPU that is slow and not what
        # they were tuned for: use float32 unless the overrides (the flow's --distill_config) ask for the dtype
        if rank == 0:
            print(f"distill: CPU run, DistillConfig.dtype {cfg.dtype} -> float32 (pass --distill_config "
                  f"'{{\"dtype\": \"{cfg.dtype}\"}}' to keep it)", flush=True)
        cfg = cfg.replace(dtype="float32")
    # context parallel: the ranks of one cp group share their samples (data-parallel index rank // cp)
    cp = cfg.context_parallel
    dp_rank, dp_world = rank // cp, max(1, world // cp)
    per_rank = max(1, cfg.batch_size // dp_world)
    data = load_cache(args.cache, expect_latent_shape=tuple(teacher.latent_shape), rank=dp_rank, world=dp_world)
    n = data.latents.shape[0]
    # a two-expert teacher (Wan2.2 A14B): the student and fake score are one network from the low-noise expert
    # (DistillConfig.moe_student="one", the default) or copies of both experts ("two")
    from rcm_core.teachers import student_networks

    student_net, fake_net, layout = student_networks(teacher, cfg)
    trainer = RCMTrainer(teacher, cfg, device=device, student_net=student_net, fake_net=fake_net)
    expected_keys = (student_net if student_net is not None else teacher.net).state_dict().keys()
    del student_net, fake_net
    latest = _latest(out)
    resumed_from = None
    if latest is not None:
        trainer.load_checkpoint(out.url(latest["file"]), out.storage_options)
        resumed_from = int(latest["step"])
    start = trainer.step
    log = _MlflowLogger(args.mlflow_run_id, rank == 0)
    # per-step diagnostics (DMD/sCM ratios, critic lag, NaN-masked fractions, phases) -> diagnostics.json;
    # a resumed run keeps the earlier attempts' series up to its start step
    diag = DiagnosticsCollector(cfg.stages, cfg.critic_lag_warn,
                                previous=load_diagnostics(out.url(DIAG_FILE)) if rank == 0 else None,
                                upto=start)
    from .previews import PreviewRecorder

    # samples over training (the distill card): every rank samples (collective under FSDP / CP), rank 0 writes
    previews = PreviewRecorder(out, data, args.previews, args.preview_steps, cfg.seed, upto=start, write=rank == 0)
    if rank == 0:
        print(f"distill: teacher={teacher.name} method={cfg.method} world={world} backend={backend} "
              f"device={device} samples={n}/rank batch={per_rank}/rank iterations={cfg.iterations} "
              f"start_step={start}" + (f" (resumed from {latest['file']})" if latest else "")
              + (f" student={layout}" if layout else ""), flush=True)
        log.params({**cfg.to_dict(), "world_size": world, "per_rank_batch": per_rank,
                    "data_hash": data.data_hash, **({"student_layout": layout} if layout else {}),
                    **{f"stage_{i}": f"{meth}:{n}" for i, (meth, n) in enumerate(diag.planned)}})
        if resumed_from is not None:
            log.metrics(start, {"resumed_from_step": resumed_from})
    nan_total = 0
    t_start = time.perf_counter()
    samples = 0
    last: Dict[str, Any] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iterations, initial=start, desc="distill", unit="it",
               disable=rank != 0 or os.environ.get("TQDM_DISABLE") == "1")
    if start == 0:
        previews.record(trainer, teacher, 0)          # the student before training (a copy of the teacher)
    while trainer.step < cfg.iterations:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + trainer.step * 7919 + dp_rank)
        idx = torch.randint(0, n, (per_rank,), generator=g)
        batch = {"latents": data.latents[idx], "cond": data.cond[idx], "uncond": data.uncond}
        m = train_metrics(trainer.train_step(batch))
        step = trainer.step
        if rank == 0:
            changed = diag.add(step, m)               # before the numeric filter: stage_method is a string
            if changed is not None:                   # each phase of a staged schedule, as it begins
                log.tag("rcm.current_stage", f"{changed[0]}:{changed[1] or '?'}")
                print(f"distill: step {step}: stage {changed[0]} ({changed[1] or '?'})", flush=True)
        samples += per_rank * dp_world
        nan_total += int(m.get("nan_masked", 0))
        m = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        m["samples_per_s"] = m.get("samples_per_s", 0.0) * dp_world
        m["nan_count_total"] = nan_total
        last = m
        bar.update(1)
        if rank == 0:
            log.metrics(step, m)
            if step % args.log_every == 0 or step == cfg.iterations:
                log.flush()
        if step % args.ckpt_every == 0 or step == cfg.iterations:
            if rank == 0:       # metrics first: a checkpointed step's metrics are in MLflow whenever a kill comes
                log.flush()
            if trainer.sharded:                      # FSDP: DCP, every rank writes its shards; rank 0 the rest
                _save(trainer, out, step, write=rank == 0)
            elif rank == 0:
                _save(trainer, out, step)
            if rank == 0:
                diag.save(out)
            previews.record(trainer, teacher, step)
        if args.fault_at_step and resumed_from is None and step == args.fault_at_step:
            log.flush()
            print(f"distill: injected fault after step {step}", flush=True)
            sys.stdout.flush()
            os._exit(17)
    bar.close()
    seconds = time.perf_counter() - t_start
    if world > 1:
        dist.barrier()
    peaks = _peak_memory(device, world)     # a collective: every rank
    ema_bytes = None
    if trainer.sharded or rank == 0:      # FSDP: a collective (full tensors gathered one by one to rank 0's CPU)
        from rcm_core.checkpoint import ema_safetensors

        ema_bytes = ema_safetensors(trainer, expected_keys=expected_keys)
    lora_bytes = lora_bytes_2 = None
    if cfg.lora is not None and (trainer.sharded or rank == 0):   # LoRA: the EMA adapter alone (peft/diffusers)
        from rcm_core.checkpoint import lora_experts, lora_safetensors

        prefix = "transformer" if hasattr(teacher.net, "config") else None
        if lora_experts(trainer):         # two experts: one file each (WanPipeline: load_into_transformer_2=True)
            lora_bytes = lora_safetensors(trainer, prefix=prefix, expert="transformer")
            lora_bytes_2 = lora_safetensors(trainer, prefix=prefix, expert="transformer_2")
        else:
            lora_bytes = lora_safetensors(trainer, prefix=prefix)
    if rank == 0:
        out.write_bytes("student_ema.safetensors", ema_bytes)
        if lora_bytes is not None:
            out.write_bytes("student_lora.safetensors", lora_bytes)
        if lora_bytes_2 is not None:
            out.write_bytes("student_lora_2.safetensors", lora_bytes_2)
        result = {"steps": trainer.step, "start_step": start, "resumed_from": resumed_from, "world_size": world,
                  "backend": backend, "seconds": seconds, "peak_memory": peaks,
                  "samples_per_s": samples / seconds if seconds > 0 else None,
                  "final_metrics": last, "nan_count_total": nan_total, "config": cfg.to_dict(),
                  "teacher": teacher.name, "data_hash": data.data_hash,
                  # two-expert teachers: what the student is (None: a one-network teacher's student, its copy)
                  "student_layout": layout,
                  "ema_url": out.url("student_ema.safetensors"),
                  "lora_url": out.url("student_lora.safetensors") if lora_bytes is not None else None,
                  "lora_2_url": out.url("student_lora_2.safetensors") if lora_bytes_2 is not None else None,
                  "checkpoint": (_latest(out) or {}).get("file")}
        result["diagnostics_url"] = diag.save(out)
        result["previews_url"] = out.url(PREVIEWS_FILE) if out.exists(PREVIEWS_FILE) else None
        out.write_json("result.json", result)
        log.metrics(trainer.step, {"wall_s": seconds})
        log.flush()
        print(f"distill: done {trainer.step} steps in {seconds:.1f}s", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _peak_memory(device: torch.device, world: int) -> List[Dict[str, Any]]:
    """Per rank: ``cuda_max_allocated_gib`` (``torch.cuda.max_memory_allocated``; None on the CPU) and
    ``max_rss_gib`` (the worker process's peak resident memory)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    mine = {"rank": dist.get_rank() if world > 1 else 0, "max_rss_gib": rss / 2 ** 30,
            "cuda_max_allocated_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                       if device.type == "cuda" else None)}
    if world == 1:
        return [mine]
    got: List[Any] = [None] * world
    dist.all_gather_object(got, mine)
    return got


def _save(trainer, out: Storage, step: int, keep: int = 2, write: bool = True) -> None:
    """Checkpoint ``step``: a DCP directory when the trainer is sharded (call on every rank), else one
    file (call on rank 0). ``write`` (rank 0): then the pointer, and keep the newest ``keep`` complete
    checkpoints, removing older ones, half-written ones and leftovers of killed saves."""
    name = f"ckpt/step-{step:07d}.{'dcp' if trainer.sharded else 'pt'}"
    trainer.save_checkpoint(out.url(name), out.storage_options)
    if not write:
        return
    out.write_json("ckpt/latest.json", {"step": step, "file": name})   # pointer last (informative)
    found = _checkpoints(out)
    done = [key for _, key, complete in found if complete]
    for _, key, complete in found:
        if key != name and (not complete or key in done[:-keep]):
            out.rm(key, recursive=True)
    for n in out.list("ckpt"):
        if n.startswith(".tmp-"):
            out.rm(f"ckpt/{n}", recursive=True)


def _exit_worker(rc: int) -> None:
    """End a torchrun worker without the interpreter's finalization: gloo's worker threads can still hold
    work objects with tensors then, and destroying them during finalization aborts the process
    ("terminate called without an active exception", SIGABRT; seen after a successful run with
    destroy_process_group called, see pytorch/pytorch#179291's discussion). Everything is written and
    flushed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    _rc = main()
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:       # a torchrun gang member
        _exit_worker(_rc)
    sys.exit(_rc)
