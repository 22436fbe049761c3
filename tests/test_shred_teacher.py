"""shred family on CPU, first half: the C++ kernels teacher_topk, select_forget_positions and
demote_targets against the pure-PyTorch reference (python/lethe/ops/shred_reference.py), on
awkward shapes, ties and extreme values, and bad input."""
import math

import pytest
import torch

import lethe  # noqa: F401  (loads the compiled library)

from lethe.ops.shred_reference import (
    demote_targets_reference,
    select_forget_positions_reference,
    teacher_topk_reference,
)

ops = torch.ops.lethe
IGNORE = -100


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(n, v, g, ignore_frac=0.2):
    lab = torch.randint(0, v, (n,), generator=g)
    lab[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return lab


def _check_teacher(hidden, weight, bias, labels, k, chunk, atol=1e-5, rtol=1.3e-6):
    ids, lp, llp = ops.teacher_topk(hidden, weight, bias, labels, k, chunk)
    rids, rlp, rllp = teacher_topk_reference(hidden, weight, bias, labels, k)
    n = hidden.shape[0]
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and llp.dtype == torch.float32
    assert ids.shape == (n, k) and lp.shape == (n, k) and llp.shape == (n,)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp, rlp, atol=atol, rtol=rtol)
    torch.testing.assert_close(llp, rllp, atol=atol, rtol=rtol)
    assert torch.all(llp[labels == IGNORE] == 0)
    return ids, lp, llp


# ---------------------------------------------------------------------------------------------
# teacher_topk

# (N, H, V, K, chunk_size)
TEACHER_SHAPES = [
    (1, 19, 101, 5, 1),
    (1, 8, 7, 7, 4),  # K = V, chunk > N
    (37, 19, 101, 1, 5),  # K = 1, chunk does not divide N
    (37, 19, 101, 101, 8),  # K = V
    (37, 19, 101, 10, 100),  # chunk > N
    (37, 19, 101, 10, 37),  # one exact chunk
    (64, 33, 2053, 50, 24),
    (5, 3, 1, 1, 2),  # V = 1
]


