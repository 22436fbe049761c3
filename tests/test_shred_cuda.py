"""CUDA kernels of the shred family (csrc/cuda/shred_teacher.cu, csrc/cuda/shred_kl.cu) against the
CPU kernels (the same op on .cpu() copies) and, where the GPU arithmetic differs on purpose
(tensor-core GEMMs of fp16/bf16 inputs), against the pure-PyTorch reference.

Teacher inputs are small integers, so every logit is exact in fp32 whatever the summation order:
top-K ids (with many exact ties) and selection masks must then match exactly. Losses, log-normalisers
and gradients match to fp32 rounding (cuBLAS and MKL sum in different orders)."""
import pytest
import torch

import lethe  # loads lethe._C, which registers torch.ops.lethe.*
from lethe import _lib
from lethe.ops import _backend
from lethe.ops.shred_reference import (fused_linear_topk_kl_reference, teacher_topk_reference,
                                       topk_kl_reference)
from test_shred_kl import _ref_fused, _targets, _tols  # the CPU tests' helpers and tolerances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.lethe
IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)
SHRED_OPS = ("teacher_topk", "select_forget_positions", "demote_targets", "topk_kl",
             "topk_kl_backward", "fused_linear_topk_kl")


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 would round fp32 GEMM inputs to 10 mantissa bits: the fp32 tolerances assume true fp32
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


def _close(actual, expected, rtol, atol, equal_nan=False):
    assert actual.device.type == "cuda"
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), rtol=rtol, atol=atol,
                               equal_nan=equal_nan)


# ---------------------------------------------------------------------------------------------
# teacher_topk


def _check_teacher(hidden, weight, bias, labels, k, chunk, with_ref=True):
    """Run on CUDA copies of CPU inputs; ids exactly as the CPU kernel (and the reference)."""
    out = OPS.teacher_topk(*_cuda(hidden, weight, bias, labels), k, chunk)
    n = hidden.shape[0]
    ids, lp, llp = out
    assert all(t.device.type == "cuda" for t in out)
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and llp.dtype == torch.float32
    assert ids.shape == (n, k) and lp.shape == (n, k) and llp.shape == (n,)
    expected = [OPS.teacher_topk(hidden, weight, bias, labels, k, chunk)]
    if with_ref:
        expected.append(teacher_topk_reference(hidden, weight, bias, labels, k))
    for e_ids, e_lp, e_llp in expected:
        assert torch.equal(ids.cpu(), e_ids)
        _close(lp, e_lp, 1e-5, 1e-5, equal_nan=True)
        _close(llp, e_llp, 1e-5, 1e-5, equal_nan=True)
    assert (llp.cpu()[labels == IGNORE] == 0).all()
    return ids.cpu(), lp.cpu(), llp.cpu()


def _teacher_inputs(n, h, v, dtype, use_bias, seed):
    g = _gen(seed)
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    if n > 1:
        hidden[-1] = 0.0  # every logit of the row equal (bias aside): ids by ascending id
    weight = torch.randint(-3, 4, (v, h), generator=g).float()
    bias = torch.randint(-3, 4, (v,), generator=g).float() if use_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = IGNORE
    labels[0] = v - 1
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (small ints: exact)
    return cast(hidden), cast(weight), cast(bias), labels


TEACHER_SHAPES = [  # (N, H, V, K, chunk_size)
    (1, 19, 101, 5, 1),
    (37, 19, 101, 1, 5),  # K = 1, chunk does not divide N
    (37, 19, 101, 101, 8),  # K = V
    (37, 19, 101, 10, 100),  # chunk > N
    (33, 7, 2053, 50, 24),  # several vocabulary tiles
    (5, 7, 3001, 2500, 3),  # K not a power of two: padded sort
    (3, 5, 2049, 2049, 2),  # K = V
    (3, 5, 5003, 4200, 2),  # K > 4096: the sort runs in global memory instead of shared
]


@pytest.mark.parametrize("shape", TEACHER_SHAPES, ids=lambda s: "N%d_H%d_V%d_K%d_c%d" % s)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_topk(shape, use_bias, dtype):
    n, h, v, k, chunk = shape
    _check_teacher(*_teacher_inputs(n, h, v, dtype, use_bias, seed=n + v + k), k, chunk)


