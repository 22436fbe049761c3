"""Triton shred kernels (lethe.triton_kernels.shred_kl: topk_kl, topk_kl_backward,
fused_linear_topk_kl) against the pure-PyTorch reference and its autograd (fp32 tolerance: the
summation orders differ, so not bit for bit).

On a machine without a CUDA GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
tests/conftest.py; see tests/triton_util.py); bfloat16 is checked at its own tolerance."""
import pytest
import torch

from triton_util import DEVICE, assert_kernels_run_where_they_can
from lethe.ops.shred_reference import (
    fused_linear_topk_kl_reference,
    topk_kl_reference,
)
from lethe.triton_kernels import shred_kl as ts

pytestmark = [pytest.mark.triton]


def test_kernels_run_where_they_can():
    assert_kernels_run_where_they_can(ts._kl_row_kernel)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORMS = [True, False]  # full_normalize


def tol(dtype):
    # bf16: 8 significant bits (and the interpreter truncates its stores, see triton_util)
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}[dtype]


def targets(n, v, k, seed, zero_rows=(), repeat=True):
    """(ids int64 [n,k], q fp32 [n,k]): random ids (with repeats unless k == v and not repeat),
    row 0 with a repeated id when k > 1, q normalised per row, zero_rows all zero."""
    g = torch.Generator().manual_seed(seed)
    if k == v and not repeat:
        ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)]) if n else \
            torch.empty(0, k, dtype=torch.long)
    else:
        ids = torch.randint(0, v, (n, k), generator=g)
        if n and k > 1:
            ids[0, k - 1] = ids[0, 0]
        if n > 1 and k > 2:
            ids[1, :] = ids[1, 0]  # one id, k times
    q = torch.rand(n, k, generator=g) + 0.05
    q = q / q.sum(1, keepdim=True)
    for r in zero_rows:
        if r < n:
            q[r] = 0.0
    return ids.to(DEVICE), q.to(DEVICE)


def row_weights(n, seed, kind):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * 2
    if n > 2:
        w[2] = 0.0
    return w.to(DEVICE)


def ref_forward(z, ids, q, w, full):
    return topk_kl_reference(z.float(), ids, q, weights=w, reduction="none",
                             normalize="full" if full else "topk")


def ref_lse(z, ids, full):
    z = z.float()
    return torch.logsumexp(z if full else torch.gather(z, 1, ids), dim=-1)


def ref_grad(z, ids, q, w, full, g):
    zz = z.detach().float().requires_grad_()
    (ref_forward(zz, ids, q, w, full) * g).sum().backward()
    return zz.grad


