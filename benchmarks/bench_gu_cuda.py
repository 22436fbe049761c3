"""GU's retain subspace on a GPU (skipped without one): the projection of one update and the
add of one direction (CGS2) to a basis of k - 1, over d parameters as 1 tensor and as 100
(LETHE_BENCH_GU_CUDA="d,k", default 67108864,8: 64M fp32 parameters). Variants in one run: the
subspace on the CUDA kernels, on the Triton kernels, and the eager code a user writes (the two
matmuls of a projection; torch.linalg.qr for an add); the limit: the bytes the passes stream over
the device's copy bandwidth measured here.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" benchmarks/bench_gu_cuda.py
"""
import os

import pytest
import torch

from conftest import cuda_time, write_results
from lethe import RetainSubspace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D, K = (int(v) for v in os.environ.get("LETHE_BENCH_GU_CUDA", f"{64 * 2**20},8").split(","))
LAYOUTS = {"1 tensor": [D], "100 tensors": [D // 100] * 99 + [D - 99 * (D // 100)]}
TIMES: dict = {}


def _subspace(sizes, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.zeros(n, device="cuda") for n in sizes]
    rs = RetainSubspace(params, rank=K, scope="group", when_full="freeze", backend=backend)
    for _ in range(K - 1):
        rs.add([torch.randn(n, generator=g, device="cuda") for n in sizes])
    return rs, [torch.randn(n, generator=g, device="cuda") for n in sizes]


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_subspace(layout, backend):
    sizes = LAYOUTS[layout]
    rs, g = _subspace(sizes, backend)
    count = list(rs.count)

    def add():
        rs.count = list(count)
        rs.add(g)
    TIMES[f"add/{layout}/{backend}"] = cuda_time(add)
    upd = [x.clone() for x in g]
    TIMES[f"project/{layout}/{backend}"] = cuda_time(lambda: rs.project(upd))
    if backend == "native":
        q = torch.cat([rs.basis(i) for i in range(len(sizes))], 1).T.contiguous()
        flat = torch.cat(g)
        TIMES[f"project/{layout}/eager"] = cuda_time(lambda: flat - q @ (q.T @ flat))
        TIMES[f"add/{layout}/eager"] = cuda_time(lambda: torch.linalg.qr(q), reps=3)
    del rs
    torch.cuda.empty_cache()


def test_report():
    a = torch.empty(D, device="cuda")
    b = torch.empty_like(a)
    copy_s = cuda_time(lambda: b.copy_(a))
    bw = 2 * 4 * D / copy_s
    del a, b
    bounds = {"project": ((K + 1) + (K + 2)) * 4 * D / bw, "add": ((K - 1 + 1) + 2 * (K - 1 + 2)) * 4 * D / bw}
    report = {"d": D, "k": K, "device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9,
              "median_ms": {k: v * 1e3 for k, v in TIMES.items()},
              "fraction_of_copy_bandwidth": {k: bounds[k.split("/")[0]] / v for k, v in TIMES.items()
                                             if not k.endswith("eager")},
              "speedup_vs_eager": {k: TIMES[k.rsplit("/", 1)[0] + "/eager"] / v for k, v in TIMES.items()
                                   if not k.endswith("eager") and k.rsplit("/", 1)[0] + "/eager" in TIMES}}
    path = write_results("gu_cuda", report)
    print(f"\ngu on {report['device']}, d={D} k={K}, copy {bw / 1e9:.0f} GB/s: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in TIMES.items()) + f"; written to {path}")
