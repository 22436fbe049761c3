"""shred family, teacher side: teacher_topk, select_forget_positions and demote_targets on every
backend (the `backend` fixture: compiled CPU, Triton, compiled CUDA) against the pure-PyTorch
reference (python/lethe/ops/shred_reference.py), on awkward shapes, ties and extreme values, and
bad input (the same message from every backend).

Top-K ids and selection masks must match exactly. Where the logits must be the same on every
backend (cuBLAS, MKL and torch sum in different orders), inputs are small integers, so that every
logit is exact in fp32 whatever the summation order; with random inputs the CPU and Triton backends
are compared with the reference computed by the same matmul (chunk by chunk)."""
import math

import pytest
import torch

import backends as B
from lethe.ops import shred as S
from lethe.ops.shred_reference import (demote_targets_reference, select_forget_positions_reference,
                                       teacher_topk_reference)

IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HOST = (B.CPU, B.TRITON)  # backends whose matmul is the reference's (random inputs compare exactly)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(n, v, g, ignore_frac=0.2):
    lab = torch.randint(0, v, (n,), generator=g)
    lab[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return lab


# ---------------------------------------------------------------------------------------------
# teacher_topk

def check_teacher(backend, hidden, weight, bias, labels, k, chunk, atol=1e-5, rtol=1.3e-6):
    ids, lp, llp = backend("teacher_topk", hidden, weight, bias, labels, k, chunk)
    rids, rlp, rllp = teacher_topk_reference(hidden, weight, bias, labels, k, chunk)
    n = hidden.shape[0]
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and llp.dtype == torch.float32
    assert ids.shape == (n, k) and lp.shape == (n, k) and llp.shape == (n,)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp, rlp, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(llp, rllp, atol=atol, rtol=rtol, equal_nan=True)
    assert torch.all(llp[labels == IGNORE] == 0)
    return ids, lp, llp


def exact_inputs(n, h, v, dtype, use_bias, seed):
    """Small-integer inputs (exact logits on every backend), a row of zeros (every logit of the
    row equal, bias aside: ids by ascending id), the last label V - 1."""
    g = _gen(seed)
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    if n > 1:
        hidden[-1] = 0.0
    weight = torch.randint(-3, 4, (v, h), generator=g).float()
    bias = torch.randint(-3, 4, (v,), generator=g).float() if use_bias else None
    labels = _labels(n, v, g)
    labels[0] = v - 1
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (small ints: exact)
    return cast(hidden), cast(weight), cast(bias), labels


# (N, H, V, K, chunk_size)
TEACHER_SHAPES = [
    (1, 19, 101, 5, 1),
    (1, 8, 7, 7, 4),  # K = V, chunk > N
    (37, 19, 101, 1, 5),  # K = 1, chunk does not divide N
    (37, 19, 101, 101, 8),  # K = V
    (37, 19, 101, 10, 100),  # chunk > N
    (37, 19, 101, 10, 37),  # one exact chunk
    (64, 33, 2053, 50, 24),
    (33, 7, 2053, 50, 24),  # several vocabulary tiles
    (5, 3, 1, 1, 2),  # V = 1
    (5, 7, 3001, 2500, 3),  # K not a power of two
    (3, 5, 2049, 2049, 2),  # K = V
    (3, 5, 5003, 4200, 2),  # K > 4096
]


def _interpretable(backend, shape):  # the interpreter runs one program (row) at a time
    return not backend.interpreted or shape[0] * shape[2] <= 4000


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,shape", B.grid(TEACHER_SHAPES, where=_interpretable,
                                                 ids=lambda s: "N%d_H%d_V%d_K%d_c%d" % s))
def test_teacher_topk_exact_inputs(backend, shape, use_bias, dtype):
    n, h, v, k, chunk = shape
    check_teacher(backend, *exact_inputs(n, h, v, dtype, use_bias, seed=n + v + k), k, chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(1, 5, 37, 1, 1), (7, 5, 37, 5, 3), (2, 5, 37, 37, 1), (5, 8, 32, 3, 16), (3, 4, 1, 1, 2)],
                         ids=lambda s: "N%d_H%d_V%d_K%d_c%d" % s)
