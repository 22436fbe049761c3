"""SHRED's demoted top-K KL fused with the LM head, loss + backward, CPU fp32.

N=4096 tokens, H=1024, V=32000, K=64 (override with LETHE_BENCH_SHRED="N,H,V,K"). Anchors in one
run: the eager composition (logits, log_softmax, gather, KL, backward), torch.compile of it, a
chunked pure-PyTorch version that computes the gradients in the forward pass (the approach of
Liger-Kernel's chunked losses), and the machine's fp32 matmul throughput on the same three
products (6*N*H*V flops). Peak extra memory of each variant is measured in a fresh subprocess
(VmHWM, the peak RSS, minus the RSS after the inputs exist; torch.compile's variant is compiled
first and its peak reset, so that the compiler's own memory is not counted). Also: the teacher
pass against logits + log_softmax + torch.topk. A frozen head (LoRA: only grad_hidden) is timed
for lethe and eager.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_shred.py
"""
import os
import subprocess
import time
import sys

import pytest
import torch

import lethe
from conftest import write_results

N, H, V, K = (int(v) for v in os.environ.get("LETHE_BENCH_SHRED", "4096,1024,32000,64").split(","))
CHUNK = lethe.ops.shred.default_chunk(V)  # the same chunk for lethe and the chunked anchor
TIMES: dict = {}
PEAKS: dict = {}


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    # K distinct ids per row, one in each of K strides of the vocabulary (no [N, V] temporary)
    ids = torch.arange(K) * (V // K) + torch.randint(0, V // K, (N, K), generator=g)
    probs = torch.softmax(torch.randn(N, K, generator=g), -1)
    return hidden, weight, ids, probs


def eager_loss(hidden, weight, ids, probs):
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    kl = (probs * (probs.log() - torch.gather(logp, 1, ids))).sum(-1)
    return kl.mean()


def eager_loss_logits_kept(hidden, weight, ids, probs):
    # as with a Hugging Face model, whose output keeps .logits alive through the backward pass
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, dim=-1)
    kl = (probs * (probs.log() - torch.gather(logp, 1, ids))).sum(-1)
    return kl.mean(), logits


class _ChunkedKL(torch.autograd.Function):
    """What a careful user writes without a kernel: per chunk, logits, softmax, loss, and the
    gradients, computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, probs):
        n = hidden.shape[0]
        gh = torch.empty_like(hidden)
        gw = torch.zeros_like(weight)
        total = hidden.new_zeros(())
        for s in range(0, n, CHUNK):
            h = hidden[s:s + CHUNK]
            z = h @ weight.t()
            lse = torch.logsumexp(z, -1, keepdim=True)
            q, i = probs[s:s + CHUNK], ids[s:s + CHUNK]
            total += (q * (q.log() - (torch.gather(z, 1, i) - lse))).sum()
            gz = torch.exp(z - lse).mul_(q.sum(-1, keepdim=True)).scatter_add_(1, i, -q).div_(n)
            torch.mm(gz, weight, out=gh[s:s + CHUNK])
            gw.addmm_(gz.t(), h)
        ctx.save_for_backward(gh, gw)
        return total / n

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return gh * g, gw * g, None, None


def chunked_loss(hidden, weight, ids, probs):
    return _ChunkedKL.apply(hidden, weight, ids, probs)


def lethe_loss(hidden, weight, ids, probs):
    return lethe.ops.fused_linear_topk_kl(hidden, weight, ids, probs)  # default chunk


def matmuls(hidden, weight, out):
    # the three products every variant must do, z = h W^T, dh = dz W, dW = dz^T h, into
    # preallocated outputs (fresh ones would page-fault, which is not the matmul limit)
    z, gh, gw = out
    h, w = hidden.detach(), weight.detach()
    torch.mm(h, w.t(), out=z)
    torch.mm(z, w, out=gh)
    torch.mm(z.t(), h, out=gw)


compiled_loss = torch.compile(eager_loss)

VARIANTS = {"lethe": lethe_loss, "eager": eager_loss, "eager (logits kept)": eager_loss_logits_kept,
            "torch.compile": compiled_loss, "chunked": chunked_loss}
# a frozen LM head (LoRA): only grad_hidden is wanted, 4*N*H*V flops
FROZEN = {"lethe (frozen head)": lethe_loss, "eager (frozen head)": eager_loss}


def step(fn, hidden, weight, ids, probs, train_weight=True):
    h = hidden.requires_grad_(True)
    w = weight.detach().requires_grad_(train_weight)
    out = fn(h, w, ids, probs)
    loss = out[0] if isinstance(out, tuple) else out  # the rest (logits) stays alive until return
    return torch.autograd.grad(loss, (h, w) if train_weight else (h,))


def run_variant(name, *inputs):
    if name in FROZEN:
        return step(FROZEN[name], *inputs, train_weight=False)
    return step(VARIANTS[name], *inputs)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.parametrize("impl", list(VARIANTS) + list(FROZEN))
def test_loss_and_backward(benchmark, impl, inputs):
    benchmark.pedantic(lambda: run_variant(impl, *inputs), rounds=3, warmup_rounds=1, iterations=1)
    TIMES[impl] = benchmark.stats.stats.median


def test_matmul_limit(benchmark, inputs):
    out = (torch.empty(N, V), torch.empty(N, H), torch.empty(V, H))
    benchmark.pedantic(lambda: matmuls(inputs[0], inputs[1], out), rounds=3, warmup_rounds=1, iterations=1)
    TIMES["matmuls"] = benchmark.stats.stats.median


def test_same_gradients(inputs):
    a = step(lethe_loss, *inputs)
    b = step(chunked_loss, *inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)
    (c,) = run_variant("lethe (frozen head)", *inputs)
    torch.testing.assert_close(c, a[0], rtol=0, atol=0)


def test_teacher_pass(benchmark, inputs):
    hidden, weight, _, _ = inputs
    labels = torch.randint(0, V, (N,))

    def eager_teacher():
        logp = torch.log_softmax(hidden @ weight.t(), -1)
        top = torch.topk(logp, K, dim=-1)
        return top.indices, top.values, torch.gather(logp, 1, labels[:, None])

    benchmark.pedantic(eager_teacher, rounds=3, warmup_rounds=1, iterations=1)
    TIMES["teacher/eager"] = benchmark.stats.stats.median
    # lethe's teacher pass timed the same way: one warm-up, the median of three
    lethe.ops.teacher_topk(hidden, weight, labels, K)
    runs = []
    for _ in range(3):
        s = time.perf_counter()
        lethe.ops.teacher_topk(hidden, weight, labels, K)
        runs.append(time.perf_counter() - s)
    TIMES["teacher/lethe"] = sorted(runs)[1]


_PEAK_CODE = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_shred as B
from conftest import peak_rss, reset_peak_rss, rss
inputs = B.make_inputs()
if {name!r} == "torch.compile":
    B.run_variant({name!r}, *inputs)  # compile first: the compiler's memory is not the loss's
    reset_peak_rss()
base = rss()
B.run_variant({name!r}, *inputs)
print((peak_rss() - base) / 2**30)
"""


