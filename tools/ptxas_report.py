#!/usr/bin/env python
"""Register use and spills of every CUDA kernel, from ptxas -v in the build log (setup.py passes
-Xptxas=-v). Exits 1 on a spill, unless the kernel is listed in csrc/cuda/spills_allowed.txt with
the reason. Results are merged into build/ptxas.json, so an incremental build that did not recompile
a .cu file still reports that file's kernels.

usage: python tools/ptxas_report.py build/build.log"""
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "build", "ptxas.json")
ALLOWED = os.path.join(ROOT, "csrc", "cuda", "spills_allowed.txt")

SOURCE = re.compile(r"\[\d+/\d+\] \S*nvcc .* -c (\S+\.cu)\b")
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def parse(text):
    """{source.cu: {kernel@arch: entry}} for every .cu file compiled in this log."""
    found, src, cur = {}, "?", None
    for line in text.splitlines():
        if m := SOURCE.search(line):
            src = os.path.relpath(m.group(1), ROOT)
            found[src] = {}
        elif m := ENTRY.search(line):
            cur = f"{m.group(1)}@{m.group(2)}"
            found.setdefault(src, {})[cur] = {"kernel": m.group(1), "arch": m.group(2)}
        elif cur and (m := PROPS.search(line)):
            found[src][cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur and (m := USED.search(line)):
            found[src][cur]["registers"] = int(m.group(1))
    return found


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return dict(zip(names, names))
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


def allowed():
    table = {}
    if os.path.exists(ALLOWED):
        for line in open(ALLOWED):
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(":")
                table[name.strip()] = reason.strip()
    return table


def main(argv):
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from lethe import _lib

    cuda_built = _lib.build_info().get("cuda", False)
    store = json.load(open(STORE)) if os.path.exists(STORE) else {}
    if len(argv) > 1 and os.path.exists(argv[1]):
        fresh = parse(open(argv[1], errors="replace").read())
        # a recompiled .cu replaces its entries; files not recompiled keep theirs
        store.update(fresh)
        store = {src: e for src, e in store.items() if os.path.exists(os.path.join(ROOT, src))}
        os.makedirs(os.path.dirname(STORE), exist_ok=True)
        json.dump(store, open(STORE, "w"), indent=1)
    if not cuda_built:
        print("ptxas report: CUDA kernels were not built (CPU-only build)")
        return 0
    entries = {f"{src}:{k}": e for src, es in store.items() for k, e in es.items()}
    if not entries:
        print("ptxas report: CUDA was built but no ptxas output was found; run `make clean test`")
        return 1
    names = demangle(sorted({e["kernel"] for e in entries.values()}))
    ok_list = allowed()
    bad = []
    print(f"{'kernel':70s} {'arch':8s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s}")
    for key in sorted(entries, key=lambda k: (names[entries[k]["kernel"]], entries[k]["arch"])):
        e = entries[key]
        name = names[e["kernel"]]
        short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "").replace("void ", ""))[:70]
        spills = e.get("spill_stores", 0) + e.get("spill_loads", 0)
        note = ""
        if spills:
            reason = next((r for k, r in ok_list.items() if k in name), None)
            note = f"  allowed: {reason}" if reason else "  SPILLS"
            if not reason:
                bad.append(short)
        print(f"{short:70s} {e['arch']:8s} {e.get('registers', -1):4d} {e.get('stack', 0):5d} "
              f"{e.get('spill_stores', 0):5d}/{e.get('spill_loads', 0):<5d}{note}")
    if bad:
        print(f"ptxas report: {len(bad)} kernel(s) spill registers and are not listed in "
              f"csrc/cuda/spills_allowed.txt: {sorted(set(bad))}")
        return 1
    print(f"ptxas report: {len(entries)} kernel/arch entries from {sorted(store)}, no unlisted spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
