"""The evaluation's per-token statistics fused with the LM head on a GPU (skipped without one).

N tokens and H from LETHE_BENCH_TOKEN_STATS_CUDA="N,H,V" (default 8192,4096,128256: a Llama-3 head),
dtype from LETHE_BENCH_DTYPE (bfloat16). Variants in one run, under torch.no_grad(): lethe's CUDA
kernel, its Triton kernel, the eager composition (logits, log_softmax, gather, logsumexp, the two
moments, argmax, in fp32 from the dtype's logits), torch.compile of it, and the GEMM alone
(z = h W^T in the dtype: the matmul limit, 2 N H V flops). Peak memory: CUDA allocator peak above
the inputs, per variant.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_token_stats_cuda.py
"""
import os

import pytest
import torch

import lethe
from conftest import cuda_time, write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, H, V = (int(v) for v in os.environ.get("LETHE_BENCH_TOKEN_STATS_CUDA", "8192,4096,128256").split(","))
DTYPE = getattr(torch, os.environ.get("LETHE_BENCH_DTYPE", "bfloat16"))
TIMES: dict = {}
PEAKS: dict = {}


def make_inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device="cuda").to(DTYPE)
    weight = (torch.randn(V, H, generator=g, device="cuda") / H**0.5).to(DTYPE)
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    labels[::7] = -100
    return hidden, weight, labels


def eager_stats(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    label_lp = torch.gather(logp, 1, labels.clamp(min=0)[:, None]).squeeze(1) * (labels != -100)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]) ** 2).sum(-1)
    return label_lp, torch.logsumexp(logits, -1), mu, var, logits.argmax(-1)


compiled_stats = torch.compile(eager_stats)

VARIANTS = {
    "lethe-cuda": lambda *a: lethe.ops.token_stats(*a, backend="native"),
    "lethe-triton": lambda *a: lethe.ops.token_stats(*a, backend="triton"),
    "eager": eager_stats,
    "torch.compile": compiled_stats,
}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.parametrize("impl", list(VARIANTS))
def test_variant(impl, inputs):
    fn = VARIANTS[impl]

    def run():
        with torch.no_grad():
            return fn(*inputs)

    try:
        TIMES[impl] = cuda_time(run)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        PEAKS[impl] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        TIMES[impl], PEAKS[impl] = float("nan"), float("nan")
    finally:
        torch.cuda.empty_cache()


def test_same_results(inputs):
    with torch.no_grad():
        a = lethe.ops.token_stats(*inputs, backend="native")
        b = lethe.ops.token_stats(*inputs, backend="triton")
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)


def test_matmul_limit(inputs):
    hidden, weight, _ = inputs
    z = torch.empty(N, V, device="cuda", dtype=DTYPE)
    TIMES["matmul"] = cuda_time(lambda: torch.mm(hidden, weight.t(), out=z))
    del z


def test_report():
    assert {"lethe-cuda", "eager", "matmul"} <= set(TIMES), "run the whole file"
    flops = 2 * N * H * V
    t = TIMES
    report = {
        "shape": {"N": N, "H": H, "V": V}, "dtype": str(DTYPE), "device": torch.cuda.get_device_name(),
        "median_s": t, "TFLOPs": {k: flops / v / 1e12 for k, v in t.items()}, "peak_extra_GiB": PEAKS,
        "speedup_vs_eager": t["eager"] / t["lethe-cuda"],
        "speedup_vs_compile": t.get("torch.compile", float("nan")) / t["lethe-cuda"],
        "fraction_of_matmul": t["matmul"] / t["lethe-cuda"],
    }
    path = write_results("token_stats_cuda", report)
    print(f"\ntoken_stats on {report['device']}, N={N} H={H} V={V} {DTYPE}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({report['TFLOPs'][k]:.0f} TFLOP/s)" for k, v in t.items()))
    print(f"  lethe-cuda: {report['speedup_vs_eager']:.2f}x eager, {report['speedup_vs_compile']:.2f}x "
          f"torch.compile, {100 * report['fraction_of_matmul']:.0f}% of the matmul; peak extra GiB: "
          + ", ".join(f"{k} {v:.2f}" for k, v in PEAKS.items()) + f"; written to {path}")