@pytest.mark.parametrize("impl", list(VARIANTS) + list(FROZEN))
def test_peak_memory(impl):
    code = _PEAK_CODE.format(bench_dir=os.path.dirname(__file__), name=impl)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    PEAKS[impl] = float(r.stdout.strip().splitlines()[-1])


def test_report():
    assert {"lethe", "eager", "chunked", "matmuls"} <= set(TIMES), "run the whole file"
    flops = 6 * N * H * V
    t = TIMES
    report = {
        "shape": {"N": N, "H": H, "V": V, "K": K}, "chunk": CHUNK,
        "median_s": t,
        "GFLOPs": {k: (flops * 2 / 3 if k in FROZEN else flops) / v / 1e9 for k, v in t.items() if "/" not in k},
        "speedup_vs_eager": t["eager"] / t["lethe"],
        "speedup_vs_chunked": t["chunked"] / t["lethe"],
        "speedup_vs_compile": t.get("torch.compile", float("nan")) / t["lethe"],
        "fraction_of_matmul": t["matmuls"] / t["lethe"],
        "peak_extra_GiB": PEAKS,
        # grad_weight and grad_hidden (fp32) are outputs every variant must hold
        "gradient_outputs_GiB": (V * H + N * H) * 4 / 2**30,
        # peak memory beside inputs and outputs (working memory), and the ratios both ways
        "working_GiB": {k: v - (N * H + (0 if k in FROZEN else V * H)) * 4 / 2**30 for k, v in PEAKS.items()},
        "teacher_speedup_vs_eager": t.get("teacher/eager", 0) / t.get("teacher/lethe", 1),
    }
    fl, fe = t.get("lethe (frozen head)"), t.get("eager (frozen head)")
    if fl and fe:
        report["frozen_head"] = {"speedup_vs_eager": fe / fl, "time_vs_trained_head": fl / t["lethe"]}
    path = write_results("shred_cpu", report)
    print(f"\nfused top-K KL loss+backward N={N} H={H} V={V} K={K} (medians, s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"  {report['speedup_vs_eager']:.2f}x eager, {report['speedup_vs_compile']:.2f}x torch.compile, "
          f"{report['speedup_vs_chunked']:.2f}x chunked, "
          f"{report['GFLOPs']['lethe']:.0f} GFLOP/s = {100 * report['fraction_of_matmul']:.0f}% of the matmuls "
          f"({report['GFLOPs']['matmuls']:.0f} GFLOP/s)")
    print("  peak extra memory (GiB, incl. the gradients' own "
          f"{report['gradient_outputs_GiB']:.2f}): " + ", ".join(f"{k} {v:.2f}" for k, v in PEAKS.items())
          + f"; teacher pass {report['teacher_speedup_vs_eager']:.2f}x eager; written to {path}")
    if "frozen_head" in report:
        fh = report["frozen_head"]
        print(f"  frozen head: lethe {fh['speedup_vs_eager']:.2f}x eager (frozen), "
              f"{100 * fh['time_vs_trained_head']:.0f}% of lethe's time with the head trained, "
              f"{report['GFLOPs']['lethe (frozen head)']:.0f} GFLOP/s counting 4*N*H*V")
    if {"lethe (frozen head)", "eager (frozen head)"} <= set(PEAKS):
        pl, pe = PEAKS["lethe (frozen head)"], PEAKS["eager (frozen head)"]
        print(f"  frozen head peak extra memory: lethe {pl:.3f} GiB, eager {pe:.2f} GiB ({100 * pl / pe:.1f}%)")
    if {"lethe", "eager", "chunked"} <= set(PEAKS):
        wk = report["working_GiB"]
        kept = PEAKS.get("eager (logits kept)", float("nan"))
        print(f"  lethe's peak: {100 * PEAKS['lethe'] / PEAKS['eager']:.1f}% of eager's "
              f"({100 * PEAKS['lethe'] / kept:.1f}% with the logits kept), "
              f"{100 * PEAKS['lethe'] / PEAKS['chunked']:.0f}% of chunked's; working memory (peak minus "
              f"the gradient outputs): {100 * wk['lethe'] / wk['eager']:.1f}% of eager's, "
              f"{100 * wk['lethe'] / wk['chunked']:.0f}% of chunked's")
