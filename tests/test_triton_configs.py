"""The Triton configurations tools/ptxas_report.py compiles for real GPUs (each module's
aot_configs) are the ones the launchers use: every launch of a representative set of calls, under
the interpreter or on a GPU, matches one of them in kernel, constexprs, warps and argument types."""
import pytest
import torch

import backends as B
from lethe.ops.quant_reference import nf4_tables
from lethe.triton_kernels import gu, quant, shred_kl, shred_teacher, ssd, token_stats

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64", torch.int64: "i64",
         torch.int32: "i32", torch.uint8: "u8"}


def _matches(launch, cfg):
    name, args, kwargs = launch
    fn = cfg["kernel"]
    if fn.__name__ != name or cfg["num_warps"] != kwargs.get("num_warps"):
        return False
    if any(kwargs.get(k) != v for k, v in cfg["constexprs"].items()):
        return False
    params = [a for a in fn.arg_names if a not in cfg["constexprs"]]
    for p, a in zip(params, args):
        want = cfg["signature"][p]
        if isinstance(a, torch.Tensor):
            if want != "*" + TYPES[a.dtype]:
                return False
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            return False
        elif isinstance(a, float) and want != "fp32":
            return False
        elif isinstance(a, int) and not (want in ("i32", "i64") and (want == "i64" or -2**31 <= a < 2**31)):
            return False
    return True


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch while the fixture is active: (kernel name, positional args, kwargs)."""
    seen = []
    if B.INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction as F

        orig = F.run

        def run(self, *args, grid, warmup, **kwargs):
            seen.append((self.fn.__name__, args, kwargs))
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
    else:
        from triton.runtime.jit import JITFunction as F

        orig = F.run

        def run(self, *args, grid, warmup, **kwargs):
            seen.append((self.fn.__name__, args, kwargs))
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(F, "run", run)
    return seen


def test_every_launch_is_a_compiled_configuration(launches):
    dev = B.TRITON.device
    g = torch.Generator().manual_seed(0)
    tables = tuple(t.to(dev) for t in nf4_tables())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, group in (((3, 5), 5), ((2, 4096), 4096), ((2, 4100), 4100), ((4, 256), 1)):
            x = torch.randn(shape, generator=g).to(dtype).to(dev)
            for codebook, symmetric in ((0, True), (0, False), (1, True)):
                for mask in (True, False):
                    quant.fake_quantize(x, group, 4, codebook, symmetric, 7.0, mask, tables=tables)
        quant.fake_quantize_backward(x, x > 0)
        n, v, k, h = 5, 37, 4, 8
        z = torch.randn(n, v, generator=g).to(dtype).to(dev)
        ids = torch.randint(0, v, (n, k), generator=g).to(dev)
        q = torch.softmax(torch.randn(n, k, generator=g), -1).to(dev)
        w = torch.rand(n, generator=g).to(dev)
        for full in (True, False):
            loss, lse = shred_kl.topk_kl(z, ids, q, w, full)
            shred_kl.topk_kl_backward(torch.ones(n, device=dev), z, ids, q, lse, None, full)
            hidden = torch.randn(n, h, generator=g).to(dtype).to(dev)
            weight = torch.randn(v, h, generator=g).to(dtype).to(dev)
            shred_kl.fused_linear_topk_kl(hidden, weight, weight[:, 0].contiguous(), ids, q, w,
                                          torch.ones(n, device=dev), full, 2)
            shred_kl.fused_linear_topk_kl(hidden, weight, None, ids, q, None, None, full, 2)
        lab = torch.randint(0, v, (n,), generator=g).to(dev)
        tk = shred_teacher.teacher_topk(hidden, weight, None, lab, k, 2)
        shred_teacher.select_forget_positions(tk[2].to(dtype).view(1, -1), lab.view(1, -1), 0.5, 1)
        for variant in (0, 1):
            shred_teacher.demote_targets(tk[0], tk[1].to(dtype), lab, lab > 3, variant, 0.4)
        for bias, ignore in ((None, -100), (weight[:, 0].contiguous(), 3)):
            token_stats.token_stats(hidden, weight, bias, lab, ignore, 2)
    configs = [c for m in (quant, shred_kl, shred_teacher, token_stats) for c in m.aot_configs()]
    kernels = {name for name, _, _ in launches}
    assert kernels == {c["kernel"].__name__ for c in configs}, "a kernel is never launched, or not compiled"
    for launch in launches:
        assert any(_matches(launch, c) for c in configs), (launch[0], launch[2])


def test_kernels_run_where_they_can():
    # without a GPU the kernels can only run interpreted, which must be on before they are defined
    from triton.runtime.interpreter import InterpretedFunction

    kernels = {c["kernel"] for m in (gu, quant, shred_kl, shred_teacher, ssd, token_stats) for c in m.aot_configs()}
    assert B.GPU or (B.INTERPRETED and all(isinstance(k, InterpretedFunction) for k in kernels))


def test_every_gu_launch_is_a_compiled_configuration(launches):
    """The gu launchers over basis dtypes, row counts (bucketed), data dtypes, gram, metric, dots."""
    dev = B.TRITON.device
    g = torch.Generator().manual_seed(0)
    for bdt in (torch.float32, torch.float64):
        for k in (0, 1, 2, 3, 5, 8, 16):
            shapes = [(7, 3), (11,)]
            basis = [torch.randn((k, *s), generator=g).to(bdt).to(dev) for s in shapes]
            for xdt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                x = [torch.randn(s, generator=g).to(xdt).to(dev) for s in shapes]
                v = [torch.rand(s, generator=g).to(xdt).to(dev) for s in shapes]
                for gram in (False, True):
                    for metric in (None, v):
                        gu.subspace_dots(basis, x, metric, 1e-8, [0, 1], 2, gram)
                gu.subspace_dots(basis, None, None, 0.0, [0, 0], 1, True)
                coeff = torch.randn(2, k, generator=g, dtype=torch.float64).to(dev)
                scale = torch.ones(2, dtype=torch.float64, device=dev)
                for dots in (False, True):
                    out = [torch.zeros(s, dtype=xdt, device=dev) for s in shapes]
                    gu.subspace_axpy(out, x, basis, coeff, scale, [0, 1], dots)
                    gu.subspace_axpy(out, None, basis, coeff, scale, [0, 1], dots)
            gu.subspace_transform(basis, torch.randn(2, k, k, generator=g, dtype=torch.float64).to(dev), [0, 1])
    configs = list(gu.aot_configs())
    kernels = {name for name, _, _ in launches}
    assert kernels == {c["kernel"].__name__ for c in configs}, "a kernel is never launched, or not compiled"
    for launch in launches:
        assert any(_matches(launch, c) for c in configs), (launch[0], launch[2])


def test_every_ssd_launch_is_a_compiled_configuration(launches):
    """The ssd launchers over accumulator, gradient and parameter dtypes and every exponent kind."""
    dev = B.TRITON.device
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (11,)]
    for acc in (torch.float32, torch.bfloat16):
        for gdt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            imp = [torch.rand(s, generator=g).to(acc).to(dev) for s in shapes]
            ssd.fisher_accumulate(imp, [torch.randn(s, generator=g).to(gdt).to(dev) for s in shapes], 1.0, 3)
        for pdt in (torch.float32, torch.float16, torch.bfloat16):
            for e in (0.0, 1.0, 2.0, 3.0, -1.0, 0.5):
                p = [torch.randn(s, generator=g).to(pdt).to(dev) for s in shapes]
                d = [torch.rand(s, generator=g).to(acc).to(dev) for s in shapes]
                ssd.ssd_dampen(p, d, [x * 20 for x in d], 10.0, 1.0, e, 1.0)
    configs = list(ssd.aot_configs())
    kernels = {name for name, _, _ in launches}
    assert kernels == {c["kernel"].__name__ for c in configs}, "a kernel is never launched, or not compiled"
    for launch in launches:
        assert any(_matches(launch, c) for c in configs), (launch[0], launch[2])
