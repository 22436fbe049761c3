"""Triton kernels of the shred family: teacher_topk, select_forget_positions and demote_targets.

Same semantics (and argument checks) as the CPU kernels in csrc/cpu/shred_teacher.cpp; definitions in
python/lethe/ops/shred_reference.py. Kernels are launched with enable_fp_fusion=False (as
shred_kl.py and quant.py do), and index with int64 offsets.

teacher_topk: chunk_size rows at a time, z = hidden_c.float() @ weight.float().t() (+ bias, added
separately, as the reference rounds it) with torch into one [chunk, V] fp32 buffer, then one
program per row (_teacher_select_kernel, then _teacher_order_kernel):
  * lse: online max / sum-exp over BLOCK_V tiles (per-lane running max and sum, merged at the
    end), as torch.logsumexp: a NaN anywhere gives NaN, a +inf max gives +inf, an all -inf row
    gives -inf;
  * top-K in the order (value desc, NaN first, -0 == +0, id asc), i.e. torch.sort(descending,
    stable): torch.topk gives K candidate ids per row (which of several equal values it keeps is
    unspecified), then _teacher_select_kernel keeps the candidates above the K-th value and adds
    the lowest ids equal to it (an ordered scan of the row), and _teacher_order_kernel ranks those
    K entries by pairwise comparison ([BLOCK_K, BLOCK_K] tiles) and writes them in order. O(V + K^2)
    work per row;
  * log-probs z[id] - lse, the label's log-prob (0 where label == -100).
  The ids equal the reference's whenever z is the same (it is computed by the same torch
  matmul); the log-probs agree to fp32 rounding (the lse summation order differs).

select_forget_positions: one program per row. m(n) = ceil(fraction * n - 1e-9) is computed on
the host for every possible n in [0, T] (a [T+1] int64 table, made with the same torch fp64 ops
as the reference, no device sync), so the kernel only indexes it: m is bit-exact. The kernel
counts the eligible positions (valid, after the first `skip` valid ones: a running tl.cumsum over
BLOCK_T tiles), then, for every eligible position i, the number of eligible positions j that
come before it in the order (value asc, NaN last, position asc) (an O(T^2) pairwise count in
[BLOCK_T, BLOCK_T] tiles); i is selected when that count is < m. Exact (no arithmetic on values).

demote_targets: one program per row; p = exp(logprob) in fp32; variant B's exclusive cumulative
sum is a tl.cumsum in fp64 rounded to fp32 per entry, minus p in fp32 (as the CPU kernel, which
mimics torch.cumsum on CPU), compared in fp32 with top_p rounded to fp32. The kept mass is an fp32
tl.sum (the reference's torch sum may differ in the last bit, so q may differ by ~1 ulp). On an
exact boundary (before == top_p up to the last bit) the nucleus decision can differ from a
backend whose cumsum rounds differently (e.g. torch.cumsum on CUDA accumulates in fp32).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from lethe.triton_kernels.shred_kl import (NEG_INF, _check_chunk_size, _check_device, _check_float,
                                           _check_linear_head, _check_tensor, _row_lse)

# Tunables, read at call time (tests lower them to exercise several tiles at small sizes).
BLOCK_V_MAX = 4096  # teacher_topk: vocabulary tile (power of two)
BLOCK_K_MAX = 128  # teacher_topk: tile of the K selected entries, [BLOCK_K, BLOCK_K] pairs
BLOCK_T_MAX = 128  # select_forget_positions: sequence tile (power of two); [BLOCK_T, BLOCK_T] pairs

IGNORE_INDEX = -100
IGNORE = tl.constexpr(IGNORE_INDEX)  # in kernels


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _order_key(x):
    """int32 key whose order is torch.sort's on floats: -inf < ... < -0 == +0 < ... < +inf < NaN."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(x != x, 0x7FFFFFFF, k)


