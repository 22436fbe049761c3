"""lethe's evaluation: the built-in fictitious-facts benchmark, its metrics, attacks and report.

    from lethe.eval import evaluate
    report = evaluate(model)                  # on the built-in benchmark's forget10 split
    print(report); report.save("out")

`build_benchmark` builds (or loads from the cache) the corpus, tokenizer and models;
`Evaluator` evaluates many models against one reference, computing the reference's statistics
once; `lethe.eval.metrics` holds the metric functions."""
from __future__ import annotations

from typing import Optional, Sequence

from lethe.eval.benchmark import Benchmark, BenchmarkConfig, TrainConfig, build_benchmark, cache_dir
from lethe.eval.corpus import SPLITS, Corpus, CorpusConfig, make_corpus
from lethe.eval.data import DataError, Example, load_jsonl
from lethe.eval.evaluator import QUANT_PRESETS, EvalData, Evaluator, RelearnConfig, builtin_data
from lethe.eval.report import Report

__all__ = ["evaluate", "Evaluator", "EvalData", "RelearnConfig", "Report", "build_benchmark", "builtin_data",
           "Benchmark", "BenchmarkConfig", "TrainConfig", "CorpusConfig", "Corpus", "make_corpus", "SPLITS",
           "Example", "load_jsonl", "DataError", "QUANT_PRESETS", "cache_dir"]


def evaluate(model, tokenizer=None, reference=None, *, data: Optional[EvalData] = None, split: str = "forget10",
             attacks: Sequence[str] = (), name: str = "model", cache=None, progress: bool = True,
             **evaluator_kwargs) -> Report:
    """Evaluates `model` and returns a Report.

    Without `data`, on the built-in benchmark's `split` (built or loaded from `cache`), with its
    tokenizer and, unless `reference` is given, its retain model as the reference. With `data`
    (an EvalData of your examples), `tokenizer` is required and `reference` optional (without it,
    no forget quality and no PrivLeak). `attacks`: "quant", "relearn". Other keyword arguments go
    to Evaluator (retain_size, world_size, batch_size, epsilon, relearn, backend)."""
    if data is None:
        from transformers import AutoModelForCausalLM

        bench = build_benchmark(splits=(split,), cache=cache, progress=progress, retain_seeds=1)
        tokenizer = tokenizer or bench.tokenizer()
        if reference is None:
            reference = AutoModelForCausalLM.from_pretrained(bench.retain[split][0]).eval()
        data = builtin_data(bench, split)
        from lethe.eval.cli import _bench_meta

        meta = {"benchmark": _bench_meta(bench, split)}
    elif tokenizer is None:
        raise ValueError("tokenizer: required with your own data")
    else:
        meta = {}
    return Evaluator(data, tokenizer, reference, **evaluator_kwargs).evaluate(model, name=name, attacks=attacks,
                                                                           meta=meta)
