"""Microbenchmarks (pytest-benchmark). Each family's file times lethe against the eager PyTorch
composition a user would write, against torch.compile of it, and against the machine's limit, in
one run, and prints the ratios (also written to benchmarks/results/<family>_<device>.json)."""
import json
import os
import platform
import resource

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


# ---- memory and GPU timing, shared by the benchmark files and their measuring subprocesses ----

def rss() -> int:
    """Resident set size of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """Peak RSS of this process image, bytes (VmHWM: ru_maxrss would include the parent's, kept
    over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak_rss() -> None:
    """Sets VmHWM back to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cuda_time(fn, reps=5) -> float:
    """Median seconds of fn() on the current CUDA stream, after one warm-up call (and compilation)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[reps // 2]
