"""Wan's modulated LayerNorm and gated residual as ops (rcm_core.nets.block_ops) and their Triton passes
(rcm_kernels.norm_mod), and the Wan block forward that calls them.

Expectations come from a second implementation written here in float64: LayerNorm as (x - mean) / sqrt(var +
eps) with the biased variance, times a plus b; the residual as x + y g; their tangents by torch.func.jvp and
gradients by autograd through that float64 code. On the CPU the kernels run in Triton's interpreter (fp32 /
fp16); the bf16 GPU test compares them with diffusers' expressions."""
import pytest
import torch
from torch.autograd import forward_ad as fwAD

from triton_env import cpu_only, gpu  # noqa: F401  (sets TRITON_INTERPRET before Triton loads)
from rcm_core.nets import block_ops  # noqa: E402
from rcm_core.nets.block_ops import gated_residual, install_fused_block_ops, norm_affine  # noqa: E402

EPS = 1e-6


def ref_norm_affine(x, a, b):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * a.double() + b.double()


def ref_gated_residual(x, y, g):
    return x.double() + y.double() * g.double()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(B=2, L=7, D=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(B, L, D).mul(2).add(0.5).to(dtype), 1 + 0.3 * r(B, 1, D), 0.2 * r(B, 1, D), r(B, L, D).to(dtype),
            r(B, L, D).to(dtype), 0.1 * r(B, 1, D), 0.1 * r(B, 1, D))   # modulation as diffusers' (B, 1, D)


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("D", [48, 64])                     # a width that is not a power of two, and one that is
def test_norm_affine_forward_tangent_gradient(dtype, tol, D):
    x, a, b, dx, gy, da, db = case(D=D, dtype=dtype)
    with fwAD.dual_level():
        out = norm_affine(fwAD.make_dual(x, dx), fwAD.make_dual(a, da), fwAD.make_dual(b, db), EPS, kernel=True)
        y, dy = fwAD.unpack_dual(out)
    ry, rdy = torch.func.jvp(ref_norm_affine, (x.double(), a.double(), b.double()),
                             (dx.double(), da.double(), db.double()))
    assert y.dtype == dtype and dy.dtype == dtype
    assert rel(y, ry) < tol and rel(dy, rdy) < tol

    xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    (norm_affine(xs, as_, bs, EPS, kernel=True).float() * gy.float()).sum().backward()
    xr, ar, br = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    (ref_norm_affine(xr, ar, br) * gy.double()).sum().backward()
    assert xs.grad.dtype == dtype
    assert rel(xs.grad, xr.grad) < 5 * tol and rel(as_.grad, ar.grad) < 5 * tol and rel(bs.grad, br.grad) < tol


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("D", [48, 600])                    # one column block, and two with a ragged last one
def test_gated_residual_forward_tangent_gradient(dtype, tol, D):
    x, _, _, y, gout, _, _ = case(D=D, dtype=dtype, seed=1)
    _, _, _, dx, dy, g, dg = case(D=D, dtype=dtype, seed=2)
    with fwAD.dual_level():
        out = gated_residual(fwAD.make_dual(x, dx), fwAD.make_dual(y, dy), fwAD.make_dual(g, dg), kernel=True)
        o, do = fwAD.unpack_dual(out)
    ro, rdo = torch.func.jvp(ref_gated_residual, (x.double(), y.double(), g.double()),
                             (dx.double(), dy.double(), dg.double()))
    assert o.dtype == dtype and do.dtype == dtype
    assert rel(o, ro) < tol and rel(do, rdo) < tol

    xs, ys, gs = (t.detach().clone().requires_grad_(True) for t in (x, y, g))
    (gated_residual(xs, ys, gs, kernel=True).float() * gout.float()).sum().backward()
    xr, yr, gr = (t.detach().double().requires_grad_(True) for t in (x, y, g))
    (ref_gated_residual(xr, yr, gr) * gout.double()).sum().backward()
    for got, want in ((xs, xr), (ys, yr), (gs, gr)):
        assert got.grad.dtype == got.dtype and rel(got.grad, want.grad) < tol


