"""Networks: the TrigFlow denoiser wrapper, the one attention op (forward-mode rule; the only importer of
rcm_kernels) and LoRA adapters; ``base`` holds what they share with the parallel layer."""
