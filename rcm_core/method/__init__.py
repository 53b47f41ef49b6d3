"""The method: TrigFlow maths, the rCM/sCM/DMD losses, samplers, EMA, RNG streams, the config and the
staged schedule. No torch.distributed, no network code beyond the denoiser wrapper the samplers call."""
