#!/usr/bin/env python
"""Register use and spills of every CUDA and Triton kernel, for real GPUs, without one.

CUDA: from ptxas -v in the build log (setup.py passes -Xptxas=-v); results are merged into
build/ptxas.json, so an incremental build that did not recompile a .cu file still reports its
kernels. Triton: every configuration each launcher can choose (the aot_configs() of each module in
triton_kernels/) is compiled to PTX for sm_80 and sm_90a (triton.compile with a GPUTarget), and
Triton's bundled ptxas -v reports registers, spills and shared memory; cached in
build/triton_ptxas.json until the kernels' sources or Triton change.

Exits 1 on a spill, unless the kernel is listed in tools/spills_allowed.txt with the reason.

usage: python tools/ptxas_report.py [build/build.log]"""
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "build", "ptxas.json")
TRITON_STORE = os.path.join(ROOT, "build", "triton_ptxas.json")
ALLOWED = os.path.join(ROOT, "tools", "spills_allowed.txt")
TRITON_ARCHS = (80, 90)  # sm_80 and sm_90a (Triton targets sm_90a for capability 9.0)

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


# ---- Triton: compile every configuration for real GPUs ----

def _triton_configs(module):
    import importlib

    return list(importlib.import_module(f"lethe.triton_kernels.{module}").aot_configs())


def _compile_one(task):
    """(module, index, arch) -> the entry of one configuration compiled for one GPU."""
    os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: real kernels
    module, index, arch = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    cfg = _triton_configs(module)[index]
    fn, constexprs = cfg["kernel"], cfg["constexprs"]
    missing = [a for a in fn.arg_names if a not in cfg["signature"] and a not in constexprs]
    if missing:
        raise ValueError(f"{module}.aot_configs: {fn.__name__} has no type for {missing}")
    signature = {a: "constexpr" if a in constexprs else cfg["signature"][a] for a in fn.arg_names}
    # the JIT's specialisation: 16-byte aligned pointers (every torch allocation is), and sizes
    # divisible by 16 (vocabularies, hidden sizes); flags are do_not_specialize in the kernels
    plain = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if signature[a].startswith("*") or (signature[a] in ("i32", "i64") and a not in plain)}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg["num_warps"], "enable_fp_fusion": False})
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    try:
        ptxas = get_ptxas(arch)
    except TypeError:  # Triton versions before the arch argument
        ptxas = get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas[0] if isinstance(ptxas, tuple) else ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    props, used = PROPS.search(text), USED.search(text)
    dtypes = sorted({v for v in cfg["signature"].values() if v.startswith("*") and v not in ("*i64", "*i32", "*u8")})
    label = ",".join([f"{k}={v}" for k, v in constexprs.items()] + ["/".join(dtypes)])
    return {"kernel": f"triton:{fn.__name__}[{label}]", "arch": gpu, "registers": int(used.group(1)),
            "stack": int(props.group(1)), "spill_stores": int(props.group(2)), "spill_loads": int(props.group(3)),
            "shared": compiled.metadata.shared}


def _triton_modules():
    """The modules of triton_kernels/ that declare their configurations (aot_configs)."""
    folder = os.path.join(ROOT, "triton_kernels")
    return sorted(n[:-3] for n in os.listdir(folder)
                  if n.endswith(".py") and "def aot_configs(" in open(os.path.join(folder, n)).read())


def _triton_key():
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for name in sorted(os.listdir(os.path.join(ROOT, "triton_kernels"))) + [__file__]:
        path = name if os.path.isabs(name) else os.path.join(ROOT, "triton_kernels", name)
        if path.endswith(".py"):
            h.update(open(path, "rb").read())
    return h.hexdigest()


def triton_entries():
    """{name@arch: entry} for every Triton configuration, from the cache when the sources match."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    key = _triton_key()
    if os.path.exists(TRITON_STORE):
        cached = json.load(open(TRITON_STORE))
        if cached.get("key") == key:
            return cached["entries"]
    tasks = [(m, i, a) for m in _triton_modules() for i in range(len(_triton_configs(m))) for a in TRITON_ARCHS]
    print(f"ptxas report: compiling {len(tasks)} Triton kernel configurations for sm_80 and sm_90a ...",
          flush=True)
    # spawned, not forked: the workers import the kernels afresh, without the interpreter
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_one, tasks))
    entries = {f"{e['kernel']}@{e['arch']}": e for e in results}
    os.makedirs(os.path.dirname(TRITON_STORE), exist_ok=True)
    json.dump({"key": key, "entries": entries}, open(TRITON_STORE, "w"), indent=1)
    return entries


def main(argv):
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels, also in the workers it starts
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
    entries = {}
    if cuda_built:
        entries = {f"{src}:{k}": e for src, es in store.items() for k, e in es.items()}
        if not entries:
            print("ptxas report: CUDA was built but no ptxas output was found; run `make clean test`")
            return 1
    else:
        print("ptxas report: CUDA kernels were not built (CPU-only build)")
    triton = triton_entries()
    if triton is None:
        print("ptxas report: Triton is not installed; no Triton kernels to compile")
    else:
        entries.update(triton)
    names = demangle(sorted({e["kernel"] for e in entries.values()}))
    ok_list = allowed()
    bad = []
    print(f"{'kernel':78s} {'arch':7s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'smem':>6s}")
    for key in sorted(entries, key=lambda k: (names[entries[k]["kernel"]], entries[k]["arch"])):
        e = entries[key]
        name = names[e["kernel"]]
        short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "").replace("void ", ""))[:78]
        spills = e.get("spill_stores", 0) + e.get("spill_loads", 0)
        note = ""
        if spills:
            reason = next((r for k, r in ok_list.items() if k in name), None)
            note = f"  allowed: {reason}" if reason else "  SPILLS"
            if not reason:
                bad.append(short)
        smem = str(e["shared"]) if "shared" in e else ""
        print(f"{short:78s} {e['arch']:7s} {e.get('registers', -1):4d} {e.get('stack', 0):5d} "
              f"{e.get('spill_stores', 0):5d}/{e.get('spill_loads', 0):<5d} {smem:>6s}{note}")
    if bad:
        print(f"ptxas report: {len(bad)} kernel(s) spill registers and are not listed in "
              f"tools/spills_allowed.txt: {sorted(set(bad))}")
        return 1
    print(f"ptxas report: {len(entries)} kernel/arch entries ({len(triton or {})} Triton), no unlisted spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