def check_topk_kl(n, v, k, dtype, full, wkind, seed=0, zero_rows=(4,), repeat=True):
    gen = torch.Generator().manual_seed(seed + 100)
    z = (torch.randn(n, v, generator=gen) * 3).to(dtype).to(DEVICE)
    ids, q = targets(n, v, k, seed, zero_rows, repeat)
    w = row_weights(n, seed, wkind)
    loss, lse = ts.topk_kl(z, ids, q, w, full)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == (n,) and lse.shape == (n,)
    torch.testing.assert_close(loss, ref_forward(z, ids, q, w, full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse(z, ids, full), rtol=1e-5, atol=1e-5)
    g = (torch.randn(n, generator=gen)).to(DEVICE)
    grad = ts.topk_kl_backward(g, z, ids, q, lse, w, full)
    assert grad.dtype == dtype and grad.shape == (n, v) and grad.is_contiguous()
    torch.testing.assert_close(grad.float(), ref_grad(z, ids, q, w, full, g), **tol(dtype))


SHAPES = [  # (N, V, K)
    (1, 1, 1),
    (1, 37, 37),
    (7, 37, 5),
    (7, 37, 1),
    (5, 64, 64),
    (3, 100, 7),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("full", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_kl_tiled(shape, full, dtype, monkeypatch):
    # several BLOCK_V tiles, the last one partial, and a tiled repeated-id reduction
    monkeypatch.setattr(ts, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(ts, "DEDUP_TILE", 64)
    n, v, k = shape
    check_topk_kl(n, v, k, dtype, full, "w", seed=sum(shape))


@pytest.mark.parametrize("full", NORMS)
@pytest.mark.parametrize("wkind", [None, "w"])
def test_topk_kl_one_tile(full, wkind):
    check_topk_kl(7, 37, 5, torch.float32, full, wkind, seed=3)
    check_topk_kl(4, 40, 40, torch.float16, full, wkind, seed=4, repeat=False)


def test_topk_kl_fp16_probs():
    ids, q = targets(5, 37, 3, 5)
    z = torch.randn(5, 37).to(DEVICE)
    q16 = q.half()
    for full in NORMS:
        loss, lse = ts.topk_kl(z, ids, q16, None, full)
        torch.testing.assert_close(loss, ref_forward(z, ids, q16.float(), None, full),
                                   rtol=1e-5, atol=1e-5)
        g = torch.ones(5, device=DEVICE)
        torch.testing.assert_close(ts.topk_kl_backward(g, z, ids, q16, lse, None, full),
                                   ref_grad(z, ids, q16.float(), None, full, g), rtol=1e-5, atol=1e-5)


def test_topk_kl_empty():
    z = torch.empty(0, 5, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.long, device=DEVICE)
    q = torch.empty(0, 2, device=DEVICE)
    loss, lse = ts.topk_kl(z, ids, q, None, True)
    assert loss.shape == (0,) and lse.shape == (0,) and loss.dtype == torch.float32
    g = ts.topk_kl_backward(torch.empty(0, device=DEVICE), z, ids, q, lse, None, True)
    assert g.shape == (0, 5)


def check_fused(n, h, v, k, chunk, dtype, full, has_bias, wkind, grads=True, seed=0,
                bias_dtype=None):
    gen = torch.Generator().manual_seed(seed + 200)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype).to(DEVICE)
    bias = ((torch.randn(v, generator=gen)).to(bias_dtype or dtype).to(DEVICE) if has_bias
            else None)
    ids, q = targets(n, v, k, seed, zero_rows=(3,))
    w = row_weights(n, seed, wkind)
    srs = torch.randn(n, generator=gen).to(DEVICE) if grads else None
    loss, gh, gW, gb = ts.fused_linear_topk_kl(hidden, weight, bias, ids, q, w, srs, full, chunk)

    hr = hidden.detach().float().requires_grad_()
    wr = weight.detach().float().requires_grad_()
    br = bias.detach().float().requires_grad_() if has_bias else None
    rl = fused_linear_topk_kl_reference(hr, wr, br, ids, q, weights=w, reduction="none",
                                        normalize="full" if full else "topk")
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    torch.testing.assert_close(loss, rl.detach(), rtol=1e-5, atol=1e-5)
    if not grads:
        for t in (gh, gW, gb):
            assert t.shape == (0,) and t.dtype == dtype
        return
    (rl * srs).sum().backward()
    assert gh.dtype == dtype and gh.shape == (n, h)
    assert gW.dtype == dtype and gW.shape == (v, h)
    torch.testing.assert_close(gh.float(), hr.grad, **tol(dtype))
    torch.testing.assert_close(gW.float(), wr.grad, **tol(dtype))
    if has_bias:
        assert gb.dtype == bias.dtype and gb.shape == (v,)
        torch.testing.assert_close(gb.float(), br.grad, **tol(bias.dtype))
    else:
        assert gb.shape == (0,) and gb.dtype == dtype


FUSED_SHAPES = [  # (N, H, V, K, chunk_size)
    (1, 8, 37, 1, 1),
    (7, 16, 37, 5, 3),  # chunk_size not dividing N
    (7, 8, 37, 37, 4),  # K = V
    (9, 8, 20, 4, 16),  # chunk_size > N
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("full", NORMS)
@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_fused(shape, full, has_bias, dtype, monkeypatch):
    monkeypatch.setattr(ts, "BLOCK_V_MAX", 16)
    n, h, v, k, chunk = shape
    check_fused(n, h, v, k, chunk, dtype, full, has_bias, "w", seed=n + v + k)


@pytest.mark.parametrize("full", NORMS)
def test_fused_variants(full):
    check_fused(6, 8, 37, 5, 4, torch.float32, full, True, None, seed=1)  # one tile, no weights
    check_fused(6, 8, 37, 5, 4, torch.float32, full, True, "w", grads=False, seed=2)
    check_fused(6, 8, 37, 5, 4, torch.float16, full, False, "w", grads=False, seed=3)
    check_fused(5, 8, 37, 3, 2, torch.float16, full, True, "w", seed=4, bias_dtype=torch.float32)


def test_fused_empty():
    hidden = torch.empty(0, 4, dtype=torch.float16, device=DEVICE)
    weight = torch.randn(6, 4, device=DEVICE)
    bias = torch.randn(6, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.long, device=DEVICE)
    q = torch.empty(0, 2, device=DEVICE)
    loss, gh, gW, gb = ts.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, None, True, 4)
    assert loss.shape == (0,) and all(t.shape == (0,) and t.dtype == torch.float16 for t in (gh, gW, gb))
    srs = torch.empty(0, device=DEVICE)
    loss, gh, gW, gb = ts.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 4)
    assert gh.shape == (0, 4) and gh.dtype == torch.float16
    assert gW.shape == (6, 4) and gW.dtype == torch.float32 and not gW.any()
    assert gb.shape == (6,) and gb.dtype == torch.float32 and not gb.any()
    loss, gh, gW, gb = ts.fused_linear_topk_kl(hidden, weight, None, ids, q, None, srs, False, 4)
    assert gb.shape == (0,) and gb.dtype == torch.float16


@pytest.mark.parametrize("grad_mask", [(h, w, b) for h in (False, True) for w in (False, True)
                                       for b in (False, True)])
@pytest.mark.parametrize("n", [0, 7])
def test_fused_grad_mask(grad_mask, n):
    # a gradient not asked for is an empty [0] tensor of hidden's dtype; the rest are the full
    # call's, bit for bit
    gen = torch.Generator().manual_seed(40 + n)
    hidden = torch.randn(n, 8, generator=gen).half().to(DEVICE)
    weight = torch.randn(37, 8, generator=gen).to(DEVICE)
    bias = torch.randn(37, generator=gen).to(DEVICE)
    ids, q = targets(n, 37, 5, n)
    srs = torch.rand(n, generator=gen).to(DEVICE)
    full = ts.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 3)
    out = ts.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 3, *grad_mask)
    torch.testing.assert_close(out[0], full[0], rtol=0, atol=0)
    for want, got, expect in zip(grad_mask, out[1:], full[1:]):
        if want:
            assert got.dtype == expect.dtype
            torch.testing.assert_close(got, expect, rtol=0, atol=0)
        else:
            assert got.shape == (0,) and got.dtype == torch.float16