@pytest.mark.parametrize("shape", TEACHER_SHAPES, ids=lambda s: "N%d_H%d_V%d_K%d_c%d" % s)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_teacher_topk_fp32(shape, use_bias):
    n, h, v, k, chunk = shape
    g = _gen(n * 1000 + v + k)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g) if use_bias else None
    _check_teacher(hidden, weight, bias, _labels(n, v, g), k, chunk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("v", [101, 4099])  # 4099: the weight converted in two blocks (lm_head.h)
def test_teacher_topk_low_precision(dtype, use_bias, v):
    # the kernel computes in fp32 on the upcast inputs, as the reference does
    n, h, k = 37, 19, 7
    g = _gen(7)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if use_bias else None
    _check_teacher(hidden, weight, bias, _labels(n, v, g), k, 5)


def test_teacher_topk_mixed_dtypes():
    g = _gen(8)
    hidden = torch.randn(9, 16, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 16, generator=g)
    bias = torch.randn(50, generator=g).to(torch.float16)
    _check_teacher(hidden, weight, bias, _labels(9, 50, g), 4, 4)


def test_teacher_topk_labels_edges():
    n, h, v = 12, 19, 101
    g = _gen(9)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    labels = torch.tensor([0, v - 1] * (n // 2))
    labels[5] = IGNORE
    _check_teacher(hidden, weight, None, labels, 3, 5)
    # all labels ignored: label log-probs are all 0
    _, _, llp = _check_teacher(hidden, weight, None, torch.full((n,), IGNORE), 3, 5)
    assert torch.equal(llp, torch.zeros(n))


def test_teacher_topk_large_logits():
    # |logits| ~ 1e4: exp would overflow without max subtraction. Integer-valued inputs make every
    # logit exact in fp32 whatever the summation order, so kernel and reference see equal logits.
    n, h, v, k = 37, 19, 101, 10
    g = _gen(10)
    hidden = torch.randint(-4, 5, (n, h), generator=g).float()
    weight = torch.randint(-300, 301, (v, h), generator=g).float()
    bias = torch.full((v,), 1.0e4)
    ids, lp, llp = _check_teacher(hidden, weight, bias, _labels(n, v, g), k, 6, atol=1e-3,
                                  rtol=1e-5)
    assert torch.isfinite(lp).all() and torch.isfinite(llp).all()
    # and negative, with no bias
    _check_teacher(hidden, -weight * 2, None, _labels(n, v, g), k, 6, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 30])
def test_teacher_topk_exact_ties(k):
    # duplicated weight rows (integer-valued, so logits are exactly equal): equal logits are
    # ordered by ascending id
    n, h, base = 21, 11, 10
    g = _gen(11 + k)
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    rows = torch.randint(-5, 6, (base, h), generator=g).float()
    perm = torch.randperm(3 * base, generator=g)
    weight = rows.repeat(3, 1)[perm]  # every logit value appears three times, at scattered ids
    ids, _, _ = _check_teacher(hidden, weight, None, _labels(n, 3 * base, g), k, 4)
    # hidden rows of zeros: every logit equal -> ids 0..k-1
    zero = torch.zeros(3, h)
    ids0, lp0, _ = _check_teacher(zero, weight, None, torch.tensor([0, 5, IGNORE]), k, 2)
    assert torch.equal(ids0, torch.arange(k).expand(3, k))
    torch.testing.assert_close(lp0, torch.full((3, k), -math.log(3 * base)))


def test_teacher_topk_noncontiguous_and_empty():
    g = _gen(12)
    hidden = torch.randn(19, 37, generator=g).t()  # [37, 19], strided
    weight = torch.randn(19, 101, generator=g).t()
    bias = torch.randn(202, generator=g)[::2]
    labels = _labels(74, 101, g)[::2]
    _check_teacher(hidden, weight, bias, labels, 6, 7)
    ids, lp, llp = ops.teacher_topk(torch.zeros(0, 19), weight, None,
                                    torch.zeros(0, dtype=torch.long), 6, 7)
    assert ids.shape == (0, 6) and lp.shape == (0, 6) and llp.shape == (0,)
    assert ids.dtype == torch.int64


def test_teacher_topk_bad_input():
    h, w, b = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10)
    lab = torch.tensor([0, 1, 9, IGNORE])
    T = ops.teacher_topk
    with pytest.raises(RuntimeError, match="hidden"):
        T(h.long(), w, b, lab, 2, 2)
    with pytest.raises(RuntimeError, match="hidden"):
        T(h.reshape(-1), w, b, lab, 2, 2)
    with pytest.raises(RuntimeError, match="weight"):
        T(h, torch.randn(10, 7), b, lab, 2, 2)
    with pytest.raises(RuntimeError, match="weight"):
        T(h, w.reshape(-1), b, lab, 2, 2)
    with pytest.raises(RuntimeError, match="bias"):
        T(h, w, torch.randn(11), lab, 2, 2)
    with pytest.raises(RuntimeError, match="labels"):
        T(h, w, b, lab.int(), 2, 2)
    with pytest.raises(RuntimeError, match="labels"):
        T(h, w, b, lab[:3], 2, 2)
    with pytest.raises(RuntimeError, match=r"labels.*got 10\b"):
        T(h, w, b, torch.tensor([0, 1, 10, IGNORE]), 2, 2)
    with pytest.raises(RuntimeError, match=r"labels.*got -5\b"):
        T(h, w, b, torch.tensor([0, -5, 1, IGNORE]), 2, 2)
    with pytest.raises(RuntimeError, match=r"\bk must"):
        T(h, w, b, lab, 0, 2)
    with pytest.raises(RuntimeError, match=r"\bk must"):
        T(h, w, b, lab, 11, 2)
    with pytest.raises(RuntimeError, match="chunk_size"):
        T(h, w, b, lab, 2, 0)


# ---------------------------------------------------------------------------------------------
# select_forget_positions


def _check_select(lp, labels, fraction, skip):
    out = ops.select_forget_positions(lp, labels, fraction, skip)
    ref = select_forget_positions_reference(lp, labels, fraction, skip)
    assert out.dtype == torch.bool and out.shape == lp.shape
    assert torch.equal(out, ref), (fraction, skip)
    return out


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("skip", [0, 1, 3, 50])
def test_select_forget_positions(fraction, skip):
    B, T = 7, 23
    g = _gen(int(fraction * 100) + skip)
    lp = -torch.rand(B, T, generator=g) * 10
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    labels[2] = IGNORE  # a fully padded row
    labels[4, :20] = IGNORE  # a row with 3 valid positions (fewer than skip=50, or 3)
    labels[5] = torch.arange(T)  # all valid, n = T - skip
    out = _check_select(lp, labels, fraction, skip)
    assert not out[2].any()
    assert not out[labels == IGNORE].any()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_select_forget_positions_ties(fraction):
    # few distinct values: equal log-probs go to the earlier position first
    B, T = 6, 40
    g = _gen(20)
    lp = -torch.randint(0, 3, (B, T), generator=g).float()
    labels = torch.randint(0, 9, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = IGNORE
    _check_select(lp, labels, fraction, 2)
    # all equal: the first m valid positions after skip
    lp0 = torch.zeros(1, 10)
    out = _check_select(lp0, torch.zeros(1, 10, dtype=torch.long), 0.3, 2)
    assert torch.equal(out[0].nonzero().flatten(), torch.tensor([2, 3, 4]))


@pytest.mark.parametrize("n,fraction", [(10, 0.1), (10, 0.3), (10, 0.7), (3, 1 / 3), (7, 0.9),
                                        (100, 0.29), (49, 0.57)])
def test_select_forget_positions_ceil_boundaries(n, fraction):
    # fraction * n lands on (or a rounding error away from) an integer
    lp = torch.linspace(0, -5, n)[None]
    labels = torch.zeros(1, n, dtype=torch.long)
    out = _check_select(lp, labels, fraction, 0)
    assert int(out.sum()) == math.ceil(fraction * n - 1e-9)


def test_select_forget_positions_dtypes_and_empty():
    g = _gen(21)
    lp = -torch.rand(4, 17, generator=g) * 3
    labels = torch.randint(0, 5, (4, 17), generator=g)
    for dt in (torch.float16, torch.bfloat16):
        _check_select(lp.to(dt), labels, 0.4, 1)
    _check_select(lp.t().contiguous().t(), labels, 0.4, 1)  # strided
    out = ops.select_forget_positions(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.long), 0.5, 0)
    assert out.shape == (0, 5)
    out = ops.select_forget_positions(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.long), 0.5, 0)
    assert out.shape == (3, 0)


