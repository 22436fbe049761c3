"""Microbenchmarks (pytest-benchmark). Each family's file times lethe against the eager PyTorch
composition a user would write, against torch.compile of it, and against the machine's limit, in
one run, and prints the ratios (also written to benchmarks/results/<family>_<device>.json)."""
import json
import os
import platform

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }


def write_results(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=1)
    return path