def test_teacher_topk_triton_tiles(shape, use_bias, dtype, monkeypatch):
    # several vocabulary and K tiles of the Triton kernel at small sizes
    from lethe.triton_kernels import shred_teacher as tt

    monkeypatch.setattr(tt, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(tt, "BLOCK_K_MAX", 16)
    n, h, v, k, chunk = shape
    g = _gen(n + v + k)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if use_bias else None
    if v > 3:
        weight[v - 1] = weight[1]  # an exact tie, the later id second
        if use_bias:
            bias[v - 1] = bias[1]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[: min(n, 3)] = torch.tensor([IGNORE, 0, v - 1])[: min(n, 3)]
    check_teacher(B.TRITON, hidden, weight, bias, labels, k, chunk, rtol=1e-5)
    check_teacher(B.TRITON, *exact_inputs(n, h, v, dtype, use_bias, seed=n), k, chunk)


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,shape", B.grid(TEACHER_SHAPES[:9], backends=HOST,
                                                 ids=lambda s: "N%d_H%d_V%d_K%d_c%d" % s))
def test_teacher_topk_random_fp32(backend, shape, use_bias):
    n, h, v, k, chunk = shape
    g = _gen(n * 1000 + v + k)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    if v > 3:
        weight[v - 1] = weight[1]  # an exact tie, the later id second
    bias = torch.randn(v, generator=g) if use_bias else None
    check_teacher(backend, hidden, weight, bias, _labels(n, v, g), k, chunk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,v", B.grid([101, 4099], backends=HOST, ids=str))  # 4099: two weight blocks
def test_teacher_topk_random_low_precision(backend, v, dtype, use_bias):
    # the kernels compute in fp32 on the upcast inputs, as the reference does
    n, h, k = 37, 19, 7
    g = _gen(7)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if use_bias else None
    check_teacher(backend, hidden, weight, bias, _labels(n, v, g), k, 5)


def test_teacher_topk_mixed_dtypes(backend):
    # bf16 hidden, fp32 weight, fp16 bias: the CUDA kernel multiplies in fp32, converting the
    # hidden rows per chunk (and an fp16 weight block by block, never whole)
    hidden, weight, bias, labels = exact_inputs(9, 16, 50, torch.float32, True, seed=8)
    check_teacher(backend, hidden.bfloat16(), weight, bias.half(), labels, 4, 4)
    check_teacher(backend, hidden, weight.bfloat16(), bias, labels, 4, 4)
    hidden, weight, _, labels = exact_inputs(9, 16, 4099, torch.float32, False, seed=9)
    check_teacher(backend, hidden, weight.half(), None, labels, 6, 4)


def test_teacher_topk_labels_edges(backend):
    n, h, v = 12, 19, 101
    hidden, weight, _, _ = exact_inputs(n, h, v, torch.float32, False, seed=9)
    labels = torch.tensor([0, v - 1] * (n // 2))
    labels[5] = IGNORE
    check_teacher(backend, hidden, weight, None, labels, 3, 5)
    # all labels ignored: label log-probs are all 0
    _, _, llp = check_teacher(backend, hidden, weight, None, torch.full((n,), IGNORE), 3, 5)
    assert torch.equal(llp, torch.zeros(n))


def test_teacher_topk_large_logits(backend):
    # |logits| ~ 1e4: exp would overflow without max subtraction. Integer-valued inputs make every
    # logit exact in fp32 whatever the summation order.
    n, h, v, k = 37, 19, 101, 10
    g = _gen(10)
    hidden = torch.randint(-4, 5, (n, h), generator=g).float()
    weight = torch.randint(-300, 301, (v, h), generator=g).float()
    bias = torch.full((v,), 1.0e4)
    ids, lp, llp = check_teacher(backend, hidden, weight, bias, _labels(n, v, g), k, 6, atol=1e-3, rtol=1e-5)
    assert torch.isfinite(lp).all() and torch.isfinite(llp).all()
    check_teacher(backend, hidden, -weight * 2, None, _labels(n, v, g), k, 6, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 20, 30])
def test_teacher_topk_exact_ties(backend, k):
    # duplicated weight rows (integer-valued, so logits are exactly equal): equal logits are
    # ordered by ascending id
    n, h, base = 21, 11, 10
    g = _gen(11 + k)
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    rows = torch.randint(-5, 6, (base, h), generator=g).float()
    weight = rows.repeat(3, 1)[torch.randperm(3 * base, generator=g)]  # each logit value three times
    check_teacher(backend, hidden, weight, None, _labels(n, 3 * base, g), k, 4)
    # hidden rows of zeros: every logit equal -> ids 0..k-1
    ids0, lp0, _ = check_teacher(backend, torch.zeros(3, h), weight, None, torch.tensor([0, 5, IGNORE]), k, 2)
    assert torch.equal(ids0, torch.arange(k).expand(3, k))
    torch.testing.assert_close(lp0, torch.full((3, k), -math.log(3 * base)))
    # few distinct rows, many duplicates, ties across the K-th value
    weight = rows[:5, :3][torch.randint(0, 5, (37,), generator=g)]
    hidden = torch.randint(-2, 3, (4, 3), generator=g).float()
    hidden[3] = 0.0
    ids, _, _ = check_teacher(backend, hidden, weight, None, torch.tensor([5, IGNORE, 36, 0]), min(k, 37), 3)
    assert torch.equal(ids[3], torch.arange(min(k, 37)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_teacher_topk_nonfinite(backend):
    # +-inf and NaN logits (through the bias): NaN sorts first, as torch.sort(descending) puts it
    hidden, weight, _, _ = exact_inputs(4, 4, 37, torch.float32, False, seed=3)
    labels = torch.tensor([1, 2, IGNORE, 30])
    bias = torch.zeros(37)
    bias[[3, 20]] = float("-inf")
    check_teacher(backend, hidden, weight, bias, labels, 6, 4)
    bias[[5, 33]] = float("inf")
    check_teacher(backend, hidden, weight, bias, labels, 6, 4)
    bias[[4, 17, 34]] = float("nan")
    ids, lp, _ = check_teacher(backend, hidden, weight, bias, labels, 6, 4)
    assert (ids[:, 0] == 4).all() and torch.isnan(lp).all()
    check_teacher(backend, hidden, weight, torch.full((37,), float("-inf")), labels, 3, 4)


def test_teacher_topk_noncontiguous_and_empty(backend):
    g = _gen(12)
    hidden = torch.randint(-3, 4, (19, 37), generator=g).float().t()  # [37, 19], strided
    weight = torch.randint(-3, 4, (19, 101), generator=g).float().t()
    bias = torch.randint(-3, 4, (202,), generator=g).float()[::2]
    labels = _labels(74, 101, g)[::2]
    check_teacher(backend, hidden, weight, bias, labels, 6, 7)
    ids, lp, llp = backend("teacher_topk", torch.zeros(0, 19), weight, None, torch.zeros(0, dtype=torch.long), 6, 7)
    assert ids.shape == (0, 6) and lp.shape == (0, 6) and llp.shape == (0,) and ids.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# select_forget_positions

def check_select(backend, lp, labels, fraction, skip):
    out = backend("select_forget_positions", lp, labels, fraction, skip)
    ref = select_forget_positions_reference(lp, labels, fraction, skip)
    assert out.dtype == torch.bool and out.shape == lp.shape
    assert torch.equal(out, ref), (fraction, skip)
    return out


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("skip", [0, 1, 3, 50])
def test_select_forget_positions(backend, fraction, skip):
    B_, T = 7, 23
    g = _gen(int(fraction * 100) + skip)
    lp = -torch.rand(B_, T, generator=g) * 10
    labels = torch.randint(0, 50, (B_, T), generator=g)
    labels[torch.rand(B_, T, generator=g) < 0.3] = IGNORE
    labels[2] = IGNORE  # a fully padded row
    labels[4, :20] = IGNORE  # a row with 3 valid positions (fewer than skip=50, or 3)
    labels[5] = torch.arange(T)  # all valid, n = T - skip
    out = check_select(backend, lp, labels, fraction, skip)
    assert not out[2].any()
    assert not out[labels == IGNORE].any()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_select_forget_positions_ties(backend, fraction):
    # few distinct values: equal log-probs go to the earlier position first
    g = _gen(20)
    lp = -torch.randint(0, 3, (6, 40), generator=g).float()
    labels = torch.randint(0, 9, (6, 40), generator=g)
    labels[torch.rand(6, 40, generator=g) < 0.2] = IGNORE
    check_select(backend, lp, labels, fraction, 2)
    # all equal: the first m valid positions after skip
    out = check_select(backend, torch.zeros(1, 10), torch.zeros(1, 10, dtype=torch.long), 0.3, 2)
    assert torch.equal(out[0].nonzero().flatten(), torch.tensor([2, 3, 4]))


@pytest.mark.parametrize("n,fraction", [(10, 0.1), (10, 0.3), (10, 0.7), (3, 1 / 3), (7, 0.9), (100, 0.29), (49, 0.57)])
def test_select_forget_positions_ceil_boundaries(backend, n, fraction):
    # fraction * n lands on (or a rounding error away from) an integer
    out = check_select(backend, torch.linspace(0, -5, n)[None], torch.zeros(1, n, dtype=torch.long), fraction, 0)
    assert int(out.sum()) == math.ceil(fraction * n - 1e-9)


def selection_inputs(b, t, dtype, seed, ties=False, nan=False):
    g = _gen(seed)
    vals = -torch.rand(b, t, generator=g) * 5
    if ties:
        vals = vals.round()  # a handful of distinct values
    if nan and t > 3:
        vals[:, 1] = float("nan")
        vals[0, t - 1] = float("nan")
    labels = torch.randint(0, 50, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = IGNORE
    labels[:, 0] = IGNORE
    if b > 1:
        labels[1] = IGNORE  # a fully padded row
    return vals.to(dtype), labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (4, 16), (2, 50)])
def test_select_tiles(backend, shape, dtype, monkeypatch):
    from lethe.triton_kernels import shred_teacher as tt

    monkeypatch.setattr(tt, "BLOCK_T_MAX", 16)  # several tiles of the Triton kernel
    b, t = shape
    for i, (ties, nan) in enumerate([(False, False), (True, False), (True, True)]):
        vals, labels = selection_inputs(b, t, dtype, seed=b + t + i, ties=ties, nan=nan)
        for fraction, skip in [(0.0, 0), (1.0, 0), (0.3, 2), (0.5, 1), (1.0, 5), (0.7, 1000)]:
            check_select(backend, vals, labels, fraction, skip)
    vals, labels = selection_inputs(3, 37, dtype, seed=7, ties=True)
    labels[0] = 1  # every position valid: n = 37 - skip
    for fraction in (0.1, 0.2, 0.25, 1 / 3, 0.6, 0.9):  # fraction * n near an integer
        for skip in (0, 7, 17):
            check_select(backend, vals, labels, fraction, skip)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,T", B.grid([1, 7, 300, 4096, 5000], where=lambda b, t: not b.interpreted or t <= 300,
                                             ids=str))  # T > 4096: once a sort in global memory
def test_select_long_rows(backend, T, dtype):
    g = _gen(T)
    lp = -torch.randint(0, 4, (4, T), generator=g).float()  # four values: many ties
    lp[3] = -torch.rand(T, generator=g) * 10
    labels = torch.randint(0, 50, (4, T), generator=g)
    labels[torch.rand(4, T, generator=g) < 0.3] = IGNORE
    labels[1] = IGNORE  # a fully padded row
    labels[2] = torch.arange(T) % 50  # every position valid
    lp = lp.to(dtype)
    for fraction in (0.0, 0.1, 0.5, 1.0):
        for skip in (0, 1, 3, 10**6):
            check_select(backend, lp, labels, fraction, skip)
    check_select(backend, lp[2:3], labels[2:3], 0.5, 1)  # B = 1


def test_select_forget_positions_dtypes_and_empty(backend):
    g = _gen(21)
    lp = -torch.rand(4, 17, generator=g) * 3
    labels = torch.randint(0, 5, (4, 17), generator=g)
    for dt in (torch.float16, torch.bfloat16):
        check_select(backend, lp.to(dt), labels, 0.4, 1)
    check_select(backend, lp.t().contiguous().t(), labels, 0.4, 1)  # strided
    for shape in [(0, 5), (3, 0)]:
        out = backend("select_forget_positions", torch.zeros(shape), torch.zeros(shape, dtype=torch.long), 0.5, 0)
        assert out.shape == shape and out.dtype == torch.bool


# ---------------------------------------------------------------------------------------------
# demote_targets

def teacher_data(n=37, v=101, k=8, seed=30, dtype=torch.float32):
    """Top-K of random logits; a third of the labels inside the top-K at varying ranks, a third
    just outside it, some ignored; forget rows at random."""
    g = _gen(seed)
    z = torch.randn(n, v, generator=g) * 2
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    ids = order[:, :k]
    lp = torch.gather(torch.log_softmax(z, -1), 1, ids)
    labels = torch.randint(0, v, (n,), generator=g)
    r = torch.arange(n)
    inside, outside = r % 3 == 0, r % 3 == 1
    labels[inside] = ids[inside, r[inside] % k]
    if k < v:
        labels[outside] = order[outside, k]
    labels[r % 7 == 2] = IGNORE
    forget = torch.rand(n, generator=g) < 0.6
    return ids, lp.to(dtype), labels, forget


def check_demote(backend, ids, lp, labels, forget, variant, top_p):
    q = backend("demote_targets", ids, lp, labels, forget, variant, top_p)
    ref = demote_targets_reference(ids, lp, labels, forget, "AB"[variant], top_p)
    assert q.dtype == torch.float32 and q.shape == ids.shape
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(q == 0, ref == 0)  # exactly the same entries zeroed
    return q


@pytest.mark.parametrize("variant", [0, 1], ids=["A", "B"])
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.77, 0.9, 1.0])
@pytest.mark.parametrize("k", [1, 8, 101])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_demote_targets(backend, variant, top_p, k, dtype):
    ids, lp, labels, forget = teacher_data(k=k, v=257 if k < 101 else 101, seed=k + variant, dtype=dtype)
    q = check_demote(backend, ids, lp, labels, forget, variant, top_p)
    s = q.sum(-1)
    assert torch.all((s == 0) | ((s - 1).abs() < 1e-5))
    # anchor rows are the renormalised teacher probabilities
    p = lp[~forget].float().exp()
    torch.testing.assert_close(q[~forget], p / p.sum(-1, keepdim=True))
    if variant == 1 and top_p == 1e-6 and dtype == torch.float32:
        # only the first entry (and the label) demoted at forget rows
        assert torch.all(q[forget, 0] == 0)
        if k > 1:
            assert torch.all(q[forget & (labels != ids[:, 1]), 1] > 0)


