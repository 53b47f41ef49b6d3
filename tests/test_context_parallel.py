"""Ulysses context parallelism (rcm_core.context_parallel) against single-process attention, gloo on CPU.

Every rank of a 2- and a 4-process group (spawned, float64) builds the same full q, k, v, tangents
and output cotangent, runs the CP op on its contiguous token chunk and checks its chunk of the
output, of the forward-AD tangent and of the gradients against a naive softmax attention written
here (tangent by torch.func.jvp, gradients by autograd, on the full tensors). Modes: plain, no-grad
dual tangents, torch.func.jvp, reverse mode, and the trainer's fused mode (duals while the graph is
recorded, then backward), also through a small attention block with split_sequence /
gather_sequence and weight gradients summed over the group; cross-attention with unsplit keys;
bad inputs raise the same kind of error on every rank (no rank hangs). A rank records its failures
and raises at the end, which fails the spawn.
"""
import datetime
import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd import forward_ad as fwAD
from spawn_ranks import end_rank

B, N, H, D, M = 2, 24, 4, 8, 10          # M: text tokens of the cross-attention (not split)
ATOL = 1e-12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive_attention(q, k, v, scale=None):
    """softmax(s Q K^T) V on (B, N, H, D) tensors, written out (the independent reference).

    The scale is a matmul with s I: under forward AD a product with a non-dual tensor or a
    Python scalar makes torch import torch._dynamo (seconds per spawned rank).
    """
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = (q @ (s * torch.eye(q.shape[-1], dtype=q.dtype))) @ k.transpose(-1, -2)
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return (p @ v).transpose(1, 2)


def _reference(q, k, v, tq, tk, tv, ct):
    o, to = torch.func.jvp(naive_attention, (q, k, v), (tq, tk, tv))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad((naive_attention(qq, kk, vv) * ct).sum(), (qq, kk, vv))
    return o, to, grads


class _Checks:
    def __init__(self, rank):
        self.rank, self.failures, self.n = rank, [], 0

    def close(self, name, got, want, atol=ATOL):
        self.n += 1
        if got is None or got.shape != want.shape:
            self.failures.append(f"{name}: shape {None if got is None else tuple(got.shape)} vs {tuple(want.shape)}")
            return
        err = float((got - want).abs().max())
        if not err <= atol:
            self.failures.append(f"{name}: max abs error {err:.3g} > {atol}")

    def true(self, name, cond, detail=""):
        self.n += 1
        if not cond:
            self.failures.append(f"{name}: {detail}")

    def raises(self, name, fn, *fragments):
        """fn() must raise ValueError whose message contains every fragment (collectives stay in step)."""
        self.n += 1
        try:
            fn()
        except ValueError as e:
            msg = str(e)
            missing = [f for f in fragments if f not in msg]
            if missing:
                self.failures.append(f"{name}: message {msg!r} lacks {missing}")
            return msg
        except Exception as e:                          # noqa: BLE001 - report, keep the ranks in step
            self.failures.append(f"{name}: raised {type(e).__name__}: {e}")
            return None
        self.failures.append(f"{name}: did not raise")
        return None


def _count_all_to_all():
    calls = {"n": 0}
    orig = dist.all_to_all_single

    def counting(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)
    dist.all_to_all_single = counting
    return calls


