"""Triton kernels of the shred family: teacher_topk, select_forget_positions and demote_targets.

Same semantics as the CPU kernels in csrc/cpu/shred_teacher.cpp (definitions:
python/lethe/ops/shred_reference.py); the launchers take arguments that lethe.ops has checked.
Kernels are launched with enable_fp_fusion=False, index with int64 offsets, tile every loop
(BLOCK_* below) and take flags as runtime arguments, so that each has one compiled configuration
per dtype (aot_configs). Orderings use keys whose integer order is torch.sort's on floats
(-inf < ... < -0 == +0 < ... < +inf < NaN), sorted by torch.sort (a segmented sort on the GPU):

teacher_topk runs the chunked LM-head driver (lm_head.py); per chunk, z (+ bias, added separately,
as the reference rounds it), torch.topk's K candidate ids per row (which of several equal values it
keeps is unspecified), then one program per row (_teacher_select_kernel): the log-sum-exp and the
number of entries tied with the K-th value in one pass over the row, then the exact top-K as 64-bit
keys (value key, inverted id): the candidates above the K-th value, and the lowest ids equal to it
(from the candidates when they hold all of the row's ties, else by an ordered scan of the row).
torch.sort orders the keys (value desc, NaN first, ties by ascending id). O(V + K log K) per row.

select_forget_positions: one program per row writes the key (value key, position) of every
eligible position (valid, after the first `skip` valid ones: a running count over BLOCK_T tiles)
and the count n; torch.sort ranks them, and the ranks below ceil(fraction * n - 1e-9) (computed
by torch in fp64, as the reference) are the forget positions. Exact: no arithmetic on values.

demote_targets: one program per row, BLOCK_K entries at a time; p = exp(logprob) in fp64, the
nucleus decision (mass before the entry < top_p) in fp64 (top_p passed as its bits), the kept
probabilities rounded to fp32 and renormalised by their fp64 sum (lethe/shred.h demote_row). The
fp64 cumulative sum is a tiled scan, not the CPU's sequential one: the decision can differ only
where the mass before an entry is within an fp64 rounding of top_p.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from lethe.triton_kernels.lm_head import lm_head_chunks
from lethe.triton_kernels.shred_kl import _lse_add, _lse_end

# Tile sizes, read at call time (tests lower them to exercise several tiles at small sizes).
BLOCK_V_MAX = 4096  # teacher_topk: vocabulary tile (power of two)
BLOCK_K_MAX = 128  # teacher_topk, demote_targets: tile of the K entries
BLOCK_T_MAX = 1024  # select_forget_positions: sequence tile (power of two)

IGNORE_INDEX = -100
IGNORE = tl.constexpr(IGNORE_INDEX)
LOW32 = tl.constexpr(0xFFFFFFFF)
INT32_MAX = tl.constexpr(0x7FFFFFFF)
INT64_MAX = 0x7FFFFFFFFFFFFFFF


@triton.jit
def _order_key(x):
    """int32 key whose order is torch.sort's on floats: -inf < ... < -0 == +0 < ... < +inf < NaN."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(x != x, INT32_MAX, k)


@triton.jit
def _desc_key(key, ids):
    # (value key, inverted id) as one int64: descending order = value desc, ties by ascending id
    return (key.to(tl.int64) << 32) | (LOW32 - ids.to(tl.int64))


