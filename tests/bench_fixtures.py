"""The reduced built-in benchmark the evaluation and method tests share (fixtures in conftest.py)."""
from lethe.eval.benchmark import BenchmarkConfig, TrainConfig
from lethe.eval.corpus import CorpusConfig

# the smallest benchmark whose assertions still hold (see benchmarks/RESULTS.md, evaluation)
EVAL_TEST = BenchmarkConfig(corpus=CorpusConfig(people=100, holdout_people=20, places=24, things=16),
                            train=TrainConfig(batch_size=32))