def _worker(rank, world, port, out_dir):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    # cp = 4 over the default group, then cp = 2 over sub-groups {0, 1} and {2, 3} (dp = 2 x cp = 2: a
    # cp group whose group ranks differ from the global ones); new_group is called by every rank
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    done = {}
    try:
        for cp, group, seed in ((world, None, 1234), (2, pairs[rank // 2], 1234 + rank // 2)):
            c = _Checks(dist.get_rank(group))
            try:
                _run_checks(c, group, seed)
            except Exception:                                    # noqa: BLE001
                c.failures.append("unexpected exception:\n" + traceback.format_exc())
            if c.failures:
                raise AssertionError(f"rank {rank}, cp={cp}: {len(c.failures)} of {c.n} checks failed:\n  "
                                     + "\n  ".join(c.failures))
            done[cp] = c.n
    except BaseException:
        dist.destroy_process_group()
        raise
    with open(os.path.join(out_dir, f"ok_{rank}"), "w") as f:
        f.write(f"{done[world]} {done[2]}")
    end_rank()


def _run_checks(c: _Checks, group, seed: int):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    from rcm_core.context_parallel import (gather_sequence, heads_to_seq, seq_to_heads, split_sequence,
                                           ulysses_attention, ulysses_cross_attention)
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    q, k, v, tq, tk, tv, ct = (torch.randn(B, N, H, D, **f64) for _ in range(7))
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    loc = lambda x: x[:, sl].clone()                               # noqa: E731
    ref_o, ref_to, (gq, gk, gv) = _reference(q, k, v, tq, tk, tv, ct)

    # all-to-all round trip and head placement
    x = loc(q)
    full = seq_to_heads(x, group)
    h = H // world
    c.close("seq_to_heads places heads", full, q[:, :, rank * h:(rank + 1) * h], atol=0)
    c.close("heads_to_seq inverts", heads_to_seq(full, group), x, atol=0)
    qs, ks = seq_to_heads([loc(q), loc(k)], group, layout="bnhd")
    c.close("seq_to_heads list", ks, k[:, :, rank * h:(rank + 1) * h], atol=0)

    # (a) output
    c.close("(a) output bnhd", ulysses_attention(loc(q), loc(k), loc(v), group), ref_o[:, sl])
    bh = lambda x: loc(x).transpose(1, 2).contiguous()              # noqa: E731
    c.close("(a) output bhnd", ulysses_attention(bh(q), bh(k), bh(v), group, layout="bhnd").transpose(1, 2),
            ref_o[:, sl])
    c.close("(a) output scale", ulysses_attention(loc(q), loc(k), loc(v), group, scale=0.3),
            naive_attention(q, k, v, scale=0.3)[:, sl])

    # (b) tangent: forward-AD duals under no_grad (the trainer's separate tangent pass) ...
    with torch.no_grad(), fwAD.dual_level():
        out = ulysses_attention(*(fwAD.make_dual(loc(a), loc(t)) for a, t in ((q, tq), (k, tk), (v, tv))), group)
        o, to = fwAD.unpack_dual(out)
        c.close("(b) no-grad dual output", o, ref_o[:, sl])
        c.close("(b) no-grad dual tangent", to, ref_to[:, sl])
    # ... one tangent missing (zero)
    _, ref_to_0 = torch.func.jvp(naive_attention, (q, k, v), (tq, torch.zeros_like(tk), tv))
    with torch.no_grad(), fwAD.dual_level():
        out = ulysses_attention(fwAD.make_dual(loc(q), loc(tq)), loc(k), fwAD.make_dual(loc(v), loc(tv)), group)
        c.close("(b) dual tangent, k without tangent", fwAD.unpack_dual(out).tangent, ref_to_0[:, sl])
    # ... and torch.func.jvp through the op (the all-to-all's own jvp rule)
    o, to = torch.func.jvp(lambda a, b_, c_: ulysses_attention(a, b_, c_, group),
                           (loc(q), loc(k), loc(v)), (loc(tq), loc(tk), loc(tv)))
    c.close("(b) torch.func.jvp output", o, ref_o[:, sl])
    c.close("(b) torch.func.jvp tangent", to, ref_to[:, sl])

    # (c) gradients of <out, cotangent>
    lq, lk, lv = (loc(x).requires_grad_() for x in (q, k, v))
    (ulysses_attention(lq, lk, lv, group) * loc(ct)).sum().backward()
    for name, leaf, ref in (("q", lq, gq), ("k", lk, gk), ("v", lv, gv)):
        c.close(f"(c) grad {name}", leaf.grad, ref[:, sl])

    # (d) fused: duals while the graph is recorded, then backward (RCMTrainer.student_with_tangent)
    calls = _count_all_to_all()
    lq, lk, lv = (loc(x).requires_grad_() for x in (q, k, v))
    with fwAD.dual_level():
        out = ulysses_attention(fwAD.make_dual(lq, loc(tq)), fwAD.make_dual(lk, loc(tk)),
                                fwAD.make_dual(lv, loc(tv)), group)
        o, to = fwAD.unpack_dual(out)
    fwd_calls = calls["n"]
    c.true("(d) output has a graph", o.requires_grad and not to.requires_grad,
           f"o.requires_grad={o.requires_grad}, tangent.requires_grad={to.requires_grad}")
    c.close("(d) fused output", o.detach(), ref_o[:, sl])
    c.close("(d) fused tangent", to, ref_to[:, sl])
    (o * loc(ct)).sum().backward()
    for name, leaf, ref in (("q", lq, gq), ("k", lk, gk), ("v", lv, gv)):
        c.close(f"(d) fused grad {name}", leaf.grad, ref[:, sl])
    c.true("(d) collectives: 2 forward (q,k,v+tangents; o+do), 2 backward",
           (fwd_calls, calls["n"] - fwd_calls) == (2, 2), f"got {(fwd_calls, calls['n'] - fwd_calls)}")

    _check_block(c, group, split_sequence, gather_sequence, ulysses_attention)

    # (e) cross-attention: local queries, all (replicated) text keys
    kt, vt, tkt, tvt = (torch.randn(B, M, H, D, **f64) for _ in range(4))
    ref_x, ref_tx = torch.func.jvp(naive_attention, (q, kt, vt), (tq, tkt, tvt))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, kt, vt))
    rgq, rgk, rgv = torch.autograd.grad((naive_attention(qq, kk, vv) * ct).sum(), (qq, kk, vv))
    lq, lkt, lvt = loc(q).requires_grad_(), kt.clone().requires_grad_(), vt.clone().requires_grad_()
    calls["n"] = 0
    with fwAD.dual_level():
        out = ulysses_cross_attention(fwAD.make_dual(lq, loc(tq)), fwAD.make_dual(lkt, tkt),
                                      fwAD.make_dual(lvt, tvt), group)
        o, to = fwAD.unpack_dual(out)
    (o * loc(ct)).sum().backward()
    c.true("(e) cross-attention: no all-to-all", calls["n"] == 0, f"{calls['n']} calls")
    c.close("(e) cross output", o.detach(), ref_x[:, sl])
    c.close("(e) cross tangent", to, ref_tx[:, sl])
    c.close("(e) cross grad q", lq.grad, rgq[:, sl])
    gk_sum, gv_sum = lkt.grad.clone(), lvt.grad.clone()             # each rank: its queries' share
    dist.all_reduce(gk_sum, group=group)
    dist.all_reduce(gv_sum, group=group)
    c.close("(e) cross grad k (summed over cp)", gk_sum, rgk)
    c.close("(e) cross grad v (summed over cp)", gv_sum, rgv)

    # (f) bad inputs: the same error on every rank, nothing hangs
    bad_h = world + 1                                              # 3 for cp=2, 5 for cp=4
    qh = torch.randn(B, n, bad_h, D, dtype=torch.float64)
    c.raises("(f) heads not divisible", lambda: ulysses_attention(qh, qh, qh, group),
             f"{bad_h} heads", f"cp size {world}")
    c.raises("(f) seq_to_heads heads not divisible", lambda: seq_to_heads(qh, group), f"{bad_h} heads")
    n_r = n + 1 if rank == 0 else n                                # rank 0 holds one token more
    qn = torch.randn(B, n_r, H, D, dtype=torch.float64)
    lens = str([n + 1] + [n] * (world - 1))
    c.raises("(f) local lengths differ", lambda: ulysses_attention(qn, qn, qn, group),
             "local sequence lengths of q differ", lens, f"global {N + 1}", f"cp={world}")
    c.raises("(f) wrong layout", lambda: ulysses_attention(loc(q), loc(k), loc(v), group, layout="bhdn"),
             "'bhdn'")
    c.raises("(f) wrong layout seq_to_heads", lambda: seq_to_heads(loc(q), group, layout="nbhd"), "'nbhd'")
    c.raises("(f) heads_to_seq tokens not divisible",
             lambda: heads_to_seq(torch.randn(B, N + 1, 1, D, dtype=torch.float64), group),
             f"{N + 1} tokens", f"cp size {world}")
    c.raises("(f) split_sequence not divisible", lambda: split_sequence(torch.randn(B, N + 1, 3), group, dim=1),
             f"{N + 1} tokens", f"cp size {world}")
    c.raises("(f) gather lengths differ", lambda: gather_sequence(torch.randn(B, n_r, 3), group, dim=1),
             "dim 1: " + lens)
    # a local error on one rank only: that rank names it, the others name that rank
    q3 = loc(q)[0] if rank == world - 1 else loc(q)
    want = ("q must be 4-D",) if rank == world - 1 else (f"rank(s) [{world - 1}]",)
    c.raises("(f) one rank's bad input", lambda: ulysses_attention(q3, loc(k), loc(v), group), *want)
    # with the checks off, the local errors still come
    c.raises("(f) check=False heads", lambda: ulysses_attention(qh, qh, qh, group, check=False), f"{bad_h} heads")
    # and the group still works afterwards
    c.close("(f) after errors", ulysses_attention(loc(q), loc(k), loc(v), group, check=False), ref_o[:, sl])


def _check_block(c, group, split_sequence, gather_sequence, ulysses_attention):
    """(d) in a small network: split -> QKV projections -> Ulysses attention -> output projection ->
    gather, input dual and weights requiring grad (tangents that carry a graph, as in the student)."""
    g = torch.Generator().manual_seed(99)
    C = H * D
    x, tx = (torch.randn(B, N, C, dtype=torch.float64, generator=g) for _ in range(2))
    ws = [torch.randn(C, C, dtype=torch.float64, generator=g) / math.sqrt(C) for _ in range(4)]
    ct = torch.randn(B, N, C, dtype=torch.float64, generator=g)

    def block(x, wq, wk, wv, wo, attn):
        q, k, v = ((x @ w).unflatten(-1, (H, D)) for w in (wq, wk, wv))
        return x + attn(q, k, v).flatten(2) @ wo

    ref = lambda x, *w: block(x, *w, attn=naive_attention)         # noqa: E731
    ref_y, ref_ty = torch.func.jvp(lambda x_: ref(x_, *ws), (x,), (tx,))
    wr = [w.clone().requires_grad_() for w in ws]
    ref_gw = torch.autograd.grad((ref(x, *wr) * ct).sum(), wr)

    wl = [w.clone().requires_grad_() for w in ws]
    with fwAD.dual_level():
        xl = split_sequence(fwAD.make_dual(x, tx), group, dim=1)
        yl = block(xl, *wl, attn=lambda q, k, v: ulysses_attention(q, k, v, group))
        y = gather_sequence(yl, group, dim=1)
        yp, ty = fwAD.unpack_dual(y)
    c.close("(d) block output (gathered)", yp.detach(), ref_y)
    c.close("(d) block tangent (gathered)", ty.detach(), ref_ty)
    (yp * ct).sum().backward()                                     # the same loss on every rank
    for i, (w, rg) in enumerate(zip(wl, ref_gw)):
        gsum = w.grad.clone()
        dist.all_reduce(gsum, group=group)                         # per-rank grads are partial: sum over cp
        c.close(f"(d) block weight grad {i} (summed over cp)", gsum, rg)


def test_ulysses_matches_single_process_cp4_and_cp2(tmp_path):
    mp.start_processes(_worker, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True, start_method="spawn")
    counts = [(tmp_path / f"ok_{r}").read_text() for r in range(4)]      # every rank ran every check
    assert len(set(counts)) == 1 and min(map(int, counts[0].split())) > 40, counts


def test_single_process_is_plain_attention():
    """Without torch.distributed (or cp=1) the helpers are identities and the op is local attention."""
    from rcm_core.context_parallel import (gather_sequence, heads_to_seq, seq_to_heads, split_sequence,
                                           ulysses_attention, ulysses_cross_attention)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64, generator=g) for _ in range(3))
    want = naive_attention(q, k, v)
    assert torch.allclose(ulysses_attention(q, k, v, None), want, atol=ATOL, rtol=0)
    assert torch.allclose(ulysses_cross_attention(q, k, v, None), want, atol=ATOL, rtol=0)
    assert seq_to_heads(q) is q and heads_to_seq(q) is q
    assert split_sequence(q, None, 1) is q and gather_sequence(q, None, 1) is q
    with pytest.raises(ValueError, match="'bhdn'"):
        ulysses_attention(q, k, v, None, layout="bhdn")