@cpu_only
def test_broadcast_shapes_reach_the_kernel_and_sum_their_gradients():
    """Diffusers' shapes: modulation (B, 1, D), LayerNorm weight/bias (D,); their gradients sum over tokens (and
    samples for the weight) through the (B, D) view."""
    x, a, b, _, gy, _, _ = case()
    B, L, D = x.shape
    calls = []
    real = block_ops._NormAffine.apply
    try:
        block_ops._NormAffine.apply = lambda *args: calls.append(1) or real(*args)
        a3 = a.clone().requires_grad_(True)
        w = torch.randn(D).requires_grad_(True)
        y = norm_affine(x, a3, w, EPS, kernel=True)
    finally:
        block_ops._NormAffine.apply = real
    assert calls
    (y * gy).sum().backward()
    a3r, wr = a3.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    (ref_norm_affine(x, a3r, wr) * gy.double()).sum().backward()
    assert a3.grad.shape == (B, 1, D) and w.grad.shape == (D,)
    assert rel(a3.grad, a3r.grad) < 1e-5 and rel(w.grad, wr.grad) < 1e-5


@cpu_only
def test_under_torch_func_jvp_and_vjp():
    x, a, b, dx, gy, da, db = case(seed=3)
    f = lambda x, a, b: norm_affine(x, a, b, EPS, kernel=True)  # noqa: E731
    _, t = torch.func.jvp(f, (x, a, b), (dx, da, db))
    _, rt = torch.func.jvp(ref_norm_affine, (x.double(), a.double(), b.double()), (dx.double(), da.double(),
                                                                                 db.double()))
    assert rel(t, rt) < 1e-5
    _, vjp = torch.func.vjp(f, x, a, b)
    _, rvjp = torch.func.vjp(ref_norm_affine, x.double(), a.double(), b.double())
    for got, want in zip(vjp(gy), rvjp(gy.double())):
        assert rel(got, want) < 1e-5
    # nested (jvp of vjp): the formula path, differentiable
    gx = lambda x: torch.func.vjp(lambda x: f(x, a, b), x)[1](gy)[0]  # noqa: E731
    gxr = lambda x: torch.func.vjp(lambda x: ref_norm_affine(x, a, b), x)[1](gy.double())[0]  # noqa: E731
    assert rel(torch.func.jvp(gx, (x,), (dx,))[1], torch.func.jvp(gxr, (x.double(),), (dx.double(),))[1]) < 1e-5


def test_shapes_the_kernel_cannot_take_use_the_formula():
    """Per-token modulation (Wan2.2 TI2V) and float64 take diffusers' expression (its LayerNorm is float32, as
    diffusers' ``x.float()`` makes it)."""
    x, a, b, *_ = case()
    a_tok = torch.randn(x.shape)
    assert block_ops._per_sample(a_tok, 2, 48) is None
    for shape in [(2, 1, 48), (1, 1, 48), (1, 48), (48,)]:         # broadcast over tokens: taken
        assert block_ops._per_sample(torch.ones(shape), 2, 48).shape == (2, 48)
    for shape in [(3, 1, 48), (2, 48), (1, 1, 1, 48), (), (2, 1, 47)]:
        assert block_ops._per_sample(torch.ones(shape), 2, 48) is None, shape
    y = norm_affine(x.double(), a_tok.double(), b.double(), EPS, kernel=True)
    ref = ref_norm_affine(x, torch.ones(1), torch.zeros(1)) * a_tok.double() + b.double()
    assert y.dtype == torch.float64 and rel(y, ref) < 1e-6


def _wan_run(net, x, dx, t, ctx):
    with fwAD.dual_level():
        out = net(fwAD.make_dual(x, dx), t, ctx, return_dict=False)[0]
        y, dy = fwAD.unpack_dual(out)
    net.zero_grad()
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (net(x, t, ctx, return_dict=False)[0] * gy).sum().backward()
    return y, dy, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@cpu_only
