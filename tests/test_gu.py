"""gu family: subspace_dots, subspace_axpy and subspace_transform on every backend (the `backend`
fixture: compiled CPU, Triton, compiled CUDA) against the fp64 reference (python/lethe/ops/
gu_reference.py) on awkward lists: sizes that are no multiple of a block or of 8, empty tensors,
K_t = 0, K = 16, mixed dtypes, several scopes of several tensors, the Adam metric with v = 0;
exact dtype conversions, determinism (also across thread counts), the public functions, opcheck,
meta tensors, and bad input (the same message from every backend and the Python check).

Tolerances: a kernel accumulates in fp32 within a block (fp64 for an fp64 basis), so an output is
compared within a multiple of the fp32 (fp64) epsilon of the sum of its terms' magnitudes (the
reference on absolute values)."""
import math

import pytest
import torch

import backends as B
import lethe  # noqa: F401
from lethe.ops import gu_reference as ref
from lethe.ops.gu import (check_subspace_axpy, check_subspace_dots, check_subspace_transform, subspace_axpy,
                          subspace_dots, subspace_transform)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DATA = (F32, F16, BF16, F64)
EPS_ACC = {F32: 2e-5, F64: 1e-12}  # relative to the sum of magnitudes, per accumulation type


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# A case: (name, [(row shape, K_t, basis dtype, x dtype)], scope, num_scopes).
CASES = [
    ("one-k8", [((1000,), 8, F32, F32)], [0], 1),
    ("odd-sizes", [((4097,), 3, F32, F32), ((7,), 3, F32, F32), ((3, 5), 3, F32, F32)], [0, 0, 0], 1),
    ("empty", [((0,), 4, F32, F32), ((5,), 4, F32, F32), ((2, 0, 3), 2, F32, F16)], [0, 0, 1], 2),
    ("k0", [((100,), 0, F32, F32), ((33,), 2, F32, F32), ((9,), 0, F64, BF16)], [0, 1, 2], 3),
    ("k16", [((300,), 16, F32, F32), ((13,), 16, F32, F16)], [0, 0], 1),
    ("k16-f64", [((257,), 16, F64, F64), ((31,), 16, F64, F32)], [0, 0], 1),
    ("mixed", [((257,), 5, F32, F16), ((129,), 5, F32, BF16), ((65,), 5, F32, F64), ((31,), 2, F64, F32),
               ((17, 3), 2, F64, F16), ((11,), 2, F32, F32)], [0, 0, 0, 1, 1, 1], 2),
    ("scopes", [((40,), 3, F32, F32), ((41,), 1, F32, BF16), ((42,), 3, F32, F16), ((43,), 1, F32, F32),
                ((44,), 7, F32, F64), ((45,), 7, F64, F32)], [2, 0, 2, 0, 3, 3], 5),  # scope 1, 4 unused
    ("blocks", [((8193,), 8, F32, F32), ((4096,), 8, F32, BF16), ((12289,), 8, F32, F16)], [0, 0, 0], 1),
    ("big", [((100_003,), 8, F32, F32)] + [((9_999 + t,), 8, F32, DATA[t % 4]) for t in range(10)],
     [0] * 11, 1),
    ("big-k16", [((70_001,), 16, F32, F32), ((20_000,), 16, F64, F16), ((5_003,), 1, F32, BF16)], [0, 0, 1], 2),
]

INTERPRETER_MAX = 3000  # elements x rows of a case under the Triton interpreter


def _size(case):
    return sum(math.prod(shape) * (kt + 1) for shape, kt, _, _ in case[1])


def _fits(backend, case):
    return not backend.interpreted or _size(case) <= INTERPRETER_MAX


def make(case, seed=0, zeros_in_v=True):
    """(basis, x, exp_avg_sq, scope, num_scopes) of a case: random data, v = 0 at every 7th element."""
    _, tensors, scope, S = case
    g = _gen(seed)
    basis, x, v = [], [], []
    for t, (shape, kt, bdt, xdt) in enumerate(tensors):
        basis.append(torch.randn((kt, *shape), generator=g).to(bdt))
        x.append((torch.randn(shape, generator=g) * 2).to(xdt))
        vt = torch.rand(shape, generator=g) ** 2 * 1e-2
        if zeros_in_v:
            vt.view(-1)[::7] = 0.0
        v.append(vt.to(DATA[(t + 1) % 4]))
    return basis, x, v, list(scope), S


def _scope_tol(basis, scope, S):
    """The relative tolerance of each scope: fp32 accumulation if any of its bases is fp32."""
    tol = torch.full((S,), EPS_ACC[F64], dtype=F64)
    for b, s in zip(basis, scope):
        if b.dtype == F32:
            tol[s] = EPS_ACC[F32]
    return tol


def _abs(ts):
    return None if ts is None else [t.abs() for t in ts]