@triton.jit
def _teacher_select_kernel(z_ptr, cand_ptr, sel_ptr, lse_ptr, labels_ptr, llp_ptr, row0, V, K,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # z, cand, sel and lse rows are local to the launch (the chunk); labels / llp use r = row0 + pid.
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    lanes = tl.arange(0, BLOCK_V).to(tl.int64)
    klanes = tl.arange(0, BLOCK_K).to(tl.int64)

    lse = _row_lse(zrow, zrow, V, BLOCK_V, False)  # (zrow stands for the absent bias)
    tl.store(lse_ptr + pid, lse)

    # the K-th largest key: the smallest candidate key
    tk = tl.full([], 0x7FFFFFFF, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + klanes
        kin = ks < K
        cid = tl.load(cand_ptr + pid * K + ks, mask=kin, other=0)
        key = _order_key(tl.load(zrow + cid, mask=kin, other=0.0))
        tk = tl.minimum(tk, tl.min(tl.where(kin, key, 0x7FFFFFFF), axis=0))
    # slots [0, gt): the candidates above tk (any order)
    gt = tl.zeros([], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + klanes
        kin = ks < K
        cid = tl.load(cand_ptr + pid * K + ks, mask=kin, other=0)
        take = kin & (_order_key(tl.load(zrow + cid, mask=kin, other=0.0)) > tk)
        pos = gt + tl.cumsum(take.to(tl.int64), axis=0) - 1
        tl.store(sel_ptr + pid * K + pos, cid, mask=take)
        gt += tl.sum(take.to(tl.int64), axis=0)
    # slots [gt, K): the lowest ids whose key equals tk
    need = K - gt
    seen = tl.zeros([], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes
        cin = cols < V
        eq = cin & (_order_key(tl.load(zrow + cols, mask=cin, other=0.0)) == tk)
        pos = seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
        take = eq & (pos < need)
        tl.store(sel_ptr + pid * K + gt + pos, cols, mask=take)
        seen += tl.sum(eq.to(tl.int64), axis=0)

    label = tl.load(labels_ptr + r)
    ignored = label == IGNORE
    safe = tl.where(ignored, 0, label)
    zl = tl.load(zrow + safe)
    tl.store(llp_ptr + r, tl.where(ignored, 0.0, zl - lse))


@triton.jit
def _teacher_order_kernel(z_ptr, sel_ptr, lse_ptr, ids_ptr, lp_ptr, row0, V, K,
                          BLOCK_K: tl.constexpr):
    # rank of each selected entry: the entries before it in (key desc, id asc), ids being distinct
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    lse = tl.load(lse_ptr + pid)
    lanes = tl.arange(0, BLOCK_K).to(tl.int64)
    for i0 in range(0, K, BLOCK_K):
        ii = i0 + lanes
        iin = ii < K
        id_i = tl.load(sel_ptr + pid * K + ii, mask=iin, other=0)
        z_i = tl.load(zrow + id_i, mask=iin, other=0.0)
        key_i = _order_key(z_i)
        rank = tl.zeros([BLOCK_K], tl.int64)
        for j0 in range(0, K, BLOCK_K):
            jj = j0 + lanes
            jin = jj < K
            id_j = tl.load(sel_ptr + pid * K + jj, mask=jin, other=0)
            key_j = _order_key(tl.load(zrow + id_j, mask=jin, other=0.0))
            before = (key_j[None, :] > key_i[:, None]) | (
                (key_j[None, :] == key_i[:, None]) & (id_j[None, :] < id_i[:, None]))
            rank += tl.sum((before & jin[None, :]).to(tl.int64), axis=1)
        tl.store(ids_ptr + r * K + rank, id_i, mask=iin)
        tl.store(lp_ptr + r * K + rank, z_i - lse, mask=iin)


@triton.jit
def _eligible(l_ptr, cols, T, carry, skip):
    """(eligible mask, valid count up to and including this tile) of one tile of positions."""
    cin = cols < T
    lab = tl.load(l_ptr + cols, mask=cin, other=IGNORE)
    valid = cin & (lab != IGNORE)
    rank = tl.cumsum(valid.to(tl.int64), axis=0) + carry  # valid positions up to here
    return valid & (rank > skip), carry + tl.sum(valid.to(tl.int64), axis=0)


@triton.jit
def _select_row_kernel(v_ptr, l_ptr, mtab_ptr, out_ptr, T, skip, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    vrow = v_ptr + pid * T
    lrow = l_ptr + pid * T
    orow = out_ptr + pid * T
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)

    # n: eligible positions of the row
    n = tl.zeros([], tl.int64)
    carry = tl.zeros([], tl.int64)
    for t0 in range(0, T, BLOCK_T):
        el, carry = _eligible(lrow, t0 + lanes, T, carry, skip)
        n += tl.sum(el.to(tl.int64), axis=0)
    m = tl.load(mtab_ptr + n)

    carry_i = tl.zeros([], tl.int64)
    for i0 in range(0, T, BLOCK_T):
        ci = i0 + lanes
        el_i, carry_i = _eligible(lrow, ci, T, carry_i, skip)
        vi = tl.load(vrow + ci, mask=ci < T, other=0.0).to(tl.float32)
        ni = vi != vi
        cnt = tl.zeros([BLOCK_T], tl.int64)
        carry_j = tl.zeros([], tl.int64)
        for j0 in range(0, T, BLOCK_T):
            cj = j0 + lanes
            el_j, carry_j = _eligible(lrow, cj, T, carry_j, skip)
            vj = tl.load(vrow + cj, mask=cj < T, other=0.0).to(tl.float32)
            nj = vj != vj
            a = vi[:, None]
            b = vj[None, :]
            an = ni[:, None]
            bn = nj[None, :]
            earlier = cj[None, :] < ci[:, None]
            # j before i in (value asc, NaN last, position asc)
            before = (an & ((~bn) | earlier)) | ((~an) & (~bn) & ((b < a) | ((b == a) & earlier)))
            cnt += tl.sum((before & el_j[None, :]).to(tl.int64), axis=1)
        sel = el_i & (cnt < m)
        tl.store(orow + ci, sel.to(tl.int8), mask=ci < T)


@triton.jit
def _demote_row_kernel(ids_ptr, lp_ptr, labels_ptr, forget_ptr, q_ptr, K, top_p,
                       BLOCK_K: tl.constexpr, NUCLEUS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    kin = kk < K
    ids = tl.load(ids_ptr + pid * K + kk, mask=kin, other=0)
    lp = tl.load(lp_ptr + pid * K + kk, mask=kin, other=NEG_INF).to(tl.float32)
    p = tl.exp(lp)
    p = tl.where(kin, p, 0.0)
    label = tl.load(labels_ptr + pid)
    forget = tl.load(forget_ptr + pid) != 0
    demote = ids == label
    if NUCLEUS:
        cum = tl.cumsum(p.to(tl.float64), axis=0).to(tl.float32)
        before = cum - p
        demote = demote | (before < top_p)
    q = tl.where(forget & demote, 0.0, p)
    s = tl.sum(q, axis=0)
    pos = s > 0.0
    out = tl.where(pos, q / tl.where(pos, s, 1.0), 0.0)
    tl.store(q_ptr + pid * K + kk, out, mask=kin)


# ---------------------------------------------------------------------------------------------
# Argument checks (those of csrc/cpu/shred_teacher.cpp)
# ---------------------------------------------------------------------------------------------



def _check_long(t, name):
    _check_tensor(t, name)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")


def _check_int(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return int(x)


def _check_number(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    return float(x)


# ---------------------------------------------------------------------------------------------
# Launchers (signatures of the lethe::teacher_topk / select_forget_positions / demote_targets ops)
# ---------------------------------------------------------------------------------------------

def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, k: int, chunk_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_ids [N,K] int64, topk_logprobs [N,K] fp32, label_logprob [N] fp32) of the logits
    hidden @ weight^T + bias: ids by logit descending, ties by ascending id; log-probs over the
    full vocabulary; label_logprob 0 where labels == -100. chunk_size rows at a time."""
    _check_linear_head(hidden, weight, bias)
    dev = hidden.device
    n, v = hidden.shape[0], weight.shape[0]
    _check_long(labels, "labels")
    _check_device(labels, "labels", dev)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [N] = [{n}], got {tuple(labels.shape)}")
    k = _check_int(k, "k")
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V] = [1, {v}], got {k}")
    chunk_size = _check_chunk_size(chunk_size)
    lab = labels.detach().contiguous()
    if n:
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must be in [0, V) = [0, {v}) or -100, got {int(lab[i])} "
                             f"at index {i}")

    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    lp = torch.empty((n, k), dtype=torch.float32, device=dev)
    llp = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return ids, lp, llp

    hd = hidden.detach()
    W = weight.detach().to(torch.float32)
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    block_v = max(16, min(triton.next_power_of_2(v), BLOCK_V_MAX))
    block_k = max(16, min(triton.next_power_of_2(k), BLOCK_K_MAX))
    warps = 8 if block_v >= 4096 else 4
    c_max = min(chunk_size, n)
    zbuf = torch.empty((c_max, v), dtype=torch.float32, device=dev)
    sel = torch.empty((c_max, k), dtype=torch.int64, device=dev)
    lse = torch.empty(c_max, dtype=torch.float32, device=dev)
    for s in range(0, n, c_max):
        c = min(c_max, n - s)
        z = zbuf[:c]
        torch.mm(hd[s:s + c].to(torch.float32), W.t(), out=z)
        if b is not None:
            z.add_(b)  # as the reference: (h @ w^T) + b, rounded separately
        cand = torch.topk(z, k, dim=1, sorted=False).indices.contiguous()
        _teacher_select_kernel[(c,)](zbuf, cand, sel, lse, lab, llp, s, v, k, BLOCK_V=block_v,
                                     BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False)
        _teacher_order_kernel[(c,)](zbuf, sel, lse, ids, lp, s, v, k, BLOCK_K=block_k,
                                    num_warps=4, enable_fp_fusion=False)
    return ids, lp, llp


def select_forget_positions(label_logprob: torch.Tensor, labels: torch.Tensor, fraction: float,
                            skip: int) -> torch.Tensor:
    """Forget mask [B,T] bool: per row, among the valid positions (labels != -100) after the
    first `skip` valid ones (n of them), the ceil(fraction * n - 1e-9) with the lowest
    label_logprob (ties: the earlier position first; NaN counts as the largest)."""
    _check_float(label_logprob, "label_logprob")
    dev = label_logprob.device
    if label_logprob.dim() != 2:
        raise ValueError(f"label_logprob must be 2-D [B, T], got shape {tuple(label_logprob.shape)}")
    _check_long(labels, "labels")
    _check_device(labels, "labels", dev)
    if labels.shape != label_logprob.shape:
        raise ValueError(f"labels must have the shape of label_logprob {tuple(label_logprob.shape)}, "
                         f"got {tuple(labels.shape)}")
    fraction = _check_number(fraction, "fraction")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    skip = _check_int(skip, "skip")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")

    bsz, t = label_logprob.shape
    out = torch.zeros((bsz, t), dtype=torch.uint8, device=dev)
    if bsz == 0 or t == 0:
        return out.view(torch.bool)
    vals = label_logprob.detach().contiguous()
    lab = labels.detach().contiguous()
    # m for every possible n, with the reference's own fp64 ops
    counts = torch.arange(t + 1, device=dev, dtype=torch.float64)
    mtab = torch.ceil(fraction * counts - 1e-9).long().clamp_(min=0)
    mtab = torch.minimum(mtab, counts.long()).contiguous()
    block_t = max(16, min(triton.next_power_of_2(t), BLOCK_T_MAX))
    skip_arg = min(skip, t)  # any skip >= T selects nothing; keeps the argument small
    _select_row_kernel[(bsz,)](vals, lab, mtab, out, t, skip_arg, BLOCK_T=block_t,
                               num_warps=4, enable_fp_fusion=False)
    return out.view(torch.bool)


def demote_targets(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, labels: torch.Tensor,
                   forget_mask: torch.Tensor, variant: int, top_p: float) -> torch.Tensor:
    """Target probabilities [N,K] fp32 over topk_ids: exp(topk_logprobs) with, at forget rows,
    the label (variant 0 = A) or also the teacher's top-p nucleus (variant 1 = B) zeroed,
    renormalised over K; rows with nothing left are all zero."""
    _check_long(topk_ids, "topk_ids")
    dev = topk_ids.device
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [N, K], got shape {tuple(topk_ids.shape)}")
    _check_float(topk_logprobs, "topk_logprobs")
    _check_device(topk_logprobs, "topk_logprobs", dev)
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs must have the shape of topk_ids {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_logprobs.shape)}")
    n, k = topk_ids.shape
    _check_long(labels, "labels")
    _check_device(labels, "labels", dev)
    if labels.numel() != n:
        raise ValueError(f"labels must have N = {n} elements (shape [N]), got shape {tuple(labels.shape)}")
    _check_tensor(forget_mask, "forget_mask")
    _check_device(forget_mask, "forget_mask", dev)
    if forget_mask.dtype != torch.bool:
        raise TypeError(f"forget_mask must be bool, got {forget_mask.dtype}")
    if forget_mask.numel() != n:
        raise ValueError(f"forget_mask must have N = {n} elements (shape [N]), "
                         f"got shape {tuple(forget_mask.shape)}")
    variant = _check_int(variant, "variant")
    if variant not in (0, 1):
        raise ValueError(f"variant must be 0 (A) or 1 (B), got {variant}")
    top_p = _check_number(top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    q = torch.empty((n, k), dtype=torch.float32, device=dev)
    if n == 0 or k == 0:
        return q
    ids = topk_ids.detach().contiguous()
    lps = topk_logprobs.detach().contiguous()
    lab = labels.detach().reshape(-1).contiguous()
    fm = forget_mask.detach().reshape(-1).contiguous().view(torch.uint8)
    block_k = max(16, triton.next_power_of_2(k))
    # top_p is passed as a Python float: Triton takes it as fp32, the reference's comparison
    # of an fp32 tensor with a Python float is in fp32 too
    _demote_row_kernel[(n,)](ids, lps, lab, fm, q, k, top_p, BLOCK_K=block_k,
                             NUCLEUS=variant == 1, num_warps=4 if block_k < 2048 else 8,
                             enable_fp_fusion=False)
    return q