def test_teacher_topk_all_ignored_and_empty():
    hidden, weight, bias, _ = _teacher_inputs(12, 9, 61, torch.float32, True, seed=1)
    _, _, llp = _check_teacher(hidden, weight, bias, torch.full((12,), IGNORE), 4, 5)
    assert torch.equal(llp, torch.zeros(12))
    empty = torch.zeros(0, dtype=torch.long)
    ids, lp, llp = OPS.teacher_topk(*_cuda(hidden[:0], weight, bias, empty), 4, 5)  # N = 0
    assert ids.shape == (0, 4) and lp.shape == (0, 4) and llp.shape == (0,)
    assert ids.dtype == torch.int64 and ids.device.type == "cuda"


def test_teacher_topk_nan_logits():
    # a NaN bias entry: NaN sorts first (as torch.sort descending), the log-normaliser is NaN
    hidden, weight, bias, labels = _teacher_inputs(9, 7, 50, torch.float32, True, seed=2)
    bias[17] = float("nan")
    labels[1], labels[2] = 17, IGNORE
    ids, lp, _ = _check_teacher(hidden, weight, bias, labels, 6, 4, with_ref=False)
    assert (ids[:, 0] == 17).all() and torch.isnan(lp).all()


# ---------------------------------------------------------------------------------------------
# select_forget_positions


def _check_select(lp, labels, fraction, skip):
    out = OPS.select_forget_positions(*_cuda(lp, labels), fraction, skip)
    assert out.device.type == "cuda" and out.dtype == torch.bool and out.shape == lp.shape
    assert torch.equal(out.cpu(), OPS.select_forget_positions(lp, labels, fraction, skip)), \
        (fraction, skip)


@pytest.mark.parametrize("T", [1, 7, 300, 4096, 5000])  # T > 4096: sort in global memory
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_forget_positions(T, dtype):
    B = 4
    g = _gen(T)
    lp = -torch.randint(0, 4, (B, T), generator=g).float()  # four values: many ties
    lp[3] = -torch.rand(T, generator=g) * 10
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    labels[1] = IGNORE  # a fully padded row
    labels[2] = torch.arange(T) % 50  # every position valid
    lp = lp.to(dtype)
    for fraction in (0.0, 0.1, 0.5, 1.0):
        for skip in (0, 1, 3, 10**6):
            _check_select(lp, labels, fraction, skip)
    _check_select(lp[2:3], labels[2:3], 0.5, 1)  # B = 1
    _check_select(lp[:0], labels[:0], 0.5, 0)  # B = 0


# ---------------------------------------------------------------------------------------------
# demote_targets


def _demote_inputs(n, k, v, seed, dtype=torch.float32):
    g = _gen(seed)
    z = torch.randn(n, v, generator=g) * 2
    order = torch.sort(z, -1, descending=True, stable=True).indices
    ids = order[:, :k]
    lp = torch.gather(torch.log_softmax(z, -1), 1, ids)
    labels = torch.randint(0, v, (n,), generator=g)
    r = torch.arange(n)
    inside, outside = r % 3 == 0, r % 3 == 1
    labels[inside] = ids[inside, r[inside] % k]  # inside the top-K, at varying ranks
    if k < v:
        labels[outside] = order[outside, k]  # just outside the top-K
    labels[r % 7 == 2] = IGNORE
    forget = torch.rand(n, generator=g) < 0.6
    return ids, lp.to(dtype), labels, forget


def _check_demote(ids, lp, labels, forget, variant, top_p):
    q = OPS.demote_targets(*_cuda(ids, lp, labels, forget), variant, top_p)
    assert q.device.type == "cuda" and q.dtype == torch.float32 and q.shape == ids.shape
    # exp may differ by an ulp from the CPU's
    _close(q, OPS.demote_targets(ids, lp, labels, forget, variant, top_p), 1e-6, 1e-7)
    return q.cpu()


@pytest.mark.parametrize("variant", [0, 1], ids=["A", "B"])
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("k", [1, 8, 101])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_demote_targets(variant, top_p, k, dtype):
    q = _check_demote(*_demote_inputs(37, k, 257, seed=k + variant, dtype=dtype), variant, top_p)
    s = q.sum(-1)
    assert torch.all((s == 0) | ((s - 1).abs() < 1e-5))


