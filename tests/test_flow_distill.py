"""The Metaflow DAG end to end (smoke profile), the prompt gate, and the Argo compile."""
import json
import os
import re
import subprocess
import sys
import time

# Import torch.export before Metaflow: reading Metaflow artifacts loads metaflow._vendor.typing_extensions,
# which re-patches typing so that torch.export's generics (TypeVar defaults) fail to import later on
# (seen when mlflow.pyfunc.load_model runs after Runner in the same process).
import pytest
import torch.export  # noqa: F401

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FLOW, run_flow


def test_smoke_flow_end_to_end(tmp_path):
    import mlflow
    import pandas as pd

    t0 = time.perf_counter()
    # evaluate also measures a serving variant (FP8 through torch._scaled_mm's CPU emulation)
    run, out, err = run_flow(tmp_path, extra_env={"RCM_FAULT_AT_STEP": "1", "RCM_FP8_EMULATE": "1"},
                             eval_serving="fp8-dynamic")
    elapsed = time.perf_counter() - t0
    assert run is not None and run.successful, err[-3000:]
    print(f"smoke flow wall time: {elapsed:.1f}s")
    assert elapsed < 240
    d = run.data
    assert d.curate_stats["train"] == 4 and d.curate_stats["eval"] == 2
    assert d.data_docs_html and os.path.exists(d.data_docs_page)
    assert d.distill_result["steps"] == 2
    # the first distill attempt was killed after step 1; the retry resumed from its checkpoint
    assert d.distill_attempts == 2 and d.distill_result["resumed_from"] == 1
    for k in ("teacher/digit_acc", "student_1/nfe", "student_4/fd_teacher", "student_2/diversity_rel",
              "teacher/sec_per_sample"):
        assert k in d.eval_metrics
    assert d.sample_grid_png[:4] == b"\x89PNG" and d.sample_gif[:3] == b"GIF"
    assert d.model_aliases == ["candidate", "champion"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    mrun = client.get_run(d.mlflow_run_id)
    assert mrun.info.status == "FINISHED" and mrun.data.tags["metaflow.run_id"] == run.id
    assert "eval/student_4/digit_acc" in mrun.data.metrics
    _check_mlflow_conventions(client, mrun, run)
    # issue 23: the student's FP8 static scales, recorded while evaluate sampled, travel with the version
    assert len(d.fp8_scales) == 40 and client.get_model_version(d.model_name, d.model_version).tags["serving"] \
        == "fp8=off, compile=off; FP8 scales: 40 layers"
    # the card's speed table: evaluate's seconds per sample, the speedup = teacher's / student's, computed here
    card = client.get_model_version(d.model_name, d.model_version).description
    m = d.eval_metrics
    for k in (1, 2, 4):
        speedup = m["teacher/sec_per_sample"] / m[f"student_{k}/sec_per_sample"]
        assert f"| student, {k} step{'s' if k > 1 else ''} | " in card and f"| {speedup:.4g}x |" in card, (k, card)
    # --eval_serving: the variant sampled like each student (same noise), its rows in the card
    assert d.settings["eval_serving"] == ["fp8-dynamic"]
    for k in (1, 2, 4):
        rel = m[f"serve_fp8-dynamic_{k}/rel_l2_student"]
        assert 0 < rel < 0.5 and f"| fp8-dynamic | {k} | " in card, (k, rel, card)
    # training diagnostics: distill's diagnostics.json, in the evaluate card and in MLflow under train/; the
    # distill card's loss curves and samples over training there too
    assert set(d.train_diagnostics["series"]) >= {"dmd_scm_ratio_out", "critic_loss_rel", "nan_masked_frac"}
    assert {f.path for f in client.list_artifacts(d.mlflow_run_id, "train")} == {
        "train/diagnostics.png", "train/diagnostics.json", "train/losses.png", "train/samples_over_training.png"}
    _check_cards(tmp_path, run)
    # issue 24: the run ends with the exact model URI (a smoke run's name); curate, cache_teacher and evaluate
    # print progress lines; no MLflow noise at log_model; the history holds only the killed distill attempt's
    # reopen (register no longer ends the run FINISHED, so `end` has nothing to reopen)
    assert d.model_name == "rcm-student-embedded-smoke"
    assert f"model: models:/{d.model_name}@champion" in out and "python -m rcm_steps.generate --model" in out
    assert "data gate prompts: checking" in out and re.search(r"teacher cache embedded.*: (\d+)/\1 sampler steps", out)
    assert re.search(r"evaluate \(.*\): (\d+)/\1 sampler steps and decodes \(100%\)", out), out[-3000:]
    for noise in ("color_warning(", "CloudPickle", "Add type hints"):
        assert noise not in out + err, noise
    history = mrun.data.tags["rcm.history"]
    assert history.count("reopened at") == 1 and "/distill/" in history and "/end/" not in history, history
    mv = client.get_model_version_by_alias(d.model_name, "champion")
    assert str(mv.version) == str(d.model_version) and mv.tags["metaflow.run_id"] == run.id
    assert mv.tags["data_hash"] == d.data_hash and mv.tags["teacher"] == "embedded" and mv.tags["method"] == "rcm"
    # the version's card (its description): load code, the sample grid artifact; the register step's Metaflow card
    assert "mlflow.pyfunc.load_model(" in mv.description and "artifact `samples_grid.png`" in mv.description
    # (read from the card store the tasks wrote, <cwd>/.metaflow/mf.cards: metaflow.cards.get_cards looks under the
    # datastore root, another folder when METAFLOW_DATASTORE_SYSROOT_LOCAL is set as here)
    import base64
    import glob

    html = "".join(open(f).read() for f in glob.glob(f"{tmp_path}/.metaflow/mf.cards/RCMDistillFlow/runs/{run.id}/"
                                                       "steps/register/tasks/*/cards/*.html"))
    html = "".join(base64.b64decode(b).decode() for b in re.findall(r'__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"',
                                                                     html))    # the card's components (JSON)
    for s in (f"Registered: {d.model_name} v{d.model_version}", f"models:/{d.model_name}@champion",
              f"models:/{d.model_name}/{d.model_version}", "mlflow.pyfunc.load_model(", "rcm_steps.generate --model"):
        assert s in html, s
    model = mlflow.pyfunc.load_model(f"models:/{d.model_name}@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a 3 drifting up", "a 7 drifting left"], "seed": [0, 1]}))
    assert clips.shape == (2, 1, 4, 16, 16) and 0 <= clips.min() and clips.max() <= 1
    from rcm_steps.generate import main as generate

    gif = tmp_path / "x.gif"
    generate(["--model", f"models:/{d.model_name}@champion", "--prompt", "a 3 drifting up", "--out", str(gif)])
    assert gif.read_bytes()[:3] == b"GIF"


