"""Interleaved A/B of two builds of lethe on the CPU: the installed one against another checkout
(built in place), on the CPU benchmarks' main shapes. Each round runs both, in alternating order, in
fresh processes, so that the machine's drift hits both alike; medians of the rounds.

    git worktree add /tmp/old <commit> && (cd /tmp/old && LETHE_BUILD_CUDA=0 python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/ab_build.py /tmp/old [rounds]
"""
import json
import os
import statistics
import subprocess
import sys

CASES = {
    # fake_quantize int4-g128 forward + backward, 4096^2 fp32 (bench_quant.py's main case)
    "quant fwd+bwd (ms)": """
import time, torch, lethe
x = torch.randn(4096, 4096, requires_grad=True); gy = torch.randn(4096, 4096)
f = lambda: torch.autograd.grad(lethe.fake_quantize(x, 'int4-g128'), x, gy)
f(); ts = []
for _ in range(9):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
print(sorted(ts)[4] * 1e3)
""",
    # fused top-K KL loss + backward, N=4096 H=1024 V=32000 K=64 fp32 (bench_shred.py's main case)
    "shred loss+backward (s)": """
import time, torch, lethe
g = torch.Generator().manual_seed(0)
h = torch.randn(4096, 1024, generator=g).requires_grad_(True)
w = (torch.randn(32000, 1024, generator=g) / 32).requires_grad_(True)
ids = torch.arange(64) * 500 + torch.randint(0, 500, (4096, 64), generator=g)
q = torch.softmax(torch.randn(4096, 64, generator=g), -1)
f = lambda: torch.autograd.grad(lethe.ops.fused_linear_topk_kl(h, w, ids, q), (h, w))
f(); ts = []
for _ in range(3):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
print(sorted(ts)[1])
""",
}


def run(code, checkout):
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = os.path.join(checkout, "python")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.split()[-1])


def main(other, rounds=3):
    results = {name: {"installed": [], other: []} for name in CASES}
    for r in range(rounds):
        for name, code in CASES.items():
            order = ["installed", other] if r % 2 == 0 else [other, "installed"]
            for which in order:
                results[name][which].append(run(code, None if which == "installed" else other))
    summary = {name: {k: statistics.median(v) for k, v in res.items()} for name, res in results.items()}
    for name, med in summary.items():
        print(f"{name}: installed {med['installed']:.4g}, {other} {med[other]:.4g} "
              f"(installed / other = {med['installed'] / med[other]:.3f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
