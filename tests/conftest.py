"""Shared pytest setup. Without a CUDA GPU, Triton kernels can only run under the interpreter,
which must be switched on before any @triton.jit kernel is defined: do it here, first."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import backends  # noqa: E402  (after TRITON_INTERPRET)


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
