"""Triton kernels of the shred family: topk_kl, topk_kl_backward and fused_linear_topk_kl.

Same semantics (and argument checks) as the CPU kernels in csrc/cpu/shred_kl.cpp; definitions in
python/lethe/ops/shred_reference.py. Per row t with logits z, target ids (K) and target probs q:
  lse  = logsumexp(z) over the full vocabulary, or over z[ids] (full_normalize = False)
  loss = row_weight * sum_k q_k (log q_k - (z[ids_k] - lse))        (terms with q_k = 0 are 0)
  dloss/dz = row_weight * (softmax * sum(q) - scatter(q))           (softmax over V, or over ids)

All arithmetic is fp32 (not bit-exact with the other backends: the summation orders differ).
One program per row (_kl_row_kernel):
  * the target logits z[ids] are gathered first; with full_normalize the log-normaliser is an
    online max / sum-exp over BLOCK_V tiles (per-lane running max and sum, merged at the end);
  * gradients: the K contributions at the ids are summed over repeated ids in registers (a
    [BLOCK_K, BLOCK_J] id-equality tile per step, so O(K^2) compares per row, no atomics: it is
    deterministic and works for every output dtype); then the row is written in tiles (the
    softmax part, or zeros) and, after a barrier, every id's slot is stored once more with its
    total (repeated ids store the same value). A barrier also separates the reads of z from the
    first write, so the fused op can turn its fp32 logits into gradient rows in place.
Kernels are launched with enable_fp_fusion=False (as quant.py does), so that no product is
contracted into an FMA: the results then follow the plain fp32 formula on every target.

fused_linear_topk_kl works like Liger-Kernel's fused linear cross-entropy: chunk_size rows at a
time, z = hidden_c.float() @ weight.float().t() (torch matmul into one [chunk, V] fp32 buffer),
the row kernel adds the bias, computes the loss and (with grad_row_scale) overwrites z with the
gradient rows, which then feed grad_hidden_c = z @ W, grad_W += z^T @ hidden_c and
grad_bias += z.sum(0), all in fp32; the gradients are cast to the input dtypes at the end.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from lethe.ops.shred_reference import check_target_values

# Tunables, read at call time (tests lower them to exercise several tiles at small sizes).
BLOCK_V_MAX = 4096  # vocabulary tile (power of two)
DEDUP_TILE = 4096  # elements of the [BLOCK_K, BLOCK_J] id-equality tile (power of two)

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
NAN = tl.constexpr(float("nan"))


@triton.jit
def _row_lse(zrow, b_ptr, V, BLOCK_V: tl.constexpr, HAS_B: tl.constexpr):
    """log-sum-exp of a row z (+ b) as torch.logsumexp: online max / sum-exp per lane over BLOCK_V
    tiles, merged at the end; a NaN anywhere gives NaN, an infinite max gives itself, an all -inf
    row -inf. Used by the loss kernel here and the teacher kernel in shred_teacher.py."""
    m_vec = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    nan_vec = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cin = cols < V
        x = tl.load(zrow + cols, mask=cin, other=NEG_INF).to(tl.float32)
        if HAS_B:
            x = x + tl.load(b_ptr + cols, mask=cin, other=0.0)
        xn = x != x
        nan_vec = tl.maximum(nan_vec, xn.to(tl.int32))
        x = tl.where(xn, NEG_INF, x)  # NaN is handled by the flag
        m_new = tl.maximum(m_vec, x)
        alive = (m_new > NEG_INF) & (m_new < POS_INF)  # an infinite max needs no sum
        m_safe = tl.where(alive, m_new, 0.0)
        s_vec = tl.where(alive, s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe), 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    finite = (m > NEG_INF) & (m < POS_INF)
    m_safe = tl.where(finite, m, 0.0)
    s = tl.sum(tl.where(m_vec > NEG_INF, s_vec * tl.exp(m_vec - m_safe), 0.0), axis=0)
    lse = tl.where(finite, m + tl.log(tl.where(finite, s, 1.0)), m)
    return tl.where(tl.max(nan_vec, axis=0) > 0, NAN, lse)


@triton.jit
def _kl_row_kernel(z_ptr, out_ptr, b_ptr, ids_ptr, q_ptr, w_ptr, g_ptr, lse_in_ptr, loss_ptr,
                   lse_ptr, row0, V, K,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
                   FULL: tl.constexpr, HAS_B: tl.constexpr, HAS_W: tl.constexpr,
                   DO_LOSS: tl.constexpr, STORE_LSE: tl.constexpr, DO_GRAD: tl.constexpr,
                   LSE_GIVEN: tl.constexpr, FUSED: tl.constexpr, IN_PLACE: tl.constexpr):
    # z rows are local to the launch (the fused op's chunk buffer); targets, weights, losses are
    # indexed by the global row r = row0 + pid.
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    if IN_PLACE:
        orow = z_ptr + pid * V
    else:
        orow = out_ptr + pid * V
    kk = tl.arange(0, BLOCK_K)
    kin = kk < K
    ids = tl.load(ids_ptr + r * K + kk, mask=kin, other=0)
    q = tl.load(q_ptr + r * K + kk, mask=kin, other=0.0)
    zk = tl.load(zrow + ids, mask=kin, other=0.0).to(tl.float32)  # finite when masked
    if HAS_B:
        zk = zk + tl.load(b_ptr + ids, mask=kin, other=0.0)
    sq = tl.sum(q, axis=0)

    # log-normaliser
    if LSE_GIVEN:
        lse = tl.load(lse_in_ptr + r)
    elif FULL:
        lse = _row_lse(zrow, b_ptr, V, BLOCK_V, HAS_B)
    else:
        zkm = tl.where(kin, zk, NEG_INF)
        m = tl.max(zkm, axis=0)
        m_safe = tl.where(m > NEG_INF, m, 0.0)
        s = tl.sum(tl.where(kin, tl.exp(zkm - m_safe), 0.0), axis=0)
        lse = tl.where(m > NEG_INF, m + tl.log(s), NEG_INF)

    if HAS_W:
        w = tl.load(w_ptr + r)

    if DO_LOSS:
        pos = q > 0.0
        qs = tl.where(pos, q, 1.0)
        terms = tl.where(pos, q * tl.log(qs) - q * (zk - lse), 0.0)
        kl = tl.sum(terms, axis=0)
        if HAS_W:
            kl = w * kl
        if FUSED:  # a row without target: no loss (and no gradient)
            kl = tl.where(sq == 0.0, 0.0, kl)
        tl.store(loss_ptr + r, kl)
        if STORE_LSE:
            tl.store(lse_ptr + r, lse)

    if DO_GRAD:
        coef = tl.load(g_ptr + r).to(tl.float32)
        if HAS_W:
            coef = coef * w
        if FUSED:
            coef = tl.where(sq == 0.0, 0.0, coef)
        a = coef * sq
        # per id: total of its contributions over the repeated ids of the row
        acc = tl.zeros([BLOCK_K], tl.float32)
        for j0 in range(0, K, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            jin = jj < K
            idj = tl.load(ids_ptr + r * K + jj, mask=jin, other=-1)
            qj = tl.load(q_ptr + r * K + jj, mask=jin, other=0.0)
            cj = -(coef * qj)
            if not FULL:
                zj = tl.load(zrow + idj, mask=jin, other=NEG_INF).to(tl.float32)
                if HAS_B:
                    zj = zj + tl.load(b_ptr + idj, mask=jin, other=0.0)
                cj = a * tl.exp(zj - lse) + cj
            cj = tl.where(jin, cj, 0.0)
            eq = ids[:, None] == idj[None, :]
            acc += tl.sum(tl.where(eq, cj[None, :], 0.0), axis=1)
        if FULL:
            val = tl.where(a != 0.0, a * tl.exp(zk - lse), 0.0) + acc
        else:
            val = acc
        tl.debug_barrier()  # every read of z is done before the row is overwritten
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cin = cols < V
            if FULL:
                x = tl.load(zrow + cols, mask=cin, other=NEG_INF).to(tl.float32)
                if HAS_B:
                    x = x + tl.load(b_ptr + cols, mask=cin, other=0.0)
                y = tl.where(a != 0.0, a * tl.exp(x - lse), 0.0)
            else:
                y = tl.zeros([BLOCK_V], tl.float32)
            tl.store(orow + cols, y.to(orow.dtype.element_ty), mask=cin)
        tl.debug_barrier()  # the tiles are written before the ids' slots are overwritten
        tl.store(orow + ids, val.to(orow.dtype.element_ty), mask=kin)


# ---------------------------------------------------------------------------------------------
# Argument checks (those of csrc/cpu/shred_kl.cpp)
# ---------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t, name):
    _check_tensor(t, name)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_device(t, name, device):
    if t.device != device:
        raise ValueError(f"{name} must be on the device of the other inputs ({device}), got {t.device}")


def _check_vec(t, name, n, device):
    if t is None:
        return
    _check_float(t, name)
    _check_device(t, name, device)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}], got {tuple(t.shape)}")


def _check_linear_head(hidden, weight, bias):
    """hidden float [N, H], weight float [V, H] with V >= 1, bias float [V] or None, all on
    hidden's device (csrc/include/lethe/checks.h: check_linear_head)."""
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    dev = hidden.device
    _check_device(weight, "weight", dev)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    h, v = hidden.shape[1], weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must have H = {h} columns: weight must have shape [V, {h}] (H is "
                         f"hidden's last dimension), got {tuple(weight.shape)}")
    if v < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_float(bias, "bias")
        _check_device(bias, "bias", dev)
        if bias.dim() != 1 or bias.shape[0] != v:
            raise ValueError(f"bias must have shape [V] = [{v}], got {tuple(bias.shape)}")


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_logits(logits):
    _check_float(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got {logits.dim()}-D")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (V >= 1)")


