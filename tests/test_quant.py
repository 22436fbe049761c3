"""quant family: fake_quantize and fake_quantize_backward on every backend (the `backend` fixture:
compiled CPU, Triton, compiled CUDA) against the pure-PyTorch reference, bit for bit; autograd,
opcheck, torch.compile, the modules, the context manager, and bad input (the same message from
every backend)."""
import math

import pytest
import torch
from torch import nn

import backends as B
import lethe
from lethe.ops import _backend
from lethe.ops.quant import PRESETS, QuantSpec, check_fake_quantize, check_fake_quantize_backward, fake_quantize, quant_spec
from lethe.ops.quant_reference import NF4_LEVELS, fake_quantize_codes, nf4_tables

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# (bits, codebook, symmetric, scale_div)
QUANTS = [
    (4, 0, True, 7.0),
    (4, 0, True, 7.5),  # rne(absmax / scale) = 8 > qmax: clamps, the mask has zeros
    (2, 0, True, 1.0),
    (3, 0, True, 3.5),
    (8, 0, True, 127.0),
    (4, 0, False, 1.0),
    (2, 0, False, 1.0),
    (8, 0, False, 1.0),
    (4, 1, True, 1.0),
    (4, 1, False, 1.0),  # nf4 ignores symmetric
]
INT_CONFIGS = [(4, True, 7.0), (8, True, 7.5), (3, False, 1.0), (2, True, 7.0)]  # (bits, symmetric, scale_div)

# (shape, op group length): one element, odd groups, one row, groups spanning rows, whole-tensor
# groups, the CUDA kernels' fused (<= 4096) and chunked (> 4096, partial last chunk) paths, the
# Triton small- and large-group paths, many tiny groups.
SHAPES = [
    ((1,), 1),
    ((5, 3), 3),
    ((7, 3), 1),
    ((4, 9), 3),
    ((1, 7), 7),
    ((3, 127), 127),
    ((3, 130), 130),
    ((4, 256), 128),
    ((2, 6, 128), 128),
    ((6, 64), 128),  # groups span two rows
    ((2, 64 * 3), 64),
    ((5, 16), 16),
    ((1, 4096), 4096),
    ((3, 4096), 4096),
    ((37, 11), 407),  # whole tensor, odd size
    ((257, 5), 1285),
    ((1000,), 1),
    ((2, 4097), 4097),  # the smallest chunked group, odd
    ((3, 16388), 16388),  # chunked, the last chunk holds 4 elements
    ((2, 20001), 20001),
    ((1, 50000), 50000),
    ((2, 3, 50000), 50000),
    ((24584,), 24584),  # whole tensor, chunked
    ((3, 40000), 120000),
]