def _check_mlflow_conventions(client, mrun, run):
    """Issue 24: a descriptive run name, user and source set, student and critic losses apart (no train/loss
    sawtooth, no train/step), the eval table as an MLflow table, rounded params, every metric in the glossary."""
    import re

    from rcm_steps import glossary

    rid, tags = mrun.info.run_id, mrun.data.tags
    assert mrun.info.run_name == f"rcm-embedded-rcm-smoke-{run.id}"
    assert tags["mlflow.user"] == "tester" and tags["mlflow.source.name"] == "flows/distill_flow.py"
    assert tags["mlflow.source.type"] == "LOCAL"
    metrics = set(mrun.data.metrics)
    assert not {"train/loss", "train/step", "train/loss_fake"} & metrics
    student = [m.step for m in client.get_metric_history(rid, "train/student_loss")]
    critic = [m.step for m in client.get_metric_history(rid, "train/critic_loss")]
    assert sorted(student + critic) == [1, 2] and student        # smoke: both student steps (the warm-up)
    table = client.load_table(mrun.info.experiment_id, "eval/metrics_table.json", run_ids=[rid])
    assert list(table["model"]) == ["teacher", "student_1", "student_2", "student_4", "serve_fp8-dynamic_1",
                                    "serve_fp8-dynamic_2", "serve_fp8-dynamic_4"]
    assert table.loc[table["model"] == "student_4", "digit_acc"].item() == pytest.approx(
        mrun.data.metrics["eval/student_4/digit_acc"], rel=1e-5)
    long_floats = {k: v for k, v in {**mrun.data.params, **tags}.items()
                   if k != "rcm.history" and re.search(r"\d\.\d{7,}", v)}
    assert not long_floats                                       # e.g. distill.rollout_t_max 1.5707963267948966
    assert not [k for k in metrics if glossary.term(k) not in glossary.GLOSSARY]


