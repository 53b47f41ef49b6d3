"""The Metaflow DAG with ``--teacher <tiny Wan2.1 checkpoint in diffusers layout>`` (issue 4), on the CPU.

The checkpoint is written by the tests (``real_fixtures``); nothing is downloaded. Also: bad
checkpoints stop the flow at ``start`` naming the culprit, the weight-free checkpoint description
used by ``start`` agrees with the loaded teacher, and the GPU memory check fails early.
"""
import json
import shutil
import time

import pytest
import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import run_flow
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import SMALL

TINY = dict(frames=5, height=8, width=8, text_len=8)          # latents (4, 3, 4, 4) with the tiny VAE
TINY22 = dict(frames=5, height=16, width=16, text_len=8)      # latents (6, 3, 4, 4) with the tiny Wan2.2 VAE (4x)

# the same DAG on a Wan2.1 and a Wan2.2 TI2V checkpoint: (fixture, options, name, preset, latent shape)
CASES = {"wan2.1": ("wan_dir", TINY, "tiny-wan", "wan2.1-1.3b", [4, 3, 4, 4]),
         "wan2.2-ti2v": ("wan22_dir", TINY22, "tiny-wan22-ti2v", "wan2.2-ti2v-5b", [6, 3, 4, 4])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flow_end_to_end_with_tiny_wan_dir(case, request, tmp_path):
    import mlflow
    import pandas as pd
    import torch

    from rcm_steps import teacher as T
    from rcm_steps.cache import load_cache

    fixture, TINY, name, preset, shape = CASES[case]
    wan_dir = request.getfixturevalue(fixture)
    t0 = time.perf_counter()
    run, out, err = run_flow(tmp_path, teacher=str(wan_dir), **TINY)
    elapsed = time.perf_counter() - t0
    assert run is not None and run.successful, err[-4000:]
    print(f"{name} flow wall time: {elapsed:.1f}s")
    d = run.data
    info = d.teacher_info
    assert info["name"] == name and info["preset"] == preset and info["real"] and info["solver"] == "unipc"
    assert info["latent_shape"] == shape and d.teacher_options == TINY
    assert d.memory_estimate is None                             # CPU run: the GPU estimate is skipped
    assert d.distill_result["steps"] == 2 and d.distill_result["teacher"] == name

    # the cache holds the real text encoder's embeddings, its negative-prompt embedding, and latents
    # synthesised by the teacher's own sampler (UniPC, CFG) from the shard's seeded noise
    te = T.load_teacher(str(wan_dir), options=TINY)
    data = load_cache(d.cache_url)
    assert data.manifest["spec"]["solver"] == "unipc" and data.manifest["spec"]["text_len"] == 8
    assert data.latents.shape == (4, *shape) and data.cond.shape == (4, 8, 16)
    torch.testing.assert_close(data.uncond, T.negative_embedding(te))
    torch.testing.assert_close(data.cond, T.encode(te, [data.prompts[i] for i in data.prompt_idx.tolist()]))
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = T.sample_teacher_latents(te, data.cond[:2], data.uncond, noise, steps=2)
    torch.testing.assert_close(data.latents[:2], want, rtol=1e-4, atol=1e-4)

    # evaluation relative to the teacher (no digit classifier), media decoded by the teacher's VAE
    m = d.eval_metrics
    assert m["teacher/nfe"] == 4 and m["student_4/nfe"] == 4
    for k in ("student_1/fd_teacher", "student_4/fd_teacher_latent", "student_2/latent_rmse_teacher",
              "student_4/diversity_rel", "teacher/sec_per_sample", "student_1/speedup"):
        assert k in m and m[k] == m[k], k                            # present and not NaN
    assert "teacher/digit_acc" not in m and "student_4/fd_data" not in m
    assert d.sample_grid_png[:4] == b"\x89PNG" and d.sample_gif[:3] == b"GIF"
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(d.sample_grid_png)).mode == "RGB"
    assert (d.sample_mp4 is not None and d.sample_mp4[4:8] == b"ftyp") or "MP4 not written" in d.sample_mp4_note

    # registered in MLflow (sqlite), with eval artefacts; the model generates through the teacher's VAE
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert d.model_name == f"rcm-student-{name}-smoke" and "candidate" in d.model_aliases
    mv = client.get_model_version(d.model_name, d.model_version)
    assert mv.tags["teacher"] == str(wan_dir) and mv.tags["data_hash"] == d.data_hash
    mrun = client.get_run(d.mlflow_run_id)
    assert mrun.info.status == "FINISHED" and "eval/student_4/fd_teacher" in mrun.data.metrics
    arts = {a.path for a in client.list_artifacts(d.mlflow_run_id, "eval")}
    assert {"eval/samples_grid.png", "eval/samples.gif"} <= arts
    model = mlflow.pyfunc.load_model(f"models:/{d.model_name}/{d.model_version}")
    clips = model.predict(pd.DataFrame({"prompt": ["a red cat runs"], "seed": [0]}))
    assert clips.shape == (1, 3, 5, TINY["height"], TINY["width"]) and 0 <= clips.min() and clips.max() <= 1


