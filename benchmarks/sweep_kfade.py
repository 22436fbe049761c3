"""K-FADE's settings on forget10 of the reduced built-in benchmark (the tests', cached under
LETHE_TEST_CACHE, default /tmp/ltc), against NPO's default run: per point the forget answers'
probability and exact match, model utility, forget quality, and per step the predicted and the
measured retain KL (the damping adaptation's tries). Writes benchmarks/results/kfade_sweep.json
and the plot benchmarks/kfade_sweep.png (forget quality against utility; measured over predicted
retain KL per step, with and without the damping adaptation); `--plot` redraws it from the JSON.

    .venv/bin/python benchmarks/sweep_kfade.py [--plot]    (about 8 minutes on 2 cores, benchmark built)
    .venv/bin/python benchmarks/sweep_kfade.py --full      (the full benchmark, as `lethe demo` builds it:
                                                            results/kfade_sweep_full.json; about 6 minutes)
"""
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "kfade_sweep.json")
FULL_OUT = os.path.join(HERE, "results", "kfade_sweep_full.json")
POINTS = [  # (label, config over the defaults)
    ("default (eps 0.005, 8 steps)", {}),
    ("eps 0.003, 10 steps", {"epsilon": 0.003, "steps": 10}),
    ("eps 0.005, 12 steps", {"epsilon": 0.005, "steps": 12}),
    ("eps 0.01, 8 steps", {"epsilon": 0.01}),
    ("EK-FAC (Tikhonov)", {"curvature": "ekfac", "damping_mode": "tikhonov"}),
    ("K-FAC, Tikhonov (eigenbasis)", {"damping_mode": "tikhonov"}),
    ("empirical Fisher", {"fisher": "empirical"}),
    ("MLP layers only", {"layers": "mlp"}),
    ("answer positions only", {"positions": "loss"}),
    ("no refresh", {"refresh": 0}),
    ("no adaptation (plain rule)", {"adapt": 0}),
]


FULL_POINTS = [  # the full benchmark (`lethe demo`'s): the default and larger budgets
    ("default (eps 0.005, 8 steps)", {}),
    ("eps 0.02, 8 steps", {"epsilon": 0.02}),
    ("eps 0.05, 8 steps", {"epsilon": 0.05}),
    ("eps 0.02, 16 steps", {"epsilon": 0.02, "steps": 16}),
]


def sweep(full=False):
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from bench_fixtures import EVAL_TEST
    from transformers import AutoModelForCausalLM

    import lethe.methods as lm
    from lethe.eval.benchmark import build_benchmark
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import Evaluator, builtin_data

    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    from lethe.eval.benchmark import BenchmarkConfig

    if full:  # as `lethe demo`: its cache, retain_size 200
        bench = build_benchmark(BenchmarkConfig(), splits=("forget10",), progress=False, retain_seeds=1)
    else:
        bench = build_benchmark(EVAL_TEST, splits=("forget10",), cache=os.environ.get("LETHE_TEST_CACHE", "/tmp/ltc"),
                                progress=False, retain_seeds=2)
    tok = bench.tokenizer()
    data = builtin_data(bench, "forget10")
    f = lm.encode(data.forget, tok, "forget")
    r = lm.encode(examples_from_qas(bench.corpus.retain("forget10")), tok, "retain")
    target = load(bench.target)
    size = 200 if full else 100
    ev = Evaluator(data, tok, load(bench.retain["forget10"][0]), retain_size=size, world_size=size, progress=False)

    def row(label, m, res=None):
        g = ev.metrics(m)
        out = {"label": label, "prob": g["forget"]["prob"], "exact": g["forget"]["exact"],
               "utility": g["model_utility"], "fq": g["forget_quality"]}
        if res is not None:
            out["seconds"] = res.seconds
            out["steps"] = [{k: e[k] for k in ("damping", "tries", "eta", "kl_predicted", "kl_kfac", "kl_measured")}
                            for e in res.log if e.get("pass") == "step"]
        print({k: v for k, v in out.items() if k != "steps"}, flush=True)
        return out

    rows = [row("target", target)]
    m = copy.deepcopy(target)
    rows.append(row("npo (default)", m, lm.unlearn(m, f, r, "npo", progress=False)))
    for label, cfg in (FULL_POINTS if full else POINTS):
        m = copy.deepcopy(target)
        rows.append(row(label, m, lm.unlearn(m, f, r, "kfade", cfg, progress=False)))
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(FULL_OUT if full else OUT, "w") as fh:
            json.dump({"benchmark": "full (lethe demo's)" if full else "reduced (tests/bench_fixtures.EVAL_TEST)",
                       "split": "forget10", "rows": rows}, fh, indent=1)


def plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(OUT) as fh:
        rows = json.load(fh)["rows"]
    t = rows[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, r in enumerate(rows[1:]):
        npo = r["label"].startswith("npo")
        a1.plot(r["utility"] / t["utility"], max(r["fq"], 1e-30), "s" if npo else "o^vD"[i % 4],
                color="k" if npo else plt.cm.tab20(i), label=r["label"])
    a1.set_yscale("log")
    a1.set_xlabel("model utility / the target's")
    a1.set_ylabel("forget quality (KS p-value; 1 = the retain model)")
    a1.set_title("K-FADE on forget10 (reduced benchmark) against NPO")
    a1.legend(fontsize=7)
    for r in rows[1:]:
        if "steps" in r and r["label"].split(" (")[0] in ("default", "no adaptation"):
            ratios = [s["kl_measured"] / s["kl_predicted"] for s in r["steps"]]
            a2.plot(range(1, len(ratios) + 1), ratios, "o-", label=r["label"])
    a2.axhspan(0.5, 2, color="grey", alpha=0.15, label="within 2x")
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("measured / predicted retain KL")
    a2.set_title("the trust region's prediction per step")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "kfade_sweep.png"), dpi=120)


if __name__ == "__main__":
    if "--full" in sys.argv:
        sweep(full=True)
    elif "--plot" not in sys.argv:
        sweep()
    if "--full" not in sys.argv:
        plot()
