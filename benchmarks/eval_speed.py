"""The evaluation's speed targets and the built-in benchmark's discrimination, at full size:

* building the benchmark from nothing (corpus, tokenizer, target model, forget10's two retain
  models) in a fresh cache folder;
* a second run from the cache (build_benchmark + loading the three models);
* evaluating one model on forget10 with every metric and the quantisation attack (4 presets);
* the discrimination figures: forget quality of the target and of the second-seed retain model
  against the first retain model, Min-K%++ AUC forget vs holdout of each.

    .venv/bin/python benchmarks/eval_speed.py [--cache DIR] [--out benchmarks/results/eval_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one, removed after)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_cpu.json"))
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from lethe.eval import Evaluator, build_benchmark, builtin_data

    tmp = None
    cache = a.cache or (tmp := tempfile.mkdtemp(prefix="lethe-eval-speed-"))
    res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        bench = build_benchmark(splits=("forget10",), cache=cache, retain_seeds=2)
        res["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        bench = build_benchmark(splits=("forget10",), cache=cache, retain_seeds=2)
        load = lambda d: AutoModelForCausalLM.from_pretrained(d).eval()  # noqa: E731
        target, retain, retain2 = load(bench.target), *(load(d) for d in bench.retain["forget10"])
        tok = bench.tokenizer()
        res["cached_start_s"] = time.perf_counter() - t
        ev = Evaluator(builtin_data(bench, "forget10"), tok, retain)
        t = time.perf_counter()
        ev._reference_stats()
        res["reference_stats_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rt = ev.evaluate(target, "target", attacks=("quant",))
        res["eval_with_quant_s"] = time.perf_counter() - t
        r2 = ev.evaluate(retain2, "retain (seed 1)")
        rr = ev.evaluate(retain, "retain (seed 0)")
        res["figures"] = {
            name: {"forget_exact": r["native"]["forget"]["exact"], "retain_exact": r["native"]["retain"]["exact"],
                   "world_exact": r["native"]["world"]["exact"], "forget_quality": r["native"].get("forget_quality"),
                   "model_utility": r["native"]["model_utility"],
                   "min_k_plus_plus_auc": r["native"]["mia_auc"]["min_k_plus_plus"],
                   "mia_auc": r["native"]["mia_auc"]}
            for name, r in (("target", rt), ("retain_seed1", r2), ("retain_seed0", rr))}
        res["target_q_int4"] = rt["quant"]["q_int4"]
        print(rt)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "figures"}, indent=1))
    print(json.dumps(res["figures"], indent=1))


if __name__ == "__main__":
    main()
