"""Library log lines that mislead at the places the project calls the library: dropped there, and only there.

* diffusers' ``ModelMixin.to(dtype)`` warns, for every cast, that some modules "should be kept in float32";
  the loader, the exporter and the trainer cast on purpose (the teacher's dtype, fp32 master weights) and the
  loader keeps the time embedding in FP32 itself (:mod:`rcm_core.teachers.real.time_embedding`).
* transformers' tokenizers warn "Token indices sequence length is longer than the specified maximum ..." for
  any long text, even when the project counts tokens precisely to truncate (the encoder is then called with
  ``truncation=True``); such calls pass ``verbose=False`` instead (:func:`count_tokens`).

Nothing is silenced globally: a filter is attached to one library logger for the duration of one call.

Also here, as another clash between libraries: :func:`typing_truce` (torch.compile beside Metaflow's vendored
``typing_extensions``).
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


def typing_truce() -> None:
    """Let ``torch.compile`` import inductor in a process that also imported Metaflow's vendored
    ``typing_extensions`` after torch (Metaflow runs, the pyfunc inside a flow step, the test suite).

    Both copies of ``typing_extensions`` replace ``typing._collect_parameters``, each with a PEP 696 check that
    knows only its own ``NoDefault`` sentinel: after Metaflow's copy wins, the site copy's ``ParamSpec`` looks as
    if it had a default, and ``class _ConstantDecompTable(Generic[_P, _T])`` in ``torch._inductor.compile_fx``
    raises "Type parameter ~_T without a default follows type parameter with a default". Reproduced with
    ``import torch; import metaflow._vendor.typing_extensions; import torch._inductor.compile_fx``. The check
    stays where it can be trusted: on that TypeError the parameters are collected without it, as Python 3.11's
    own ``typing`` does. Idempotent."""
    import typing

    current = getattr(typing, "_collect_parameters", None)
    if current is None or getattr(current, "_rcm_truce", False):
        return

    def collect_plain(args):
        params = []
        for t in args:
            if isinstance(t, type):
                continue
            if isinstance(t, tuple):
                found = collect_plain(t)
            elif hasattr(t, "__typing_subst__"):
                found = (t,)
            else:
                found = tuple(getattr(t, "__parameters__", ()))
            params.extend(x for x in found if x not in params)
        return tuple(params)

    def collect(args, *a, **kw):
        try:
            return current(args, *a, **kw)
        except TypeError as e:
            if "follows type parameter with a default" not in str(e):
                raise
            return collect_plain(args)

    collect._rcm_truce = True
    typing._collect_parameters = collect
