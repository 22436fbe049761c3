"""Demoted top-K KL on CPU: the C++ kernels topk_kl, topk_kl_backward and fused_linear_topk_kl
against the pure-PyTorch reference (with autograd for the gradients), on awkward shapes, reduced
precision and bad input."""
import pytest
import torch

import lethe  # noqa: F401  (loads the compiled library)
from lethe._lib import has_kernel
from lethe.ops.shred_reference import fused_linear_topk_kl_reference, topk_kl_reference

pytestmark = pytest.mark.skipif(
    not has_kernel("fused_linear_topk_kl", "CPU"), reason="compiled lethe CPU kernels not built"
)

OPS = torch.ops.lethe
LOW = (torch.float16, torch.bfloat16)


def _norm(full):
    return "full" if full else "topk"


def _targets(N, V, K, g, repeat=False, zero_rows=(), q_dtype=torch.float32):
    if repeat:
        ids = torch.randint(0, max(1, min(V, 3)), (N, K), generator=g)  # many repeated ids
    else:
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]) if N else (
            torch.zeros(0, K, dtype=torch.long))
    q = torch.rand(N, K, generator=g) + 0.01
    q[:, ::3] = 0.0  # some zero entries
    if K == 1:
        q[:] = 1.0
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    for r in zero_rows:
        if r < N:
            q[r] = 0.0
    return ids, q.to(q_dtype)


def _weights(kind, N, g):
    if kind is None:
        return None
    if kind == "zero":
        return torch.zeros(N)
    return torch.rand(N, generator=g) * 2


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _tols(dtype):
    return {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
            torch.bfloat16: (2e-2, 1e-2)}[dtype]


# ------------------------------------------------------------------------------------------------
# topk_kl / topk_kl_backward
# ------------------------------------------------------------------------------------------------

# (N, V, K, repeated ids, logit scale)
KL_CASES = [
    (1, 7, 3, False, 3.0),
    (37, 101, 5, False, 3.0),
    (5, 101, 1, False, 3.0),
    (6, 13, 13, False, 3.0),  # K == V
    (9, 17, 8, True, 3.0),  # repeated ids
    (4, 4099, 64, False, 3.0),  # several online-softmax blocks and a tail
    (40, 4099, 64, False, 3.0),  # rows split across threads
    (8, 300, 16, False, 1e4),  # huge logits
]


def _ref_topk(z, ids, q, w, full, gl):
    zf = z.float().clone().requires_grad_(True)
    loss = topk_kl_reference(zf, ids, q, weights=w, reduction="none", normalize=_norm(full))
    (loss * gl).sum().backward()
    zk = torch.gather(zf.detach(), 1, ids)
    lse = torch.logsumexp(zf.detach() if full else zk, dim=-1)
    return loss.detach(), lse, zf.grad


@pytest.mark.parametrize("N,V,K,repeat,scale", KL_CASES)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wkind", [None, "rand"])
def test_topk_kl_matches_reference(N, V, K, repeat, scale, full, dtype, wkind):
    g = torch.Generator().manual_seed(N * 1000 + V + K)
    if dtype in LOW and scale > 100:
        scale = 100.0  # fp16 cannot hold 1e4-scale logits with useful spacing
    z = (torch.randn(N, V, generator=g) * scale).to(dtype)
    ids, q = _targets(N, V, K, g, repeat=repeat, zero_rows=(1,))
    w = _weights(wkind, N, g)
    gl = torch.randn(N, generator=g)
    ref_loss, ref_lse, ref_grad = _ref_topk(z, ids, q, w, full, gl)

    loss, lse = OPS.topk_kl(z, ids, q, w, full)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == (N,) and lse.shape == (N,)
    big = scale > 100
    rtol, atol = (1e-4, 2e-2) if big else (1e-4, 1e-5)
    _close(loss, ref_loss, rtol, atol)
    _close(lse, ref_lse, 1e-5, 1e-5 * max(1.0, scale))
    if N > 1:
        assert (loss[1] == 0).item()  # all-zero q row

    grad = OPS.topk_kl_backward(gl, z, ids, q, lse, w, full)
    assert grad.dtype == dtype and grad.shape == z.shape
    rt, at = _tols(dtype)
    _close(grad, ref_grad, rt, at)


