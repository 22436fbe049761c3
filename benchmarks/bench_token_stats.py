"""The evaluation's per-token statistics fused with the LM head (lethe.ops.token_stats), CPU fp32.

N=4096 tokens, H=1024, V=32000 and V=128000 (override with LETHE_BENCH_TOKEN_STATS="N,H" and
LETHE_BENCH_TOKEN_STATS_V="32000,128000"). Anchors in one run, per V: the eager composition a user
writes under torch.no_grad() (logits, log_softmax, gather, logsumexp, the two moments of log p
under p, argmax), torch.compile of it (inductor), and the machine's fp32 matmul throughput on the
one product every variant must do (z = h W^T into a preallocated [N, V] output, 2 N H V flops).
Peak extra memory of each variant is measured in a fresh subprocess (VmHWM, the peak RSS, minus the
RSS once the inputs exist; torch.compile's variant is compiled first and its peak reset, so that
the compiler's own memory is not counted).

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" -p no:cacheprovider benchmarks/bench_token_stats.py
"""
import os
import subprocess
import sys

import pytest
import torch

import lethe
from conftest import write_results

N, H = (int(v) for v in os.environ.get("LETHE_BENCH_TOKEN_STATS", "4096,1024").split(","))
VOCABS = [int(v) for v in os.environ.get("LETHE_BENCH_TOKEN_STATS_V", "32000,128000").split(",")]
TIMES: dict = {}
PEAKS: dict = {}


def make_inputs(v, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(v, H, generator=g) / H**0.5
    labels = torch.randint(0, v, (N,), generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def eager_stats(hidden, weight, labels):
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    label_lp = torch.gather(logp, 1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    lse = torch.logsumexp(logits, dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]) ** 2).sum(-1)
    return label_lp, lse, mu, var, logits.argmax(-1)


compiled_stats = torch.compile(eager_stats)


def lethe_stats(hidden, weight, labels):
    return tuple(lethe.ops.token_stats(hidden, weight, labels))  # default chunk


VARIANTS = {"lethe": lethe_stats, "eager": eager_stats, "torch.compile": compiled_stats}


def run_variant(name, *inputs):
    with torch.no_grad():
        return VARIANTS[name](*inputs)


@pytest.fixture(scope="module", params=VOCABS, ids=lambda v: f"V{v}")
def inputs(request):
    return request.param, make_inputs(request.param)


@pytest.mark.parametrize("impl", list(VARIANTS))
def test_token_stats(benchmark, impl, inputs):
    v, args = inputs
    benchmark.pedantic(lambda: run_variant(impl, *args), rounds=3, warmup_rounds=1, iterations=1)
    TIMES[f"{impl}/V{v}"] = benchmark.stats.stats.median


def test_matmul_limit(benchmark, inputs):
    v, (hidden, weight, _) = inputs
    z = torch.empty(N, v)  # preallocated: a fresh one would page-fault, which is not the matmul limit
    benchmark.pedantic(lambda: torch.mm(hidden, weight.t(), out=z), rounds=3, warmup_rounds=1, iterations=1)
    TIMES[f"matmul/V{v}"] = benchmark.stats.stats.median


def test_same_results(inputs):
    _, args = inputs
    a = run_variant("lethe", *args)
    b = run_variant("eager", *args)
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert (a[4] == b[4]).float().mean() > 0.999  # (the GEMMs differ: a near tie may flip)


_PEAK_CODE = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_token_stats as B
from conftest import peak_rss, reset_peak_rss, rss
inputs = B.make_inputs({v})
if {name!r} == "torch.compile":
    B.run_variant({name!r}, *inputs)  # compile first: the compiler's memory is not the op's
    reset_peak_rss()
base = rss()
B.run_variant({name!r}, *inputs)
print((peak_rss() - base) / 2**30)
"""


@pytest.mark.parametrize("impl", list(VARIANTS))
@pytest.mark.parametrize("v", VOCABS, ids=lambda v: f"V{v}")
def test_peak_memory(impl, v):
    code = _PEAK_CODE.format(bench_dir=os.path.dirname(__file__), name=impl, v=v)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    PEAKS[f"{impl}/V{v}"] = float(r.stdout.strip().splitlines()[-1])


def test_report():
    assert all(f"{k}/V{v}" in TIMES for k in ("lethe", "eager", "matmul") for v in VOCABS), "run the whole file"
    t, report = TIMES, {"shape": {"N": N, "H": H, "V": VOCABS}, "chunk": {v: lethe.ops.shred.default_chunk(v)
                                                                         for v in VOCABS},
                        "median_s": TIMES, "peak_extra_GiB": PEAKS}
    for v in VOCABS:
        flops = 2 * N * H * v
        lt, et, ct, mt = (t.get(f"{k}/V{v}", float("nan")) for k in ("lethe", "eager", "torch.compile", "matmul"))
        lp, ep, cp = (PEAKS.get(f"{k}/V{v}", float("nan")) for k in ("lethe", "eager", "torch.compile"))
        report[f"V{v}"] = {
            "GFLOPs": {"lethe": flops / lt / 1e9, "eager": flops / et / 1e9, "torch.compile": flops / ct / 1e9,
                       "matmul": flops / mt / 1e9},
            "speedup_vs_eager": et / lt, "speedup_vs_compile": ct / lt, "fraction_of_matmul": mt / lt,
            "peak_vs_eager": lp / ep, "peak_vs_compile": lp / cp,
        }
        r = report[f"V{v}"]
        print(f"\ntoken_stats N={N} H={H} V={v} (medians, s): lethe {lt:.3f}, eager {et:.3f}, torch.compile {ct:.3f}, "
              f"matmul alone {mt:.3f}")
        print(f"  {r['speedup_vs_eager']:.2f}x eager, {r['speedup_vs_compile']:.2f}x torch.compile, "
              f"{r['GFLOPs']['lethe']:.0f} GFLOP/s = {100 * r['fraction_of_matmul']:.0f}% of the matmul "
              f"({r['GFLOPs']['matmul']:.0f} GFLOP/s)")
        print(f"  peak extra memory (GiB): lethe {lp:.3f}, eager {ep:.2f}, torch.compile {cp:.2f}: lethe at "
              f"{100 * r['peak_vs_eager']:.1f}% of eager's, {100 * r['peak_vs_compile']:.1f}% of torch.compile's")
    print(f"  written to {write_results('token_stats_cpu', report)}")