@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_fused_wan_block_forward_equals_diffusers(cross_attn_norm, monkeypatch):
    """A tiny Wan2.1 through the project's processor, its blocks' forward stock vs fused (kernels forced, fp32):
    the output, its tangent (a dual input, as the fused sCM pass) and every parameter's gradient."""
    import copy
    from real_fixtures import tiny_wan
    from rcm_core.real import install_rcm_attention
    stock = tiny_wan(cross_attn_norm=cross_attn_norm).float()
    install_rcm_attention(stock)
    fused = copy.deepcopy(stock)
    assert install_fused_block_ops(fused, kernel=True) == 2 and block_ops.uses_fused_block_ops(fused)
    assert not block_ops.uses_fused_block_ops(stock)
    g = torch.Generator().manual_seed(3)
    x, dx = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
    t, ctx = torch.tensor([500.0]), torch.randn(1, 8, stock.config.text_dim, generator=g)
    y0, dy0, g0 = _wan_run(stock, x, dx, t, ctx)
    import rcm_kernels.norm_mod as k
    calls = {}
    for name in k.__all__:
        real = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *a, _f=real, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1) or _f(*a))
    y1, dy1, g1 = _wan_run(fused, x, dx, t, ctx)
    # every rule ran the kernels: per block 3 (2) norms and 2 residuals forward, as many tangents and gradients
    n_norm = 2 * (3 if cross_attn_norm else 2)
    assert calls == {"norm_affine": 2 * n_norm, "norm_affine_tangent": n_norm, "norm_affine_backward": n_norm,
                     "gated_residual": 2 * 4, "gated_residual_tangent": 4, "gated_residual_backward": 4}
    assert rel(y1, y0) < 1e-5 and rel(dy1, dy0) < 1e-5
    assert g0.keys() == g1.keys() and any("norm2" in n for n in g0) == cross_attn_norm
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-4, n
    # a deep copy (the EMA, the student from the teacher) runs its own block, not the original's
    twin = copy.deepcopy(fused)
    assert all(b.forward.block is b for b in twin.blocks)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [1536, 5120])               # Wan2.1-1.3B's and 14B's widths
def test_bf16_on_the_gpu_matches_diffusers_expressions(D):
    """At 32,760 tokens in bf16: the kernels against diffusers' expressions, forward, tangent and gradient."""
    B, L = 1, 32760
    dev = torch.device("cuda")
    x = torch.randn(B, L, D, device=dev, dtype=torch.bfloat16)
    dx, gy = torch.randn_like(x), torch.randn_like(x)
    a, b = 1 + 0.3 * torch.randn(B, 1, D, device=dev), 0.2 * torch.randn(B, 1, D, device=dev)
    for kernel in (True, False):
        with fwAD.dual_level():
            y, dy = fwAD.unpack_dual(norm_affine(fwAD.make_dual(x, dx), a, b, EPS, kernel=kernel))
        xs = x.clone().requires_grad_(True)
        (norm_affine(xs, a, b, EPS, kernel=kernel).float() * gy.float()).sum().backward()
        if kernel:
            k = (y, dy, xs.grad)
        else:
            f = (y, dy, xs.grad)
    for got, want in zip(k, f):
        assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    y = torch.randn_like(x)
    g = torch.randn(B, 1, D, device=dev)
    assert rel(gated_residual(x, y, g, kernel=True), gated_residual(x, y, g, kernel=False)) < 1e-2


def test_the_ops_are_the_default_on_cuda_and_0_turns_them_off(monkeypatch):
    x = torch.randn(1, 4, 16)
    monkeypatch.delenv("RCM_NORM_KERNEL", raising=False)
    assert not block_ops._use_kernel(x, None)                   # the CPU: diffusers' forward
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))     # as if on a GPU
    assert block_ops._use_kernel(x, None)
    monkeypatch.setenv("RCM_NORM_KERNEL", "0")
    assert not block_ops._use_kernel(x, None)


@cpu_only
def test_a_width_whose_kernels_fail_runs_the_formula_and_says_so_once(monkeypatch, caplog):
    """The default path tries the six kernels once per width: a width where one fails (as Triton's OutOfResources
    would on a card) gives diffusers' forward for its blocks, said once; other widths keep the kernels."""
    import logging

    import rcm_kernels.norm_mod as k
    x = torch.randn(1, 4, 48)
    monkeypatch.delenv("RCM_NORM_KERNEL", raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))     # as if on a GPU
    block_ops._width_runs.cache_clear()
    real = k.norm_affine_backward

    def fails_at_5120(x, *a):
        if x.shape[-1] == 5120:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return real(x, *a)

    monkeypatch.setattr(k, "norm_affine_backward", fails_at_5120)
    try:
        with caplog.at_level(logging.WARNING, logger="rcm.attention"):
            assert block_ops._use_kernel(x, None)
            assert not block_ops._use_kernel(torch.randn(1, 2, 5120), None)
            assert not block_ops._use_kernel(torch.randn(1, 3, 5120), None)
        said = [r.getMessage() for r in caplog.records if "width 5120" in r.getMessage()]
        assert len(said) == 1 and "out of resource" in said[0] and "diffusers' forward" in said[0], said
        assert block_ops._use_kernel(x, True)       # asked for explicitly (tests): not probed
    finally:
        block_ops._width_runs.cache_clear()


