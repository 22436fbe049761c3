"""`lethe eval`: bad input gets a message and exit status 2, never a traceback; results are saved
as soon as each part is computed (the native metrics first, then after each attack), each file
written whole under a temporary name, so an interruption loses nothing already written."""
from __future__ import annotations

import sys
from pathlib import Path


class UsageError(Exception):
    pass


def _load_model(path: str, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what}: {path!r} is not a directory (expected a Hugging Face causal LM directory)")
    if not (p / "config.json").exists():
        raise UsageError(f"{what}: {path!r} has no config.json: not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{what}: {path!r} is not a causal LM that transformers can load: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{what}: {path!r} has no tokenizer that transformers can load: {e}") from None
    model.eval()
    return model, tok


def _bench_meta(bench, split) -> dict:
    import dataclasses

    return {"config": dataclasses.asdict(bench.config), "split": split, "corpus_sha256": bench.corpus.digest(),
            "cache": str(bench.root)}


def guarded(command: str, run, a, kept: str, errors=(UsageError,)) -> int:
    """run(a)'s exit status; a usage error is a message and status 2, an interruption says what
    was `kept` (status 130): never a traceback."""
    try:
        return run(a)
    except errors as e:
        print(f"lethe {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lethe {command}: interrupted ({kept})", file=sys.stderr)
        return 130


def run_eval(a) -> int:
    return guarded("eval", _run, a, "what was saved in --out is kept")


def _run(a) -> int:
    from lethe.eval.data import DataError, load_jsonl
    from lethe.eval.evaluator import EvalData, Evaluator, RelearnConfig

    if a.continual:
        return _run_continual(a)

    attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
    for x in attacks:
        if x not in ("quant", "relearn"):
            raise UsageError(f"--attacks: each must be 'quant' or 'relearn', got {x!r}")
    for name in ("retain_size", "relearn_steps", "batch_size"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not (0 <= a.epsilon <= 1):
        raise UsageError(f"--epsilon must be in [0, 1], got {a.epsilon}")
    if not (a.relearn_lr > 0):
        raise UsageError(f"--relearn-lr must be > 0, got {a.relearn_lr}")
    if "{q}" not in a.template:
        raise UsageError(f"--template must contain {{q}}, got {a.template!r}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {a.out!r} exists and is not a directory")
    own = [a.forget, a.retain, a.holdout]
    try:
        relearn = RelearnConfig(steps=a.relearn_steps, lr=a.relearn_lr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(x is not None for x in own + [a.world]):
        if any(x is None for x in own):
            raise UsageError("your own data needs all of --forget, --retain and --holdout")
        if a.model in (None, "target", "retain"):
            raise UsageError("with your own data, --model must be a model directory")
        model, tok = _load_model(a.model, "--model")
        reference = _load_model(a.reference, "--reference")[0] if a.reference else None
        try:
            data = EvalData(*(load_jsonl(f, a.template, w) for f, w in zip(own, ("--forget", "--retain", "--holdout"))),
                            load_jsonl(a.world, a.template, "--world") if a.world else None)
        except DataError as e:
            raise UsageError(str(e)) from None
        name = Path(a.model).name
        meta = {"model": str(Path(a.model).resolve()), "reference": a.reference and str(Path(a.reference).resolve()),
                "data": {"forget": a.forget, "retain": a.retain, "holdout": a.holdout, "world": a.world},
                "template": a.template}
    else:
        from lethe.eval.benchmark import BenchmarkConfig, build_benchmark
        from lethe.eval.corpus import CorpusConfig
        from lethe.eval.evaluator import builtin_data

        bench = build_benchmark(BenchmarkConfig(corpus=CorpusConfig(seed=a.seed), seed=a.seed), splits=(a.split,),
                                cache=a.cache, progress=not a.no_progress, retain_seeds=1)
        choice = a.model or "target"
        path = {"target": bench.target, "retain": bench.retain[a.split][0]}.get(choice, choice)
        model, tok = _load_model(str(path), "--model")
        reference = _load_model(a.reference or str(bench.retain[a.split][0]), "--reference")[0]
        data = builtin_data(bench, a.split)
        name = choice if choice in ("target", "retain") else Path(choice).name
        meta = {"model": str(path), "reference": a.reference or str(bench.retain[a.split][0]),
                "benchmark": _bench_meta(bench, a.split)}
    ev = Evaluator(data, tok, reference, retain_size=a.retain_size, world_size=a.retain_size,
                   batch_size=a.batch_size, epsilon=a.epsilon, relearn=relearn, progress=not a.no_progress)
    try:
        report = ev.evaluate(model, name=name, attacks=attacks, save_to=out, meta=meta)
    except ValueError as e:  # e.g. a model whose logits lethe cannot fuse, a bad value in the data
        raise UsageError(str(e)) from None
    print(report.table())
    print(f"saved to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))))
    return 0


def _run_continual(a) -> int:
    from lethe.eval.benchmark import BenchmarkConfig, build_benchmark
    from lethe.eval.continual import continual_runner, run_continual
    from lethe.eval.corpus import CorpusConfig
    from lethe.eval.stream import StreamConfig

    own = [x for x in ("model", "reference", "forget", "retain", "holdout", "world") if getattr(a, x) is not None]
    if own:
        raise UsageError(f"--continual runs on the built-in benchmark from its target model; --{own[0]} is not taken "
                         "(run your own stream with lethe unlearn --requests)")
    if a.attacks:
        raise UsageError("--attacks: not taken with --continual")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods: expected at least one method")
    for m in methods:
        try:
            continual_runner(m)
        except ValueError as e:
            raise UsageError(f"--methods: {e}") from None
    if a.every < 1:
        raise UsageError(f"--every must be >= 1, got {a.every}")
    try:
        sc = StreamConfig(requests=a.requests, seed=a.seed)
    except ValueError as e:
        raise UsageError(f"--requests: {e}") from None
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {a.out!r} exists and is not a directory")
    bench = build_benchmark(BenchmarkConfig(corpus=CorpusConfig(seed=a.seed), seed=a.seed), splits=(), cache=a.cache,
                            progress=not a.no_progress, retain_seeds=0)
    try:
        res = run_continual(out, methods, bench=bench, stream_config=sc, every=a.every, retain_size=a.retain_size,
                            progress=not a.no_progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{'method':<10} {'mean F.D.':>10} {'mean R.U.':>10}")
    for n, m in res["mean"].items():
        print(f"{n:<10} {m['forget_degree']:>10.3f} {m['retain_utility']:>10.3f}")
    print(f"saved to {out}/: continual.json, continual.png, " + ", ".join(f"{n}.json" for n in methods))
    return 0
