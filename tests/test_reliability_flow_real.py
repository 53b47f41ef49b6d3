"""The DAG on a tiny Wan2.1 directory as a user would first run it: no size given on the CPU, long prompts,
then the teacher directory moves - the registered model still loads and samples.

Checks in one run: the small CPU size with its notice (part 8), names from the directory in logs, cache
paths and tags (8), token-limit truncation in curate (7), the self-contained model version (3) and the
real-teacher champion policy with its eval-settings tag (2).
"""
import shutil

import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import run_flow
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import WORDS

LONG = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(6)]     # 14 words each: 15 tokens with </s>


def test_real_teacher_flow_small_cpu_size_truncation_and_a_model_that_survives_a_move(wan_dir, tmp_path,
                                                                                      monkeypatch):
    import mlflow
    import pandas as pd

    teacher = tmp_path / "models" / "my-wan"
    shutil.copytree(wan_dir, teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LONG))
    run, out, err = run_flow(tmp_path, teacher=str(teacher), text_len=8, prompts=str(prompts))
    assert run is not None and run.successful, err[-4000:]
    d = run.data
    # no --frames/--height/--width on the CPU: the small size (tiny VAE 2x: 3 frames, 16 x 16), with a notice
    assert d.teacher_options == {"text_len": 8, "frames": 3, "height": 16, "width": 16}
    assert "notice: teacher my-wan: no --frames/--height/--width given and no GPU here: using the small CPU size " \
           "3 x 16 x 16" in out + err
    info = d.teacher_info
    assert (info["name"], info["label"], info["size"], info["preset"]) == ("my-wan", "my-wan", "custom", "wan2.1-1.3b")
    assert info["latent_shape"] == [4, 2, 8, 8] and "/cache/my-wan-" in d.cache_url
    # every prompt is over the text encoder's 8 tokens: truncated to 7 words (+ </s>), none dropped
    assert d.curate_stats["truncated"] == 6 and d.curate_stats["kept"] == 6
    assert all(len(p.split()) == 7 for p in d.train_prompts + d.eval_prompts)
    assert sorted(d.train_prompts + d.eval_prompts) == sorted(" ".join(p.split()[:7]) for p in LONG)
    # issue 24: the truncation is said once (curate's summary), without the tokenizer's misleading warning, and
    # the loader's deliberate casts without diffusers' "kept in float32" (it came three times per attempt)
    said = [ln for ln in (out + err).splitlines() if "truncated to the limit" in ln]
    assert len(said) == 1 and "6 truncated to the limit (8 tokens)" in said[0], said
    for noise in ("Token indices sequence length is longer than", "should be kept in float32", "color_warning("):
        assert noise not in out + err, noise

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    mv = client.get_model_version(d.model_name, d.model_version)
    assert d.model_name == "rcm-student-my-wan-smoke" and d.model_aliases == ["candidate", "champion"]
    assert mv.tags["teacher_components"].startswith("reference: ") and mv.tags["teacher"] == str(teacher)
    assert mv.tags["champion_policy"].startswith("teacher-relative: lower student_4/fd_teacher")
    assert len(mv.tags["eval_settings"]) == 16 and '"teacher_steps": 2' in mv.tags["eval_settings.json"]

    shutil.move(str(teacher), str(tmp_path / "archive-my-wan"))          # the training path is gone
    monkeypatch.setenv("RCM_COMPONENT_CACHE", str(tmp_path / "fresh-cache"))
    model = mlflow.pyfunc.load_model(f"models:/{d.model_name}@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a red cat runs"], "seed": [0]}))
    assert clips.shape == (1, 3, 3, 16, 16) and 0 <= clips.min() and clips.max() <= 1
