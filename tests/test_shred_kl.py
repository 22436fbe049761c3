"""Demoted top-K KL: topk_kl, topk_kl_backward and fused_linear_topk_kl on every backend (the
`backend` fixture: compiled CPU, Triton, compiled CUDA) against the pure-PyTorch reference and its
autograd, on awkward shapes, repeated ids, reduced precision, extreme logits and bad input (the
same message from every backend). Not bit for bit across backends: the summation orders differ."""
import os
import subprocess
import sys

import pytest
import torch

import backends as B
import lethe
from lethe.ops import shred as S
from lethe.ops.shred_reference import fused_linear_topk_kl_reference, topk_kl_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)


def _norm(full):
    return "full" if full else "topk"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def targets(N, V, K, g, repeat=False, zero_rows=(), q_dtype=torch.float32):
    """(ids [N, K], q [N, K]): distinct ids per row (or, with repeat, many repeated ones), q with
    some zero entries, normalised per row, zero_rows all zero."""
    if repeat:
        ids = torch.randint(0, max(1, min(V, 3)), (N, K), generator=g)
    else:
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]) if N else torch.zeros(0, K,
                                                                                                      dtype=torch.long)
    q = torch.rand(N, K, generator=g) + 0.01
    q[:, ::3] = 0.0
    if K == 1:
        q[:] = 1.0
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    for r in zero_rows:
        if r < N:
            q[r] = 0.0
    return ids, q.to(q_dtype)


def grad_tols(backend, dtype):
    """(rtol, atol) of the gradients: fp32 rounding; an fp16/bf16 output's own rounding (the
    interpreter truncates bf16 stores: another half ulp)."""
    return {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2)}[dtype]


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def ref_topk(z, ids, q, w, full, gl):
    zf = z.float().clone().requires_grad_(True)
    loss = topk_kl_reference(zf, ids, q, weights=w, reduction="none", normalize=_norm(full))
    (loss * gl).sum().backward()
    zk = torch.gather(zf.detach(), 1, ids)
    lse = torch.logsumexp(zf.detach() if full else zk, dim=-1)
    return loss.detach(), lse, zf.grad


# ------------------------------------------------------------------------------------------------
# topk_kl / topk_kl_backward
# ------------------------------------------------------------------------------------------------

KL_CASES = [  # (N, V, K, repeated ids, logit scale)
    (1, 7, 3, False, 3.0),
    (37, 101, 5, False, 3.0),
    (5, 101, 1, False, 3.0),
    (6, 13, 13, False, 3.0),  # K == V
    (9, 17, 8, True, 3.0),  # repeated ids
    (4, 4099, 64, False, 3.0),  # several online-softmax blocks and a tail
    (40, 4099, 64, False, 3.0),  # rows split across threads
    (8, 300, 16, False, 1e4),  # huge logits
    (3, 700, 300, True, 3.0),  # K > the Triton tile, long runs of repeated ids across tiles
    (2, 3001, 3001, False, 3.0),  # K == V, large
]


