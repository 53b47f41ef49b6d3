"""Launch a module under ``torch.distributed.run`` on one node of a multi-node gang.

Used by the Metaflow ``@parallel`` distill step: every node runs
``python -m torch.distributed.run --nnodes N --node_rank i --master_addr <main ip>
--master_port P --nproc_per_node P <entrypoint> ...`` (static rendezvous; node 0
hosts the store). With one node a free local port is used.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections import deque
from typing import Dict, List, Optional, Sequence

__all__ = ["TorchrunError", "torchrun_command", "run_torchrun", "free_port", "port_for"]


class TorchrunError(RuntimeError):
    pass


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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True,
                            bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line)
    rc = proc.wait()
    if rc != 0:
        raise TorchrunError(f"torchrun {module} exited with code {rc} (node {kw.get('node_rank', 0)} of "
                            f"{kw.get('nnodes', 1)}); last output:\n{''.join(tail)}")
    return rc