def test_demote_targets_all_demoted(backend):
    ids, lp, labels, forget = teacher_data(k=1)
    # K = 1, variant A, label = the only entry: forget rows become all zeros
    labels = ids[:, 0].clone()
    q = check_demote(backend, ids, lp, labels, forget, 0, 0.5)
    assert torch.equal(q[forget], torch.zeros(int(forget.sum()), 1))
    assert torch.equal(q[~forget], torch.ones(int((~forget).sum()), 1))
    # variant B, top_p = 1 with K < V: every entry's preceding mass is < 1, so all are demoted
    ids, lp, labels, forget = teacher_data(k=8)
    lp = torch.log_softmax(torch.randn(lp.shape[0], 101, generator=_gen(32)), -1)[:, :8]
    q = check_demote(backend, ids, lp, labels, forget, 1, 1.0)
    assert torch.equal(q[forget], torch.zeros(int(forget.sum()), 8))
    # K = V: the cumulative sum may reach 1 before the tail; kernel and reference agree
    check_demote(backend, *teacher_data(k=101), 1, 1.0)


def test_demote_targets_label_outside_and_shapes(backend):
    ids, lp, labels, forget = teacher_data(k=8, seed=31)
    outside = torch.full_like(labels, 100)
    outside[ids.eq(100).any(-1)] = IGNORE
    q = check_demote(backend, ids, lp, outside, torch.ones_like(forget), 0, 0.5)  # nothing demoted
    p = lp.exp()
    torch.testing.assert_close(q, p / p.sum(-1, keepdim=True))
    # [B, T]-shaped labels / mask with N = B*T elements, as the reference's reshape allows
    check_demote(backend, ids[:36], lp[:36], labels[:36].reshape(6, 6), forget[:36].reshape(6, 6), 1, 0.5)
    check_demote(backend, ids[:36], lp[:36], labels[:36].reshape(4, 9), forget[:36].reshape(9, 4), 1, 0.4)
    # -inf log-probs (zero probability) and N = 0
    lp2 = lp.clone()
    lp2[:, -3:] = float("-inf")
    check_demote(backend, ids, lp2, labels, forget, 1, 0.7)
    q0 = backend("demote_targets", ids[:0], lp[:0], labels[:0], forget[:0], 0, 0.5)
    assert q0.shape == (0, 8)