def test_demote_targets_all_demoted_and_empty():
    ids, lp, labels, forget = _demote_inputs(20, 1, 50, seed=3)
    labels = ids[:, 0].clone()  # K = 1, the label is the only entry: forget rows become zeros
    q = _check_demote(ids, lp, labels, forget, 0, 0.5)
    assert not q[forget].any() and (q[~forget] == 1).all()
    ids, lp, labels, forget = _demote_inputs(20, 8, 257, seed=4)
    q = _check_demote(ids, lp, labels, forget, 1, 1.0)  # top-K mass < 1: all of it is nucleus
    assert not q[forget].any()
    q = OPS.demote_targets(*_cuda(ids[:0], lp[:0], labels[:0], forget[:0]), 0, 0.5)
    assert q.shape == (0, 8) and q.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# topk_kl / topk_kl_backward


KL_CASES = [  # (N, V, K, repeated ids, logit scale)
    (1, 7, 3, False, 3.0),
    (37, 101, 5, False, 3.0),
    (5, 101, 1, False, 3.0),
    (6, 13, 13, False, 3.0),  # K == V
    (9, 17, 8, True, 3.0),  # repeated ids
    (4, 4099, 64, False, 3.0),  # several vocabulary blocks and a tail
    (8, 300, 16, False, 1e4),  # huge logits
]


@pytest.mark.parametrize("N,V,K,repeat,scale", KL_CASES)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_topk_kl(N, V, K, repeat, scale, full, dtype, weighted):
    g = _gen(N * 1000 + V + K)
    if dtype in LOW and scale > 100:
        scale = 100.0  # as the CPU tests: low precision has no useful spacing at 1e4
    z = (torch.randn(N, V, generator=g) * scale).to(dtype)
    ids, q = _targets(N, V, K, g, repeat=repeat, zero_rows=(1,))
    w = torch.rand(N, generator=g) * 2 if weighted else None
    gl = torch.randn(N, generator=g)
    zc, idc, qc, wc, glc = _cuda(z, ids, q, w, gl)

    loss, lse = OPS.topk_kl(zc, idc, qc, wc, full)
    c_loss, c_lse = OPS.topk_kl(z, ids, q, w, full)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (N,)
    # the logits are the same values on both sides: fp32 tolerances whatever their dtype
    _close(loss, c_loss, 1e-4, 2e-2 if scale > 100 else 1e-5)
    _close(lse, c_lse, 1e-5, 1e-5 * max(1.0, scale))
    if N > 1:
        assert loss[1].item() == 0  # the all-zero q row

    grad = OPS.topk_kl_backward(glc, zc, idc, qc, lse, wc, full)
    assert grad.device.type == "cuda" and grad.dtype == dtype and grad.shape == (N, V)
    _close(grad, OPS.topk_kl_backward(gl, z, ids, q, c_lse, w, full), *_tols(dtype))


