"""fake_quantize forward + backward, 4096 x 4096 fp32, preset int4-g128, CPU.

Anchors in the same run: the eager composition (round / clamp / STE via detach), torch.compile of
it, and the copy bandwidth of this machine (y.copy_(x) into a preallocated tensor). GB/s counts
the bytes the op must move: read x and write y (4 + 4 bytes an element); the identity STE's
backward moves nothing.

    make bench            or    .venv/bin/python -m pytest benchmarks/bench_quant.py --benchmark-only
"""
import pytest
import torch

import lethe
from conftest import write_results

N = 4096
GROUP = 128
TIMES: dict = {}


def eager_int4_g128(x):
    # What a user writes: symmetric groups of 128, torchao's absmax/7.5, codes in [-8, 7].
    xg = x.view(-1, GROUP)
    scale = xg.abs().amax(dim=1, keepdim=True) / 7.5
    q = torch.clamp(torch.round(xg * (1.0 / scale)), -8, 7) * scale
    return (xg + (q - xg).detach()).view_as(x)


compiled_int4_g128 = torch.compile(eager_int4_g128)


def lethe_int4_g128(x):
    return lethe.fake_quantize(x, "int4-g128")


IMPLS = {"lethe": lethe_int4_g128, "eager": eager_int4_g128, "torch.compile": compiled_int4_g128}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return torch.randn(N, N, requires_grad=True), torch.randn(N, N)


def _median(benchmark):
    return benchmark.stats.stats.median


@pytest.mark.parametrize("impl", list(IMPLS))
def test_fake_quantize_fwd_bwd(benchmark, impl, data):
    x, gy = data
    fn = IMPLS[impl]

    def step():
        y = fn(x)
        return torch.autograd.grad(y, x, gy)[0]

    g = benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    assert torch.equal(g, gy)  # identity straight-through gradient
    TIMES[impl] = _median(benchmark)


@pytest.mark.parametrize("preset,ste", [("paper-int4", "identity"), ("int4-g128-asym", "identity"),
                                        ("nf4-b64", "identity"), ("int8", "identity"),
                                        ("int4-g128", "clipped")])
def test_fake_quantize_presets(benchmark, preset, ste, data):
    # lethe alone, against the copy bandwidth: clipped also writes and reads a bool mask.
    x, gy = data

    def step():
        y = lethe.fake_quantize(x, preset, ste=ste)
        return torch.autograd.grad(y, x, gy)[0]

    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    TIMES[f"{preset}/{ste}"] = _median(benchmark)


def test_same_quantiser(data):
    # The anchors compute the same thing (up to ties that x * (1/scale) rounds differently).
    x, _ = data
    with torch.no_grad():
        a, b = lethe_int4_g128(x), eager_int4_g128(x)
    assert (a != b).float().mean().item() < 1e-5


def test_copy_bandwidth(benchmark, data):
    x, _ = data
    src, dst = x.detach().clone(), torch.empty_like(x)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=10, warmup_rounds=2, iterations=1)
    TIMES["copy"] = _median(benchmark)


def test_report():
    assert {"lethe", "eager", "torch.compile", "copy"} <= set(TIMES), "run the whole file"
    nbytes = N * N * 4 * 2
    t = {k: v for k, v in TIMES.items() if "/" not in k}
    presets = {k: v for k, v in TIMES.items() if "/" in k}
    report = {
        "shape": [N, N], "preset": "int4-g128", "dtype": "float32",
        "median_ms": {k: v * 1e3 for k, v in t.items()},
        "speedup_vs_eager": t["eager"] / t["lethe"],
        "speedup_vs_compile": t["torch.compile"] / t["lethe"],
        "lethe_GBps": nbytes / t["lethe"] / 1e9,
        "copy_GBps": nbytes / t["copy"] / 1e9,
        "fraction_of_copy_bandwidth": t["copy"] / t["lethe"],
        # bytes: x read, y written; clipped adds the mask written forward and read backward, and
        # the gradient read and written backward
        "presets_median_ms": {k: v * 1e3 for k, v in presets.items()},
        "presets_fraction_of_copy": {
            k: (t["copy"] / v) * ((4 + 4 + 1 + 1 + 4 + 4) / 8 if k.endswith("clipped") else 1.0)
            for k, v in presets.items()
        },
    }
    path = write_results("quant_cpu", report)
    print(f"\nfake_quantize fwd+bwd {N}x{N} fp32 int4-g128 (medians, ms): "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items()))
    print(f"  {report['speedup_vs_eager']:.1f}x eager, {report['speedup_vs_compile']:.2f}x torch.compile, "
          f"{report['lethe_GBps']:.1f} GB/s = {100 * report['fraction_of_copy_bandwidth']:.0f}% of copy "
          f"({report['copy_GBps']:.1f} GB/s); written to {path}")
    for k, v in presets.items():
        print(f"  {k}: {v * 1e3:.1f} ms, {100 * report['presets_fraction_of_copy'][k]:.0f}% of copy bandwidth")
