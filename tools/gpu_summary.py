#!/usr/bin/env python
"""The summary of tools/gpu_check.sh: summary.json and summary.md in OUT, from the steps' results
(steps.tsv), every test's outcome (tests.jsonl) and the GPU benchmarks' reports (*_cuda.json).
Exits 1 when a step failed.

usage: python tools/gpu_summary.py OUT MODE"""
import collections
import json
import os
import platform
import sys


def load_steps(out):
    steps = {}
    path = os.path.join(out, "steps.tsv")
    for line in open(path) if os.path.exists(path) else []:
        name, rc, seconds, log = line.rstrip("\n").split("\t")
        steps[name] = {"exit": int(rc), "seconds": int(seconds), "log": log,
                       "status": "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "failed")}
    return steps


def load_tests(path):
    """{test file: {passed, failed, skipped, error, failures: [...]}}"""
    files = collections.OrderedDict()
    for line in open(path) if os.path.exists(path) else []:
        r = json.loads(line)
        name = r["nodeid"].split("::")[0]
        f = files.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "seconds": 0.0, "failures": []})
        f[r["outcome"]] = f.get(r["outcome"], 0) + 1
        f["seconds"] = round(f["seconds"] + r["seconds"], 2)
        if r["outcome"] in ("failed", "error") and len(f["failures"]) < 25:
            f["failures"].append(f"{r['nodeid']}: {r['message']}")
    return files


RATIOS = ("speedup_vs_eager", "speedup_vs_compile", "fraction_of_matmul", "fraction_of_copy_bandwidth",
          "peak_extra_GiB", "TFLOPs", "GBps", "median_ms", "median_s")


def main(out, mode):
    import torch

    summary = {"mode": mode, "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    summary["steps"] = load_steps(out)
    summary["tests"] = load_tests(os.path.join(out, "tests.jsonl"))
    summary["benchmarks"] = {}
    for name in sorted(os.listdir(out)):
        if name.endswith("_cuda.json"):
            report = json.load(open(os.path.join(out, name)))
            summary["benchmarks"][name[:-5]] = {k: report[k] for k in ("shape", "dtype", *RATIOS) if k in report}
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)

    md = [f"# gpu-check ({mode})", "",
          f"{summary['device'] or 'no GPU'}; python {summary['python']}, torch {summary['torch']} "
          f"(CUDA {summary['cuda']}), triton {summary['triton']}", "", "| step | status | seconds |", "|---|---|---|"]
    md += [f"| {k} | {v['status']} (exit {v['exit']}) | {v['seconds']} |" for k, v in summary["steps"].items()]
    md += ["", "| test file | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
    for f, c in summary["tests"].items():
        md.append(f"| {f} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | {c['seconds']} |")
    failures = [x for c in summary["tests"].values() for x in c["failures"]]
    if failures:
        md += ["", "Failures (first 25 per file):", ""] + [f"- `{x}`" for x in failures]
    for name, b in summary["benchmarks"].items():
        md += ["", f"## {name}", "", "```", json.dumps(b, indent=1), "```"]
    if not summary["benchmarks"]:
        md += ["", "No GPU benchmark ran" + (" (no GPU)." if mode == "dry" else ".")]
    open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if any(v["exit"] != 0 for v in summary["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
