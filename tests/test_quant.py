"""quant family on CPU: the C++ kernel against the pure-PyTorch reference, autograd, opcheck,
torch.compile, modules, the context manager, and bad input."""
import math

import pytest
import torch
from torch import nn

import lethe

from lethe.ops import _backend
from lethe.ops.quant import PRESETS, QuantSpec, fake_quantize, quant_spec
from lethe.ops.quant_reference import fake_quantize_codes


# (shape, op group length) with awkward sizes: one element, odd groups, one row, a group larger
# than the CPU kernel's chunk (two-pass path), many tiny groups.
OP_CASES = [
    ((1,), 1),
    ((5, 3), 3),
    ((1, 7), 7),
    ((3, 130), 130),
    ((4, 256), 128),
    ((2, 64 * 3), 64),
    ((2, 20001), 20001),
    ((3, 40000), 120000),
    ((257, 5), 1285),
    ((1000,), 1),
]
# (bits, codebook, symmetric, scale_div)
QUANTS = [
    (4, 0, True, 7.0),
    (4, 0, True, 7.5),
    (2, 0, True, 1.0),
    (3, 0, True, 3.5),
    (8, 0, True, 127.0),
    (4, 0, False, 1.0),
    (2, 0, False, 1.0),
    (8, 0, False, 1.0),
    (4, 1, True, 1.0),
]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    if flat.numel() > 10:
        flat[flat.numel() // 3] = 40.0  # an outlier that sets one group's scale
        flat[-2:] = 0.0
    return x.to(dtype)


def _run(x, q, L, mask):
    return torch.ops.lethe.fake_quantize(x, L, *q, mask)


@pytest.mark.parametrize("shape,L", OP_CASES)
@pytest.mark.parametrize("q", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_matches_reference(shape, L, q, dtype):
    x = _inputs(shape, dtype)
    y, mask = _run(x, q, L, True)
    y_ref, mask_ref = fake_quantize_codes(x, L, *q)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mask, mask_ref)
    y2, empty = _run(x, q, L, False)
    assert torch.equal(y2, y) and empty.numel() == 0


@pytest.mark.parametrize("q", QUANTS)
def test_all_zero_tiny_and_tied_values(q):
    x = torch.zeros(4, 16)
    x[1] = torch.arange(16) * 0.5 - 4.0  # exact halves: ties under absmax/qmax scales
    x[2] = 1e-42  # absmax underflows the scale
    x[3] = torch.linspace(-7, 7, 16)
    y, mask = _run(x, q, 16, True)
    y_ref, mask_ref = fake_quantize_codes(x, 16, *q)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(y[0], torch.zeros(16)) and mask[0].all()


def test_round_half_to_even_and_clamp():
    # paper-int4 per row: scale = absmax / 7 = 1, so x / scale is exactly x.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 7.0, -7.0]])
    y = fake_quantize(x, "paper-int4")
    assert y.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, 4.0, 7.0, -7.0]]
    # torchao rule absmax/7.5: the absmax element lands on 7.5 -> 8 -> clamped to 7.
    y, mask = torch.ops.lethe.fake_quantize(torch.tensor([7.5, 1.0]), 2, 4, 0, True, 7.5, True)
    assert y.tolist() == [7.0, 1.0] and mask.tolist() == [False, True]


def test_nonfinite_groups_are_nan_and_others_untouched():
    x = torch.randn(4, 32)
    x[1, 5] = float("inf")
    x[2, 0] = float("nan")
    x.requires_grad_(True)
    for preset in ["int4-g128-asym", "nf4-b64", "paper-int4"]:
        spec = quant_spec(preset, granularity="row", group_size=None)
        y = fake_quantize(x, spec, ste="clipped")
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
        g, = torch.autograd.grad(y, x, torch.ones_like(y))
        assert (g[1:3] == 0).all() and (g[0] != 0).any()
        y = fake_quantize(x, spec, ste="identity")
        g, = torch.autograd.grad(y, x, torch.ones_like(y))
        assert (g == 1).all()


def test_noncontiguous_input():
    x = torch.randn(256, 64).t()  # last dim 256, not contiguous
    assert not x.is_contiguous()
    y = fake_quantize(x, "int4-g128")
    torch.testing.assert_close(y, fake_quantize(x.contiguous(), "int4-g128"), rtol=0, atol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_matches_reference_with_gradients(preset, ste, dtype):
    x = (torch.randn(6, 384) * 2).to(dtype).requires_grad_(True)
    gy = torch.randn(6, 384).to(dtype)
    y = fake_quantize(x, preset, ste=ste)
    (gx,) = torch.autograd.grad(y, x, gy)
    y_ref = fake_quantize(x, preset, ste=ste, backend="reference")
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    if ste == "identity":
        assert torch.equal(gx, gy)


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
    levels = torch.tensor(lethe.ops.quant_reference.NF4_LEVELS)
    ratio = y / w.view(-1, 64).abs().amax(1, keepdim=True)
    assert torch.isclose(ratio.unsqueeze(-1), levels, atol=1e-6).any(-1).all()


OPCHECK_ARGS = [
    ((4, 256), (128, 4, 0, True, 7.5, False)),
    ((4, 256), (128, 4, 0, True, 7.5, True)),
    ((3, 50), (50, 4, 0, False, 1.0, True)),
    ((2, 128), (64, 4, 1, True, 1.0, False)),
    ((5, 7), (35, 8, 0, True, 127.0, True)),
]


@pytest.mark.parametrize("shape,args", OPCHECK_ARGS)
def test_opcheck(shape, args):
    x = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.lethe.fake_quantize.default, (x, *args))


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
def test_bad_arguments(kwargs, exc, match):
    x = torch.randn(4, 256)
    with pytest.raises(exc, match=match):
        fake_quantize(x, **kwargs)


