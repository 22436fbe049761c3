"""GU's retain subspace (lethe.RetainSubspace on the gu ops), CPU fp32.

d = 16M parameters as one tensor and as 100 tensors (override with LETHE_BENCH_GU_D), k = 8
directions: adding a direction (CGS2 and CholeskyQR2, to a basis of k - 1) and projecting one
update (Euclidean, and in the Adam metric). Anchors in one run:
  * eager: what a user writes with torch.linalg.qr: Q = qr([Q | g]) for an add, c = Q^T g and
    g - Q c (two matmuls) for a projection, on the basis as one [d, k] matrix;
  * the bandwidth bound: the bytes lethe's passes stream divided by the copy bandwidth measured
    here (a large tensor copied into a preallocated one: read + write), and the same for the
    fewest bytes any projection must move (the basis read once, g read and written).
The method's overhead per training step (npo+gu vs npo, graddiff+gu vs graddiff on the tests'
reduced benchmark model) is measured by bench_methods-style timing of `lethe.methods.unlearn`.

    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" -p no:cacheprovider benchmarks/bench_gu.py
"""
import copy
import os
import time

import pytest
import torch

from conftest import write_results
from lethe import RetainSubspace

D = int(os.environ.get("LETHE_BENCH_GU_D", str(16 * 2**20)))
K = 8
LAYOUTS = {"1x16M": [D], "100 tensors": [D // 100] * 99 + [D - 99 * (D // 100)]}
RESULTS: dict = {}


def _median(fn, rounds=5, setup=None):
    ts = []
    for _ in range(rounds + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts[1:])[len(ts[1:]) // 2]


def _copy_bandwidth() -> float:
    """Bytes per second of a large copy (read + write) into a preallocated tensor."""
    a = torch.randn(64 * 2**20)
    b = torch.empty_like(a)
    b.copy_(a)
    t = _median(lambda: b.copy_(a), rounds=7)
    return 2 * a.numel() * 4 / t


@pytest.fixture(scope="module")
def bandwidth():
    bw = _copy_bandwidth()
    RESULTS["copy_bandwidth_GBps"] = bw / 1e9
    return bw


def _subspace(sizes, orth="cgs2", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.zeros(n) for n in sizes]
    rs = RetainSubspace(params, rank=K, scope="group", orthogonalize=orth, when_full="freeze")
    for _ in range(K - 1):
        rs.add([torch.randn(n, generator=g) for n in sizes])
    return rs, [torch.randn(n, generator=g) for n in sizes]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_project(layout, bandwidth):
    sizes = LAYOUTS[layout]
    rs, g = _subspace(sizes)
    rs.add(g)  # k = 8 directions
    assert rs.rank == [K]
    upd = [x.clone() for x in g]
    v = [torch.rand(n) * 1e-3 for n in sizes]
    t_lethe = _median(lambda: rs.project(upd))
    t_adam = _median(lambda: rs.project(upd, exp_avg_sq=v, eps=1e-8))
    q = torch.cat([rs.basis(i) for i in range(len(sizes))], 1).T.contiguous()  # [d, k]
    flat = torch.cat(g)

    def eager():
        c = q.T @ flat
        return flat - q @ c
    t_eager = _median(eager)

    def eager_qr():  # a user holding raw retain gradients: qr, then the two matmuls
        qq, _ = torch.linalg.qr(q)
        return flat - qq @ (qq.T @ flat)
    t_qr = _median(eager_qr, rounds=3)
    lethe_bytes = (K + 1) * 4 * D + (K + 2) * 4 * D  # dots: Q + g; apply: Q + g read + g written
    min_bytes = (K + 2) * 4 * D
    adam_bytes = (K + 2) * 4 * D + (K + 2) * 4 * D  # gram: Q + g + v; apply
    r = {"lethe_s": t_lethe, "lethe_adam_s": t_adam, "eager_matmuls_s": t_eager, "eager_qr_matmuls_s": t_qr,
         "bound_s": lethe_bytes / bandwidth, "min_bound_s": min_bytes / bandwidth,
         "adam_bound_s": adam_bytes / bandwidth}
    RESULTS[f"project/{layout}"] = r
    print(f"\nproject {layout}: lethe {t_lethe * 1e3:.1f} ms (Adam metric {t_adam * 1e3:.1f} ms); eager qr + 2 matmuls "
          f"{t_qr * 1e3:.0f} ms ({t_qr / t_lethe:.1f}x), 2 matmuls {t_eager * 1e3:.1f} ms ({t_eager / t_lethe:.2f}x); "
          f"bandwidth bound of its passes {r['bound_s'] * 1e3:.1f} ms ({t_lethe / r['bound_s']:.2f}x of it), one-pass "
          f"minimum {r['min_bound_s'] * 1e3:.1f} ms ({t_lethe / r['min_bound_s']:.2f}x); Adam metric "
          f"{t_adam / r['adam_bound_s']:.2f}x of its bound")


@pytest.mark.parametrize("orth", ["cgs2", "cholqr2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_add(layout, orth, bandwidth):
    sizes = LAYOUTS[layout]
    rs, g = _subspace(sizes, orth)
    saved = rs.state_dict()
    count = list(rs.count)

    def reset():
        rs.count = list(count)

    t_lethe = _median(lambda: rs.add(g), setup=reset)
    assert rs.rank == [K]
    rs.load_state_dict(saved)
    q = torch.cat([rs.basis(i) for i in range(len(sizes))], 1).T.contiguous()  # [d, k - 1]
    flat = torch.cat(g)
    t_qr = _median(lambda: torch.linalg.qr(torch.cat([q, flat[:, None]], 1)), rounds=3)
    k1 = K - 1
    if orth == "cgs2":  # dots (Q, g); axpy (Q, g, r written) with dots; axpy in place (Q, r read + written)
        nbytes = (k1 + 1) * 4 * D + (k1 + 2) * 4 * D + (k1 + 2) * 4 * D
    else:  # gram (Q, g); axpy (Q, g, new row); transform (Q read + written); gram (K rows); transform (K rows)
        nbytes = (k1 + 1) * 4 * D + (k1 + 2) * 4 * D + 2 * k1 * 4 * D + K * 4 * D + 2 * K * 4 * D
    r = {"lethe_s": t_lethe, "eager_qr_s": t_qr, "bound_s": nbytes / bandwidth}
    RESULTS[f"add-{orth}/{layout}"] = r
    print(f"\nadd ({orth}) {layout}: lethe {t_lethe * 1e3:.1f} ms; eager torch.linalg.qr {t_qr * 1e3:.0f} ms "
          f"({t_qr / t_lethe:.1f}x); bandwidth bound of its passes {r['bound_s'] * 1e3:.1f} ms "
          f"({t_lethe / r['bound_s']:.2f}x of it)")


def test_method_step_overhead():
    """Seconds per step of npo+gu / graddiff+gu over npo / graddiff, same batches and settings."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from bench_fixtures import EVAL_TEST
    from transformers import AutoModelForCausalLM

    import lethe.methods as lm
    from lethe.eval.benchmark import build_benchmark
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import builtin_data

    cache = os.environ.get("LETHE_TEST_CACHE")
    bench = build_benchmark(EVAL_TEST, splits=("forget10",), cache=cache, progress=False, retain_seeds=1)
    tok = bench.tokenizer()
    data = builtin_data(bench, "forget10")
    f = lm.encode(data.forget, tok, "forget")
    r = lm.encode(examples_from_qas(bench.corpus.retain("forget10")), tok, "retain")
    target = AutoModelForCausalLM.from_pretrained(bench.target)
    out = {}
    for base in ("npo", "graddiff"):
        train = lm.UnlearnConfig.for_method(base).resolved(len(f))
        train = lm.UnlearnConfig(**{**train.__dict__, "steps": 12})
        secs = {}
        for name in (base, f"{base}+gu"):
            runs = []
            for _ in range(3):
                m = copy.deepcopy(target)
                runs.append(lm.unlearn(m, f, r, name, train=train, progress=False).seconds / train.steps)
            secs[name] = sorted(runs)[1]
        out[base] = {"base_s_per_step": secs[base], "gu_s_per_step": secs[f"{base}+gu"],
                     "ratio": secs[f"{base}+gu"] / secs[base]}
        print(f"\n{base}+gu: {secs[f'{base}+gu'] * 1e3:.0f} ms per step vs {base} {secs[base] * 1e3:.0f} ms "
              f"({out[base]['ratio']:.2f}x)")
    RESULTS["method_step"] = out


def test_write_results():
    path = write_results("gu_cpu", {"d": D, "k": K, "results": RESULTS})
    print("\nwrote", path)
