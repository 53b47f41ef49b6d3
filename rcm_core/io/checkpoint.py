"""The two checkpoint formats of :class:`rcm_core.trainer.RCMTrainer`, and the EMA export.

* ``"file"``: one ``torch.save`` file of full (unsharded) tensors, written atomically by one process.
  The format of single-process / replicated training (and of every checkpoint before the DCP one).
* ``"dcp"``: a directory in ``torch.distributed.checkpoint`` (DCP) format, written collectively: each
  rank writes its own shards (no full tensor is ever gathered on one rank), global metadata lets any
  number of ranks (or one process without FSDP) load it (resharding). Layout::

      <dir>/__0_0.distcp ... __<r>_0.distcp   the shards (DCP: one file per rank)
      <dir>/.metadata                          DCP's global metadata (tensor names, shapes, chunks)
      <dir>/rcm_checkpoint.json                step, config, EMA counters, world size: written LAST

  Tensor names are canonical FQNs (no ``_checkpoint_wrapped_module.`` / ``_fsdp`` parts):
  ``student.<fqn>``, ``fake.<fqn>``, ``ema.<fqn>`` and the flattened AdamW states
  ``opt_student.state.<fqn>.exp_avg``, ``opt_student.param_groups.<fqn>.lr``, ...
  A directory is a checkpoint only once ``rcm_checkpoint.json`` exists (:func:`is_complete`): on a
  local filesystem the directory is written under a temporary name and renamed after the marker is
  in it; on an object store (``s3://``, through DCP's fsspec writer) it is written in place with the
  marker last. A killed save leaves no complete-looking directory behind.

LoRA runs (``DistillConfig.lora``) save only the adapters, in both formats: ``student``, ``fake`` and ``ema``
hold the canonical names of that adapter's weights (``<layer>.lora_A.<part>.weight``, ``...lora_B...``) and the
optimiser states cover those weights only; the base is the teacher's and is never written.

``python -m torch.distributed.checkpoint.format_utils dcp_to_torch <dir> out.pt`` turns a DCP
directory into one file (keys as above) for inspection.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import time
import uuid
import warnings
from typing import Any, Dict, Optional

import fsspec
import torch
import torch.distributed as dist

from .files import url_to_fs

__all__ = ["FILE", "DCP", "MARKER", "DCP_FORMAT", "IncompleteCheckpointError", "detect_format", "is_complete",
           "read_meta", "save_dcp", "load_dcp", "ema_safetensors", "lora_safetensors", "lora_experts"]

FILE, DCP = "file", "dcp"
MARKER = "rcm_checkpoint.json"
DCP_FORMAT = "rcm-dcp/1"
_TMP = ".tmp-"


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory without its marker: a save that did not finish."""


def _fs(url: str, storage_options: Optional[dict]):
    return url_to_fs(url, storage_options)


def _is_local(fs) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protos or "local" in protos


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def detect_format(url: str, storage_options: Optional[dict] = None) -> str:
    """``"file"`` or ``"dcp"`` for what ``url`` holds; FileNotFoundError when nothing,
    :class:`IncompleteCheckpointError` for a directory whose save did not finish."""
    fs, path = _fs(url, storage_options)
    if fs.isfile(path):
        return FILE
    if fs.isdir(path):
        if fs.exists(posixpath.join(path, MARKER)):
            return DCP
        raise IncompleteCheckpointError(f"{url} is an incomplete checkpoint directory (no {MARKER}: its save "
                                        "did not finish); resume from an earlier checkpoint")
    raise FileNotFoundError(f"no checkpoint at {url}")


def is_complete(url: str, storage_options: Optional[dict] = None) -> bool:
    """Whether ``url`` holds a complete checkpoint of either format."""
    try:
        detect_format(url, storage_options)
    except (FileNotFoundError, IncompleteCheckpointError):
        return False
    return True


