"""Ending a spawned gloo rank (``torch.multiprocessing.start_processes`` workers of the tests).

A rank that returns normally ends through the interpreter's finalization, where gloo's worker threads can
still hold work objects; destroying them then aborts the process ("terminate called without an active
exception", SIGABRT) although every check passed (seen once in CI on the 2-rank Wan context-parallel
test). ``steps/rcm_steps/distill.py``'s ``_exit_worker`` ends torchrun workers the same way."""
import contextlib
import os
import socket
import sys

import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """The body of a spawned CPU rank: join the gloo group on 127.0.0.1:``port`` (one thread per rank, for 2-core
    machines); on an exception leave the group and raise it; on success end the rank with :func:`end_rank`
    (which exits the process)."""
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    end_rank()


def end_rank() -> None:
    """Call last in a worker whose work succeeded: wait for the peers, leave the group, flush and exit 0
    without the interpreter's finalization (spawn reads exit code 0 as success)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a group's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
