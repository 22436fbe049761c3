"""CUDA fake_quantize (csrc/cuda/quant.cu) against the pure-PyTorch reference, bit for bit.

The reference (lethe.ops.quant_reference.fake_quantize_codes) runs on the CPU in fp32; the kernel's
y must equal the reference y cast to x's dtype exactly (NaN where the reference has NaN), and the
clipped-STE mask must be identical. Shapes cover both CUDA paths: the fused kernel (group_size <=
4096, with every team width 1..32 lanes and both the 16-byte vector and the scalar variants) and
the two-kernel chunked path (group_size > 4096, partial last chunk, > 1024 chunks per group)."""
import math

import pytest
import torch

import lethe  # noqa: F401  (loads lethe._C, which registers torch.ops.lethe.*)
from lethe.ops.quant_reference import NF4_LEVELS, fake_quantize_codes
from test_quant import ste_backward_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, bits, codebook, symmetric, scale_div)
CONFIGS = [
    ("sym4_div7", 4, 0, True, 7.0),
    ("sym4_div7.5", 4, 0, True, 7.5),  # rne(absmax / scale) = 8 > qmax: clamps, mask has zeros
    ("sym8_div127", 8, 0, True, 127.0),
    ("asym4", 4, 0, False, 1.0),
    ("asym8", 8, 0, False, 1.0),
    ("nf4", 4, 1, False, 1.0),
]

# (shape, group_size): odd sizes, one row, whole-tensor groups, groups spanning rows, fused and
# chunked (> 4096) paths.
SHAPES = [
    ((7, 3), 1),
    ((4, 9), 3),
    ((3, 127), 127),
    ((2, 6, 128), 128),
    ((6, 64), 128),  # groups span two rows
    ((5, 16), 16),
    ((1, 4096), 4096),  # one row
    ((3, 4096), 4096),
    ((37, 11), 407),  # whole tensor, odd size
    ((2, 4097), 4097),  # smallest chunked group, odd
    ((3, 16388), 16388),  # chunked, last chunk holds 4 elements
    ((1, 50000), 50000),  # one row, chunked
    ((2, 3, 50000), 50000),
    ((24584,), 24584),  # whole tensor, chunked
]


