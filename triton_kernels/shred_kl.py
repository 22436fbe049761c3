"""Triton kernels of the shred family: topk_kl, topk_kl_backward and fused_linear_topk_kl.

Same semantics as the CPU kernels in csrc/cpu/shred_kl.cpp (definitions:
python/lethe/ops/shred_reference.py); the launchers take arguments that lethe.ops has checked.
Per row t with logits z, target ids (K) and target probs q:
  lse  = logsumexp(z) over the full vocabulary, or over z[ids] (full_normalize = False)
  loss = row_weight * sum_k q_k (log q_k - (z[ids_k] - lse))        (terms with q_k = 0 are 0)
  dloss/dz = row_weight * (softmax * sum(q) - scatter(q))           (softmax over V, or over ids)

All arithmetic is fp32 (not bit-exact with the other backends: the summation orders differ).
One program per row (_kl_row_kernel), the vocabulary in BLOCK_V tiles and the K targets in BLOCK_K
tiles, so the registers a program needs do not grow with V or K:
  * the log-normaliser is an online max / sum-exp (per-lane running max and sum, merged at the end),
    over the vocabulary or over the target logits;
  * gradients: the launcher sorts each row's ids (with their q), so that repeated ids are adjacent.
    The contributions of one id are then summed over its run: within a tile by a [BLOCK_K, BLOCK_K]
    id-equality tile, across tiles by a carry, and stored once, by the run's last entry. No
    atomics: deterministic, for every output dtype. The row is first written whole (the softmax
    part, or zeros); after a barrier the ids' slots get their totals. With the top-K normaliser the
    totals need the logits, so they go to a [rows, K] scratch before the row is overwritten: the
    fused op turns its fp32 logits into gradient rows in place.
Flags are runtime arguments, not constexprs, so that each kernel has one compiled configuration per
dtype (aot_configs, which tools/ptxas_report.py compiles for real GPUs). Kernels are launched with
enable_fp_fusion=False, so that no product is contracted into an FMA.

fused_linear_topk_kl runs the chunked LM-head driver (lm_head.py) with this row kernel as the
per-chunk work, like Liger-Kernel's fused linear cross-entropy.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lethe.triton_kernels.lm_head import lm_head_chunks

# Tile sizes, read at call time (tests lower them to exercise several tiles at small sizes).
BLOCK_V_MAX = 4096  # vocabulary tile (power of two)
BLOCK_K_MAX = 64  # target tile (power of two): [BLOCK_K, BLOCK_K] id-equality tiles
NUM_WARPS = 8

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _lse_add(m_vec, s_vec, nan_vec, x):
    """One tile x into the per-lane online log-sum-exp (NaN counted in nan_vec)."""
    xn = x != x
    nan_vec = tl.maximum(nan_vec, xn.to(tl.int32))
    x = tl.where(xn, NEG_INF, x)
    m_new = tl.maximum(m_vec, x)
    alive = (m_new > NEG_INF) & (m_new < POS_INF)  # an infinite max needs no sum
    m_safe = tl.where(alive, m_new, 0.0)
    s_vec = tl.where(alive, s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe), 0.0)
    return m_new, s_vec, nan_vec


@triton.jit
def _lse_end(m_vec, s_vec, nan_vec):
    """torch.logsumexp's value: NaN if any NaN, an infinite max itself, -inf for all -inf."""
    m = tl.max(m_vec, axis=0)
    finite = (m > NEG_INF) & (m < POS_INF)
    m_safe = tl.where(finite, m, 0.0)
    s = tl.sum(tl.where(m_vec > NEG_INF, s_vec * tl.exp(m_vec - m_safe), 0.0), axis=0)
    lse = tl.where(finite, m + tl.log(tl.where(finite, s, 1.0)), m)
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)  # (a NaN global breaks Triton's cache check)
    return tl.where(tl.max(nan_vec, axis=0) > 0, nan, lse)


@triton.jit
def _row_lse(zrow, b_ptr, V, has_b, BLOCK_V: tl.constexpr):
    """log-sum-exp of a row z (+ b) over BLOCK_V tiles (also the teacher kernel's)."""
    m_vec = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    nan_vec = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cin = cols < V
        x = tl.load(zrow + cols, mask=cin, other=NEG_INF).to(tl.float32)
        if has_b:
            x = x + tl.load(b_ptr + cols, mask=cin, other=0.0)
        m_vec, s_vec, nan_vec = _lse_add(m_vec, s_vec, nan_vec, x)
    return _lse_end(m_vec, s_vec, nan_vec)


