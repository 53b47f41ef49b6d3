"""Training diagnostics (rcm_steps.diagnostics): the collector behind distill's diagnostics.json, the PNG
plot and the Markdown summary of the evaluate card, and the MLflow artifacts."""
import io
import json
import struct
from types import SimpleNamespace

from rcm_steps import diagnostics as D
from rcm_steps.storage import Storage

# a staged run by hand: stage 0 (dcm) steps 1-4, stage 1 (rcm) steps 5-12; in rcm odd steps are critic steps
METRICS = [
    (1, {"loss": 1.0, "stage": 0, "stage_method": "dcm", "nan_masked_frac": 0.0}),
    (2, {"loss": 0.9, "stage": 0, "stage_method": "dcm", "nan_masked_frac": 0.25}),
    (3, {"loss": 0.8, "stage": 0, "stage_method": "dcm", "nan_masked_frac": 0.0}),
    (4, {"loss": 0.7, "stage": 0, "stage_method": "dcm"}),
    (5, {"loss": 0.6, "stage": 1, "stage_method": "rcm", "critic_loss_rel": 1.0, "critic_behind": 0.0}),
    (6, {"loss": 0.5, "stage": 1, "stage_method": "rcm", "dmd_scm_ratio_out": 2.0, "dmd_scm_ratio_w": 4.0,
         "nan_masked_frac": 0.5, "dmd_nan_masked_frac": 0.125}),
    (7, {"loss": 0.4, "stage": 1, "stage_method": "rcm", "critic_loss_rel": 3.5, "critic_behind": 1.0}),
    (8, {"loss": 0.3, "stage": 1, "stage_method": "rcm", "dmd_scm_ratio_out": 0.5, "dmd_scm_ratio_w": float("inf")}),
    (9, {"loss": 0.2, "stage": 1, "stage_method": "rcm", "critic_loss_rel": 4.0, "critic_behind": 1.0}),
    (10, {"loss": 0.1, "stage": 1, "stage_method": "rcm", "dmd_scm_ratio_out": 4.0, "dmd_scm_ratio_w": 1.0}),
    (11, {"loss": 0.1, "stage": 1, "stage_method": "rcm", "critic_loss_rel": 2.0, "critic_behind": 0.0}),
    (13, {"loss": 0.1, "stage": 1, "stage_method": "rcm", "critic_loss_rel": 3.25, "critic_behind": True}),
]
PLANNED = [("dcm", 4), {"method": "rcm", "updates": 4}]


def _png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_collector_writes_diagnostics_json(tmp_path):
    c = D.DiagnosticsCollector(PLANNED, critic_lag_warn=3.0)
    changes = {step: c.add(step, m) for step, m in METRICS}
    assert {s: ch for s, ch in changes.items() if ch} == {1: (0, "dcm"), 5: (1, "rcm")}
    url = c.save(Storage(str(tmp_path / "distill")))
    assert url == str(tmp_path / "distill" / "diagnostics.json")
    got = json.load(open(tmp_path / "distill" / "diagnostics.json"))
    assert got["series"] == {
        "dmd_scm_ratio_out": {"6": 2.0, "8": 0.5, "10": 4.0},
        "dmd_scm_ratio_w": {"6": 4.0, "8": None, "10": 1.0},           # inf: not JSON, kept as null
        "critic_loss_rel": {"5": 1.0, "7": 3.5, "9": 4.0, "11": 2.0, "13": 3.25},
        "critic_behind": {"5": 0.0, "7": 1.0, "9": 1.0, "11": 0.0, "13": 1.0},
        "nan_masked_frac": {"1": 0.0, "2": 0.25, "3": 0.0, "6": 0.5},
        "dmd_nan_masked_frac": {"6": 0.125},
    }
    assert got["stages"] == [{"stage": 0, "method": "dcm", "start_step": 1},
                             {"stage": 1, "method": "rcm", "start_step": 5}]
    assert got["planned_stages"] == [["dcm", 4], ["rcm", 4]] and got["critic_lag_warn"] == 3.0
    assert got["warnings"] == [{"step": 7, "kind": "critic_behind", "critic_loss_rel": 3.5},
                               {"step": 9, "kind": "critic_behind", "critic_loss_rel": 4.0},
                               {"step": 13, "kind": "critic_behind", "critic_loss_rel": 3.25}]
    assert D.load(url) == got and D.collect(METRICS, planned_stages=PLANNED, critic_lag_warn=3.0) == got