def outlier_data(shape, dtype, seed=0):
    """randn * 3 with an outlier that sets one group's scale and a zero tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    if flat.numel() > 10:
        flat[flat.numel() // 3] = 40.0
        flat[-2:] = 0.0
    return x.to(dtype)


def spread_data(shape, group_size, dtype, seed):
    """Normal data with a per-group magnitude spread over several decades, plus a few outliers."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n // group_size, group_size, generator=g)
    # magnitudes e^-8 .. e^5; |x| stays far below the float16 limit even with the outliers
    x = x * torch.exp((2.0 * torch.randn(n // group_size, 1, generator=g)).clamp(-8.0, 5.0))
    flat = x.reshape(-1)
    idx = torch.randint(0, n, (max(1, n // 97),), generator=g)
    flat[idx] = flat[idx] * 8.0
    return flat.reshape(shape).to(dtype)


def special_data(shape, dtype, seed=0, specials=True):
    """Random values with (when the tensor is big enough) an all-zero stretch, -0.0, exact ties
    (k + 0.5 under scale 1), an Inf, a NaN and a subnormal stretch, each in its own region."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    if specials and flat.numel() >= 400:
        flat[0:40] = 0.0
        flat[3] = -0.0
        flat[40:72] = torch.arange(-16, 16) * 0.5
        flat[71] = 8.0
        flat[130] = float("inf")
        flat[261] = float("nan")
        flat[300:320] = torch.randn(20, generator=g) * 1e-40  # absmax/scale underflow
        flat[390] = -float("inf")
    return x.to(dtype)


def check(backend, x, L, bits, codebook, symmetric, scale_div):
    """The backend's y and mask == the reference's (y as the backend stores it, NaN where it has
    NaN); Triton's bit for bit, zero signs included. Returns (y, mask)."""
    y, mask = backend("fake_quantize", x, L, bits, codebook, symmetric, scale_div, True)
    ry, rmask = fake_quantize_codes(x, L, bits, codebook, symmetric, scale_div)
    ry = backend.stored(ry, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert mask.dtype == torch.bool and mask.shape == x.shape
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mask, rmask)
    if backend.kernel == "triton":
        keep = ~torch.isnan(ry)
        assert torch.equal(y.view(INT_VIEW[x.dtype])[keep], ry.view(INT_VIEW[x.dtype])[keep])
    y2, empty = backend("fake_quantize", x, L, bits, codebook, symmetric, scale_div, False)
    assert torch.equal(y2.view(INT_VIEW[x.dtype]), y.view(INT_VIEW[x.dtype]))
    assert empty.dtype == torch.bool and empty.numel() == 0
    return y, mask


# The interpreter runs one program at a time (~10 ms each): it gets the small-group path here, and
# Triton's large-group path from test_large_groups_at_small_sizes and test_group_size_thresholds.
INTERPRETER_MAX = 4096


def _fits(backend, case):
    shape, L = case
    return not backend.interpreted or (math.prod(shape) <= INTERPRETER_MAX and L <= INTERPRETER_MAX)


def _small(backend, size):
    return not backend.interpreted or size <= INTERPRETER_MAX


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", QUANTS, ids=str)
@pytest.mark.parametrize("backend,case", B.grid(SHAPES, where=_fits, ids=str))
def test_matches_reference(backend, case, q, dtype):
    shape, L = case
    check(backend, outlier_data(shape, dtype), L, *q)
    check(backend, spread_data(shape, L, dtype, seed=L), L, *q)


def test_all_zero_tiny_and_tied_values(backend):
    x = torch.zeros(4, 16)
    x[1] = torch.arange(16) * 0.5 - 4.0  # exact halves: ties under absmax/qmax scales
    x[2] = 1e-42  # absmax underflows the scale
    x[3] = torch.linspace(-7, 7, 16)
    for q in QUANTS:
        y, mask = check(backend, x, 16, *q)
        assert torch.equal(y[0], torch.zeros(16)) and mask[0].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,group_size", B.grid([1, 3, 5, 64, 127, 128, 130, 780, 4097], where=_small, ids=str))
def test_all_zero_groups(backend, group_size, dtype):
    x = torch.zeros(5, group_size, dtype=dtype)
    for q in QUANTS:
        y, mask = check(backend, x, group_size, *q)
        assert (y == 0).all() and mask.all()


def test_round_half_to_even_and_clamp(backend):
    # paper-int4 per row: scale = absmax / 7 = 1, so x / scale is exactly x
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 7.0, -7.0]])
    y = backend.public(fake_quantize, x, "paper-int4").cpu()
    assert y.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, 4.0, 7.0, -7.0]]
    # torchao rule absmax/7.5: the absmax element lands on 7.5 -> 8 -> clamped to 7
    y, mask = backend("fake_quantize", torch.tensor([7.5, 1.0]), 2, 4, 0, True, 7.5, True)
    assert y.tolist() == [7.0, 1.0] and mask.tolist() == [False, True]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_half_even_ties(backend, dtype):
    # symmetric, absmax 7, scale_div 7: scale 1, half-integers are ties
    sym = torch.tensor([7.0, -6.5, -5.5, -4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 0.0])
    # asymmetric 4 bits, lo -3, hi 12: scale (6 + 1.5) / 7.5 = 1, zp 3
    asym = torch.tensor([-3.0, 12.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 8.5, 9.5, 10.5, 11.5, -2.0, 0.0, 4.5])
    x = torch.stack([sym, asym]).to(dtype)
    check(backend, x[0:1].contiguous(), 16, 4, 0, True, 7.0)
    check(backend, x[1:2].contiguous(), 16, 4, 0, False, 1.0)
    check(backend, x, 16, 4, 0, True, 7.0)
    check(backend, x, 16, 4, 0, False, 1.0)
    # ties under scale 1 (x / scale = k + 0.5), and |x / scale| beyond 2^22 and 2^23
    ties = torch.cat([torch.arange(-16, 16) * 0.5, torch.tensor([8.0])]).to(dtype)
    check(backend, ties, 33, 8, 0, True, 8.0)
    check(backend, torch.linspace(-3.0, 5.0, 32).to(dtype).view(2, 16), 16, 8, 0, True, 3.0e7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_midpoints(backend, dtype):
    # values exactly on the NF4 midpoints (scale 1) go to the lower level (strict >), and their
    # fp32 neighbours
    levels, mids = nf4_tables()
    row = torch.cat([torch.tensor([1.0]), mids, levels])  # 1 + 15 + 16 = 32 elements
    check(backend, torch.stack([row, -row, row * 3.0]).to(dtype), 32, 4, 1, False, 1.0)
    v = torch.cat([mids, mids.nextafter(torch.full_like(mids, 2.0)), mids.nextafter(torch.full_like(mids, -2.0)),
                   torch.tensor([1.0])])
    check(backend, v, v.numel(), 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,group_size", B.grid([3, 64, 128, 4096, 4097, 50000], where=_small, ids=str))
def test_special_groups(backend, group_size, dtype):
    """Groups holding +Inf, -Inf or NaN give NaN and a zero mask; all-zero groups give 0 and a
    true mask; the other groups are untouched by their neighbours."""
    x = torch.randn(7, group_size, generator=torch.Generator().manual_seed(11))
    x[1, group_size // 2] = float("inf")
    x[2, 0] = float("nan")
    x[3] = 0.0
    x[4, group_size - 1] = float("-inf")
    x[5, :] = 0.0
    x[5, group_size - 1] = float("nan")
    x = x.to(dtype)
    for q in QUANTS:
        y, mask = check(backend, x, group_size, *q)
        for r in (1, 2, 4, 5):
            assert torch.isnan(y[r].float()).all() and not mask[r].any()
        assert (y[3] == 0).all() and mask[3].all()
        assert torch.isfinite(y[0].float()).all() and torch.isfinite(y[6].float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_regions(backend, dtype):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0] = 0.0
    x[1] = -0.0
    x[2, 3] = float("inf")
    x[3, 0] = float("nan")
    x[4, 15] = -float("inf")
    x[5, :8] = 0.0  # a zero group within a live row for group 8
    x[6] = torch.linspace(-3.0, 5.0, 16).to(dtype)
    for gs in (8, 16, 128):
        for bits, symmetric, scale_div in INT_CONFIGS:
            check(backend, x, gs, bits, 0, symmetric, scale_div)
        check(backend, x, gs, 4, 1, True, 1.0)
    # subnormal groups: the scale underflows to 0 for some, stays tiny for others
    t = (torch.tensor([1.0, -3.0, 2.5, 7.0]) * 1e-45).repeat(4) * torch.arange(1, 17)
    for bits, symmetric, scale_div in INT_CONFIGS:
        check(backend, t, 4, bits, 0, symmetric, scale_div)
    x = special_data((6, 130), dtype, seed=16)
    for gs in (5, 130, 780):
        for bits, symmetric, scale_div in INT_CONFIGS:
            check(backend, x, gs, bits, 0, symmetric, scale_div)
    check(backend, x[:, :128].contiguous(), 64, 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [1, 3, 5, 127, 128, 130, 780])
def test_group_sizes(backend, group_size, dtype):
    shape = {127: (2, 127), 128: (4, 128)}.get(group_size, (6, 130))
    x = special_data(shape, dtype, seed=group_size)
    for bits, symmetric, scale_div in INT_CONFIGS:
        check(backend, x, group_size, bits, 0, symmetric, scale_div)
    if x.numel() % 64 == 0:
        check(backend, x, 64, 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(2, 9))
def test_bits(backend, bits, dtype):
    x = special_data((4, 130), dtype, seed=bits)
    check(backend, x, 65, bits, 0, True, 7.0)
    check(backend, x, 65, bits, 0, True, 7.5)
    check(backend, x, 65, bits, 0, True, float(2 ** (bits - 1)) - 0.5)
    check(backend, x, 65, bits, 0, False, 1.0)
    for shape, group_size in [((8, 64), 64), ((3, 127), 127), ((2, 5000), 5000)]:
        if not _small(backend, group_size):
            continue
        x = spread_data(shape, group_size, dtype, seed=bits)
        for symmetric in (True, False):  # scale_div just below 2^(b-1): the largest magnitudes clamp
            check(backend, x, group_size, bits, 0, symmetric, 2.0 ** (bits - 1) - 0.5 if symmetric else 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,case", B.grid([((16, 64), 64), ((8, 128), 64), ((8, 128), 1024), ((4, 4096), 4096),
                                                 ((2, 9000), 9000)], where=lambda b, c: _small(b, c[1]), ids=str))
def test_nf4_groups(backend, case, dtype):
    shape, group_size = case
    check(backend, spread_data(shape, group_size, dtype, seed=7), group_size, 4, 1, False, 1.0)
    check(backend, special_data(shape, dtype, seed=4), group_size, 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_and_layouts(backend, dtype):
    check(backend, special_data((1, 37), dtype, seed=11), 37, 4, 0, True, 7.0)  # one row, one group
    check(backend, special_data((37,), dtype, seed=12), 1, 3, 0, False, 1.0)  # 1-D
    check(backend, special_data((3, 5, 26), dtype, seed=13), 130, 4, 0, True, 7.5)
    check(backend, special_data((2, 3, 1, 4), dtype, seed=14), 24, 6, 0, False, 1.0)
    xt = special_data((130, 6), dtype, seed=15).t()  # non-contiguous: groups follow the row-major layout
    assert not xt.is_contiguous()
    check(backend, xt, 13, 4, 0, True, 7.0)
    for group_size in [g for g in (3, 64, 4097) if _small(backend, g)]:
        x = spread_data((group_size, 6), 6, dtype, seed=5).t()
        for q in QUANTS:
            check(backend, x, group_size, *q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,group_size", B.grid([4, 8, 128, 4096, 8192, 50000], where=_small, ids=str))
def test_misaligned_input(backend, group_size, dtype):
    """A contiguous view at an odd element offset (the CUDA kernels' scalar, non-vector path)."""
    base = spread_data((1, 3 * group_size + 1), 3 * group_size + 1, dtype, seed=3).reshape(-1)
    x = base[1:].view(3, group_size)
    assert x.is_contiguous()
    xd = backend.to(base)[1:].view(3, group_size)
    assert xd.data_ptr() % 16 != 0
    for q in QUANTS:
        y, mask = backend.op("fake_quantize")(xd, group_size, *q, True)
        ry, rmask = fake_quantize_codes(x, group_size, *q)
        torch.testing.assert_close(y.cpu(), backend.stored(ry, dtype), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(mask.cpu(), rmask)


@pytest.mark.parametrize("backend,case", B.grid([((2_500_000,), 1, torch.float32), ((3_000_009,), 3, torch.float16),
                                                 ((5000, 4097), 4097, torch.float32), ((9_000_000,), 9_000_000, torch.float16)],
                                                where=B.not_interpreted, ids=lambda c: f"{c[0]}-{c[1]}"))
def test_many_groups_and_huge_groups(backend, case):
    """More groups and chunk tasks than one grid covers (the CUDA grid-stride loops wrap), and a
    whole-tensor group of 9M elements (more than 1024 chunks: the chunk grows)."""
    shape, group_size, dtype = case
    x = spread_data(shape, group_size, dtype, seed=9)
    for q in (QUANTS[1], QUANTS[5], QUANTS[4]):
        check(backend, x, group_size, *q)


@pytest.mark.parametrize("backend", B.params((B.CUDA,)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", [((8, 64), 64), ((3, 127), 127), ((2, 50000), 50000)])
def test_matches_cpu_kernel(backend, shape, group_size, dtype):
    x = spread_data(shape, group_size, dtype, seed=17)
    for q in QUANTS:
        y, m = backend("fake_quantize", x, group_size, *q, True)
        y_cpu, m_cpu = B.CPU("fake_quantize", x, group_size, *q, True)
        torch.testing.assert_close(y, y_cpu, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(m, m_cpu)


def test_large_groups_at_small_sizes(monkeypatch):
    """Triton's three-launch path (partial stats, merge, apply) at small sizes."""
    from lethe.triton_kernels import quant as tq

    monkeypatch.setattr(tq, "SMALL_GROUP_MAX", 64)
    monkeypatch.setattr(tq, "CHUNK", 64)
    monkeypatch.setattr(tq, "PARTIAL_BLOCK", 4)
    for dtype in (torch.float32, torch.float16):
        x = special_data((6, 130), dtype, seed=7)
        for gs in (65, 130, 780):  # 2, 3 and 13 chunks, the last one partial (of 1, 2, 12)
            for bits, symmetric, scale_div in INT_CONFIGS[:3]:
                check(B.TRITON, x, gs, bits, 0, symmetric, scale_div)
        check(B.TRITON, x, 260, 4, 1, True, 1.0)
        check(B.TRITON, special_data((3, 100), dtype, seed=8, specials=False), 100, 4, 1, True, 1.0)


def test_group_size_thresholds(backend):
    from lethe.triton_kernels import quant as tq

    x = special_data((2, tq.SMALL_GROUP_MAX + 4), torch.float32, seed=9)
    check(backend, x, x.shape[1], 4, 0, True, 7.0)
    check(backend, x, x.shape[1], 8, 0, False, 1.0)
    x = special_data((1, 2 * tq.SMALL_GROUP_MAX), torch.float16, seed=10)
    check(backend, x, x.numel(), 4, 1, True, 1.0)
    check(backend, x, tq.SMALL_GROUP_MAX, 5, 0, True, 15.5)  # the largest single-program group


@pytest.mark.parametrize("return_mask", [True, False])
def test_empty(backend, return_mask):
    y, mask = backend("fake_quantize", torch.empty(0, 128), 128, 4, 0, True, 7.0, return_mask)
    assert y.shape == (0, 128) and y.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == ((0, 128) if return_mask else (0,))
    for preset in ["int8", "paper-int4", "int4-g128"]:
        assert backend.public(fake_quantize, torch.empty(0, 256), preset).shape == (0, 256)


def test_nonfinite_groups_are_nan_and_others_untouched(backend):
    x = torch.randn(4, 32)
    x[1, 5] = float("inf")
    x[2, 0] = float("nan")
    xd = backend.to(x).requires_grad_(True)
    for preset in ["int4-g128-asym", "nf4-b64", "paper-int4"]:
        spec = quant_spec(preset, granularity="row", group_size=None)
        y = backend.public(fake_quantize, xd, spec, ste="clipped")
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
        g, = torch.autograd.grad(y, xd, torch.ones_like(y))
        assert (g[1:3] == 0).all() and (g[0] != 0).any()
        y = backend.public(fake_quantize, xd, spec, ste="identity")
        g, = torch.autograd.grad(y, xd, torch.ones_like(y))
        assert (g == 1).all()


def test_noncontiguous_public_input(backend):
    x = torch.randn(256, 64).t()  # last dim 256, not contiguous
    assert not x.is_contiguous()
    y = backend.public(fake_quantize, x, "int4-g128")
    torch.testing.assert_close(y, backend.public(fake_quantize, x.contiguous(), "int4-g128"), rtol=0, atol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_api_matches_reference_with_gradients(backend, preset, ste, dtype):
    x = (torch.randn(6, 384) * 2).to(dtype)
    gy = torch.randn(6, 384).to(dtype)
    xd = backend.to(x).requires_grad_(True)
    y = backend.public(fake_quantize, xd, preset, ste=ste)
    (gx,) = torch.autograd.grad(y, xd, backend.to(gy))
    xr = x.clone().requires_grad_(True)
    y_ref = fake_quantize(xr, preset, ste=ste, backend="reference")
    (gx_ref,) = torch.autograd.grad(y_ref, xr, gy)
    spec = quant_spec(preset)
    torch.testing.assert_close(y.cpu(), backend.stored(fake_quantize_codes(x, spec.group_length(x), spec.bits,
                                                                           {"int": 0, "nf4": 1}[spec.codebook],
                                                                           spec.symmetric, spec.scale_div)[0], dtype),
                               rtol=0, atol=0)
    if backend.kernel == "native":
        torch.testing.assert_close(y.cpu(), y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx.cpu(), gx_ref, rtol=0, atol=0)
    if ste == "identity":
        assert torch.equal(gx.cpu(), gy)


def test_presets_are_what_their_names_say():
    w = torch.randn(8, 256)
    s = PRESETS["paper-int4"]
    assert (s.bits, s.granularity, s.symmetric, s.scale_div) == (4, "row", True, 7.0)
    s = PRESETS["int4-g128"]
    assert (s.group_size, s.scale_div) == (128, 7.5)
    assert PRESETS["int4-g128-asym"].symmetric is False
    assert (PRESETS["nf4-b64"].codebook, PRESETS["nf4-b64"].group_size) == ("nf4", 64)
    assert PRESETS["int8"].granularity == "tensor" and PRESETS["int8"].scale_div == 127.0
    # per-row absmax/7: every row's largest magnitude survives exactly
    y = fake_quantize(w, "paper-int4")
    torch.testing.assert_close(y.abs().amax(1), w.abs().amax(1))
    # int4 codes: at most 16 distinct values per group
    y = fake_quantize(w, "int4-g128-asym")
    assert max(len(torch.unique(g)) for g in y.view(-1, 128)) <= 16
    # nf4: every value is level * block absmax
    y = fake_quantize(w, "nf4-b64").view(-1, 64)
    levels = torch.tensor(NF4_LEVELS)
    ratio = y / w.view(-1, 64).abs().amax(1, keepdim=True)
    assert torch.isclose(ratio.unsqueeze(-1), levels, atol=1e-6).any(-1).all()


OPCHECK_ARGS = [
    ((4, 256), (128, 4, 0, True, 7.5, False)),
    ((4, 256), (128, 4, 0, True, 7.5, True)),
    ((3, 50), (50, 4, 0, False, 1.0, True)),
    ((2, 128), (64, 4, 1, True, 1.0, False)),
    ((5, 7), (35, 8, 0, True, 127.0, True)),
    ((2, 384), (3, 3, 0, False, 1.0, True)),
]


@pytest.mark.parametrize("shape,args", OPCHECK_ARGS)
def test_opcheck(backend, shape, args):
    x = backend.to(torch.randn(shape)).requires_grad_(True)
    torch.library.opcheck(backend.op("fake_quantize").default, (x, *args))


def test_compile_training_step_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        lethe.nn.FakeQuantLinear(128, 64, preset="int4-g128"),
        nn.GELU(),
        lethe.nn.FakeQuantLinear(64, 10, preset="nf4-b64", ste="clipped"),
    )
    x, t = torch.randn(16, 128), torch.randint(0, 10, (16,))

    def loss_fn(m, x, t):
        return nn.functional.cross_entropy(m(x), t)

    eager_loss = loss_fn(model, x, t)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(model, x, t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge)
    # a full step (forward, backward, SGD) compiled as one graph
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fwd(x, t):
        return loss_fn(model, x, t)

    before = [p.detach().clone() for p in model.parameters()]
    fwd(x, t).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(8, 256, requires_grad=True)

    def f(x):
        return (fake_quantize(x * 2, "int4-g128", ste="clipped") ** 2).sum()

    out = torch.compile(f, fullgraph=True)(x)
    (g,) = torch.autograd.grad(out, x)
    out_e = f(x)
    (g_e,) = torch.autograd.grad(out_e, x)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(g, g_e)


def test_fake_quant_linear():
    torch.manual_seed(0)
    lin = nn.Linear(256, 32)
    fq = lethe.nn.FakeQuantLinear.from_linear(lin, preset="int4-g128")
    assert fq.weight is lin.weight and fq.bias is lin.bias
    x = torch.randn(4, 256)
    y = fq(x)
    torch.testing.assert_close(y, nn.functional.linear(x, fake_quantize(lin.weight, "int4-g128"), lin.bias))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    fq.enabled = False
    torch.testing.assert_close(fq(x), lin(x))
    with pytest.raises(ValueError, match="group_size"):
        lethe.nn.FakeQuantLinear(100, 4, preset="int4-g128")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 128)
        self.norm = nn.LayerNorm(128)
        self.lin = nn.Linear(128, 256)
        self.head = nn.Linear(256, 50, bias=False)

    def forward(self, ids):
        return self.head(torch.relu(self.lin(self.norm(self.emb(ids)))))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quantized_weights_round_trip_and_restore(preset):
    torch.manual_seed(0)
    model = _Tiny()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    with lethe.quantized_weights(model, preset) as m:
        assert m is model
        for name in ["emb.weight", "lin.weight", "head.weight"]:
            expect = fake_quantize(originals[name], preset)
            assert torch.equal(dict(model.named_parameters())[name], expect), name
        assert torch.equal(model.norm.weight, originals["norm.weight"])  # 1-D gains untouched
        assert torch.equal(model.lin.bias, originals["lin.bias"])
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n


def test_quantized_weights_restores_on_exception_and_selects_modules():
    model = _Tiny()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError):
        with lethe.quantized_weights(model, "int8", modules="linear"):
            assert torch.equal(model.emb.weight, originals["emb.weight"])  # not a Linear
            assert not torch.equal(model.lin.weight, originals["lin.weight"])
            raise KeyError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n
    with lethe.quantized_weights(model, "int8", modules=["head"]):
        assert torch.equal(model.lin.weight, originals["lin.weight"])
        assert not torch.equal(model.head.weight, originals["head.weight"])
    with pytest.raises(ValueError, match="not found"):
        with lethe.quantized_weights(model, "int8", modules=["nope"]):
            pass


def test_quantized_weights_group_error_names_module():
    model = nn.Sequential(nn.Linear(100, 8))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"module '0'.*group_size=128"):
        with lethe.quantized_weights(model, "int4-g128"):
            pass
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(preset="int4-g100"), ValueError, "preset must be one of"),
        (dict(preset="int4-g128", group_size=7), ValueError, "group_size=7 must divide"),
        (dict(preset="int4-g128", bits=9), ValueError, r"bits must be in \[2, 8\]"),
        (dict(preset="int4-g128", bits=1), ValueError, r"bits must be in \[2, 8\]"),
        (dict(preset="nf4-b64", bits=3), ValueError, "bits must be 4 for the nf4"),
        (dict(preset="int4-g128", granularity="col"), ValueError, "granularity must be"),
        (dict(preset="int4-g128", scale_rule=-1.0), ValueError, "scale_rule must be"),
        (dict(preset="int4-g128", ste="soft"), ValueError, "ste must be"),
        (dict(preset="int4-g128", backend="cudnn"), ValueError, "backend must be one of"),
        (dict(preset="int4-g128", codebook="fp4"), ValueError, "codebook must be"),
        (dict(preset=3), TypeError, "preset must be a str"),
        (dict(preset="int4-g128", group_sizes=3), TypeError, "unexpected keyword"),
    ],
)
def test_bad_public_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fake_quantize(torch.randn(4, 256), **kwargs)


@pytest.mark.parametrize("x", [torch.arange(256).view(2, 128), torch.ones(2, 128, dtype=torch.bool),
                               torch.randn(2, 128, dtype=torch.complex64), torch.randn(2, 128, dtype=torch.float64)])
def test_bad_public_dtypes(x):
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16"):
        fake_quantize(x, "int4-g128")


def test_bad_public_type():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fake_quantize([1.0, 2.0], "int8")


# Bad op arguments: (args after x, exception, message), x = randn(4, 8) unless given
BAD_OP = [
    ((3, 4, 0, True, 7.0, False), ValueError, r"group_size \(3\) must divide the number of elements of x \(32\)"),
    ((0, 4, 0, True, 7.0, False), ValueError, "group_size must be >= 1, got 0"),
    ((8, 9, 0, True, 7.0, False), ValueError, r"bits must be in \[2, 8\], got 9"),
    ((8, 1, 0, False, 1.0, False), ValueError, r"bits must be in \[2, 8\], got 1"),
    ((8, 4, 2, True, 7.0, False), ValueError, r"codebook must be 0 \(int\) or 1 \(nf4\), got 2"),
    ((8, 4, 0, True, 0.0, False), ValueError, "scale_div must be a positive finite number, got 0"),
    ((8, 4, 0, True, float("inf"), False), ValueError, "scale_div must be a positive finite number, got inf"),
    ((8, 2, 1, True, 1.0, False), ValueError, "bits must be 4 for the nf4 codebook, got 2"),
]


@pytest.mark.parametrize("args,exc,match", BAD_OP)
def test_bad_op_arguments_same_message_everywhere(args, exc, match):
    x = torch.randn(4, 8)
    calls = [lambda b=b: b("fake_quantize", x, *args) for b in (B.CPU, B.TRITON) + ((B.CUDA,) if B.GPU else ())]
    B.assert_same_error(calls + [lambda: check_fake_quantize(x, *args, values=True)], exc, match)


def test_bad_op_dtype_same_message_everywhere():
    x = torch.randn(4, 8).double()
    calls = [lambda b=b: b("fake_quantize", x, 8, 4, 0, True, 7.0, False)
             for b in (B.CPU, B.TRITON) + ((B.CUDA,) if B.GPU else ())]
    B.assert_same_error(calls + [lambda: check_fake_quantize(x, 8, 4, 0, True, 7.0, False)], TypeError,
                        "x must be float32, float16 or bfloat16, got torch.float64")


def test_unsupported_device_and_backend_errors():
    with pytest.raises(RuntimeError, match="device 'xla'"):
        _backend._resolve("fake_quantize", "xla", "auto")
    if not _backend.triton_interpreted() and not B.GPU:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
            fake_quantize(torch.randn(2, 128), "int4-g128", backend="triton")


def test_meta_tensors():
    y = fake_quantize(torch.empty(3, 256, device="meta"), "int4-g128")
    assert y.device.type == "meta" and y.shape == (3, 256)


def test_spec_group_length():
    x = torch.empty(3, 4, 256)
    assert QuantSpec(granularity="tensor").group_length(x) == 3 * 4 * 256
    assert QuantSpec(granularity="row").group_length(x) == 256
    assert QuantSpec(granularity="group", group_size=64).group_length(x) == 64
    assert math.isclose(quant_spec("int4-g128", scale_rule=6.0).scale_div, 6.0)


# ---- fake_quantize_backward: the clipped STE's select, as its own op ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", B.grid([(0,), (1,), (7,), (7, 3), (255,), (256,), (4097,), (2, 65537),
                                                  (4, 4, 33), (1000003,)], ids=str))