def test_topk_kl_backward_rows_without_weight_or_target_are_zero():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 50, generator=g)
    ids, q = _targets(4, 50, 6, g, zero_rows=(0,))
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    for full in (True, False):
        loss, lse = OPS.topk_kl(z, ids, q, w, full)
        assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
        grad = OPS.topk_kl_backward(torch.ones(4), z, ids, q, lse, w, full)
        assert (grad[:2] == 0).all() and grad[2].abs().sum() > 0
        if not full:  # top-K normalisation: zero away from the ids
            off = torch.ones_like(grad, dtype=torch.bool).scatter_(1, ids, False)
            assert (grad[off] == 0).all()


def test_topk_kl_low_precision_probs():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(11, 64, generator=g).bfloat16()
    ids, q = _targets(11, 64, 10, g)
    for qd in LOW:
        qq = q.to(qd)
        ref_loss, _, ref_grad = _ref_topk(z, ids, qq, None, True, torch.ones(11))
        loss, lse = OPS.topk_kl(z, ids, qq, None, True)
        _close(loss, ref_loss, 1e-4, 1e-5)
        _close(OPS.topk_kl_backward(torch.ones(11), z, ids, qq, lse, None, True), ref_grad, 2e-2,
               1e-2)


def test_topk_kl_empty():
    z = torch.randn(0, 9)
    ids = torch.zeros(0, 3, dtype=torch.long)
    q = torch.zeros(0, 3)
    loss, lse = OPS.topk_kl(z, ids, q, None, True)
    assert loss.shape == (0,) and lse.shape == (0,)
    grad = OPS.topk_kl_backward(torch.zeros(0), z, ids, q, lse, None, True)
    assert grad.shape == (0, 9)


# ------------------------------------------------------------------------------------------------
# fused_linear_topk_kl
# ------------------------------------------------------------------------------------------------

# (N, H, V, K, chunk_size, repeated ids)
FUSED_CASES = [
    (1, 8, 11, 3, 1, False),
    (37, 19, 101, 5, 8, False),  # chunk does not divide N
    (37, 19, 101, 5, 64, False),  # chunk > N
    (10, 16, 50, 1, 3, False),  # K == 1
    (7, 5, 9, 9, 4, False),  # K == V
    (12, 6, 20, 7, 5, True),  # repeated ids
    (5, 32, 1000, 64, 2, False),
    (64, 32, 4099, 64, 24, False),  # rows of a chunk split across threads
]


def _ref_fused(hidden, weight, bias, ids, q, w, srs, full):
    hf = hidden.float().clone().requires_grad_(True)
    wf = weight.float().clone().requires_grad_(True)
    bf = bias.float().clone().requires_grad_(True) if bias is not None else None
    loss = fused_linear_topk_kl_reference(hf, wf, bf, ids, q, weights=w, reduction="none",
                                          normalize=_norm(full))
    (loss * srs).sum().backward()
    return loss.detach(), hf.grad, wf.grad, bf.grad if bf is not None else None


def _check_grad(actual, expected, dtype):
    rt, at = _tols(dtype)
    scale = max(1.0, expected.abs().max().item())
    _close(actual, expected, rt, at * scale)


@pytest.mark.parametrize("N,H,V,K,chunk,repeat", FUSED_CASES)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_matches_reference(N, H, V, K, chunk, repeat, full, dtype, with_bias):
    g = torch.Generator().manual_seed(N * 7 + H * 3 + V + K)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    ids, q = _targets(N, V, K, g, repeat=repeat, zero_rows=(2,))
    w = _weights("rand", N, g)
    srs = torch.randn(N, generator=g)
    ref = _ref_fused(hidden, weight, bias, ids, q, w, srs, full)

    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, w, srs, full, chunk)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    assert gh.dtype == dtype and gh.shape == (N, H)
    assert gw.dtype == dtype and gw.shape == (V, H)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-3, 1e-4)
    _close(loss, ref[0], rtol, atol)
    _check_grad(gh, ref[1], dtype)
    _check_grad(gw, ref[2], dtype)
    if with_bias:
        assert gb.dtype == dtype and gb.shape == (V,)
        _check_grad(gb, ref[3], dtype)
    else:
        assert gb.numel() == 0

    # forward only: same loss, empty gradients
    loss2, gh2, gw2, gb2 = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, w, None, full,
                                                    chunk)
    _close(loss2, loss, 0, 0)
    assert gh2.numel() == 0 and gw2.numel() == 0 and gb2.numel() == 0


