"""Real teachers through diffusers: Wan2.1 T2V 1.3B/14B and Cosmos-Predict2 2B/14B (issue 4).

Needs the ``real`` extra (diffusers, transformers, sentencepiece). Nothing is downloaded:
weights come from a local diffusers-layout directory or the Hugging Face cache.
"""
from .attention import RcmCosmosAttnProcessor, RcmWanAttnProcessor, install_rcm_attention, uses_rcm_attention
from .loading import (LatentCodec, RealTeacherError, RealTextEncoder, check_layout, check_resolution, cosmos_call,
                      diffusers_rf_call, inspect_real_teacher, inspect_teacher_path, is_diffusers_dir,
                      latent_shape_for, load_real_teacher, load_teacher_from_path,
                      resolve_weights)
from .memory import estimate_memory, pick_context_parallel
from .time_embedding import install_fp32_time_embedding, uses_fp32_time_embedding
from .specs import COSMOS_NEGATIVE_PROMPT, SPECS, WAN_NEGATIVE_PROMPT, RealTeacherSpec, spec_for_config

__all__ = ["RcmCosmosAttnProcessor", "RcmWanAttnProcessor", "install_rcm_attention", "uses_rcm_attention",
           "LatentCodec", "RealTeacherError", "RealTextEncoder", "check_layout", "check_resolution", "cosmos_call",
           "diffusers_rf_call", "inspect_real_teacher", "inspect_teacher_path", "is_diffusers_dir", "latent_shape_for", "load_real_teacher", "load_teacher_from_path",
           "resolve_weights", "estimate_memory", "pick_context_parallel", "COSMOS_NEGATIVE_PROMPT", "SPECS", "WAN_NEGATIVE_PROMPT",
           "RealTeacherSpec", "spec_for_config", "install_fp32_time_embedding", "uses_fp32_time_embedding"]