def _data(shape, group_size, dtype, seed):
    """Normal data with a per-group magnitude spread over several decades, plus a few outliers."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    groups = n // group_size
    x = torch.randn(groups, group_size, generator=g)
    # magnitudes e^-8 .. e^5; |x| stays far below the float16 limit even with the outliers
    x = x * torch.exp((2.0 * torch.randn(groups, 1, generator=g)).clamp(-8.0, 5.0))
    flat = x.reshape(-1)
    k = max(1, n // 97)
    idx = torch.randint(0, n, (k,), generator=g)
    flat[idx] = flat[idx] * 8.0
    return flat.reshape(shape).to(dtype)


def _check(x, group_size, bits, codebook, symmetric, scale_div, return_mask=True):
    y, mask = torch.ops.lethe.fake_quantize(
        x, group_size, bits, codebook, symmetric, scale_div, return_mask
    )
    y_ref, kept_ref = fake_quantize_codes(x.cpu(), group_size, bits, codebook, symmetric, scale_div)
    assert y.device == x.device
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    assert y.is_contiguous()
    torch.testing.assert_close(y.cpu(), y_ref.to(x.dtype), rtol=0, atol=0, equal_nan=True)
    assert mask.device == x.device
    assert mask.dtype == torch.bool
    if return_mask:
        assert mask.shape == x.shape
        assert torch.equal(mask.cpu(), kept_ref)
    else:
        assert mask.shape == (0,)
    return y, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0])
def test_matches_reference(cfg, shape, group_size, dtype):
    _, bits, codebook, symmetric, scale_div = cfg
    x = _data(shape, group_size, dtype, seed=group_size).cuda()
    _check(x, group_size, bits, codebook, symmetric, scale_div)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape,group_size", [((8, 64), 64), ((3, 127), 127), ((2, 5000), 5000)])
def test_bits(shape, group_size, symmetric, bits, dtype):
    x = _data(shape, group_size, dtype, seed=bits).cuda()
    # scale_div just below 2^(b-1) so the largest magnitudes clamp on the positive side
    scale_div = 2.0 ** (bits - 1) - 0.5 if symmetric else 1.0
    _check(x, group_size, bits, 0, symmetric, scale_div)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", [((16, 64), 64), ((4, 4096), 4096), ((2, 9000), 9000)])
def test_nf4_group(shape, group_size, dtype):
    x = _data(shape, group_size, dtype, seed=7).cuda()
    _check(x, group_size, 4, 1, False, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [3, 64, 128, 4096, 4097, 50000])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0])
def test_special_groups(cfg, group_size, dtype):
    """Groups holding +Inf, -Inf or NaN give NaN and a zero mask; all-zero groups give 0 and a
    true mask; the other groups are untouched by their neighbours."""
    _, bits, codebook, symmetric, scale_div = cfg
    groups = 7
    x = torch.randn(groups, group_size, generator=torch.Generator().manual_seed(11))
    x[1, group_size // 2] = float("inf")
    x[2, 0] = float("nan")
    x[3] = 0.0
    x[4, group_size - 1] = float("-inf")
    x[5, :] = 0.0
    x[5, group_size - 1] = float("nan")
    x = x.to(dtype).cuda()
    y, mask = _check(x, group_size, bits, codebook, symmetric, scale_div)
    y = y.float().cpu()
    mask = mask.cpu()
    for r in (1, 2, 4, 5):
        assert torch.isnan(y[r]).all()
        assert not mask[r].any()
    assert (y[3] == 0).all() and mask[3].all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[6]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [1, 3, 64, 4097])
def test_all_zero(group_size, dtype):
    x = torch.zeros(5, group_size, dtype=dtype, device="cuda")
    for _, bits, codebook, symmetric, scale_div in CONFIGS:
        y, mask = _check(x, group_size, bits, codebook, symmetric, scale_div)
        assert (y == 0).all() and mask.all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_half_even_ties(dtype):
    """Exact ties of x / scale round to even, as torch.round does."""
    L = 16
    # symmetric, absmax 7, scale_div 7: scale 1, half-integers are ties
    sym = torch.tensor([7.0, -6.5, -5.5, -4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5,
                        5.5, 6.5, 0.0])  # fmt: skip
    # asymmetric 4 bits, lo -3, hi 12: scale (6 + 1.5) / 7.5 = 1, zp 3
    asym = torch.tensor([-3.0, 12.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 8.5, 9.5, 10.5, 11.5,
                         -2.0, 0.0, 4.5])  # fmt: skip
    x = torch.stack([sym, asym]).to(dtype).cuda()
    _check(x[0:1].contiguous(), L, 4, 0, True, 7.0)
    _check(x[1:2].contiguous(), L, 4, 0, False, 1.0)
    _check(x, L, 4, 0, True, 7.0)
    _check(x, L, 4, 0, False, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_midpoints(dtype):
    """Values exactly on the NF4 midpoints (scale 1) go to the lower level (strict >)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    mids = (levels[:-1] + levels[1:]) * 0.5
    row = torch.cat([torch.tensor([1.0]), mids, levels])  # 1 + 15 + 16 = 32 elements
    x = torch.stack([row, -row, row * 3.0]).to(dtype).cuda()
    _check(x, 32, 4, 1, False, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [4, 8, 128, 4096, 8192, 50000])
def test_misaligned_input(group_size, dtype):
    """A contiguous view at an odd element offset takes the scalar (non-vector) kernels."""
    base = _data((1, 3 * group_size + 1), 3 * group_size + 1, dtype, seed=3).reshape(-1).cuda()
    x = base[1:].view(3, group_size)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    for _, bits, codebook, symmetric, scale_div in CONFIGS:
        _check(x, group_size, bits, codebook, symmetric, scale_div)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [3, 64, 4097])
