"""Triton shred teacher-side kernels (lethe.triton_kernels.shred_teacher: teacher_topk,
select_forget_positions, demote_targets) against the pure-PyTorch reference.

The top-K ids and the selection masks must match exactly; log-probs and target probabilities to
fp32 rounding (the summation orders differ). Demotion tests use random probabilities, so no
exclusive cumulative sum lands exactly on top_p (there the last bit of the cumsum decides).

On a machine without a CUDA GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
tests/conftest.py; see tests/triton_util.py). bfloat16 inputs are read exactly and every output is
fp32 or int64, so they are checked like the others."""
import pytest
import torch

from triton_util import DEVICE, assert_kernels_run_where_they_can
from lethe.ops.shred_reference import (
    demote_targets_reference,
    select_forget_positions_reference,
    teacher_topk_reference,
)
from lethe.triton_kernels import shred_teacher as tt

pytestmark = [pytest.mark.triton]


def test_kernels_run_where_they_can():
    assert_kernels_run_where_they_can(tt._teacher_select_kernel, tt._teacher_order_kernel,
                                      tt._select_row_kernel, tt._demote_row_kernel)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# teacher_topk
# ---------------------------------------------------------------------------------------------

def check_teacher(hidden, weight, bias, labels, k, chunk):
    ids, lp, llp = tt.teacher_topk(hidden, weight, bias, labels, k, chunk)
    rids, rlp, rllp = teacher_topk_reference(hidden, weight, bias, labels, k, chunk)
    n = hidden.shape[0]
    assert ids.dtype == torch.int64 and ids.shape == (n, k)
    assert lp.dtype == torch.float32 and lp.shape == (n, k)
    assert llp.dtype == torch.float32 and llp.shape == (n,)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(llp, rllp, rtol=1e-5, atol=1e-5, equal_nan=True)
    return ids, lp, llp


def teacher_inputs(n, h, v, dtype, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    if v > 3:
        weight[v - 1] = weight[1]  # an exact tie, the later id second
    weight = weight.to(DEVICE)
    bias = None
    if has_bias:
        bias = torch.randn(v, generator=g)
        if v > 3:
            bias[v - 1] = bias[1]
        bias = bias.to(dtype).to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=g)
    for i, l in enumerate((-100, 0, v - 1)):
        if i < n:
            labels[i] = l
    return hidden, weight, bias, labels.to(DEVICE)