@triton.jit
def _softmax_part(a, z, lse):
    # exactly 0 for a zero coefficient, whatever the logits (lethe/shred.h softmax_part)
    return tl.where(a != 0.0, a * tl.exp(z - lse), 0.0)


@triton.jit
def _targets(ids_ptr, q_ptr, zrow, b_ptr, r, k0, K, V, has_b, BLOCK_K: tl.constexpr):
    """One tile of a row's targets: (ids, the next entry's id, q, z[ids] (+ b), in range)."""
    kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    kin = kk < K
    ids = tl.load(ids_ptr + r * K + kk, mask=kin, other=-1)
    nxt = tl.load(ids_ptr + r * K + kk + 1, mask=kk + 1 < K, other=-1)
    ok = kin & (ids >= 0) & (ids < V)  # checked by lethe.ops; never read out of bounds anyway
    q = tl.load(q_ptr + r * K + kk, mask=kin, other=0.0)
    zk = tl.load(zrow + ids, mask=ok, other=0.0).to(tl.float32)
    if has_b:
        zk = zk + tl.load(b_ptr + ids, mask=ok, other=0.0)
    return ids, nxt, q, zk, ok


@triton.jit
def _run_sums(ids, c, carry_id, carry, K, k0, BLOCK_K: tl.constexpr):
    """Running sums of c over the runs of equal (adjacent) ids, continuing the run the previous
    tile ended with; returns (sums, the carry to the next tile)."""
    kk = tl.arange(0, BLOCK_K)
    eq = (ids[:, None] == ids[None, :]) & (kk[None, :] <= kk[:, None])
    sums = tl.sum(tl.where(eq, c[None, :], 0.0), axis=1) + tl.where(ids == carry_id, carry, 0.0)
    last = tl.minimum(K - k0, BLOCK_K) - 1
    return sums, tl.sum(tl.where(kk == last, ids, 0), axis=0), tl.sum(tl.where(kk == last, sums, 0.0), axis=0)


_FLAGS = ["full", "has_b", "has_w", "do_loss", "store_lse", "do_grad", "lse_given", "fused"]


