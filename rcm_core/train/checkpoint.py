"""The trainer's state: state_dict / load_state_dict, single-file and DCP checkpoints, the EMA and LoRA weights."""
from __future__ import annotations

import io
from typing import Optional

import torch

from .update import _is_dtensor, _world


class _Checkpoints:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: state dicts and checkpoints."""

    # ---- checkpoints ---------------------------------------------------------------------------
    # Two formats (rcm_core/checkpoint.py): "dcp", a directory written collectively, each rank its own
    # shards, loadable on any number of ranks (the default when sharded); "file", one torch.save file of
    # full tensors (the default otherwise, and the only format before DCP). Loading detects which.
    def _model_sd(self, net, part: Optional[str] = None) -> dict:
        if self.cfg.lora is not None:
            return self._adapter_sd(net, part)
        if not self.sharded:
            return net.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optim_sd(self, net, opt) -> Optional[dict]:
        if not self.sharded:
            return opt.state_dict()
        if not opt.state:      # never stepped: get_optimizer_state_dict would create a state (a zero-lr step)
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _adapter_sd(self, net, adapter: str) -> dict:
        """LoRA: adapter ``adapter``'s weights as full tensors (canonical names; under FSDP each adapter
        weight is all-gathered: a collective, every rank gets them; the base is never gathered)."""
        from ..nets.lora import adapter_parameters
        out = {}
        for n, p in adapter_parameters(net, adapter):
            out[n] = (p.full_tensor().cpu() if _is_dtensor(p) else p).detach()
        return out

    def _load_adapter(self, net, adapter: str, sd: dict) -> None:
        """LoRA: set adapter ``adapter``'s weights from full tensors (names as :meth:`_adapter_sd`)."""
        from ..nets.lora import adapter_parameters
        params = dict(adapter_parameters(net, adapter))
        if set(sd) != set(params):
            missing, extra = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
            raise ValueError(f"LoRA checkpoint: adapter {adapter!r} does not fit this network: missing {missing[:4]}, "
                             f"unexpected {extra[:4]} (another LoRAConfig.target_modules?)")
        with torch.no_grad():
            for n, p in params.items():
                v = sd[n]
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"LoRA checkpoint: {n} is {tuple(v.shape)}, this network's {tuple(p.shape)} "
                                     "(another LoRAConfig.rank?)")
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor
                    v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
                p.copy_(v)

    def _check_lora(self, saved_cfg: Optional[dict], where: str) -> None:
        """A checkpoint loads only into a trainer with the same LoRA setting (or both without)."""
        from ..method.config import LoRAConfig
        saved = (saved_cfg or {}).get("lora")
        saved = LoRAConfig.from_dict(saved) if isinstance(saved, dict) else saved
        if saved != self.cfg.lora:
            raise ValueError(f"checkpoint {where} was trained with lora={saved}; this trainer has "
                             f"lora={self.cfg.lora} (LoRA and full checkpoints do not load into each other)")

    def _ckpt_parts(self) -> dict:
        """What a checkpoint holds: name -> (network, its optimiser or None). LoRA: the shared network
        for each part, of which the part's adapter (named as the part) is saved."""
        ema_net = self.student.net if self.cfg.lora is not None else self.ema.module
        parts = {"student": (self.student.net, self.opt_student), "ema": (ema_net, None)}
        if self.fake is not None:
            parts["fake"] = (self.fake.net, self.opt_fake)
        return parts

    def _dcp_state(self, opt_parts) -> dict:
        """The tensors of a DCP checkpoint: this rank's shards (DTensors) under FSDP, plain tensors
        otherwise; canonical FQNs; the optimiser states of ``opt_parts`` (e.g. ``["opt_student"]``)
        flattened to per-parameter keys so that they reshard."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        sd = {}
        for name, (net, opt) in self._ckpt_parts().items():
            sd[name] = get_model_state_dict(net)
            if self.cfg.lora is not None:               # only this part's adapter (the base is the teacher's)
                from ..nets.lora import select_adapter
                sd[name] = select_adapter(sd[name], name)
            if opt is not None and f"opt_{name}" in opt_parts:
                sd[f"opt_{name}"] = get_optimizer_state_dict(net, opt, options=flat)
        return sd

    def _load_dcp(self, url: str, storage_options: Optional[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from ..io.checkpoint import load_dcp, read_meta
        meta = read_meta(url, storage_options)
        self._check_lora(meta.get("config"), url)
        parts = self._ckpt_parts()
        saved = sorted(p for p in meta["parts"] if not p.startswith("opt_"))
        if saved != sorted(parts):
            raise ValueError(f"checkpoint {url} holds {saved} (method {meta['config'].get('method')!r}); this "
                             f"trainer has {sorted(parts)} (method {self.cfg.method!r})")
        state = self._dcp_state([p for p in meta["parts"] if p.startswith("opt_")])
        load_dcp(state, url, storage_options, collective=self.sharded)
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        for name, (net, opt) in parts.items():
            set_model_state_dict(net, state[name], options=StateDictOptions(strict=self.cfg.lora is None))
            if opt is not None and f"opt_{name}" in state:
                set_optimizer_state_dict(net, opt, state[f"opt_{name}"], options=flat)
            elif opt is not None:
                opt.state.clear()                     # saved before its first step
        self.ema.num_updates = int(meta["ema"]["num_updates"])
        self.step = int(meta["step"])
        self._load_diag_state(meta.get("diagnostics"))
        self._reseed()

    def ema_state_dict(self) -> dict:
        """The EMA student's full weights (with FSDP: a collective; the full dict lands on rank 0). LoRA: the
        EMA adapter merged into the teacher's weights, under the teacher's names (see also
        :func:`rcm_core.checkpoint.lora_safetensors` for the adapter alone)."""
        if self.cfg.lora is None:
            return self._model_sd(self.ema.module)
        from ..nets.lora import EMA, merge_state_dict
        full = self.student.net.state_dict()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(self.student.net, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        return merge_state_dict(full, EMA, self.cfg.lora.scaling)

    def lora_state_dict(self, adapter: str = "ema") -> dict:
        """LoRA: one adapter's weights as full tensors (``ema``: the EMA student's; collective under FSDP)."""
        if self.cfg.lora is None:
            raise ValueError("lora_state_dict: this trainer does full fine-tuning (DistillConfig.lora is None)")
        return self._adapter_sd(self.student.net, adapter)

    def state_dict(self) -> dict:
        """The whole training state as full (unsharded) tensors; with FSDP call it on every rank
        (collective): rank 0 gets the state, the other ranks empty parts. LoRA: the adapters (student,
        fake, ema) and their optimisers only; the base is the teacher's."""
        lora = self.cfg.lora is not None
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "diagnostics": self._diag_state(),
            "student": self._model_sd(self.student.net, "student"),
            "fake": self._model_sd(self.fake.net, "fake") if self.fake is not None else None,
            "ema": {"module": self._model_sd(self.student.net, "ema") if lora else self.ema_state_dict(),
                    "num_updates": self.ema.num_updates,
                    "sigma_rel": self.ema.sigma_rel},
            "opt_student": self._optim_sd(self.student.net, self.opt_student),
            "opt_fake": self._optim_sd(self.fake.net, self.opt_fake) if self.opt_fake is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of :meth:`state_dict`; with FSDP every rank passes the full state."""
        self._check_lora(sd.get("config"), "state dict")
        if self.cfg.lora is not None:
            from ..nets.lora import adapter_keys
            for name, (net, opt) in self._ckpt_parts().items():
                self._load_adapter(net, name, sd["ema"]["module"] if name == "ema" else sd[name])
                if opt is not None:
                    self._load_optim(net, opt, sd[f"opt_{name}"], names=adapter_keys(net, name))
            self.ema.num_updates = int(sd["ema"]["num_updates"])
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.student.net, sd["student"], options=full)
            set_model_state_dict(self.ema.module, sd["ema"]["module"], options=full)
            if self.fake is not None:
                set_model_state_dict(self.fake.net, sd["fake"], options=full)
            self._load_optim(self.student.net, self.opt_student, sd["opt_student"])
            if self.fake is not None:
                self._load_optim(self.fake.net, self.opt_fake, sd["opt_fake"])
            self.ema.num_updates = int(sd["ema"]["num_updates"])
        else:
            self.student.net.load_state_dict(sd["student"])
            if self.fake is not None:
                self.fake.net.load_state_dict(sd["fake"])
                self._load_optim(self.fake.net, self.opt_fake, sd["opt_fake"])
            self.ema.load_state_dict(sd["ema"])
            self._load_optim(self.student.net, self.opt_student, sd["opt_student"])
        self.step = int(sd["step"])
        self._load_diag_state(sd.get("diagnostics"))
        self._reseed()

    def _load_optim(self, net, opt, osd: Optional[dict], names: Optional[list] = None) -> None:
        """An optimiser from a single-file checkpoint's full state: ``opt.state_dict()`` of a non-sharded
        run (parameters by index), a sharded run's gathered state (by canonical name), or None (saved
        before its first step). Either loads into a sharded or a non-sharded trainer. ``names``: the
        canonical names of the optimiser's parameters in order (default: all of ``net``'s; LoRA: the adapter's)."""
        by_index = osd is not None and all(isinstance(i, int) for g in osd["param_groups"] for i in g["params"])
        if by_index and not self.sharded:
            opt.load_state_dict(osd)
            return
        if osd is None or not osd.get("state"):
            opt.state.clear()
            return
        if by_index:        # indices count the parameters in order, as named_parameters() lists them
            names = names or [n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                              for n, _ in net.named_parameters()]
            osd = {"state": {names[i]: v for i, v in osd["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, osd, options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, url: str, storage_options: Optional[dict] = None, format: str = "auto") -> None:
        """Write the whole training state to ``url`` (any fsspec URL); it appears only once complete.

        ``format``: ``"auto"`` (``"dcp"`` when sharded, else ``"file"``), ``"dcp"`` (a directory; with FSDP
        every rank must call it and writes its own shards, nothing is gathered) or ``"file"`` (one file of
        full tensors; with FSDP every rank must call it, the state is gathered and rank 0 writes).
        Without FSDP the calling process writes (call it on one rank).
        """
        from ..io.checkpoint import DCP, FILE, save_dcp
        fmt = (DCP if self.sharded else FILE) if format == "auto" else format
        if fmt not in (DCP, FILE):
            raise ValueError(f"save_checkpoint(format={format!r}); known: 'auto', 'dcp', 'file'")
        if fmt == DCP:
            opt_parts = [f"opt_{n}" for n, (_, opt) in self._ckpt_parts().items() if opt is not None and opt.state]
            meta = {"step": self.step, "config": self.cfg.to_dict(), "sharded": self.sharded,
                    "ema": {"num_updates": self.ema.num_updates, "sigma_rel": self.ema.sigma_rel},
                    "diagnostics": self._diag_state(),
                    "parts": sorted(self._ckpt_parts()) + opt_parts}
            save_dcp(self._dcp_state(opt_parts), url, meta, storage_options, collective=self.sharded)
            return
        from ..io.files import atomic_write_bytes
        sd = self.state_dict()
        if self.sharded and _world()[0] != 0:
            return
        buf = io.BytesIO()
        torch.save(sd, buf)
        atomic_write_bytes(url, buf.getvalue(), storage_options)

    def load_checkpoint(self, url: str, storage_options: Optional[dict] = None) -> None:
        """Load a checkpoint of either format (detected). A DCP directory loads on any number of ranks
        (with FSDP every rank calls it, each reads the shards it needs); a single file loads into FSDP
        too (every rank reads it). An unfinished DCP save raises IncompleteCheckpointError."""
        from ..io.checkpoint import DCP, detect_format
        if detect_format(url, storage_options) == DCP:
            self._load_dcp(url, storage_options)
            return
        from ..io.files import read_bytes
        sd = torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location=self.device, weights_only=False)
        self.load_state_dict(sd)