def check_dots(backend, basis, x, v, eps, scope, S, gram):
    out = backend("subspace_dots", basis, x, v, eps, scope, S, gram)
    want = ref.subspace_dots_reference(basis, x, v, eps, scope, S, gram)
    mag = ref.subspace_dots_reference(_abs(basis), _abs(x), v, eps, scope, S, gram)
    assert out.dtype == F64 and out.shape == want.shape
    tol = _scope_tol(basis, scope, S).view(-1, *[1] * (want.dim() - 1)) * mag + 1e-30
    err = (out - want).abs()
    assert torch.all(err <= tol), (err / tol).max()
    if gram:
        assert torch.equal(out, out.transpose(1, 2))
    return out


# ---------------------------------------------------------------------------------------------
# subspace_dots

@pytest.mark.parametrize("metric", [False, True], ids=["plain", "metric"])
@pytest.mark.parametrize("backend,case", B.grid(CASES, where=_fits, ids=lambda c: c[0]))
def test_dots(backend, case, metric):
    basis, x, v, scope, S = make(case)
    check_dots(backend, basis, x, v if metric else None, 1e-3, scope, S, False)


@pytest.mark.parametrize("with_x", [True, False], ids=["x", "no-x"])
@pytest.mark.parametrize("metric", [False, True], ids=["plain", "metric"])
@pytest.mark.parametrize("backend,case", B.grid(CASES, where=_fits, ids=lambda c: c[0]))
def test_gram(backend, case, metric, with_x):
    basis, x, v, scope, S = make(case, seed=1)
    out = check_dots(backend, basis, x if with_x else None, v if metric else None, 1e-3, scope, S, True)
    K = max(b.shape[0] for b in basis)
    if not with_x:
        assert torch.all(out[:, K, :] == 0) and torch.all(out[:, :, K] == 0)


def test_dots_tiny_eps_and_zero_v(backend):
    # v = 0 everywhere: u = 1 / eps; eps = 1e-8 as Adam's
    case = ("z", [((37,), 3, F32, F32), ((5,), 3, F64, F16)], [0, 0], 1)
    basis, x, v, scope, S = make(case, seed=3)
    v = [torch.zeros_like(t) for t in v]
    check_dots(backend, basis, x, v, 1e-8, scope, S, False)
    check_dots(backend, basis, x, v, 1e-8, scope, S, True)
    # eps = 0 without the metric is allowed
    check_dots(backend, basis, x, None, 0.0, scope, S, False)


def test_dots_exact(backend):
    """Small integers: every product and sum is exact in fp32, so every backend gives the exact result."""
    g = _gen(5)
    basis = [torch.randint(-3, 4, (4, 1000), generator=g).float(), torch.randint(-3, 4, (4, 3, 7), generator=g).float()]
    x = [torch.randint(-3, 4, (1000,), generator=g).to(BF16), torch.randint(-3, 4, (3, 7), generator=g).half()]
    v = [torch.full((1000,), 9.0), torch.full((3, 7), 1.0, dtype=F16)]  # u = 1 / (3 + 1), 1 / (1 + 1)
    for vv in (None, v):
        for gram in (False, True):
            out = backend("subspace_dots", basis, x, vv, 1.0, [0, 0], 1, gram)
            want = ref.subspace_dots_reference(basis, x, vv, 1.0, [0, 0], 1, gram)
            assert torch.equal(out, want), (vv is None, gram)


# ---------------------------------------------------------------------------------------------
# subspace_axpy

def _coeffs(basis, scope, S, seed):
    g = _gen(seed)
    K = max(b.shape[0] for b in basis)
    return torch.randn(S, K, generator=g, dtype=F64), torch.rand(S, generator=g, dtype=F64) + 0.5


def run_axpy(backend, out, x, basis, coeff, scale, scope, dots):
    """The op on the backend's device; returns (stats, out as modified) on the CPU."""
    dev_out = [o.to(backend.device, copy=True) for o in out]
    stats = backend.op("subspace_axpy")(dev_out, backend.to(x), backend.to(basis), backend.to(coeff),
                                        backend.to(scale), scope, dots)
    return stats.cpu(), [o.cpu() for o in dev_out]