def test_select_forget_positions_bad_input():
    lp = torch.zeros(2, 5)
    lab = torch.zeros(2, 5, dtype=torch.long)
    S = ops.select_forget_positions
    with pytest.raises(RuntimeError, match="fraction"):
        S(lp, lab, -0.1, 0)
    with pytest.raises(RuntimeError, match="fraction"):
        S(lp, lab, 1.5, 0)
    with pytest.raises(RuntimeError, match="fraction"):
        S(lp, lab, float("nan"), 0)
    with pytest.raises(RuntimeError, match="skip"):
        S(lp, lab, 0.5, -1)
    with pytest.raises(RuntimeError, match="labels"):
        S(lp, lab[:, :4], 0.5, 0)
    with pytest.raises(RuntimeError, match="labels"):
        S(lp, lab.int(), 0.5, 0)
    with pytest.raises(RuntimeError, match="label_logprob"):
        S(lp.reshape(-1), lab.reshape(-1), 0.5, 0)
    with pytest.raises(RuntimeError, match="label_logprob"):
        S(lp.long(), lab, 0.5, 0)


# ---------------------------------------------------------------------------------------------
# demote_targets


def _teacher_data(n=37, v=101, k=8, seed=30):
    g = _gen(seed)
    hidden = torch.randn(n, 19, generator=g) * 2
    weight = torch.randn(v, 19, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    ids, lp, _ = teacher_topk_reference(hidden, weight, None, labels, k)
    # a third of the rows: the label is inside the top-K (at varying ranks)
    inside = torch.arange(n) % 3 == 0
    labels[inside] = ids[inside, torch.arange(n)[inside] % k]
    labels[torch.arange(n) % 7 == 1] = IGNORE
    forget = torch.rand(n, generator=g) < 0.6
    return ids, lp, labels, forget


def _check_demote(ids, lp, labels, forget, variant, top_p):
    q = ops.demote_targets(ids, lp, labels, forget, variant, top_p)
    ref = demote_targets_reference(ids, lp, labels, forget, "AB"[variant], top_p)
    assert q.dtype == torch.float32 and q.shape == ids.shape
    torch.testing.assert_close(q, ref)
    # exactly the same entries zeroed
    assert torch.equal(q == 0, ref == 0)
    return q


@pytest.mark.parametrize("variant", [0, 1], ids=["A", "B"])
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [1, 8, 101])
def test_demote_targets(variant, top_p, k):
    ids, lp, labels, forget = _teacher_data(k=k)
    q = _check_demote(ids, lp, labels, forget, variant, top_p)
    s = q.sum(-1)
    assert torch.all((s == 0) | ((s - 1).abs() < 1e-5))
    # anchor rows are the renormalised teacher probabilities
    p = lp[~forget].exp()
    torch.testing.assert_close(q[~forget], p / p.sum(-1, keepdim=True))
    if variant == 1 and top_p == 1e-6:
        # only the first entry (and the label) demoted at forget rows
        assert torch.all(q[forget, 0] == 0)
        if k > 1:
            rest = forget & (labels != ids[:, 1])
            assert torch.all(q[rest, 1] > 0)