def test_demote_targets_nucleus_decision_in_double(backend):
    # the first probability is fp32 log(0.5): exp of it is 0.4999999990 in double, 0.5 once rounded
    # to fp32. The mass before the second entry is below top_p = 0.5 only in double: an fp32 exp
    # (0.5 ulp on the CPU, 2 ulp on a GPU) would not demote it, or would on one device only.
    lp0 = torch.tensor(math.log(0.5), dtype=torch.float32)
    assert math.exp(float(lp0)) < 0.5 and torch.exp(lp0).item() == 0.5
    lp = torch.stack([lp0, torch.tensor(math.log(0.3)), torch.tensor(math.log(0.1))]).float()[None].repeat(2, 1)
    ids = torch.tensor([[3, 1, 2], [3, 1, 2]])
    labels = torch.tensor([7, 7])
    forget = torch.tensor([True, False])
    q = check_demote(backend, ids, lp, labels, forget, 1, 0.5)
    assert q[0, 0] == 0 and q[0, 1] == 0 and q[0, 2] == 1  # entries 0 and 1 are the nucleus
    assert (q[1] > 0).all()


# ---------------------------------------------------------------------------------------------
# opcheck and bad input (the same message from every backend and the op's Python check)

def test_opcheck(backend):
    hidden, weight, bias, labels = exact_inputs(9, 8, 20, torch.float32, True, seed=7)
    labels[0] = IGNORE
    oc = torch.library.opcheck
    oc(backend.op("teacher_topk").default, backend.to((hidden, weight, bias, labels, 4, 4)))
    oc(backend.op("teacher_topk").default, backend.to((hidden, weight, None, labels, 3, 2)))
    lp = torch.log_softmax(torch.randn(3, 6, generator=_gen(1)), -1)
    lab = torch.randint(0, 20, (3, 6), generator=_gen(2))
    lab[0, 0] = IGNORE
    oc(backend.op("select_forget_positions").default, backend.to((lp, lab, 0.5, 1)))
    t_ids, t_lp, _ = teacher_topk_reference(hidden, weight, bias, labels, 4)
    oc(backend.op("demote_targets").default, backend.to((t_ids, t_lp, labels.clamp(min=0), labels > 3, 1, 0.5)))


