"""token_stats family: the evaluation's per-token statistics fused with the LM head (label log-prob,
log-sum-exp, mean and variance of log p under p, argmax) on every backend (the `backend` fixture:
compiled CPU, Triton, compiled CUDA) against the pure-PyTorch reference
(python/lethe/ops/token_stats_reference.py), and the reference against a plain eager composition
in fp64; awkward shapes, non-finite logits, the public function's shapes, opcheck, torch.compile,
meta tensors, and bad input (the same message from every backend).

Where the logits must be the same on every backend, inputs are small integers (every logit exact in
fp32 whatever the summation order, so argmax ties are exact); with random inputs the CPU and Triton
backends are compared with the reference computed by the same matmul (chunk by chunk)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import backends as B
import lethe
from lethe.ops import TokenStats
from lethe.ops.token_stats import check_token_stats, token_stats
from lethe.ops.token_stats_reference import token_stats_reference

IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HOST = (B.CPU, B.TRITON)  # backends whose matmul is the reference's (random inputs compare closely)
FIELDS = ("label_logprob", "lse", "mean_logprob", "var_logprob", "argmax")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(n, v, g, ignore_frac=0.2, ignore=IGNORE):
    lab = torch.randint(0, v, (n,), generator=g)
    lab[torch.rand(n, generator=g) < ignore_frac] = ignore
    return lab


def check_stats(backend, hidden, weight, bias, labels, chunk, ignore=IGNORE, atol=2e-5, rtol=2e-6):
    out = backend("token_stats", hidden, weight, bias, labels, ignore, chunk)
    want = token_stats_reference(hidden, weight, bias, labels, ignore, chunk)
    n = hidden.shape[0]
    assert len(out) == 5
    for name, t in zip(FIELDS, out):
        assert t.shape == (n,), name
        assert t.dtype == (torch.int64 if name == "argmax" else torch.float32), name
    assert torch.equal(out[4], want[4]), "argmax"
    for name, got, exp in zip(FIELDS[:4], out[:4], want[:4]):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, equal_nan=True, msg=name)
    assert torch.all(out[0][labels == ignore] == 0.0)
    assert torch.all(~(out[3] < 0))  # a sum of non-negative terms (or NaN)
    return out


def exact_inputs(n, h, v, dtype, use_bias, seed):
    """Small-integer inputs (exact logits on every backend, many exact ties), a row of zeros (every
    logit of the row equal, bias aside), the last label V - 1."""
    g = _gen(seed)
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    if n > 1:
        hidden[-1] = 0.0
    weight = torch.randint(-3, 4, (v, h), generator=g).float()
    bias = torch.randint(-3, 4, (v,), generator=g).float() if use_bias else None
    labels = _labels(n, v, g)
    if n:
        labels[0] = v - 1
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (small ints: exact)
    return cast(hidden), cast(weight), cast(bias), labels


# (N, H, V, chunk_size)
SHAPES = [
    (1, 19, 101, 1),
    (37, 19, 101, 5),  # chunk does not divide N
    (37, 19, 101, 100),  # chunk > N
    (40, 19, 101, 40),  # one exact chunk
    (5, 3, 1, 2),  # V = 1
    (6, 1, 23, 4),  # H = 1
    (0, 8, 10, 4),  # N = 0
    (33, 7, 2053, 24),  # many CPU blocks, a vocabulary tail
    (9, 16, 4099, 4),  # three Triton tiles; two weight blocks at fp16 / bf16
    (64, 33, 257, 24),
]


def _interpretable(backend, shape):  # the interpreter runs one program (row) at a time
    return not backend.interpreted or shape[0] * shape[2] <= 4100


def _ids(s):
    return "N%d_H%d_V%d_c%d" % s


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,shape", B.grid(SHAPES, where=_interpretable, ids=_ids))
def test_token_stats_exact_inputs(backend, shape, use_bias, dtype):
    n, h, v, chunk = shape
    check_stats(backend, *exact_inputs(n, h, v, dtype, use_bias, seed=n + v + h), chunk)


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,shape", B.grid(SHAPES, backends=HOST, where=_interpretable, ids=_ids))
def test_token_stats_random_fp32(backend, shape, use_bias):
    n, h, v, chunk = shape
    g = _gen(n * 1000 + v + h)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    if v > 3:
        weight[v - 1] = weight[1]  # an exact tie of logits, the later id second
    bias = torch.randn(v, generator=g) if use_bias else None
    check_stats(backend, hidden, weight, bias, _labels(n, v, g), chunk, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", B.params(HOST))
def test_token_stats_random_low_precision(backend, dtype):
    # the kernels compute in fp32 on the upcast inputs, as the reference does
    n, h, v = (9, 16, 4099) if not backend.interpreted else (7, 16, 501)
    g = _gen(3)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    check_stats(backend, hidden, weight, bias, _labels(n, v, g), 4, atol=3e-5, rtol=1e-5)
    check_stats(backend, hidden, weight, None, _labels(n, v, g), 3, atol=3e-5, rtol=1e-5)


def test_token_stats_mixed_dtypes(backend):
    # bf16 hidden, fp32 weight, fp16 bias: the GEMM in fp32 (the CUDA kernel converts the hidden
    # rows per chunk, an fp16 weight block by block)
    hidden, weight, bias, labels = exact_inputs(9, 16, 50, torch.float32, True, seed=8)
    check_stats(backend, hidden.bfloat16(), weight, bias.half(), labels, 4)
    check_stats(backend, hidden, weight.bfloat16(), bias, labels, 4)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(1, 5, 37, 1), (7, 5, 37, 3), (5, 8, 32, 16), (3, 4, 1, 2), (4, 3, 50, 2)],
                         ids=_ids)
def test_token_stats_triton_tiles(shape, use_bias, monkeypatch):
    # several vocabulary tiles of the Triton kernel at small sizes (the running max grows across them)
    from lethe.triton_kernels import token_stats as tt

    monkeypatch.setattr(tt, "BLOCK_V_MAX", 16)
    n, h, v, chunk = shape
    g = _gen(n + v)
    hidden = torch.randn(n, h, generator=g) * 3
    weight = torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g) if use_bias else None
    if v > 3:
        weight[v - 1] = weight[1]
        if use_bias:
            bias[v - 1] = bias[1]
    check_stats(B.TRITON, hidden, weight, bias, _labels(n, v, g), chunk, atol=3e-5, rtol=1e-5)
    check_stats(B.TRITON, *exact_inputs(n, h, v, torch.float32, use_bias, seed=n), chunk)


def test_token_stats_ignore_index(backend):
    n, h, v = 12, 19, 101
    hidden, weight, _, _ = exact_inputs(n, h, v, torch.float32, False, seed=9)
    labels = torch.tensor([0, v - 1] * (n // 2))
    labels[5] = IGNORE
    check_stats(backend, hidden, weight, None, labels, 5)
    # every label ignored: the label log-probs are exactly 0, the rest as with labels
    out = check_stats(backend, hidden, weight, None, torch.full((n,), IGNORE), 5)
    assert torch.equal(out[0], torch.zeros(n))
    # another ignore_index, inside [0, V): label 7 is ignored, -100 is out of range
    labels = torch.tensor([7, 3, 7, 0] * 3)
    out = check_stats(backend, hidden, weight, None, labels, 4, ignore=7)
    assert torch.equal(out[0][labels == 7], torch.zeros(6)) and (out[0][labels != 7] != 0).all()
    out = check_stats(backend, hidden, weight, None, labels.masked_fill(labels == 7, -1), 4, ignore=-1)
    if backend is not B.CUDA:  # the CUDA kernel reports it later (test_cuda_label_errors)
        with pytest.raises(ValueError, match=r"labels must be in \[0, V\) = \[0, 101\) or -1, got -100 at index 0"):
            backend("token_stats", hidden, weight, None, labels.masked_fill(labels == 7, IGNORE), -1, 4)


def test_token_stats_large_logits(backend):
    # |logits| ~ 1e4: exp would overflow without max subtraction; integer inputs: exact logits
    n, h, v = 37, 19, 101
    g = _gen(10)
    hidden = torch.randint(-4, 5, (n, h), generator=g).float()
    weight = torch.randint(-300, 301, (v, h), generator=g).float()
    out = check_stats(backend, hidden, weight, torch.full((v,), 1.0e4), _labels(n, v, g), 6, atol=1e-3, rtol=1e-5)
    assert all(torch.isfinite(t).all() for t in out[:4])
    check_stats(backend, hidden, -weight * 2, None, _labels(n, v, g), 6, atol=1e-3, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_token_stats_nonfinite(backend):
    # masked logits (-inf through the bias) add 0 (0 log 0 = 0); +inf or NaN make lse +inf / NaN
    # and the moments NaN; a row of -inf has lse -inf; argmax as torch.argmax (NaN first)
    hidden, weight, _, _ = exact_inputs(4, 4, 37, torch.float32, False, seed=3)
    labels = torch.tensor([1, 3, IGNORE, 30])
    bias = torch.zeros(37)
    bias[[3, 20, 36]] = float("-inf")
    out = check_stats(backend, hidden, weight, bias, labels, 4)
    assert torch.isfinite(out[2]).all() and torch.isfinite(out[3]).all() and out[0][1] == float("-inf")
    for special, lse in ((float("inf"), float("inf")), (float("nan"), float("nan"))):
        b = bias.clone()
        b[[5, 33]] = special
        out = check_stats(backend, hidden, weight, b, labels, 4)
        assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
        assert torch.equal(out[1], torch.full((4,), lse)) if lse == lse else torch.isnan(out[1]).all()
        assert torch.equal(out[4], torch.full((4,), 5))
    out = check_stats(backend, hidden, weight, torch.full((37,), float("-inf")), labels, 4)
    assert torch.equal(out[1], torch.full((4,), float("-inf"))) and torch.equal(out[4], torch.zeros(4, dtype=torch.long))


def test_token_stats_near_uniform_variance(backend):
    # every logit of a row equal: mu = -log V and sigma^2 = 0 exactly (a centred pass); nearly
    # equal logits around 24, where log p ~ -8.3: E[(log p)^2] - mu^2 in fp32 would be off by ~1e-5,
    # more than sigma^2 itself; the centred pass matches the fp64 reference to 1e-9
    v = 4099 if not backend.interpreted else 1500
    g = _gen(4)
    hidden = torch.zeros(3, 8)
    hidden[1] = 1e-4 * torch.randn(8, generator=g)
    hidden[2] = 3.0
    weight = 1.0 + 1e-3 * torch.randn(v, 8, generator=g)
    labels = torch.tensor([0, 1, v - 1])
    out = check_stats(backend, hidden, weight, None, labels, 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[2][0], torch.tensor(-math.log(v)), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[0][0], torch.tensor(-math.log(v)), atol=2e-6, rtol=0)
    assert out[3][0] == 0.0 and 0.0 <= out[3][1] < 1e-9
    want = token_stats_reference(hidden, weight, None, labels)[3]
    assert 1e-5 < want[2] < 1e-3
    torch.testing.assert_close(out[3][2], want[2], atol=1e-9, rtol=1e-4)


def test_token_stats_noncontiguous(backend):
    g = _gen(12)
    hidden = torch.randint(-3, 4, (19, 37), generator=g).float().t()  # [37, 19], strided
    weight = torch.randint(-3, 4, (19, 101), generator=g).float().t()
    bias = torch.randint(-3, 4, (202,), generator=g).float()[::2]
    labels = _labels(74, 101, g)[::2]
    check_stats(backend, hidden, weight, bias, labels, 7)


# ---------------------------------------------------------------------------------------------
# the reference against a plain eager composition, in fp64

def _eager_fp64(hidden, weight, bias, labels, ignore=IGNORE):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore
    label_lp = torch.gather(logp, 1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]) ** 2).sum(-1)
    return label_lp, torch.logsumexp(z, -1), mu, var, z.argmax(-1)


@pytest.mark.parametrize("shape", [(37, 19, 101), (16, 7, 2053), (5, 3, 1), (0, 4, 9)], ids=lambda s: "N%d_H%d_V%d" % s)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_reference_against_eager_fp64(shape, use_bias):
    n, h, v = shape
    # integer inputs: the reference's fp32 logits are exact, so it must equal the fp64 composition
    # to fp32 rounding
    hidden, weight, bias, labels = exact_inputs(n, h, v, torch.float32, use_bias, seed=v)
    got = token_stats_reference(hidden, weight, bias, labels, IGNORE, 8)
    want = _eager_fp64(hidden, weight, bias, labels)
    assert torch.equal(got[4], want[4])
    for name, a, b in zip(FIELDS[:4], got[:4], want[:4]):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6, msg=name)
    # random inputs: the fp32 logits differ from fp64 ones by rounding only
    g = _gen(n + v)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g) if use_bias else None
    labels = _labels(n, v, g)
    got = token_stats_reference(hidden, weight, bias, labels)
    want = _eager_fp64(hidden, weight, bias, labels)
    for name, a, b in zip(FIELDS[:4], got[:4], want[:4]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)
    if n and v > 1:
        assert (got[3] > 0).all()  # a non-degenerate distribution has a positive variance


# ---------------------------------------------------------------------------------------------
# the public function: shapes, TokenStats, no gradients, defaults

@pytest.mark.parametrize("lead", [(6,), (2, 3), (2, 0), (0,), ()], ids=str)
def test_public_shapes(backend, lead):
    h, v = 5, 11
    g = _gen(len(lead))
    hidden = torch.randn(*lead, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, lead, generator=g)
    out = backend.public(token_stats, hidden, weight, labels)
    assert isinstance(out, TokenStats) and out._fields == FIELDS
    for name in FIELDS:
        t = getattr(out, name)
        assert t.shape == lead and t.device.type == backend.device, name
        assert t.dtype == (torch.int64 if name == "argmax" else torch.float32), name
    want = token_stats_reference(hidden.reshape(-1, h), weight, None, labels.reshape(-1))
    for got, exp in zip(out, want):
        torch.testing.assert_close(got.cpu().reshape(-1), exp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, -out.mean_logprob, rtol=0, atol=0)
    torch.testing.assert_close(out.second_moment, out.var_logprob + out.mean_logprob ** 2, rtol=0, atol=0)


def test_public_matches_reference_backend_and_defaults():
    g = _gen(5)
    hidden, weight, bias = torch.randn(2, 7, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    labels = _labels(14, 30, g).reshape(2, 7)
    a = lethe.ops.token_stats(hidden, weight, labels, bias)
    r = lethe.ops.token_stats(hidden, weight, labels, bias, backend="reference", chunk_size=3)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    # E_p[(log p)^2] from the moments, against the definition
    logp = torch.log_softmax((hidden @ weight.t() + bias).double(), -1)
    torch.testing.assert_close(a.second_moment.double(), (logp.exp() * logp ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)


def test_not_differentiable():
    g = _gen(6)
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (3, 4), generator=g)
    for backend in ("native", "reference"):
        with pytest.raises(RuntimeError, match=r"lethe.ops.token_stats is not differentiable: call it under "
                                               r"torch.no_grad\(\)"):
            lethe.ops.token_stats(hidden.detach(), head.weight, labels, backend=backend)
        with pytest.raises(RuntimeError, match="hidden requires grad"):
            lethe.ops.token_stats(hidden, head.weight.detach(), labels, backend=backend)
        with pytest.raises(RuntimeError, match="bias requires grad"):
            lethe.ops.token_stats(hidden.detach(), head.weight.detach(), labels, head.bias, backend=backend)
        with torch.no_grad():  # parameters that require grad are fine there
            out = lethe.ops.token_stats(hidden, head.weight, labels, head.bias, backend=backend)
        assert not any(t.requires_grad for t in out)
        want = token_stats_reference(hidden.detach().reshape(-1, 8), head.weight.detach(), head.bias.detach(),
                                     labels.reshape(-1))
        torch.testing.assert_close(out.lse.reshape(-1), want[1])


BAD_PUBLIC = [
    (lambda h, w, lab: (h[0, 0, 0], w, lab[0, 0]), {}, ValueError,
     r"hidden must have at least one dimension \(\[\.\.\., H\]\), got a 0-D tensor"),
    (lambda h, w, lab: (h, w, lab[:, :3]), {}, ValueError,
     r"labels must have shape \[2, 4\] \(hidden without its last dimension\), got \[2, 3\]"),
    (lambda h, w, lab: (h, w, lab), dict(ignore_index=-1.0), TypeError, "ignore_index must be an int, got float"),
    (lambda h, w, lab: (h, w, lab), dict(chunk_size=2.0), TypeError, "chunk_size must be an int, got float"),
    (lambda h, w, lab: (h, w, lab), dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    (lambda h, w, lab: (h, w.numpy(), lab), {}, TypeError, "weight must be a torch.Tensor, got ndarray"),
    (lambda h, w, lab: (h, w, lab.tolist()), {}, TypeError, "labels must be a torch.Tensor, got list"),
    (lambda h, w, lab: (h, w, lab), dict(backend="cudnn"), ValueError, "backend must be one of"),
    (lambda h, w, lab: (h, w, lab.masked_fill(lab == 3, 10)), {}, ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or -100, got 10 at index"),
]


@pytest.mark.parametrize("make,kw,exc,match", BAD_PUBLIC)
def test_public_bad_input(make, kw, exc, match):
    g = _gen(7)
    h, w = torch.randn(2, 4, 8, generator=g), torch.randn(10, 8, generator=g)
    lab = torch.arange(8).reshape(2, 4) % 10
    for backend in ("native", "triton", "reference"):
        with pytest.raises(exc, match=match):
            lethe.ops.token_stats(*make(h, w, lab), **{"backend": backend, **kw})


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile, meta tensors

def test_opcheck(backend):
    hidden, weight, bias, labels = exact_inputs(9, 8, 20, torch.float32, True, seed=7)
    labels[0] = IGNORE
    oc = torch.library.opcheck
    oc(backend.op("token_stats").default, backend.to((hidden, weight, bias, labels, IGNORE, 4)))
    oc(backend.op("token_stats").default, backend.to((hidden.half(), weight.half(), None, labels.clamp(min=0), 0, 2)))


@pytest.mark.parametrize("which", ["native", "reference"])
def test_compile_fullgraph(which):
    # one graph (fullgraph=True: a graph break raises), the op in it, the same results as eager
    torch._dynamo.reset()
    g = _gen(8)
    head = torch.nn.Linear(8, 30)
    hidden = torch.randn(2, 5, 8, generator=g)
    labels = _labels(10, 30, g).reshape(2, 5)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, lab):
        with torch.no_grad():
            st = lethe.ops.token_stats(torch.tanh(x), head.weight, lab, head.bias, chunk_size=4, backend=which)
        return st.label_logprob.sum(-1), st.entropy, st.var_logprob, st.argmax

    compiled = torch.compile(f, fullgraph=True, backend=keep)
    got = compiled(hidden, labels)
    want = f(hidden, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if which == "native":
        ops = (torch.ops.lethe.token_stats, torch.ops.lethe.token_stats.default)
        calls = [n for gm in graphs for n in gm.graph.nodes if n.target in ops]
        assert len(graphs) == 1 and len(calls) == 1


def test_meta():
    # meta tensors run the fake kernel (shapes for torch.compile), which runs the op's check
    h, w, b = torch.zeros(6, 8, device="meta"), torch.zeros(30, 8, device="meta"), torch.zeros(30, device="meta")
    lab = torch.zeros(6, dtype=torch.long, device="meta")
    out = torch.ops.lethe.token_stats(h, w, b, lab, IGNORE, 4)
    assert [t.shape for t in out] == [(6,)] * 5 and all(t.device.type == "meta" for t in out)
    assert [t.dtype for t in out] == [torch.float32] * 4 + [torch.int64]
    st = lethe.ops.token_stats(h.reshape(2, 3, 8), w, lab.reshape(2, 3), b)
    assert all(t.shape == (2, 3) and t.device.type == "meta" for t in st)
    with pytest.raises(ValueError, match=r"labels must be on hidden's device \(meta\), got cpu"):
        torch.ops.lethe.token_stats(h, w, b, torch.zeros(6, dtype=torch.long), IGNORE, 4)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[30\], got \[29\]"):
        torch.ops.lethe.token_stats(h, w, b[:29], lab, IGNORE, 4)


# ---------------------------------------------------------------------------------------------
# bad input: the same message from every backend and the op's Python check

def _args():
    h, w, b = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10)
    return h, w, b, torch.tensor([0, 1, 9, IGNORE])


BAD = [
    (lambda h, w, b, lab: (h.long(), w, b, lab, IGNORE, 2), TypeError,
     "hidden must be float32, float16 or bfloat16, got torch.int64"),
    (lambda h, w, b, lab: (h.reshape(-1), w, b, lab, IGNORE, 2), ValueError, r"hidden must be 2-D \[N, H\], got shape \[32\]"),
    (lambda h, w, b, lab: (h, torch.randn(10, 7), b, lab, IGNORE, 2), ValueError,
     r"weight must have shape \[V, H\] with H = 8 \(hidden's last dimension\), got \[10, 7\]"),
    (lambda h, w, b, lab: (h, w.reshape(-1), b, lab, IGNORE, 2), ValueError, r"weight must be 2-D \[V, H\], got shape \[80\]"),
    (lambda h, w, b, lab: (h, w.double(), b, lab, IGNORE, 2), TypeError, "weight must be float32, float16 or bfloat16"),
    (lambda h, w, b, lab: (h, w[:0], None, lab, IGNORE, 2), ValueError, r"weight must have at least one row \(V >= 1\)"),
    (lambda h, w, b, lab: (h, w, torch.randn(11), lab, IGNORE, 2), ValueError, r"bias must have shape \[V\] = \[10\], got \[11\]"),
    (lambda h, w, b, lab: (h, w, b.long(), lab, IGNORE, 2), TypeError, "bias must be float32"),
    (lambda h, w, b, lab: (h, w, b, lab.int(), IGNORE, 2), TypeError, "labels must be int64, got torch.int32"),
    (lambda h, w, b, lab: (h, w, b, lab[:3], IGNORE, 2), ValueError, r"labels must have shape \[N\] = \[4\], got \[3\]"),
    (lambda h, w, b, lab: (h, w, b, lab.reshape(2, 2), IGNORE, 2), ValueError,
     r"labels must have shape \[N\] = \[4\], got \[2, 2\]"),
    (lambda h, w, b, lab: (h, w, b, lab, IGNORE, 0), ValueError, "chunk_size must be >= 1, got 0"),
    (lambda h, w, b, lab: (h, w, b, torch.tensor([0, 1, 10, IGNORE]), IGNORE, 2), ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or -100, got 10 at index 2"),
    (lambda h, w, b, lab: (h, w, b, torch.tensor([0, -5, 1, IGNORE]), IGNORE, 2), ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or -100, got -5 at index 1"),
    (lambda h, w, b, lab: (h, w, b, lab, 9, 2), ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or 9, got -100 at index 3"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_token_stats_bad_input(make, exc, match):
    args = make(*_args())
    calls = [lambda: B.CPU("token_stats", *args), lambda: B.TRITON("token_stats", *args),
             lambda: check_token_stats(*args, values=True)]
    if B.GPU and "labels must be in" not in match:  # value errors: test_cuda_label_errors
        calls.append(lambda: B.CUDA("token_stats", *args))
    B.assert_same_error(calls, exc, match)


@pytest.mark.parametrize("backend", B.params((B.CUDA,)))
def test_cuda_label_errors(backend):
    # found by the CUDA kernel without a host sync: raised by the next lethe call on the device or
    # by check_errors(), with the CPU's message; under LETHE_SYNC_CHECKS=1 at the call itself
    h, w, b, _ = _args()
    B.CUDA("token_stats", h, w, b, torch.tensor([0, 1, 10, IGNORE]), IGNORE, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, V\) = \[0, 10\) or -100, got 10 at index 2 "
                                         r"\(found by a CUDA kernel of an earlier lethe call"):
        lethe.ops.check_errors()
    B.CUDA("token_stats", h, w, b, torch.tensor([0, 1, 5, IGNORE]), 5, 3)
    with pytest.raises(ValueError, match=r"or 5, got -100 at index 3"):
        lethe.ops.check_errors()
    lethe.ops.check_errors()  # raised once
    code = ("import torch, lethe\n"
            "h = torch.randn(4, 8, device='cuda'); w = torch.randn(10, 8, device='cuda')\n"
            "try:\n    torch.ops.lethe.token_stats(h, w, None, torch.tensor([0, 1, 10, -100], device='cuda'), -100, 2)\n"
            "except ValueError as e:\n    print('raised:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, LETHE_SYNC_CHECKS="1"))
    assert "raised: labels must be in [0, V) = [0, 10) or -100, got 10 at index 2" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("backend", B.params((B.CUDA,)))
def test_mixed_devices_are_refused(backend):
    h, w, b, lab = _args()
    ops = [backend.op("token_stats"), B.TRITON.op("token_stats"), check_token_stats]
    B.assert_same_error([lambda f=f: f(h.cuda(), w, b, lab.cuda(), IGNORE, 2) for f in ops],
                        ValueError, r"weight must be on hidden's device \(cuda:0\), got cpu")
