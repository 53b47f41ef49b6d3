"""Start-time checkpoint checks (every safetensors header of every component) and teacher directories.

Tiny random Wan2.1 / Cosmos-Predict2 checkpoints (tests/real_fixtures.py) are copied and damaged the
way real copies get damaged (truncated files, a corrupt header, a missing shard, a config that does
not match the weights); the weight-free description used by the flow's ``start`` must reject each,
naming the file, and so must the loader (never a raw ``SafetensorError``).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import run_flow
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import SMALL

from rcm_core.real.loading import RealTeacherError, load_teacher_from_path, read_safetensors_header, small_size
from rcm_core.real.specs import SPECS, spec_for_config

OPTS = dict(frames=5, height=8, width=8, text_len=8)

FILES = {"transformer": "transformer/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors",
         "vae": "vae/diffusion_pytorch_model.safetensors"}


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _describe(path, **opts):
    from rcm_steps.teacher import describe_teacher

    return describe_teacher(str(path), {**OPTS, **opts})


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_truncated_component_is_named_at_start_and_by_the_loader(wan_dir, tmp_path, component):
    ckpt = _copy(wan_dir, tmp_path)
    f = ckpt / FILES[component]
    data = f.read_bytes()
    f.write_bytes(data[:-1000])                                  # an interrupted copy
    for check in (lambda: _describe(ckpt), lambda: load_teacher_from_path(ckpt, **SMALL)):
        with pytest.raises(RealTeacherError) as e:
            check()
        msg = str(e.value)
        assert str(f) in msg and "truncated" in msg and "1000 bytes missing" in msg, msg
    f.write_bytes(data[:20])                                     # cut inside the header
    with pytest.raises(RealTeacherError, match=rf"{f}: truncated: the header alone should be \d+ bytes, the file "
                                               r"has 20"):
        _describe(ckpt)
    f.write_bytes(data[:5])
    with pytest.raises(RealTeacherError, match=rf"{f}: 5 bytes, too short for a safetensors file"):
        _describe(ckpt)
    f.write_bytes(data + b"\0" * 7)
    with pytest.raises(RealTeacherError, match=rf"{f}: 7 unexpected bytes after the last tensor"):
        _describe(ckpt)
    f.write_bytes(data)
    assert _describe(ckpt)["tensors"][component] > 0             # the intact copy passes again


def test_corrupt_header_and_missing_shard_are_named(wan_dir, tmp_path):
    ckpt = _copy(wan_dir, tmp_path)
    f = ckpt / FILES["vae"]
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["                                    # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    with pytest.raises(RealTeacherError, match=rf"{f}: corrupt safetensors header \(not valid JSON"):
        _describe(ckpt)
    shutil.copy(wan_dir / FILES["vae"], f)
    # a sharded text encoder whose index lists a shard that is not there
    te = ckpt / "text_encoder"
    keys = list(read_safetensors_header(te / "model.safetensors"))
    (te / "model.safetensors").rename(te / "model-00001-of-00002.safetensors")
    (te / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in keys[:-1]}, keys[-1]: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(RealTeacherError, match=r"model.safetensors.index.json lists 1 shard\(s\) missing from "
                                               r".*text_encoder: model-00002-of-00002.safetensors"):
        _describe(ckpt)


def test_configs_checked_against_every_components_weights(wan_dir, tmp_path):
    ckpt = _copy(wan_dir, tmp_path)
    cfg_path = ckpt / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_ff": 48}))         # the fixture's encoder has d_ff=32
    with pytest.raises(RealTeacherError, match=r"text_encoder: weights do not match text_encoder/config.json. "
                                               r"\d+ shape mismatches, e.g. .*\(32, 16\) vs config \(48, 16\)"):
        _describe(ckpt)
    cfg_path.write_text(json.dumps(cfg))
    vcfg_path = ckpt / "vae" / "config.json"
    vcfg = json.loads(vcfg_path.read_text())
    vcfg_path.write_text(json.dumps({**vcfg, "base_dim": 16}))   # the fixture's VAE has base_dim=8
    with pytest.raises(RealTeacherError, match=r"vae: weights do not match vae/config.json"):
        _describe(ckpt)
    vcfg_path.write_text(json.dumps(vcfg))
    (ckpt / "tokenizer" / "tokenizer.json").write_text("{broken")
    with pytest.raises(RealTeacherError, match=r"could not load the tokenizer from .*tokenizer"):
        _describe(ckpt)


def test_flow_stops_at_start_on_a_truncated_vae(wan_dir, tmp_path):
    ckpt = _copy(wan_dir, tmp_path, "wan-bad-vae")
    f = ckpt / FILES["vae"]
    f.write_bytes(f.read_bytes()[:-64])
    run, out, err = run_flow(tmp_path, teacher=str(ckpt), **OPTS)
    assert run is not None and not run.successful
    assert {s.id for s in run} == {"start"}                      # no step after start met the bad file
    assert f"{f}: truncated" in err and "64 bytes missing" in err


# ---- teacher directories: names, presets, missing model_index.json, CPU size ---------------------------

def test_directory_name_label_and_preset_from_the_checkpoint(wan_dir, tmp_path):
    from rcm_steps.teacher import teacher_label

    d = _describe(wan_dir)
    assert (d["name"], d["label"], d["size"], d["preset"]) == ("tiny-wan", "tiny-wan", "custom", "wan2.1-1.3b")
    assert teacher_label(str(wan_dir)) == "tiny-wan"
    # a Hugging Face cache snapshot is labelled by its repository, not by the snapshot hash
    snap = tmp_path / "hub" / "models--Org--My-Wan-Diffusers" / "snapshots" / ("a" * 40)
    shutil.copytree(wan_dir, snap)
    assert _describe(snap)["name"] == "My-Wan-Diffusers" and teacher_label(str(snap)) == "My-Wan-Diffusers"
    # model_index.json's _name_or_path wins over the folder name
    named = _copy(wan_dir, tmp_path, "copy-17")
    idx = json.loads((named / "model_index.json").read_text())
    (named / "model_index.json").write_text(json.dumps({**idx, "_name_or_path": "acme/wan-mini"}))
    assert _describe(named)["label"] == "wan-mini" and teacher_label(str(named)) == "wan-mini"


def test_preset_from_the_architecture_not_the_width():
    wan = lambda **kw: {"_class_name": "WanTransformer3DModel", **kw}  # noqa: E731
    for name in ("wan2.1-1.3b", "wan2.1-14b", "cosmos-predict2-2b", "cosmos-predict2-14b"):
        spec = SPECS[name]
        assert spec_for_config({"_class_name": spec.transformer_class, **spec.transformer_config}) is spec
    # 14B-wide (40 heads x 128 = 5120) but 2 layers: ~0.7B parameters (2 x (8 x 5120^2 + 2 x 5120 x 13824)),
    # nearer 1.3B than 14B: the 1.3B preset; a width threshold (>= 4096) said "wan2.1-14b"
    wide = spec_for_config(wan(**{**SPECS["wan2.1-14b"].transformer_config, "num_layers": 2}), name="wide")
    assert (wide.name, wide.preset, wide.notes["size"]) == ("wide", "wan2.1-1.3b", "custom")
    # 1.3B-wide (1536) but 300 layers: ~14B parameters: the 14B preset (FSDP) although narrow
    deep = spec_for_config(wan(**{**SPECS["wan2.1-1.3b"].transformer_config, "num_layers": 300}))
    assert (deep.name, deep.preset) == ("wan-custom", "wan2.1-14b")
    assert deep.sample_steps == 50 and deep.solver == "unipc"    # the family's sampler
    assert spec_for_config({"_class_name": "FluxTransformer2DModel"}) is None


def test_missing_model_index_is_explained(wan_dir, tmp_path):
    from rcm_steps.teacher import TeacherDirectoryError, check_teacher_name, load_teacher

    no_index = _copy(wan_dir, tmp_path, "no-index")
    (no_index / "model_index.json").unlink()
    for check in (lambda: check_teacher_name(str(no_index)), lambda: load_teacher(str(no_index), options=OPTS)):
        with pytest.raises(TeacherDirectoryError, match=rf"teacher directory {no_index} has no model_index.json.*"
                                                        r"copy model_index.json from the same Hugging Face"):
            check()
    with pytest.raises(TeacherDirectoryError, match=r"has no model_index.json.*looks like a component folder "
                                                    r"\(WanTransformer3DModel\): pass the checkpoint's top directory"):
        check_teacher_name(str(wan_dir / "transformer"))
    with pytest.raises(TeacherDirectoryError, match=rf"teacher directory {tmp_path / 'nope'} does not exist"):
        check_teacher_name(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown teacher 'wan2.2'; known teachers: .*embedded"):
        check_teacher_name("wan2.2")
    check_teacher_name(str(wan_dir))
    check_teacher_name("embedded")


def test_flow_names_the_missing_model_index(wan_dir, tmp_path):
    no_index = _copy(wan_dir, tmp_path, "no-index")
    (no_index / "model_index.json").unlink()
    run, out, err = run_flow(tmp_path, teacher=str(no_index), **OPTS)
    assert run is not None and not run.successful and {s.id for s in run} == {"start"}
    assert f"teacher directory {no_index} has no model_index.json" in err


def test_small_default_size_on_the_cpu_with_a_notice(wan_dir, cosmos_dir, capsys):
    from rcm_steps.teacher import describe_teacher, teacher_options

    # Wan2.1's VAE: 4x in time, 8x in space; patch 1x2x2 -> 2 latent frames, 8 x 8 latents (4 x 4 patches)
    assert small_size({"temperal_downsample": [False, True, True]}, {"patch_size": [1, 2, 2]}) == (5, 64, 64)
    assert small_size({"temperal_downsample": [False, True, True]}, {"patch_size": [1, 2, 2]}, video=False) == \
        (1, 64, 64)
    # the tiny VAE: 2x in time and space -> 3 frames of 16 x 16
    opts = teacher_options(str(wan_dir), device="cpu")
    assert opts == {"frames": 3, "height": 16, "width": 16}
    note = capsys.readouterr().out
    assert "notice: teacher tiny-wan: no --frames/--height/--width given and no GPU here: using the small CPU " \
           "size 3 x 16 x 16" in note and "teacher's default 81 x 480 x 832" in note
    assert describe_teacher(str(wan_dir), opts)["latent_shape"] == [4, 2, 8, 8]
    assert teacher_options(str(wan_dir), frames=5, device="cpu") == {"frames": 5, "height": 16, "width": 16}
    assert "no --height/--width given" in capsys.readouterr().out
    assert teacher_options(str(cosmos_dir), device="cpu") == {"frames": 1, "height": 16, "width": 16}
    assert "teacher's default 1 x 768 x 1360" in capsys.readouterr().out
    assert teacher_options(str(wan_dir)) == {}                   # device unknown (e.g. Kubernetes): the teacher's
    assert teacher_options(str(wan_dir), 5, 8, 8, device="cpu") == {"frames": 5, "height": 8, "width": 8}
    assert "notice" not in capsys.readouterr().out
    assert teacher_options("embedded", device="cpu") == {}