def test_demote_targets_all_demoted():
    ids, lp, labels, forget = _teacher_data(k=1)
    # K = 1, variant A, label = the only entry: forget rows become all zeros
    labels = ids[:, 0].clone()
    q = _check_demote(ids, lp, labels, forget, 0, 0.5)
    assert torch.equal(q[forget], torch.zeros(int(forget.sum()), 1))
    assert torch.equal(q[~forget], torch.ones(int((~forget).sum()), 1))
    # variant B, top_p = 1 with K < V: every entry's preceding mass is < 1, so all are demoted
    ids, lp, labels, forget = _teacher_data(k=8)
    lp = torch.log_softmax(torch.randn(lp.shape[0], 101, generator=_gen(32)), -1)[:, :8]
    q = _check_demote(ids, lp, labels, forget, 1, 1.0)
    assert torch.equal(q[forget], torch.zeros(int(forget.sum()), 8))
    # K = V: the fp32 cumulative sum may reach 1 before the tail; kernel and reference agree
    ids, lp, labels, forget = _teacher_data(k=101)
    _check_demote(ids, lp, labels, forget, 1, 1.0)


def test_demote_targets_label_outside_and_dtypes():
    ids, lp, labels, forget = _teacher_data(k=8, seed=31)
    outside = torch.full_like(labels, 100)
    outside[ids.eq(100).any(-1)] = IGNORE
    forget = torch.ones_like(forget)
    q = _check_demote(ids, lp, outside, forget, 0, 0.5)  # nothing demoted: plain renormalisation
    p = lp.exp()
    torch.testing.assert_close(q, p / p.sum(-1, keepdim=True))
    for dt in (torch.float16, torch.bfloat16):
        _check_demote(ids, lp.to(dt), labels, forget, 1, 0.5)
    # [B, T]-shaped labels / mask with N = B*T elements, as the reference's reshape allows
    _check_demote(ids[:36], lp[:36], labels[:36].reshape(6, 6), forget[:36].reshape(6, 6), 1, 0.5)
    # -inf log-probs (zero probability) and N = 0
    lp2 = lp.clone()
    lp2[:, -3:] = float("-inf")
    _check_demote(ids, lp2, labels, forget, 1, 0.7)
    q0 = ops.demote_targets(ids[:0], lp[:0], labels[:0], forget[:0], 0, 0.5)
    assert q0.shape == (0, 8)


def test_demote_targets_bad_input():
    ids, lp, labels, forget = _teacher_data(n=4, k=3)
    D = ops.demote_targets
    with pytest.raises(RuntimeError, match="variant"):
        D(ids, lp, labels, forget, 2, 0.5)
    with pytest.raises(RuntimeError, match="variant"):
        D(ids, lp, labels, forget, -1, 0.5)
    with pytest.raises(RuntimeError, match="top_p"):
        D(ids, lp, labels, forget, 1, 0.0)
    with pytest.raises(RuntimeError, match="top_p"):
        D(ids, lp, labels, forget, 1, 1.5)
    with pytest.raises(RuntimeError, match="topk_ids"):
        D(ids.int(), lp, labels, forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="topk_ids"):
        D(ids.reshape(-1), lp.reshape(-1), labels, forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="topk_logprobs"):
        D(ids, lp[:, :2], labels, forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="topk_logprobs"):
        D(ids, lp.long(), labels, forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="labels"):
        D(ids, lp, labels[:3], forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="labels"):
        D(ids, lp, labels.int(), forget, 0, 0.5)
    with pytest.raises(RuntimeError, match="forget_mask"):
        D(ids, lp, labels, forget[:3], 0, 0.5)
    with pytest.raises(RuntimeError, match="forget_mask"):
        D(ids, lp, labels, forget.int(), 0, 0.5)