def _teacher_args():
    h, w, b = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10)
    return h, w, b, torch.tensor([0, 1, 9, IGNORE])


BAD_TEACHER = [
    (lambda h, w, b, lab: (h.long(), w, b, lab, 2, 2), TypeError, "hidden must be float32, float16 or bfloat16, got torch.int64"),
    (lambda h, w, b, lab: (h.reshape(-1), w, b, lab, 2, 2), ValueError, r"hidden must be 2-D \[N, H\], got shape \[32\]"),
    (lambda h, w, b, lab: (h, torch.randn(10, 7), b, lab, 2, 2), ValueError,
     r"weight must have shape \[V, H\] with H = 8 \(hidden's last dimension\), got \[10, 7\]"),
    (lambda h, w, b, lab: (h, w.reshape(-1), b, lab, 2, 2), ValueError, r"weight must be 2-D \[V, H\], got shape \[80\]"),
    (lambda h, w, b, lab: (h, w.double(), b, lab, 2, 2), TypeError, "weight must be float32, float16 or bfloat16"),
    (lambda h, w, b, lab: (h, w[:0], None, lab, 0, 2), ValueError, r"weight must have at least one row \(V >= 1\)"),
    (lambda h, w, b, lab: (h, w, torch.randn(11), lab, 2, 2), ValueError, r"bias must have shape \[V\] = \[10\], got \[11\]"),
    (lambda h, w, b, lab: (h, w, b.long(), lab, 2, 2), TypeError, "bias must be float32"),
    (lambda h, w, b, lab: (h, w, b, lab.int(), 2, 2), TypeError, "labels must be int64, got torch.int32"),
    (lambda h, w, b, lab: (h, w, b, lab[:3], 2, 2), ValueError, r"labels must have shape \[N\] = \[4\], got \[3\]"),
    (lambda h, w, b, lab: (h, w, b, lab, 0, 2), ValueError, r"k must be in \[1, V\] = \[1, 10\], got 0"),
    (lambda h, w, b, lab: (h, w, b, lab, 11, 2), ValueError, r"k must be in \[1, V\] = \[1, 10\], got 11"),
    (lambda h, w, b, lab: (h, w, b, lab, 2, 0), ValueError, "chunk_size must be >= 1, got 0"),
    (lambda h, w, b, lab: (h, w, b, torch.tensor([0, 1, 10, IGNORE]), 2, 2), ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or -100, got 10 at index 2"),
    (lambda h, w, b, lab: (h, w, b, torch.tensor([0, -5, 1, IGNORE]), 2, 2), ValueError,
     r"labels must be in \[0, V\) = \[0, 10\) or -100, got -5 at index 1"),
]


def _everywhere(name, check, args, gpu_values=True):
    """The calls that must all raise the same error: the CPU kernel, the Triton twin, the op's
    Python check, and on a GPU the CUDA kernel (value errors: under LETHE_SYNC_CHECKS only, see
    test_cuda_value_errors) and the compiled Triton twin."""
    calls = [lambda: B.CPU(name, *args), lambda: B.TRITON(name, *args), lambda: check(*args, values=True)]
    if B.GPU and gpu_values:
        calls.append(lambda: B.CUDA(name, *args))
    return calls


@pytest.mark.parametrize("make,exc,match", BAD_TEACHER)
def test_teacher_topk_bad_input(make, exc, match):
    args = make(*_teacher_args())
    B.assert_same_error(_everywhere("teacher_topk", S.check_teacher_topk, args, "labels must be in" not in match),
                        exc, match)


BAD_SELECT = [
    (lambda lp, lab: (lp, lab, -0.1, 0), ValueError, r"fraction must be in \[0, 1\], got -0.1"),
    (lambda lp, lab: (lp, lab, 1.5, 0), ValueError, r"fraction must be in \[0, 1\], got 1.5"),
    (lambda lp, lab: (lp, lab, float("nan"), 0), ValueError, r"fraction must be in \[0, 1\], got nan"),
    (lambda lp, lab: (lp, lab, 0.5, -1), ValueError, "skip must be >= 0, got -1"),
    (lambda lp, lab: (lp, lab[:, :4], 0.5, 0), ValueError,
     r"labels must have the shape of label_logprob \[2, 5\], got \[2, 4\]"),
    (lambda lp, lab: (lp, lab.int(), 0.5, 0), TypeError, "labels must be int64, got torch.int32"),
    (lambda lp, lab: (lp.reshape(-1), lab.reshape(-1), 0.5, 0), ValueError,
     r"label_logprob must be 2-D \[B, T\], got shape \[10\]"),
    (lambda lp, lab: (lp.long(), lab, 0.5, 0), TypeError, "label_logprob must be float32, float16 or bfloat16"),
]


@pytest.mark.parametrize("make,exc,match", BAD_SELECT)
def test_select_forget_positions_bad_input(make, exc, match):
    args = make(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long))
    B.assert_same_error(_everywhere("select_forget_positions", S.check_select_forget_positions, args), exc, match)


