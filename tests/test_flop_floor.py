"""bench/flop_floor.py counts a Wan forward's tensor-core FLOPs on meta tensors: checked against the closed form
of diffusers' Wan2.1 transformer written out here (B = 1), for a small config."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flop_floor  # noqa: E402


def test_wan_forward_flops_match_the_closed_form(monkeypatch):
    monkeypatch.setenv("RCM_ATTN_PRIMAL", "sdpa")
    heads, hd, ffn, layers, text_dim, freq, text_len = 2, 32, 96, 3, 24, 16, 7
    cfg = dict(num_attention_heads=heads, attention_head_dim=hd, ffn_dim=ffn, num_layers=layers, text_dim=text_dim,
               freq_dim=freq, in_channels=16, out_channels=16)
    frames, height, width = 9, 64, 96                                     # latents (3, 8, 12)
    f = flop_floor.dit_forward_flops("wan2.1-1.3b", frames, height, width, overrides=cfg, text_len=text_len)
    D, L, T = heads * hd, text_len, text_dim
    N = 3 * (8 // 2) * (12 // 2)                                          # patch (1, 2, 2)
    P = 16 * 1 * 2 * 2                                                    # proj_out: C x prod(patch)
    per_block = 4 * N * D * D + 2 * N * D * D + 2 * L * D * D + 2 * N * D * ffn   # q k v o, cross q o / k v, FFN
    linear = 2 * (layers * per_block + L * T * D + L * D * D                      # text projection (2 linears)
                  + freq * D + D * D + D * 6 * D                                   # time embedding, time projection
                  + N * D * P)
    attention = layers * (4 * N * N * D + 4 * N * L * D)                          # self: QK^T, PV; cross likewise
    assert f["tokens"] == N
    assert f["linear"] == linear
    assert f["attention"] == attention
    assert f["conv"] == 2 * N * D * 16 * 4                                        # the patch embedding
    # the step floors add up from the forward's parts (the units of step_floors' docstring)
    s = flop_floor.step_floors(f)
    assert s["plain_keep_attention"] == (linear + attention) + linear + 2 * linear + 2.5 * attention
    assert s["scm_fused_full_ac"] - s["scm_fused_keep_attention"] == attention
