"""bench/node_run.py's plumbing on its smallest case: part ``hsdp`` with two "nodes" of one gloo rank each
(two torchrun gangs, --nnodes 2, node 0's store on 127.0.0.1, as the flow's --nodes 2), HSDP over a
random-weight tiny Wan checkpoint in diffusers layout and a synthetic cache, against the single-node run
of the same configuration on 2 ranks: same per-step losses (from the entrypoint's MLflow run) and the
same final EMA weights."""
import json
import os
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("psutil")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_node_run_hsdp_two_nodes_equal_one_node(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import node_run
    finally:
        sys.path.pop(0)
    out = tmp_path / "node_run.json"
    assert node_run.main(["--device", "cpu", "--tiny", "--parts", "hsdp", "--nproc", "2", "--kill-steps", "3",
                          "--K", "2", "--ckpt-every", "3", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    h = res["hsdp"]
    assert h["world_size"] == 2 and h["nodes"] == 2 and h["config"]["fsdp_shard_size"] == 1
    cmp = h["vs_single_node"]
    assert cmp["steps_compared"] == [1, 2, 3] and not cmp["missing_steps"]
    assert cmp["max_rel_loss_diff"] < 1e-4, cmp
    assert cmp["ema_max_abs_diff"] <= 1e-5 * max(1.0, cmp["ema_max_abs"]), cmp
    assert res["meta"]["device"] == "cpu" and res["meta"]["tiny"] is True
    assert (tmp_path / "work" / "out-hsdp" / "ckpt" / "step-0000003.dcp").is_dir()   # HSDP wrote a sharded checkpoint
