"""fake_quantize forward + backward on a GPU (skipped without one), preset int4-g128.

A weight-sized tensor, N x N with N from LETHE_BENCH_QUANT_CUDA (default 8192), in the dtype of
LETHE_BENCH_DTYPE (default bfloat16). Variants in one run: lethe's CUDA kernel, its Triton kernel,
the eager composition (round / clamp / STE via detach), torch.compile of it, and the device's copy
bandwidth (y.copy_(x) into a preallocated tensor). GB/s counts the bytes the op must move: read x
and write y (the identity STE's backward moves nothing); the clipped STE also writes the mask
forward, and reads it with the gradient and writes the result backward.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_quant_cuda.py
"""
import os

import pytest
import torch

import lethe
from conftest import cuda_time, write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N = int(os.environ.get("LETHE_BENCH_QUANT_CUDA", "8192"))
DTYPE = getattr(torch, os.environ.get("LETHE_BENCH_DTYPE", "bfloat16"))
GROUP = 128
TIMES: dict = {}


def eager_int4_g128(x):
    # What a user writes: symmetric groups of 128, torchao's absmax/7.5, codes in [-8, 7], in fp32;
    # the STE as q + (x - x.detach()), exact in bf16 too (x + (q - x).detach() would round twice)
    xg = x.view(-1, GROUP).float()
    scale = xg.abs().amax(dim=1, keepdim=True) / 7.5
    q = torch.clamp(torch.round(xg * (1.0 / scale)), -8, 7) * scale
    return q.to(x.dtype).view_as(x).detach() + (x - x.detach())


compiled_int4_g128 = torch.compile(eager_int4_g128)

VARIANTS = {
    "lethe-cuda": lambda x: lethe.fake_quantize(x, "int4-g128", backend="native"),
    "lethe-triton": lambda x: lethe.fake_quantize(x, "int4-g128", backend="triton"),
    "eager": eager_int4_g128,
    "torch.compile": compiled_int4_g128,
}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, N, generator=g, device="cuda").to(DTYPE).requires_grad_(True)
    return x, torch.randn(N, N, generator=g, device="cuda").to(DTYPE)


@pytest.mark.parametrize("impl", list(VARIANTS))
def test_variant(impl, data):
    x, gy = data
    fn = VARIANTS[impl]
    TIMES[impl] = cuda_time(lambda: torch.autograd.grad(fn(x), x, gy), reps=20)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_clipped_ste(backend, data):
    x, gy = data
    TIMES[f"lethe-{backend}/clipped"] = cuda_time(
        lambda: torch.autograd.grad(lethe.fake_quantize(x, "int4-g128", ste="clipped", backend=backend), x, gy),
        reps=20)


def test_same_quantiser(data):
    # the anchors compute the same thing (up to ties that x * (1/scale) rounds differently)
    x, _ = data
    with torch.no_grad():
        a = VARIANTS["lethe-cuda"](x)
        for other in ("lethe-triton", "eager"):
            assert (a != VARIANTS[other](x)).float().mean().item() < 1e-4, other


def test_copy_bandwidth(data):
    x, _ = data
    src, dst = x.detach().clone(), torch.empty_like(x)
    TIMES["copy"] = cuda_time(lambda: dst.copy_(src), reps=20)


def test_report():
    assert {"lethe-cuda", "eager", "copy"} <= set(TIMES), "run the whole file"
    esz = torch.finfo(DTYPE).bits // 8
    nbytes = {k: N * N * (2 * esz + (1 + 1 + 2 * esz if k.endswith("clipped") else 0)) for k in TIMES}
    t = TIMES
    report = {
        "shape": [N, N], "dtype": str(DTYPE), "preset": "int4-g128", "device": torch.cuda.get_device_name(),
        "median_ms": {k: v * 1e3 for k, v in t.items()},
        "GBps": {k: nbytes[k] / v / 1e9 for k, v in t.items()},
        "speedup_vs_eager": t["eager"] / t["lethe-cuda"],
        "speedup_vs_compile": t.get("torch.compile", float("nan")) / t["lethe-cuda"],
        "fraction_of_copy_bandwidth": {k: (nbytes[k] / v) / (nbytes["copy"] / t["copy"])
                                       for k, v in t.items() if k != "copy"},
    }
    path = write_results("quant_cuda", report)
    print(f"\nfake_quantize fwd+bwd {N}x{N} {DTYPE} int4-g128 on {report['device']} (medians, ms): "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()))
    print(f"  lethe-cuda: {report['speedup_vs_eager']:.1f}x eager, {report['speedup_vs_compile']:.2f}x "
          "torch.compile; share of copy bandwidth: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in report["fraction_of_copy_bandwidth"].items())
          + f"; written to {path}")