TEACHER_SHAPES = [  # (N, H, V, K, chunk_size)
    (1, 5, 37, 1, 1),
    (7, 5, 37, 5, 3),  # chunk_size not dividing N, V not a multiple of the tile
    (2, 5, 37, 37, 1),  # K = V
    (5, 8, 32, 3, 16),  # V a multiple of the tile, chunk_size > N
    (3, 4, 1, 1, 2),  # V = 1
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shape", TEACHER_SHAPES)
def test_teacher_topk_tiled(shape, has_bias, dtype, monkeypatch):
    monkeypatch.setattr(tt, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(tt, "BLOCK_K_MAX", 16)  # several K tiles in the pairwise ranking
    n, h, v, k, chunk = shape
    check_teacher(*teacher_inputs(n, h, v, dtype, has_bias, seed=n + v + k), k, chunk)


def test_teacher_topk_one_tile():
    check_teacher(*teacher_inputs(6, 7, 37, torch.float32, True, seed=1), 4, 4)


def test_teacher_topk_exact_ties(monkeypatch):
    # integer-valued inputs: every logit is exact, so the ties are exact on every backend
    monkeypatch.setattr(tt, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(tt, "BLOCK_K_MAX", 16)  # several K tiles in the pairwise ranking
    g = torch.Generator().manual_seed(2)
    v, h = 37, 3
    base = torch.randint(-2, 3, (5, h), generator=g).float()
    weight = base[torch.randint(0, 5, (v,), generator=g)].to(DEVICE)  # many duplicate rows
    hidden = torch.randint(-2, 3, (4, h), generator=g).float()
    hidden[3] = 0.0  # an all-equal row: ids 0..K-1
    hidden = hidden.to(DEVICE)
    labels = torch.tensor([5, -100, 36, 0], device=DEVICE)
    ids, _, _ = check_teacher(hidden, weight, None, labels, 20, 3)
    assert torch.equal(ids[3], torch.arange(20, device=DEVICE))
    bias = torch.randint(-1, 2, (v,), generator=g).float().to(DEVICE)
    check_teacher(hidden, weight, bias, labels, 37, 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_teacher_topk_nonfinite(monkeypatch):
    # +-inf and NaN logits (through the bias): NaN sorts first, as torch.sort(descending) puts it
    monkeypatch.setattr(tt, "BLOCK_V_MAX", 16)
    monkeypatch.setattr(tt, "BLOCK_K_MAX", 16)  # several K tiles in the pairwise ranking
    g = torch.Generator().manual_seed(3)
    v = 37
    hidden = torch.randn(4, 4, generator=g).to(DEVICE)
    weight = torch.randn(v, 4, generator=g).to(DEVICE)
    labels = torch.tensor([1, 2, -100, 30], device=DEVICE)
    bias = torch.zeros(v)
    bias[[3, 20]] = float("-inf")
    check_teacher(hidden, weight, bias.to(DEVICE), labels, 6, 4)
    bias[[5, 33]] = float("inf")
    check_teacher(hidden, weight, bias.to(DEVICE), labels, 6, 4)
    bias[[4, 17, 34]] = float("nan")
    check_teacher(hidden, weight, bias.to(DEVICE), labels, 6, 4)
    check_teacher(hidden, weight, torch.full((v,), float("-inf"), device=DEVICE), labels, 3, 4)


def test_teacher_topk_empty():
    hidden = torch.empty(0, 4, device=DEVICE)
    weight = torch.randn(6, 4, device=DEVICE)
    labels = torch.empty(0, dtype=torch.long, device=DEVICE)
    ids, lp, llp = tt.teacher_topk(hidden, weight, None, labels, 3, 2)
    assert ids.shape == (0, 3) and lp.shape == (0, 3) and llp.shape == (0,)


# ---------------------------------------------------------------------------------------------
# select_forget_positions
# ---------------------------------------------------------------------------------------------

def selection_inputs(b, t, dtype, seed, ties=False, nan=False):
    g = torch.Generator().manual_seed(seed)
    vals = -torch.rand(b, t, generator=g) * 5
    if ties:
        vals = vals.round()  # a handful of distinct values
    if nan and t > 3:
        vals[:, 1] = float("nan")
        vals[0, t - 1] = float("nan")
    labels = torch.randint(0, 50, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    labels[:, 0] = -100
    if b > 1:
        labels[1] = -100  # a fully padded row
    return vals.to(dtype).to(DEVICE), labels.to(DEVICE)


def check_select(vals, labels, fraction, skip):
    out = tt.select_forget_positions(vals, labels, fraction, skip)
    ref = select_forget_positions_reference(vals, labels, fraction, skip)
    assert out.dtype == torch.bool and out.shape == vals.shape
    assert torch.equal(out, ref), (fraction, skip)


SELECT_SHAPES = [(1, 1), (3, 37), (4, 16), (2, 50)]  # (B, T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SELECT_SHAPES)
def test_select_tiled(shape, dtype, monkeypatch):
    monkeypatch.setattr(tt, "BLOCK_T_MAX", 16)
    b, t = shape
    for i, (ties, nan) in enumerate([(False, False), (True, False), (True, True)]):
        vals, labels = selection_inputs(b, t, dtype, seed=b + t + i, ties=ties, nan=nan)
        for fraction, skip in [(0.0, 0), (1.0, 0), (0.3, 2), (0.5, 1), (1.0, 5), (0.7, 1000)]:
            check_select(vals, labels, fraction, skip)


def test_select_one_tile_and_rounding():
    vals, labels = selection_inputs(3, 37, torch.float32, seed=7, ties=True)
    labels[0] = 1  # every position valid: n = 37 - skip
    for fraction in (0.1, 0.2, 0.25, 1 / 3, 0.6, 0.9):  # fraction * n near an integer
        for skip in (0, 7, 17):
            check_select(vals, labels, fraction, skip)


def test_select_empty():
    for shape in [(0, 5), (3, 0)]:
        out = tt.select_forget_positions(torch.zeros(shape, device=DEVICE),
                                         torch.zeros(shape, dtype=torch.long, device=DEVICE), 0.5, 0)
        assert out.shape == shape and out.dtype == torch.bool


# ---------------------------------------------------------------------------------------------
# demote_targets
# ---------------------------------------------------------------------------------------------

def demote_inputs(n, k, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 2
    lp_full = torch.log_softmax(z, -1)
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    lp = torch.gather(lp_full, 1, ids)
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 0:
        labels[0] = ids[0, 0]  # the label is the top-1
    if n > 1 and k > 1:
        labels[1] = ids[1, k - 1]  # the label is the last kept entry
    if n > 2 and k < v:
        labels[2] = torch.sort(z[2], descending=True).indices[k]  # just outside the top-K
    if n > 3:
        labels[3] = -100
    forget = torch.rand(n, generator=g) < 0.7
    if n > 0:
        forget[0] = True
    return (ids.to(DEVICE), lp.to(dtype).to(DEVICE), labels.to(DEVICE), forget.to(DEVICE))


def check_demote(ids, lp, labels, forget, variant, top_p):
    q = tt.demote_targets(ids, lp, labels, forget, variant, top_p)
    ref = demote_targets_reference(ids, lp, labels, forget, "AB"[variant], top_p)
    assert q.dtype == torch.float32 and q.shape == ids.shape
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(q == 0, ref == 0)
    return q


DEMOTE_SHAPES = [(1, 1, 5), (7, 5, 37), (6, 37, 37), (9, 20, 100)]  # (N, K, V)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("shape", DEMOTE_SHAPES)
def test_demote(shape, variant, dtype):
    n, k, v = shape
    ids, lp, labels, forget = demote_inputs(n, k, v, seed=n + k + variant, dtype=dtype)
    for top_p in (0.3, 0.77, 1.0):
        check_demote(ids, lp, labels, forget, variant, top_p)


def test_demote_all_demoted_rows():
    ids, lp, labels, forget = demote_inputs(5, 1, 10, seed=11)
    labels = ids[:, 0].clone()  # K = 1, the label is the only entry: every forget row is zero
    forget[:] = True
    forget[4] = False
    q = check_demote(ids, lp, labels, forget, 0, 0.5)
    assert not q[:4].any() and torch.allclose(q[4], torch.ones(1, device=DEVICE))
    ids, lp, labels, forget = demote_inputs(4, 6, 30, seed=12)
    forget[:] = True
    q = check_demote(ids, lp, labels, forget, 1, 1.0)  # top-K mass < 1: the whole nucleus
    assert not q.any()


def test_demote_labels_any_shape():
    ids, lp, labels, forget = demote_inputs(6, 4, 20, seed=13)
    q = tt.demote_targets(ids, lp, labels.reshape(2, 3), forget.reshape(3, 2), 1, 0.4)
    torch.testing.assert_close(q, demote_targets_reference(ids, lp, labels, forget, "B", 0.4),
                               rtol=1e-6, atol=1e-6)


def test_demote_empty():
    ids = torch.empty(0, 3, dtype=torch.long, device=DEVICE)
    q = tt.demote_targets(ids, torch.empty(0, 3, device=DEVICE),
                          torch.empty(0, dtype=torch.long, device=DEVICE),
                          torch.empty(0, dtype=torch.bool, device=DEVICE), 0, 0.5)
    assert q.shape == (0, 3) and q.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def test_bad_arguments():
    hidden, weight, bias, labels = teacher_inputs(3, 4, 8, torch.float32, True, seed=0)
    with pytest.raises(TypeError, match="hidden"):
        tt.teacher_topk(hidden.long(), weight, bias, labels, 2, 2)
    with pytest.raises(ValueError, match="hidden"):
        tt.teacher_topk(hidden[0], weight, bias, labels, 2, 2)
    with pytest.raises(ValueError, match="weight must have H"):
        tt.teacher_topk(hidden, weight[:, :3], bias, labels, 2, 2)
    with pytest.raises(ValueError, match="bias"):
        tt.teacher_topk(hidden, weight, bias[:7], labels, 2, 2)
    with pytest.raises(TypeError, match="labels"):
        tt.teacher_topk(hidden, weight, bias, labels.int(), 2, 2)
    with pytest.raises(ValueError, match="labels must have shape"):
        tt.teacher_topk(hidden, weight, bias, labels[:2], 2, 2)
    bad = labels.clone()
    bad[2] = 8
    with pytest.raises(ValueError, match=r"labels must be in \[0, V\).*got 8 at index 2"):
        tt.teacher_topk(hidden, weight, bias, bad, 2, 2)
    bad[2] = -1
    with pytest.raises(ValueError, match="got -1 at index 2"):
        tt.teacher_topk(hidden, weight, bias, bad, 2, 2)
    for k in (0, 9):
        with pytest.raises(ValueError, match=r"k must be in \[1, V\]"):
            tt.teacher_topk(hidden, weight, bias, labels, k, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        tt.teacher_topk(hidden, weight, bias, labels, 2, 0)

    vals, lab = selection_inputs(2, 5, torch.float32, seed=0)
    with pytest.raises(TypeError, match="label_logprob"):
        tt.select_forget_positions(vals.double(), lab, 0.5, 0)
    with pytest.raises(ValueError, match="label_logprob"):
        tt.select_forget_positions(vals[0], lab[0], 0.5, 0)
    with pytest.raises(ValueError, match="labels must have the shape"):
        tt.select_forget_positions(vals, lab[:, :4], 0.5, 0)
    with pytest.raises(TypeError, match="labels"):
        tt.select_forget_positions(vals, lab.int(), 0.5, 0)
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            tt.select_forget_positions(vals, lab, fraction, 0)
    with pytest.raises(ValueError, match="skip"):
        tt.select_forget_positions(vals, lab, 0.5, -1)

    ids, lp, lab, forget = demote_inputs(4, 3, 10, seed=0)
    with pytest.raises(TypeError, match="topk_ids"):
        tt.demote_targets(ids.int(), lp, lab, forget, 0, 0.5)
    with pytest.raises(ValueError, match="topk_logprobs must have the shape"):
        tt.demote_targets(ids, lp[:, :2], lab, forget, 0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        tt.demote_targets(ids, lp, lab[:3], forget, 0, 0.5)
    with pytest.raises(TypeError, match="forget_mask"):
        tt.demote_targets(ids, lp, lab, forget.int(), 0, 0.5)
    with pytest.raises(ValueError, match="forget_mask"):
        tt.demote_targets(ids, lp, lab, forget[:3], 0, 0.5)
    with pytest.raises(ValueError, match="variant"):
        tt.demote_targets(ids, lp, lab, forget, 2, 0.5)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            tt.demote_targets(ids, lp, lab, forget, 1, top_p)


def test_public_api_backend_triton_pipeline():
    import lethe
    from lethe.ops import shred_reference as R

    g = torch.Generator().manual_seed(11)
    B, T, H, V, K = 2, 7, 6, 37, 5
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE)
    weight = torch.randn(V, H, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    labels[1, -2:] = -100
    ids, lp, llp = lethe.ops.teacher_topk(hidden, weight, labels, K, chunk_size=3, backend="triton")
    r_ids, r_lp, r_llp = R.teacher_topk_reference(hidden.reshape(-1, H), weight, None, labels.reshape(-1), K)
    assert torch.equal(ids.reshape(-1, K), r_ids)
    torch.testing.assert_close(lp.reshape(-1, K), r_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(llp.reshape(-1), r_llp, rtol=1e-5, atol=1e-5)
    forget = lethe.ops.select_forget_positions(llp, labels, 0.5, 1, backend="triton")
    assert torch.equal(forget, R.select_forget_positions_reference(llp, labels, 0.5, 1))
    q = lethe.ops.demote_targets(ids, lp, labels, forget, "B", 0.4, backend="triton")
    rq = R.demote_targets_reference(ids.reshape(-1, K), lp.reshape(-1, K), labels.reshape(-1), forget.reshape(-1), "B", 0.4)
    torch.testing.assert_close(q.reshape(-1, K), rq, rtol=1e-6, atol=1e-6)


def test_opcheck_triton_teacher_ops():
    import lethe  # noqa: F401  (registers the Triton custom ops)

    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(5, 4, generator=g).to(DEVICE)
    weight = torch.randn(11, 4, generator=g).to(DEVICE)
    labels = torch.randint(0, 11, (5,), generator=g).to(DEVICE)
    ops = torch.ops.lethe
    torch.library.opcheck(ops.teacher_topk_triton.default, (hidden, weight, None, labels, 3, 2))
    lp = torch.log_softmax(torch.randn(2, 6, generator=g), -1).to(DEVICE)
    lab = torch.randint(0, 11, (2, 6), generator=g).to(DEVICE)
    torch.library.opcheck(ops.select_forget_positions_triton.default, (lp, lab, 0.5, 1))
    ids = torch.stack([torch.randperm(11, generator=g)[:3] for _ in range(5)]).to(DEVICE)
    tlp = torch.log_softmax(torch.randn(5, 3, generator=g), -1).to(DEVICE)
    torch.library.opcheck(ops.demote_targets_triton.default, (ids, tlp, labels, labels > 4, 1, 0.5))