def _prepare_targets(target_ids, target_probs, row_weight, n, v, device, check_values=True):
    """(ids int64 [N,K], q fp32 [N,K], w fp32 [N] or None), contiguous, values checked unless
    check_values is False."""
    _check_tensor(target_ids, "target_ids")
    _check_device(target_ids, "target_ids", device)
    if target_ids.dtype != torch.int64:
        raise TypeError(f"target_ids must be int64, got {target_ids.dtype}")
    if target_ids.dim() != 2 or target_ids.shape[0] != n:
        raise ValueError(f"target_ids must have shape [N, K] with N = {n}, got {tuple(target_ids.shape)}")
    k = target_ids.shape[1]
    if k > v:
        raise ValueError(f"target_ids has K = {k} columns, more than the vocabulary size V = {v}")
    _check_float(target_probs, "target_probs")
    _check_device(target_probs, "target_probs", device)
    if target_probs.shape != target_ids.shape:
        raise ValueError(f"target_probs must have the shape of target_ids {tuple(target_ids.shape)}, "
                         f"got {tuple(target_probs.shape)}")
    _check_vec(row_weight, "row_weight", n, device)
    ids = target_ids.detach().contiguous()
    q = target_probs.detach().to(torch.float32).contiguous()
    w = row_weight.detach().to(torch.float32).contiguous() if row_weight is not None else None
    if check_values:
        check_target_values(ids, target_probs.detach(), v)
    return ids, q, w