def test_non_contiguous_input(group_size, dtype):
    x = _data((group_size, 6), 6, dtype, seed=5).cuda().t()  # (6, group_size), strided
    assert not x.is_contiguous()
    for _, bits, codebook, symmetric, scale_div in CONFIGS:
        _check(x, group_size, bits, codebook, symmetric, scale_div)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_mask(dtype):
    x = _data((4, 128), 128, dtype, seed=1).cuda()
    _check(x, 128, 4, 0, True, 7.5, return_mask=False)
    x = _data((2, 9000), 9000, dtype, seed=1).cuda()
    _check(x, 9000, 4, 0, False, 1.0, return_mask=False)


def test_empty():
    x = torch.empty(0, 128, device="cuda")
    y, mask = torch.ops.lethe.fake_quantize(x, 128, 4, 0, True, 7.0, True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert mask.shape == x.shape and mask.dtype == torch.bool
    y, mask = torch.ops.lethe.fake_quantize(x, 128, 4, 0, True, 7.0, False)
    assert mask.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_many_groups_grid_stride(dtype):
    """More groups / tasks than one grid covers, so the grid-stride loops wrap."""
    x = _data((2_500_000,), 1, dtype, seed=9).cuda()  # 1-lane teams, 256 groups per block
    _check(x, 1, 4, 0, True, 7.5)
    x = _data((1_000_003 * 3,), 3, dtype, seed=9).cuda()
    _check(x, 3, 4, 0, False, 1.0)
    x = _data((5000, 4097), 4097, dtype, seed=9).cuda()  # 5000 chunk tasks
    _check(x, 4097, 8, 0, True, 127.0)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] == 0], ids=lambda c: c[0])
def test_huge_group_many_chunks(cfg):
    """A whole-tensor group of 9M elements: more than 1024 chunks of 8192, so the chunk grows."""
    _, bits, codebook, symmetric, scale_div = cfg
    n = 9_000_000
    x = _data((n,), n, torch.float16, seed=13).cuda()
    _check(x, n, bits, codebook, symmetric, scale_div)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", [((8, 64), 64), ((3, 127), 127), ((2, 50000), 50000)])
def test_matches_cpu_kernel(shape, group_size, dtype):
    x = _data(shape, group_size, dtype, seed=17)
    for _, bits, codebook, symmetric, scale_div in CONFIGS:
        y_cpu, m_cpu = torch.ops.lethe.fake_quantize(
            x, group_size, bits, codebook, symmetric, scale_div, True
        )
        y_gpu, m_gpu = torch.ops.lethe.fake_quantize(
            x.cuda(), group_size, bits, codebook, symmetric, scale_div, True
        )
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(m_gpu.cpu(), m_cpu)


def test_bad_args():
    x = torch.randn(4, 6, device="cuda")
    with pytest.raises(RuntimeError):
        torch.ops.lethe.fake_quantize(x, 5, 4, 0, True, 7.0, False)  # 5 does not divide 24
    with pytest.raises(RuntimeError):
        torch.ops.lethe.fake_quantize(x, 6, 9, 0, True, 7.0, False)  # bits out of range
    with pytest.raises(RuntimeError):
        torch.ops.lethe.fake_quantize(x, 6, 3, 1, False, 1.0, False)  # nf4 needs 4 bits
    with pytest.raises(RuntimeError):
        torch.ops.lethe.fake_quantize(x.double(), 6, 4, 0, True, 7.0, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 256, 1000003])
def test_fake_quantize_backward(n, dtype):
    grad, mask = ste_backward_case(n, dtype)
    out = torch.ops.lethe.fake_quantize_backward(grad.cuda(), mask.cuda())
    assert out.device.type == "cuda" and out.dtype == dtype
    assert torch.equal(out.cpu(), torch.ops.lethe.fake_quantize_backward(grad, mask))
    with pytest.raises(RuntimeError, match="mask must be on"):
        torch.ops.lethe.fake_quantize_backward(grad.cuda(), mask)
    if n < 1000:
        torch.library.opcheck(torch.ops.lethe.fake_quantize_backward.default,
                              (grad.cuda().requires_grad_(True), mask.cuda()))
