"""SSD's passes on a GPU (skipped without one): ssd_dampen and fisher_accumulate (fp32 and bf16
accumulators) over the 134M parameters in 104 tensors of bench_ssd.py, on the CUDA kernels and
on the Triton kernels, against the authors' per-parameter eager loops and the bytes the passes
must move over the device's copy bandwidth measured here.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_ssd_cuda.py
"""
import pytest
import torch

from bench_ssd import SHAPES, _authors_dampen
from conftest import cuda_time, write_results
from lethe.ops import fisher_accumulate, ssd_dampen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OUT: dict = {}


def test_ssd_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    p = [torch.randn(s, generator=g, device="cuda") for s in SHAPES]
    d = [torch.rand(s, generator=g, device="cuda") for s in SHAPES]
    f = [torch.rand(s, generator=g, device="cuda") * 0.1 for s in SHAPES]
    for x in f:
        x.view(-1)[::97] *= 1000.0
    n = sum(x.numel() for x in p)
    a = torch.empty(256 * 2**20, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 4 / cuda_time(lambda: b.copy_(a))
    del a, b
    OUT.update(parameters=n, copy_bandwidth_GBps=bw / 1e9)
    imp = [torch.zeros_like(x) for x in p]
    imp16 = [torch.zeros(x.shape, dtype=torch.bfloat16, device="cuda") for x in p]
    for backend in ("native", "triton"):
        ref = [x.clone() for x in p]
        got = [x.clone() for x in p]
        _authors_dampen(ref, d, f)
        ssd_dampen(got, d, f, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(got, ref)), f"{backend}: not the authors' weights"
        OUT[backend] = {
            "dampen_ms": cuda_time(lambda: ssd_dampen(got, d, f, backend=backend)) * 1e3,
            "fisher_fp32_ms": cuda_time(lambda: fisher_accumulate(imp, d, backend=backend)) * 1e3,
            "fisher_bf16_ms": cuda_time(lambda: fisher_accumulate(imp16, d, backend=backend)) * 1e3,
        }
    OUT["authors_dampen_ms"] = cuda_time(lambda: _authors_dampen(p, d, f)) * 1e3

    def loop():
        for i, x in zip(imp, d):
            i.data += x.data.clone().pow(2)
    OUT["authors_fisher_ms"] = cuda_time(loop) * 1e3
    OUT["bounds_ms"] = {"dampen": 16 * n / bw * 1e3, "fisher_fp32": 12 * n / bw * 1e3, "fisher_bf16": 8 * n / bw * 1e3}
    for backend in ("native", "triton"):
        r = OUT[backend]
        print(f"\n{backend}: dampen {r['dampen_ms']:.2f} ms ({r['dampen_ms'] / OUT['bounds_ms']['dampen']:.2f}x of the "
              f"bound, {OUT['authors_dampen_ms'] / r['dampen_ms']:.1f}x faster than the authors' loop); fisher fp32 "
              f"{r['fisher_fp32_ms']:.2f} ms ({r['fisher_fp32_ms'] / OUT['bounds_ms']['fisher_fp32']:.2f}x), bf16 "
              f"{r['fisher_bf16_ms']:.2f} ms ({r['fisher_bf16_ms'] / OUT['bounds_ms']['fisher_bf16']:.2f}x)")
    write_results("ssd_cuda", OUT)