def check_axpy(backend, out, x, basis, coeff, scale, scope, dots):
    stats, new = run_axpy(backend, out, x, basis, coeff, scale, scope, dots)
    want_new, want = ref.subspace_axpy_reference(out, x, basis, coeff, scale, scope, dots)
    src = out if x is None else x
    K = coeff.shape[1]
    mags = []
    for t, (b, y, w) in enumerate(zip(basis, new, want_new)):
        s, kt = scope[t], b.shape[0]
        rows = ref._rows(b)
        mag = scale[s].abs() * (src[t].double().abs().reshape(-1) + coeff[s, :kt].abs() @ rows.abs())
        mags.append((rows, mag))
        assert y.dtype == out[t].dtype and y.shape == out[t].shape
        e_acc = EPS_ACC[b.dtype] / 4
        e_out = {F32: 2**-24, F16: 2**-11, BF16: 2**-8, F64: 2**-53}[y.dtype]
        # the kernel's error in y, then a rounding to out's dtype on each side
        tol = (mag * e_acc * (kt + 2)).reshape(y.shape) + w.double().abs() * e_out * 2.02 + 1e-300
        if backend.kernel == "triton" and y.dtype == BF16:
            tol = tol * 2  # the interpreter truncates bf16 stores
        err = (y.double() - w.double()).abs()
        assert torch.all(err <= tol), (t, (err / tol).max())
    # the statistics, within the sums of magnitudes
    mag_stats = torch.zeros_like(want)
    for t, (rows, mag) in enumerate(mags):
        s, kt = scope[t], rows.shape[0]
        mag_stats[s, K] += (mag * mag).sum()
        if dots:
            mag_stats[s, :kt] += rows.abs() @ mag
    tol = _scope_tol(basis, scope, coeff.shape[0]).view(-1, 1) * 2 * mag_stats + 1e-300
    err = (stats - want).abs()
    assert stats.dtype == F64 and stats.shape == want.shape
    assert torch.all(err <= tol), (err / tol).max()
    if not dots:
        assert torch.all(stats[:, :K] == 0)
    return stats, new


@pytest.mark.parametrize("dots", [False, True], ids=["norms", "dots"])
@pytest.mark.parametrize("backend,case", B.grid(CASES, where=_fits, ids=lambda c: c[0]))
def test_axpy_out_of_place(backend, case, dots):
    basis, x, _, scope, S = make(case, seed=2)
    coeff, scale = _coeffs(basis, scope, S, seed=3)
    # out in another dtype than x (rotated), x untouched
    out = [torch.full(t.shape, 7.0, dtype=DATA[(DATA.index(t.dtype) + 1) % 4]) for t in x]
    x_before = [t.clone() for t in x]
    check_axpy(backend, out, x, basis, coeff, scale, scope, dots)
    assert all(torch.equal(a, b) for a, b in zip(x, x_before))


@pytest.mark.parametrize("dots", [False, True], ids=["norms", "dots"])
@pytest.mark.parametrize("backend,case", B.grid(CASES, where=_fits, ids=lambda c: c[0]))
def test_axpy_in_place(backend, case, dots):
    basis, x, _, scope, S = make(case, seed=4)
    coeff, scale = _coeffs(basis, scope, S, seed=5)
    check_axpy(backend, x, None, basis, coeff, scale, scope, dots)


def test_axpy_projection(backend):
    """Projecting x off an orthonormal basis: <q_i, y> ~ 0 and |y|^2 = |x|^2 - |c|^2 (the CGS step)."""
    g = _gen(9)
    q, _ = torch.linalg.qr(torch.randn(2000, 6, generator=g, dtype=F64))
    basis = [q.t()[:, :1500].float().contiguous(), q.t()[:, 1500:].float().contiguous()]
    x = [torch.randn(1500, generator=g), torch.randn(500, generator=g)]
    c = ref.subspace_dots_reference(basis, x, None, 0.0, [0, 0], 1, False)
    out = [torch.empty_like(t) for t in x]
    stats, _ = check_axpy(backend, out, x, basis, c[:, :6].contiguous(), torch.ones(1, dtype=F64), [0, 0], True)
    assert stats[0, :6].abs().max() < 1e-3
    assert abs(stats[0, 6] - (c[0, 6] - (c[0, :6] ** 2).sum())) < 1e-2