@pytest.mark.parametrize("wkind", [None, "rand"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("backend,case", B.grid(KL_CASES, where=lambda b, c: not b.interpreted or c[0] * c[1] <= 20_000,
                                                ids=lambda c: "N%d_V%d_K%d_r%d_s%g" % c))
def test_topk_kl_matches_reference(backend, case, full, dtype, wkind):
    N, V, K, repeat, scale = case
    g = _gen(N * 1000 + V + K)
    if dtype in LOW and scale > 100:
        scale = 100.0  # fp16 cannot hold 1e4-scale logits with useful spacing
    z = (torch.randn(N, V, generator=g) * scale).to(dtype)
    ids, q = targets(N, V, K, g, repeat=repeat, zero_rows=(1,))
    w = torch.rand(N, generator=g) * 2 if wkind else None
    gl = torch.randn(N, generator=g)
    ref_loss, ref_lse, ref_grad = ref_topk(z, ids, q, w, full, gl)

    loss, lse = backend("topk_kl", z, ids, q, w, full)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == (N,) and lse.shape == (N,)
    close(loss, ref_loss, 1e-5 if scale < 100 else 1e-4, 1e-5 if scale < 100 else 2e-2)
    close(lse, ref_lse, 1e-5, 1e-5 * max(1.0, scale))
    if N > 1:
        assert loss[1].item() == 0  # the all-zero q row

    grad = backend("topk_kl_backward", gl, z, ids, q, lse, w, full)
    assert grad.dtype == dtype and grad.shape == z.shape and grad.is_contiguous()
    close(grad, ref_grad, *grad_tols(backend, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 37, 37), (7, 37, 5), (7, 37, 1), (5, 64, 64), (3, 100, 7), (4, 40, 40)])
def test_topk_kl_triton_tiles(shape, full, dtype, monkeypatch):
    # several vocabulary and target tiles of the Triton kernel, runs of repeated ids across tiles
    from lethe.triton_kernels import shred_kl as ts

    monkeypatch.setattr(ts, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(ts, "BLOCK_K_MAX", 4)
    n, v, k = shape
    g = _gen(sum(shape))
    z = (torch.randn(n, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, v, (n, k), generator=g)
    if n and k > 1:
        ids[0, k - 1] = ids[0, 0]
    if n > 1 and k > 2:
        ids[1, :] = ids[1, 0]  # one id, k times
    q = torch.rand(n, k, generator=g) + 0.05
    q = q / q.sum(1, keepdim=True)
    if n > 4:
        q[4] = 0.0
    w = torch.rand(n, generator=g) * 2
    if n > 2:
        w[2] = 0.0
    gl = torch.randn(n, generator=g)
    ref_loss, ref_lse, ref_grad = ref_topk(z, ids, q, w, full, gl)
    loss, lse = B.TRITON("topk_kl", z, ids, q, w, full)
    close(loss, ref_loss, 1e-5, 1e-5)
    close(lse, ref_lse, 1e-5, 1e-5)
    close(B.TRITON("topk_kl_backward", gl, z, ids, q, lse, w, full), ref_grad, *grad_tols(B.TRITON, dtype))
    # the fused op on the same targets, with the driver's chunks and a bias
    h = torch.randn(n, 8, generator=g).to(dtype)
    wt = (torch.randn(v, 8, generator=g) / 8 ** 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    check_fused(B.TRITON, h, wt, b, ids, q, w, torch.randn(n, generator=g), full, 3)


def test_topk_kl_rows_without_weight_or_target_are_zero(backend):
    g = _gen(3)
    z = torch.randn(4, 50, generator=g)
    ids, q = targets(4, 50, 6, g, zero_rows=(0,))
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    for full in (True, False):
        loss, lse = backend("topk_kl", z, ids, q, w, full)
        assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
        grad = backend("topk_kl_backward", torch.ones(4), z, ids, q, lse, w, full)
        assert (grad[:2] == 0).all() and grad[2].abs().sum() > 0
        if not full:  # top-K normalisation: zero away from the ids
            off = torch.ones_like(grad, dtype=torch.bool).scatter_(1, ids, False)
            assert (grad[off] == 0).all()


def test_zero_coefficient_rows_have_zero_gradient(backend):
    # One rule on every backend and in both ops (lethe/shred.h softmax_part): a row whose coefficient
    # is zero (a zero weight or upstream gradient) gets an exactly zero gradient, even when its
    # target logits are all -inf, +inf or NaN (autograd through the reference would give NaN).
    N, V, K = 6, 20, 4
    g = _gen(5)
    z = torch.randn(N, V, generator=g)
    ids, q = targets(N, V, K, g)
    for r, v in ((0, float("-inf")), (1, float("inf")), (2, float("nan"))):
        z[r].scatter_(0, ids[r], torch.full((K,), v))
    w = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    gl = torch.ones(N)
    gl[3] = 0.0  # a zero upstream gradient
    h = torch.randn(N, 8, generator=g)
    wt = torch.randn(V, 8, generator=g)
    for full in (True, False):
        loss, lse = backend("topk_kl", z, ids, q, w, full)
        grad = backend("topk_kl_backward", gl, z, ids, q, lse, w, full)
        assert torch.equal(grad[[0, 1, 2, 3, 5]], torch.zeros(5, V)), full
        assert torch.isfinite(grad[4]).all() and grad[4].abs().sum() > 0
        _, gh, gw, _ = backend("fused_linear_topk_kl", h, wt, None, ids, q, w, gl * torch.tensor([0, 0, 0, 0, 1.0, 1]),
                               full, 4)
        _, gh4, gw4, _ = backend("fused_linear_topk_kl", h[4:5], wt, None, ids[4:5], q[4:5], w[4:5], torch.ones(1),
                                 full, 4)
        assert torch.equal(gh[[0, 1, 2, 3, 5]], torch.zeros(5, 8))
        close(gh[4:5], gh4, 1e-4, 1e-5)
        close(gw, gw4, 1e-4, 1e-5)


def test_topk_kl_low_precision_probs(backend):
    g = _gen(5)
    z = torch.randn(11, 64, generator=g).bfloat16()
    ids, q = targets(11, 64, 10, g)
    for qd in LOW:
        qq = q.to(qd)
        for full in (True, False):
            ref_loss, _, ref_grad = ref_topk(z, ids, qq.float(), None, full, torch.ones(11))
            loss, lse = backend("topk_kl", z, ids, qq, None, full)
            close(loss, ref_loss, 1e-4, 1e-5)
            close(backend("topk_kl_backward", torch.ones(11), z, ids, qq, lse, None, full), ref_grad,
                  *grad_tols(backend, torch.bfloat16))


@pytest.mark.parametrize("full", [True, False])
def test_topk_kl_masked_vocabulary(backend, full):
    # -inf logits (a masked vocabulary), including whole leading online-softmax blocks
    g = _gen(21)
    N, V, K = 6, 1000, 8
    z = torch.randn(N, V, generator=g) * 2
    z[:, :600] = float("-inf")
    z[:, 777] = float("-inf")
    ids = torch.stack([600 + torch.randperm(V - 600, generator=g)[:K] for _ in range(N)])
    ids[ids == 777] = 601
    q = torch.rand(N, K, generator=g)
    q = q / q.sum(-1, keepdim=True)
    gl = torch.rand(N, generator=g)
    ref_loss, ref_lse, ref_grad = ref_topk(z, ids, q, None, full, gl)
    loss, lse = backend("topk_kl", z, ids, q, None, full)
    close(loss, ref_loss, 1e-4, 1e-5)
    close(lse, ref_lse, 1e-5, 1e-5)
    close(backend("topk_kl_backward", gl, z, ids, q, lse, None, full), ref_grad, 1e-4, 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_topk_kl_infinite_logits_follow_torch_logsumexp(backend):
    # a +inf logit makes the log-normaliser +inf (torch.logsumexp), not NaN; an all -inf row -inf
    z = torch.randn(3, 20)
    z[0, 4] = float("inf")
    z[2] = float("-inf")
    ids = torch.tensor([[1, 4], [0, 3], [5, 6]])
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    loss, lse = backend("topk_kl", z, ids, q, None, True)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(loss, topk_kl_reference(z, ids, q, reduction="none"), equal_nan=True)


def test_topk_kl_empty(backend):
    z, ids, q = torch.randn(0, 9), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    loss, lse = backend("topk_kl", z, ids, q, None, True)
    assert loss.shape == (0,) and lse.shape == (0,) and loss.dtype == torch.float32
    assert backend("topk_kl_backward", torch.zeros(0), z, ids, q, lse, None, True).shape == (0, 9)


# ------------------------------------------------------------------------------------------------
# fused_linear_topk_kl
# ------------------------------------------------------------------------------------------------

def ref_fused(hidden, weight, bias, ids, q, w, srs, full):
    hf = hidden.float().clone().requires_grad_(True)
    wf = weight.float().clone().requires_grad_(True)
    bf = bias.float().clone().requires_grad_(True) if bias is not None else None
    loss = fused_linear_topk_kl_reference(hf, wf, bf, ids, q, weights=w, reduction="none", normalize=_norm(full))
    (loss * srs).sum().backward()
    return loss.detach(), hf.grad, wf.grad, bf.grad if bf is not None else None


def check_fused(backend, hidden, weight, bias, ids, q, w, srs, full, chunk, dtype=None):
    """The loss and the gradients of hidden, weight and bias (in their dtypes) against the
    reference's autograd; then the forward alone: the same loss, empty gradients."""
    dtype = dtype or hidden.dtype
    n, h = hidden.shape
    v = weight.shape[0]
    ref = ref_fused(hidden, weight, bias, ids, q, w, srs, full)
    loss, gh, gw, gb = backend("fused_linear_topk_kl", hidden, weight, bias, ids, q, w, srs, full, chunk)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert gh.dtype == hidden.dtype and gh.shape == (n, h)
    assert gw.dtype == weight.dtype and gw.shape == (v, h)
    low = hidden.dtype in LOW or weight.dtype in LOW
    close(loss, ref[0], 1e-3 if low else 1e-4, 1e-4 if low else 1e-5)
    rt, at = grad_tols(backend, dtype)
    if backend is B.CUDA and low:  # the gradient rows are rounded to the input dtype for the GEMMs
        rt, at = (5e-3, 5e-3) if torch.float16 in (hidden.dtype, weight.dtype) else (2e-2, 2e-2)
    for got, expect in zip((gh, gw), ref[1:3]):
        close(got, expect, rt, at * max(1.0, expect.abs().max().item()))
    if bias is not None:
        assert gb.dtype == bias.dtype and gb.shape == (v,)
        close(gb, ref[3], rt, at * max(1.0, ref[3].abs().max().item()))
    else:
        assert gb.numel() == 0
    loss2, *empties = backend("fused_linear_topk_kl", hidden, weight, bias, ids, q, w, None, full, chunk)
    close(loss2, loss, 1e-6, 1e-6)
    assert all(t.shape == (0,) and t.dtype == hidden.dtype for t in empties)
    return loss, gh, gw, gb


FUSED_CASES = [  # (N, H, V, K, chunk_size, repeated ids)
    (1, 8, 11, 3, 1, False),  # chunk 1
    (37, 19, 101, 5, 8, False),  # chunk does not divide N
    (37, 19, 101, 5, 64, False),  # chunk > N
    (10, 16, 50, 1, 3, False),  # K == 1
    (7, 5, 9, 9, 4, False),  # K == V
    (12, 6, 20, 7, 5, True),  # repeated ids
    (5, 32, 1000, 64, 2, False),
    (64, 32, 4099, 64, 24, False),  # rows of a chunk split across threads, two weight blocks
    (40, 33, 1003, 64, 16, False),  # several vocabulary tiles
    (6, 8, 300, 200, 4, True),  # K > the Triton tile, repeated ids
]


def fused_inputs(N, H, V, K, repeat, dtype, with_bias, seed, h_scale=1.0, w_scale=2.0):
    g = _gen(seed)
    hidden = (torch.randn(N, H, generator=g) * h_scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * w_scale).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    ids, q = targets(N, V, K, g, repeat=repeat, zero_rows=(2,))
    return hidden, weight, bias, ids, q, torch.rand(N, generator=g) * 2, torch.randn(N, generator=g)


def _fused_fits(backend, case):  # the interpreter runs one program (row) at a time
    N, H, V = case[:3]
    return not backend.interpreted or N * V <= 20_000


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("backend,case", B.grid(FUSED_CASES, where=_fused_fits, ids=lambda c: "N%d_H%d_V%d_K%d_c%d_r%d" % c))
def test_fused_matches_reference(backend, case, full, dtype, with_bias):
    N, H, V, K, chunk, repeat = case
    hidden, weight, bias, ids, q, w, srs = fused_inputs(N, H, V, K, repeat, dtype, with_bias, seed=N * 7 + H * 3 + V + K)
    check_fused(backend, hidden, weight, bias, ids, q, w, srs, full, chunk)


@pytest.mark.parametrize("full", [True, False])
def test_fused_variants(backend, full):
    g = _gen(1)
    for dtype, has_bias, weights, bias_dtype in [(torch.float32, True, None, None), (torch.float16, False, "w", None),
                                                 (torch.float16, True, "w", torch.float32)]:
        hidden, weight, bias, ids, q, w, srs = fused_inputs(6, 8, 37, 5, False, dtype, has_bias, seed=4)
        if bias_dtype:
            bias = bias.to(bias_dtype)
        check_fused(backend, hidden, weight, bias, ids, q, w if weights else None, srs, full, 4)
    del g


@pytest.mark.parametrize("full", [True, False])
def test_fused_zero_weights_and_rows(backend, full):
    g = _gen(11)
    N, H, V, K = 9, 12, 40, 6
    hidden, weight, bias = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    ids, q = targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    for w, qq in ((torch.zeros(N), q), (None, torch.zeros(N, K))):
        loss, gh, gw, gb = backend("fused_linear_topk_kl", hidden, weight, bias, ids, qq, w, srs, full, 4)
        assert (loss == 0).all() and (gh == 0).all() and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("full", [True, False])
def test_fused_large_logits(backend, full):
    # logits ~ 1e4: only max subtraction keeps exp finite
    hidden, weight, _, ids, q, _, srs = fused_inputs(16, 8, 200, 10, False, torch.float32, False, seed=12,
                                                     h_scale=100.0, w_scale=30 * 8 ** 0.5)
    ref = ref_fused(hidden, weight, None, ids, q, None, srs, full)
    loss, gh, gw, _ = backend("fused_linear_topk_kl", hidden, weight, None, ids, q, None, srs, full, 5)
    assert torch.isfinite(loss).all()
    close(loss, ref[0], 1e-4, 2e-2)
    close(gh, ref[1], 1e-3, 1e-3 * ref[1].abs().max().item())
    close(gw, ref[2], 1e-3, 1e-3 * ref[2].abs().max().item())


def test_fused_mixed_dtypes(backend):
    # bf16 hidden, fp32 weight, fp16 bias; and an fp16 weight of two blocks with an fp32 hidden
    # (converted block by block, never whole: the CPU, CUDA and Triton drivers alike)
    g = _gen(31)
    N, H, V, K = 10, 12, 30, 4
    hidden = torch.randn(N, H, generator=g).bfloat16()
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = (torch.randn(V, generator=g) * 0.1).half()
    ids, q = targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    _, gh, gw, gb = check_fused(backend, hidden, weight, bias, ids, q, None, srs, True, 3, dtype=torch.bfloat16)
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float32, torch.float16)
    _, gh, gw, gb = backend("fused_linear_topk_kl", hidden, weight, None, ids, q, None, None, True, 3)
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16  # empties: hidden's dtype
    V = 4099
    hidden = torch.randn(N, H, generator=g)
    weight = (torch.randn(V, H, generator=g) * 0.3).half()
    ids, q = targets(N, V, K, g)
    check_fused(backend, hidden, weight, None, ids, q, None, srs, False, 4, dtype=torch.float16)


def test_fused_empty(backend):
    hidden, weight, bias = torch.randn(0, 6), torch.randn(10, 6), torch.randn(10)
    ids, q = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)
    loss, gh, gw, gb = backend("fused_linear_topk_kl", hidden, weight, bias, ids, q, None, torch.zeros(0), True, 16)
    assert loss.shape == (0,) and gh.shape == (0, 6)
    assert gw.shape == (10, 6) and (gw == 0).all() and gb.shape == (10,) and (gb == 0).all()
    loss, gh, gw, gb = backend("fused_linear_topk_kl", hidden, weight, None, ids, q, None, None, True, 16)
    assert loss.shape == (0,) and gh.numel() == 0 and gw.numel() == 0 and gb.numel() == 0
    loss, gh, gw, gb = backend("fused_linear_topk_kl", hidden.half(), weight, None, ids, q, None, torch.zeros(0), False, 4)
    assert gh.shape == (0, 6) and gh.dtype == torch.float16 and gb.shape == (0,) and gb.dtype == torch.float16


MASKS = [(h, w, b) for h in (False, True) for w in (False, True) for b in (False, True)]


@pytest.mark.parametrize("grad_mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [0, 1, 13])
def test_fused_grad_mask(backend, grad_mask, dtype, N):
    # a gradient not asked for is an empty [0] tensor of hidden's dtype; the rest are the full
    # call's, bit for bit (same arithmetic, same order)
    g = _gen(31 + N)
    H, V, K = 10, 37, 5
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    ids, q = targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    full = backend("fused_linear_topk_kl", hidden, weight, bias, ids, q, None, srs, True, 4)
    out = backend("fused_linear_topk_kl", hidden, weight, bias, ids, q, None, srs, True, 4, *grad_mask)
    assert torch.equal(out[0], full[0])
    for want, got, expect in zip(grad_mask, out[1:], full[1:]):
        if want:
            assert got.dtype == expect.dtype and got.shape == expect.shape and torch.equal(got, expect)
        else:
            assert got.shape == (0,) and got.dtype == dtype


def test_check_values_false_skips_the_target_checks(backend):
    # for autograd's backward, whose forward checked the targets already
    g = _gen(32)
    N, H, V, K = 6, 8, 20, 4
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ids, q = targets(N, V, K, g)
    q = q * 0.9  # rows sum to 0.9: rejected when checked
    z = hidden @ weight.t()
    lse = torch.logsumexp(z, -1)
    if backend is not B.CUDA:  # the CUDA kernels report bad values later (test_cuda_value_errors)
        with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
            backend("topk_kl_backward", torch.ones(N), z, ids, q, lse, None, True)
        with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
            backend("fused_linear_topk_kl", hidden, weight, None, ids, q, None, torch.ones(N), True, 4)
    zr = z.clone().requires_grad_(True)
    ref_loss = topk_kl_reference(zr, ids, q, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), zr)
    close(backend("topk_kl_backward", torch.ones(N), z, ids, q, lse, None, True, False), ref_grad, 1e-4, 1e-5)
    loss, gh, gw, _ = backend("fused_linear_topk_kl", hidden, weight, None, ids, q, None, torch.ones(N), True, 4,
                              check_values=False)
    close(loss, ref_loss, 1e-4, 1e-5)
    close(gh, ref_grad @ weight, 1e-4, 1e-4)
    close(gw, ref_grad.t() @ hidden, 1e-4, 1e-4)
    # the CPU kernels still check the ids' range (no sync there); the others never read out of bounds
    bad = ids.clone()
    bad[3, 1] = V
    if backend is B.CPU:
        with pytest.raises(ValueError, match="target_ids must be in"):
            backend("topk_kl_backward", torch.ones(N), z, bad, q, lse, None, True, False)
        with pytest.raises(ValueError, match="target_ids must be in"):
            backend("fused_linear_topk_kl", hidden, weight, None, bad, q, None, torch.ones(N), True, 4, check_values=False)
    else:
        grad = backend("topk_kl_backward", torch.ones(N), z, bad, q, lse, None, True, False)
        close(grad[[0, 1, 2, 4, 5]], ref_grad[[0, 1, 2, 4, 5]], 1e-4, 1e-5)  # the other rows are untouched
        out = backend("fused_linear_topk_kl", hidden, weight, None, bad, q, None, torch.ones(N), True, 4,
                      check_values=False)
        assert all(torch.isfinite(t).all() for t in out[:3])


# ------------------------------------------------------------------------------------------------
# opcheck and bad input (the same message from every backend and the op's Python check)
# ------------------------------------------------------------------------------------------------

def test_opcheck(backend):
    hidden, weight, bias, ids, q, rw, _ = fused_inputs(9, 8, 20, 4, False, torch.float32, True, seed=7)
    hidden, weight, bias, ids, q, rw = backend.to((hidden, weight, bias, ids, q, rw))
    oc = torch.library.opcheck
    logits = (hidden @ weight.t()).requires_grad_(True)
    for full in (True, False):
        oc(backend.op("topk_kl").default, (logits, ids, q, rw, full))
        oc(backend.op("topk_kl").default, (logits, ids, q, None, full))
        lse = torch.logsumexp(logits.detach(), -1)
        oc(backend.op("topk_kl_backward").default, (backend.to(torch.rand(9)), logits.detach(), ids, q, lse, rw, full))
        oc(backend.op("topk_kl_backward").default,
           (backend.to(torch.rand(9)), logits.detach(), ids, q, lse, rw, full, False))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = backend.op("fused_linear_topk_kl").default
    oc(fused, (h, w, bias, ids, q, rw, None, True, 4))
    oc(fused, (hidden, weight, None, ids, q, None, backend.to(torch.rand(9)), False, 3))
    oc(fused, (hidden, weight, bias, ids, q, rw, backend.to(torch.rand(9)), True, 4, False, True, True, False))
    oc(fused, (hidden, weight, bias, ids, q, None, backend.to(torch.rand(9)), False, 2, True, False, False))


def _base():
    g = _gen(0)
    N, H, V, K = 4, 6, 10, 3
    ids, q = targets(N, V, K, g)
    return dict(z=torch.randn(N, V, generator=g), ids=ids, q=q, h=torch.randn(N, H, generator=g),
                w=torch.randn(V, H, generator=g), b=torch.randn(V, generator=g), N=N, V=V, K=K)


def _set(t, index, v):
    t = t.clone()
    t[index] = v
    return t


def _kl(x, **kw):
    a = dict(logits=x["z"], ids=x["ids"], q=x["q"], rw=None, full=True)
    a.update(kw)
    return "topk_kl", S.check_topk_kl, (a["logits"], a["ids"], a["q"], a["rw"], a["full"])


def _bwd(x, **kw):
    a = dict(gl=torch.ones(x["N"]), logits=x["z"], ids=x["ids"], q=x["q"], lse=torch.zeros(x["N"]), rw=None)
    a.update(kw)
    return "topk_kl_backward", S.check_topk_kl_backward, (a["gl"], a["logits"], a["ids"], a["q"], a["lse"], a["rw"],
                                                          True)


def _fused(x, **kw):
    a = dict(h=x["h"], w=x["w"], b=x["b"], ids=x["ids"], q=x["q"], rw=None, srs=torch.ones(x["N"]), chunk=2)
    a.update(kw)
    return "fused_linear_topk_kl", S.check_fused_linear_topk_kl, (a["h"], a["w"], a["b"], a["ids"], a["q"], a["rw"],
                                                                  a["srs"], False, a["chunk"])


BAD = [  # (make, exception, message); values marks the checks of values held in tensors
    (lambda x: _kl(x, logits=x["z"].flatten()), ValueError, r"logits must be 2-D \[N, V\], got shape \[40\]"),
    (lambda x: _kl(x, logits=x["z"].long()), TypeError, "logits must be float32, float16 or bfloat16, got torch.int64"),
    (lambda x: _kl(x, logits=x["z"][:, :0]), ValueError, r"logits must have at least one column \(V >= 1\)"),
    (lambda x: _kl(x, ids=x["ids"].int()), TypeError, "target_ids must be int64, got torch.int32"),
    (lambda x: _kl(x, ids=x["ids"][:2]), ValueError, r"target_ids must have shape \[N, K\] with N = 4, got \[2, 3\]"),
    (lambda x: _kl(x, logits=x["z"][:, :2]), ValueError, "target_ids has K = 3 columns, more than the vocabulary size V = 2"),
    (lambda x: _kl(x, q=x["q"][:, :2]), ValueError, r"target_probs must have the shape of target_ids \[4, 3\], got \[4, 2\]"),
    (lambda x: _kl(x, q=x["q"].long()), TypeError, "target_probs must be float32"),
    (lambda x: _kl(x, rw=torch.ones(x["N"] + 1)), ValueError, r"row_weight must have shape \[N\] = \[4\], got \[5\]"),
    (lambda x: _kl(x, rw=torch.ones(x["N"], 1)), ValueError, r"row_weight must have shape \[N\] = \[4\], got \[4, 1\]"),
    (lambda x: _kl(x, rw=torch.ones(x["N"], dtype=torch.long)), TypeError, "row_weight must be float32"),
    (lambda x: _bwd(x, gl=torch.ones(x["N"] - 1)), ValueError, r"grad_loss must have shape \[N\] = \[4\], got \[3\]"),
    (lambda x: _bwd(x, lse=torch.ones(x["N"], 2)), ValueError, r"lse must have shape \[N\] = \[4\]"),
    (lambda x: _fused(x, h=x["h"].flatten()), ValueError, r"hidden must be 2-D \[N, H\], got shape \[24\]"),
    (lambda x: _fused(x, h=x["h"].int()), TypeError, "hidden must be float32, float16 or bfloat16, got torch.int32"),
    (lambda x: _fused(x, w=x["w"][:, :3]), ValueError, r"weight must have shape \[V, H\] with H = 6 \(hidden's last dimension\), got \[10, 3\]"),
    (lambda x: _fused(x, w=x["w"].double()), TypeError, "weight must be float32, float16 or bfloat16, got torch.float64"),
    (lambda x: _fused(x, b=x["b"][:4]), ValueError, r"bias must have shape \[V\] = \[10\], got \[4\]"),
    (lambda x: _fused(x, srs=torch.ones(2)), ValueError, r"grad_row_scale must have shape \[N\] = \[4\], got \[2\]"),
    (lambda x: _fused(x, rw=torch.ones(3)), ValueError, r"row_weight must have shape \[N\] = \[4\], got \[3\]"),
    (lambda x: _fused(x, chunk=0), ValueError, "chunk_size must be >= 1, got 0"),
    (lambda x: _fused(x, ids=x["ids"][:3]), ValueError, r"target_ids must have shape \[N, K\] with N = 4, got \[3, 3\]"),
]
BAD_VALUES = [
    (lambda x: _kl(x, ids=_set(x["ids"], (2, 1), x["V"])), r"target_ids must be in \[0, V\) = \[0, 10\), got 10 in row 2"),
    (lambda x: _kl(x, ids=_set(x["ids"], (2, 1), -1)), r"target_ids must be in \[0, V\) = \[0, 10\), got -1 in row 2"),
    (lambda x: _kl(x, q=_set(x["q"], (1, 0), -0.1)), "target_probs must be non-negative, got -0.1 in row 1"),
    (lambda x: _kl(x, q=_set(x["q"], (1, 0), float("nan"))), "target_probs must be non-negative, got nan in row 1"),
    (lambda x: _kl(x, q=x["q"] * 0.9), r"target_probs rows must sum to 1 \(within 0.001\) or be all zero, row 0 sums to 0.9"),
    (lambda x: _kl(x, q=(x["q"] * 1.01).bfloat16()), r"target_probs rows must sum to 1 \(within 0.0078125\)"),
    (lambda x: _bwd(x, ids=_set(x["ids"], (2, 1), 99)), "target_ids must be in .* got 99 in row 2"),
    (lambda x: _bwd(x, q=_set(x["q"], (1, 0), -1.0)), "target_probs must be non-negative, got -1 in row 1"),
    (lambda x: _fused(x, ids=_set(x["ids"], (2, 1), x["V"])), "target_ids must be in .* got 10 in row 2"),
    (lambda x: _fused(x, q=x["q"] * 1.01), "target_probs rows must sum to 1 .* row 0 sums to 1.01"),
]


def _everywhere(name, check, args, cuda=True):
    calls = [lambda: B.CPU(name, *args), lambda: B.TRITON(name, *args), lambda: check(*args, values=True)]
    if B.GPU and cuda:
        calls.append(lambda: B.CUDA(name, *args))
    return calls


@pytest.mark.parametrize("make,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(make, exc, match):
    name, check, args = make(_base())
    B.assert_same_error(_everywhere(name, check, args), exc, match)


@pytest.mark.parametrize("make,match", BAD_VALUES, ids=[str(i) for i in range(len(BAD_VALUES))])
def test_bad_values(make, match):
    # the CUDA kernels find these without a host sync and raise them later: test_cuda_value_errors
    name, check, args = make(_base())
    B.assert_same_error(_everywhere(name, check, args, cuda=False), ValueError, match)
    S.check_topk_kl(*_kl(_base(), q=_base()["q"] * (1 + 5e-4))[2], values=True)  # within 1e-3


@pytest.mark.parametrize("backend", B.params((B.CUDA,)))
def test_cuda_value_errors(backend):
    # Bad values found by a CUDA kernel: the call returns (its result is not to be used), nothing
    # is read out of bounds, and the error is raised by the next lethe call on the device, or by
    # lethe.ops.check_errors(), with the message of the CPU kernels and where it comes from.
    x = _base()
    bad = _set(x["ids"], (2, 1), x["V"])
    B.CUDA("topk_kl", x["z"], bad, x["q"], None, True)
    with pytest.raises(ValueError, match=r"target_ids must be in \[0, V\) = \[0, 10\), got 10 in row 2 \(found by a "
                                         r"CUDA kernel of an earlier lethe call"):
        lethe.ops.check_errors()
    lethe.ops.check_errors()  # raised once
    B.CUDA("fused_linear_topk_kl", x["h"], x["w"], None, x["ids"], x["q"] * 1.01, None, None, True, 2)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
        B.CUDA("topk_kl", x["z"], x["ids"], x["q"], None, True)  # the next call raises
    labels = torch.tensor([0, 1, 10, -100])
    B.CUDA("teacher_topk", x["h"], x["w"], None, labels, 2, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, V\) = \[0, 10\) or -100, got 10 at index 2"):
        lethe.ops.check_errors()
    # LETHE_SYNC_CHECKS=1: every CUDA op waits for its kernels and raises at the call itself
    code = ("import torch, lethe\n"
            "z = torch.randn(4, 10, device='cuda'); ids = torch.tensor([[0, 1], [2, 3], [4, 10], [5, 6]], device='cuda')\n"
            "q = torch.full((4, 2), 0.5, device='cuda')\n"
            "try:\n    torch.ops.lethe.topk_kl(z, ids, q, None, True)\nexcept ValueError as e:\n    print('raised:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, LETHE_SYNC_CHECKS="1"))
    assert "raised: target_ids must be in [0, V) = [0, 10), got 10 in row 2" in r.stdout, r.stdout + r.stderr
    assert "earlier" not in r.stdout