@pytest.mark.parametrize("x", [torch.arange(256).view(2, 128), torch.ones(2, 128, dtype=torch.bool),
                               torch.randn(2, 128, dtype=torch.complex64), torch.randn(2, 128, dtype=torch.float64)])
def test_bad_dtypes(x):
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16"):
        fake_quantize(x, "int4-g128")


def test_bad_type():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fake_quantize([1.0, 2.0], "int8")


def test_compiled_op_checks_its_arguments():
    x = torch.randn(4, 8)
    for args, match in [
        ((3, 4, 0, True, 7.0, False), r"group_size \(3\) must divide"),
        ((0, 4, 0, True, 7.0, False), "group_size must be >= 1"),
        ((8, 9, 0, True, 7.0, False), r"bits must be in \[2, 8\]"),
        ((8, 4, 2, True, 7.0, False), "codebook must be"),
        ((8, 4, 0, True, 0.0, False), "scale_div must be a positive"),
        ((8, 2, 1, True, 1.0, False), "bits must be 4 for the nf4"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lethe.fake_quantize(x, *args)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.lethe.fake_quantize(x.double(), 8, 4, 0, True, 7.0, False)


def test_unsupported_device_and_backend_errors():
    with pytest.raises(RuntimeError, match="device 'xla'"):
        _backend._resolve("fake_quantize", "xla", "auto")
    if not _backend.triton_interpreted():
        with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
            fake_quantize(torch.randn(2, 128), "int4-g128", backend="triton")


def test_meta_and_empty_tensors():
    y = fake_quantize(torch.empty(3, 256, device="meta"), "int4-g128")
    assert y.device.type == "meta" and y.shape == (3, 256)
    for preset in ["int8", "paper-int4", "int4-g128"]:
        e = torch.empty(0, 256)
        assert fake_quantize(e, preset).shape == (0, 256)


def test_spec_group_length():
    x = torch.empty(3, 4, 256)
    assert QuantSpec(granularity="tensor").group_length(x) == 3 * 4 * 256
    assert QuantSpec(granularity="row").group_length(x) == 256
    assert QuantSpec(granularity="group", group_size=64).group_length(x) == 64
    assert math.isclose(quant_spec("int4-g128", scale_rule=6.0).scale_div, 6.0)


# ---- fake_quantize_backward: the clipped STE's select, as its own op ----

def ste_backward_case(n, dtype):
    """(grad [n], mask [n]) for the GPU tests of the select: a NaN gradient at a masked-out
    position, which must become 0."""
    g = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=g).to(dtype)
    grad[0] = float("nan")
    mask = torch.rand(n, generator=g) < 0.5
    mask[0] = False
    return grad, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (2, 65537), (4, 4, 33)])
def test_fake_quantize_backward_matches_where(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(shape, generator=g).to(dtype)
    if grad.numel() > 3:
        grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    mask = torch.rand(shape, generator=g) < 0.6
    out = torch.ops.lethe.fake_quantize_backward(grad, mask)
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    assert out.dtype == dtype and out.shape == grad.shape
    assert torch.equal(out.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_fake_quantize_backward_noncontiguous_and_double_backward():
    grad = torch.randn(6, 10).t()  # not contiguous
    mask = (torch.rand(10, 6) < 0.5)
    out = torch.ops.lethe.fake_quantize_backward(grad, mask)
    assert torch.equal(out, torch.where(mask, grad, 0.0))
    # the clipped STE is linear in the incoming gradient: its own backward is the same select
    x = torch.randn(8, 128, requires_grad=True)
    gy = torch.randn(8, 128, requires_grad=True)
    y = fake_quantize(x, "int4-g128", ste="clipped")
    gx, = torch.autograd.grad(y, x, gy, create_graph=True)
    ggy, = torch.autograd.grad(gx.sum(), gy)
    _, mask = torch.ops.lethe.fake_quantize(x.detach(), 128, 4, 0, True, 7.5, True)
    assert torch.equal(ggy, mask.float())


def test_fake_quantize_backward_opcheck_and_errors():
    grad = torch.randn(5, 7, requires_grad=True)
    mask = torch.rand(5, 7) < 0.5
    torch.library.opcheck(torch.ops.lethe.fake_quantize_backward.default, (grad, mask))
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.lethe.fake_quantize_backward(grad, mask.float())
    with pytest.raises(RuntimeError, match="mask must have grad's shape"):
        torch.ops.lethe.fake_quantize_backward(grad, mask[:4])
    with pytest.raises(RuntimeError, match="grad must be float32"):
        torch.ops.lethe.fake_quantize_backward(grad.double(), mask)
