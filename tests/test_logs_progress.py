"""Quiet logs where the project calls the libraries, and progress lines (issue 24, parts 4 and 5).

Library warnings are counted in the captured output of the project's own functions (and shown to still
appear when the library is called directly: nothing is silenced globally); progress lines are read from
the output of the step functions, as Metaflow logs them (not a terminal: discrete lines).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings

import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FakeTeacher
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import tiny_encoder, tiny_tokenizer, tiny_wan

TOKEN_WARNING = "Token indices sequence length is longer than"
FP32_WARNING = "should be kept in float32"
LONG = "a cat runs on the beach " * 1000                      # 6001 tokens for the tiny tokenizer


@contextlib.contextmanager
def library_log(name):
    """The messages library ``name`` (transformers, diffusers) logs inside the block: its own handlers write
    to the stream it saw at import, which pytest's capture does not see; a handler of ours does."""
    got = []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    try:
        yield got
    finally:
        logging.getLogger(name).removeHandler(handler)


def test_tokenizer_warning_dropped_and_truncation_said_once_by_curate(capfd):
    from rcm_steps.curate import CurateConfig, TokenLimiter, curate_prompts

    tok = tiny_tokenizer(max_len=64)                          # the tester's tokenizer said "(5001 > 64)"
    raw = [LONG, LONG + " dog", "a red dog", "the blue sky", "a big cat video"]
    with library_log("transformers") as logged:
        res = curate_prompts(raw, CurateConfig(max_chars=None, max_tokens=8, min_prompts=2),
                             tokenizer=TokenLimiter(tok))
    out, err = capfd.readouterr()
    assert res.stats["truncated"] == 1 and res.stats["duplicate"] == 1      # the two long ones: one prompt
    assert not [m for m in logged if TOKEN_WARNING in m], logged
    said = [ln for ln in (out + err).splitlines() if "truncated" in ln]
    assert len(said) == 1 and "1 truncated to the limit (8 tokens)" in said[0] and "--long_prompts drop" in said[0]
    with library_log("transformers") as logged:
        tok("a cat " * 100)                                  # the library itself still warns: nothing global
    assert [m for m in logged if TOKEN_WARNING in m]


def test_text_encoder_says_truncation_once_without_the_tokenizer_warning():
    from rcm_core.real.loading import RealTextEncoder

    enc = RealTextEncoder(tiny_tokenizer(max_len=64), tiny_encoder("umt5"), max_length=8)
    with warnings.catch_warnings(record=True) as w, library_log("transformers") as logged:
        warnings.simplefilter("always")
        for _ in range(3):                                   # cache, evaluate, serving: the same encoder
            enc([LONG, "a red dog", "a cat runs on the beach of the big blue sky"])
    ours = [str(x.message) for x in w if "text encoder's limit" in str(x.message)]
    assert len(ours) == 1 and ours[0].startswith("2 prompt(s) longer than the text encoder's limit of 8 tokens: "
                                                 "truncated to 8 tokens")
    assert not [m for m in logged if TOKEN_WARNING in m], logged


def test_deliberate_cast_without_the_float32_warning():
    from rcm_core.real.loading import _from_state

    net = tiny_wan()
    cfg = {"_class_name": "WanTransformer3DModel", **net.config}
    with library_log("diffusers") as logged:
        built = _from_state(type(net), cfg, net.state_dict(), torch.float32)   # how serving rebuilds a student
    assert not [m for m in logged if FP32_WARNING in m], logged
    with library_log("diffusers") as logged:
        built.to(torch.float32)                              # diffusers' own warning is left alone elsewhere
    assert [m for m in logged if FP32_WARNING in m]


# ---- progress -------------------------------------------------------------------------------------------------

def _progress(text: str, desc: str):
    """(done, total) of each progress line of ``desc``."""
    return [(int(a), int(b)) for a, b in re.findall(re.escape(desc) + r"[^\n]*?: (\d+)/(\d+) ", text)]


def test_cache_teacher_reports_sampler_steps_as_lines(tmp_path, capsys, monkeypatch):
    from rcm_steps.cache import CacheConfig, cache_teacher
    from rcm_steps.storage import Storage

    monkeypatch.setenv("RCM_PROGRESS_EVERY", "0")            # a line per update (the default: every 10 s)
    teacher = FakeTeacher()
    cfg = CacheConfig(samples_per_prompt=3, shard_size=4, batch_size=2)     # 15 samples: 4 shards, 2 batches each
    cache_teacher(teacher, [f"p{i}" for i in range(5)], Storage(str(tmp_path / "st")), cfg, stop_after_shards=4)
    lines = _progress(capsys.readouterr().out, "teacher cache fake")
    total = (math.ceil(4 / 2) * 3 + math.ceil(3 / 2)) * teacher.sample_steps    # batches x sampler steps
    assert lines[0] == (0, total) and lines[-1] == (total, total), lines
    assert [d for d, _ in lines] == sorted(d for d, _ in lines) and len(lines) >= 5


def test_evaluate_reports_progress_lines(capsys, monkeypatch):
    from rcm_steps.evaluate import EvalConfig, evaluate
    from rcm_steps.teacher import teacher_denoiser

    monkeypatch.setenv("RCM_PROGRESS_EVERY", "0")
    teacher = FakeTeacher()
    cfg = EvalConfig(seeds=2, student_steps=(1, 2), teacher_steps=3, batch_size=2, real_clips=4)
    evaluate(teacher, teacher_denoiser(teacher), ["p0", "p1"], cfg)
    lines = _progress(capsys.readouterr().out, "evaluate (4 samples")
    # 2 sampling batches x (3 teacher + 1 + 2 student steps), 2 decode batches x 3 models, the metrics
    total = 2 * (3 + 1 + 2) + 2 * 3 + 1
    assert lines[0] == (0, total) and lines[-1] == (total, total) and len(lines) >= 5, lines


def test_quiet_progress_when_turned_off(capsys, monkeypatch):
    from rcm_steps.progress import Progress

    monkeypatch.setenv("RCM_PROGRESS", "0")
    with Progress("x", 3) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""
