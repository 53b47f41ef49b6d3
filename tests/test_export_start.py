"""A real teacher whose student cannot be exported for diffusers stops the flow at ``start`` (issue 13),
before any training, naming the teacher and what is missing."""
import json
import shutil

import pytest
import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import run_flow
from real_fixtures import *  # noqa: F401,F403

TINY = dict(frames=5, height=8, width=8, text_len=8)


def _with_pipeline_class(wan_dir, dst, cls):
    shutil.copytree(wan_dir, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["_class_name"] = cls
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_check_export_names_the_teacher_and_the_unknown_pipeline(wan_dir, tmp_path):
    from rcm_core.export import ExportError
    from rcm_steps.register import check_export

    assert check_export(str(wan_dir)) == "WanPipeline"
    bad = _with_pipeline_class(wan_dir, tmp_path / "odd-wan", "MyVideoPipeline")
    with pytest.raises(ExportError, match=r"pipeline class 'MyVideoPipeline' .* is unknown to the exporter"):
        check_export(str(bad))


def test_flow_stops_at_start_when_the_student_could_not_be_exported(wan_dir, tmp_path):
    bad = _with_pipeline_class(wan_dir, tmp_path / "odd-wan", "MyVideoPipeline")
    run, out, err = run_flow(tmp_path, teacher=str(bad), **TINY)
    assert run is not None and not run.successful
    assert {s.id for s in run} == {"start"}                       # nothing trained, nothing registered
    assert "cannot export the student of teacher" in err and "'MyVideoPipeline'" in err