@triton.jit(do_not_specialize=_FLAGS)  # a flag of 1 would otherwise compile another variant
def _kl_row_kernel(z_ptr, out_ptr, b_ptr, ids_ptr, q_ptr, w_ptr, g_ptr, lse_in_ptr, loss_ptr,
                   lse_ptr, scratch_ptr, row0, V, K, full, has_b, has_w, do_loss, store_lse,
                   do_grad, lse_given, fused, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # z rows (and out, scratch) are local to the launch (the fused op's chunk buffer); targets,
    # weights and losses are indexed by the global row r = row0 + pid. out may be z (in place).
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    orow = out_ptr + pid * V

    # sum(q), and the top-K normaliser's online log-sum-exp
    sq = tl.zeros([], tl.float32)
    m_vec = tl.full([BLOCK_K], NEG_INF, tl.float32)
    s_vec = tl.zeros([BLOCK_K], tl.float32)
    nan_vec = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ids, nxt, q, zk, ok = _targets(ids_ptr, q_ptr, zrow, b_ptr, r, k0, K, V, has_b, BLOCK_K)
        sq += tl.sum(q, axis=0)
        if full == 0:
            m_vec, s_vec, nan_vec = _lse_add(m_vec, s_vec, nan_vec, tl.where(ok, zk, NEG_INF))
    if lse_given:
        lse = tl.load(lse_in_ptr + r)
    elif full:
        lse = _row_lse(zrow, b_ptr, V, has_b, BLOCK_V)
    else:
        lse = _lse_end(m_vec, s_vec, nan_vec)
    w = tl.full([], 1.0, tl.float32)
    if has_w:
        w = tl.load(w_ptr + r)

    if do_loss:
        kl = tl.zeros([], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ids, nxt, q, zk, ok = _targets(ids_ptr, q_ptr, zrow, b_ptr, r, k0, K, V, has_b, BLOCK_K)
            pos = q > 0.0
            kl += tl.sum(tl.where(pos, q * tl.log(tl.where(pos, q, 1.0)) - q * (zk - lse), 0.0), axis=0)
        kl = w * kl
        if fused:  # a row without target: no loss (and no gradient)
            kl = tl.where(sq == 0.0, 0.0, kl)
        tl.store(loss_ptr + r, kl)
        if store_lse:
            tl.store(lse_ptr + r, lse)

    if do_grad:
        coef = tl.load(g_ptr + r).to(tl.float32) * w
        if fused:
            coef = tl.where(sq == 0.0, 0.0, coef)
        a = coef * sq
        srow = scratch_ptr + pid * K
        if full == 0:  # each entry's softmax part needs its logit: totals first, to the scratch
            carry_id = tl.full([], -1, tl.int64)
            carry = tl.zeros([], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ids, nxt, q, zk, ok = _targets(ids_ptr, q_ptr, zrow, b_ptr, r, k0, K, V, has_b, BLOCK_K)
                c = tl.where(ok, _softmax_part(a, zk, lse) - coef * q, 0.0)
                sums, carry_id, carry = _run_sums(ids, c, carry_id, carry, K, k0, BLOCK_K)
                kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                tl.store(srow + kk, sums, mask=kk < K)
        tl.debug_barrier()  # every read of z is done before the row is overwritten
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            cin = cols < V
            y = tl.zeros([BLOCK_V], tl.float32)
            if full:
                x = tl.load(zrow + cols, mask=cin, other=NEG_INF).to(tl.float32)
                if has_b:
                    x = x + tl.load(b_ptr + cols, mask=cin, other=0.0)
                y = _softmax_part(a, x, lse)
            tl.store(orow + cols, y.to(orow.dtype.element_ty), mask=cin)
        tl.debug_barrier()  # the row is written before the ids' slots are updated
        carry_id = tl.full([], -1, tl.int64)
        carry = tl.zeros([], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            kin = kk < K
            ids = tl.load(ids_ptr + r * K + kk, mask=kin, other=-1)
            nxt = tl.load(ids_ptr + r * K + kk + 1, mask=kk + 1 < K, other=-1)
            ok = kin & (ids >= 0) & (ids < V)
            last = ok & (nxt != ids)  # the last entry of its id's run stores the id's total
            if full:
                q = tl.load(q_ptr + r * K + kk, mask=kin, other=0.0)
                sums, carry_id, carry = _run_sums(ids, tl.where(ok, -(coef * q), 0.0), carry_id, carry,
                                                  K, k0, BLOCK_K)
                if fused:  # in place and fp32: the row holds the softmax part exactly
                    total = tl.load(orow + ids, mask=last, other=0.0).to(tl.float32) + sums
                else:  # out may be fp16/bf16: the softmax part again from z, so the total is rounded once
                    zid = tl.load(zrow + ids, mask=last, other=0.0).to(tl.float32)
                    if has_b:
                        zid = zid + tl.load(b_ptr + ids, mask=last, other=0.0)
                    total = _softmax_part(a, zid, lse) + sums
            else:
                total = tl.load(srow + kk, mask=last, other=0.0)
            tl.store(orow + ids, total.to(orow.dtype.element_ty), mask=last)


# ---------------------------------------------------------------------------------------------
# Launchers (the ops' signatures; arguments checked by lethe.ops)
# ---------------------------------------------------------------------------------------------

def _sorted_targets(ids, q):
    """Each row's ids ascending, with their probabilities (repeated ids become adjacent)."""
    ids_sorted, order = torch.sort(ids, dim=1)
    return ids_sorted.contiguous(), q.gather(1, order).contiguous()


def _launch_rows(rows, z, out, b, ids, q, w, g, lse_in, loss, lse_out, row0, full, do_loss,
                 store_lse, do_grad, lse_given, fused, scratch=None):
    v, k = z.shape[1], ids.shape[1]
    dummy = q  # stands for the absent pointer arguments (never read)
    _kl_row_kernel[(rows,)](
        z, out, b if b is not None else dummy, ids, q, w if w is not None else dummy,
        g if g is not None else dummy, lse_in if lse_in is not None else dummy,
        loss if loss is not None else dummy, lse_out if lse_out is not None else dummy,
        scratch if scratch is not None else dummy, row0, v, k, int(bool(full)), int(b is not None),
        int(w is not None), int(do_loss), int(store_lse), int(do_grad), int(lse_given), int(fused),
        BLOCK_V=BLOCK_V_MAX, BLOCK_K=BLOCK_K_MAX, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def _targets_f32(target_ids, target_probs, row_weight):
    ids = target_ids.detach().contiguous()
    q = target_probs.detach().to(torch.float32).contiguous()
    w = row_weight.detach().to(torch.float32).contiguous() if row_weight is not None else None
    return ids, q, w


def topk_kl(logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
            row_weight: Optional[torch.Tensor], full_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, lse [N] fp32): per-row row_weight * KL(q || softmax(z)) and the
    log-normaliser used (full vocabulary, or the K target ids when not full_normalize)."""
    n = logits.shape[0]
    dev = logits.device
    ids, q, w = _targets_f32(target_ids, target_probs, row_weight)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n:
        z = logits.detach().contiguous()
        _launch_rows(n, z, z, None, ids, q, w, None, None, loss, lse, 0, full_normalize, do_loss=True,
                     store_lse=True, do_grad=False, lse_given=False, fused=False)
    return loss, lse


def topk_kl_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target_ids: torch.Tensor,
                     target_probs: torch.Tensor, lse: torch.Tensor, row_weight: Optional[torch.Tensor],
                     full_normalize: bool, check_values: bool = True) -> torch.Tensor:
    """Gradient wrt logits (logits' dtype, [N, V]) of sum_t grad_loss[t] * loss[t]."""
    n, v = logits.shape
    out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    ids, q, w = _targets_f32(target_ids, target_probs, row_weight)
    ids, q = _sorted_targets(ids, q)
    z = logits.detach().contiguous()
    g = grad_loss.detach().to(torch.float32).contiguous()
    lse_in = lse.detach().to(torch.float32).contiguous()
    scratch = None if full_normalize else torch.empty_like(q)
    _launch_rows(n, z, out, None, ids, q, w, g, lse_in, None, None, 0, full_normalize, do_loss=False,
                 store_lse=False, do_grad=True, lse_given=True, fused=False, scratch=scratch)
    return out


def fused_linear_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         target_ids: torch.Tensor, target_probs: torch.Tensor,
                         row_weight: Optional[torch.Tensor], grad_row_scale: Optional[torch.Tensor],
                         full_normalize: bool, chunk_size: int, grad_hidden: bool = True,
                         grad_weight: bool = True, grad_bias: bool = True, check_values: bool = True):
    """(loss [N] fp32, grad_hidden, grad_weight, grad_bias) of topk_kl on hidden @ weight^T + bias,
    chunk_size rows at a time. The gradients (of sum_t grad_row_scale[t] * loss[t]) asked for are
    computed when grad_row_scale is given; every other one is an empty [0] tensor of hidden's dtype."""
    (n, h), v = hidden.shape, weight.shape[0]
    dev = hidden.device
    scaled = grad_row_scale is not None
    want_h, want_w = scaled and grad_hidden, scaled and grad_weight
    want_b = scaled and grad_bias and bias is not None
    grads = want_h or want_w or want_b
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    none = lambda: torch.empty(0, dtype=hidden.dtype, device=dev)  # noqa: E731  (one each: outputs never alias)
    if n == 0:
        return (loss, torch.empty((0, h), dtype=hidden.dtype, device=dev) if want_h else none(),
                torch.zeros((v, h), dtype=weight.dtype, device=dev) if want_w else none(),
                torch.zeros(v, dtype=bias.dtype, device=dev) if want_b else none())
    ids, q, w = _targets_f32(target_ids, target_probs, row_weight)
    ids, q = _sorted_targets(ids, q)  # also without gradients: the loss sums in the same order
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    srs = grad_row_scale.detach().to(torch.float32).contiguous() if grads else None
    scratch = torch.empty((min(chunk_size, n), ids.shape[1]), dtype=torch.float32, device=dev) \
        if grads and not full_normalize else None

    def rows(s, c, z):  # z [c, V] fp32: the loss, and (with gradients) the gradient rows in place
        _launch_rows(c, z, z, b, ids, q, w, srs, None, loss, None, s, full_normalize, do_loss=True,
                     store_lse=False, do_grad=grads, lse_given=False, fused=True, scratch=scratch)

    gh, gw, gb = lm_head_chunks(hidden, weight, chunk_size, rows, want_h, want_w, want_b)
    return (loss, gh if want_h else none(),
            (gw if weight.dtype == torch.float32 else gw.to(weight.dtype)) if want_w else none(),
            (gb if bias.dtype == torch.float32 else gb.to(bias.dtype)) if want_b else none())


def aot_configs():
    """Every configuration the launchers above compile: one per dtype of the logits (the fused
    op's are fp32). tools/ptxas_report.py compiles each for real GPUs."""
    for zt in ("fp32", "fp16", "bf16"):
        yield dict(kernel=_kl_row_kernel, num_warps=NUM_WARPS,
                   signature={"z_ptr": f"*{zt}", "out_ptr": f"*{zt}", "b_ptr": "*fp32", "ids_ptr": "*i64",
                              "q_ptr": "*fp32", "w_ptr": "*fp32", "g_ptr": "*fp32", "lse_in_ptr": "*fp32",
                              "loss_ptr": "*fp32", "lse_ptr": "*fp32", "scratch_ptr": "*fp32",
                              **dict.fromkeys(("row0", "V", "K", "full", "has_b", "has_w", "do_loss",
                                               "store_lse", "do_grad", "lse_given", "fused"), "i32")},
                   constexprs={"BLOCK_V": BLOCK_V_MAX, "BLOCK_K": BLOCK_K_MAX})