def test_check_values_false_skips_the_target_checks():
    hidden = torch.randn(4, 8, device=DEVICE)
    weight = torch.randn(20, 8, device=DEVICE)
    ids, q = targets(4, 20, 3, 5)
    q = q * 0.9  # rows sum to 0.9: rejected when checked
    ones = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
        ts.fused_linear_topk_kl(hidden, weight, None, ids, q, None, ones, True, 2)
    loss, gh, gW, _ = ts.fused_linear_topk_kl(hidden, weight, None, ids, q, None, ones, True, 2, check_values=False)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rl = fused_linear_topk_kl_reference(hr, wr, None, ids, q, reduction="none")
    rl.sum().backward()
    torch.testing.assert_close(loss, rl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, hr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gW, wr.grad, rtol=1e-5, atol=1e-5)
    z = (hidden @ weight.t()).contiguous()
    lse = torch.logsumexp(z, -1)
    with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
        ts.topk_kl_backward(ones, z, ids, q, lse, None, True)
    zr = z.clone().requires_grad_()
    topk_kl_reference(zr, ids, q, reduction="none").sum().backward()
    torch.testing.assert_close(ts.topk_kl_backward(ones, z, ids, q, lse, None, True, False), zr.grad,
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    z = torch.randn(3, 8, device=DEVICE)
    ids, q = targets(3, 8, 2, 0, repeat=False)
    lse = torch.zeros(3, device=DEVICE)
    with pytest.raises(TypeError, match="logits"):
        ts.topk_kl(z.long(), ids, q, None, True)
    with pytest.raises(ValueError, match="logits"):
        ts.topk_kl(z[0], ids, q, None, True)
    with pytest.raises(TypeError, match="target_ids"):
        ts.topk_kl(z, ids.int(), q, None, True)
    with pytest.raises(ValueError, match="target_ids"):
        ts.topk_kl(z, ids[:2], q[:2], None, True)
    with pytest.raises(ValueError, match="K = 9"):
        ts.topk_kl(z, torch.zeros(3, 9, dtype=torch.long, device=DEVICE),
                   torch.full((3, 9), 1 / 9, device=DEVICE), None, True)
    with pytest.raises(ValueError, match="target_probs must have the shape"):
        ts.topk_kl(z, ids, q[:, :1], None, True)
    with pytest.raises(TypeError, match="target_probs"):
        ts.topk_kl(z, ids, q.double(), None, True)
    bad = ids.clone()
    bad[1, 1] = 8
    with pytest.raises(ValueError, match=r"target_ids must be in \[0, V\).*got 8 in row 1"):
        ts.topk_kl(z, bad, q, None, True)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match="got -1 in row 1"):
        ts.topk_kl_backward(lse, z, bad, q, lse, None, False)
    neg = q.clone()
    neg[2, 0] = -0.5
    with pytest.raises(ValueError, match="non-negative.*row 2"):
        ts.topk_kl(z, ids, neg, None, True)
    nan = q.clone()
    nan[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-negative.*row 0"):
        ts.topk_kl(z, ids, nan, None, True)
    with pytest.raises(ValueError, match="sum to 1.*row 0"):
        ts.topk_kl(z, ids, q * 1.01, None, True)
    ts.topk_kl(z, ids, q * (1 + 5e-4), None, True)  # within 1e-3
    with pytest.raises(ValueError, match="row_weight"):
        ts.topk_kl(z, ids, q, torch.ones(2, device=DEVICE), True)
    with pytest.raises(TypeError, match="row_weight"):
        ts.topk_kl(z, ids, q, torch.ones(3, dtype=torch.long, device=DEVICE), True)
    with pytest.raises(ValueError, match="grad_loss"):
        ts.topk_kl_backward(torch.ones(4, device=DEVICE), z, ids, q, lse, None, True)
    with pytest.raises(ValueError, match="lse"):
        ts.topk_kl_backward(lse, z, ids, q, lse[:1], None, True)

    hidden = torch.randn(3, 4, device=DEVICE)
    weight = torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        ts.fused_linear_topk_kl(hidden, weight[:, :3], None, ids, q, None, None, True, 2)
    with pytest.raises(ValueError, match="bias"):
        ts.fused_linear_topk_kl(hidden, weight, torch.zeros(7, device=DEVICE), ids, q, None,
                                None, True, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        ts.fused_linear_topk_kl(hidden, weight, None, ids, q, None, None, True, 0)
    with pytest.raises(ValueError, match="grad_row_scale"):
        ts.fused_linear_topk_kl(hidden, weight, None, ids, q, None, torch.ones(2, device=DEVICE),
                                True, 2)
    with pytest.raises(TypeError, match="hidden"):
        ts.fused_linear_topk_kl(hidden.int(), weight, None, ids, q, None, None, True, 2)
    with pytest.raises(ValueError, match="target_ids must be in"):
        ts.fused_linear_topk_kl(hidden, weight, None, bad, q, None, None, True, 2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", ["full", "topk"])
def test_public_api_backend_triton_with_gradients(reduction, normalize):
    import lethe
    from lethe.ops import shred_reference as R

    g = torch.Generator().manual_seed(5)
    N, H, V, K = 9, 8, 29, 4
    hidden = torch.randn(N, H, generator=g).to(DEVICE)
    weight = torch.randn(V, H, generator=g).to(DEVICE)
    bias = torch.randn(V, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (N, K), generator=g).to(DEVICE)
    q = torch.softmax(torch.randn(N, K, generator=g), -1).to(DEVICE)
    mask = (torch.arange(N) % 3 != 0).to(DEVICE)
    outs = []
    for backend in ("triton", "reference"):
        ps = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = lethe.ops.fused_linear_topk_kl(ps[0], ps[1], ids, q, bias=ps[2], mask=mask, reduction=reduction,
                                             normalize=normalize, chunk_size=4, backend=backend)
        grads = torch.autograd.grad(out, ps, torch.ones_like(out))
        z = (hidden @ weight.t() + bias).requires_grad_(True)
        out2 = lethe.ops.topk_kl(z, ids, q, mask=mask, reduction=reduction, normalize=normalize, backend=backend)
        (gz,) = torch.autograd.grad(out2, z, torch.ones_like(out2))
        outs.append((out, grads, out2, gz))
    (a, ga, a2, gza), (b, gb, b2, gzb) = outs
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2, b2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gza, gzb, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert R.IGNORE_INDEX == -100


def test_opcheck_triton_shred_ops():
    import lethe  # noqa: F401  (registers the Triton custom ops)

    g = torch.Generator().manual_seed(6)
    N, H, V, K = 5, 4, 11, 3
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).to(DEVICE).requires_grad_(True)
    ids = torch.randint(0, V, (N, K), generator=g).to(DEVICE)
    q = torch.softmax(torch.randn(N, K, generator=g), -1).to(DEVICE)
    rw = torch.rand(N, generator=g).to(DEVICE)
    ops = torch.ops.lethe
    z = (hidden @ weight.t()).detach().requires_grad_(True)
    torch.library.opcheck(ops.topk_kl_triton.default, (z, ids, q, rw, True))
    torch.library.opcheck(ops.fused_linear_topk_kl_triton.default, (hidden, weight, None, ids, q, rw, None, False, 2))
    b = torch.randn(V, generator=g).to(DEVICE)
    torch.library.opcheck(ops.fused_linear_topk_kl_triton.default,
                          (hidden.detach(), weight.detach(), b, ids, q, rw, torch.rand(N).to(DEVICE), True, 2,
                           True, False, True, False))
    torch.library.opcheck(ops.topk_kl_backward_triton.default,
                          (torch.rand(N).to(DEVICE), z.detach(), ids, q, torch.logsumexp(z.detach(), -1), rw,
                           False, False))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_topk_kl_infinite_logits_follow_torch_logsumexp(monkeypatch):
    # a +inf logit makes the log-normaliser +inf (torch.logsumexp), not NaN; an all -inf row -inf
    monkeypatch.setattr(ts, "BLOCK_V_MAX", 16)
    z = torch.randn(3, 20)
    z[0, 4] = float("inf")
    z[2] = float("-inf")
    ids = torch.tensor([[1, 4], [0, 3], [5, 6]])
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    loss, lse = ts.topk_kl(z.to(DEVICE), ids.to(DEVICE), q.to(DEVICE), None, True)
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(z, -1))
    torch.testing.assert_close(loss.cpu(), topk_kl_reference(z, ids, q, reduction="none"), equal_nan=True)
