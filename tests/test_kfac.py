"""The kfac family's ops (K-FAC / EK-FAC curvature for K-FADE): the compiled CPU and CUDA kernels
against the pure-PyTorch definitions on awkward shapes and dtypes, the damped inversion's
accuracy and its fp64 retry, preconditioning against a dense solve, the factors against the
explicit per-token Fisher and curvlinops' KFACLinearOperator, opcheck, and bad input."""
import copy
import math
import os

import pytest
import torch

import backends
import gloo
from lethe.ops import kfac as K
from lethe.ops import kfac_reference as ref

# No Triton twin (the ops are GEMM / LAPACK bound): the compiled CPU and CUDA kernels.
KB = backends.params((backends.CPU, backends.CUDA))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd(n, seed, dtype=torch.float32, rank=None):
    g = _gen(seed)
    a = torch.randn(n, rank or 2 * n + 1, generator=g, dtype=torch.float64)
    f = (a @ a.T / a.shape[1]).to(dtype)
    return torch.tril(f) + torch.tril(f, -1).T


@pytest.fixture(params=KB)
def kb(request):
    return request.param


@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fdt", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,bias,masked,decay", [
    ((37, 5), False, False, 1.0), ((3, 7, 13), True, True, 0.7), ((2, 1, 1), True, False, 0.0),
    ((0, 6), True, False, 0.5), ((4, 9, 66), False, True, 0.25)])
def test_factor_update_matches_the_reference(kb, xdt, fdt, shape, bias, masked, decay):
    g = _gen(1)
    D = shape[-1] + int(bias)
    f0 = _spd(D, 2, fdt)
    x = torch.randn(*shape, generator=g).to(xdt)
    mask = (torch.rand(*shape[:-1], generator=g) > 0.4) if masked else None
    want = ref.kfac_factor_update_reference(f0, x, mask, bias, 0.3, decay)
    f = kb.to(f0.clone())
    kb.public(K.kfac_factor_update, f, x, mask, bias=bias, scale=0.3, decay=decay)
    f = f.cpu()
    tol = 1e-12 if fdt == torch.float64 else 1e-5
    torch.testing.assert_close(f, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))
    assert torch.equal(f, f.T)  # exactly symmetric