@pytest.mark.parametrize("dtype", [F16, BF16, F64])
def test_axpy_conversions_exact(backend, dtype):
    """y = 1 * x with K_t = 0: every fp16 / bf16 value converts to fp32 exactly, and fp32 values
    round to fp16 / bf16 to nearest even (torch's rounding; subnormals, ties, overflow, Inf, NaN)."""
    n = 65536 if dtype != F64 and not backend.interpreted else 4096
    g = _gen(11)
    if dtype == F64:
        src = torch.randn(n, generator=g, dtype=F64) * torch.exp(torch.randn(n, generator=g, dtype=F64) * 20)
    else:
        src = torch.arange(0, 65536, 65536 // n, dtype=torch.int32).to(torch.int16).view(dtype)  # every exponent
    basis = [torch.zeros(0, n)]
    coeff, one = torch.zeros(1, 0, dtype=F64), torch.ones(1, dtype=F64)
    _, (widened,) = run_axpy(backend, [torch.zeros(n)], [src], basis, coeff, one, [0], False)
    torch.testing.assert_close(widened, src.float(), rtol=0, atol=0, equal_nan=True)
    if dtype == F64:
        return
    # fp32 bit patterns near every rounding boundary: random bits, ties (the 16 / 13 low bits 0x8000 /
    # 0x1000), the fp16 overflow threshold, subnormal halves, specials
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    low = 0x8000 if dtype == BF16 else 0x1000
    bits[: n // 4] = (bits[: n // 4] & ~(2 * low - 1)) | low
    f = bits.view(F32).clone()
    f[n // 4: n // 2] = torch.randn(n // 4, generator=g) * (1e-5 if dtype == F16 else 1e-38)
    f[:8] = torch.tensor([65504.0, 65519.99, 65520.0, -65536.0, float("inf"), -float("inf"), float("nan"), -0.0])
    (_, (narrowed,)) = run_axpy(backend, [torch.zeros(n, dtype=dtype)], [f], [torch.zeros(0, n)], coeff, one, [0],
                                False)
    want = f.to(dtype)
    if backend.kernel == "triton" and not torch.equal(narrowed.view(torch.int16)[~want.isnan()],
                                                      want.view(torch.int16)[~want.isnan()]):
        want = backend.stored(f, dtype)  # a Triton that truncates bf16 stores (the interpreter), unless rounded by hand
    torch.testing.assert_close(narrowed, want, rtol=0, atol=0, equal_nan=True)
    keep = ~torch.isnan(want)
    assert torch.equal(narrowed.view(torch.int16)[keep], want.view(torch.int16)[keep])  # zero signs too


# ---------------------------------------------------------------------------------------------
# subspace_transform

def run_transform(backend, basis, coeff, scope):
    dev = [b.to(backend.device, copy=True) for b in basis]
    r = backend.op("subspace_transform")(dev, backend.to(coeff), scope)
    assert r is None
    return [b.cpu() for b in dev]


@pytest.mark.parametrize("backend,case", B.grid(CASES, where=_fits, ids=lambda c: c[0]))
def test_transform(backend, case):
    basis, _, _, scope, S = make(case, seed=6)
    K = max(b.shape[0] for b in basis)
    coeff = torch.randn(S, K, K, generator=_gen(7), dtype=F64)
    new = run_transform(backend, basis, coeff, scope)
    want = ref.subspace_transform_reference(basis, coeff, scope)
    for t, (b, y, w) in enumerate(zip(basis, new, want)):
        kt, s = b.shape[0], scope[t]
        mag = (coeff[s, :kt, :kt].abs() @ ref._rows(b).abs()).reshape(b.shape)
        tol = mag * (EPS_ACC[b.dtype] / 4) * (kt + 1) + 1e-300
        assert y.dtype == b.dtype and y.shape == b.shape
        err = (y.double() - w.double()).abs()
        assert torch.all(err <= tol), (t, (err / tol).max())


def test_transform_identity_and_permutation(backend):
    g = _gen(8)
    basis = [torch.randn(5, 77, generator=g), torch.randn(5, 3, 3, generator=g, dtype=F64),
             torch.randn(2, 9, generator=g)]
    eye = torch.eye(5, dtype=F64).expand(2, 5, 5).contiguous()
    new = run_transform(backend, basis, eye, [0, 0, 1])
    assert all(torch.equal(a, b) for a, b in zip(new, basis))
    perm = torch.zeros(2, 5, 5, dtype=F64)
    perm[0, torch.arange(5), torch.tensor([4, 0, 3, 1, 2])] = 1.0
    perm[1, :2, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    perm[1, 2:, 2:] = 5.0  # past basis[2]'s rows: never read
    new = run_transform(backend, basis, perm, [0, 0, 1])
    assert torch.equal(new[0], basis[0][[4, 0, 3, 1, 2]]) and torch.equal(new[1], basis[1][[4, 0, 3, 1, 2]])
    assert torch.equal(new[2], basis[2][[1, 0]])


# ---------------------------------------------------------------------------------------------
# the Triton tiles at small sizes

# Several blocks per tensor (none a multiple of BLOCK), several steps per block, KB = 1, 4, 8, 16,
# fp32 and fp64 bases, an empty tensor, K_t = 0, a scope with no tensors (1) and scopes of several
# tensors, whose partials rows take several reduce steps and the Gram's width several programs.
TILES_CASE = ("tiles", [((150,), 3, F32, F32), ((2, 37), 3, F32, BF16), ((0,), 3, F32, F16),
                        ((67,), 2, F64, F16), ((5, 13), 2, F64, F32), ((40,), 0, F32, F64),
                        ((70,), 7, F32, F16), ((33,), 7, F64, F64), ((21,), 16, F32, F32), ((9,), 1, F32, BF16)],
              [0, 0, 0, 2, 2, 3, 4, 4, 5, 6], 7)


def test_triton_tiles_at_small_sizes(monkeypatch):
    """The multi-block, multi-step and multi-row-reduce paths of the Triton launchers, with their tile
    constants lowered (all powers of two): BLOCK = 32 elements per program; TILE = 16 gives row-tile
    steps of 16 / KB elements (8 in fp64), down to 1 at KB = 16; CUBE = 32 gives product-tile steps
    of 32 / KB^2, down to 1; REDUCE_ROWS = 2, REDUCE_COLS = 4."""
    from lethe.triton_kernels import gu as tg

    for name, value in (("BLOCK", 32), ("TILE", 16), ("CUBE", 32), ("REDUCE_ROWS", 2), ("REDUCE_COLS", 4)):
        monkeypatch.setattr(tg, name, value)
    assert tg._steps(4, F32) == (4, 2) and tg._steps(16, F64) == (1, 1)
    backend = B.TRITON
    basis, x, v, scope, S = make(TILES_CASE, seed=21)
    for metric in (False, True):
        check_dots(backend, basis, x, v if metric else None, 1e-3, scope, S, False)
        check_dots(backend, basis, x, v if metric else None, 1e-3, scope, S, True)
    check_dots(backend, basis, None, None, 0.0, scope, S, True)
    coeff, scale = _coeffs(basis, scope, S, seed=22)
    for dots in (False, True):
        check_axpy(backend, x, None, basis, coeff, scale, scope, dots)  # in place
        out = [torch.full(t.shape, 7.0, dtype=DATA[(DATA.index(t.dtype) + 1) % 4]) for t in x]
        check_axpy(backend, out, x, basis, coeff, scale, scope, dots)
    K = max(b.shape[0] for b in basis)
    tc = torch.randn(S, K, K, generator=_gen(23), dtype=F64)
    new = run_transform(backend, basis, tc, scope)
    for t, (b, y, w) in enumerate(zip(basis, new, ref.subspace_transform_reference(basis, tc, scope))):
        kt, s = b.shape[0], scope[t]
        tol = (tc[s, :kt, :kt].abs() @ ref._rows(b).abs()).reshape(b.shape) * (EPS_ACC[b.dtype] / 4) * (kt + 1)
        assert torch.all((y.double() - w.double()).abs() <= tol + 1e-300), t


# ---------------------------------------------------------------------------------------------
# determinism, the public functions, opcheck, meta tensors

DET_CASE = CASES[-2]  # "big": many blocks per tensor, mixed dtypes


def _all_ops(backend, case, seed=0):
    basis, x, v, scope, S = make(case, seed)
    coeff, scale = _coeffs(basis, scope, S, seed)
    K = max(b.shape[0] for b in basis)
    tc = torch.randn(S, K, K, generator=_gen(seed), dtype=F64)
    outs = [backend("subspace_dots", basis, x, v, 1e-8, scope, S, False),
            backend("subspace_dots", basis, x, v, 1e-3, scope, S, True),
            backend("subspace_dots", basis, None, None, 0.0, scope, S, True)]
    outs += [run_axpy(backend, x, None, basis, coeff, scale, scope, True)]
    outs += [run_axpy(backend, [torch.empty_like(t) for t in x], x, basis, coeff, scale, scope, False)]
    outs += [run_transform(backend, basis, tc, scope)]
    return outs


def _same(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("backend", B.params([b for b in B.ALL if not b.interpreted]))
def test_deterministic(backend):
    assert _same(_all_ops(backend, DET_CASE), _all_ops(backend, DET_CASE))


def test_same_for_any_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops(B.CPU, DET_CASE)
        torch.set_num_threads(2)
        two = _all_ops(B.CPU, DET_CASE)
    finally:
        torch.set_num_threads(threads)
    assert _same(one, two)


def test_public_functions(backend):
    case = ("p", [((50,), 3, F32, F32), ((20, 2), 3, F32, F16), ((9,), 1, F64, F64)], [0, 0, 1], 2)
    basis, x, v, scope, S = make(case, seed=12)
    dev = backend.to
    # default scope: each tensor its own
    got = subspace_dots(dev(basis), dev(x), exp_avg_sq=dev(v), eps=1e-3, backend=backend.kernel).cpu()
    torch.testing.assert_close(got, ref.subspace_dots_reference(basis, x, v, 1e-3, [0, 1, 2], 3, False),
                               rtol=1e-5, atol=1e-4)
    got = subspace_dots(dev(basis), scope=scope, gram=True, backend=backend.kernel).cpu()
    torch.testing.assert_close(got, ref.subspace_dots_reference(basis, None, None, 0.0, scope, S, True),
                               rtol=1e-5, atol=1e-4)
    got = subspace_dots(dev(basis), dev(x), scope=scope, num_scopes=4, backend=backend.kernel).cpu()
    assert got.shape == (4, 4) and torch.all(got[2:] == 0)
    # axpy: in place with the default scale, and out of place
    coeff = torch.randn(S, 3, generator=_gen(13), dtype=F64)
    out = [t.to(backend.device, copy=True) for t in x]
    stats = subspace_axpy(out, dev(basis), dev(coeff), scope=scope, backend=backend.kernel).cpu()
    want_new, want = ref.subspace_axpy_reference(x, None, basis, coeff, torch.ones(S, dtype=F64), scope, False)
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-4)
    for o, w in zip(out, want_new):
        torch.testing.assert_close(o.cpu(), w, rtol=1e-2, atol=1e-3)
    # transform, and the reference backend's in-place writes
    coeff = torch.randn(S, 3, 3, generator=_gen(14), dtype=F64)
    bb = [b.to(backend.device, copy=True) for b in basis]
    assert subspace_transform(bb, dev(coeff), scope=scope, backend=backend.kernel) is None
    rb = [b.clone() for b in basis]
    subspace_transform(rb, coeff, scope=scope, backend="reference")
    for a, b in zip(bb, rb):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def _opcheck_args(backend):
    case = ("o", [((13,), 3, F32, F32), ((2, 5), 3, F32, BF16), ((7,), 2, F64, F16)], [0, 0, 1], 2)
    basis, x, v, scope, S = make(case, seed=15)
    coeff, scale = _coeffs(basis, scope, S, seed=16)
    tc = torch.randn(S, 3, 3, generator=_gen(17), dtype=F64)
    return backend.to((basis, x, v, coeff, scale, tc)) + (scope, S)


def test_opcheck_dots(backend):
    basis, x, v, _, _, _, scope, S = _opcheck_args(backend)
    oc = torch.library.opcheck
    oc(backend.op("subspace_dots").default, (basis, x, v, 1e-3, scope, S, False))
    oc(backend.op("subspace_dots").default, (basis, None, None, 0.0, scope, S, True))
    oc(backend.op("subspace_dots").default, (basis, x, v, 1e-3, scope, S, True))


def test_opcheck_axpy(backend):
    basis, x, _, coeff, scale, _, scope, _ = _opcheck_args(backend)
    oc = torch.library.opcheck
    oc(backend.op("subspace_axpy").default, ([t.clone() for t in x], x, basis, coeff, scale, scope, True))
    oc(backend.op("subspace_axpy").default, ([t.clone() for t in x], None, basis, coeff, scale, scope, False))


def test_opcheck_transform(backend):
    basis, _, _, _, _, tc, scope, _ = _opcheck_args(backend)
    torch.library.opcheck(backend.op("subspace_transform").default, ([b.clone() for b in basis], tc, scope))


def test_meta():
    basis = [torch.zeros(3, 10, device="meta"), torch.zeros(2, 4, device="meta", dtype=F64)]
    x = [torch.zeros(10, device="meta", dtype=F16), torch.zeros(4, device="meta")]
    out = torch.ops.lethe.subspace_dots(basis, x, None, 1e-8, [0, 1], 2, False)
    assert out.shape == (2, 4) and out.dtype == F64 and out.device.type == "meta"
    out = torch.ops.lethe.subspace_dots(basis, None, None, 1e-8, [0, 1], 3, True)
    assert out.shape == (3, 4, 4)
    stats = torch.ops.lethe.subspace_axpy(x, None, basis, torch.zeros(2, 3, dtype=F64, device="meta"),
                                          torch.zeros(2, dtype=F64, device="meta"), [0, 1], True)
    assert stats.shape == (2, 4) and stats.dtype == F64
    with pytest.raises(ValueError, match=r"x\[1\] must have the shape of a row of basis\[1\] \(\[4\]\), got \[5\]"):
        torch.ops.lethe.subspace_dots(basis, [x[0], torch.zeros(5, device="meta")], None, 1e-8, [0, 1], 2, False)


# ---------------------------------------------------------------------------------------------
# bad input: the same message from every backend and the op's Python check

def _b(d):
    g = _gen(20)
    return [torch.randn(4, 10, generator=g).to(d), torch.randn(4, 2, 3, generator=g).to(d)]


def _x(d):
    return [torch.randn(10, device=d), torch.randn(2, 3, device=d)]


def _dots(d, basis=None, x="default", v=None, eps=1e-8, scope=(0, 0), S=1, gram=False):
    return ("subspace_dots", (_b(d) if basis is None else basis, _x(d) if x == "default" else x, v, eps,
                              list(scope), S, gram))


def _axpy(d, out=None, x=None, basis=None, coeff=None, scale=None, scope=(0, 0), dots=False):
    return ("subspace_axpy", (_x(d) if out is None else out, x, _b(d) if basis is None else basis,
                              torch.zeros(1, 4, dtype=F64, device=d) if coeff is None else coeff,
                              torch.ones(1, dtype=F64, device=d) if scale is None else scale, list(scope), dots))


def _transform(d, basis=None, coeff=None, scope=(0, 0)):
    return ("subspace_transform", (_b(d) if basis is None else basis,
                                   torch.zeros(1, 4, 4, dtype=F64, device=d) if coeff is None else coeff,
                                   list(scope)))


def _overlap_basis(d):
    b = _b(d)
    return _axpy(d, out=[b[0][1], torch.zeros(2, 3, device=d)], basis=b)


def _overlap_x(d):
    out = _x(d)
    return _axpy(d, out=out, x=[out[0][:], torch.zeros(2, 3, device=d)])


def _overlap_across(d):  # out[1] is a view into basis[0] (another list position)
    b = _b(d)
    return _axpy(d, out=[torch.zeros(10, device=d), b[0][1][:6].view(2, 3)], basis=b)


def _transform_twice(d):  # one basis tensor at two list positions: written twice, in place
    b = torch.randn(4, 10, device=d)
    return _transform(d, basis=[b, b])


# make(device) -> (op name, its arguments on that device)
BAD = [
    (lambda d: _dots(d, basis=[_b(d)[0].long(), _b(d)[1]]), TypeError,
     r"basis\[0\] must be float32 or float64, got torch.int64"),
    (lambda d: _dots(d, basis=[_b(d)[0], _b(d)[1].half()]), TypeError,
     r"basis\[1\] must be float32 or float64, got torch.float16"),
    (lambda d: _dots(d, basis=[torch.tensor(1.0, device=d), _b(d)[1]]), ValueError,
     r"basis\[0\] must be \[K, \*shape\] \(K basis rows\), got shape \[\]"),
    (lambda d: _dots(d, basis=[torch.zeros(17, 10, device=d), _b(d)[1]]), ValueError,
     r"basis\[0\] must have at most 16 rows, got 17"),
    (lambda d: _dots(d, basis=[torch.zeros(10, 4, device=d).t(), _b(d)[1]]), ValueError,
     r"basis\[0\] must be contiguous"),
    (lambda d: _dots(d, x=[torch.zeros(10, device=d)]), ValueError,
     r"x must hold one tensor per basis tensor \(2\), got 1"),
    (lambda d: _dots(d, x=[torch.zeros(10, device=d), torch.zeros(2, 3, dtype=torch.int32, device=d)]), TypeError,
     r"x\[1\] must be float32, float16, bfloat16 or float64, got torch.int32"),
    (lambda d: _dots(d, x=[torch.zeros(10, dtype=torch.bool, device=d), torch.zeros(2, 3, device=d)]), TypeError,
     r"x\[0\] must be float32, float16, bfloat16 or float64, got torch.bool"),
    (lambda d: _dots(d, x=[torch.zeros(11, device=d), torch.zeros(2, 3, device=d)]), ValueError,
     r"x\[0\] must have the shape of a row of basis\[0\] \(\[10\]\), got \[11\]"),
    (lambda d: _dots(d, x=[torch.zeros(10, device=d), torch.zeros(3, 2, device=d)]), ValueError,
     r"x\[1\] must have the shape of a row of basis\[1\] \(\[2, 3\]\), got \[3, 2\]"),
    (lambda d: _dots(d, x=[torch.zeros(10, device=d), torch.zeros(3, 2, device=d).t()]), ValueError,
     r"x\[1\] must be contiguous"),
    (lambda d: _dots(d, v=[torch.zeros(10, device=d), torch.zeros(6, device=d)]), ValueError,
     r"exp_avg_sq\[1\] must have the shape of a row of basis\[1\] \(\[2, 3\]\), got \[6\]"),
    (lambda d: _dots(d, v=[torch.zeros(10, device=d)] * 3), ValueError,
     r"exp_avg_sq must hold one tensor per basis tensor \(2\), got 3"),
    (lambda d: _dots(d, eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1"),
    (lambda d: _dots(d, eps=float("nan")), ValueError, r"eps must be a finite number >= 0, got nan"),
    (lambda d: _dots(d, eps=float("inf")), ValueError, r"eps must be a finite number >= 0, got inf"),
    (lambda d: _dots(d, eps=0.0, v=[torch.zeros(10, device=d), torch.zeros(2, 3, device=d)]), ValueError,
     r"eps must be > 0 when exp_avg_sq is given, got 0"),
    (lambda d: _dots(d, scope=[0]), ValueError, r"scope must hold one int per basis tensor \(2\), got 1"),
    (lambda d: _dots(d, S=0), ValueError, r"num_scopes must be >= 1, got 0"),
    (lambda d: _dots(d, scope=[0, 2], S=2), ValueError, r"scope\[1\] must be in \[0, num_scopes\) = \[0, 2\), got 2"),
    (lambda d: _dots(d, scope=[-1, 0], S=2), ValueError, r"scope\[0\] must be in \[0, num_scopes\) = \[0, 2\), got -1"),
    (lambda d: _dots(d, basis=[torch.zeros(4, 10, device=d), torch.zeros(3, 2, 3, device=d)]), ValueError,
     r"basis\[1\] must have as many rows as basis\[0\] of the same scope \(4\), got 3"),
    (lambda d: _dots(d, x=None), ValueError, r"x must be given when gram is False \(the inner products are with x\)"),
    (lambda d: _axpy(d, out=[torch.zeros(10, device=d)]), ValueError,
     r"out must hold one tensor per basis tensor \(2\), got 1"),
    (lambda d: _axpy(d, out=[torch.zeros(10, device=d), torch.zeros(2, 3, dtype=torch.int64, device=d)]), TypeError,
     r"out\[1\] must be float32, float16, bfloat16 or float64, got torch.int64"),
    (lambda d: _axpy(d, x=[torch.zeros(9, device=d), torch.zeros(2, 3, device=d)]), ValueError,
     r"x\[0\] must have the shape of a row of basis\[0\] \(\[10\]\), got \[9\]"),
    (lambda d: _axpy(d, coeff=torch.zeros(1, 3, dtype=F64, device=d)), ValueError,
     r"coeff must have shape \[1, 4\], got \[1, 3\]"),
    (lambda d: _axpy(d, coeff=torch.zeros(1, 4, device=d)), TypeError, r"coeff must be float64, got torch.float32"),
    (lambda d: _axpy(d, coeff=torch.zeros((), dtype=F64, device=d)), ValueError,
     r"coeff must have shape \[1, 4\], got \[\]"),
    (lambda d: _axpy(d, coeff=torch.zeros(2, 4, dtype=F64, device=d)), ValueError,
     r"scale must have shape \[2\], got \[1\]"),
    (lambda d: _axpy(d, scale=torch.ones(1, dtype=torch.float16, device=d)), TypeError,
     r"scale must be float64, got torch.float16"),
    (lambda d: _axpy(d, coeff=torch.zeros(0, 4, dtype=F64, device=d), scale=torch.ones(0, dtype=F64, device=d)),
     ValueError,
     r"num_scopes must be >= 1, got 0"),
    (lambda d: _axpy(d, scope=[0, 1]), ValueError, r"scope\[1\] must be in \[0, num_scopes\) = \[0, 1\), got 1"),
    (_overlap_basis, ValueError, r"out\[0\] must not overlap basis\[0\]"),
    (_overlap_x, ValueError, r"out\[0\] must not overlap x\[0\] \(pass x=None to update out in place\)"),
    (_overlap_across, ValueError, r"out\[1\] must not overlap basis\[0\]"),
    (_transform_twice, ValueError, r"basis\[0\] must not overlap basis\[1\]"),
    (lambda d: _transform(d, coeff=torch.zeros(1, 3, 4, dtype=F64, device=d)), ValueError,
     r"coeff must have shape \[1, 4, 4\], got \[1, 3, 4\]"),
    (lambda d: _transform(d, coeff=torch.zeros(1, 4, 4, dtype=torch.int64, device=d)), TypeError,
     r"coeff must be float64, got torch.int64"),
    (lambda d: _transform(d, basis=[torch.zeros(4, 10, dtype=torch.int32, device=d), torch.zeros(4, 3, device=d)]),
     TypeError,
     r"basis\[0\] must be float32 or float64, got torch.int32"),
    (lambda d: _transform(d, scope=[1, 0]), ValueError, r"scope\[0\] must be in \[0, num_scopes\) = \[0, 1\), got 1"),
    (lambda d: _transform(d, basis=[torch.zeros(4, 10, device=d), torch.zeros(17, 3, device=d)],
                          coeff=torch.zeros(1, 17, 17, dtype=F64, device=d)),
     ValueError, r"basis\[1\] must have at most 16 rows, got 17"),
]

CHECKS = {"subspace_dots": check_subspace_dots, "subspace_axpy": check_subspace_axpy,
          "subspace_transform": check_subspace_transform}


def test_empty_basis_list():
    # the dispatcher finds no tensor to dispatch on: the public functions check first
    for call in (lambda: subspace_dots([], []), lambda: subspace_transform([], torch.zeros(1, 0, 0, dtype=F64)),
                 lambda: check_subspace_dots([], None, None, 0.0, [], 1, True)):
        with pytest.raises(ValueError, match="basis must hold at least one tensor"):
            call()


def _call(backend, make):
    name, args = make(backend.device)  # built on the device (a view stays a view there)
    return lambda: backend.op(name)(*args)


@pytest.mark.parametrize("make,exc,match", BAD)
def test_gu_bad_input(make, exc, match):
    name, args = make("cpu")
    calls = [_call(B.CPU, make), _call(B.TRITON, make), lambda: CHECKS[name](*args)]
    if B.GPU:
        calls.append(_call(B.CUDA, make))
    B.assert_same_error(calls, exc, match)
