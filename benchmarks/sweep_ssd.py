"""SSD's sweep of alpha (selection) and lambda (dampening) on forget10 of both built-in
benchmarks: the full one (`lethe demo`'s, cached under LETHE_CACHE) and the tests' reduced one
(cached under LETHE_TEST_CACHE, default /tmp/ltc). Per point: the forget answers' probability and
exact match, model utility, forget quality, the fraction of weights dampened. Writes
benchmarks/results/ssd_sweep.json after each benchmark and the plot benchmarks/ssd_sweep.png
(forget quality against utility, one curve per alpha); `--plot` redraws it from the JSON.

    .venv/bin/python benchmarks/sweep_ssd.py [--plot]    (about 8 minutes on 2 cores, benchmarks built)
"""
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "ssd_sweep.json")
ALPHAS = (1.5, 2.0, 3.0, 5.0, 10.0)
LAMBDAS = (0.25, 0.5, 1.0)


def sweep():
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from bench_fixtures import EVAL_TEST
    from transformers import AutoModelForCausalLM

    import lethe.methods as lm
    from lethe.eval.benchmark import BenchmarkConfig, build_benchmark
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import Evaluator, builtin_data

    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    out = {}
    for which, cfg, cache, size, seeds in (
            ("full", BenchmarkConfig(), None, 200, 1),  # as `lethe demo`: retain_size 200
            ("reduced", EVAL_TEST, os.environ.get("LETHE_TEST_CACHE", "/tmp/ltc"), 100, 2)):  # as the tests
        bench = build_benchmark(cfg, splits=("forget10",), cache=cache, progress=False, retain_seeds=seeds)
        tok = bench.tokenizer()
        data = builtin_data(bench, "forget10")
        f = lm.encode(data.forget, tok, "forget")
        r = lm.encode(examples_from_qas(bench.corpus.retain("forget10")), tok, "retain")
        target = load(bench.target)
        ev = Evaluator(data, tok, load(bench.retain["forget10"][0]), retain_size=size, world_size=size, progress=False)
        t = ev.metrics(target)
        rows = [{"alpha": None, "lambd": None, "prob": t["forget"]["prob"], "exact": t["forget"]["exact"],
                 "utility": t["model_utility"], "fq": t["forget_quality"]}]
        for a in ALPHAS:
            for lam in LAMBDAS:
                m = copy.deepcopy(target)
                res = lm.unlearn(m, f, r, "ssd", {"alpha": a, "lambd": lam}, progress=False)
                g = ev.metrics(m)
                rows.append({"alpha": a, "lambd": lam, "prob": g["forget"]["prob"], "exact": g["forget"]["exact"],
                             "utility": g["model_utility"], "fq": g["forget_quality"],
                             "selected": res.log[-1]["selected_fraction"], "seconds": res.seconds})
                print(which, rows[-1], flush=True)
        out[which] = rows
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            json.dump(out, fh, indent=1)


def plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(OUT) as fh:
        d = json.load(fh)
    fig, axes = plt.subplots(1, len(d), figsize=(6 * len(d), 4.5))
    for ax, (which, rows) in zip(axes, d.items()):
        t = rows[0]
        for a in ALPHAS:
            pts = [r for r in rows[1:] if r["alpha"] == a]
            ax.plot([r["utility"] / t["utility"] for r in pts], [r["fq"] for r in pts], "o-", label=f"alpha {a:g}")
            for r in pts:
                ax.annotate(f"{r['lambd']:g}", (r["utility"] / t["utility"], r["fq"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.axvline(0.8, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("model utility / the target's")
        ax.set_ylabel("forget quality (KS p-value; 1 = the retain model)")
        ax.set_title(f"SSD on forget10, {which} benchmark (labels: lambda)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "ssd_sweep.png"), dpi=120)


if __name__ == "__main__":
    if "--plot" not in sys.argv:
        sweep()
    plot()