def _card_data(tmp, run, step):
    """The components of the Metaflow cards of ``step`` (card files of a local run, under ``tmp``), as JSON text
    decoded from each card's HTML."""
    import base64
    import re

    out = []
    for f in tmp.rglob("*.html"):                   # (rglob enters .metaflow, glob's ** does not)
        if f.parent.name != "cards" or f"/runs/{run.id}/steps/{step}/tasks/" not in f.as_posix():
            continue
        blob = re.search(r'window.__MF_DATA__\["[^"]+"\] = "([^"]+)"', f.read_text()).group(1)
        out.append(base64.b64decode(blob).decode())
    assert out, f"no card for {step}"
    return "\n".join(out)


def _check_cards(tmp, run):
    """The distill card (loss curves, samples over training, glossary), the evaluate card's glossary, and the
    Data Docs pages inside the curate and cache cards (``card server`` serves cards, not files: a link to a
    local path or an s3:// URL cannot open there)."""
    import html

    distill = json.loads(_card_data(tmp, run, "distill"))
    text = json.dumps(distill)
    assert text.count('"type": "image"') >= 2 and "samples over training" in text
    assert "student loss (top) and critic loss (bottom)" in text and "`g_norm`" in text
    evaluate = _card_data(tmp, run, "evaluate")
    assert "`dmd_scm_ratio_out`" in evaluate and "`fd_teacher`" in evaluate and "`diversity_rel`" in evaluate
    d = run.data
    page = d.data_docs_html[d.data_docs_page.rsplit("/data_docs/", 1)[1]].decode()
    for step, gate in (("curate", "prompts_suite"), ("cache_teacher", "latents_suite")):
        card = json.loads(_card_data(tmp, run, step))
        md = [c["source"] for c in _walk(card) if c.get("type") == "markdown"]
        frames = [m for m in md if "<iframe" in m and "srcdoc=" in m]
        assert len(frames) == 1 and "\n\n" not in frames[0].split("</details>")[0], step  # one HTML block
        doc = html.unescape(frames[0].split('srcdoc="', 1)[1].split('"', 1)[0])
        assert gate in doc and doc.lstrip().lower().startswith("<!doctype html"), step
        assert not any("](/" in m or "](s3://" in m for m in md), step                  # no dead links
    assert html.unescape(frames[0].split('srcdoc="', 1)[1].split('"', 1)[0]) != page    # the cache's own page


def _walk(node):
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for x in node:
            yield from _walk(x)


def test_flow_stops_at_the_prompt_gate(tmp_path, s3_bucket):
    """Bad prompts from S3 stop the flow at curate; the Data Docs still land on the S3 storage root."""
    import boto3

    url, opts = s3_bucket
    bucket = url[len("s3://"):]
    s3 = boto3.client("s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="bad.txt", Body=b"a 1 drifting up\n\n a 1  drifting up\nhi\n")
    run, out, err = run_flow(tmp_path, prompts=f"{url}/bad.txt", storage_root=f"{url}/root")
    assert run is not None and not run.successful
    steps = {s.id for s in run}
    assert "cache_teacher" not in steps and "distill" not in steps
    assert "expect_table_row_count_to_be_between" in err and "prompt gate failed" in err
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("root/runs/RCMDistillFlow/") and k.endswith("curate/data_docs/index.html") for k in keys)


def test_unknown_teacher_lists_known_ones(tmp_path):
    run, out, err = run_flow(tmp_path, teacher="no-such-teacher")
    assert not run.successful and "known teachers: " in err and "embedded" in err


def test_argo_compile_asks_for_8_gpus_per_node(tmp_path, moto_server):
    import boto3

    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket="mfroot")
    env = dict(os.environ, METAFLOW_USER="tester", METAFLOW_DEFAULT_DATASTORE="s3",
               METAFLOW_DATASTORE_SYSROOT_S3="s3://mfroot/metaflow", METAFLOW_S3_ENDPOINT_URL=moto_server,
               METAFLOW_KUBERNETES_NAMESPACE="default", METAFLOW_KUBERNETES_CONTAINER_IMAGE="rcm:latest",
               METAFLOW_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, FLOW, "--config-value", "execution",
                        json.dumps({"target": "kubernetes", "gpus_per_node": 8}),
                        "argo-workflows", "create", "--only-json"],
                       env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wf = json.loads(r.stdout[r.stdout.index("{"):])
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    manifest = templates["distill"]["resource"]["manifest"]
    assert "JobSet" in manifest
    assert manifest.count("nvidia.com/gpu: '8'") == 2          # control + worker replicas
    others = json.dumps({k: v for k, v in templates.items() if k != "distill"})
    assert "nvidia.com/gpu" not in others