def test_topk_kl_empty():
    z, ids, q = _cuda(torch.randn(0, 9), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    loss, lse = OPS.topk_kl(z, ids, q, None, True)
    assert loss.shape == lse.shape == (0,) and loss.device.type == "cuda"
    grad = OPS.topk_kl_backward(torch.zeros(0, device="cuda"), z, ids, q, lse, None, True)
    assert grad.shape == (0, 9) and grad.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# fused_linear_topk_kl


def _fused_inputs(N, H, V, K, repeat, dtype, with_bias, seed, h_scale=1.0, w_scale=2.0):
    g = _gen(seed)
    hidden = (torch.randn(N, H, generator=g) * h_scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * w_scale).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    ids, q = _targets(N, V, K, g, repeat=repeat, zero_rows=(2,))
    return hidden, weight, bias, ids, q, torch.rand(N, generator=g) * 2, torch.randn(N, generator=g)


def _check_grad(actual, expected, rtol, atol):
    # atol relative to the gradient's largest magnitude (entries near 0 come from cancellation)
    _close(actual, expected, rtol, atol * max(1.0, expected.abs().max().item()))


FUSED_CASES = [  # (N, H, V, K, chunk_size, repeated ids)
    (1, 8, 11, 3, 1, False),  # chunk 1
    (37, 19, 101, 5, 8, False),  # chunk does not divide N
    (37, 19, 101, 5, 42, False),  # chunk = N + 5
    (10, 16, 50, 1, 3, False),  # K = 1, chunk 3
    (7, 5, 9, 9, 4, False),  # K == V
    (12, 6, 20, 7, 5, True),  # repeated ids
    (40, 33, 1003, 64, 16, False),  # several vocabulary tiles
]


@pytest.mark.parametrize("N,H,V,K,chunk,repeat", FUSED_CASES)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused(N, H, V, K, chunk, repeat, full, dtype, with_bias):
    inputs = _fused_inputs(N, H, V, K, repeat, dtype, with_bias, seed=N * 7 + H * 3 + V + K)
    hidden, weight, bias, ids, q, w, srs = inputs
    loss, gh, gw, gb = OPS.fused_linear_topk_kl(*_cuda(*inputs), full, chunk)
    assert all(t.device.type == "cuda" for t in (loss, gh, gw, gb))
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    assert gh.dtype == dtype and gh.shape == (N, H) and gw.dtype == dtype and gw.shape == (V, H)
    if with_bias:
        assert gb.dtype == dtype and gb.shape == (V,)
    else:
        assert gb.numel() == 0
    if dtype == torch.float32:
        expected = OPS.fused_linear_topk_kl(*inputs, full, chunk)
        _close(loss, expected[0], 1e-4, 1e-5)
        check = lambda a, e: _check_grad(a, e, 1e-4, 1e-5)  # noqa: E731
    else:
        # tensor-core logits (exact products, fp32 sums): the loss is close to the fp32 reference;
        # the gradient rows are rounded to the input dtype before the gradient GEMMs
        expected = _ref_fused(hidden, weight, bias, ids, q, w, srs, full)
        _close(loss, expected[0], 1e-3, 1e-4)
        tol = 5e-3 if dtype == torch.float16 else 2e-2
        check = lambda a, e: _close(a, e, tol, tol * e.abs().max().item())  # noqa: E731
    for a, e in zip((gh, gw, gb), expected[1:]):
        if e is not None and e.numel():  # no bias: None from the reference, [0] from the CPU op
            check(a, e)

    # forward only: the same loss, three empty gradients (hidden's dtype, as the fake kernel)
    loss2, *empties = OPS.fused_linear_topk_kl(*_cuda(hidden, weight, bias, ids, q, w), None,
                                               full, chunk)
    _close(loss2, loss, 1e-6, 1e-6)
    assert all(t.shape == (0,) and t.dtype == dtype for t in empties)


@pytest.mark.parametrize("full", [True, False])
def test_fused_large_logits(full):
    # logits ~ 1e4: only max subtraction keeps exp finite; tolerances of test_shred_kl.py's case
    hidden, weight, _, ids, q, _, srs = _fused_inputs(16, 8, 200, 10, False, torch.float32, False,
                                                      seed=12, h_scale=100.0, w_scale=30 * 8**0.5)
    loss, gh, gw, _ = OPS.fused_linear_topk_kl(*_cuda(hidden, weight, None, ids, q, None, srs),
                                               full, 5)
    c_loss, c_gh, c_gw, _ = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, srs,
                                                     full, 5)
    assert torch.isfinite(loss).all()
    _close(loss, c_loss, 1e-4, 2e-2)
    _close(gh, c_gh, 1e-3, 1e-3 * c_gh.abs().max().item())
    _close(gw, c_gw, 1e-3, 1e-3 * c_gw.abs().max().item())


