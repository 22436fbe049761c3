"""`lethe demo`: every registered method on the built-in benchmark's forget10 split, evaluated
with every metric and both attacks, as a leaderboard, a JSON report and plots.

Resumable: each finished method's report is saved in --out as soon as it is done (and an
unlearning run checkpoints as it goes); a rerun skips what is there."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

__all__ = ["run_demo", "leaderboard"]

# columns of the leaderboard: (header, path into a report's results, lower is better?)
COLUMNS = (("forget prob", ("native", "forget", "prob")), ("forget exact", ("native", "forget", "exact")),
           ("forget quality", ("native", "forget_quality")), ("utility", ("native", "model_utility")),
           ("MIA AUC", ("native", "mia_auc", "min_k_plus_plus")),
           ("exact @int4", ("quant", "presets", "paper-int4", "forget", "exact")),
           ("Q-INT4", ("quant", "q_int4")), ("exact relearnt", ("relearn", "after", "exact")))


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def leaderboard(rows: list[dict]) -> str:
    """rows: {"name", "results", "seconds"}: the table the demo prints."""
    from lethe.eval.report import _fmt

    head = ["model"] + [c for c, _ in COLUMNS] + ["time (s)"]
    lines = [head] + [[r["name"]] + [_fmt(_get(r["results"], p)) for _, p in COLUMNS]
                      + [_fmt(r.get("seconds")) if r.get("seconds") is not None else "-"] for r in rows]
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) for r in lines)


def _plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lethe.eval.report import _savefig

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        mu, fq = _get(r["results"], ("native", "model_utility")), _get(r["results"], ("native", "forget_quality"))
        if mu is None or fq is None:
            continue
        ref = r["name"] in ("target", "retain")
        ax.scatter(mu, max(fq, 1e-30), marker="*" if ref else "o", s=160 if ref else 60,
                   color="black" if ref else None, zorder=3)
        ax.annotate(r["name"], (mu, max(fq, 1e-30)), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality (KS p-value vs the retain model; higher is better)")
    ax.set_title("forget quality against model utility, forget10")
    ax.grid(alpha=0.3)
    paths.append(_savefig(fig, out / "forget_quality_vs_utility.png"))
    plt.close(fig)

    quant = [r for r in rows if _get(r["results"], ("quant", "presets"))]
    if quant:
        presets = list(quant[0]["results"]["quant"]["presets"])
        cols = ["native"] + presets
        fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(quant) + 3), 4))
        x = np.arange(len(quant))
        wd = 0.8 / len(cols)
        for i, c in enumerate(cols):
            vals = [_get(r["results"], ("native", "forget", "exact")) if c == "native"
                    else _get(r["results"], ("quant", "presets", c, "forget", "exact")) for r in quant]
            ax.bar(x + (i - (len(cols) - 1) / 2) * wd, [np.nan if v is None else v for v in vals], wd, label=c)
        ax.set_xticks(x, [r["name"] for r in quant])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("forget-set exact match")
        ax.set_title("recovery under quantisation: forget exact match per precision")
        ax.legend(fontsize=8, ncols=min(len(cols), 5))
        paths.append(_savefig(fig, out / "quantisation_recovery.png"))
        plt.close(fig)
    return paths


def _write_json(path: Path, d) -> None:
    from lethe.eval.report import _write

    _write(path, json.dumps(d, indent=1).encode())


# the demo's continual part: a short stream, FIT against these run request by request
STREAM_BASELINES = ("npo", "graddiff")
STREAM_REQUESTS = 10
STREAM_EVERY = 5


def default_methods() -> list:
    """Every registered method (the gradient methods, then SSD), then each plug-in on NPO and on GradDiff
    (npo+gu, graddiff+gu)."""
    import lethe.methods as lm

    names = [n for n in lm.available() if not getattr(lm.get(n), "continual", False)]  # FIT: the stream part
    plugins = [n for n in names if lm.get(n).plugin]
    return [n for n in names if n not in plugins] + [f"{b}+{p}" for p in plugins for b in ("npo", "graddiff")]


def run_demo(out="lethe-demo", methods=None, split: str = "forget10", cache=None, seed: int = 0,
             progress: bool = True, bench_config=None, retain_size: int = 200, echo=print) -> dict:
    """Runs the demo; returns {"rows": [...], "table": str, "paths": [...]}. bench_config: a
    lethe.eval.BenchmarkConfig (default: the built-in benchmark with `seed`)."""
    import lethe.methods as lm
    from lethe.eval.benchmark import BenchmarkConfig, build_benchmark
    from lethe.eval.corpus import CorpusConfig
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import Evaluator, builtin_data
    from transformers import AutoModelForCausalLM

    names = default_methods() if methods is None else list(methods)
    for n in names:
        lm.get(n)  # an unknown name lists the known ones, before any work
    # the continual methods (FIT) run on a short stream of requests, beside the baselines run request by request
    streamed = [n for n in names if getattr(lm.get(n), "continual", False)]
    if methods is None:
        streamed = [n for n in lm.available() if getattr(lm.get(n), "continual", False)]
    names = [n for n in names if n not in streamed]
    if streamed:
        streamed += [b for b in STREAM_BASELINES if b not in streamed]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory")
    (out / "reports").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = bench_config or BenchmarkConfig(corpus=CorpusConfig(seed=seed), seed=seed)
    echo(f"lethe demo: {len(names)} methods on the built-in benchmark ({cfg.corpus.people} fictitious people, "
         f"split {split}); results in {out}/")
    bench = build_benchmark(cfg, splits=(split,), cache=cache, progress=progress, retain_seeds=1)
    tok = bench.tokenizer()
    data = builtin_data(bench, split)
    retain_train = examples_from_qas(bench.corpus.retain(split))
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    ev = Evaluator(data, tok, load(bench.retain[split][0]), retain_size=retain_size, world_size=retain_size,
                   progress=progress)
    forget = lm.encode(data.forget, tok, "forget")
    retain = lm.encode(retain_train, tok, "retain")
    rows = []
    todo = [("target", None), ("retain", None)] + [(n, n) for n in names]
    for i, (name, method) in enumerate(todo):
        path = out / "reports" / f"{name}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            echo(f"  [{i + 1}/{len(todo)}] {name}: done before, kept")
            continue
        t = time.perf_counter()
        if method is None:  # the reference points
            model = load(bench.target if name == "target" else bench.retain[split][0])
            attacks, seconds, steps = ("quant",), None, None
        else:
            model = load(bench.target)
            echo(f"  [{i + 1}/{len(todo)}] {name}: unlearning ...")
            m = lm.benchmark_method(name)
            res = lm.unlearn(model, forget, retain if m.needs_retain() else None, m,
                             checkpoint_dir=out / "runs" / name, checkpoint_every=10, resume=True, progress=progress)
            seconds, steps = res.seconds, res.log
            attacks = ("quant", "relearn")
        echo(f"  [{i + 1}/{len(todo)}] {name}: evaluating (every metric" + (", quantisation and relearning attacks)"
                                                                            if method else ", quantisation)"))
        report = ev.evaluate(model, name=name, attacks=attacks)
        row = {"name": name, "method": method, "seconds": seconds,
               "config": dataclasses.asdict(lm.benchmark_method(method).config) if method else None,
               "train": (dataclasses.asdict(lm.UnlearnConfig.for_method(method).resolved(len(forget)))
                         if method and not lm.get(method).one_shot else None),  # (SSD trains nothing)
               "results": report.to_json()["results"], "eval_seconds": time.perf_counter() - t - (seconds or 0),
               "log": steps}
        _write_json(path, row)
        rows.append(row)
        ckpt = out / "runs" / name / lm.driver.CHECKPOINT
        ckpt.unlink(missing_ok=True)  # the report holds what the run produced
    table = leaderboard(rows)
    stream = None
    if streamed:
        from lethe.eval.continual import run_continual
        from lethe.eval.stream import StreamConfig

        echo(f"  the continual part: {', '.join(streamed)} on a stream of {STREAM_REQUESTS} deletion requests ...")
        stream = run_continual(out / "continual", streamed, bench=bench,
                               stream_config=StreamConfig(requests=STREAM_REQUESTS, seed=seed), every=STREAM_EVERY,
                               retain_size=retain_size, progress=progress, echo=echo)
    summary = {"benchmark": {"config": dataclasses.asdict(cfg), "split": split, "corpus_sha256": bench.corpus.digest()},
               "methods": names, "rows": rows, "seconds": time.perf_counter() - t0,
               "continual": None if stream is None else {k: stream[k] for k in ("requests", "every", "mean")}}
    _write_json(out / "demo.json", summary)
    paths = [out / "demo.json"] + _plots(rows, out) + ([Path(stream["plot"])] if stream else [])
    echo("")
    echo(table)
    echo("")
    if stream:
        echo(f"continual unlearning, {stream['requests']} requests (mean over the checkpoints every {stream['every']}; "
             "1 is the retrained reference):")
        for n, m in stream["mean"].items():
            echo(f"  {n:<10} Forget Degree {m['forget_degree']:.3f}  Retain Utility {m['retain_utility']:.3f}")
        echo("")
    echo("forget prob / exact: the forget set's answer probability and greedy exact match (lower: more forgotten); "
         "forget quality: KS p-value of the truth ratios against the retain model (higher: closer to never having "
         "learnt); utility: retain + world facts; MIA AUC: Min-K%++ forget vs holdout (0.5 is ideal); exact @int4 and "
         "Q-INT4: forget exact match after paper-int4 / the worst 4-bit quantisation; exact relearnt: after a short "
         "fine-tune on half the forget facts, on the other half.")
    echo(f"saved {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.0f} s)")
    return {"rows": rows, "table": table, "paths": paths}


def main(a) -> int:
    from lethe.eval.cli import guarded

    def run(a):
        run_demo(a.out, methods=a.methods.split(",") if a.methods else None, cache=a.cache, seed=a.seed,
                 progress=not a.no_progress)
        return 0
    return guarded("demo", run, a, "finished methods are kept in --out: rerun to continue", errors=(ValueError,))
