"""Tiny random Wan2.1 / Cosmos-Predict2 checkpoints in diffusers layout, written by the tests.

Shared by tests/test_real_teachers.py and tests/test_flow_real_teacher.py (imported explicitly,
``from real_fixtures import *``). Nothing is downloaded: tiny transformers, a tiny UMT5 / T5
encoder, an offline WordLevel tokenizer and a tiny Wan VAE are saved with ``save_pretrained``.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # diffusers imports triton (and Hugging Face `kernels`); triton must see TRITON_INTERPRET before that,
    # or the CPU interpreter tests of rcm_kernels (tests/test_kernel_flash_jvp.py, which sets the same
    # default) fail when this module is imported first
    os.environ.setdefault("TRITON_INTERPRET", "1")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

__all__ = ["WORDS", "TEXT_DIM", "SMALL", "SMALL22", "tiny_wan", "tiny_cosmos", "tiny_tokenizer", "tiny_encoder",
           "tiny_vae", "tiny_vae22", "tiny_expert_pair", "write_checkpoint", "write_wan22_checkpoint", "wan_dir",
           "cosmos_dir", "wan22_dir", "a14b_dir", "diffusers", "transformers"]

WORDS = "a cat dog red blue runs on the beach sky video of big small".split()
TEXT_DIM = 16


def sqlite_registry(tmp_path, monkeypatch):
    """(client, experiment id) of a fresh sqlite MLflow under ``tmp_path``, with the registry's component
    cache there and no RCM_* overrides from the environment (tests of register_student)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RCM_COMPONENT_CACHE", str(tmp_path / "component-cache"))
    for k in ("RCM_COMPONENT_STORE", "RCM_TEACHER_DIR", "RCM_DEVICE", "RCM_DTYPE"):
        monkeypatch.delenv(k, raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    return client, client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")


def tiny_wan(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    cfg.update(kw)
    return _randomise(diffusers.WanTransformer3DModel(**cfg))


def tiny_cosmos(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               text_embed_dim=TEXT_DIM, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
               rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None)
    cfg.update(kw)
    return _randomise(diffusers.CosmosTransformer3DModel(**cfg))


def _randomise(model):
    """Zero-initialised gates/projections would hide attention: give every parameter random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(max(1, p.shape[-1])) + (p == 1) * 1.0)
    return model


def tiny_tokenizer(max_len=512):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=max_len)


def tiny_encoder(kind):
    torch.manual_seed(2)
    cls_cfg = {"umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
               "t5": (transformers.T5EncoderModel, transformers.T5Config)}[kind]
    cfg = cls_cfg[1](vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return cls_cfg[0](cfg).eval()


def tiny_vae():
    torch.manual_seed(3)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                      temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                      latents_std=[1.5, 0.5, 1.0, 2.0]).eval()


def write_checkpoint(root, family="wan", transformer=None):
    transformer = transformer if transformer is not None else (tiny_wan() if family == "wan" else tiny_cosmos())
    transformer.save_pretrained(root / "transformer")
    tiny_encoder("umt5" if family == "wan" else "t5").save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    tiny_vae().save_pretrained(root / "vae")
    pipe = "WanPipeline" if family == "wan" else "Cosmos2TextToImagePipeline"
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": pipe, "transformer": ["diffusers", type(transformer).__name__],
        "text_encoder": ["transformers", "UMT5EncoderModel" if family == "wan" else "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return root


def tiny_vae22(z_dim=6):
    """A tiny Wan2.2 VAE: residual blocks, patchify 2 (in/out channels 3 x 2 x 2), one 2x down step in space
    and time -> 4x spatial (16x in the 5B), 2x temporal; scale_factor_* declared to match (WanPipeline reads them)."""
    torch.manual_seed(4)
    return diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1,
                                      attn_scales=[], temperal_downsample=[True], is_residual=True, in_channels=12,
                                      out_channels=12, patch_size=2, scale_factor_temporal=2, scale_factor_spatial=4,
                                      latents_mean=[0.1, -0.2, 0.0, 0.3, -0.1, 0.2][:z_dim],
                                      latents_std=[1.5, 0.5, 1.0, 2.0, 0.8, 1.2][:z_dim]).eval()


def tiny_expert_pair(delta=0.3, seed=0):
    """Two tiny Wan experts of one architecture (high noise, low noise): the low-noise expert is the high-noise
    one with every weight moved by ``delta`` x a random relative perturbation (Wan2.2's experts share a lineage)."""
    high = tiny_wan(seed)
    low = tiny_wan(seed)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in low.parameters():
            p.mul_(1 + delta * torch.randn(p.shape, generator=g))
    return high, low


def write_wan22_checkpoint(root, kind="ti2v", transformer=None, transformer_2=None, boundary_ratio=0.875):
    """A tiny Wan2.2 checkpoint in diffusers layout: ``ti2v`` (the Wan2.2 VAE, expand_timesteps, z_dim 6 ->
    transformer in/out channels 6) or ``a14b`` (Wan2.1 VAE, two experts, boundary_ratio)."""
    if kind == "ti2v":
        transformer = transformer if transformer is not None else tiny_wan(in_channels=6, out_channels=6)
        vae = tiny_vae22()
    else:
        if transformer is None:
            transformer, transformer_2 = tiny_expert_pair()
        vae = tiny_vae()
        transformer_2.save_pretrained(root / "transformer_2")
    transformer.save_pretrained(root / "transformer")
    tiny_encoder("umt5").save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
        "boundary_ratio": boundary_ratio if kind == "a14b" else None, "expand_timesteps": kind == "ti2v",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if kind == "a14b" else [None, None],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return root


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    return write_wan22_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wan22-ti2v", "ti2v")


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    return write_wan22_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wan22-a14b", "a14b")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wan", "wan")


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-cosmos", "cosmos")


SMALL = dict(frames=5, height=8, width=8, text_len=8, dtype=torch.float32)
SMALL22 = dict(frames=5, height=16, width=16, text_len=8, dtype=torch.float32)   # Wan2.2 VAE: latents (6, 3, 4, 4)
