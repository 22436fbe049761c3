"""Pure-PyTorch reference of the quant family: the definition every kernel is tested against.

Follows csrc/include/lethe/quant.h step by step in fp32 (see the comment there)."""
from __future__ import annotations

import torch

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_tables(device=None):
    """(levels, midpoints) as fp32 tensors; midpoints are 0.5 * (a + b) rounded in fp32."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    mids = (levels[:-1] + levels[1:]) * 0.5
    return levels, mids


def fake_quantize_codes(x, group_size, bits, codebook, symmetric, scale_div):
    """(y in fp32, clipped-STE mask) for x of any shape; groups are contiguous runs of group_size."""
    xf = x.detach().float().reshape(-1, group_size) if x.numel() else x.detach().float().reshape(0, 1)
    lo = xf.amin(dim=1, keepdim=True).clamp(max=0.0) if xf.numel() else xf[:, :1]
    hi = xf.amax(dim=1, keepdim=True).clamp(min=0.0) if xf.numel() else xf[:, :1]
    finite = torch.isfinite(xf).all(dim=1, keepdim=True)
    absmax = torch.maximum(-lo, hi)
    zero = torch.zeros((), dtype=torch.float32, device=xf.device)

    def reciprocal(scale):  # 1 / scale where scale >= FLT_MIN (finite), else 0
        pos = scale >= torch.finfo(torch.float32).tiny
        ones = torch.ones_like(scale)
        return pos, torch.where(pos, ones / torch.where(pos, scale, ones), zero)

    if codebook == 1:
        scale = absmax
        pos, inv = reciprocal(scale)
        levels, mids = nf4_tables(xf.device)
        v = xf * inv
        code = (v.unsqueeze(-1) > mids).sum(-1)
        y = levels[code] * scale
        kept = torch.ones_like(xf, dtype=torch.bool)
    else:
        if symmetric:
            qmin, qmax = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
            scale = absmax / torch.tensor(scale_div, dtype=torch.float32, device=xf.device)
            zp = torch.zeros_like(scale)
            pos, inv = reciprocal(scale)
        else:
            qmin, qmax = 0.0, float(2**bits - 1)
            half_q = torch.tensor(qmax * 0.5, dtype=torch.float32, device=xf.device)
            scale = (hi * 0.5 - lo * 0.5) / half_q
            pos, inv = reciprocal(scale)
            zp = torch.where(pos, torch.round(-lo * inv).clamp(qmin, qmax), zero)
        q = torch.round(xf * inv) + zp
        code = q.clamp(qmin, qmax)
        kept = code == q
        y = (code - zp) * scale
    y = torch.where(pos, y, zero)
    y = torch.where(finite, y, torch.full_like(y, float("nan")))
    kept = torch.where(pos, kept, torch.ones_like(kept)) & finite
    return y.reshape(x.shape), kept.reshape(x.shape)


def fake_quantize_reference(x, group_size, bits, codebook, symmetric, scale_div, ste="identity"):
    """Differentiable reference: forward = quantise-dequantise, backward = straight-through
    (identity) or clipped (zero gradient where the code was clamped)."""
    y, kept = fake_quantize_codes(x, group_size, bits, codebook, symmetric, scale_div)
    y = y.to(x.dtype)
    if ste == "clipped":
        return y + (x - x.detach()) * kept.to(x.dtype)
    return y + (x - x.detach())