def test_a_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("RCM_NORM_KERNEL", "on")
    with pytest.raises(ValueError, match=r"RCM_NORM_KERNEL='on': expected 1 .* or 0"):
        block_ops.check_norm_request()


def test_where_the_kernels_do_not_run_the_block_is_diffusers_bit_for_bit():
    """On the CPU (switch on or off) the patched block calls diffusers' own forward: identical output."""
    import copy
    from real_fixtures import tiny_wan
    stock = tiny_wan(cross_attn_norm=True).float()
    patched = copy.deepcopy(stock)
    install_fused_block_ops(patched, kernel=False)
    x, t = torch.randn(1, 4, 3, 8, 8), torch.tensor([500.0])
    ctx = torch.randn(1, 8, stock.config.text_dim)
    assert torch.equal(patched(x, t, ctx, return_dict=False)[0], stock(x, t, ctx, return_dict=False)[0])


def test_install_is_the_default_and_0_skips_it(monkeypatch):
    from real_fixtures import tiny_wan
    net = tiny_wan()
    monkeypatch.setenv("RCM_NORM_KERNEL", "0")
    assert install_fused_block_ops(net) == 0 and not block_ops.uses_fused_block_ops(net)
    monkeypatch.delenv("RCM_NORM_KERNEL")
    assert install_fused_block_ops(net) == 2 and block_ops.uses_fused_block_ops(net)


def test_compiled_blocks_keep_the_fused_forward_for_their_eager_calls(monkeypatch):
    """compile_blocks(nograd_only) runs passes with gradients or tangents eagerly: through the fused forward."""
    from real_fixtures import tiny_wan
    from rcm_core.nets.serving import compile_blocks
    net = tiny_wan()
    install_fused_block_ops(net, kernel=False)
    fused = [b.forward for b in net.blocks]
    compile_blocks(net, nograd_only=True)
    assert [b._rcm_eager_forward for b in net.blocks] == fused
    seen = []
    monkeypatch.setattr(block_ops.FusedWanBlockForward, "__call__",
                        lambda self, *a: seen.append(self) or type(self.block).forward(self.block, *a))
    x, t = torch.randn(1, 4, 3, 8, 8, requires_grad=True), torch.tensor([500.0])
    net(x, t, torch.randn(1, 8, net.config.text_dim), return_dict=False)[0].sum().backward()
    assert seen == fused


def _stock_and_forced_copy():
    """A tiny Wan (cross_attn_norm) with the project's attention, and a deep copy whose blocks run the block ops
    with the kernels forced (interpreted on the CPU)."""
    import copy
    from real_fixtures import tiny_wan
    from rcm_core.real import install_rcm_attention
    stock = tiny_wan(cross_attn_norm=True).float()
    install_rcm_attention(stock)
    forced = copy.deepcopy(stock)
    install_fused_block_ops(forced, kernel=True)
    return stock, forced


def _fsdp_worker(rank, world, port, out, ac):
    from spawn_ranks import gloo_rank
    with gloo_rank(rank, world, port):
        from rcm_core.parallel.fsdp import ParallelConfig, parallelize
        stock, sharded = _stock_and_forced_copy()
        parallelize(sharded, ParallelConfig(activation_checkpointing=ac, fsdp=True))
        assert block_ops.uses_fused_block_ops(sharded)
        g = torch.Generator().manual_seed(3)          # the same batch on both ranks: FSDP's mean gradient = one's
        x, dx = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
        t, ctx = torch.tensor([500.0]), torch.randn(1, 8, stock.config.text_dim, generator=g)
        res = {}
        for name, net in (("stock", stock), ("sharded", sharded)):
            with torch.no_grad(), fwAD.dual_level():
                y, dy = fwAD.unpack_dual(net(fwAD.make_dual(x, dx), t, ctx, return_dict=False)[0])
            net(x, t, ctx, return_dict=False)[0].square().sum().backward()
            grads = {n.replace("_checkpoint_wrapped_module.", ""):
                     p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for n, p in net.named_parameters()}
            res[name] = (y, dy, grads)
        if rank == 0:
            torch.save(res, out)


