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

__all__ = ["WORDS", "TEXT_DIM", "SMALL", "tiny_wan", "tiny_cosmos", "tiny_tokenizer", "tiny_encoder", "tiny_vae",
           "write_checkpoint", "wan_dir", "cosmos_dir", "diffusers", "transformers"]

WORDS = "a cat dog red blue runs on the beach sky video of big small".split()
TEXT_DIM = 16


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


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wan", "wan")


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-cosmos", "cosmos")


SMALL = dict(frames=5, height=8, width=8, text_len=8, dtype=torch.float32)
