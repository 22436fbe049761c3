"""Triton kernels of the gu family: subspace_dots, subspace_axpy and subspace_transform, the
multi-tensor arithmetic of a retain subspace (Geometric-Disentanglement Unlearning).

Same semantics as the CPU kernels in csrc/cpu/gu.cpp (definitions:
python/lethe/ops/gu_reference.py); the launchers take arguments that lethe.ops has checked.

Batching: one launch per basis dtype and row tile KB (K_t rounded up to a power of two, at least
1), for every tensor of the list with that basis dtype and KB at once (usually: the whole list).
The launcher writes one int64 table (one host-to-device copy per call): a header (eps as fp64
bits), per tensor its addresses (basis, x or the axpy source, exp_avg_sq or the axpy output), its
row length n, K_t, scope, the dtype codes of its data tensors, its first program and its first
partials row; then the scopes' partials bounds. A program finds its tensor by a binary search over
the first-program column and takes BLOCK elements of it, all K_t rows at once; each data pointer
is the address from the table cast to its dtype, which is a runtime code in the table (fp32, fp16,
bf16, fp64, mixed in one list): the kernels have one configuration per basis dtype and KB
(aot_configs), whatever the data dtypes and flags (runtime arguments, do_not_specialize).

Arithmetic is in the basis dtype (fp32, or fp64 for a fp64 basis): the data are loaded and
converted to it, the metric u = 1 / (sqrt(v) + eps) is IEEE (sqrt_rn, div_rn in fp32), sums run
per lane over a program's block and are reduced in the program; each program writes its sums to
its own fp64 partials row (no atomics). The rows are laid out scope by scope (tensors in list
order, then blocks in order) and _reduce_kernel sums each scope's rows in fp64 in that fixed order:
the results do not depend on timing. The Gram's upper triangle is computed (i <= j) and mirrored
on the host, so it is exactly symmetric. Transform: each program reads all K_t rows of a tile of
elements before it writes the new ones (in place; programs own disjoint elements). Kernels are
launched with enable_fp_fusion=False, but Triton may lower transform's row combination (a sum of
products over a tile) to tt.dot, which runs as FMAs on a GPU: its results are fp32 within the
tests' tolerance, not bit for bit those of the CPU kernel.

Conversions are those of torch and the CPU kernel, bit for bit, on a GPU and under the interpreter
alike: bf16 is widened from its bits and rounded to nearest even by integer arithmetic
(_bf16_bits), as the interpreter's own bf16 casts truncate and mangle subnormals; fp64 values go
to fp16 / bf16 through fp32, as torch converts them. Not CUDA-graph capturable: the table is copied
to the device at each call.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

# Tile sizes, read at call time (tests lower them to exercise several blocks and steps).
BLOCK = 8192  # elements of one tensor per program (power of two)
TILE = 1024  # fp32 values per step of the [KB, TILE // KB] row tiles (power of two; fp64: half)
CUBE = 4096  # fp32 values per step of the [KB, KB, CUBE // KB^2] product tiles (Gram, transform)
REDUCE_ROWS = 32  # partials rows summed per step (power of two)
REDUCE_COLS = 32  # partials columns per reduce program (power of two)
MAX_ROWS = 16  # K_t <= 16 (lethe.ops.gu.MAX_ROWS)
NUM_WARPS = 4

HEADER = tl.constexpr(2)  # int64 entries before the tensors' rows: eps (fp64 bits), 0
F = tl.constexpr(9)  # int64 entries per tensor row of the table
# the columns of a tensor's row: addresses (basis, x or the axpy source, exp_avg_sq or the axpy
# output), row length, K_t, scope, dtype codes (x | v << 4), first program, first partials row
C_B, C_X, C_V, C_N, C_K, C_S, C_CODES, C_P0, C_R0 = (tl.constexpr(i) for i in range(9))
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@triton.jit
def _load(addr, code, offs, mask, ACC: tl.constexpr):
    """Values at addr + offs of the dtype with this code (fp32, fp16, bf16, fp64), as ACC."""
    if code == 0:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0).to(ACC)
    elif code == 1:
        v = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(ACC)
    elif code == 2:  # bf16, widened from its bits (exact; the interpreter's cast mangles subnormals)
        u = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        v = (u.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _bf16_bits(v):
    """The bits of fp32 v rounded to bf16, to nearest even (overflow to Inf, subnormals included; NaN
    -> 0x7FC0, torch's NaN): what a GPU's cvt.rn.bf16.f32 gives, also under the interpreter (whose
    cast truncates, and mangles subnormals)."""
    b = v.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, r).to(tl.uint16)


@triton.jit
def _store(addr, code, offs, val, mask):
    """val rounded to the dtype with this code, stored at addr + offs. fp64 values go to fp16 / bf16
    through fp32, as torch and the CPU kernel convert them."""
    if code == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, val.to(tl.float32), mask=mask)
    elif code == 1:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, val.to(tl.float32).to(tl.float16), mask=mask)
    elif code == 2:
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, _bf16_bits(val.to(tl.float32)), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float64)) + offs, val.to(tl.float64), mask=mask)


@triton.jit
def _find(tab_ptr, first, T, steps, pid):
    """The index (within the launch's T table rows from `first`) of the tensor program pid works on:
    the last row whose first program is <= pid (first programs increase strictly)."""
    lo = pid * 0
    hi = lo + T
    for _ in range(steps):
        mid = (lo + hi) // 2
        p0 = tl.load(tab_ptr + HEADER + (first + mid).to(tl.int64) * F + C_P0)
        go = p0 <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _weight(v_addr, vcode, offs, emask, eps, has_v, ACC: tl.constexpr, N: tl.constexpr):
    """The metric u = 1 / (sqrt(v) + eps) (1 without v), 0 outside the tensor."""
    if has_v:
        v = _load(v_addr, vcode, offs, emask, ACC)
        if ACC == tl.float64:
            u = 1.0 / (tl.sqrt(v) + eps)  # (IEEE in fp64)
        else:
            u = tl.math.div_rn(tl.full([N], 1.0, ACC), tl.sqrt_rn(v) + eps)
    else:
        u = tl.full([N], 1.0, ACC)
    return tl.where(emask, u, 0.0)


@triton.jit
def _program(tab_ptr, first, T, steps, BLOCK_: tl.constexpr):
    """(row pointer of the program's tensor in the table, its block number, first and end element)."""
    pid = tl.program_id(0)
    t = _find(tab_ptr, first, T, steps, pid)
    row = tab_ptr + HEADER + (first + t).to(tl.int64) * F
    blk = pid.to(tl.int64) - tl.load(row + C_P0)
    n = tl.load(row + C_N)
    start = blk * BLOCK_
    end = tl.minimum(start + BLOCK_, n)
    return row, blk, n, start, end


@triton.jit(do_not_specialize=["first", "T", "steps", "K", "has_x", "has_v", "gram"])
def _dots_kernel(tab_ptr, part_ptr, first, T, steps, K, has_x, has_v, gram, ACC: tl.constexpr, KB: tl.constexpr,
                 BLOCK_: tl.constexpr, STEP: tl.constexpr, CSTEP: tl.constexpr):
    row, blk, n, start, end = _program(tab_ptr, first, T, steps, BLOCK_)
    kt = tl.load(row + C_K)
    codes = tl.load(row + C_CODES)
    x_addr = tl.load(row + C_X)
    v_addr = tl.load(row + C_V)
    q_ptr = tl.load(row + C_B).to(tl.pointer_type(ACC))
    xcode = codes & 15
    vcode = codes >> 4
    eps = tl.load(tab_ptr).to(tl.float64, bitcast=True).to(ACC)
    rows = tl.arange(0, KB)
    rmask = rows < kt
    roff = rows.to(tl.int64) * n
    K1 = K + 1
    if gram:
        gout = part_ptr + (tl.load(row + C_R0) + blk) * K1 * K1
        g_qq = tl.zeros([KB, KB, CSTEP], ACC)
        g_qx = tl.zeros([KB, CSTEP], ACC)
        g_xx = tl.zeros([CSTEP], ACC)
        for e0 in range(start, end, CSTEP):
            offs = e0 + tl.arange(0, CSTEP).to(tl.int64)
            emask = offs < end
            q = tl.load(q_ptr + roff[:, None] + offs[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
            u = _weight(v_addr, vcode, offs, emask, eps, has_v, ACC, CSTEP)
            w = q * u[None, :]
            g_qq += q[:, None, :] * w[None, :, :]
            if has_x:
                xv = _load(x_addr, xcode, offs, emask, ACC)
                ux = u * xv
                g_qx += q * ux[None, :]
                g_xx += ux * xv
        qq = tl.sum(g_qq, axis=2)
        ii = rows[:, None]
        jj = rows[None, :]
        tl.store(gout + ii * K1 + jj, qq.to(tl.float64), mask=(ii <= jj) & (jj < kt))
        tl.store(gout + rows * K1 + K, tl.sum(g_qx, axis=1).to(tl.float64), mask=rmask)
        tl.store(gout + K * K1 + K, tl.sum(g_xx, axis=0).to(tl.float64))
    else:
        out = part_ptr + (tl.load(row + C_R0) + blk) * K1
        acc_qx = tl.zeros([KB, STEP], ACC)
        acc_xx = tl.zeros([STEP], ACC)
        for e0 in range(start, end, STEP):
            offs = e0 + tl.arange(0, STEP).to(tl.int64)
            emask = offs < end
            q = tl.load(q_ptr + roff[:, None] + offs[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
            u = _weight(v_addr, vcode, offs, emask, eps, has_v, ACC, STEP)
            xv = _load(x_addr, xcode, offs, emask, ACC)
            ux = u * xv
            acc_qx += q * ux[None, :]
            acc_xx += ux * xv
        tl.store(out + rows, tl.sum(acc_qx, axis=1).to(tl.float64), mask=rmask)
        tl.store(out + K, tl.sum(acc_xx, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["first", "T", "steps", "K", "dots"])
def _axpy_kernel(tab_ptr, part_ptr, coeff_ptr, scale_ptr, first, T, steps, K, dots, ACC: tl.constexpr,
                 KB: tl.constexpr, BLOCK_: tl.constexpr, STEP: tl.constexpr):
    row, blk, n, start, end = _program(tab_ptr, first, T, steps, BLOCK_)
    kt = tl.load(row + C_K)
    s = tl.load(row + C_S)
    codes = tl.load(row + C_CODES)
    x_addr = tl.load(row + C_X)  # the source: x, or out itself
    o_addr = tl.load(row + C_V)
    q_ptr = tl.load(row + C_B).to(tl.pointer_type(ACC))
    xcode = codes & 15
    ocode = codes >> 4
    rows = tl.arange(0, KB)
    rmask = rows < kt
    roff = rows.to(tl.int64) * n
    c = tl.load(coeff_ptr + s * K + rows, mask=rmask, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + s).to(ACC)
    out = part_ptr + (tl.load(row + C_R0) + blk) * (K + 1)
    acc_q = tl.zeros([KB, STEP], ACC)
    acc_yy = tl.zeros([STEP], ACC)
    for e0 in range(start, end, STEP):
        offs = e0 + tl.arange(0, STEP).to(tl.int64)
        emask = offs < end
        q = tl.load(q_ptr + roff[:, None] + offs[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        src = _load(x_addr, xcode, offs, emask, ACC)
        y = sc * (src - tl.sum(c[:, None] * q, axis=0))
        _store(o_addr, ocode, offs, y, emask)
        y = tl.where(emask, y, 0.0)
        acc_yy += y * y
        if dots:
            acc_q += q * y[None, :]
    tl.store(out + rows, tl.sum(acc_q, axis=1).to(tl.float64), mask=rmask)
    tl.store(out + K, tl.sum(acc_yy, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["first", "T", "steps", "K"])
def _transform_kernel(tab_ptr, coeff_ptr, first, T, steps, K, ACC: tl.constexpr, KB: tl.constexpr,
                      BLOCK_: tl.constexpr, CSTEP: tl.constexpr):
    row, blk, n, start, end = _program(tab_ptr, first, T, steps, BLOCK_)
    kt = tl.load(row + C_K)
    s = tl.load(row + C_S)
    q_ptr = tl.load(row + C_B).to(tl.pointer_type(ACC))
    rows = tl.arange(0, KB)
    rmask = rows < kt
    roff = rows.to(tl.int64) * n
    ii = rows[:, None]
    jj = rows[None, :]
    cm = tl.load(coeff_ptr + s * K * K + ii * K + jj, mask=(ii < kt) & (jj < kt), other=0.0).to(ACC)
    for e0 in range(start, end, CSTEP):
        offs = e0 + tl.arange(0, CSTEP).to(tl.int64)
        m = rmask[:, None] & (offs < end)[None, :]
        q = tl.load(q_ptr + roff[:, None] + offs[None, :], mask=m, other=0.0)  # all K_t old rows ...
        new = tl.sum(cm[:, :, None] * q[None, :, :], axis=1)
        tl.store(q_ptr + roff[:, None] + offs[None, :], new, mask=m)  # ... then the new ones


@triton.jit(do_not_specialize=["bounds", "W"])
def _reduce_kernel(part_ptr, tab_ptr, bounds, out_ptr, W, ROWS: tl.constexpr, COLS: tl.constexpr):
    """out[s, :] = the sum of scope s's partials rows, in row order (fp64)."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    cmask = cols < W
    r0 = tl.load(tab_ptr + bounds + s)
    r1 = tl.load(tab_ptr + bounds + s + 1)
    acc = tl.zeros([ROWS, COLS], tl.float64)
    for r in range(r0, r1, ROWS):
        rr = r + tl.arange(0, ROWS).to(tl.int64)
        acc += tl.load(part_ptr + rr[:, None] * W + cols[None, :], mask=(rr < r1)[:, None] & cmask[None, :],
                       other=0.0)
    tl.store(out_ptr + s.to(tl.int64) * W + cols, tl.sum(acc, axis=0), mask=cmask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _kb(k: int) -> int:
    return max(1, triton.next_power_of_2(k))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _steps(kb: int, dtype):
    """(STEP, CSTEP): the elements per step of the row tiles and of the product tiles (half as many
    in fp64: TILE and CUBE count fp32 values)."""
    w = 2 if dtype == torch.float64 else 1
    step = min(BLOCK, max(1, TILE // (kb * w)))
    return step, min(step, max(1, CUBE // (kb * kb * w)))


class _Plan:
    """The table of one call: which tensors each launch takes, their programs and partials rows."""

    def __init__(self, basis, n_rows, scope, num_scopes, pick, eps=0.0):
        """pick(t) -> (address 1, address 2, codes), or None to leave tensor t out (no work)."""
        self.block = BLOCK
        header = [struct.unpack("<q", struct.pack("<d", float(eps)))[0], 0]
        # partials rows: scope by scope, tensors in list order, then blocks
        order = sorted(range(len(basis)), key=lambda t: (scope[t], t))
        nblk, row0, counts = {}, {}, [0] * num_scopes
        total = 0
        for t in order:
            n = n_rows[t]
            if n == 0:
                continue
            got = pick(t)
            if got is None:
                continue
            nblk[t] = (triton.cdiv(n, self.block), got)
            row0[t] = total
            total += nblk[t][0]
            counts[scope[t]] += nblk[t][0]
        self.rows = total
        # launches: per (basis dtype, KB), tensors in list order
        groups: dict = {}
        for t in sorted(nblk):
            groups.setdefault((basis[t].dtype, _kb(basis[t].shape[0])), []).append(t)
        entries = []
        self.launches = []  # (basis dtype, KB, first table row, T, programs)
        for (dtype, kb), ts in groups.items():
            first, p0 = len(entries), 0
            for t in ts:
                a1, a2, codes = nblk[t][1]
                kt = basis[t].shape[0]
                b_addr = basis[t].data_ptr() if kt > 0 else a1  # (no row is read where K_t = 0)
                entries.append([b_addr, a1, a2, n_rows[t], kt, scope[t], codes, p0, row0[t]])
                p0 += nblk[t][0]
            self.launches.append((dtype, kb, first, len(ts), p0))
        flat = header + [v for e in entries for v in e]
        self.bounds = len(flat)
        acc = 0
        flat.append(0)
        for c in counts:
            acc += c
            flat.append(acc)
        self.table = torch.tensor(flat, dtype=torch.int64).to(basis[0].device)

    @staticmethod
    def steps(T: int) -> int:
        return max(0, (T - 1).bit_length())

    def reduce(self, part, num_scopes, width):
        out = torch.empty((num_scopes, width), dtype=torch.float64, device=part.device)
        if num_scopes and width:
            _reduce_kernel[(num_scopes, triton.cdiv(width, REDUCE_COLS))](
                part, self.table, self.bounds, out, width, ROWS=REDUCE_ROWS, COLS=REDUCE_COLS, num_warps=NUM_WARPS)
        return out


def _numel_row(b):
    n = 1
    for d in b.shape[1:]:
        n *= d
    return n


def subspace_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram):
    """[S, K + 1] (or [S, K + 1, K + 1] with gram) fp64: see gu_reference.subspace_dots_reference."""
    k = max(b.shape[0] for b in basis)
    k1 = k + 1
    width = k1 * k1 if gram else k1
    dev = basis[0].device
    has_x, has_v = x is not None, exp_avg_sq is not None

    def pick(t):
        if not has_x and basis[t].shape[0] == 0:
            return None
        xa, xc = (x[t].data_ptr(), CODES[x[t].dtype]) if has_x else (0, 0)
        va, vc = (exp_avg_sq[t].data_ptr(), CODES[exp_avg_sq[t].dtype]) if has_v else (0, 0)
        if not has_x:
            xa = basis[t].data_ptr()  # (never read)
        if not has_v:
            va = xa
        return xa, va, xc | (vc << 4)

    plan = _Plan(basis, [_numel_row(b) for b in basis], scope, num_scopes, pick, eps)
    part = torch.zeros((plan.rows, width), dtype=torch.float64, device=dev)
    for dtype, kb, first, T, progs in plan.launches:
        step, cstep = _steps(kb, dtype)
        _dots_kernel[(progs,)](plan.table, part, first, T, plan.steps(T), k, int(has_x), int(has_v), int(bool(gram)),
                               ACC=_acc(dtype), KB=kb, BLOCK_=plan.block, STEP=step, CSTEP=cstep,
                               num_warps=NUM_WARPS, enable_fp_fusion=False)
    out = plan.reduce(part, num_scopes, width)
    if not gram:
        return out
    out = out.view(num_scopes, k1, k1)
    return out + torch.triu(out, 1).transpose(1, 2)  # the upper triangle, mirrored (exactly symmetric)


def subspace_axpy(out, x, basis, coeff, scale, scope, dots):
    """out[t] <- scale[s] * (x[t] - coeff[s, :K_t] . basis[t]) in place; returns [S, K + 1] fp64 (see
    gu_reference.subspace_axpy_reference)."""
    k = max(b.shape[0] for b in basis)
    num_scopes = coeff.shape[0]
    dev = basis[0].device
    coeff = coeff.contiguous()
    scale = scale.contiguous()

    def pick(t):
        src = out[t] if x is None else x[t]
        return src.data_ptr(), out[t].data_ptr(), CODES[src.dtype] | (CODES[out[t].dtype] << 4)

    plan = _Plan(basis, [_numel_row(b) for b in basis], scope, num_scopes, pick)
    part = torch.zeros((plan.rows, k + 1), dtype=torch.float64, device=dev)
    coeff_arg = coeff if coeff.numel() else scale  # (never read where K = 0)
    for dtype, kb, first, T, progs in plan.launches:
        step, _ = _steps(kb, dtype)
        _axpy_kernel[(progs,)](plan.table, part, coeff_arg, scale, first, T, plan.steps(T), k, int(bool(dots)),
                               ACC=_acc(dtype), KB=kb, BLOCK_=plan.block, STEP=step, num_warps=NUM_WARPS,
                               enable_fp_fusion=False)
    return plan.reduce(part, num_scopes, k + 1)


def subspace_transform(basis, coeff, scope):
    """basis[t] rows <- coeff[s, :K_t, :K_t] @ basis[t] rows, in place."""
    k = max(b.shape[0] for b in basis)
    if k == 0:
        return None
    coeff = coeff.contiguous()

    def pick(t):
        return (0, 0, 0) if basis[t].shape[0] > 0 else None

    plan = _Plan(basis, [_numel_row(b) for b in basis], scope, coeff.shape[0], pick)
    for dtype, kb, first, T, progs in plan.launches:
        _, cstep = _steps(kb, dtype)
        _transform_kernel[(progs,)](plan.table, coeff, first, T, plan.steps(T), k, ACC=_acc(dtype), KB=kb,
                                    BLOCK_=plan.block, CSTEP=cstep, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return None


def aot_configs():
    """Every configuration the launchers above compile: per basis dtype (the accumulation dtype)
    and row tile KB, the three kernels; the partials reduction. The data dtypes, flags and sizes
    are runtime values."""
    for dtype in (torch.float32, torch.float64):
        acc = _acc(dtype)
        kb = 1
        while kb <= MAX_ROWS:
            step, cstep = _steps(kb, dtype)
            yield dict(kernel=_dots_kernel, num_warps=NUM_WARPS,
                       signature={"tab_ptr": "*i64", "part_ptr": "*fp64", "first": "i32", "T": "i32", "steps": "i32",
                                  "K": "i32", "has_x": "i32", "has_v": "i32", "gram": "i32"},
                       constexprs={"ACC": acc, "KB": kb, "BLOCK_": BLOCK, "STEP": step, "CSTEP": cstep})
            yield dict(kernel=_axpy_kernel, num_warps=NUM_WARPS,
                       signature={"tab_ptr": "*i64", "part_ptr": "*fp64", "coeff_ptr": "*fp64", "scale_ptr": "*fp64",
                                  "first": "i32", "T": "i32", "steps": "i32", "K": "i32", "dots": "i32"},
                       constexprs={"ACC": acc, "KB": kb, "BLOCK_": BLOCK, "STEP": step})
            yield dict(kernel=_transform_kernel, num_warps=NUM_WARPS,
                       signature={"tab_ptr": "*i64", "coeff_ptr": "*fp64", "first": "i32", "T": "i32", "steps": "i32",
                                  "K": "i32"},
                       constexprs={"ACC": acc, "KB": kb, "BLOCK_": BLOCK, "CSTEP": cstep})
            kb *= 2
    yield dict(kernel=_reduce_kernel, num_warps=NUM_WARPS,
               signature={"part_ptr": "*fp64", "tab_ptr": "*i64", "bounds": "i32", "out_ptr": "*fp64", "W": "i32"},
               constexprs={"ROWS": REDUCE_ROWS, "COLS": REDUCE_COLS})