@pytest.mark.parametrize("full", [True, False])
def test_fused_zero_weights_and_rows(full):
    g = torch.Generator().manual_seed(11)
    N, H, V, K = 9, 12, 40, 6
    hidden, weight, bias = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), \
        torch.randn(V, generator=g)
    ids, q = _targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, torch.zeros(N), srs,
                                                full, 4)
    assert (loss == 0).all() and (gh == 0).all() and (gw == 0).all() and (gb == 0).all()
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, torch.zeros(N, K), None,
                                                srs, full, 4)
    assert (loss == 0).all() and (gh == 0).all() and (gw == 0).all() and (gb == 0).all()


def test_fused_large_logits():
    g = torch.Generator().manual_seed(12)
    N, H, V, K = 16, 8, 200, 10
    hidden = torch.randn(N, H, generator=g) * 100
    weight = torch.randn(V, H, generator=g) * 30  # logits ~ 1e4
    ids, q = _targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    for full in (True, False):
        ref = _ref_fused(hidden, weight, None, ids, q, None, srs, full)
        loss, gh, gw, _ = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, srs, full, 5)
        assert torch.isfinite(loss).all()
        _close(loss, ref[0], 1e-4, 2e-2)
        _close(gh, ref[1], 1e-3, 1e-3 * ref[1].abs().max().item())
        _close(gw, ref[2], 1e-3, 1e-3 * ref[2].abs().max().item())


def test_fused_empty():
    hidden, weight, bias = torch.randn(0, 6), torch.randn(10, 6), torch.randn(10)
    ids, q = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, None,
                                                torch.zeros(0), True, 16)
    assert loss.shape == (0,) and gh.shape == (0, 6)
    assert gw.shape == (10, 6) and (gw == 0).all() and gb.shape == (10,) and (gb == 0).all()
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, None, True, 16)
    assert loss.shape == (0,) and gh.numel() == 0 and gw.numel() == 0 and gb.numel() == 0


MASKS = [(h, w, b) for h in (False, True) for w in (False, True) for b in (False, True)]


@pytest.mark.parametrize("grad_mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [0, 1, 13])
def test_fused_grad_mask(grad_mask, dtype, N):
    # a gradient not asked for is an empty [0] tensor of hidden's dtype; the rest are the full
    # call's, bit for bit (same arithmetic, same order)
    g = torch.Generator().manual_seed(31 + N)
    H, V, K = 10, 37, 5
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    ids, q = _targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    full = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 4)
    out = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 4, *grad_mask)
    _close(out[0], full[0], 0, 0)
    for want, got, expect in zip(grad_mask, out[1:], full[1:]):
        if want:
            assert got.dtype == expect.dtype and got.shape == expect.shape
            _close(got, expect, 0, 0)
        else:
            assert got.shape == (0,) and got.dtype == dtype


