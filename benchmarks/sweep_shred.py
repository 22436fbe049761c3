"""Sweep of the fused top-K KL (loss + backward, CPU fp32, H=1024, K=64) over V in {32k, 128k}
and N in {1k, 4k, 16k}: lethe against the eager composition, each configuration in a fresh
process whose address space is capped (LETHE_SWEEP_GIB, default 20) so that running out of
memory is an error we can report, not a killed machine. Prints a Markdown table and writes
benchmarks/results/shred_sweep_cpu.json after every configuration; an interrupted sweep resumes
from that file (configurations already measured with the same cap are kept; --fresh starts over).

    .venv/bin/python benchmarks/sweep_shred.py [--fresh]   (about 10 minutes on 2 cores)
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CAP_GIB = float(os.environ.get("LETHE_SWEEP_GIB", "20"))
H, K = 1024, 64

CHILD = r"""
import os, resource, sys, time
cap = int(float(sys.argv[4]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
N, V, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["LETHE_BENCH_SHRED"] = f"{N},1024,{V},64"
sys.path.insert(0, sys.argv[5])
import torch
import bench_shred as B
from conftest import peak_rss, rss
inputs = B.make_inputs()
base = rss()
try:
    t = time.perf_counter()
    B.step(B.VARIANTS[impl], *inputs)
    t = time.perf_counter() - t
    print("RESULT", t, (peak_rss() - base) / 2**30)
except (RuntimeError, MemoryError) as e:
    print("OOM", str(e).splitlines()[0][:120])
"""


def run(N, V, impl):
    r = subprocess.run([sys.executable, "-c", CHILD, str(N), str(V), impl, str(CAP_GIB), HERE],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT"):
            _, t, m = line.split()
            return {"seconds": float(t), "peak_extra_GiB": float(m)}
        if line.startswith("OOM"):
            return {"oom": line[4:]}
    return {"oom": f"process failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"}


PATH = os.path.join(HERE, "results", "shred_sweep_cpu.json")
GRID = [(N, V) for V in (32000, 128000) for N in (1024, 4096, 16384)]


def load_done():
    """Rows of an earlier run of the same sweep (same H, K and cap), by (N, V)."""
    try:
        with open(PATH) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if (old.get("H"), old.get("K"), old.get("cap_GiB")) != (H, K, CAP_GIB):
        return {}
    return {(r["N"], r["V"]): r for r in old.get("rows", [])}


def save(rows):
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    tmp = PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"H": H, "K": K, "cap_GiB": CAP_GIB, "rows": rows}, f, indent=1)
    os.replace(tmp, PATH)  # a crash never leaves a half-written file


def main():
    done = {} if "--fresh" in sys.argv[1:] else load_done()
    rows = []
    for i, (N, V) in enumerate(GRID):
        if (N, V) in done:
            rows.append(done[(N, V)])
            print(f"[{i + 1}/{len(GRID)}] N={N} V={V}: kept from {PATH}", flush=True)
            continue
        res = {impl: run(N, V, impl) for impl in ("lethe", "eager")}
        flops = 6 * N * H * V
        rows.append({"N": N, "V": V, **res, "lethe_GFLOPs": flops / res["lethe"]["seconds"] / 1e9
                     if "seconds" in res["lethe"] else None})
        save(rows)
        print(f"[{i + 1}/{len(GRID)}]", rows[-1], flush=True)
    print(f"\n| N | V | lethe s | lethe GFLOP/s | lethe peak GiB | eager s | eager peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        le, ea = r["lethe"], r["eager"]
        fmt = lambda d, k: f"{d[k]:.2f}" if k in d else "out of memory"  # noqa: E731
        print(f"| {r['N']} | {r['V']} | {fmt(le, 'seconds')} | "
              f"{r['lethe_GFLOPs'] or 0:.0f} | {fmt(le, 'peak_extra_GiB')} | {fmt(ea, 'seconds')} | "
              f"{fmt(ea, 'peak_extra_GiB')} |")


if __name__ == "__main__":
    main()