def read_meta(url: str, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """The JSON metadata (step, config, ...) of a complete DCP checkpoint."""
    fs, path = _fs(url, storage_options)
    return json.loads(fs.cat_file(posixpath.join(path, MARKER)))


def _writer(url: str, storage_options: Optional[dict], local: bool):
    import torch.distributed.checkpoint as dcp
    if local:
        return dcp.FileSystemWriter(fsspec.core.strip_protocol(url) if "://" in url else url, overwrite=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    return FsspecWriter(url, sync_files=False, overwrite=True, **(storage_options or {}))


def _reader(url: str, storage_options: Optional[dict], local: bool):
    import torch.distributed.checkpoint as dcp
    if local:
        return dcp.FileSystemReader(fsspec.core.strip_protocol(url) if "://" in url else url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    return FsspecReader(url, **(storage_options or {}))


@contextlib.contextmanager
def _quiet(collective: bool):
    """Without collectives DCP warns that it assumes a single process: that is the intent here."""
    with warnings.catch_warnings():
        if not collective:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank0_then_share(fn, collective: bool):
    """Run ``fn`` on rank 0 (every process when not collective); every rank gets its result or its error."""
    if not collective:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"checkpoint: rank 0 failed: {value}")
    return value


def save_dcp(state: Dict[str, Any], url: str, meta: Dict[str, Any], storage_options: Optional[dict] = None,
             collective: bool = True) -> None:
    """Write ``state`` (a nested dict of tensors / DTensors) as a DCP directory at ``url``, then ``meta``.

    ``collective``: every rank of the default process group calls it and writes its own shards (FSDP);
    otherwise the calling process writes everything alone (``no_dist``). The directory appears complete
    only at the end (see the module docstring); an existing checkpoint at ``url`` is replaced.
    """
    import torch.distributed.checkpoint as dcp

    collective = collective and dist.is_available() and dist.is_initialized()
    fs, path = _fs(url, storage_options)
    local = _is_local(fs)
    parent, base = posixpath.split(path.rstrip("/"))

    def prepare():                    # rank 0: the directory the shards go to (same on every rank)
        if not local:                 # object store: in place, marker last (first drop a stale marker)
            if fs.exists(posixpath.join(path, MARKER)):
                fs.rm(posixpath.join(path, MARKER))
            if fs.exists(path):
                fs.rm(path, recursive=True)
            return url
        fs.makedirs(parent, exist_ok=True)
        for old in fs.ls(parent, detail=False):           # leftovers of killed saves of this checkpoint
            if posixpath.basename(old).startswith(_TMP) and posixpath.basename(old).endswith("-" + base):
                fs.rm(old, recursive=True)
        tmp = posixpath.join(parent, f"{_TMP}{uuid.uuid4().hex}-{base}")
        fs.makedirs(tmp, exist_ok=True)
        return tmp

    target = _rank0_then_share(prepare, collective)
    with _quiet(collective):
        dcp.save(state, storage_writer=_writer(target, storage_options, local), no_dist=not collective)

    def finish():                     # rank 0, after every rank's shards and DCP's .metadata are written
        record = {"format": DCP_FORMAT, "torch": torch.__version__, "saved_at": time.time(),
                  "world_size": dist.get_world_size() if collective else 1, **meta}
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        if not local:
            fs.pipe_file(posixpath.join(path, MARKER), data)
            return
        with fs.open(posixpath.join(target, MARKER), "wb") as f:
            f.write(data)
        if fs.exists(path):           # replace an older save of the same name: move it away first
            trash = posixpath.join(parent, f"{_TMP}{uuid.uuid4().hex}-old-{base}")
            fs.mv(path, trash, recursive=True)
            fs.mv(target, path, recursive=True)
            fs.rm(trash, recursive=True)
        else:
            fs.mv(target, path, recursive=True)           # a rename: the checkpoint appears whole

    _rank0_then_share(finish, collective)


def load_dcp(state: Dict[str, Any], url: str, storage_options: Optional[dict] = None,
             collective: bool = True) -> Dict[str, Any]:
    """Load a complete DCP checkpoint into ``state`` in place (any world size: DCP reshards to the
    shapes/placements of ``state``'s tensors); returns its JSON metadata.

    ``collective``: every rank calls it (FSDP); otherwise this process reads what it needs alone.
    """
    import torch.distributed.checkpoint as dcp

    if detect_format(url, storage_options) != DCP:
        raise ValueError(f"{url} is a single-file checkpoint, not a DCP directory")
    collective = collective and dist.is_available() and dist.is_initialized()
    fs, _ = _fs(url, storage_options)
    meta = read_meta(url, storage_options)
    if meta.get("format") != DCP_FORMAT:
        raise ValueError(f"{url}: checkpoint format {meta.get('format')!r}, this code reads {DCP_FORMAT!r}")
    with _quiet(collective):
        dcp.load(state, storage_reader=_reader(url, storage_options, _is_local(fs)), no_dist=not collective)
    return meta


def ema_safetensors(trainer, expected_keys=None) -> Optional[bytes]:
    """The EMA student as safetensors bytes (float32, the network's own state-dict names, e.g. the
    diffusers transformer's), or None on ranks other than 0 under FSDP.

    Under FSDP it is a collective: the full tensors are gathered one by one to rank 0's CPU
    (``cpu_offload``); other ranks hold nothing. ``expected_keys`` (e.g. the teacher network's
    ``state_dict().keys()``): raise unless the export has exactly these names.
    """
    from safetensors.torch import save

    sd = trainer.ema_state_dict()
    if trainer.sharded and dist.get_rank() != 0:
        return None
    if expected_keys is not None and set(sd) != set(expected_keys):
        missing, extra = sorted(set(expected_keys) - set(sd)), sorted(set(sd) - set(expected_keys))
        raise ValueError(f"EMA export: names differ from the teacher's state dict: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    return save({k: v.detach().float().cpu().contiguous() for k, v in sd.items()})


def lora_experts(trainer) -> tuple:
    """The expert names of a two-expert (:class:`rcm_core.denoiser.TimestepExperts`) LoRA student,
    ``("transformer", "transformer_2")``; ``()`` for one network."""
    from ..nets.denoiser import TimestepExperts
    return ("transformer", "transformer_2") if isinstance(trainer.student.net, TimestepExperts) else ()


def lora_safetensors(trainer, adapter: str = "ema", prefix: Optional[str] = "transformer",
                     expert: Optional[str] = None) -> Optional[bytes]:
    """LoRA runs: the EMA student's adapter (or ``adapter``) as safetensors bytes in the peft/diffusers LoRA
    format (:func:`rcm_core.lora.adapter_safetensors`: keys ``transformer.<layer>.lora_A.weight`` /
    ``lora_B.weight``, the alpha/rank scaling folded into B, ``lora_adapter_metadata``), loadable with
    ``WanPipeline.load_lora_weights`` / ``WanTransformer3DModel.load_lora_adapter``; ``prefix=None``:
    peft's plain keys. Under FSDP a collective (only the adapter is gathered); None on ranks other than 0.
    The merged weights are :func:`ema_safetensors`.

    Two-expert students (:func:`lora_experts`, Wan2.2 A14B): one file per expert, ``expert`` = ``"transformer"``
    or ``"transformer_2"`` (required), each with the keys of ONE ``WanTransformer3DModel``
    (``transformer.<layer>...``): diffusers' WanPipeline loads the first with ``load_lora_weights(f)`` and the
    second with ``load_lora_weights(f2, load_into_transformer_2=True)``."""
    from ..nets.lora import adapter_safetensors

    experts = lora_experts(trainer)
    if experts and expert not in experts:
        raise ValueError(f"lora_safetensors: a two-expert student needs expert= one of {experts} (one file per "
                         f"expert, as diffusers' WanPipeline loads them), got {expert!r}")
    if not experts and expert is not None:
        raise ValueError(f"lora_safetensors: expert={expert!r} given for a one-network student")
    sd = trainer.lora_state_dict(adapter)
    if trainer.sharded and dist.get_rank() != 0:
        return None
    if expert is not None:
        sd = {k[len(expert) + 1:]: v for k, v in sd.items() if k.startswith(expert + ".")}
    return adapter_safetensors(sd, adapter, trainer.cfg.lora, prefix)
