"""The project's attention op inside diffusers transformers (Wan2.1, Cosmos-Predict2).

The processors below compute q, k, v exactly as diffusers' stock processors do
(projections, QK norms, RoPE, GQA repeat, the I2V image branch for Wan) and call
:func:`rcm_core.attention.attention` instead of diffusers' attention dispatcher,
so ``torch.func.jvp`` through the unmodified model uses the op's own forward-mode
rule (never a fused SDPA kernel, which has no forward-AD formula).

    from rcm_core.real.attention import install_rcm_attention
    install_rcm_attention(transformer)      # teacher, student and fake score
"""
from __future__ import annotations

import torch
from torch import nn

from ...nets.attention import attention
from ...nets.rope import wan_rope

__all__ = ["RcmWanAttnProcessor", "RcmCosmosAttnProcessor", "install_rcm_attention", "uses_rcm_attention"]


def _no_mask(attention_mask, where: str) -> None:
    if attention_mask is not None:
        raise NotImplementedError(
            f"{where}: an attention mask was passed; the project's attention op has no mask. "
            "Wan2.1 / Cosmos-Predict2 text-to-video/image pipelines pass none (text padding is zeroed instead).")


class RcmWanAttnProcessor:
    """Drop-in for diffusers' ``WanAttnProcessor`` (self-, cross- and I2V attention)."""

    rcm_attention = True
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        _no_mask(attention_mask, "RcmWanAttnProcessor")
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - 512   # as diffusers: text context is 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = wan_rope(query, *rotary_emb)      # diffusers' apply_rotary_emb maths (Triton on CUDA)
            key = wan_rope(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = attention(query, key_img, value_img, layout="bnhd")
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = attention(query, key, value, layout="bnhd")
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class RcmCosmosAttnProcessor:
    """Drop-in for diffusers' ``CosmosAttnProcessor2_0`` (Cosmos-Predict2 self- and cross-attention)."""

    rcm_attention = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        _no_mask(attention_mask, "RcmCosmosAttnProcessor")
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # GQA as the stock processor (a no-op for Cosmos-Predict2, whose k/v have the query's head dim)
        key = key.repeat_interleave(query.size(3) // key.size(3), dim=3)
        value = value.repeat_interleave(query.size(3) // value.size(3), dim=3)
        hidden_states = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout="bnhd")
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _replacement(processor):
    name = type(processor).__name__
    if getattr(processor, "rcm_attention", False):
        return processor
    if name in ("WanAttnProcessor", "WanAttnProcessor2_0"):
        return RcmWanAttnProcessor()
    if name == "CosmosAttnProcessor2_0":
        return RcmCosmosAttnProcessor()
    raise NotImplementedError(
        f"no project attention processor for diffusers' {name}; supported: WanAttnProcessor (Wan2.1), "
        "CosmosAttnProcessor2_0 (Cosmos-Predict2)")


def install_rcm_attention(model: nn.Module) -> int:
    """Replace every attention processor of ``model`` by the project's; returns how many.

    Works on any diffusers model whose attention modules expose ``processor`` /
    ``set_processor`` (WanTransformer3DModel, CosmosTransformer3DModel). Raises for
    processors it does not know, rather than silently keeping SDPA.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(_replacement(module.processor))
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no diffusers attention modules to patch")
    return n


def uses_rcm_attention(model: nn.Module) -> bool:
    procs = [m.processor for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    return bool(procs) and all(getattr(p, "rcm_attention", False) for p in procs)
