"""Decode one clip while the next one samples: the ``overlap`` serving option (issue 23, item 4).

A served request of several clips (rows of ``predict``, ``generate --seeds 4``) runs, clip after clip, the
few-step sampler (the DiT) and the VAE decode. :class:`OverlappedDecode` hands each sampled latent to one worker
thread that decodes it on a CUDA stream of its own, while the caller's thread goes on to sample the next clip on
the default stream, so the GPU can run the two at once; the clips come back in the order they were handed in.

    with OverlappedDecode(decode, device, enabled=True) as dec:
        for row in rows:
            dec.submit(sample(row))          # returns at once; decode(latents) runs on the worker
        clips = dec.results()                # in order; an exception of a decode is raised here

On CUDA the worker's stream waits for an event recorded on the caller's stream after the latents were made (the
sampler's kernels may still be queued), and the worker synchronises its stream before it hands a result back,
so the latents it reads and the result it returns are never touched by the other stream while in use. The
worker holds its latents until that synchronisation, so the caching allocator cannot give their memory to the
next clip early. Grad mode is thread-local in torch: the worker decodes under ``torch.no_grad``. On the CPU
the worker is still a thread (torch's ops release the GIL); the result is the same, which the tests check.

Latency of one clip does not change; a request of N clips takes about N samplings plus one decode instead of N
of each, less what the two streams take from each other on the GPU. Opt-in until it is measured on a GPU
(bench/serving.py ``--clips``).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional

import torch

__all__ = ["OverlappedDecode"]


class OverlappedDecode:
    """Run ``decode(latents)`` for each submitted latent on a worker thread (and CUDA stream) while the caller
    samples the next; ``enabled=False`` decodes at once in the caller's thread (the same interface)."""

    def __init__(self, decode: Callable[[torch.Tensor], object], device, enabled: bool = True):
        self.decode = decode
        self.device = torch.device(device)
        self.enabled = bool(enabled)
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(1, thread_name_prefix="rcm-decode") if self.enabled else None)
        self._stream = torch.cuda.Stream(self.device) if self.enabled and self.device.type == "cuda" else None
        self._pending: List[Future] = []

    def submit(self, latents: torch.Tensor) -> None:
        """Queue the decode of ``latents`` (made on the caller's current stream) and return."""
        if not self.enabled:
            done: Future = Future()
            done.set_result(self.decode(latents))
            self._pending.append(done)
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._pending.append(self._pool.submit(self._run, latents, ready))

    def _run(self, latents: torch.Tensor, ready):
        with torch.no_grad():
            if self._stream is None:
                return self.decode(latents)
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                out = self.decode(latents)
                self._stream.synchronize()        # the result is complete before another stream may read it
                return out

    def results(self) -> list:
        """The decoded clips, in the order submitted; waits for all (an exception of a decode is raised)."""
        pending, self._pending = self._pending, []
        return [f.result() for f in pending]

    def close(self) -> None:
        """Wait for queued decodes, dropping those not started, and end the worker."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "OverlappedDecode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