@pytest.mark.parametrize("bias", [False, True])
def test_factor_update_of_a_large_factor_computes_its_upper_blocks(kb, bias):
    """Above 1024 the kernel computes only the upper triangle's 512-wide blocks (and mirrors them):
    1537 = 3 blocks and one of 1; decay applies to the old values of every block."""
    g = _gen(4)
    D = 1536 + int(bias)
    f0 = torch.randn(D, D, generator=g, dtype=torch.float64)
    f0 = (f0 + f0.T).float()
    x = torch.randn(40, 1536, generator=g)
    mask = torch.rand(40, generator=g) > 0.3
    want = ref.kfac_factor_update_reference(f0, x, mask, bias, 0.5, 0.25)
    f = kb.to(f0.clone())
    kb.public(K.kfac_factor_update, f, x, mask, bias=bias, scale=0.5, decay=0.25)
    torch.testing.assert_close(f.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(f, f.T)


def test_factor_update_with_decay_zero_ignores_nan_and_is_a_running_mean(kb):
    g = _gen(3)
    f = kb.to(torch.full((4, 4), float("nan")))
    xs = [torch.randn(n, 4, generator=g) for n in (5, 2, 9)]
    n = 0
    for x in xs:  # running mean: decay n / (n + m), scale 1 / (n + m)
        m = x.shape[0]
        kb.public(K.kfac_factor_update, f, x, decay=n / (n + m), scale=1 / (n + m))
        n += m
    X = torch.cat(xs)
    torch.testing.assert_close(f.cpu(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


SIZES = [[1], [3, 3, 64], [65, 130, 130, 7], [257]]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_damped_inverse_inverts_every_factor(kb, sizes, dtype):
    fs = [_spd(n, 10 + i, dtype) for i, n in enumerate(sizes)]
    damping = [10.0 ** -(i % 4) for i in range(len(fs))]
    inv, retried = kb.public(K.kfac_damped_inverse, fs, damping)
    assert not bool(retried.any())
    want = ref.kfac_damped_inverse_reference(fs, damping)
    for f, d, i, w in zip(fs, damping, inv, want):
        i = i.cpu()
        assert i.dtype == dtype and i.shape == f.shape and torch.equal(i, i.T)
        e = torch.eye(f.shape[0], dtype=torch.float64)
        resid = float(((f.double() + d * e) @ i.double() - e).abs().max())
        assert resid <= (1e-4 if dtype == torch.float32 else 1e-10), resid
        torch.testing.assert_close(i, w, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-5)


def test_damped_inverse_reads_the_lower_triangle_and_takes_one_damping_for_all(kb):
    f = _spd(70, 4)
    inv1, _ = kb.public(K.kfac_damped_inverse, [f, f], 0.1)
    inv2, _ = kb.public(K.kfac_damped_inverse, [f, f], [0.1, 0.1])
    for a, b in zip(inv1, inv2):
        assert torch.equal(a.cpu(), b.cpu())
    # outputs share no storage with each other or the inputs
    assert inv1[0].data_ptr() != inv1[1].data_ptr()
    inv1[0].zero_()
    assert bool(inv1[1].abs().sum() > 0) and bool(f.abs().sum() > 0)


def _ill_conditioned(n=96, seed=0):
    """An fp32 factor positive definite in fp64 (damped just above its smallest eigenvalue) whose
    fp32 Cholesky (LAPACK's too) fails."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=_gen(seed)))
    f = ((Q * torch.logspace(0, -12, n, dtype=torch.float64)) @ Q.T).float()
    f = torch.tril(f) + torch.tril(f, -1).T
    d = max(0.0, -float(torch.linalg.eigvalsh(f.double()).min())) + 1e-8
    return f, d


def test_a_factor_that_fails_in_fp32_is_retried_in_fp64(kb):
    f, d = _ill_conditioned()
    good = _spd(96, 5)
    inv, retried = kb.public(K.kfac_damped_inverse, [good, f], [1e-3, d])
    assert retried.cpu().tolist() == [False, True]
    want = ref.kfac_damped_inverse_reference([f], [d])[0]
    e = torch.eye(96, dtype=torch.float64)
    a = f.double() + d * e
    # close to the fp64 answer (cond ~1e8; the block inversion's Schur complements lose a little
    # more than LAPACK's potri: measured 3e-5 relative), not a failed fp32 one
    assert float((inv[1].cpu().double() - want.double()).abs().max()) <= 3e-4 * float(want.abs().max())
    assert float((a @ want.double() - e).abs().max()) < 1.0  # (cond ~1e8: the fp32 rounding dominates)


def test_a_factor_not_positive_definite_is_an_error(kb):
    f = _spd(80, 6, torch.float64, rank=3)  # rank 3: singular
    f[5, 5] -= 1.0
    with pytest.raises(ValueError, match=r"factors\[1\] \+ damping\[1\] I must be positive definite"):
        kb.public(K.kfac_damped_inverse, [_spd(80, 7, torch.float64), f], 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precondition_equals_a_dense_solve_with_the_kronecker_fisher(kb, dtype):
    shapes = [(5, 4), (1, 9), (17, 33)]
    grads, a_inv, g_inv, dense = [], [], [], []
    for i, (o, n) in enumerate(shapes):
        A, G = _spd(n, 20 + i, torch.float64), _spd(o, 30 + i, torch.float64)
        dw = torch.randn(o, n, generator=_gen(40 + i), dtype=torch.float64)
        # vec row-major: vec(G X A) = (G (x) A) vec(X) for symmetric A
        F = torch.kron(G, A)
        x = torch.linalg.solve(F, dw.reshape(-1))
        dense.append((x.reshape(o, n), float(dw.reshape(-1) @ x)))
        grads.append(dw.to(dtype)); a_inv.append(torch.linalg.inv(A).to(dtype)); g_inv.append(torch.linalg.inv(G).to(dtype))
    out, quad = kb.public(K.kfac_precondition, grads, a_inv, g_inv)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    for (x, q), o, qq in zip(dense, out, quad.cpu().tolist()):
        torch.testing.assert_close(o.cpu().double(), x, rtol=tol, atol=tol * float(x.abs().max()))
        assert math.isclose(qq, q, rel_tol=tol)
    assert quad.dtype == torch.float64


def test_eigen_precondition_with_kfac_eigenvalues_equals_damped_kronecker_solve(kb):
    o, n, lam = 6, 11, 0.05
    A, G = _spd(n, 50, torch.float64), _spd(o, 51, torch.float64)
    ea, qa = torch.linalg.eigh(A)
    eg, qg = torch.linalg.eigh(G)
    dw = torch.randn(o, n, generator=_gen(52), dtype=torch.float64)
    out, quad = kb.public(K.kfac_eigen_precondition, [dw], [qa], [qg], [torch.outer(eg, ea)], damping=lam)
    x = torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(o * n, dtype=torch.float64), dw.reshape(-1))
    torch.testing.assert_close(out[0].cpu(), x.reshape(o, n), rtol=1e-9, atol=1e-10)
    assert math.isclose(float(quad[0]), float(dw.reshape(-1) @ x), rel_tol=1e-9)


@pytest.mark.parametrize("bias,masked,dt", [(False, False, torch.float32), (True, True, torch.bfloat16),
                                             (True, False, torch.float64)])
def test_eigen_update_matches_the_reference_and_the_per_token_definition(kb, bias, masked, dt):
    g = _gen(60)
    o, n = 7, 5
    fdt = torch.float64 if dt == torch.float64 else torch.float32
    a = torch.randn(3, 4, n, generator=g).to(dt)
    gr = torch.randn(3, 4, o, generator=g).to(dt)
    mask = torch.rand(3, 4, generator=g) > 0.5 if masked else None
    qa = torch.linalg.qr(torch.randn(n + bias, n + bias, generator=g, dtype=fdt))[0]
    qg = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=fdt))[0]
    lam0 = torch.rand(o, n + bias, generator=g, dtype=fdt)
    lam = kb.to(lam0.clone())
    kb.public(K.kfac_eigen_update, lam, a, gr, qa, qg, mask, bias=bias, scale=0.5, decay=0.3)
    want = ref.kfac_eigen_update_reference(lam0, a, gr, qa, qg, mask, bias, 0.5, 0.3)
    torch.testing.assert_close(lam.cpu(), want, rtol=1e-5, atol=1e-6)
    # per token: the square of Q_G^T (g_t a_t^T) Q_A
    rows = [(t, a.reshape(-1, n)[t], gr.reshape(-1, o)[t]) for t in range(12)
            if mask is None or bool(mask.reshape(-1)[t])]
    acc = 0.3 * lam0.double()
    for _, at, gt in rows:
        at = torch.cat([at.double(), torch.ones(1, dtype=torch.float64)]) if bias else at.double()
        acc = acc + 0.5 * (qg.double().T @ torch.outer(gt.double(), at) @ qa.double()) ** 2
    torch.testing.assert_close(lam.cpu().double(), acc, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The Kronecker factors against the Fisher they approximate and a public implementation
# ------------------------------------------------------------------------------------------------

def _layer_tokens(seed=70, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(6, 4, bias=bias).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)  # 15 tokens, one example each
    y = torch.randint(0, 4, (3, 5))
    return lin, x, y


def _captured_factors(lin, x, y, bias):
    """A and G of the kfac ops from the layer's input and its per-token output gradients (the
    gradient of the summed loss: each token's own loss's gradient), running means over tokens."""
    s = lin(x)
    s.retain_grad()
    torch.nn.functional.cross_entropy(s.reshape(-1, 4), y.reshape(-1), reduction="sum").backward()
    N = x.shape[0] * x.shape[1]
    A = torch.zeros(6 + bias, 6 + bias, dtype=torch.float64)
    G = torch.zeros(4, 4, dtype=torch.float64)
    K.kfac_factor_update(A, x, bias=bias, scale=1 / N, decay=0.0, backend="native")
    K.kfac_factor_update(G, s.grad, scale=1 / N, decay=0.0, backend="native")
    return A, G, s.grad.reshape(-1, 4), N


@pytest.mark.parametrize("bias", [False, True])
def test_kronecker_product_of_one_token_equals_its_empirical_fisher(bias):
    lin, x, y = _layer_tokens(bias=bias)
    x, y = x[:1, :1], y[:1, :1]  # one token: A (x) G is exact
    A, G, gt, _ = _captured_factors(lin, x, y, bias)
    a = torch.cat([x.reshape(-1), torch.ones(1, dtype=torch.float64)]) if bias else x.reshape(-1)
    v = torch.outer(gt[0], a).reshape(-1)  # vec(g a^T), row-major
    torch.testing.assert_close(torch.kron(G, A), torch.outer(v, v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [False, True])
def test_factors_equal_curvlinops_kfac_with_a_mean_loss(bias):
    import curvlinops  # (installed from the README's command)
    lin, x, y = _layer_tokens(bias=bias)
    A, G, _, N = _captured_factors(lin, x, y, bias)
    model = torch.nn.Sequential(lin)
    X, Y = x.reshape(-1, 6), y.reshape(-1)
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(model, torch.nn.CrossEntropyLoss(reduction="mean"), params, [(X, Y)],
                                       fisher_type="empirical", check_deterministic=False)
    op.compute_kronecker_factors() if hasattr(op, "compute_kronecker_factors") else None
    ia, ig = _curvlinops_factors(op, lin)
    # (curvlinops keeps the bias's factors apart: its A is the weight block of lethe's joint one)
    torch.testing.assert_close(ia, A[:6, :6], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ig, G, rtol=1e-10, atol=1e-12)


def _curvlinops_factors(op, lin):
    """curvlinops' (A, G) of lin's weight, in lethe's layout (a bias's ones entry last)."""
    for name in ("_input_covariances", "input_covariances"):
        if hasattr(op, name):
            ia, ig = getattr(op, name), getattr(op, name.replace("input", "gradient"))
            break
    else:
        pytest.fail("curvlinops' KFACLinearOperator keeps its factors under an unknown name")
    (a,), (g,) = list(ia.values()), list(ig.values())
    return a, g


# ------------------------------------------------------------------------------------------------
# opcheck and bad input
# ------------------------------------------------------------------------------------------------

def _op_args():
    g = _gen(80)
    f, qa, qg = _spd(6, 81), torch.linalg.qr(torch.randn(6, 6, generator=g))[0], torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    return {
        "kfac_factor_update": (f.clone(), torch.randn(2, 4, 5, generator=g), torch.rand(2, 4, generator=g) > 0.5, True, 0.5, 0.5),
        "kfac_damped_inverse": ([_spd(6, 82), _spd(3, 83)], [0.1, 0.2]),
        "kfac_precondition": ([torch.randn(3, 6, generator=g)], [_spd(6, 84)], [_spd(3, 85)]),
        "kfac_eigen_precondition": ([torch.randn(3, 6, generator=g)], [qa], [qg], [torch.rand(3, 6, generator=g)], 0.1),
        "kfac_eigen_update": (torch.rand(3, 6, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g),
                              qa, qg, None, True, 0.5, 0.5),
    }


@pytest.mark.parametrize("name", list(_op_args()))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.lethe, name), copy.deepcopy(_op_args()[name]),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    f = lambda n: _spd(n, 90)  # noqa: E731
    upd = dict(factor=f(4), x=torch.zeros(2, 4), mask=None, bias=False, scale=1.0, decay=1.0)
    yield "kfac_factor_update", dict(upd, factor=f(4).half()), TypeError, "factor must be float32 or float64, got torch.float16"
    yield "kfac_factor_update", dict(upd, x=torch.zeros(2, 3)), ValueError, "x must have factor's size, 4, as its last dimension"
    yield "kfac_factor_update", dict(upd, bias=True), ValueError, r"x must have factor's size \(its size less the bias column\), 3"
    yield "kfac_factor_update", dict(upd, x=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "x must be float32, float16"
    yield "kfac_factor_update", dict(upd, mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask must have x's leading shape \(\[2\]\)"
    yield "kfac_factor_update", dict(upd, mask=torch.ones(2)), TypeError, "mask must be bool"
    yield "kfac_factor_update", dict(upd, decay=-1.0), ValueError, "decay must be a finite number >= 0, got -1"
    yield "kfac_factor_update", dict(upd, scale=float("nan")), ValueError, "scale must be a finite number >= 0"
    yield "kfac_factor_update", dict(upd, factor=torch.zeros(4, 3)), ValueError, r"factor must be a square 2-D matrix, got shape \[4, 3\]"
    inv = dict(factors=[f(3), f(4)], damping=[0.1, 0.1])
    yield "kfac_damped_inverse", dict(inv, damping=[0.1]), ValueError, r"damping must hold one number per factor \(2\), got 1"
    yield "kfac_damped_inverse", dict(inv, damping=[0.1, -2.0]), ValueError, r"damping\[1\] must be a finite number >= 0"
    asym = f(4).clone()
    asym[0, 1] += 1.0
    yield "kfac_damped_inverse", dict(inv, factors=[f(3), asym]), ValueError, r"factors\[1\] must be symmetric with finite values"
    nan = f(4).clone()
    nan[2, 2] = float("nan")
    yield "kfac_damped_inverse", dict(inv, factors=[f(3), nan]), ValueError, r"factors\[1\] must be symmetric with finite values"
    yield "kfac_damped_inverse", dict(inv, factors=[f(3), f(4).bfloat16()]), TypeError, r"factors\[1\] must be float32 or float64"
    pre = dict(grad=[torch.zeros(3, 4)], a_inv=[f(4)], g_inv=[f(3)])
    yield "kfac_precondition", dict(pre, a_inv=[f(5)]), ValueError, r"a_inv\[0\] must be 4 x 4 \(grad\[0\]'s input size\)"
    yield "kfac_precondition", dict(pre, g_inv=[f(3).double()]), TypeError, r"g_inv\[0\] must have grad\[0\]'s dtype"
    yield "kfac_precondition", dict(pre, g_inv=[]), ValueError, r"g_inv must hold one tensor per grad tensor \(1\), got 0"
    yield "kfac_precondition", dict(pre, grad=[torch.zeros(12)]), ValueError, r"grad\[0\] must be 2-D \[out, in\]"
    eig = dict(grad=[torch.zeros(3, 4)], q_a=[f(4)], q_g=[f(3)], lam=[torch.ones(3, 4)], damping=0.1)
    yield "kfac_eigen_precondition", dict(eig, lam=[torch.ones(4, 3)]), ValueError, r"lam\[0\] must have grad\[0\]'s shape"
    yield "kfac_eigen_precondition", dict(eig, damping=0.0), ValueError, "damping must be a finite number > 0, got 0"
    yield "kfac_eigen_precondition", dict(eig, lam=[-torch.ones(3, 4)]), ValueError, r"lam\[0\] must be >= 0 everywhere"


_PUBLIC = {
    "kfac_factor_update": (K.kfac_factor_update, 3), "kfac_damped_inverse": (K.kfac_damped_inverse, 2),
    "kfac_precondition": (K.kfac_precondition, 3), "kfac_eigen_precondition": (K.kfac_eigen_precondition, 4),
}


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[3][:40] if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("path", ["public", "native", "reference"])
def test_bad_input_gets_the_same_clear_error_everywhere(case, path):
    name, kw, err, match = case
    fn, npos = _PUBLIC[name]
    vals = list(kw.values())
    with pytest.raises(err, match=match):
        if path == "native":
            getattr(torch.ops.lethe, name)(*vals)
        else:
            fn(*vals[:npos], **dict(list(kw.items())[npos:]), backend=None if path == "public" else "reference")


# ------------------------------------------------------------------------------------------------
# lethe.nn.KFAC: capture by hooks, running means, Fisher types, the eigenbasis, state, distributed
# ------------------------------------------------------------------------------------------------

def _mlp(bias=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(), torch.nn.Linear(7, 4, bias=bias),
                               torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def _data(seed, B=3, T=6, masked=True):
    g = _gen(seed)
    x = torch.randn(B, T, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B, T), generator=g)
    if masked:
        y[0, :2] = -100
        y[-1, -1] = -100
    return x, y


def _layer_grads(model, x, y):
    """(inputs, output gradients) of every Linear of the nn.Sequential for the summed
    cross-entropy of the targets (-100: none), from autograd directly."""
    keep = y != -100
    h, outs, ins = x, [], []
    for m in model:
        if isinstance(m, torch.nn.Linear):
            ins.append(h)
            h = m(h)
            outs.append(h)
        else:
            h = m(h)
    gs = torch.autograd.grad(torch.nn.functional.cross_entropy(h[keep], y[keep], reduction="sum"), outs)
    return ins, gs


def _dense_factors(model, batches):
    """Per layer (A, G): the token means over every batch of a a^T (ones last) and of the output
    gradients of the summed cross-entropy, from autograd directly."""
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    acts, grads = {i: [] for i in range(len(lins))}, {i: [] for i in range(len(lins))}
    for x, y in batches:
        keep = y != -100
        ins, gs = _layer_grads(model, x, y)
        for i, (a, g) in enumerate(zip(ins, gs)):
            a = a[keep].detach()
            if lins[i].bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            acts[i].append(a)
            grads[i].append(g[keep])
    out = []
    for i in range(len(lins)):
        a, g = torch.cat(acts[i]), torch.cat(grads[i])
        out.append((a.T @ a / a.shape[0], g.T @ g / g.shape[0]))
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_module_factors_equal_the_dense_running_means_over_batches(bias):
    from lethe.nn import KFAC

    model = _mlp(bias)
    batches = [_data(90), _data(91), _data(92, B=2, T=3)]
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    assert k.names == ["0", "2", "4"]  # (an nn.Sequential's numbered modules are its blocks)
    for x, y in batches:
        k.accumulate(lambda: model(x), y)
    assert k.tokens == sum(int((y != -100).sum()) for _, y in batches)
    for l, (A, G) in zip(k.layers, _dense_factors(model, batches)):
        torch.testing.assert_close(l.A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(l.G, G, rtol=1e-10, atol=1e-12)
        assert torch.equal(l.A, l.A.T) and torch.equal(l.G, l.G.T)
    assert all(p.grad is None for p in model.parameters())  # only the outputs' gradients were taken


def test_kfac_module_ema_weights_the_batch_means():
    from lethe.nn import KFAC

    model = _mlp()
    batches = [_data(93), _data(94), _data(95)]
    k = KFAC(model, fisher="empirical", average="ema", beta=0.75, dtype=torch.float64)
    want = None
    for x, y in batches:
        k.accumulate(lambda: model(x), y)
        now = _dense_factors(model, [(x, y)])
        want = now if want is None else [(0.75 * a + 0.25 * na, 0.75 * g + 0.25 * ng)
                                         for (a, g), (na, ng) in zip(want, now)]
    for l, (A, G) in zip(k.layers, want):
        torch.testing.assert_close(l.A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(l.G, G, rtol=1e-10, atol=1e-12)


def test_kfac_module_true_fisher_samples_the_models_distribution():
    """The last layer's output gradient for a label y ~ p is p - e_y: over many samples G tends to
    the token mean of diag(p) - p p^T; reproducible by seed, another seed other samples."""
    from lethe.nn import KFAC

    model = _mlp()
    x, y = _data(96, B=64)
    y = torch.where(y == -100, y, model(x).argmax(-1))  # (labels the empirical Fisher's G is far from the true's)
    k = KFAC(model, fisher="true", samples=16, seed=3, dtype=torch.float64)
    k.accumulate(lambda: model(x), y)
    keep = y != -100
    p = torch.softmax(model(x)[keep], -1).detach()
    want = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)).mean(0)
    torch.testing.assert_close(k.layers[-1].G, want, rtol=0, atol=0.03)  # (about 5 sigma of 6000 draws)
    emp = KFAC(model, fisher="empirical", dtype=torch.float64)
    emp.accumulate(lambda: model(x), y)
    assert float((emp.layers[-1].G - want).abs().max()) > 0.1  # (what the test tells apart)
    again = KFAC(model, fisher="true", samples=16, seed=3, dtype=torch.float64)
    again.accumulate(lambda: model(x), y)
    assert torch.equal(again.layers[0].G, k.layers[0].G)
    other = KFAC(model, fisher="true", samples=16, seed=4, dtype=torch.float64)
    other.accumulate(lambda: model(x), y)
    assert not torch.equal(other.layers[0].G, k.layers[0].G)
    for m in (k, emp, again, other):
        m.remove()


def test_kfac_module_equals_curvlinops_on_an_mlp():
    import curvlinops

    from lethe.nn import KFAC

    model = _mlp(bias=False)
    x, y = _data(97, masked=False)
    X, Y = x.reshape(-1, 5), y.reshape(-1)
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    k.accumulate(lambda: model(X), Y)
    op = curvlinops.KFACLinearOperator(model, torch.nn.CrossEntropyLoss(reduction="mean"),
                                       [p for p in model.parameters()], [(X, Y)], fisher_type="empirical",
                                       check_deterministic=False)
    op.compute_kronecker_factors() if hasattr(op, "compute_kronecker_factors") else None
    for name in ("_input_covariances", "input_covariances"):
        if hasattr(op, name):  # (keyed by module name)
            ia, ig = getattr(op, name), getattr(op, name.replace("input", "gradient"))
            break
    assert sorted(ia) == sorted(ig) == k.names
    for l in k.layers:  # (curvlinops keeps a bias apart: its A is the weight block of lethe's joint one)
        torch.testing.assert_close(l.A[: l.inp, : l.inp], ia[l.name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(l.G, ig[l.name], rtol=1e-10, atol=1e-12)


def test_kfac_module_preconditioning_equals_the_damped_kronecker_solves():
    from lethe.nn import KFAC

    model = _mlp()
    x, y = _data(98)
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    k.accumulate(lambda: model(x), y)
    torch.nn.functional.cross_entropy(model(x)[y != -100], y[y != -100]).backward()
    grads = k.gradients()
    assert torch.equal(grads[0], torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1))
    for split in ("pi", "even"):
        pre = k.precondition(grads, 1e-2, split=split)
        for l, g, p in zip(k.layers, grads, pre.grads):
            ta, tg = torch.trace(l.A) / l.A.shape[0], torch.trace(l.G) / l.G.shape[0]
            pi = float((ta / tg).sqrt()) if split == "pi" else 1.0
            Ad = l.A + pi * 0.1 * torch.eye(l.A.shape[0], dtype=torch.float64)
            Gd = l.G + 0.1 / pi * torch.eye(l.G.shape[0], dtype=torch.float64)
            torch.testing.assert_close(p, torch.linalg.solve(Gd, g) @ torch.linalg.inv(Ad), rtol=1e-8, atol=1e-10)
    # the eigen path: exact Tikhonov damping of A (x) G
    k.eigen()
    pre = k.precondition(grads, 1e-2, eigen=True)
    for l, g, p in zip(k.layers, grads, pre.grads):
        F = torch.kron(l.G, l.A) + 1e-2 * torch.eye(l.G.shape[0] * l.A.shape[0], dtype=torch.float64)
        want = torch.linalg.solve(F, g.reshape(-1)).reshape(g.shape)
        torch.testing.assert_close(p, want, rtol=1e-7, atol=1e-9)
        assert float(l.e_a.min()) >= 0 and float(l.e_g.min()) >= 0  # clamped at 0
    quad = k.quadratic(pre.grads)
    for l, d, qv in zip(k.layers, pre.grads, quad):
        v = d.reshape(-1)
        torch.testing.assert_close(qv, v @ torch.kron(l.G, l.A) @ v, rtol=1e-10, atol=1e-12)
    model.zero_grad()


def test_ekfac_lambda_is_the_per_token_square_in_the_eigenbasis():
    from lethe.nn import KFAC

    model = _mlp()
    batches = [_data(99), _data(100)]
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    for x, y in batches:
        k.accumulate(lambda: model(x), y)
    k.eigen()
    for x, y in batches:
        k.accumulate(lambda: model(x), y, into="lambda")
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    # the per-token gradients g_t a_t^T, rotated into the eigenbasis and squared, averaged
    per = {i: [] for i in range(3)}
    for x, y in batches:
        keep = y != -100
        ins, gs = _layer_grads(model, x, y)
        for i, (a, g) in enumerate(zip(ins, gs)):
            a = torch.cat([a[keep].detach(), torch.ones(int(keep.sum()), 1, dtype=torch.float64)], 1)
            per[i].append(torch.einsum("to,ti->toi", g[keep] @ k.layers[i].q_g, a @ k.layers[i].q_a) ** 2)
    for i, l in enumerate(k.layers):
        torch.testing.assert_close(l.lam, torch.cat(per[i]).mean(0), rtol=1e-10, atol=1e-13)
    assert len(lins) == 3


def test_kfac_module_on_gpt2_conv1d_and_llama_layer_choice():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lethe.nn import KFAC, kfac_layers

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=16)).double()
    names = [n for n, _ in kfac_layers(gpt)]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                     "transformer.h.0.mlp.c_proj"]
    assert [n for n, _ in kfac_layers(gpt, "mlp")] == names[2:]
    ids = torch.randint(0, 13, (2, 5), generator=_gen(101))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    k = KFAC(gpt, "*.mlp.c_fc", fisher="empirical", dtype=torch.float64)
    # the Conv1D's input, captured by hand: its factor A is its token mean (the last position has no label)
    seen = []
    h = gpt.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    k.accumulate_lm(gpt, batch)
    h.remove()
    a = torch.cat([seen[0][:, :-1].reshape(-1, 8), torch.ones(8, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(k.layers[0].A, a.T @ a / 8, rtol=1e-10, atol=1e-12)
    assert k.layers[0].G.shape == (32, 32) and k.tokens == 8
    # Conv1D's [in, out] weight in and out of the [out, in + 1] layout
    conv = gpt.transformer.h[0].mlp.c_fc
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    d = torch.randn(32, 9, dtype=torch.float64, generator=_gen(102))
    k.add_to_parameters([d], 0.5)
    torch.testing.assert_close(conv.weight.detach(), w0 + 0.5 * d[:, :8].T)
    torch.testing.assert_close(conv.bias.detach(), b0 + 0.5 * d[:, 8])
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    names = [n for n, _ in kfac_layers(llama)]
    assert len(names) == 14 and "lm_head" not in names and all(n.startswith("model.layers.") for n in names)
    assert [n for n, _ in kfac_layers(llama, "mlp")] == [n for n in names if ".mlp." in n]
    with pytest.raises(ValueError, match=r"layers: pattern 'nope\*' matches no Linear or Conv1D layer"):
        kfac_layers(llama, ["model.layers.0.*", "nope*"])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no Linear or Conv1D layer of Net is inside a numbered block"):
        kfac_layers(Net())
    assert [n for n, _ in kfac_layers(Net(), "head")] == ["head"]


def test_kfac_module_save_and_load_under_layer_names(tmp_path):
    from safetensors import safe_open

    from lethe.nn import KFAC

    model = _mlp()
    x, y = _data(103)
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    k.accumulate(lambda: model(x), y)
    k.eigen()
    k.save(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert {"0.A", "0.G", "2.q_a", "4.lam"} <= set(f.keys())
    back = KFAC(model, fisher="empirical", dtype=torch.float64)
    back.load(tmp_path / "f.safetensors")
    assert back.tokens == k.tokens
    for a, b in zip(k.layers, back.layers):
        assert torch.equal(a.A, b.A) and torch.equal(a.G, b.G) and torch.equal(a.lam, b.lam)
    with pytest.raises(ValueError, match=r"the saved factors are of the layers \['0', '2', '4'\]"):
        KFAC(model, ["0", "2"], fisher="empirical", dtype=torch.float64).load(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="the saved factors are torch.float64, not torch.float32"):
        KFAC(model, fisher="empirical").load(tmp_path / "f.safetensors")


def test_kfac_module_bad_input_is_named():
    from lethe.nn import KFAC

    model = _mlp()
    x, y = _data(104)
    for kw, match in ((dict(fisher="mc"), r"fisher must be one of \('true', 'empirical'\), got 'mc'"),
                      (dict(samples=0), "samples must be a positive int, got 0"),
                      (dict(average="sum"), r"average must be one of \('mean', 'ema'\)"),
                      (dict(beta=1.0), r"beta must be a number in \[0, 1\), got 1.0"),
                      (dict(dtype=torch.float16), "dtype must be torch.float32 or torch.float64")):
        with pytest.raises(ValueError, match=match):
            KFAC(model, **kw)
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no token was accumulated"):
        k.inverses(1e-3)
    with pytest.raises(ValueError, match=r"layer '0''s input has leading shape \[3, 6\], but the targets \(the token "
                                         r"mask\) have shape \[3, 5\]"):
        k.accumulate(lambda: model(x), y[:, :5])
    with pytest.raises(ValueError, match=r"targets must have the logits' leading shape \[3, 6, 3\], got \[3, 6\]"):
        k.accumulate(lambda: model(x).unsqueeze(-1), y)
    with pytest.raises(TypeError, match="targets must be an int64 tensor"):
        k.accumulate(lambda: model(x), y.float())
    with pytest.raises(RuntimeError, match=r"accumulate\(into='lambda'\) needs the eigenbasis"):
        k.accumulate(lambda: model(x), y, into="lambda")
    with pytest.raises(RuntimeError, match="layer '0' ran more than once in one forward"):
        k.accumulate(lambda: model(model[0](x)[..., :5] * 0 + x), y)
    assert k.tokens == 0 and all(p.grad is None and p.requires_grad for p in model.parameters())
    k.accumulate(lambda: model(x), y)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0, got -1"):
        k.inverses(-1.0)
    with pytest.raises(ValueError, match=r"split must be one of \('pi', 'even'\)"):
        k.inverses(1e-3, split="half")
    with pytest.raises(ValueError, match=r"grads: expected one matrix per layer \(3\), got 1"):
        k.precondition(k.gradients()[:1], 1e-3)


def _kfac_worker(rank, world, port, out):
    from lethe.nn import KFAC

    with gloo.process_group(rank, world, port):
        import torch.distributed as dist

        model = _mlp()
        k = KFAC(model, fisher="empirical", dtype=torch.float64, process_group=dist.group.WORLD)
        for i in range(rank, 5, world):  # every second batch
            x, y = _data(110 + i, B=1 + i % 3)
            k.accumulate(lambda: model(x), y)
        k.reduce()
        inv = k.inverses(1e-2)
        k.eigen()
        torch.save({"A": [l.A for l in k.layers], "G": [l.G for l in k.layers], "inv": inv, "tokens": k.tokens,
                    "owner": k._assign([t.shape[0] for l in k.layers for t in (l.A, l.G)]),
                    "q_a": [l.q_a for l in k.layers]}, os.path.join(out, f"kfac{rank}.pt"))


def test_kfac_module_under_two_gloo_processes_equals_one_process(tmp_path):
    """Each rank captures every second batch; the all-reduced upper triangles (weighted by the
    ranks' token counts) are the one-process running means; the inversions and eigenbases,
    each computed on one rank (greedy n^3) and broadcast, are the one-process ones."""
    import torch.multiprocessing as mp

    from lethe.nn import KFAC

    mp.spawn(_kfac_worker, args=(2, gloo.free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _mlp()
    k = KFAC(model, fisher="empirical", dtype=torch.float64)
    for i in range(5):
        x, y = _data(110 + i, B=1 + i % 3)
        k.accumulate(lambda: model(x), y)
    inv = k.inverses(1e-2)
    k.eigen()
    for rank in range(2):
        got = torch.load(tmp_path / f"kfac{rank}.pt")
        assert got["tokens"] == k.tokens
        assert sorted(set(got["owner"])) == [0, 1]  # both ranks inverted some
        for l, A, G, (ia, ig), (wa, wg), qa in zip(k.layers, got["A"], got["G"], got["inv"], inv, got["q_a"]):
            torch.testing.assert_close(A, l.A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(G, l.G, rtol=1e-12, atol=1e-14)
            assert torch.equal(A, A.T)
            torch.testing.assert_close(ia, wa, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(ig, wg, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close((qa.T @ l.q_a).abs(), torch.eye(qa.shape[0], dtype=torch.float64),
                                       rtol=0, atol=1e-6)