def test_fake_quantize_backward_matches_where(backend, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(shape, generator=g).to(dtype)
    if grad.numel() > 3:
        grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])  # NaN where masked out must be 0
    mask = torch.rand(shape, generator=g) < 0.6
    if grad.numel():
        mask.view(-1)[0] = False
    out = backend("fake_quantize_backward", grad, mask)
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    assert out.dtype == dtype and out.shape == grad.shape
    assert torch.equal(out.view(-1).view(INT_VIEW[dtype]), expected.view(-1).view(INT_VIEW[dtype]))


def test_fake_quantize_backward_noncontiguous_and_double_backward(backend):
    grad = torch.randn(6, 10).t()  # not contiguous
    mask = (torch.rand(10, 6) < 0.5)
    assert torch.equal(backend("fake_quantize_backward", grad, mask), torch.where(mask, grad, 0.0))
    # the clipped STE is linear in the incoming gradient: its own backward is the same select
    x = backend.to(torch.randn(8, 128)).requires_grad_(True)
    gy = backend.to(torch.randn(8, 128)).requires_grad_(True)
    y = backend.public(fake_quantize, x, "int4-g128", ste="clipped")
    gx, = torch.autograd.grad(y, x, gy, create_graph=True)
    ggy, = torch.autograd.grad(gx.sum(), gy)
    _, mask = fake_quantize_codes(x.detach().cpu(), 128, 4, 0, True, 7.5)
    assert torch.equal(ggy.cpu(), mask.float())


