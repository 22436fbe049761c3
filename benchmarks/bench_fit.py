"""FIT's cost per request, split into filtering, importance, attribution and update, against one
NPO request (lethe.methods.Sequential("npo"), the same steps) on the same model; and the
attribution pass (one forward per decoder layer) against the layer count.

    .venv/bin/python benchmarks/bench_fit.py [--cache DIR] [--out benchmarks/results/fit.json]

Ratios in one run (this machine's time is no figure to compare across machines); the layer sweep
is plotted in benchmarks/fit_attribution_layers.png."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _time(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    import lethe.methods as lm
    from lethe.eval.benchmark import build_benchmark
    from lethe.eval.data import examples_from_qas
    from lethe.eval.stream import make_stream
    from lethe.methods.fit import FIT
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from bench_fixtures import EVAL_TEST

    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/tmp/ltc")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    bench = build_benchmark(EVAL_TEST, splits=("forget10",), cache=a.cache, progress=False, retain_seeds=0)
    tok = bench.tokenizer()
    stream = make_stream(bench.corpus)
    target = AutoModelForCausalLM.from_pretrained(bench.target).eval()
    retain = examples_from_qas(bench.corpus.world)
    parts = {"filter": 0.0, "importance": 0.0, "attribution": 0.0, "update": 0.0}
    fit = lm.make_method("fit").bind(copy.deepcopy(target), tok, retain=retain)
    wrap = {}
    for name, meth in (("filter", FIT.filter), ("importance", FIT.importance), ("attribution", FIT.attribution)):
        def timed(self, *args, _m=meth, _n=name):
            t = time.perf_counter()
            r = _m(self, *args)
            parts[_n] += time.perf_counter() - t
            return r
        wrap[name] = timed
        setattr(fit, name, timed.__get__(fit))
    n = 10
    t0 = time.perf_counter()
    for q in stream[:n]:
        fit.handle(q)
    total = time.perf_counter() - t0
    parts["update"] = total - parts["filter"] - parts["importance"] - parts["attribution"]
    npo = lm.Sequential("npo", steps=lm.FITConfig().steps, lr=3e-4, batch_size=11).bind(copy.deepcopy(target), tok,
                                                                                       retain=retain)
    t0 = time.perf_counter()
    for q in stream[:n]:
        npo.handle(q)
    npo_t = time.perf_counter() - t0
    res = {"requests": n, "fit_seconds_per_request": total / n, "npo_seconds_per_request": npo_t / n,
           "fit_over_npo": total / npo_t, "parts_share": {k: v / total for k, v in parts.items()},
           "parts_over_npo_request": {k: v / npo_t for k, v in parts.items()}}
    # the attribution pass against the layer count (random models of the benchmark's width)
    enc = lm.encode(list(stream[0].chunks), tok)
    batch = enc.batch(range(len(enc)))
    sweep = []
    for L in (1, 2, 4, 8, 16):
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=L, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=256, max_position_embeddings=128,
                           tie_word_embeddings=False)
        m = LlamaForCausalLM(conf).eval()
        f = lm.make_method("fit").bind(m, tok, retain=retain[:4])
        from lethe.methods.base import mean_nll

        with torch.no_grad():
            fwd = _time(lambda: mean_nll(m, batch))
        att = _time(lambda: f.attribution(batch))
        sweep.append({"layers": L, "attribution_over_forward": att / fwd})
    res["attribution_sweep"] = sweep
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([s["layers"] for s in sweep], [s["attribution_over_forward"] for s in sweep], marker="o",
            label="attribution pass")
    ax.plot([s["layers"] for s in sweep], [s["layers"] + 1 for s in sweep], ls="--", color="gray",
            label="L + 1 forwards")
    ax.set_xlabel("decoder layers L")
    ax.set_ylabel("time / one forward on the request")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("FIT's layer attribution: one forward per layer")
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "fit_attribution_layers.png", dpi=120)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
