"""Shared pytest setup. Without a CUDA GPU, Triton kernels can only run under the interpreter,
which must be switched on before any @triton.jit kernel is defined: do it here, first."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import backends  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The reduced built-in benchmark (bench_fixtures.EVAL_TEST), built once per session into
    LETHE_TEST_CACHE (default a temporary folder)."""
    from bench_fixtures import EVAL_TEST
    from lethe.eval.benchmark import build_benchmark

    cache = os.environ.get("LETHE_TEST_CACHE") or tmp_path_factory.mktemp("lethe-cache")
    return build_benchmark(EVAL_TEST, splits=("forget10",), cache=cache, progress=False, retain_seeds=2)


@pytest.fixture(scope="session")
def models(bench):
    """Its target model and the two retain models of forget10 (seeds 0 and 1), in eval mode."""
    from transformers import AutoModelForCausalLM

    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    return {"target": load(bench.target), "retain": load(bench.retain["forget10"][0]),
            "retain2": load(bench.retain["forget10"][1])}


@pytest.fixture(scope="session")
def sets(bench):
    """forget10's forget and retain sets, encoded with the benchmark's tokenizer (the method tests')."""
    import lethe.methods as lm
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import builtin_data

    tok = bench.tokenizer()
    data = builtin_data(bench, "forget10")
    return (lm.encode(data.forget, tok, "forget"),
            lm.encode(examples_from_qas(bench.corpus.retain("forget10")), tok, "retain"))


@pytest.fixture(params=backends.params())
def backend(request):
    """The backend an op test runs on: cpu, triton (interpreted without a GPU) or cuda (see backends.py)."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA GPU (make gpu-check runs these)")


def pytest_runtest_logreport(report):
    """With LETHE_TEST_LOG=path, every test's outcome is appended there as one JSON line as it
    finishes (tools/gpu_check.sh summarises them; a run stopped at its time limit keeps them)."""
    path = os.environ.get("LETHE_TEST_LOG")
    if not path or (report.when != "call" and report.outcome == "passed") or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # (under pytest-xdist the controller writes what the workers report)
    if report.when == "setup" and report.outcome == "passed":
        return
    import json

    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
                            "message": str(report.longrepr).splitlines()[-1][:300] if report.failed else ""}) + "\n")
