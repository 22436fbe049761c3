"""The chunked LM-head loop of the Triton launchers: the Python twin of csrc/include/lethe/lm_head.h.

No [N, V] tensor is ever held: per chunk of rows [s, s + c), z = h_c W^T into one fp32 [chunk, V]
buffer (torch matmuls, fp32 operands: the Triton backend computes everything in fp32), then
rows(s, c, z), the per-chunk row work (kernel launches), which may turn z into gradient rows G in
place; then, with gradients asked for, grad_bias += sum_rows G, grad_hidden[s:s+c] = G W and
grad_weight += G^T h_c, in fp32. A weight that is not fp32 is converted a block of rows at a time
into a 16 MiB buffer, never whole (a whole fp32 copy of a Llama-3 head is 2 GiB).
"""
from __future__ import annotations

from typing import Callable

import torch

BLOCK_BYTES = 16 << 20


def _blocks(weight: torch.Tensor):
    """(v0, fp32 rows [v0, v0 + vb) of weight) for each block: the weight itself when it is fp32."""
    if weight.dtype == torch.float32:
        yield 0, weight
        return
    v, h = weight.shape
    rows = min(v, max(256, min(4096, BLOCK_BYTES // (4 * max(h, 1)) // 256 * 256)))
    buf = torch.empty((rows, h), dtype=torch.float32, device=weight.device)
    for v0 in range(0, v, rows):
        vb = min(rows, v - v0)
        wb = buf[:vb]
        wb.copy_(weight[v0:v0 + vb])
        yield v0, wb


def lm_head_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int,
                   rows: Callable[[int, int, torch.Tensor], None], grad_hidden: bool = False,
                   grad_weight: bool = False, grad_bias: bool = False):
    """Runs the loop; returns (grad_hidden in hidden's dtype, grad_weight fp32, grad_bias fp32), each
    None when not asked for."""
    n, h = hidden.shape
    v = weight.shape[0]
    c_max = min(chunk_size, n)
    hd = hidden.detach().contiguous()
    w = weight.detach()
    w = w.contiguous() if w.dtype == torch.float32 else w
    dev = hidden.device
    zbuf = torch.empty((c_max, v), dtype=torch.float32, device=dev)
    gh = torch.empty((n, h), dtype=hidden.dtype, device=dev) if grad_hidden else None
    gw = torch.empty((v, h), dtype=torch.float32, device=dev) if grad_weight else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if grad_bias else None
    for s in range(0, n, c_max):
        c = min(c_max, n - s)
        z = zbuf[:c]
        hc = hd[s:s + c].to(torch.float32)
        for v0, wb in _blocks(w):
            if wb.shape[0] == v:
                torch.mm(hc, wb.t(), out=z)
            else:
                z[:, v0:v0 + wb.shape[0]] = hc @ wb.t()
        rows(s, c, z)
        if gb is not None:
            gb += z.sum(0)
        if gh is not None:
            dh = None
            for v0, wb in _blocks(w):
                part = z[:, v0:v0 + wb.shape[0]] @ wb
                dh = part if dh is None else dh.add_(part)
            gh[s:s + c].copy_(dh)
        if gw is not None:
            if s == 0:
                torch.mm(z.t(), hc, out=gw)
            else:
                gw.addmm_(z.t(), hc)
    return gh, gw, gb
