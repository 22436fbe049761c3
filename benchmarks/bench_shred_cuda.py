"""SHRED's demoted top-K KL fused with the LM head on a GPU, loss + backward (skipped without one).

N tokens, H, V, K from LETHE_BENCH_SHRED_CUDA="N,H,V,K" (default 8192,4096,128256,64: a Llama-3
head), dtype from LETHE_BENCH_DTYPE (bfloat16). Variants in one run: lethe's CUDA kernel, its
Triton kernel, the eager composition, torch.compile of it, and the three GEMMs alone (z = h W^T,
dh = dz W, dW = dz^T h in the same dtype: the matmul limit, 6 N H V flops); and, for a frozen head
(LoRA: only grad_hidden, 4 N H V flops), lethe's CUDA kernel and eager. Peak memory: CUDA allocator
peak above the inputs, per variant.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_shred_cuda.py
"""
import os

import pytest
import torch

import lethe
from conftest import cuda_time, write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, H, V, K = (int(v) for v in os.environ.get("LETHE_BENCH_SHRED_CUDA", "8192,4096,128256,64").split(","))
DTYPE = getattr(torch, os.environ.get("LETHE_BENCH_DTYPE", "bfloat16"))
TIMES: dict = {}
PEAKS: dict = {}


def make_inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device="cuda").to(DTYPE)
    weight = (torch.randn(V, H, generator=g, device="cuda") / H**0.5).to(DTYPE)
    ids = torch.arange(K, device="cuda") * (V // K) + torch.randint(0, V // K, (N, K), generator=g, device="cuda")
    probs = torch.softmax(torch.randn(N, K, generator=g, device="cuda"), -1)
    return hidden, weight, ids, probs


def eager_loss(hidden, weight, ids, probs):
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    kl = (probs * (probs.log() - torch.gather(logp, 1, ids))).sum(-1)
    return kl.mean()


compiled_loss = torch.compile(eager_loss)

VARIANTS = {
    "lethe-cuda": lambda *a: lethe.ops.fused_linear_topk_kl(*a, backend="native"),
    "lethe-triton": lambda *a: lethe.ops.fused_linear_topk_kl(*a, backend="triton"),
    "eager": eager_loss,
    "torch.compile": compiled_loss,
}
FROZEN = {"lethe-cuda (frozen head)": VARIANTS["lethe-cuda"], "eager (frozen head)": eager_loss}


def step(fn, hidden, weight, ids, probs, train_weight=True):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(train_weight)
    return torch.autograd.grad(fn(h, w, ids, probs), (h, w) if train_weight else (h,))


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.parametrize("impl", list(VARIANTS) + list(FROZEN))
def test_variant(impl, inputs):
    fn, train = (FROZEN[impl], False) if impl in FROZEN else (VARIANTS[impl], True)
    try:
        TIMES[impl] = cuda_time(lambda: step(fn, *inputs, train_weight=train))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, *inputs, train_weight=train)
        torch.cuda.synchronize()
        PEAKS[impl] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        TIMES[impl], PEAKS[impl] = float("nan"), float("nan")
    finally:
        torch.cuda.empty_cache()


def test_matmul_limit(inputs):
    hidden, weight, _, _ = inputs
    z, gh, gw = torch.empty(N, V, device="cuda", dtype=DTYPE), torch.empty_like(hidden), torch.empty_like(weight)

    def mm3():
        torch.mm(hidden, weight.t(), out=z)
        torch.mm(z, weight, out=gh)
        torch.mm(z.t(), hidden, out=gw)

    TIMES["matmuls"] = cuda_time(mm3)
    del z


def test_report():
    assert {"lethe-cuda", "eager", "matmuls"} <= set(TIMES), "run the whole file"
    flops = 6 * N * H * V
    t = TIMES
    report = {
        "shape": {"N": N, "H": H, "V": V, "K": K}, "dtype": str(DTYPE), "device": torch.cuda.get_device_name(),
        "median_s": t, "TFLOPs": {k: (flops * 2 / 3 if k in FROZEN else flops) / v / 1e12 for k, v in t.items()}, "peak_extra_GiB": PEAKS,
        "speedup_vs_eager": t["eager"] / t["lethe-cuda"],
        "speedup_vs_compile": t.get("torch.compile", float("nan")) / t["lethe-cuda"],
        "fraction_of_matmul": t["matmuls"] / t["lethe-cuda"],
    }
    path = write_results("shred_cuda", report)
    print(f"\nfused top-K KL loss+backward on {report['device']}, N={N} H={H} V={V} K={K} {DTYPE}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({report['TFLOPs'][k]:.0f} TFLOP/s)" for k, v in t.items()))
    print(f"  lethe-cuda: {report['speedup_vs_eager']:.2f}x eager, {report['speedup_vs_compile']:.2f}x "
          f"torch.compile, {100 * report['fraction_of_matmul']:.0f}% of the matmuls; peak extra GiB: "
          + ", ".join(f"{k} {v:.2f}" for k, v in PEAKS.items()) + f"; written to {path}")
