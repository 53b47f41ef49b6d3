"""The rCM trainer, by concern: :mod:`.setup` (networks, optimisers, EMA for full fine-tuning, LoRA, FSDP, CP),
:mod:`.schedule` (counters, stages, rollout lengths, learning rates, random streams), :mod:`.update` (what both
updates share: autocast, micro-batches, the optimiser step across ranks), :mod:`.student` (the sCM/dCM and DMD
terms), :mod:`.critic` (the fake-score update and its diagnostics), :mod:`.checkpoint` (state dicts and
checkpoints) and :mod:`.trainer` (:class:`RCMTrainer`, composed of them)."""
from .trainer import RCMTrainer

__all__ = ["RCMTrainer"]
