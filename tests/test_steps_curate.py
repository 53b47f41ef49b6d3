import os

import pandas as pd
import pytest

from pipeline_fixtures import *  # noqa: F401,F403
from rcm_steps.curate import (CurateConfig, DataValidationError, PromptSourceError, curate,
                              curate_prompts, load_prompts, validate_prompts)

PROMPTS = [f"a {d} drifting {w}" for d in range(5) for w in ("up", "down", "left")]


def test_normalise_dedupe_split_deterministic(tmp_path):
    raw = ["  a 1   drifting up ", "A 1 drifting UP", "", None, "x", "a 2 drifting down"] + ["z" * 300]
    res = curate_prompts(raw, CurateConfig(min_prompts=1, eval_fraction=0.5, long_prompts="drop"))
    assert res.stats == {"raw": 7, "empty": 2, "duplicate": 1, "too_short": 1, "too_long": 1,
                         "too_many_tokens": 0, "truncated": 0, "kept": 2, "train": 1, "eval": 1}
    assert sorted(res.train + res.eval) == ["a 1 drifting up", "a 2 drifting down"]
    a = curate_prompts(PROMPTS, CurateConfig())
    b = curate_prompts(list(reversed(PROMPTS)), CurateConfig())
    assert set(a.eval) == set(b.eval) and len(a.eval) == 3 and not set(a.eval) & set(a.train)


def test_sources_text_csv_parquet_s3(tmp_path, s3_bucket):
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS))
    pd.DataFrame({"id": range(len(PROMPTS)), "text": PROMPTS}).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"prompt": PROMPTS}).to_parquet(tmp_path / "p.parquet")
    assert load_prompts(str(txt)) == PROMPTS
    assert load_prompts(str(tmp_path / "p.csv")) == PROMPTS
    assert load_prompts(str(tmp_path / "p.parquet")) == PROMPTS
    url, opts = s3_bucket
    pd.DataFrame({"prompt": PROMPTS}).to_parquet(f"{url}/p.parquet", storage_options=opts)
    assert load_prompts(f"{url}/p.parquet") == PROMPTS
    with pytest.raises(PromptSourceError, match="nope.txt.*does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PromptSourceError, match="empty.txt.*is empty"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(PromptSourceError, match="no column 'nope'"):
        load_prompts(str(tmp_path / "p.csv"), column="nope")


def test_gate_passes_and_writes_data_docs(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS + PROMPTS[:3] + ["", "   "]))
    res = curate(str(txt), CurateConfig(), docs_dir=str(tmp_path / "docs"))
    assert res.report.success and res.stats["duplicate"] == 3 and res.stats["empty"] == 2
    assert os.path.exists(tmp_path / "docs" / "index.html")
    assert (tmp_path / "docs" / res.report.docs_page).exists()


def test_gate_fails_naming_expectations(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_text("a 1 drifting up\n\n a 1 drifting up \nhi\n")
    with pytest.raises(DataValidationError) as ei:
        curate(str(txt), CurateConfig(min_prompts=8), docs_dir=str(tmp_path / "docs"))
    msg = str(ei.value)
    assert "expect_table_row_count_to_be_between" in msg and "expect_column_values_to_be_between" in msg
    assert (tmp_path / "docs" / "index.html").exists()
    # the raw table (uncleaned) fails on null, uniqueness and length bounds
    with pytest.raises(DataValidationError) as ei:
        validate_prompts([None, "dup", "dup", "x" * 500] * 3, ["a 1 drifting up"] * 2, CurateConfig())
    msg = str(ei.value)
    for name in ("expect_column_values_to_not_be_null", "expect_column_values_to_be_unique",
                 "expect_column_value_lengths_to_be_between"):
        assert name in msg
