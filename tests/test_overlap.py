"""The ``overlap`` serving option (rcm_core.nets.overlap): each clip decodes on a worker thread while the next one
samples, in order, with the same clips as decoding in turn; through the registered model and the generate CLI in
tests/test_serving_options.py."""
from __future__ import annotations

import threading

import pytest
import torch

from rcm_core.nets.overlap import OverlappedDecode
from rcm_core.nets.serving import ServingOptions, parse_variant


def _decode(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * 2.0 + 1.0).mul(0.5)


def test_clips_come_back_in_order_and_equal_to_decoding_in_turn():
    clips = [torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for enabled in (True, False):
        threads = []

        def decode(x):
            threads.append(threading.current_thread().name)
            return _decode(x)

        with OverlappedDecode(decode, "cpu", enabled=enabled) as dec:
            for c in clips:
                dec.submit(c)
            out = dec.results()
        assert len(out) == len(clips)
        for o, c in zip(out, clips):
            assert torch.equal(o, torch.tanh(c * 2.0 + 1.0) * 0.5)
        worker = [t.startswith("rcm-decode") for t in threads]
        assert all(worker) if enabled else not any(worker), threads


def test_the_caller_samples_the_next_clip_while_a_decode_runs():
    """The first decode waits until the caller has handed in the second clip: that happens only if submit returns
    before its decode is done (decoding in turn would wait 10 s here and record it)."""
    second_submitted = threading.Event()
    seen = []

    def decode(x):
        if not seen:
            seen.append(second_submitted.wait(timeout=10))
        else:
            seen.append(True)
        return x + 1

    with OverlappedDecode(decode, "cpu") as dec:
        dec.submit(torch.zeros(3))
        dec.submit(torch.ones(3))
        second_submitted.set()
        out = dec.results()
    assert seen == [True, True]
    assert torch.equal(out[0], torch.ones(3)) and torch.equal(out[1], torch.full((3,), 2.0))


def test_the_worker_decodes_without_autograd_and_raises_its_error_at_results():
    grad = []

    def decode(x):
        grad.append(torch.is_grad_enabled())
        if float(x.sum()) < 0:
            raise RuntimeError("decoder failed on clip")
        return x * 2

    w = torch.ones(2, requires_grad=True)
    with OverlappedDecode(decode, "cpu") as dec:
        dec.submit(w)
        dec.submit(-w)
        with pytest.raises(RuntimeError, match="decoder failed on clip"):
            dec.results()
        assert dec.results() == []                  # the request's clips are gone with its error
        dec.submit(w)
        (out,) = dec.results()
    assert grad == [False, False, False] and not out.requires_grad


def test_the_option_parses_stores_only_when_on_and_names_bad_values():
    assert ServingOptions().to_dict() == {"fp8": "off", "compile": "off"}
    on = ServingOptions(overlap="on")
    assert on.to_dict() == {"fp8": "off", "compile": "off", "overlap": "on"}
    assert on.label == "fp8=off, compile=off, overlap=on" and not on.changes_network
    assert ServingOptions(fp8="dynamic").changes_network
    assert parse_variant("compile+overlap") == ServingOptions(compile="default", overlap="on")
    assert ServingOptions.resolve({"overlap": "on"}, {"RCM_OVERLAP": "off"}, {}).overlap == "off"
    assert ServingOptions.resolve(None, {"RCM_OVERLAP": "off"}, {"overlap": "on"}).overlap == "on"
    with pytest.raises(ValueError, match=r"overlap='yes'.*off, on"):
        ServingOptions.resolve(None, {"RCM_OVERLAP": "yes"}, {})
    with pytest.raises(ValueError, match=r"'fp8-static\+overlap': overlap changes how a request's clips are decoded"):
        parse_variant("fp8-static+overlap", network_only=True)


def test_evaluate_refuses_overlap_as_a_variant_naming_the_option():
    from rcm_steps.errors import ConfigError
    from rcm_steps.evaluate import EvalConfig, serving_variants_option

    with pytest.raises(ConfigError, match=r"--eval_serving: serving variant 'overlap': overlap changes"):
        serving_variants_option("fp8-dynamic,overlap")
    with pytest.raises(ValueError, match=r"'compile\+overlap': overlap changes"):
        EvalConfig(serving=("compile+overlap",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_side_stream_waits_for_the_sampler_and_returns_complete_results():
    """On CUDA: the latents come from a long kernel queue on the default stream; the worker's stream must wait for
    them (an event), and its result must be complete when handed back."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)
    expected = []

    def decode(x):
        assert torch.cuda.current_stream(dev) != torch.cuda.default_stream(dev)
        return (x @ x).sum(dim=1)

    with OverlappedDecode(decode, dev) as dec:
        for i in range(4):
            x = a
            for _ in range(20):                     # queued work the decode must wait for
                x = torch.tanh(x @ a * 1e-2)
            expected.append((x @ x).sum(dim=1).cpu())
            dec.submit(x)
        out = dec.results()
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, rtol=1e-5, atol=1e-3)
