"""Triton kernels of the quant family: fake_quantize (quantise-dequantise, optional clipped-STE mask).

Follows csrc/include/lethe/quant.h step by step in fp32, bit for bit (see the comment there):
  * the per-group divisions (scale, its reciprocal) are IEEE round-to-nearest (tl.math.div_rn:
    div.rn.f32 on NVIDIA, numpy's division under TRITON_INTERPRET=1); a plain `/` would compile
    to the approximate div.full.f32; elements are multiplied by the reciprocal;
  * round-half-even is done with the exact add/subtract of 2^23 (no libdevice, so it also runs in
    the interpreter);
  * kernels are launched with enable_fp_fusion=False so that no product is contracted into an
    FMA (hi*0.5 - lo*0.5 would differ for subnormal hi);
  * finiteness is tracked from the exponent bits, never from min/max NaN semantics; Inf/NaN
    elements are then replaced by 0 before any arithmetic (their group's output is NaN anyway).

Groups are contiguous runs of group_size elements of the flattened tensor. Groups of up to
SMALL_GROUP_MAX elements are handled whole: one program takes TILE // BLOCK groups as a
[ROWS, BLOCK] tile, BLOCK the group size rounded up to a power of two (stats and apply in the same
program). Larger groups take three launches: partial stats per (group, chunk of CHUNK elements),
one program per group merging its partials into the group's parameters (scale, zero point,
invalid flag), then the apply per (group, chunk). The codebook, symmetry and mask flags are
runtime arguments, so each kernel has one compiled configuration per dtype and block
(aot_configs). The launchers take arguments that lethe.ops has checked, and the NF4 tables from
it (tables=(levels, midpoints)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Tunables, read at call time (tests lower them to exercise the large-group path at small sizes).
SMALL_GROUP_MAX = 4096  # largest group handled whole by one program
TILE = 4096  # elements per program on the small-group path (ROWS * BLOCK, when groups are small)
CHUNK = 4096  # elements per program on the large-group path (power of two)
PARTIAL_BLOCK = 1024  # partials merged per step on the large-group path (power of two)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: smaller scales quantise to 0


@triton.jit
def _rne(v):
    # Round half to even, exact for every fp32 (|v| >= 2^23 is already an integer; NaN passes).
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(v < 0.0, -r, r)
    return tl.where(a < 8388608.0, r, v)


@triton.jit
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _is_bad(x):
    # Inf or NaN, from the exponent bits.
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _reciprocal(scale):
    # 1 / scale where scale >= FLT_MIN (so it is finite), else 0: such groups quantise to zero.
    pos = scale >= FLT_MIN
    return tl.where(pos, tl.math.div_rn(1.0 + tl.zeros_like(scale), tl.where(pos, scale, 1.0)), 0.0)


@triton.jit
def _params(lo, hi, qmax, scale_div, codebook, symmetric):
    # lo = min(min x, 0), hi = max(max x, 0) -> (scale, 1 / scale, zero point).
    absmax = tl.where(-lo > hi, -lo, hi)
    if codebook == 1:
        scale = absmax
    elif symmetric:
        scale = tl.math.div_rn(absmax, scale_div + tl.zeros_like(absmax))
    else:
        scale = tl.math.div_rn(hi * 0.5 - lo * 0.5, qmax * 0.5 + tl.zeros_like(hi))
    inv = _reciprocal(scale)
    zp = tl.zeros_like(scale)
    if (codebook == 0) & (symmetric == 0):
        zp = tl.where(scale >= FLT_MIN, _clamp(_rne(-lo * inv), 0.0, qmax), 0.0)
    return scale, inv, zp


@triton.jit
def _apply(x, scale, inv, zp, bad, qmin, qmax, lv_ptr, md_ptr, codebook):
    # x: fp32 values; scale/inv/zp/bad broadcast against x. Returns (y fp32, kept bool).
    pos = scale >= FLT_MIN
    if codebook == 1:
        v = x * inv
        lvl = tl.where(v > tl.load(md_ptr), tl.load(lv_ptr + 1), tl.load(lv_ptr))
        for k in tl.static_range(1, 15):  # midpoints increase: the last one below v wins
            lvl = tl.where(v > tl.load(md_ptr + k), tl.load(lv_ptr + k + 1), lvl)
        y = lvl * scale
        kept = tl.zeros_like(x) == 0.0  # all True
    else:
        q = _rne(x * inv) + zp
        code = _clamp(q, qmin, qmax)
        kept = code == q
        y = (code - zp) * scale
    y = tl.where(pos, y, 0.0)
    nan = tl.full([1], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    y = tl.where(bad, nan, y)
    kept = tl.where(bad, False, tl.where(pos, kept, True))
    return y, kept


@triton.jit(do_not_specialize=["codebook", "symmetric", "return_mask"])  # no variant per flag value
def _fq_small_kernel(x_ptr, y_ptr, m_ptr, lv_ptr, md_ptr, G, L, qmin, qmax, scale_div, codebook,
                     symmetric, return_mask, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inb = (rows < G)[:, None] & (cols < L)[None, :]
    offs = rows[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    isbad = _is_bad(x)
    bad = tl.max(isbad.to(tl.int32), axis=1) > 0
    x = tl.where(isbad, 0.0, x)  # such groups give NaN anyway: keep Inf/NaN out of the arithmetic
    lo = tl.min(x, axis=1)
    lo = tl.where(lo < 0.0, lo, 0.0)
    hi = tl.max(x, axis=1)
    hi = tl.where(hi > 0.0, hi, 0.0)
    scale, inv, zp = _params(lo, hi, qmax, scale_div, codebook, symmetric)
    y, kept = _apply(x, scale[:, None], inv[:, None], zp[:, None], bad[:, None], qmin, qmax,
                     lv_ptr, md_ptr, codebook)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)
    if return_mask:
        tl.store(m_ptr + offs, kept.to(tl.uint8), mask=inb)


@triton.jit
def _fq_stats_kernel(x_ptr, lo_ptr, hi_ptr, bad_ptr, L, C, CHUNK_: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid // C
    c = pid % C
    offs = tl.arange(0, CHUNK_)
    inb = offs < L - c * CHUNK_
    x = tl.load(x_ptr + (g * L + c * CHUNK_) + offs, mask=inb, other=0.0).to(tl.float32)
    isbad = _is_bad(x)
    bad = tl.max(isbad.to(tl.int32), axis=0)
    x = tl.where(isbad, 0.0, x)
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    tl.store(lo_ptr + pid, tl.where(lo < 0.0, lo, 0.0))
    tl.store(hi_ptr + pid, tl.where(hi > 0.0, hi, 0.0))
    tl.store(bad_ptr + pid, bad)


@triton.jit(do_not_specialize=["codebook", "symmetric"])
def _fq_params_kernel(lo_ptr, hi_ptr, bad_ptr, scale_ptr, zp_ptr, gbad_ptr, C, qmax, scale_div,
                      codebook, symmetric, PBLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    base = g * C
    lo_acc = tl.zeros([PBLOCK], tl.float32)
    hi_acc = tl.zeros([PBLOCK], tl.float32)
    bad_acc = tl.zeros([PBLOCK], tl.int32)
    for c0 in range(0, C, PBLOCK):
        idx = c0 + tl.arange(0, PBLOCK)
        inb = idx < C
        lo = tl.load(lo_ptr + base + idx, mask=inb, other=0.0)
        hi = tl.load(hi_ptr + base + idx, mask=inb, other=0.0)
        bd = tl.load(bad_ptr + base + idx, mask=inb, other=0)
        lo_acc = tl.where(lo < lo_acc, lo, lo_acc)
        hi_acc = tl.where(hi > hi_acc, hi, hi_acc)
        bad_acc = bad_acc | bd
    lo = tl.min(lo_acc, axis=0)
    hi = tl.max(hi_acc, axis=0)
    bad = tl.max(bad_acc, axis=0)
    scale, inv, zp = _params(lo, hi, qmax, scale_div, codebook, symmetric)
    tl.store(scale_ptr + g, scale)
    tl.store(zp_ptr + g, zp)
    tl.store(gbad_ptr + g, bad)


@triton.jit(do_not_specialize=["codebook", "return_mask"])
def _fq_apply_kernel(x_ptr, y_ptr, m_ptr, scale_ptr, zp_ptr, gbad_ptr, lv_ptr, md_ptr, L, C,
                     qmin, qmax, codebook, return_mask, CHUNK_: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid // C
    c = pid % C
    offs = tl.arange(0, CHUNK_)
    inb = offs < L - c * CHUNK_
    start = g * L + c * CHUNK_
    x = tl.load(x_ptr + start + offs, mask=inb, other=0.0).to(tl.float32)
    x = tl.where(_is_bad(x), 0.0, x)
    scale = tl.load(scale_ptr + g)
    zp = tl.load(zp_ptr + g)
    bad = tl.load(gbad_ptr + g) != 0
    y, kept = _apply(x, scale, _reciprocal(scale), zp, bad, qmin, qmax, lv_ptr, md_ptr, codebook)
    tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=inb)
    if return_mask:
        tl.store(m_ptr + start + offs, kept.to(tl.uint8), mask=inb)


@triton.jit
def _fq_backward_kernel(g_ptr, m_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    keep = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=inb)


_DUMMY: dict = {}


def _dummy_mask(device):
    """A uint8 buffer for the mask pointer when no mask is written (never touched)."""
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.uint8, device=device)
    return _DUMMY[key]


def fake_quantize(x: torch.Tensor, group_size: int, bits: int, codebook: int, symmetric: bool,
                  scale_div: float, return_mask: bool, *, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mask): y = quantise-dequantise of x (x's dtype and shape), mask = the clipped-STE mask
    (bool, x's shape; empty unless return_mask). Same semantics as the CPU/CUDA kernels."""
    xc = x.detach().contiguous()
    y = torch.empty_like(xc, memory_format=torch.contiguous_format)
    mask = (torch.empty(x.shape, dtype=torch.bool, device=x.device) if return_mask
            else torch.empty(0, dtype=torch.bool, device=x.device))
    n = xc.numel()
    if n == 0:
        return y, mask
    L = group_size
    G = n // L
    if codebook == 1:
        qmin, qmax = 0.0, 15.0
    elif symmetric:
        qmin, qmax = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    else:
        qmin, qmax = 0.0, float(2**bits - 1)
    # scale_div rounded to fp32 once, as the other backends do (exact from here on).
    sdiv = float(torch.tensor(float(scale_div) if codebook == 0 and symmetric else 1.0,
                              dtype=torch.float32).item())
    levels, mids = tables
    m_arg = mask.view(torch.uint8) if return_mask else _dummy_mask(xc.device)
    flags = (int(codebook), int(bool(symmetric)), int(bool(return_mask)))
    if L <= SMALL_GROUP_MAX:
        block = triton.next_power_of_2(L)
        rows = max(1, TILE // block)
        _fq_small_kernel[(triton.cdiv(G, rows),)](
            xc, y, m_arg, levels, mids, G, L, qmin, qmax, sdiv, *flags, ROWS=rows, BLOCK=block,
            num_warps=_warps(rows * block), enable_fp_fusion=False)
        return y, mask
    chunk = CHUNK
    C = triton.cdiv(L, chunk)
    dev = xc.device
    lo = torch.empty(G * C, dtype=torch.float32, device=dev)
    hi = torch.empty(G * C, dtype=torch.float32, device=dev)
    bad = torch.empty(G * C, dtype=torch.int32, device=dev)
    scale = torch.empty(G, dtype=torch.float32, device=dev)
    zp = torch.empty(G, dtype=torch.float32, device=dev)
    gbad = torch.empty(G, dtype=torch.int32, device=dev)
    _fq_stats_kernel[(G * C,)](xc, lo, hi, bad, L, C, CHUNK_=chunk, num_warps=_warps(chunk),
                               enable_fp_fusion=False)
    _fq_params_kernel[(G,)](lo, hi, bad, scale, zp, gbad, C, qmax, sdiv, flags[0], flags[1],
                            PBLOCK=PARTIAL_BLOCK, num_warps=4, enable_fp_fusion=False)
    _fq_apply_kernel[(G * C,)](xc, y, m_arg, scale, zp, gbad, levels, mids, L, C, qmin, qmax, flags[0],
                               flags[2], CHUNK_=chunk, num_warps=_warps(chunk), enable_fp_fusion=False)
    return y, mask


def _warps(elements):
    return 8 if elements >= 4096 else 4


BACKWARD_BLOCK = 4096


def fake_quantize_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The clipped STE's backward: grad where mask, else 0 (grad's dtype and shape)."""
    g = grad.detach().contiguous()
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    n = g.numel()
    if n:
        _fq_backward_kernel[(triton.cdiv(n, BACKWARD_BLOCK),)](g, mask.contiguous().view(torch.uint8), out, n,
                                                               BLOCK=BACKWARD_BLOCK, num_warps=8)
    return out


def aot_configs():
    """Every configuration the launchers above compile: per dtype, the small-group kernel at each
    block (group sizes 1 to SMALL_GROUP_MAX), the large-group kernels and the STE backward."""
    scalars = {"G": "i32", "L": "i32", "qmin": "fp32", "qmax": "fp32", "scale_div": "fp32", "codebook": "i32",
               "symmetric": "i32", "return_mask": "i32"}
    for t in ("fp32", "fp16", "bf16"):
        block = 1
        while block <= SMALL_GROUP_MAX:
            yield dict(kernel=_fq_small_kernel, num_warps=_warps(max(1, TILE // block) * block),
                       signature={"x_ptr": f"*{t}", "y_ptr": f"*{t}", "m_ptr": "*u8", "lv_ptr": "*fp32",
                                  "md_ptr": "*fp32", **scalars},
                       constexprs={"ROWS": max(1, TILE // block), "BLOCK": block})
            block *= 2
        yield dict(kernel=_fq_stats_kernel, num_warps=_warps(CHUNK),
                   signature={"x_ptr": f"*{t}", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "bad_ptr": "*i32",
                              "L": "i32", "C": "i32"}, constexprs={"CHUNK_": CHUNK})
        yield dict(kernel=_fq_apply_kernel, num_warps=_warps(CHUNK),
                   signature={"x_ptr": f"*{t}", "y_ptr": f"*{t}", "m_ptr": "*u8", "scale_ptr": "*fp32",
                              "zp_ptr": "*fp32", "gbad_ptr": "*i32", "lv_ptr": "*fp32", "md_ptr": "*fp32",
                              "L": "i32", "C": "i32", "qmin": "fp32", "qmax": "fp32", "codebook": "i32",
                              "return_mask": "i32"}, constexprs={"CHUNK_": CHUNK})
        yield dict(kernel=_fq_backward_kernel, num_warps=8,
                   signature={"g_ptr": f"*{t}", "m_ptr": "*u8", "out_ptr": f"*{t}", "n": "i32"},
                   constexprs={"BLOCK": BACKWARD_BLOCK})
    yield dict(kernel=_fq_params_kernel, num_warps=4,
               signature={"lo_ptr": "*fp32", "hi_ptr": "*fp32", "bad_ptr": "*i32", "scale_ptr": "*fp32",
                          "zp_ptr": "*fp32", "gbad_ptr": "*i32", "C": "i32", "qmax": "fp32", "scale_div": "fp32",
                          "codebook": "i32", "symmetric": "i32"}, constexprs={"PBLOCK": PARTIAL_BLOCK})
