"""Networks: the TrigFlow denoiser wrapper, the ops with their own forward-mode rules (attention, Wan's RoPE, the
Wan block's norms and residuals: the only importers of rcm_kernels) and LoRA adapters; ``base`` holds what they
share with the parallel layer."""
