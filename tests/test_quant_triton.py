"""Triton fake_quantize (lethe.triton_kernels.quant) against the pure-PyTorch reference, bit for bit.

On a machine without a CUDA GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
tests/conftest.py; see tests/triton_util.py). The interpreter truncates fp32 -> bf16 stores, which
the GPU rounds to nearest even: bfloat16 results are compared with the reference rounded the way
this Triton stores (triton_util.as_stored)."""
import pytest
import torch

from test_quant import ste_backward_case
from triton_util import DEVICE, as_stored, assert_kernels_run_where_they_can
from lethe.ops.quant_reference import fake_quantize_codes
from lethe.triton_kernels import quant as tq
from lethe.triton_kernels.quant import fake_quantize

pytestmark = [pytest.mark.triton]


def test_kernels_run_where_they_can():
    assert_kernels_run_where_they_can(tq._fq_small_kernel)


DTYPES = [torch.float32, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def check(x, group_size, bits, codebook, symmetric, scale_div):
    """Triton == reference: y (bits of every non-NaN value, zero signs included) and mask."""
    y, mask = fake_quantize(x, group_size, bits, codebook, symmetric, scale_div, True)
    ry, rmask = fake_quantize_codes(x, group_size, bits, codebook, symmetric, scale_div)
    ry = as_stored(ry, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert mask.dtype == torch.bool and mask.shape == x.shape
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(mask, rmask, rtol=0, atol=0)
    keep = ~torch.isnan(ry)
    assert torch.equal(y.view(INT_VIEW[x.dtype])[keep], ry.view(INT_VIEW[x.dtype])[keep])
    y2, empty = fake_quantize(x, group_size, bits, codebook, symmetric, scale_div, False)
    assert torch.equal(y2.view(INT_VIEW[x.dtype]), y.view(INT_VIEW[x.dtype]))
    assert empty.dtype == torch.bool and empty.numel() == 0 and empty.device == x.device


def data(shape, dtype, seed=0, specials=True):
    """Random values, with (when the tensor is big enough) an all-zero stretch, -0.0, exact ties
    (k + 0.5 under scale 1), an Inf, a NaN and a subnormal stretch, each in its own region."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    n = flat.numel()
    if specials and n >= 400:
        flat[0:40] = 0.0
        flat[3] = -0.0
        flat[40:72] = torch.arange(-16, 16) * 0.5
        flat[71] = 8.0
        flat[130] = float("inf")
        flat[261] = float("nan")
        flat[300:320] = torch.randn(20, generator=g) * 1e-40  # absmax/scale underflow
        flat[390] = -float("inf")
    return x.to(dtype).to(DEVICE)


INT_CONFIGS = [  # (bits, symmetric, scale_div)
    (4, True, 7.0),
    (8, True, 7.5),
    (3, False, 1.0),
    (2, True, 7.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 3, 5, 127, 128, 130, 780])
def test_group_sizes(dtype, group_size):
    shape = {127: (2, 127), 128: (4, 128)}.get(group_size, (6, 130))
    x = data(shape, dtype, seed=group_size)
    for bits, symmetric, scale_div in INT_CONFIGS:
        check(x, group_size, bits, 0, symmetric, scale_div)
    if x.numel() % 64 == 0:
        check(x, 64, 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_bits(dtype, bits):
    x = data((4, 130), dtype, seed=bits)
    check(x, 65, bits, 0, True, 7.0)
    check(x, 65, bits, 0, True, 7.5)
    check(x, 65, bits, 0, True, float(2 ** (bits - 1)) - 0.5)
    check(x, 65, bits, 0, False, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4(dtype):
    x = data((8, 128), dtype, seed=4)
    check(x, 64, 4, 1, True, 1.0)
    check(x, 1024, 4, 1, False, 1.0)
    # the midpoints themselves and their fp32 neighbours, scale 1
    _, mids = tq._tables("cpu")
    v = torch.cat([mids, mids.nextafter(torch.full_like(mids, 2.0)),
                   mids.nextafter(torch.full_like(mids, -2.0)), torch.tensor([1.0])])
    check(v.to(DEVICE), v.numel(), 4, 1, True, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_groups(dtype):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0] = 0.0
    x[1] = -0.0
    x[2, 3] = float("inf")
    x[3, 0] = float("nan")
    x[4, 15] = -float("inf")
    x[5, :8] = 0.0  # zero group within a live row for group 8
    x[6] = torch.linspace(-3.0, 5.0, 16).to(dtype)
    x = x.to(DEVICE)
    for gs in (8, 16, 128):
        for bits, symmetric, scale_div in INT_CONFIGS:
            check(x, gs, bits, 0, symmetric, scale_div)
        check(x, gs, 4, 1, True, 1.0)
    # subnormal groups: scale underflows to 0 for some, stays tiny for others
    t = (torch.tensor([1.0, -3.0, 2.5, 7.0]) * 1e-45).repeat(4) * torch.arange(1, 17)
    for bits, symmetric, scale_div in INT_CONFIGS:
        check(t.to(DEVICE), 4, bits, 0, symmetric, scale_div)
    # ties under scale 1 (x / scale = k + 0.5), and |x / scale| beyond 2^22 and 2^23
    ties = torch.cat([torch.arange(-16, 16) * 0.5, torch.tensor([8.0])])
    check(ties.to(DEVICE), 33, 8, 0, True, 8.0)
    check(x[6:8], 16, 8, 0, True, 3.0e7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_groups(dtype, monkeypatch):
    """The three-launch path (partial stats, merge, apply) at small sizes."""
    monkeypatch.setattr(tq, "SMALL_GROUP_MAX", 64)
    monkeypatch.setattr(tq, "CHUNK", 64)
    monkeypatch.setattr(tq, "PARTIAL_BLOCK", 4)
    x = data((6, 130), dtype, seed=7)
    for gs in (65, 130, 780):  # 2, 3 and 13 chunks, the last one partial (of 1, 2, 12)
        for bits, symmetric, scale_div in INT_CONFIGS[:3]:
            check(x, gs, bits, 0, symmetric, scale_div)
    check(x, 260, 4, 1, True, 1.0)
    check(data((3, 100), dtype, seed=8, specials=False), 100, 4, 1, True, 1.0)


def test_large_groups_default_threshold():
    x = data((2, tq.SMALL_GROUP_MAX + 4), torch.float32, seed=9)
    check(x, x.shape[1], 4, 0, True, 7.0)
    check(x, x.shape[1], 8, 0, False, 1.0)
    x = data((1, 2 * tq.SMALL_GROUP_MAX), torch.float16, seed=10)
    check(x, x.numel(), 4, 1, True, 1.0)
    check(x, tq.SMALL_GROUP_MAX, 5, 0, True, 15.5)  # the largest single-program group


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(dtype):
    check(data((1, 37), dtype, seed=11), 37, 4, 0, True, 7.0)  # one row, one group
    check(data((37,), dtype, seed=12), 1, 3, 0, False, 1.0)  # 1-D
    check(data((3, 5, 26), dtype, seed=13), 130, 4, 0, True, 7.5)
    check(data((2, 3, 1, 4), dtype, seed=14), 24, 6, 0, False, 1.0)
    xt = data((130, 6), dtype, seed=15).t()  # non-contiguous: groups follow the row-major layout
    assert not xt.is_contiguous()
    check(xt, 13, 4, 0, True, 7.0)


@pytest.mark.parametrize("return_mask", [True, False])
def test_empty(return_mask):
    x = torch.empty(0, 8, device=DEVICE)
    y, mask = fake_quantize(x, 4, 4, 0, True, 7.0, return_mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mask.dtype == torch.bool and mask.shape == (x.shape if return_mask else (0,))


def test_bfloat16():
    x = data((6, 130), torch.bfloat16, seed=16)
    for gs in (5, 130, 780):
        for bits, symmetric, scale_div in INT_CONFIGS:
            check(x, gs, bits, 0, symmetric, scale_div)
    check(x[:, :128].contiguous(), 64, 4, 1, True, 1.0)


def test_bad_arguments():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError):
        fake_quantize(x, 3, 4, 0, True, 7.0, True)  # does not divide numel
    with pytest.raises(ValueError):
        fake_quantize(x, 8, 9, 0, True, 7.0, True)
    with pytest.raises(ValueError):
        fake_quantize(x, 8, 3, 1, True, 1.0, True)  # nf4 needs bits 4
    with pytest.raises(ValueError):
        fake_quantize(x, 8, 4, 2, True, 7.0, True)
    with pytest.raises(ValueError):
        fake_quantize(x, 8, 4, 0, True, 0.0, True)
    with pytest.raises(TypeError):
        fake_quantize(x.double(), 8, 4, 0, True, 7.0, True)


@pytest.mark.parametrize("preset", ["paper-int4", "int4-g128", "int4-g128-asym", "nf4-b64", "int8"])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_public_api_backend_triton_with_gradients(preset, ste):
    import lethe

    x = (torch.randn(3, 256, device=DEVICE) * 2).requires_grad_(True)
    gy = torch.randn(3, 256, device=DEVICE)
    y = lethe.fake_quantize(x, preset, ste=ste, backend="triton")
    (gx,) = torch.autograd.grad(y, x, gy)
    y_ref = lethe.fake_quantize(x, preset, ste=ste, backend="reference")
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


@pytest.mark.parametrize("args", [(128, 4, 0, True, 7.5, True), (64, 4, 1, True, 1.0, False), (3, 3, 0, False, 1.0, True)])
def test_opcheck_triton_op(args):
    import lethe  # noqa: F401  (registers lethe::fake_quantize_triton)

    x = torch.randn(2, 384, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.lethe.fake_quantize_triton.default, (x, *args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_fake_quantize_backward(n, dtype):
    import lethe  # noqa: F401  (registers lethe::fake_quantize_backward_triton)

    grad, mask = ste_backward_case(n, dtype)
    out = tq.fake_quantize_backward(grad.to(DEVICE), mask.to(DEVICE))
    assert out.dtype == dtype and out.shape == (n,)
    assert torch.equal(out.cpu(), torch.where(mask, grad, torch.zeros((), dtype=dtype)))
    torch.library.opcheck(torch.ops.lethe.fake_quantize_backward_triton.default,
                          (grad.to(DEVICE).requires_grad_(True), mask.to(DEVICE)))
    with pytest.raises(ValueError):
        tq.fake_quantize_backward(grad.to(DEVICE), mask[:-1].to(DEVICE))
    with pytest.raises(TypeError):
        tq.fake_quantize_backward(grad.to(DEVICE), mask.float().to(DEVICE))
