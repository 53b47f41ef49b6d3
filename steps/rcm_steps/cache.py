"""Teacher cache: text embeddings + teacher-synthesised latents, as checksummed shards.

Layout under the storage root::

    cache/<teacher>-<version>/<spec hash>/manifest.json
    cache/<teacher>-<version>/<spec hash>/uncond.safetensors     negative/unconditional embedding
    cache/<teacher>-<version>/<spec hash>/shard-00000.safetensors latents, cond, prompt_idx

The folder name is the hash of everything that determines the content (teacher name
and version, prompts, samples per prompt, seed, sampler settings, shard size), so a
rerun with the same inputs finds the same folder: shards already listed in the
manifest are skipped (idempotent, resumable after a crash), and each shard's noise
is seeded by its index, so a resumed cache equals an uninterrupted one.

Self-repair: every listed shard is verified (sha256, decodes, shapes) before it is
skipped; one that does not match, or whose file is gone, is recomputed - bit-identical,
since its noise depends on its index only - with a line on stderr, and counted
(``CacheResult.repaired``, ``stats["repaired_shards"]``). A manifest written for another
request (other spec in the same folder) is an error naming the differing fields.

A second Great Expectations gate checks the latents (finite, per-sample std within
bounds, expected count). Reading (:func:`load_cache`) verifies checksums and shapes.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .storage import ShardError, ShardSet, Storage, spec_hash
from .validation import GateReport, run_gate

__all__ = ["CacheConfig", "CacheResult", "cache_teacher", "load_cache", "CachedData", "validate_latents"]


@dataclass
class CacheConfig:
    samples_per_prompt: int = 4
    shard_size: int = 64
    seed: int = 0
    steps: Optional[int] = None       # teacher sampler; None = the teacher's default
    guidance: Optional[float] = None
    shift: Optional[float] = None
    solver: Optional[str] = None
    batch_size: int = 64              # teacher sampling batch inside a shard
    std_min: float = 0.05             # latent gate: per-sample std bounds
    std_max: float = 10.0


@dataclass
class CacheResult:
    url: str                          # folder URL
    manifest_url: str
    data_hash: str
    total: int
    computed_shards: int
    skipped_shards: int
    seconds: float
    report: Optional[GateReport] = None
    stats: Dict[str, float] = field(default_factory=dict)
    repaired: Dict[str, str] = field(default_factory=dict)   # shard -> what was wrong with it (recomputed)


def _spec(teacher_info: Dict[str, Any], prompts: List[str], cfg: CacheConfig) -> Dict[str, Any]:
    return {
        "teacher": teacher_info["name"], "teacher_version": teacher_info["version"],
        "latent_shape": list(teacher_info["latent_shape"]),
        "prompts_hash": spec_hash({"prompts": list(prompts)}, 64),
        "n_prompts": len(prompts), "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
        "steps": cfg.steps or teacher_info["steps"],
        "guidance": teacher_info["guidance"] if cfg.guidance is None else cfg.guidance,
        "shift": cfg.shift or teacher_info["shift"], "solver": cfg.solver or teacher_info["solver"],
        "shard_size": cfg.shard_size,
        # real teachers: text length and network dtype also shape the cache (absent for the others)
        **{k: teacher_info[k] for k in ("text_len", "dtype") if k in teacher_info},
    }


def cache_location(storage: Storage, teacher_info: Dict[str, Any], spec: Dict[str, Any]) -> Storage:
    return storage.child(f"cache/{teacher_info['name']}-{teacher_info['version']}/{spec_hash(spec)}")


def cache_teacher(teacher, prompts: List[str], storage: Storage, cfg: CacheConfig,
                  docs_dir: Optional[str] = None, progress: Optional[bool] = None,
                  stop_after_shards: Optional[int] = None) -> CacheResult:
    """Fill (or complete) the cache for ``prompts``; returns its location and hash.

    ``stop_after_shards`` stops after computing that many new shards (tests of resume). Progress is
    reported in teacher sampler steps (:class:`rcm_steps.progress.Progress`; ``progress=False``: none).
    """
    from . import teacher as T
    from .progress import Progress

    if not prompts:
        raise ValueError("cache_teacher: no prompts to cache")
    t0 = time.perf_counter()
    info = T.teacher_info(teacher)
    spec = _spec(info, prompts, cfg)
    loc = cache_location(storage, info, spec)
    shards = ShardSet.open(loc, spec=spec)
    shards.manifest.setdefault("extra", {})["prompts"] = list(prompts)
    lshape = tuple(info["latent_shape"])
    total = len(prompts) * cfg.samples_per_prompt
    # sample i -> prompt i // samples_per_prompt (prompt-major)
    n_shards = math.ceil(total / cfg.shard_size)
    repaired = _damaged(shards, ["uncond"] + [f"shard-{k:05d}" for k in range(n_shards)])

    if "uncond" in repaired or "uncond" not in shards.shards:
        shards.write("uncond", {"uncond": T.negative_embedding(teacher)},
                     meta={"negative_prompt": getattr(teacher, "negative_prompt", ""), "aux": True})
    todo = [k for k in range(n_shards) if f"shard-{k:05d}" not in shards.shards or f"shard-{k:05d}" in repaired]
    uncond = shards.read("uncond")["uncond"]
    computed = 0
    # one unit per solver step of each sampling batch: a shard alone can take minutes
    batches = [math.ceil((min(total, (k + 1) * cfg.shard_size) - k * cfg.shard_size) / cfg.batch_size)
               for k in range(n_shards)]
    done = sum(b for k, b in enumerate(batches) if k not in todo)
    bar = Progress(f"teacher cache {info['name']} ({len(todo)} of {n_shards} shards to compute)",
                   sum(batches) * spec["steps"], unit="sampler steps", initial=done * spec["steps"],
                   enabled=progress is not False)
    for k in todo:
        lo, hi = k * cfg.shard_size, min(total, (k + 1) * cfg.shard_size)
        pidx = torch.arange(lo, hi) // cfg.samples_per_prompt
        ps = [prompts[i] for i in pidx.tolist()]
        uniq = sorted(set(pidx.tolist()))
        emb = T.encode(teacher, [prompts[i] for i in uniq])
        cond = emb[[uniq.index(i) for i in pidx.tolist()]]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        noise = torch.randn((hi - lo, *lshape), generator=g, dtype=torch.float64)
        outs = []
        for j in range(0, hi - lo, cfg.batch_size):
            outs.append(T.sample_teacher_latents(
                teacher, cond[j:j + cfg.batch_size], uncond, noise[j:j + cfg.batch_size],
                steps=spec["steps"], guidance=spec["guidance"], shift=spec["shift"], solver=spec["solver"],
                callback=bar.update))
        lat = torch.cat(outs).float()
        if tuple(lat.shape[1:]) != lshape:
            raise ShardError(f"teacher {info['name']} produced latents of shape {tuple(lat.shape[1:])}, "
                             f"expected {lshape}")
        shards.write(f"shard-{k:05d}", {"latents": lat, "cond": cond.float(), "prompt_idx": pidx.long()},
                     meta={"prompts": len(uniq)})
        del ps
        computed += 1
        if stop_after_shards is not None and computed >= stop_after_shards:
            break
    bar.close()
    result = CacheResult(url=loc.url(), manifest_url=shards.url, data_hash=shards.content_hash(),
                         total=int(shards.manifest.get("total_count", 0)), computed_shards=computed,
                         skipped_shards=n_shards - len(todo), seconds=time.perf_counter() - t0,
                         repaired=repaired, stats={"repaired_shards": len(repaired)})
    if stop_after_shards is None:
        data = load_cache(loc.url(), storage_options=storage.storage_options, expect_latent_shape=lshape)
        result.report = validate_latents(data.latents, expected_count=total, cfg=cfg, docs_dir=docs_dir)
        result.stats.update(latent_mean=float(data.latents.mean()), latent_std=float(data.latents.std()))
    return result


def _damaged(shards: ShardSet, names: List[str]) -> Dict[str, str]:
    """Listed shards that fail verification (missing file, checksum, decoding, shapes) -> the reason.

    Each is reported on stderr; the caller recomputes them.
    """
    out = {}
    for n in names:
        if n not in shards.shards:
            continue                                  # never written: computed as usual, not a repair
        problem = shards.verify(n)
        if problem is not None:
            out[n] = problem
            print(f"cache: {n} is {problem}; recomputing it (shard noise is seeded by its index: the same bytes)",
                  file=sys.stderr, flush=True)
    return out


def latent_table(latents: torch.Tensor):
    import pandas as pd

    flat = latents.reshape(latents.shape[0], -1).double()
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    return pd.DataFrame({"finite": finite.numpy(), "std": safe.std(1).numpy(), "mean": safe.mean(1).numpy(),
                         "absmax": safe.abs().amax(1).numpy()})


def validate_latents(latents: torch.Tensor, expected_count: int, cfg: CacheConfig,
                     docs_dir: Optional[str] = None, raise_on_failure: bool = True) -> GateReport:
    exps = [
        ("ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]}),
        ("ExpectColumnValuesToBeBetween", {"column": "std", "min_value": cfg.std_min, "max_value": cfg.std_max}),
        ("ExpectTableRowCountToEqual", {"value": int(expected_count)}),
    ]
    return run_gate("latents", latent_table(latents), exps, docs_dir=docs_dir, raise_on_failure=raise_on_failure)


@dataclass
class CachedData:
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    prompt_idx: torch.Tensor
    prompts: List[str]
    manifest: Dict[str, Any]
    data_hash: str


def load_cache(url: str, storage_options: Optional[Dict[str, Any]] = None,
               expect_latent_shape: Optional[tuple] = None, rank: int = 0, world: int = 1) -> CachedData:
    """Read and verify all shards (or this rank's share of them) under ``url``.

    A missing/corrupt shard or a latent shape that differs from the manifest or from
    ``expect_latent_shape`` (the teacher's) raises ShardError naming the shard.
    """
    loc = Storage(url, storage_options)
    shards = ShardSet.open(loc)
    spec = shards.spec
    lshape = tuple(spec.get("latent_shape", ()))
    if expect_latent_shape is not None and lshape and tuple(expect_latent_shape) != lshape:
        raise ShardError(f"cache {shards.url} holds latents of shape {list(lshape)}, but the teacher "
                         f"expects {list(expect_latent_shape)}")
    names = shards.names("shard-")
    if not names:
        raise ShardError(f"cache {shards.url} lists no shards")
    expected_n = math.ceil(spec["n_prompts"] * spec["samples_per_prompt"] / spec["shard_size"])
    missing = [f"shard-{k:05d}" for k in range(expected_n) if f"shard-{k:05d}" not in shards.shards]
    if missing:
        raise ShardError(f"cache {shards.url} is incomplete: missing {missing[:5]} "
                         f"({len(missing)} of {expected_n} shards); rerun the cache step")
    mine = names[rank::world] if world > 1 and len(names) >= world else names
    lat, cond, pidx = [], [], []
    try:
        for n in mine:
            t = shards.read(n, expect_shapes={"latents": [None, *lshape]})
            lat.append(t["latents"])
            cond.append(t["cond"])
            pidx.append(t["prompt_idx"])
        uncond = shards.read("uncond")["uncond"]
    except ShardError as e:
        if e.fix:
            raise
        raise ShardError(str(e), fix="rerun the cache step (a new run or `resume`): it verifies every shard and "
                                     "recomputes those that do not match, bit-identically") from None
    c = torch.cat(cond)
    if uncond.shape[1:] != c.shape[1:]:
        raise ShardError(f"cache {shards.url}: uncond embedding shape {list(uncond.shape)} does not match "
                         f"cond {list(c.shape)}")
    return CachedData(latents=torch.cat(lat), cond=c, uncond=uncond, prompt_idx=torch.cat(pidx),
                      prompts=list(shards.manifest.get("extra", {}).get("prompts", [])),
                      manifest=shards.manifest, data_hash=shards.content_hash())


def config_dict(cfg: CacheConfig) -> Dict[str, Any]:
    return asdict(cfg)
