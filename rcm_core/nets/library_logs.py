"""Library log lines that mislead at the places the project calls the library: dropped there, and only there.

* diffusers' ``ModelMixin.to(dtype)`` warns, for every cast, that some modules "should be kept in float32";
  the loader, the exporter and the trainer cast on purpose (the teacher's dtype, fp32 master weights) and the
  loader keeps the time embedding in FP32 itself (:mod:`rcm_core.teachers.real.time_embedding`).
* transformers' tokenizers warn "Token indices sequence length is longer than the specified maximum ..." for
  any long text, even when the project counts tokens precisely to truncate (the encoder is then called with
  ``truncation=True``); such calls pass ``verbose=False`` instead (:func:`count_tokens`).

Nothing is silenced globally: a filter is attached to one library logger for the duration of one call.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["dropping", "cast_quietly", "count_tokens", "FP32_CAST"]

FP32_CAST = ("diffusers.models.modeling_utils", "should be kept in float32")


class _Drop(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(f in msg for f in self.fragments)


@contextlib.contextmanager
def dropping(logger_name: str, *fragments: str) -> Iterator[None]:
    """Drop records of logger ``logger_name`` whose message contains one of ``fragments``, inside the block."""
    logger, flt = logging.getLogger(logger_name), _Drop(fragments)
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def cast_quietly(module, *args, **kwargs):
    """``module.to(*args, **kwargs)`` (a dtype: a deliberate cast) without diffusers' "should be kept in float32"
    warning."""
    with dropping(*FP32_CAST):
        return module.to(*args, **kwargs)


def count_tokens(tokenizer, text: str, add_special_tokens: bool = True) -> int:
    """Tokens of ``text`` (untruncated), without the tokenizer's too-long-sequence warning."""
    return len(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False, verbose=False)["input_ids"])
