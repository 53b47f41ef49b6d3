"""Launch a module under ``torch.distributed.run`` on one node of a multi-node gang.

Used by the Metaflow ``@parallel`` distill step: every node runs
``python -m torch.distributed.run --nnodes N --node_rank i --master_addr <main ip>
--master_port P --nproc_per_node P <entrypoint> ...`` (static rendezvous; node 0
hosts the store). With one node a free local port is used.

A worker that fails on one of the project's errors prints an ``rCM: ...`` block (see
:mod:`rcm_steps.errors`); :class:`TorchrunError` carries those lines, so the step's own
message names the worker's culprit. When the launcher is interrupted (SIGTERM/SIGINT raised
as an exception in the step), the torchrun child is terminated before the exception goes on.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections import deque
from typing import Dict, List, Optional, Sequence

from .errors import PREFIX, RCMError

__all__ = ["TorchrunError", "torchrun_command", "run_torchrun", "free_port", "port_for"]


class TorchrunError(RCMError, RuntimeError):
    """The torchrun gang failed; ``worker_report`` holds the workers' ``rCM:`` lines (if any)."""

    def __init__(self, message: str, worker_report: Sequence[str] = ()):
        super().__init__(message)
        self.worker_report = list(worker_report)

    @property
    def summary(self) -> Optional[str]:
        """The first worker's ``what went wrong`` line (without the prefix), if a worker said."""
        for ln in self.worker_report:
            body = ln.split(PREFIX, 1)[1].strip()
            if not body.startswith(("fix:", "then ")):
                return body
        return None

    @property
    def fix(self) -> str:
        for ln in self.worker_report:
            body = ln.split(PREFIX, 1)[1].strip()
            if body.startswith("fix:"):
                return body[len("fix:"):].strip() + "; then `python flows/distill_flow.py resume` continues " \
                                                   "from the last checkpoint"
        return ("read the distill worker's output above; once fixed, `python flows/distill_flow.py resume` "
                "continues from the last checkpoint")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for(key: str, lo: int = 20000, span: int = 20000) -> int:
    """A port all nodes of a gang agree on without talking (derived from the run id)."""
    return lo + int(hashlib.sha256(key.encode()).hexdigest(), 16) % span


def torchrun_command(module: str, args: Sequence[str], nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: Optional[int] = None,
                     nproc_per_node: int = 1, max_restarts: int = 0) -> List[str]:
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"bad gang: nnodes={nnodes}, node_rank={node_rank}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    port = master_port or free_port()
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
            f"--master_addr={master_addr}", f"--master_port={port}", f"--max_restarts={max_restarts}",
            "-m", module, *map(str, args)]


def run_torchrun(module: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
                 tail_lines: int = 60, **kw) -> int:
    """Run the gang member, streaming its output; raise TorchrunError with the tail on failure."""
    cmd = torchrun_command(module, args, **kw)
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, kw.get("nproc_per_node", 1)))))
    full_env.update(env or {})
    print("launch:", " ".join(cmd), flush=True)
    tail: deque = deque(maxlen=tail_lines)
    said: List[str] = []                                   # the workers' rCM: lines (deduplicated)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True,
                            bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
            if PREFIX in line and len(said) < 20:
                ln = line[line.index(PREFIX):].rstrip()
                if ln not in said:
                    said.append(ln)
        rc = proc.wait()
    except BaseException:                                  # interrupted: do not leave the gang running
        _terminate(proc)
        raise
    if rc != 0:
        raise TorchrunError(f"torchrun {module} exited with code {rc} (node {kw.get('node_rank', 0)} of "
                            f"{kw.get('nnodes', 1)}); last output:\n{''.join(tail)}", said)
    return rc


def _terminate(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM torchrun (it forwards it to its workers), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except Exception:  # noqa: BLE001 - already gone
        pass