def test_check_values_false_skips_the_target_checks():
    # for autograd's backward, whose forward checked the targets already
    g = torch.Generator().manual_seed(32)
    N, H, V, K = 6, 8, 20, 4
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ids, q = _targets(N, V, K, g)
    q = q * 0.9  # rows sum to 0.9: rejected when checked
    z = hidden @ weight.t()
    lse = torch.logsumexp(z, -1)
    with pytest.raises(RuntimeError, match="target_probs rows must sum to 1"):
        OPS.topk_kl_backward(torch.ones(N), z, ids, q, lse, None, True)
    with pytest.raises(RuntimeError, match="target_probs rows must sum to 1"):
        OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, torch.ones(N), True, 4)
    zr = z.clone().requires_grad_(True)
    ref_loss = topk_kl_reference(zr, ids, q, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), zr)
    _close(OPS.topk_kl_backward(torch.ones(N), z, ids, q, lse, None, True, False), ref_grad, 1e-4, 1e-5)
    loss, gh, gw, _ = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, torch.ones(N), True, 4,
                                               check_values=False)
    _close(loss, ref_loss, 1e-4, 1e-5)
    _close(gh, ref_grad @ weight, 1e-4, 1e-4)
    _close(gw, ref_grad.t() @ hidden, 1e-4, 1e-4)
    # the CPU kernels still check the ids' range (no sync here; out of range would read out of bounds)
    bad = ids.clone()
    bad[3, 1] = V
    with pytest.raises(RuntimeError, match="target_ids must be in"):
        OPS.topk_kl_backward(torch.ones(N), z, bad, q, lse, None, True, False)
    with pytest.raises(RuntimeError, match="target_ids must be in"):
        OPS.fused_linear_topk_kl(hidden, weight, None, bad, q, None, torch.ones(N), True, 4, check_values=False)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _base():
    g = torch.Generator().manual_seed(0)
    N, H, V, K = 4, 6, 10, 3
    ids, q = _targets(N, V, K, g)
    return dict(z=torch.randn(N, V, generator=g), ids=ids, q=q, h=torch.randn(N, H, generator=g),
                w=torch.randn(V, H, generator=g), b=torch.randn(V, generator=g), N=N, V=V, K=K)


def _bad_ids(x, v):
    ids = x["ids"].clone()
    ids[2, 1] = v
    return ids


def _bad_q(x, v):
    q = x["q"].clone()
    q[1, 0] = v
    return q


def _kl(x, **kw):
    a = dict(logits=x["z"], ids=x["ids"], q=x["q"], rw=None, full=True)
    a.update(kw)
    return lambda: OPS.topk_kl(a["logits"], a["ids"], a["q"], a["rw"], a["full"])


def _bwd(x, **kw):
    a = dict(gl=torch.ones(x["N"]), logits=x["z"], ids=x["ids"], q=x["q"], lse=torch.zeros(x["N"]),
             rw=None)
    a.update(kw)
    return lambda: OPS.topk_kl_backward(a["gl"], a["logits"], a["ids"], a["q"], a["lse"], a["rw"],
                                        True)


def _fused(x, **kw):
    a = dict(h=x["h"], w=x["w"], b=x["b"], ids=x["ids"], q=x["q"], rw=None,
             srs=torch.ones(x["N"]), chunk=2)
    a.update(kw)
    return lambda: OPS.fused_linear_topk_kl(a["h"], a["w"], a["b"], a["ids"], a["q"], a["rw"],
                                            a["srs"], False, a["chunk"])