BAD_DEMOTE = [
    (lambda i, lp, lab, f: (i, lp, lab, f, 2, 0.5), ValueError, r"variant must be 0 \(A\) or 1 \(B\), got 2"),
    (lambda i, lp, lab, f: (i, lp, lab, f, -1, 0.5), ValueError, r"variant must be 0 \(A\) or 1 \(B\), got -1"),
    (lambda i, lp, lab, f: (i, lp, lab, f, 1, 0.0), ValueError, r"top_p must be in \(0, 1\], got 0"),
    (lambda i, lp, lab, f: (i, lp, lab, f, 1, 1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (lambda i, lp, lab, f: (i.int(), lp, lab, f, 0, 0.5), TypeError, "topk_ids must be int64, got torch.int32"),
    (lambda i, lp, lab, f: (i.reshape(-1), lp.reshape(-1), lab, f, 0, 0.5), ValueError,
     r"topk_ids must be 2-D \[N, K\], got shape \[12\]"),
    (lambda i, lp, lab, f: (i, lp[:, :2], lab, f, 0, 0.5), ValueError,
     r"topk_logprobs must have the shape of topk_ids \[4, 3\], got \[4, 2\]"),
    (lambda i, lp, lab, f: (i, lp.long(), lab, f, 0, 0.5), TypeError, "topk_logprobs must be float32"),
    (lambda i, lp, lab, f: (i, lp, lab[:3], f, 0, 0.5), ValueError,
     r"labels must have N = 4 elements \(shape \[N\]\), got shape \[3\]"),
    (lambda i, lp, lab, f: (i, lp, lab.int(), f, 0, 0.5), TypeError, "labels must be int64"),
    (lambda i, lp, lab, f: (i, lp, lab, f[:3], 0, 0.5), ValueError, "forget_mask must have N = 4 elements"),
    (lambda i, lp, lab, f: (i, lp, lab, f.int(), 0, 0.5), TypeError, "forget_mask must be bool, got torch.int32"),
]


@pytest.mark.parametrize("make,exc,match", BAD_DEMOTE)
def test_demote_targets_bad_input(make, exc, match):
    args = make(*teacher_data(n=4, k=3))
    B.assert_same_error(_everywhere("demote_targets", S.check_demote_targets, args), exc, match)


@pytest.mark.parametrize("backend", B.params((B.CUDA,)))
def test_mixed_devices_are_refused(backend):
    # a CUDA hidden with a CPU weight: the same error from the CUDA kernel, the Triton twin on
    # CUDA tensors and the Python check, not a crash
    h, w, b, lab = _teacher_args()
    ops = [backend.op("teacher_topk"), B.TRITON.op("teacher_topk"), S.check_teacher_topk]
    B.assert_same_error([lambda f=f: f(h.cuda(), w, b, lab.cuda(), 2, 2) for f in ops],
                        ValueError, r"weight must be on hidden's device \(cuda:0\), got cpu")
    lp, lab2 = torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long)
    ops = [backend.op("select_forget_positions"), B.TRITON.op("select_forget_positions"),
           S.check_select_forget_positions]
    B.assert_same_error([lambda f=f: f(lp.cuda(), lab2, 0.5, 0) for f in ops],
                        ValueError, r"labels must be on label_logprob's device \(cuda:0\), got cpu")


def test_meta_and_mixed_meta_devices():
    # meta tensors run the fake kernel (shapes for torch.compile), which runs the op's check
    h, w, b, lab = (t.to("meta") for t in _teacher_args())
    ids, lp, llp = torch.ops.lethe.teacher_topk(h, w, b, lab, 3, 2)
    assert ids.device.type == "meta" and ids.shape == (4, 3) and llp.shape == (4,)
    with pytest.raises(ValueError, match=r"labels must be on label_logprob's device \(meta\), got cpu"):
        torch.ops.lethe.select_forget_positions(torch.zeros(2, 5, device="meta"), torch.zeros(2, 5, dtype=torch.long),
                                                0.5, 0)