def _blocks(v, k):
    block_v = max(16, min(triton.next_power_of_2(v), BLOCK_V_MAX))
    block_k = max(16, triton.next_power_of_2(max(k, 1)))
    block_j = max(2, min(block_k, DEDUP_TILE // block_k))
    warps = 8 if block_v >= 4096 else 4
    return block_v, block_k, block_j, warps


def _launch_rows(rows, z, out, b, ids, q, w, g, lse_in, loss, lse_out, row0, full, do_loss,
                 store_lse, do_grad, lse_given, fused, in_place):
    v = z.shape[1]
    k = ids.shape[1]
    block_v, block_k, block_j, warps = _blocks(v, k)
    dummy = q  # stands for the absent pointer arguments (never read)
    _kl_row_kernel[(rows,)](
        z, out if out is not None else dummy, b if b is not None else dummy, ids, q,
        w if w is not None else dummy, g if g is not None else dummy,
        lse_in if lse_in is not None else dummy, loss if loss is not None else dummy,
        lse_out if lse_out is not None else dummy, row0, v, k,
        BLOCK_V=block_v, BLOCK_K=block_k, BLOCK_J=block_j, FULL=bool(full), HAS_B=b is not None,
        HAS_W=w is not None, DO_LOSS=do_loss, STORE_LSE=store_lse, DO_GRAD=do_grad,
        LSE_GIVEN=lse_given, FUSED=fused, IN_PLACE=in_place, num_warps=warps,
        enable_fp_fusion=False,
    )


# ---------------------------------------------------------------------------------------------
# Launchers (signatures of the lethe::topk_kl* ops)
# ---------------------------------------------------------------------------------------------

def topk_kl(logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
            row_weight: Optional[torch.Tensor], full_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, lse [N] fp32): per-row row_weight * KL(q || softmax(z)) and the
    log-normaliser used (full vocabulary, or the K target ids when not full_normalize)."""
    _check_logits(logits)
    n, v = logits.shape
    dev = logits.device
    ids, q, w = _prepare_targets(target_ids, target_probs, row_weight, n, v, dev)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse
    z = logits.detach().contiguous()
    _launch_rows(n, z, None, None, ids, q, w, None, None, loss, lse, 0, full_normalize,
                 do_loss=True, store_lse=True, do_grad=False, lse_given=False, fused=False,
                 in_place=False)
    return loss, lse


def topk_kl_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target_ids: torch.Tensor,
                     target_probs: torch.Tensor, lse: torch.Tensor,
                     row_weight: Optional[torch.Tensor], full_normalize: bool,
                     check_values: bool = True) -> torch.Tensor:
    """Gradient wrt logits (logits' dtype, [N, V]) of sum_t grad_loss[t] * loss[t]."""
    _check_logits(logits)
    n, v = logits.shape
    dev = logits.device
    _check_vec(grad_loss, "grad_loss", n, dev)
    _check_vec(lse, "lse", n, dev)
    ids, q, w = _prepare_targets(target_ids, target_probs, row_weight, n, v, dev, check_values)
    out = torch.empty((n, v), dtype=logits.dtype, device=dev)
    if n == 0:
        return out
    z = logits.detach().contiguous()
    g = grad_loss.detach().to(torch.float32).contiguous()
    l = lse.detach().to(torch.float32).contiguous()
    _launch_rows(n, z, out, None, ids, q, w, g, l, None, None, 0, full_normalize,
                 do_loss=False, store_lse=False, do_grad=True, lse_given=True, fused=False,
                 in_place=False)
    return out


def fused_linear_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         target_ids: torch.Tensor, target_probs: torch.Tensor,
                         row_weight: Optional[torch.Tensor], grad_row_scale: Optional[torch.Tensor],
                         full_normalize: bool, chunk_size: int, grad_hidden: bool = True,
                         grad_weight: bool = True, grad_bias: bool = True, check_values: bool = True):
    """(loss [N] fp32, grad_hidden, grad_weight, grad_bias) of topk_kl on hidden @ weight^T + bias,
    chunk_size rows at a time. The gradients (of sum_t grad_row_scale[t] * loss[t]) asked for are
    computed when grad_row_scale is given; every other one is an empty [0] tensor of hidden's dtype."""
    _check_linear_head(hidden, weight, bias)
    dev = hidden.device
    (n, h), v = hidden.shape, weight.shape[0]
    _check_vec(grad_row_scale, "grad_row_scale", n, dev)
    chunk_size = _check_chunk_size(chunk_size)
    ids, q, w = _prepare_targets(target_ids, target_probs, row_weight, n, v, dev, check_values)
    scaled = grad_row_scale is not None
    want_h, want_w = scaled and grad_hidden, scaled and grad_weight
    want_b = scaled and grad_bias and bias is not None
    grads = want_h or want_w or want_b

    loss = torch.empty(n, dtype=torch.float32, device=dev)
    gh, gw, gb = (torch.empty(0, dtype=hidden.dtype, device=dev) for _ in range(3))
    if n == 0:
        if want_h:
            gh = torch.empty((0, h), dtype=hidden.dtype, device=dev)
        if want_w:
            gw = torch.zeros((v, h), dtype=weight.dtype, device=dev)
        if want_b:
            gb = torch.zeros(v, dtype=bias.dtype, device=dev)
        return loss, gh, gw, gb

    hd = hidden.detach().contiguous()
    W = weight.detach().to(torch.float32).contiguous()
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    srs = grad_row_scale.detach().to(torch.float32).contiguous() if grads else None
    h32 = hidden.dtype == torch.float32

    c_max = min(chunk_size, n)
    zbuf = torch.empty((c_max, v), dtype=torch.float32, device=dev)
    if want_h:
        gh = torch.empty((n, h), dtype=hidden.dtype, device=dev)
    gW32 = torch.zeros((v, h), dtype=torch.float32, device=dev) if want_w else None
    gb32 = torch.zeros(v, dtype=torch.float32, device=dev) if want_b else None

    for s in range(0, n, c_max):
        c = min(c_max, n - s)
        z = zbuf[:c]
        hc = hd[s:s + c] if h32 else hd[s:s + c].to(torch.float32)
        torch.mm(hc, W.t(), out=z)
        _launch_rows(c, zbuf, None, b, ids, q, w, srs, None, loss, None, s, full_normalize,
                     do_loss=True, store_lse=False, do_grad=grads, lse_given=False, fused=True,
                     in_place=True)
        if want_h:
            if h32:
                torch.mm(z, W, out=gh[s:s + c])
            else:
                gh[s:s + c].copy_(z @ W)
        if want_w:
            gW32.addmm_(z.t(), hc)
        if want_b:
            gb32 += z.sum(0)

    if want_w:
        gw = gW32 if weight.dtype == torch.float32 else gW32.to(weight.dtype)
    if want_b:
        gb = gb32 if bias.dtype == torch.float32 else gb32.to(bias.dtype)
    return loss, gh, gw, gb