def test_collector_without_diagnostics_and_on_resume():
    # a trainer that reports none of them: empty series, no phases, no warnings
    empty = D.collect([(1, {"loss": 1.0, "nan_masked": 0}), (2, {"loss": 0.5})])
    assert empty["series"] == {k: {} for k in D.SERIES} and empty["stages"] == [] and empty["warnings"] == []
    # the method of a phase without stage_method comes from the plan (a Stage-like object here)
    c = D.DiagnosticsCollector([SimpleNamespace(method="scm", updates=2), SimpleNamespace(method="rcm", updates=3)])
    assert c.add(1, {"stage": 1}) == (1, "rcm") and c.planned == [["scm", 2], ["rcm", 3]]
    # a resumed run (from step 8) keeps the earlier attempt's steps up to 8, then continues
    previous = D.collect(METRICS)
    r = D.DiagnosticsCollector(previous=json.loads(json.dumps(previous)), upto=8)
    assert r.add(9, {"stage": 1, "stage_method": "rcm", "critic_loss_rel": 1.5}) is None    # same phase
    assert r.add(10, {"stage": 2, "stage_method": "dmd"}) == (2, "dmd")
    d = r.to_dict()
    assert d["series"]["critic_loss_rel"] == {"5": 1.0, "7": 3.5, "9": 1.5}
    assert [w["step"] for w in d["warnings"]] == [7]
    assert [s["start_step"] for s in d["stages"]] == [1, 5, 10]


def test_plot_png_of_a_hand_written_series():
    from PIL import Image

    diag = D.collect(METRICS, planned_stages=PLANNED, critic_lag_warn=3.0)
    png = D.plot_png(diag, width=800, panel_h=200)
    assert _png_size(png) == (800, 600) and len(png) > 5000
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours and (214, 39, 40) in colours   # 2 series, warnings
    # no data at all: still a valid PNG (three "no data" panels), without any series colour
    empty = D.plot_png({})
    assert _png_size(empty) == (960, 690)
    colours = {c for _, c in Image.open(io.BytesIO(empty)).convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) not in colours and (214, 39, 40) not in colours
    # one step, non-finite and zero values (log axis): still a PNG
    one = D.collect([(3, {"dmd_scm_ratio_out": 0.0, "dmd_scm_ratio_w": float("nan"), "critic_loss_rel": 1.0})])
    assert _png_size(D.plot_png(one)) == (960, 690)


def test_markdown_flags_the_warning_steps():
    md = D.markdown(D.collect(METRICS, planned_stages=PLANNED, critic_lag_warn=3.0))
    # runs of warnings: 7 and 9 (no critic step without it between them), then 13 (11 was fine)
    assert "at steps 7-9, 13 (3 steps)" in md and "critic_lag_warn = 3" in md
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    # latest (step), median, min, max, steps - from METRICS
    assert rows["dmd_scm_ratio_out"] == ["4 (step 10)", "2", "0.5", "4", "3"]
    assert rows["dmd_scm_ratio_w"] == ["1 (step 10)", "2.5", "1", "4", "3"]       # inf left out of the stats
    assert rows["critic_loss_rel"] == ["3.25 (step 13)", "3.25", "1", "4", "5"]
    assert rows["nan_masked_frac"] == ["0.5 (step 6)", "0.125", "0", "0.5", "4"]
    assert "stage 0 `dcm` from step 1; stage 1 `rcm` from step 5" in md
    quiet = D.markdown(D.collect([(1, {"critic_loss_rel": 1.0, "critic_behind": 0.0})]))
    assert "No warnings." in quiet and "Warning" not in quiet
    assert "No data" in D.markdown({}) and "No data" in D.markdown(D.collect([(1, {"loss": 1.0})]))
    assert "unreadable" in D.markdown({"error": "x: broken"})


def test_load_missing_or_broken_and_mlflow_artifacts(tmp_path):
    import mlflow

    assert D.load(str(tmp_path / "nowhere" / "diagnostics.json")) == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert "error" in D.load(str(tmp_path / "bad.json"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("d", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    diag = D.collect(METRICS)
    png = D.plot_png(diag)
    D.log_to_mlflow(client, run_id, diag, png)
    assert sorted(f.path for f in client.list_artifacts(run_id, "train")) == ["train/diagnostics.json",
                                                                              "train/diagnostics.png"]
    local = client.download_artifacts(run_id, "train", str(tmp_path / "dl"))
    assert open(f"{local}/diagnostics.png", "rb").read() == png
    assert json.load(open(f"{local}/diagnostics.json")) == diag