@triton.jit
def _teacher_select_kernel(z_ptr, cand_ptr, keys_ptr, lse_ptr, labels_ptr, llp_ptr, row0, V, K,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # z, cand, keys and lse rows are local to the launch (the chunk); labels / llp use r = row0 + pid.
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    crow = cand_ptr + pid * K
    krow = keys_ptr + pid * K
    lanes = tl.arange(0, BLOCK_V).to(tl.int64)
    klanes = tl.arange(0, BLOCK_K).to(tl.int64)

    # the K-th largest key: the smallest candidate key
    tk = tl.full([], 0x7FFFFFFF, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kin = k0 + klanes < K
        cid = tl.load(crow + k0 + klanes, mask=kin, other=0)
        key = _order_key(tl.load(zrow + cid, mask=kin, other=0.0))
        tk = tl.minimum(tk, tl.min(tl.where(kin, key, INT32_MAX), axis=0))

    # one pass over the row: the log-sum-exp, and how many entries tie with the K-th value
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    nan_vec = tl.zeros([BLOCK_V], tl.int32)
    tied = tl.zeros([], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes
        cin = cols < V
        x = tl.load(zrow + cols, mask=cin, other=float("-inf"))
        m_vec, s_vec, nan_vec = _lse_add(m_vec, s_vec, nan_vec, x)
        tied += tl.sum((cin & (_order_key(x) == tk)).to(tl.int64), axis=0)
    lse = _lse_end(m_vec, s_vec, nan_vec)
    tl.store(lse_ptr + pid, lse)

    # slots [0, gt): the candidates above tk (any order; the sort orders them)
    gt = tl.zeros([], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        kin = k0 + klanes < K
        cid = tl.load(crow + k0 + klanes, mask=kin, other=0)
        key = _order_key(tl.load(zrow + cid, mask=kin, other=0.0))
        take = kin & (key > tk)
        pos = gt + tl.cumsum(take.to(tl.int64), axis=0) - 1
        tl.store(krow + pos, _desc_key(key, cid), mask=take)
        gt += tl.sum(take.to(tl.int64), axis=0)
    # slots [gt, K): entries equal to tk, the lowest ids first
    need = K - gt
    seen = tl.zeros([], tl.int64)
    if tied > need:  # the row has more ties than the candidates took: an ordered scan of the row
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            cin = cols < V
            eq = cin & (_order_key(tl.load(zrow + cols, mask=cin, other=0.0)) == tk)
            pos = seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
            tl.store(krow + gt + pos, _desc_key(tl.zeros_like(cols.to(tl.int32)) + tk, cols),
                     mask=eq & (pos < need))
            seen += tl.sum(eq.to(tl.int64), axis=0)
    else:  # the candidates equal to tk are all of the row's
        for k0 in range(0, K, BLOCK_K):
            kin = k0 + klanes < K
            cid = tl.load(crow + k0 + klanes, mask=kin, other=0)
            eq = kin & (_order_key(tl.load(zrow + cid, mask=kin, other=0.0)) == tk)
            pos = seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
            tl.store(krow + gt + pos, _desc_key(tl.zeros_like(cid.to(tl.int32)) + tk, cid), mask=eq)
            seen += tl.sum(eq.to(tl.int64), axis=0)

    label = tl.load(labels_ptr + r)
    ok = (label >= 0) & (label < V)  # else ignored (-100; other values are rejected by lethe.ops)
    zl = tl.load(zrow + tl.where(ok, label, 0))
    tl.store(llp_ptr + r, tl.where(ok, zl - lse, 0.0))


@triton.jit
def _select_keys_kernel(v_ptr, l_ptr, keys_ptr, n_ptr, T, skip, BLOCK_T: tl.constexpr):
    """Per row: the key (value key, position) of each eligible position, INT64_MAX elsewhere, and
    the number n of eligible positions."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    carry = tl.zeros([], tl.int64)  # valid positions so far
    n = tl.zeros([], tl.int64)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + lanes
        cin = cols < T
        lab = tl.load(l_ptr + pid * T + cols, mask=cin, other=IGNORE)
        valid = cin & (lab != IGNORE)
        el = valid & (tl.cumsum(valid.to(tl.int64), axis=0) + carry > skip)
        key = _order_key(tl.load(v_ptr + pid * T + cols, mask=cin, other=0.0).to(tl.float32))
        k64 = (key.to(tl.int64) << 32) | cols
        tl.store(keys_ptr + pid * T + cols, tl.where(el, k64, 0x7FFFFFFFFFFFFFFF), mask=cin)
        carry += tl.sum(valid.to(tl.int64), axis=0)
        n += tl.sum(el.to(tl.int64), axis=0)
    tl.store(n_ptr + pid, n)


@triton.jit(do_not_specialize=["top_p_bits", "nucleus"])  # no variant per flag or top_p value
def _demote_row_kernel(ids_ptr, lp_ptr, labels_ptr, forget_ptr, q_ptr, K, top_p_bits, nucleus,
                       BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_K).to(tl.int64)
    top_p = top_p_bits.to(tl.int64).to(tl.float64, bitcast=True)
    label = tl.load(labels_ptr + pid)
    forget = tl.load(forget_ptr + pid) != 0
    cum = tl.zeros([], tl.float64)  # the probability mass before the tile
    s = tl.zeros([], tl.float64)  # the kept mass
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + lanes
        kin = kk < K
        ids = tl.load(ids_ptr + pid * K + kk, mask=kin, other=0)
        lp = tl.load(lp_ptr + pid * K + kk, mask=kin, other=float("-inf")).to(tl.float32)
        p = tl.where(kin, tl.exp(lp.to(tl.float64)), 0.0)
        demote = ids == label
        if nucleus:
            demote = demote | (cum + tl.cumsum(p, axis=0) - p < top_p)
        v = tl.where(forget & demote, 0.0, p).to(tl.float32)
        tl.store(q_ptr + pid * K + kk, v, mask=kin)
        s += tl.sum(v.to(tl.float64), axis=0)
        cum += tl.sum(p, axis=0)
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + lanes
        kin = kk < K
        v = tl.load(q_ptr + pid * K + kk, mask=kin, other=0.0)
        out = tl.where(s > 0.0, (v.to(tl.float64) / tl.where(s > 0.0, s, 1.0)).to(tl.float32), 0.0)
        tl.store(q_ptr + pid * K + kk, out, mask=kin)


# ---------------------------------------------------------------------------------------------
# Launchers (the ops' signatures; arguments checked by lethe.ops)
# ---------------------------------------------------------------------------------------------

def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, k: int, chunk_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_ids [N,K] int64, topk_logprobs [N,K] fp32, label_logprob [N] fp32) of the logits
    hidden @ weight^T + bias: ids by logit descending, ties by ascending id; log-probs over the
    full vocabulary; label_logprob 0 where labels == -100. chunk_size rows at a time."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    lp = torch.empty((n, k), dtype=torch.float32, device=dev)
    llp = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return ids, lp, llp
    lab = labels.detach().contiguous()
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    c_max = min(chunk_size, n)
    keys = torch.empty((c_max, k), dtype=torch.int64, device=dev)
    lse = torch.empty(c_max, dtype=torch.float32, device=dev)

    def rows(s, c, z):
        if b is not None:
            z.add_(b)  # as the reference: (h @ w^T) + b, rounded separately
        cand = torch.topk(z, k, dim=1, sorted=False).indices.contiguous()
        _teacher_select_kernel[(c,)](z, cand, keys, lse, lab, llp, s, v, k, BLOCK_V=BLOCK_V_MAX,
                                     BLOCK_K=BLOCK_K_MAX, num_warps=8, enable_fp_fusion=False)
        order = torch.sort(keys[:c], dim=1, descending=True).values
        top = 0xFFFFFFFF - (order & 0xFFFFFFFF)
        ids[s:s + c] = top
        lp[s:s + c] = z.gather(1, top) - lse[:c, None]

    lm_head_chunks(hidden, weight, chunk_size, rows)
    return ids, lp, llp


def select_forget_positions(label_logprob: torch.Tensor, labels: torch.Tensor, fraction: float,
                            skip: int) -> torch.Tensor:
    """Forget mask [B,T] bool: per row, among the valid positions (labels != -100) after the
    first `skip` valid ones (n of them), the ceil(fraction * n - 1e-9) with the lowest
    label_logprob (ties: the earlier position first; NaN counts as the largest)."""
    bsz, t = label_logprob.shape
    dev = label_logprob.device
    if bsz == 0 or t == 0:
        return torch.zeros((bsz, t), dtype=torch.bool, device=dev)
    keys = torch.empty((bsz, t), dtype=torch.int64, device=dev)
    n = torch.empty(bsz, dtype=torch.int64, device=dev)
    _select_keys_kernel[(bsz,)](label_logprob.detach().contiguous(), labels.detach().contiguous(), keys, n,
                                t, min(skip, t), BLOCK_T=BLOCK_T_MAX, num_warps=4, enable_fp_fusion=False)
    # m for each row, with the reference's own fp64 ops (no device sync)
    m = torch.minimum(torch.ceil(fraction * n.double() - 1e-9).long().clamp_(min=0), n)
    order = torch.sort(keys, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(t, device=dev).expand(bsz, t).contiguous())
    return rank < m[:, None]


def demote_targets(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, labels: torch.Tensor,
                   forget_mask: torch.Tensor, variant: int, top_p: float) -> torch.Tensor:
    """Target probabilities [N,K] fp32 over topk_ids: exp(topk_logprobs) with, at forget rows,
    the label (variant 0 = A) or also the teacher's top-p nucleus (variant 1 = B) zeroed,
    renormalised over K; rows with nothing left are all zero."""
    n, k = topk_ids.shape
    q = torch.empty((n, k), dtype=torch.float32, device=topk_ids.device)
    if n == 0 or k == 0:
        return q
    bits = struct.unpack("<q", struct.pack("<d", float(top_p)))[0]  # fp64, exactly
    _demote_row_kernel[(n,)](topk_ids.detach().contiguous(), topk_logprobs.detach().contiguous(),
                             labels.detach().reshape(-1).contiguous(),
                             forget_mask.detach().reshape(-1).contiguous().view(torch.uint8), q, k, bits,
                             int(variant == 1), BLOCK_K=BLOCK_K_MAX, num_warps=4, enable_fp_fusion=False)
    return q


def aot_configs():
    """Every configuration the launchers above compile (one per input dtype)."""
    yield dict(kernel=_teacher_select_kernel, num_warps=8,
               signature={"z_ptr": "*fp32", "cand_ptr": "*i64", "keys_ptr": "*i64", "lse_ptr": "*fp32",
                          "labels_ptr": "*i64", "llp_ptr": "*fp32", "row0": "i32", "V": "i32", "K": "i32"},
               constexprs={"BLOCK_V": BLOCK_V_MAX, "BLOCK_K": BLOCK_K_MAX})
    for vt in ("fp32", "fp16", "bf16"):
        yield dict(kernel=_select_keys_kernel, num_warps=4,
                   signature={"v_ptr": f"*{vt}", "l_ptr": "*i64", "keys_ptr": "*i64", "n_ptr": "*i64",
                              "T": "i32", "skip": "i32"},
                   constexprs={"BLOCK_T": BLOCK_T_MAX})
        yield dict(kernel=_demote_row_kernel, num_warps=4,
                   signature={"ids_ptr": "*i64", "lp_ptr": f"*{vt}", "labels_ptr": "*i64", "forget_ptr": "*u8",
                              "q_ptr": "*fp32", "K": "i32", "top_p_bits": "i64", "nucleus": "i32"},
                   constexprs={"BLOCK_K": BLOCK_K_MAX})
