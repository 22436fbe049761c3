"""SSD's passes (the ssd ops), CPU fp32, on 134M parameters in 104 tensors (a 12-layer,
width-768 decoder's shapes: per layer q, k, v, o, gate, up, down and a norm; the embedding, the
head, the final norm and 5 biases):
  * dampening (ssd_dampen, about 1% of the weights selected) against the per-parameter eager loop
    of the authors' formulation (their modify_weight: where, mul, div, pow, index, index_put);
  * Fisher accumulation (fisher_accumulate, fp32 and bf16 accumulators) against the authors'
    per-parameter `imp += grad.clone().pow(2)`;
  * both against the bandwidth bound: the bytes the pass must move (dampening: read theta, I_D,
    I_f, write theta; Fisher: read I and g, write I) divided by the copy bandwidth measured in the
    same run (a large tensor copied into a preallocated one: read + write).
Peak memory of the whole method (lethe.methods.unlearn "ssd": both Fisher passes and the
dampening) on a 134M-parameter Llama (width 768, 12 layers, V = 32000), fp32 against bf16
accumulators, each in a fresh process: VmHWM minus the RSS after the model is built.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" -p no:cacheprovider benchmarks/bench_ssd.py
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_results
from lethe.ops import fisher_accumulate, ssd_dampen

RESULTS: dict = {}
H, F, L, V = 768, 2048, 12, 32000


def _shapes():
    s = [(V, H), (V, H), (H,)] + [(H,)] * 5
    for _ in range(L):
        s += [(H, H)] * 4 + [(F, H), (F, H), (H, F), (H,)]
    return s


SHAPES = _shapes()


def _median(fn, rounds=5):
    ts = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts[1:])[len(ts[1:]) // 2]


@pytest.fixture(scope="module")
def bandwidth():
    a = torch.randn(64 * 2**20)
    b = torch.empty_like(a)
    b.copy_(a)
    t = _median(lambda: b.copy_(a), rounds=7)
    RESULTS["copy_bandwidth_GBps"] = 2 * a.numel() * 4 / t / 1e9
    return 2 * a.numel() * 4 / t


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=g) for s in SHAPES]
    d = [torch.rand(s, generator=g) for s in SHAPES]
    f = [torch.rand(s, generator=g) * 0.1 for s in SHAPES]
    for x in f:  # about 1% of the weights matter 10x more to the forget set
        x.view(-1)[::97] *= 1000.0
    n = sum(x.numel() for x in p)
    assert len(p) == 104 and 133e6 < n < 135e6
    RESULTS["parameters"] = n
    RESULTS["tensors"] = len(p)
    return p, d, f


def _authors_dampen(params, oimp, fimp, alpha=10.0, lambd=1.0):
    with torch.no_grad():
        for p, o, fi in zip(params, oimp, fimp):
            locations = torch.where(fi > o.mul(alpha))
            weight = (o.mul(lambd)).div(fi).pow(1.0)
            update = weight[locations]
            update[torch.where(update > 1.0)] = 1.0
            p[locations] = p[locations].mul(update)


def test_dampen(tensors, bandwidth):
    p, d, f = tensors
    n = RESULTS["parameters"]
    t_lethe = _median(lambda: ssd_dampen(p, d, f, backend="native"))
    t_loop = _median(lambda: _authors_dampen(p, d, f), rounds=3)
    bound = 16 * n / bandwidth
    st = ssd_dampen(p, d, f, backend="native")
    RESULTS["dampen"] = {"lethe_ms": t_lethe * 1e3, "authors_loop_ms": t_loop * 1e3, "bound_ms": bound * 1e3,
                         "speedup_vs_loop": t_loop / t_lethe, "x_of_bound": t_lethe / bound,
                         "selected_fraction": int(st.selected.sum()) / n}
    print(f"\nssd_dampen, {n / 1e6:.0f}M parameters in {len(p)} tensors: lethe {t_lethe * 1e3:.1f} ms, the authors' "
          f"loop {t_loop * 1e3:.1f} ms ({t_loop / t_lethe:.1f}x), bandwidth bound {bound * 1e3:.1f} ms "
          f"({t_lethe / bound:.2f}x of it); {int(st.selected.sum()) / n:.2%} selected")


def test_fisher(tensors, bandwidth):
    p, d, _ = tensors
    n = RESULTS["parameters"]
    imp = [torch.zeros_like(x) for x in p]
    imp16 = [torch.zeros(x.shape, dtype=torch.bfloat16) for x in p]
    t32 = _median(lambda: fisher_accumulate(imp, d, backend="native"))
    t16 = _median(lambda: fisher_accumulate(imp16, d, backend="native"))

    def loop():
        for i, g in zip(imp, d):
            i.data += g.data.clone().pow(2)
    t_loop = _median(loop, rounds=3)
    bound32, bound16 = 12 * n / bandwidth, 8 * n / bandwidth
    RESULTS["fisher"] = {"lethe_fp32_ms": t32 * 1e3, "lethe_bf16_ms": t16 * 1e3, "authors_loop_ms": t_loop * 1e3,
                         "bound_fp32_ms": bound32 * 1e3, "bound_bf16_ms": bound16 * 1e3,
                         "speedup_vs_loop": t_loop / t32, "x_of_bound": t32 / bound32, "bf16_x_of_bound": t16 / bound16}
    print(f"fisher_accumulate: lethe fp32 {t32 * 1e3:.1f} ms, bf16 {t16 * 1e3:.1f} ms; the authors' loop "
          f"{t_loop * 1e3:.1f} ms ({t_loop / t32:.1f}x); bounds {bound32 * 1e3:.1f} / {bound16 * 1e3:.1f} ms "
          f"({t32 / bound32:.2f}x / {t16 / bound16:.2f}x of them)")


_MEMORY = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import peak_rss, reset_peak_rss, rss
from transformers import LlamaConfig, LlamaForCausalLM
import lethe.methods as lm
from lethe.methods.base import Encoded
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)).eval()
g = torch.Generator().manual_seed(1)
rows = lambda n: [(torch.randint(5, 32000, (24,), generator=g).tolist(), 12) for _ in range(n)]
forget, retain = Encoded(rows(8), 0, "forget"), Encoded(rows(24), 0, "retain")
params = sum(p.numel() for p in model.parameters())
base = rss()
reset_peak_rss()
lm.unlearn(model, forget, retain, "ssd", {"accumulator": sys.argv[1], "batch_size": 8, **lm.SSD.benchmark_config},
           progress=False)
print(json.dumps({"params": params, "model_MB": params * 4 / 2**20, "peak_over_model_MB": (peak_rss() - base) / 2**20}))
"""


def test_peak_memory_fp32_vs_bf16_accumulators():
    out = {}
    for acc in ("float32", "bfloat16"):
        r = subprocess.run([sys.executable, "-c", _MEMORY, acc, os.path.dirname(__file__)], capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        out[acc] = json.loads(r.stdout.strip().splitlines()[-1])
    RESULTS["peak_memory"] = out
    a, b = out["float32"], out["bfloat16"]
    print(f"ssd on a {a['params'] / 1e6:.0f}M Llama ({a['model_MB']:.0f} MB of fp32 weights): peak over the model "
          f"{a['peak_over_model_MB']:.0f} MB with fp32 accumulators, {b['peak_over_model_MB']:.0f} MB with bf16 "
          f"({b['peak_over_model_MB'] / a['peak_over_model_MB']:.2f}x)")
    write_results("ssd_cpu", RESULTS)
