"""Triton kernels of the ssd family: fisher_accumulate and ssd_dampen (Selective Synaptic
Dampening), one launch for the whole list of tensors.

Same semantics as the CPU kernels in csrc/cpu/ssd.cpp (definitions:
python/lethe/ops/ssd_reference.py; the per-element formulas of csrc/include/lethe/ssd.h); the
launchers take arguments that lethe.ops has checked.

Batching: the launcher writes one int64 table (one host-to-device copy per call), a row per
non-empty tensor: its three addresses (fisher: importance, grad; dampen: param, importance,
forget_importance), its length, the dtype codes of the three (fp32, fp16, bf16, fp64, mixed in one
list), its first program and the key of its random bits. A program finds its tensor by a binary
search over the first-program column and takes BLOCK elements of it; data pointers are the
table's addresses cast to their runtime dtype (gu.py's _load / _store), so each kernel has one
configuration (aot_configs) whatever the dtypes.

Arithmetic is fp32 IEEE (div_rn; launched with enable_fp_fusion=False), in the reference's
order. A general exponent (not 0, 1, 2, 3, -1) is exp2(e log2 |w|) in fp64, rounded to fp32 and
signed as pow, lethe/ssd.h's general_power (the same code runs under the interpreter). Stochastic rounding to bf16 adds the
low 16 bits of the same counter-based hash as the CPU kernel (lowbias32 of (seed, tensor,
element), uint32 arithmetic) and truncates: bit for bit the CPU kernel's. ssd_dampen's programs
write their count and fp64 factor sum to their own partials entry (no atomics); the entries are
summed per tensor as differences of one scan (deterministic). Not CUDA-graph capturable: the
table is copied to the device at each call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lethe.triton_kernels.gu import CODES, _load, _store

BLOCK = 1024  # elements per program (power of two), read at call time (tests lower it)
NUM_WARPS = 4
F = tl.constexpr(8)  # int64 entries per tensor row of the table
C_A, C_B, C_C, C_N, C_CODES, C_P0, C_KEY = (tl.constexpr(i) for i in range(7))
KINDS = {0.0: 0, 1.0: 1, 2.0: 2, 3.0: 3, -1.0: 4}  # lethe/ssd.h's Power; else 5 (general)
GENERAL = 5
M32 = 0xFFFFFFFF


@triton.jit
def _find(tab_ptr, T, steps, pid):
    """The table row of program pid: the last row whose first program is <= pid."""
    lo = pid * 0
    hi = lo + T
    for _ in range(steps):
        mid = (lo + hi) // 2
        go = tl.load(tab_ptr + mid.to(tl.int64) * F + C_P0) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return tab_ptr + lo.to(tl.int64) * F


@triton.jit
def _program(tab_ptr, T, steps, BLOCK_: tl.constexpr):
    """(the table row of this program, its element offsets, their mask, the row's dtype codes)."""
    pid = tl.program_id(0)
    row = _find(tab_ptr, T, steps, pid)
    offs = (pid - tl.load(row + C_P0)).to(tl.int64) * BLOCK_ + tl.arange(0, BLOCK_).to(tl.int64)
    return row, offs, offs < tl.load(row + C_N), tl.load(row + C_CODES)


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 values (lethe/ssd.h's hash32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["T", "steps"])
def _fisher_kernel(tab_ptr, T, steps, s, BLOCK_: tl.constexpr):
    row, offs, mask, codes = _program(tab_ptr, T, steps, BLOCK_)
    acode = codes & 15
    a_addr = tl.load(row + C_A)
    g = _load(tl.load(row + C_B), (codes >> 4) & 15, offs, mask, tl.float32)
    v = _load(a_addr, acode, offs, mask, tl.float32) + (g * g) * s
    if acode == 0:
        tl.store(a_addr.to(tl.pointer_type(tl.float32)) + offs, v, mask=mask)
    else:  # bf16: stochastic rounding
        key = tl.load(row + C_KEY).to(tl.uint32)
        lo = (offs & 0xFFFFFFFF).to(tl.uint32)
        hi = (offs >> 32).to(tl.uint32)
        r = _hash32(lo ^ _hash32(hi ^ key))
        u = v.to(tl.uint32, bitcast=True)
        out = (u + (r & 0xFFFF)) >> 16
        out = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, out)
        tl.store(a_addr.to(tl.pointer_type(tl.uint16)) + offs, out.to(tl.uint16), mask=mask)


@triton.jit(do_not_specialize=["T", "steps", "kind", "e_odd", "e_frac"])
def _dampen_kernel(tab_ptr, cnt_ptr, sum_ptr, e_ptr, T, steps, alpha, lambd, bound, kind, e_odd, e_frac,
                   BLOCK_: tl.constexpr):
    pid = tl.program_id(0)
    row, offs, mask, codes = _program(tab_ptr, T, steps, BLOCK_)
    pcode = codes & 15
    p_addr = tl.load(row + C_A)
    d = _load(tl.load(row + C_B), (codes >> 4) & 15, offs, mask, tl.float32)
    f = _load(tl.load(row + C_C), (codes >> 8) & 15, offs, mask, tl.float32)
    p = _load(p_addr, pcode, offs, mask, tl.float32)
    sel = (f > d * alpha) & mask
    w = tl.math.div_rn(d * lambd, tl.where(sel, f, 1.0))  # (unselected lanes: no 0 / 0)
    if kind == 0:
        w = tl.full([BLOCK_], 1.0, tl.float32)
    elif kind == 2:
        w = w * w
    elif kind == 3:
        w = w * w * w
    elif kind == 4:
        w = tl.math.div_rn(tl.full([BLOCK_], 1.0, tl.float32), w)
    elif kind == 5:  # |w|^e, signed as pow: negative for an odd integer e, NaN for a non-integer one
        a = w.to(tl.float64)
        r = tl.exp2(tl.load(e_ptr) * tl.log2(tl.abs(a)))
        if e_odd:  # (the exponent's kind: host flags)
            r = tl.where(a < 0, -r, r)
        if e_frac:
            r = tl.where(a < 0, float("nan"), r)
        w = r.to(tl.float32)
    w = tl.where(w > bound, bound, w)
    _store(p_addr, pcode, offs, tl.where(sel, p * w, p), mask)
    tl.store(cnt_ptr + pid, tl.sum(sel.to(tl.int32), axis=0).to(tl.int64))
    tl.store(sum_ptr + pid, tl.sum(tl.where(sel, w, 0.0).to(tl.float64), axis=0))


class _Plan:
    """The table of the non-empty tensors (a, b, c: their lists; key(t): the random bits' key)."""

    def __init__(self, a, b, c, key=lambda t: 0):
        self.block = BLOCK
        self.index, rows, p = [], [], 0
        for t in range(len(a)):
            n = a[t].numel()
            if n == 0:
                continue
            cc = c[t] if c is not None else a[t]
            codes = CODES[a[t].dtype] | (CODES[b[t].dtype] << 4) | (CODES[cc.dtype] << 8)
            k = key(t)
            rows.append([a[t].data_ptr(), b[t].data_ptr(), cc.data_ptr(), n, codes, p, k, 0])
            self.index.append(t)
            p += triton.cdiv(n, self.block)
        self.programs = p
        self.T = len(rows)
        self.steps = max(1, self.T.bit_length())
        self.table = torch.tensor(rows, dtype=torch.int64).to(a[0].device, non_blocking=True) if rows else None
        self.first = [r[5] for r in rows]


def _hash32_int(x: int) -> int:
    """lowbias32 on a Python int (the kernels' _hash32), for the per-tensor keys."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _tensor_key(seed: int, t: int) -> int:
    """lethe/ssd.h's tensor_key."""
    k = _hash32_int((t & M32) ^ 0x9E3779B9)
    k = _hash32_int((seed & M32) ^ k)
    return _hash32_int(((seed >> 32) & M32) ^ k)


def fisher_accumulate(importance, grad, scale, seed):
    """importance[t] <- importance[t] + (grad[t] * grad[t]) * scale in place (bf16: stochastic rounding)."""
    plan = _Plan(importance, grad, None, key=lambda t: _tensor_key(seed, t))
    if plan.programs == 0:
        return None
    s = float(torch.tensor(scale, dtype=torch.float32))
    _fisher_kernel[(plan.programs,)](plan.table, plan.T, plan.steps, s, BLOCK_=plan.block, num_warps=NUM_WARPS,
                                     enable_fp_fusion=False)
    return None


def ssd_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound):
    """Dampens param in place; returns (selected counts [T] int64, factor sums [T] fp64)."""
    dev = param[0].device
    T = len(param)
    counts = torch.zeros(T, dtype=torch.int64, device=dev)
    sums = torch.zeros(T, dtype=torch.float64, device=dev)
    plan = _Plan(param, importance, forget_importance)
    if plan.programs == 0:
        return counts, sums
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731  (the reference's fp32 scalars)
    cnt = torch.empty(plan.programs, dtype=torch.int64, device=dev)
    tot = torch.empty(plan.programs, dtype=torch.float64, device=dev)
    e = torch.tensor([float(exponent)], dtype=torch.float64, device=dev)  # (a float argument would be fp32)
    _dampen_kernel[(plan.programs,)](plan.table, cnt, tot, e, plan.T, plan.steps, f32(alpha), f32(lambd), f32(bound),
                                     KINDS.get(float(exponent), GENERAL), int(float(exponent) % 2 == 1),
                                     int(float(exponent) % 1 != 0), BLOCK_=plan.block,
                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
    # per tensor, its programs' entries (contiguous) summed in program order: differences of one
    # inclusive scan (a scan is deterministic; the fp64 sums lose ~1e-16 of the running total)
    ends = torch.tensor(plan.first[1:] + [plan.programs], dtype=torch.int64, device=dev)
    starts = torch.tensor(plan.first, dtype=torch.int64, device=dev)
    idx = torch.tensor(plan.index, dtype=torch.int64, device=dev)
    for part, out in ((cnt, counts), (tot, sums)):
        c = torch.cat([part.new_zeros(1), part.cumsum(0)])
        out[idx] = c[ends] - c[starts]
    return counts, sums


def aot_configs():
    """Every configuration the launchers above compile (dtypes and the exponent kind are runtime values)."""
    yield dict(kernel=_fisher_kernel, num_warps=NUM_WARPS,
               signature={"tab_ptr": "*i64", "T": "i32", "steps": "i32", "s": "fp32"},
               constexprs={"BLOCK_": BLOCK})
    yield dict(kernel=_dampen_kernel, num_warps=NUM_WARPS,
               signature={"tab_ptr": "*i64", "cnt_ptr": "*i64", "sum_ptr": "*fp64", "e_ptr": "*fp64", "T": "i32",
                          "steps": "i32", "alpha": "fp32", "lambd": "fp32", "bound": "fp32", "kind": "i32",
                          "e_odd": "i32", "e_frac": "i32"},
               constexprs={"BLOCK_": BLOCK})