@pytest.mark.parametrize("case", ["wan2.1-ffn", "wan2.2-zdim"])
def test_flow_rejects_bad_checkpoint_at_start(case, request, tmp_path):
    src = request.getfixturevalue("wan_dir" if case == "wan2.1-ffn" else "wan22_dir")
    bad = tmp_path / "bad-wan"
    shutil.copytree(src, bad)
    if case == "wan2.1-ffn":
        cfg = json.loads((bad / "transformer" / "config.json").read_text())
        cfg["ffn_dim"] = 48                                       # config no longer matches the weights
        (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
        opts = TINY
    else:                                                         # a Wan2.2 VAE of another latent width
        cfg = json.loads((bad / "vae" / "config.json").read_text())
        cfg.update(z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        (bad / "vae" / "config.json").write_text(json.dumps(cfg))
        opts = TINY22
    run, out, err = run_flow(tmp_path, teacher=str(bad), **opts)
    assert run is not None and not run.successful
    assert {s.id for s in run} == {"start"}
    if case == "wan2.1-ffn":
        assert f"{bad / 'transformer'}: weights do not match transformer/config.json" in err
        assert "checkpoint (32, 32) vs config (48, 32)" in err
    else:
        assert (f"{bad / 'vae' / 'config.json'}: z_dim 4 does not match {bad / 'transformer' / 'config.json'} "
                "in_channels 6") in err


def test_describe_teacher_checks_without_loading_and_matches_the_loaded_teacher(wan_dir, tmp_path):
    from rcm_core.real import RealTeacherError
    from rcm_steps.teacher import describe_teacher, load_teacher, teacher_info

    opts = dict(SMALL, dtype="float32")
    d = describe_teacher(str(wan_dir), opts)
    loaded = teacher_info(load_teacher(str(wan_dir), options=opts))
    for k in ("name", "version", "latent_shape", "steps", "shift", "guidance", "solver", "text_len"):
        assert d[k] == loaded[k], k
    assert d["transformer_config"]["_class_name"] == "WanTransformer3DModel" and d["preset"] == "wan2.1-1.3b"
    with pytest.raises(ValueError, match=r"frames 6 is not 2k\+1.*nearest valid 5"):
        describe_teacher(str(wan_dir), dict(SMALL, frames=6))
    bad = tmp_path / "bad"
    shutil.copytree(wan_dir, bad)
    (bad / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(RealTeacherError, match=r"missing weights in .*text_encoder: expected model"):
        describe_teacher(str(bad), SMALL)
    shutil.copytree(wan_dir, bad, dirs_exist_ok=True)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(RealTeacherError, match=r"transformer.config\.json: _class_name 'FluxTransformer2DModel' is "
                                               r"not a supported teacher architecture"):
        describe_teacher(str(bad), SMALL)


def test_teacher_options_only_for_real_teachers(wan_dir):
    from rcm_steps.teacher import load_teacher, teacher_label, teacher_options

    assert teacher_options("embedded") == {} and teacher_options("embedded", dtype="auto") == {}
    with pytest.raises(ValueError, match=r"\['frames', 'height'\] only apply to real teachers"):
        teacher_options("embedded", frames=5, height=8)
    assert teacher_options(str(wan_dir), 5, 8, 8, 0, "float32") == dict(frames=5, height=8, width=8, dtype="float32")
    with pytest.raises(ValueError, match="teacher dtype 'int8'"):
        teacher_options(str(wan_dir), dtype="int8")
    with pytest.raises(ValueError, match="takes no options"):
        load_teacher("embedded", options={"frames": 5})
    assert teacher_label(str(wan_dir) + "/") == "tiny-wan" and teacher_label("embedded") == "embedded"


def test_memory_check_fails_early_with_settings_that_fit(wan_dir):
    from rcm_core.real import SPECS
    from rcm_steps.teacher import check_memory, describe_teacher

    tiny = check_memory(describe_teacher(str(wan_dir), SMALL), batch=2, gpus=1, gpu_memory_gib=80)
    assert tiny["fits"] and tiny["params"] < 1e6
    big = {"name": "wan2.1-14b", "frames": 81, "height": 480, "width": 832,
           "transformer_config": {**SPECS["wan2.1-14b"].transformer_config, "_class_name": "WanTransformer3DModel"}}
    with pytest.raises(MemoryError, match=r"wan2.1-14b: estimated .* GiB per GPU .* gpus=8, context_parallel=1.*"
                                          r"full replica.*fsdp=True.*: gpus=\d+, context_parallel=\d+"):
        check_memory(big, batch=1, gpus=8, gpu_memory_gib=80)


def test_media_from_rgb_clips():
    import io

    import torch
    from PIL import Image

    from rcm_steps.evaluate import clip_grid_png, clips_gif, clips_mp4

    g = torch.Generator().manual_seed(0)
    clips = {m: torch.rand(2, 2, 3, 5, 8, 8, generator=g) for m in ("teacher", "student_1")}
    png = Image.open(io.BytesIO(clip_grid_png(clips, ["a red cat", "a dog"])))
    assert png.mode == "RGB" and png.size[1] > 2 * 64
    gif = Image.open(io.BytesIO(clips_gif(clips["teacher"][:, 0], scale=None)))
    assert gif.n_frames == 5 and gif.size[1] >= 96
    mp4, note = clips_mp4(clips["teacher"][:, 0])
    # with ffmpeg (imageio-ffmpeg or on PATH) an MP4; without, a clear reason and no bytes
    assert (mp4 is not None and mp4[4:8] == b"ftyp" and note == "") or (mp4 is None and "MP4 not written" in note)