def test_fake_quantize_backward_opcheck_and_errors(backend):
    grad = backend.to(torch.randn(5, 7)).requires_grad_(True)
    mask = backend.to(torch.rand(5, 7) < 0.5)
    torch.library.opcheck(backend.op("fake_quantize_backward").default, (grad, mask))
    g, m = grad.detach().cpu(), mask.cpu()
    for args, exc, match in [((g, m.float()), TypeError, "mask must be bool, got torch.float32"),
                             ((g, m[:4]), ValueError, r"mask must have grad's shape \[5, 7\], got \[4, 7\]"),
                             ((g.double(), m), TypeError, "grad must be float32, float16 or bfloat16, got torch.float64")]:
        B.assert_same_error([lambda: backend("fake_quantize_backward", *args),
                             lambda: check_fake_quantize_backward(*args)], exc, match)
    if B.GPU:
        B.assert_same_error([lambda b=b: b.op("fake_quantize_backward")(g.cuda(), m) for b in (B.CUDA, B.TRITON)],
                            ValueError, r"mask must be on grad's device \(cuda:0\), got cpu")


# ---- silent wrong results found by trying lethe as a new user would ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("raise_inside", [False, True])
def test_quantized_weights_tied_weights(dtype, raise_inside):
    # GPT-2 ties wte and lm_head: the shared weight is quantised once and restored bit for bit
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=128, n_layer=1, n_head=2,
                                                                 n_positions=16)).to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with lethe.quantized_weights(model, "int4-g128"):
            expect = fake_quantize(originals["transformer.wte.weight"], "int4-g128")
            assert torch.equal(model.transformer.wte.weight, expect)  # once, not twice
            # GPT-2's Conv1D keeps [in, out]: grouped along the input features, its first dimension
            w = originals["transformer.h.0.attn.c_attn.weight"]
            assert torch.equal(model.transformer.h[0].attn.c_attn.weight, fake_quantize(w.t(), "int4-g128").t())
            if raise_inside:
                raise KeyError("boom")
    except KeyError:
        assert raise_inside
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n