@cpu_only
@pytest.mark.parametrize("ac", ["full", "keep_attention"])
def test_fused_block_ops_under_fsdp2_and_checkpointing_match_the_stock_block(tmp_path, ac):
    """Two gloo ranks: a tiny Wan with the kernels forced, sharded by FSDP2 with every block checkpointed, against
    the unsharded stock network: output, tangent (dual inputs, as the fused sCM pass) and gradients."""
    import torch.multiprocessing as mp
    from spawn_ranks import free_port
    out = str(tmp_path / "res.pt")
    mp.start_processes(_fsdp_worker, args=(2, free_port(), out, ac), nprocs=2, join=True, start_method="spawn")
    res = torch.load(out, weights_only=False)
    (y0, dy0, g0), (y1, dy1, g1) = res["stock"], res["sharded"]
    assert rel(y1, y0) < 1e-5 and rel(dy1, dy0) < 1e-5
    assert g0.keys() == g1.keys()
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-4, n


def _cp_worker(rank, world, port, out):
    """A tiny Wan split over 2 gloo ranks by Ulysses context parallelism, every block op and the RoPE forced onto
    their Triton kernels, against the same network on one process with none of them (rank 0 runs both)."""
    import torch.distributed as dist
    from spawn_ranks import gloo_rank
    with gloo_rank(rank, world, port):
        import rcm_kernels.norm_mod as k
        from rcm_core.nets import rope as rope_op
        from rcm_core.parallel.context_parallel import apply_context_parallel
        stock, cp = _stock_and_forced_copy()
        apply_context_parallel(cp, dist.group.WORLD)
        g = torch.Generator().manual_seed(3)
        x, dx = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
        t, ctx = torch.tensor([500.0]), torch.randn(1, 8, stock.config.text_dim, generator=g)
        res = {"stock": _wan_run(stock, x, dx, t, ctx)}
        calls = {}

        def counted(name, fn):
            return lambda *a, **kw: calls.__setitem__(name, calls.get(name, 0) + 1) or fn(*a, **kw)

        for name in k.__all__:
            setattr(k, name, counted(name, getattr(k, name)))
        rope_op._kernel_wanted = lambda x, kernel: True
        rope_op._rotate = counted("rope", rope_op._rotate)
        y, dy, grads = _wan_run(cp, x, dx, t, ctx)
        for gr in grads.values():
            dist.all_reduce(gr)                  # each rank holds its tokens' share: the sum is the gradient
        res["cp"], res["calls"] = (y, dy, grads), calls
        if rank == 0:
            torch.save(res, out)


@cpu_only
def test_kernels_under_context_parallel_match_one_process(tmp_path):
    """Issue 22's cuts under Ulysses context parallelism (2 gloo ranks, each with half the tokens): the block ops'
    and the RoPE's Triton kernels (interpreted) ran on every rank's tokens, and output, tangent and gradients equal
    the unsplit stock network's."""
    import torch.multiprocessing as mp
    from spawn_ranks import free_port
    out = str(tmp_path / "res.pt")
    mp.start_processes(_cp_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    res = torch.load(out, weights_only=False)
    (y0, dy0, g0), (y1, dy1, g1) = res["stock"], res["cp"]
    # per block 3 norms and 2 residuals; q and k rotated: forward twice (the tangent pass and the graph pass), the
    # tangent rule once, the gradient once
    assert res["calls"] == {"norm_affine": 12, "norm_affine_tangent": 6, "norm_affine_backward": 6,
                            "gated_residual": 8, "gated_residual_tangent": 4, "gated_residual_backward": 4,
                            "rope": 4 * 2 * 2}, res["calls"]
    assert rel(y1, y0) < 1e-5 and rel(dy1, dy0) < 1e-5
    assert g0.keys() == g1.keys()
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-4, n
