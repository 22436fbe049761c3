"""Interleaved A/B of fused_linear_topk_kl's chunk_size (loss + backward, CPU fp32): every chunk
size runs once per round, in reversed order every other round, after one warm-up each, so that
the VM's slow drifts hit all sizes alike. Prints medians and their ratio to the last size given.

    .venv/bin/python benchmarks/chunk_ab_shred.py [--rounds 6] [--shape N,H,V,K] 256 384 512
"""
import argparse
import statistics
import time

import torch

import lethe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chunks", type=int, nargs="+", help="chunk sizes; ratios are to the last one")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shape", default="4096,1024,32000,64", help="N,H,V,K")
    args = ap.parse_args()
    if args.rounds < 1 or any(c < 1 for c in args.chunks):
        ap.error("--rounds and every chunk size must be positive")
    N, H, V, K = (int(v) for v in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
    ids = torch.arange(K) * (V // K) + torch.randint(0, V // K, (N, K), generator=g)
    p = torch.softmax(torch.randn(N, K, generator=g), -1)

    def step(c):
        return torch.autograd.grad(lethe.ops.fused_linear_topk_kl(h, w, ids, p, chunk_size=c), (h, w))

    for c in args.chunks:
        step(c)
    times = {c: [] for c in args.chunks}
    for r in range(args.rounds):
        for c in args.chunks if r % 2 == 0 else args.chunks[::-1]:
            s = time.perf_counter()
            step(c)
            times[c].append(time.perf_counter() - s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} {times[c][-1]:.2f} s" for c in args.chunks),
              flush=True)
    base = statistics.median(times[args.chunks[-1]])
    for c in args.chunks:
        m = statistics.median(times[c])
        print(f"chunk {c}: median {m:.3f} s, {m / base:.3f}x chunk {args.chunks[-1]}")


if __name__ == "__main__":
    main()