def test_quantized_weights_linear_includes_conv1d_and_shared_storage():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=128, n_layer=1, n_head=2,
                                                                 n_positions=16))
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    with lethe.quantized_weights(model, "int8", modules="linear"):
        assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)  # Conv1D is a linear layer
    # one Parameter in two modules: quantised once
    a, b = nn.Linear(128, 8, bias=False), nn.Linear(128, 8, bias=False)
    b.weight = a.weight
    seq = nn.Sequential(a, b)
    w0 = a.weight.detach().clone()
    with lethe.quantized_weights(seq, "int4-g128"):
        assert torch.equal(a.weight, fake_quantize(w0, "int4-g128"))
    assert torch.equal(a.weight, w0)
    # two modules whose weights are different views of one storage: refused, untouched
    big = nn.Parameter(torch.randn(16, 128))
    c, d = nn.Linear(128, 8, bias=False), nn.Linear(128, 8, bias=False)
    c.weight, d.weight = nn.Parameter(big.data[:8]), nn.Parameter(big.data[8:])
    with pytest.raises(ValueError, match="share memory as different views"):
        with lethe.quantized_weights(nn.Sequential(c, d), "int8"):
            pass


def test_quantized_weights_refuses_a_parametrized_weight():
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(128, 8))
    with pytest.raises(ValueError, match="module '0' computes its weight through a parametrization"):
        with lethe.quantized_weights(nn.Sequential(lin), "int8"):
            pass


def test_spec_and_module_arguments_are_checked():
    with pytest.raises(TypeError, match="symmetric must be a bool, got str 'no'"):
        QuantSpec(symmetric="no")
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        lethe.nn.FakeQuantLinear(128, 4, dtype=torch.float64)


def test_bad_cache_size_warns_and_keeps_the_cache():
    import os
    import subprocess
    import sys

    code = ("import warnings\nwith warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    import lethe\nprint([str(x.message) for x in w if 'LETHE_CPU_CACHE_MB' in str(x.message)])\n"
            "print(lethe.ops.cpu_cache_info()['limit_bytes'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, LETHE_CPU_CACHE_MB="abc"))
    assert "must be a whole number of MiB" in r.stdout and str(1024 << 20) in r.stdout, r.stdout + r.stderr