BAD = [
    ("logits", lambda x: _kl(x, logits=x["z"].flatten())),
    ("logits", lambda x: _kl(x, logits=x["z"].long())),
    ("target_ids", lambda x: _kl(x, ids=x["ids"].int())),
    ("target_ids", lambda x: _kl(x, ids=x["ids"][:2])),
    ("target_ids", lambda x: _kl(x, ids=_bad_ids(x, x["V"]))),
    ("target_ids", lambda x: _kl(x, ids=_bad_ids(x, -1))),
    ("target_ids", lambda x: _kl(x, logits=x["z"][:, :2])),  # K > V
    ("target_probs", lambda x: _kl(x, q=x["q"][:, :2])),
    ("target_probs", lambda x: _kl(x, q=x["q"].long())),
    ("target_probs", lambda x: _kl(x, q=_bad_q(x, -0.1))),
    ("target_probs", lambda x: _kl(x, q=_bad_q(x, float("nan")))),
    ("target_probs", lambda x: _kl(x, q=x["q"] * 0.9)),
    ("row_weight", lambda x: _kl(x, rw=torch.ones(x["N"] + 1))),
    ("row_weight", lambda x: _kl(x, rw=torch.ones(x["N"], 1))),
    ("grad_loss", lambda x: _bwd(x, gl=torch.ones(x["N"] - 1))),
    ("lse", lambda x: _bwd(x, lse=torch.ones(x["N"], 2))),
    ("target_ids", lambda x: _bwd(x, ids=_bad_ids(x, 99))),
    ("target_probs", lambda x: _bwd(x, q=_bad_q(x, -1.0))),
    ("hidden", lambda x: _fused(x, h=x["h"].flatten())),
    ("hidden", lambda x: _fused(x, h=x["h"].int())),
    ("weight", lambda x: _fused(x, w=x["w"][:, :3])),
    ("weight", lambda x: _fused(x, w=x["w"].double())),
    ("bias", lambda x: _fused(x, b=x["b"][:4])),
    ("grad_row_scale", lambda x: _fused(x, srs=torch.ones(2))),
    ("row_weight", lambda x: _fused(x, rw=torch.ones(3))),
    ("chunk_size", lambda x: _fused(x, chunk=0)),
    ("target_ids", lambda x: _fused(x, ids=_bad_ids(x, x["V"]))),
    ("target_ids", lambda x: _fused(x, ids=x["ids"][:3])),
    ("target_probs", lambda x: _fused(x, q=x["q"] * 1.01)),
]


@pytest.mark.parametrize("name,make", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(name, make):
    with pytest.raises(RuntimeError, match=name):
        make(_base())()


@pytest.mark.parametrize("full", [True, False])
def test_topk_kl_masked_vocabulary(full):
    # -inf logits (a masked vocabulary), including whole leading online-softmax blocks
    g = torch.Generator().manual_seed(21)
    N, V, K = 6, 1000, 8
    z = torch.randn(N, V, generator=g) * 2
    z[:, :600] = float("-inf")
    z[:, 777] = float("-inf")
    ids = torch.stack([600 + torch.randperm(V - 600, generator=g)[:K] for _ in range(N)])
    ids[ids == 777] = 601
    q = torch.rand(N, K, generator=g)
    q = q / q.sum(-1, keepdim=True)
    gl = torch.rand(N, generator=g)
    ref_loss, ref_lse, ref_grad = _ref_topk(z, ids, q, None, full, gl)
    loss, lse = OPS.topk_kl(z, ids, q, None, full)
    _close(loss, ref_loss, 1e-4, 1e-5)
    _close(lse, ref_lse, 1e-5, 1e-5)
    _close(OPS.topk_kl_backward(gl, z, ids, q, lse, None, full), ref_grad, 1e-4, 1e-5)


def test_fused_mixed_dtypes():
    g = torch.Generator().manual_seed(31)
    N, H, V, K = 10, 12, 30, 4
    hidden = torch.randn(N, H, generator=g).bfloat16()
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = (torch.randn(V, generator=g) * 0.1).half()
    ids, q = _targets(N, V, K, g)
    srs = torch.rand(N, generator=g)
    ref = _ref_fused(hidden, weight, bias, ids, q, None, srs, True)
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 3)
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float32, torch.float16)
    _close(loss, ref[0], 1e-4, 1e-5)
    _check_grad(gh, ref[1], torch.bfloat16)
    _check_grad(gw, ref[2], torch.float32)
    _check_grad(gb, ref[3], torch.float16)
    _, gh, gw, gb = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, None, True, 3)
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16  # empties: hidden's dtype


def test_topk_kl_infinite_logits_follow_torch_logsumexp():
    # a +inf logit makes the log-normaliser +inf (torch.logsumexp), not NaN; an all -inf row -inf
    z = torch.randn(3, 20)
    z[0, 4] = float("inf")
    z[2] = float("-inf")
    ids = torch.tensor([[1, 4], [0, 3], [5, 6]])
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    loss, lse = OPS.topk_kl(z, ids, q, None, True)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    ref = topk_kl_reference(z, ids, q, reduction="none")
    torch.testing.assert_close(loss, ref, equal_nan=True)