@pytest.mark.parametrize("grad_mask", [(h, w, b) for h in (False, True) for w in (False, True)
                                       for b in (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [0, 13])
def test_fused_grad_mask(grad_mask, dtype, N):
    # a gradient not asked for is an empty [0] tensor of hidden's dtype; the rest are the full
    # call's (the same GEMMs in the same order: bit for bit)
    inputs = _cuda(*_fused_inputs(N, 10, 37, 5, False, dtype, True, seed=31 + N))
    full = OPS.fused_linear_topk_kl(*inputs, True, 4)
    out = OPS.fused_linear_topk_kl(*inputs, True, 4, *grad_mask)
    assert torch.equal(out[0], full[0])
    for want, got, expect in zip(grad_mask, out[1:], full[1:]):
        if want:
            assert got.dtype == expect.dtype and torch.equal(got, expect)
        else:
            assert got.shape == (0,) and got.dtype == dtype and got.device.type == "cuda"


def test_check_values_false_skips_the_target_checks():
    hidden, weight, _, ids, q, _, _ = _cuda(*_fused_inputs(6, 8, 20, 4, False, torch.float32, False, seed=32))
    q = q * 0.9  # rows sum to 0.9: rejected when checked
    ones = torch.ones(6, device="cuda")
    with pytest.raises(RuntimeError, match="target_probs rows must sum to 1"):
        OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, ones, True, 4)
    out = OPS.fused_linear_topk_kl(hidden, weight, None, ids, q, None, ones, True, 4, check_values=False)
    cpu = OPS.fused_linear_topk_kl(hidden.cpu(), weight.cpu(), None, ids.cpu(), q.cpu(), None, ones.cpu(),
                                   True, 4, check_values=False)
    for a, e in zip(out[:3], cpu[:3]):
        _check_grad(a.cpu(), e, 1e-4, 1e-5)
    z = hidden @ weight.t()
    lse = torch.logsumexp(z, -1)
    with pytest.raises(RuntimeError, match="target_probs rows must sum to 1"):
        OPS.topk_kl_backward(ones, z, ids, q, lse, None, True)
    _check_grad(OPS.topk_kl_backward(ones, z, ids, q, lse, None, True, False).cpu(),
                OPS.topk_kl_backward(ones.cpu(), z.cpu(), ids.cpu(), q.cpu(), lse.cpu(), None, True, False),
                1e-4, 1e-5)


def test_fused_empty():
    hidden, weight, bias = torch.randn(0, 6), torch.randn(10, 6), torch.randn(10)
    ids, q = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)
    for srs, b in ((torch.zeros(0), bias), (torch.zeros(0), None), (None, bias)):
        out = OPS.fused_linear_topk_kl(*_cuda(hidden, weight, b, ids, q, None, srs), True, 16)
        cpu = OPS.fused_linear_topk_kl(hidden, weight, b, ids, q, None, srs, True, 16)
        for a, e in zip(out, cpu):  # N = 0 with gradients: zero grad_weight / grad_bias
            assert a.device.type == "cuda" and a.shape == e.shape and a.dtype == e.dtype
            assert torch.equal(a.cpu(), e)


def _backward(out, gy):
    # loss.backward() on a scalar loss; per-position losses weighted by gy
    if out.dim():
        (out * gy).sum().backward()
    else:
        out.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["full", "topk"])
def test_public_api_native_autograd(reduction, normalize):
    hidden, weight, bias, ids, q, w, gy = _fused_inputs(23, 12, 77, 6, False, torch.float32, True,
                                                        seed=5)
    mask = torch.arange(23) % 4 != 0

    def fused(device, backend):
        ps = [t.to(device).clone().requires_grad_(True) for t in (hidden, weight, bias)]
        d = lambda t: t.to(device)  # noqa: E731
        if backend == "native":
            out = lethe.ops.fused_linear_topk_kl(ps[0], ps[1], d(ids), d(q), bias=ps[2], mask=d(mask),
                                                 weights=d(w), reduction=reduction,
                                                 normalize=normalize, chunk_size=5, backend="native")
        else:
            out = fused_linear_topk_kl_reference(ps[0], ps[1], ps[2], ids, q, mask, w, reduction,
                                                 normalize)
        _backward(out, d(gy))
        return out, [p.grad for p in ps]

    out, grads = fused("cuda", "native")
    r_out, r_grads = fused("cpu", "reference")
    _close(out, r_out, 1e-4, 1e-5)
    for a, e in zip(grads, r_grads):
        _check_grad(a, e, 1e-4, 1e-5)

    # topk_kl on given logits: the op's registered autograd calls topk_kl_backward on CUDA
    z = (hidden @ weight.t() + bias)
    zc = z.cuda().requires_grad_(True)
    out = lethe.ops.topk_kl(zc, ids.cuda(), q.cuda(), mask=mask.cuda(), weights=w.cuda(),
                            reduction=reduction, normalize=normalize, backend="native")
    _backward(out, gy.cuda())
    zr = z.clone().requires_grad_(True)
    r_out = topk_kl_reference(zr, ids, q, mask, w, reduction, normalize)
    _backward(r_out, gy)
    _close(out, r_out, 1e-4, 1e-5)
    _close(zc.grad, zr.grad, 1e-4, 1e-5)


