"""Prompt limits (characters; tokens of the real teacher's own tokenizer), truncation by default, and gate
failures that say why prompts were removed, with the count per reason, in the error itself."""
from __future__ import annotations

import pytest
import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import run_flow
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import tiny_tokenizer
from rcm_steps.curate import (CurateConfig, DataValidationError, TokenLimiter, curate_prompts, prompt_limits,
                              validate_prompts)

WORD40 = " ".join(["word"] * 40)                                  # 199 characters


def test_character_limit_truncates_at_a_word_by_default_or_drops():
    long = "  " + "word " * 60                                     # 60 words, 299 characters once normalised
    res = curate_prompts([long, "a 1 drifting up"], CurateConfig(min_prompts=1, eval_fraction=0.0))
    assert res.train == [WORD40, "a 1 drifting up"]               # cut at the last space before 200
    assert res.stats["truncated"] == 1 and res.stats["too_long"] == 0 and res.stats["kept"] == 2
    res = curate_prompts([long, "a 1 drifting up"], CurateConfig(min_prompts=1, eval_fraction=0.0,
                                                                 long_prompts="drop"))
    assert res.train == ["a 1 drifting up"] and res.stats["too_long"] == 1 and res.stats["truncated"] == 0
    res = curate_prompts([long], CurateConfig(min_prompts=1, eval_fraction=0.0, max_chars=0))   # no limit
    assert res.train == [" ".join(["word"] * 60)]
    res = curate_prompts(["x" * 250], CurateConfig(min_prompts=1, eval_fraction=0.0))   # no space: hard cut
    assert res.train == ["x" * 200]
    with pytest.raises(ValueError, match="long_prompts='cut'; known: truncate, drop"):
        CurateConfig(long_prompts="cut")
    with pytest.raises(ValueError, match="max_chars must be a whole number >= 0"):
        CurateConfig(max_chars=-5)


def test_token_limit_with_the_teachers_tokenizer():
    tok = TokenLimiter(tiny_tokenizer())                          # words and punctuation are tokens, plus </s>
    assert tok.count("a red cat, runs") == 6
    cfg = CurateConfig(min_prompts=1, eval_fraction=0.0, max_chars=None, max_tokens=8)
    raw = ["a red cat, runs on the beach big small dog",           # 11 tokens + </s>
           "a red cat, runs on the sky",                           # differs only past the limit: a duplicate
           "the big dog runs"]                                     # 5 tokens: untouched
    res = curate_prompts(raw, cfg, tokenizer=tok)
    assert res.train == ["a red cat, runs on the", "the big dog runs"]   # 7 tokens + </s> = 8
    assert (res.stats["truncated"], res.stats["duplicate"], res.stats["kept"]) == (1, 1, 2)
    res = curate_prompts(raw, CurateConfig(min_prompts=1, eval_fraction=0.0, max_chars=None, max_tokens=8,
                                           long_prompts="drop"), tokenizer=tok)
    assert res.train == ["the big dog runs"] and res.stats["too_many_tokens"] == 2
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        curate_prompts(raw, cfg)


def test_real_teacher_limit_is_the_text_encoders(wan_dir):
    from rcm_steps.teacher import describe_teacher

    info = describe_teacher(str(wan_dir), dict(frames=5, height=8, width=8, text_len=8))
    limits, tok = prompt_limits(info)
    assert limits == {"long_prompts": "truncate", "max_chars": None, "max_tokens": 8}
    long = "a red cat runs on the beach " * 20                     # 140 tokens, 560 characters: kept, cut
    res = curate_prompts([long, "a dog"], CurateConfig(min_prompts=1, eval_fraction=0.0, **limits), tokenizer=tok)
    assert res.train == ["a red cat runs on the beach", "a dog"] and res.stats["truncated"] == 1
    assert prompt_limits(info, max_prompt_chars=20)[0]["max_chars"] == 20
    assert prompt_limits({"name": "embedded"}) == ({"long_prompts": "truncate", "max_chars": 200}, None)
    with pytest.raises(ValueError, match="--long_prompts 'clip'; known: truncate, drop"):
        prompt_limits(info, long_prompts="clip")


def test_gate_failure_names_the_reason_and_count():
    cfg = CurateConfig(min_prompts=4, long_prompts="drop")
    raw = ["a 1 drifting up"] * 5 + ["x" * 300, "hi", ""]
    res = curate_prompts(raw, cfg)
    with pytest.raises(DataValidationError) as e:
        validate_prompts(res.train, res.eval, cfg, stats=res.stats)
    msg = str(e.value)
    why = ("kept 1 of 8 raw prompts; removed: 1 empty, 1 too short (under 3 characters), "
           "1 too long (over 200 characters), 4 duplicate")
    row_line = next(line for line in msg.splitlines() if "expect_table_row_count_to_be_between" in line)
    assert "observed 1" in row_line and why in row_line, msg
    res = curate_prompts(["same prompt"] * 9, CurateConfig(min_prompts=4))
    with pytest.raises(DataValidationError, match=r"kept 1 of 9 raw prompts; removed: 8 duplicate"):
        validate_prompts(res.train, res.eval, CurateConfig(min_prompts=4), stats=res.stats)


def test_flow_gate_error_says_all_prompts_were_duplicates(tmp_path):
    p = tmp_path / "dups.txt"
    p.write_text("\n".join(["a 3 drifting up"] * 6 + ["A 3  drifting UP"] * 3))
    run, out, err = run_flow(tmp_path, prompts=str(p))
    assert run is not None and not run.successful
    assert "cache_teacher" not in {s.id for s in run}
    assert "prompt gate failed" in err and "kept 1 of 9 raw prompts; removed: 8 duplicate" in err
