#!/usr/bin/env python
"""The three places of the CUDA kernels that their review found riskiest, at small sizes, for
compute-sanitizer (memcheck, racecheck, synccheck) in tools/gpu_check.sh; each result is checked
against the CPU kernel too. Exits 1 on a wrong result (the sanitizer's own findings give exit 9).

  1. teacher_topk's exact top-K fix-up: K close to V, chunk tails, NaN rows, many ties;
  2. the fused loss's cuBLAS chunk accumulation (grad_weight over chunks, beta 0 then 1) on a
     non-default stream, fp32 and bf16, with a low-precision weight converted block by block;
  3. select_forget_positions at T = 4096 and 5000, and fake_quantize's vector and scalar paths;
  4. the ssd ops' table and block partition: mixed dtypes, empty tensors, tensors crossing blocks."""
import sys

import torch

import lethe  # noqa: F401

ops = torch.ops.lethe
failures = []


def expect(name, ok):
    print(f"{name}: {'ok' if ok else 'WRONG'}", flush=True)
    if not ok:
        failures.append(name)


def close(a, b, tol):
    return torch.allclose(a.cpu().float(), b.cpu().float(), rtol=tol, atol=tol, equal_nan=True)


def teacher():
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 7, 600
    hidden = torch.randint(-3, 4, (n, h), generator=g).float()
    hidden[5] = 0.0  # every logit tied
    weight = torch.randint(-2, 3, (v, h), generator=g).float()
    bias = torch.zeros(v)
    bias[17] = float("nan")  # NaN logits in every row
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    for k, chunk in ((590, 8), (600, 5), (64, 36)):
        for b in (None, bias):
            got = ops.teacher_topk(hidden.cuda(), weight.cuda(), None if b is None else b.cuda(), labels.cuda(), k, chunk)
            want = ops.teacher_topk(hidden, weight, b, labels, k, chunk)
            expect(f"teacher_topk k={k} chunk={chunk} nan={b is not None}",
                   torch.equal(got[0].cpu(), want[0]) and close(got[1], want[1], 1e-5) and close(got[2], want[2], 1e-5))


def fused():
    g = torch.Generator().manual_seed(1)
    n, h, v, k = 61, 32, 1000, 16
    stream = torch.cuda.Stream()
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)):
        hidden = torch.randn(n, h, generator=g).to(dtype)
        weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(wdtype)
        bias = torch.randn(v, generator=g)
        ids = torch.randint(0, v, (n, k), generator=g)
        ids[0, 1] = ids[0, 0]  # a repeated id
        q = torch.softmax(torch.randn(n, k, generator=g), -1)
        srs = torch.rand(n, generator=g)
        with torch.cuda.stream(stream):
            got = ops.fused_linear_topk_kl(*(t.cuda() for t in (hidden, weight, bias, ids, q)), None, srs.cuda(), True, 24)
        stream.synchronize()
        want = ops.fused_linear_topk_kl(hidden, weight, bias, ids, q, None, srs, True, 24)
        tol = 1e-4 if dtype == wdtype == torch.float32 else 3e-2
        expect(f"fused_linear_topk_kl {dtype}/{wdtype} on a side stream",
               all(close(a, b, tol * max(1.0, b.abs().max().item())) for a, b in zip(got, want)))


def select_and_quant():
    g = torch.Generator().manual_seed(2)
    for t in (4096, 5000):
        lp = -torch.randint(0, 4, (3, t), generator=g).float()
        labels = torch.randint(0, 9, (3, t), generator=g)
        labels[labels == 0] = -100
        for fraction, skip in ((0.5, 3), (1.0, 0), (0.1, 10**6)):
            got = ops.select_forget_positions(lp.cuda(), labels.cuda(), fraction, skip)
            expect(f"select_forget_positions T={t} fraction={fraction} skip={skip}",
                   torch.equal(got.cpu(), ops.select_forget_positions(lp, labels, fraction, skip)))
    for dtype in (torch.float32, torch.bfloat16):
        for group in (64, 4097):
            base = torch.randn(3 * group + 1, generator=g).to(dtype)
            based = base.cuda()
            for offset in (0, 1):  # 16-byte vectors, then the scalar path (a misaligned view on the GPU)
                x = based[offset:offset + 3 * group].view(3, group)
                got = ops.fake_quantize(x, group, 4, 0, True, 7.5, True)
                want = ops.fake_quantize(base[offset:offset + 3 * group].view(3, group), group, 4, 0, True, 7.5, True)
                expect(f"fake_quantize {dtype} group={group} offset={offset} aligned={x.data_ptr() % 16 == 0}",
                       torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]))


def ssd():
    g = torch.Generator().manual_seed(4)
    shapes = [(0,), (16385,), (3, 5), (40000,)]
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    p = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dts)]
    d = [torch.rand(s, generator=g) for s in shapes]
    f = [(torch.rand(s, generator=g) * 20).to(torch.bfloat16 if i % 2 else torch.float32) for i, s in enumerate(shapes)]
    for e in (1.0, 0.7):
        cpu = [x.clone() for x in p]
        gpu = [x.cuda() for x in p]
        a = ops.ssd_dampen(cpu, d, f, 10.0, 1.0, e, 1.0)
        b = ops.ssd_dampen(gpu, [x.cuda() for x in d], [x.cuda() for x in f], 10.0, 1.0, e, 1.0)
        expect(f"ssd_dampen exponent {e}", all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))
               and torch.equal(a[0], b[0].cpu()) and close(a[1], b[1], 1e-9))
    for acc in (torch.float32, torch.bfloat16):
        cpu = [torch.rand(s, generator=g).to(acc) for s in shapes]
        gpu = [x.cuda() for x in cpu]
        ops.fisher_accumulate(cpu, p, 0.5, 2**33 + 1)
        ops.fisher_accumulate(gpu, [x.cuda() for x in p], 0.5, 2**33 + 1)
        expect(f"fisher_accumulate {acc}", all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu)))


if __name__ == "__main__":
    ssd()
    teacher()
    fused()
    select_and_quant()
    torch.cuda.synchronize()
    lethe.ops.check_errors()
    print(f"{len(failures)} wrong: {failures}" if failures else "all results right")
    sys.exit(1 if failures else 0)