# ---------------------------------------------------------------------------------------------
# opcheck, backend choice, bad input


def test_opcheck():
    hidden, weight, bias, ids, q, rw, _ = _cuda(*_fused_inputs(9, 8, 20, 4, False, torch.float32,
                                                               True, seed=7))
    labels = torch.randint(0, 20, (9,), device="cuda")
    labels[0] = IGNORE
    oc = torch.library.opcheck
    oc(OPS.teacher_topk.default, (hidden, weight, bias, labels, 4, 4))
    lp = torch.log_softmax(torch.randn(3, 5, device="cuda"), -1)
    lab = torch.randint(0, 20, (3, 5), device="cuda")
    lab[0, 0] = IGNORE
    oc(OPS.select_forget_positions.default, (lp, lab, 0.5, 1))
    t_ids, t_lp, _ = OPS.teacher_topk(hidden, weight, bias, labels, 4, 4)
    oc(OPS.demote_targets.default, (t_ids, t_lp, labels.clamp(min=0), labels > 3, 1, 0.5))
    logits = (hidden @ weight.t()).requires_grad_(True)
    for full in (True, False):
        oc(OPS.topk_kl.default, (logits, ids, q, rw, full))
        oc(OPS.topk_kl.default, (logits, ids, q, None, full))
        lse = torch.logsumexp(logits.detach(), -1)
        oc(OPS.topk_kl_backward.default, (torch.rand(9, device="cuda"), logits.detach(), ids, q,
                                          lse, rw, full))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    oc(OPS.fused_linear_topk_kl.default, (h, w, bias, ids, q, rw, None, True, 4))
    oc(OPS.fused_linear_topk_kl.default, (hidden, weight, None, ids, q, None,
                                          torch.rand(9, device="cuda"), False, 3))
    oc(OPS.fused_linear_topk_kl.default, (hidden, weight, bias, ids, q, rw, torch.rand(9, device="cuda"),
                                          True, 4, False, True, True, False))
    oc(OPS.fused_linear_topk_kl.default, (hidden, weight, bias, ids, q, None, torch.rand(9, device="cuda"),
                                          False, 2, True, False, False))


@pytest.mark.parametrize("op", SHRED_OPS)
def test_backend_auto_is_native(op):
    if not _lib.has_kernel(op, "CUDA"):
        pytest.skip(f"lethe was built without the CUDA kernel of {op}")
    assert _backend.resolve(op, torch.zeros(1, device="cuda"), "auto") == "native"


def test_bad_input():
    g = _gen(0)
    N, H, V, K = 4, 6, 10, 3
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V)
    ids, q = _targets(N, V, K, g)
    z = torch.randn(N, V, generator=g)
    hc, bc, idc, qc, zc = _cuda(h, b, ids, q, z)
    ones = torch.ones(N, device="cuda")
    lab = torch.tensor([0, 1, 9, IGNORE], device="cuda")
    # a CUDA hidden with a CPU weight: an error naming the argument, not a crash
    with pytest.raises(RuntimeError, match="weight"):
        OPS.fused_linear_topk_kl(hc, w, bc, idc, qc, None, ones, True, 2)
    with pytest.raises(RuntimeError, match="weight"):
        OPS.teacher_topk(hc, w, bc, lab, 2, 2)
    wc = w.cuda()
    errors = (RuntimeError, ValueError, IndexError)
    for v in (V, -1):
        bad = idc.clone()
        bad[2, 1] = v
        calls = [lambda: OPS.topk_kl(zc, bad, qc, None, True),
                 lambda: OPS.topk_kl_backward(ones, zc, bad, qc, ones, None, True),
                 lambda: OPS.fused_linear_topk_kl(hc, wc, bc, bad, qc, None, ones, False, 2)]
        for call in calls:
            with pytest.raises(errors, match="target_ids"):
                call()
                torch.cuda.synchronize()
    for v in (V, -5):
        bad = lab.clone()
        bad[2] = v
        with pytest.raises(errors, match="labels"):
            OPS.teacher_topk(hc, wc, bc, bad, 2, 2)
            torch.cuda.synchronize()
    torch.cuda.synchronize()  # the context survived the bad calls
