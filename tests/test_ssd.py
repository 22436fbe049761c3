"""The ssd family (fisher_accumulate, ssd_dampen) on every backend against the pure-PyTorch
reference (ssd_reference.py: the authors' rule op for op) on awkward shapes and mixed dtypes, bit
for bit; crafted importances with zeros, exact ties, NaN and Inf; the bf16 accumulators' bias;
opcheck; bad input. Then lethe.nn.FisherDiagonal and SSD end to end: exact to the authors' protocol
(if-loops/selective-synaptic-dampening) on a small classifier, the parameter filter, resume, two
gloo processes, and the sweep on the built-in benchmark (figures in benchmarks/RESULTS.md)."""
import copy
import os

import pytest
import torch

import gloo
import lethe.methods as lm
import lethe.triton_kernels.ssd as tk
from lethe.nn import FisherDiagonal
from lethe.ops import fisher_accumulate, ssd_dampen
from lethe.ops import ssd_reference as R

SHAPES = [(5, 7), (40000,), (0,), (3,), (2, 3, 4)]  # 40000: several CPU blocks (16384)


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    monkeypatch.setattr(tk, "BLOCK", 256)  # several programs per tensor under the interpreter


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _equal_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def _shapes(backend):
    # the interpreter is slow: a smaller long tensor there (still several programs of 256)
    return [s if s != (40000,) or not backend.interpreted else (3000,) for s in SHAPES]


# ------------------------------------------------------------------------------------------------
# fisher_accumulate
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acc", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gdt", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fisher_accumulate_matches_the_reference_bit_for_bit(backend, acc, gdt):
    shapes = _shapes(backend)
    g = _gen(1)
    imp = [(torch.rand(s, generator=g) * 3).to(acc) for s in shapes]
    grad = [torch.randn(s, generator=g).to(gdt) for s in shapes]
    for scale, seed in ((1.0, 0), (0.37, 2**40 + 3), (0.0, -5)):
        want = R.fisher_accumulate_reference(imp, grad, scale, seed)
        got = backend.to([t.clone() for t in imp])
        backend.public(fisher_accumulate, got, grad, scale=scale, seed=seed)
        for w, o in zip(want, got):
            assert _equal_bits(o.cpu(), w)


def test_fisher_accumulate_with_scale_one_is_the_authors_update():
    g = _gen(2)
    imp = [torch.rand(s, generator=g) for s in SHAPES]
    grad = [torch.randn(s, generator=g) for s in SHAPES]
    want = [i + gr.clone().pow(2) for i, gr in zip(imp, grad)]  # their `imp.data += p.grad.data.clone().pow(2)`
    fisher_accumulate(imp, grad)
    assert all(torch.equal(a, b) for a, b in zip(imp, want))


def test_bf16_stochastic_rounding_is_unbiased_where_round_to_nearest_stagnates():
    """256 batches of squared gradients into bf16: the mean relative error of lethe's stochastic
    rounding stays within 1e-3 of the fp64 sums (its bound here); bf16 round-to-nearest
    accumulation (torch's `imp += g * g` in bf16) loses more than 2% to stagnation."""
    n, steps = 20000, 256
    g = _gen(3)
    sr = torch.zeros(n, dtype=torch.bfloat16)
    rn = torch.zeros(n, dtype=torch.bfloat16)
    exact = torch.zeros(n, dtype=torch.float64)
    for s in range(steps):
        gr = torch.randn(n, generator=g) * 0.1
        fisher_accumulate([sr], [gr], seed=s)
        rn += (gr * gr).to(torch.bfloat16)
        exact += gr.double() ** 2
    bias_sr = float(((sr.double() - exact) / exact).mean())
    bias_rn = float(((rn.double() - exact) / exact).mean())
    spread = float(((sr.double() - exact) / exact).std())
    print(f"bf16 accumulators over {steps} batches: mean relative error {bias_sr:.2e} (spread {spread:.2e}) "
          f"stochastic, {bias_rn:.2e} round-to-nearest")
    assert abs(bias_sr) < 1e-3
    assert bias_rn < -0.02


def test_bf16_rounding_is_reproducible_and_seed_dependent():
    grad = [torch.rand(1000, generator=_gen(4)) * 0.1]  # g^2 below an ulp of 1: rounded up or down
    outs = []
    for seed in (7, 7, 8):
        a = [torch.ones(1000, dtype=torch.bfloat16)]
        fisher_accumulate(a, grad, seed=seed)
        outs.append(a[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------------
# ssd_dampen
# ------------------------------------------------------------------------------------------------

def _importances(shapes, g, dtype=torch.float32):
    d = [(torch.rand(s, generator=g) ** 4).to(dtype) for s in shapes]
    f = [(torch.rand(s, generator=g) ** 4 * 12).to(dtype) for s in shapes]
    return d, f


def _crafted(alpha=10.0):
    """Importances with the edge cases: f = 0 (never selected), d = 0 with f > 0 (selected, weight
    zeroed), f exactly alpha * d (a tie: not selected), both 0, Inf and NaN."""
    d = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 2.0, float("inf"), float("nan"), 1.0, 3e-38, 1.0, 1e-3])
    f = torch.tensor([0.0, 1.0, 10.0, 5.0000005, 0.0, 30.0, 1.0, 1.0, float("inf"), 1.0, float("nan"), 2.0])
    p = torch.linspace(-2, 2, d.numel())
    return p, d, f


@pytest.mark.parametrize("pdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exponent", [1.0, 0.0, 2.0, 3.0, -1.0])
def test_ssd_dampen_matches_the_reference_bit_for_bit(backend, pdt, idt, exponent):
    shapes = _shapes(backend)
    g = _gen(5)
    d, f = _importances(shapes, g, idt)
    p = [torch.randn(s, generator=g).to(pdt) for s in shapes]
    for alpha, lambd, bound in ((10.0, 1.0, 1.0), (2.5, 0.3, 0.5), (1.0, 0.0, 1.0)):
        new, counts, sums = R.ssd_dampen_reference(p, d, f, alpha, lambd, exponent, bound)
        got = backend.to([t.clone() for t in p])
        st = backend.public(ssd_dampen, got, d, f, alpha=alpha, lambd=lambd, exponent=exponent, bound=bound)
        for w, o in zip(new, got):
            assert _equal_bits(o.cpu(), w)
        assert torch.equal(st.selected.cpu(), counts) and counts.sum() > 0
        assert torch.allclose((st.mean_factor.cpu() * counts), sums, rtol=1e-9, atol=1e-12)
        assert torch.equal(st.mean_factor.cpu()[counts == 0], torch.ones(int((counts == 0).sum()), dtype=torch.float64))


@pytest.mark.parametrize("exponent", [0.5, 0.3, -0.5, 1.7])
def test_ssd_dampen_other_exponents_are_correctly_rounded_powers(backend, exponent):
    """For an exponent torch's pow does not special-case, lethe's factor is the fp64 power rounded
    to fp32: the dampened weights are within 2 ulp of the exact product of the weight and the
    exact power of the fp32 ratio; torch's fp32 pow (the reference) is up to ~16 ulp away from it."""
    shapes = _shapes(backend)
    g = _gen(6)
    d, f = _importances(shapes, g)
    p = [torch.randn(s, generator=g) for s in shapes]
    new, counts, _ = R.ssd_dampen_reference(p, d, f, 10.0, 1.0, exponent, 1.0)
    got = backend.to([t.clone() for t in p])
    st = backend.public(ssd_dampen, got, d, f, exponent=exponent)
    assert torch.equal(st.selected.cpu(), counts)
    for w, o, pt, dt, ft in zip(new, got, p, d, f):
        sel = ft > dt * 10.0
        exact = torch.where(sel, pt.double() * ((dt * 1.0) / ft).double().pow(exponent).clamp(max=1.0), pt.double())
        torch.testing.assert_close(o.cpu().double(), exact, rtol=2.4e-7, atol=0)
        torch.testing.assert_close(o.cpu(), w, rtol=2e-6, atol=0)


def test_ssd_dampen_crafted_zeros_ties_and_non_finite_importances(backend):
    p, d, f = _crafted()
    new, counts, sums = R.ssd_dampen_reference([p], [d], [f], 10.0, 1.0, 1.0, 1.0)
    got = backend.to([p.clone()])
    st = backend.public(ssd_dampen, got, [d], [f])
    out = got[0].cpu()
    assert _equal_bits(out, new[0])
    sel = f > d * 10.0
    # f = 0: never selected; d = 0 < f: selected and zeroed; the tie f = 10 d: kept; NaN: kept
    assert not sel[0] and sel[1] and out[1] == 0 and not sel[2] and out[2] == p[2] and not sel[4]
    assert not sel[7] and not sel[10] and out[7] == p[7] and out[10] == p[10]
    assert sel[8] and out[8] == 0  # f = Inf: w = d / Inf = 0
    assert not torch.isnan(out).any() and int(st.selected[0]) == int(sel.sum()) == int(counts[0])


def test_inputs_may_alias_each_other(backend):
    """I_D and I_f the same tensors (or one tensor twice in a list): only the written list is checked."""
    p, d, f = _crafted()
    want = R.ssd_dampen_reference([p.clone(), p.clone()], [d, d], [d, d], 0.5, 1.0, 1.0, 1.0)[0]
    got = backend.to([p.clone(), p.clone()])
    dd = backend.to(d)
    backend.public(ssd_dampen, got, [dd, dd], [dd, dd], alpha=0.5)
    assert all(_equal_bits(g.cpu(), w) for g, w in zip(got, want))


def test_ssd_dampen_empty_tensors_and_a_list_of_empties(backend):
    p = backend.to([torch.zeros(0), torch.zeros(0, 3)])
    st = backend.public(ssd_dampen, p, [torch.zeros(0), torch.zeros(0, 3)], [torch.zeros(0), torch.zeros(0, 3)])
    assert st.selected.tolist() == [0, 0] and st.mean_factor.tolist() == [1.0, 1.0]
    imp = backend.to([torch.zeros(0)])
    backend.public(fisher_accumulate, imp, [torch.zeros(0)])


@pytest.mark.parametrize("which", ["fisher_accumulate", "ssd_dampen"])
def test_opcheck(which):
    g = _gen(7)
    if which == "fisher_accumulate":
        args = ([torch.rand(5, 3, generator=g), torch.rand(4, generator=g).bfloat16()],
                [torch.randn(5, 3, generator=g), torch.randn(4, generator=g).half()], 0.5, 3)
    else:
        d, f = _importances([(5, 3), (4,)], g)
        args = ([torch.randn(5, 3, generator=g), torch.randn(4, generator=g).bfloat16()], d, f, 2.0, 1.0, 1.0, 1.0)
    for op in (getattr(torch.ops.lethe, which), getattr(torch.ops.lethe, which + "_triton")):
        torch.library.opcheck(op, copy.deepcopy(args), test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    f32 = lambda *s: torch.zeros(*s)  # noqa: E731
    ok = dict(param=[f32(3)], importance=[f32(3)], forget_importance=[f32(3)])
    yield "dampen", dict(ok, param=[]), ValueError, "param must hold at least one tensor"
    yield "dampen", dict(ok, param=[torch.zeros(3, dtype=torch.float64)]), TypeError, \
        r"param\[0\] must be float32, float16 or bfloat16, got torch.float64"
    yield "dampen", dict(ok, importance=[f32(3), f32(3)]), ValueError, \
        r"importance must hold one tensor per param tensor \(1\), got 2"
    yield "dampen", dict(ok, forget_importance=[f32(4)]), ValueError, \
        r"forget_importance\[0\] must have the shape of param\[0\] \(\[3\]\), got \[4\]"
    yield "dampen", dict(ok, importance=[torch.zeros(3, dtype=torch.float16)]), TypeError, \
        r"importance\[0\] must be float32 or bfloat16, got torch.float16"
    yield "dampen", dict(ok, importance=[f32(6)[::2]]), ValueError, r"importance\[0\] must be contiguous"
    yield "dampen", dict(ok, importance=[torch.zeros(3, device="meta")]), ValueError, \
        r"importance\[0\] must be on param\[0\]'s device \(cpu\), got meta"
    yield "dampen", dict(ok, alpha=0.0), ValueError, "alpha must be a finite number > 0, got 0"
    yield "dampen", dict(ok, alpha=float("nan")), ValueError, "alpha must be a finite number > 0, got nan"
    yield "dampen", dict(ok, lambd=-1.0), ValueError, "lambd must be a finite number >= 0, got -1"
    yield "dampen", dict(ok, exponent=float("inf")), ValueError, "exponent must be a finite number, got inf"
    yield "dampen", dict(ok, bound=-0.5), ValueError, "bound must be a finite number >= 0, got -0.5"
    shared = f32(3)
    yield "dampen", dict(ok, param=[shared], importance=[shared]), ValueError, \
        r"param\[0\] must not overlap importance\[0\] or forget_importance\[0\]"
    two = f32(3)
    yield "dampen", dict(ok, param=[two, two], importance=[f32(3), f32(3)], forget_importance=[f32(3), f32(3)]), \
        ValueError, r"param\[0\] must not overlap param\[1\]"
    yield "dampen", dict(ok, param=[two, f32(3)], importance=[f32(3), two], forget_importance=[f32(3), f32(3)]), \
        ValueError, r"param\[0\] must not overlap importance\[1\]"
    okf = dict(importance=[f32(3)], grad=[f32(3)])
    yield "fisher", dict(importance=[shared[:2], f32(3)], grad=[f32(2), shared]), ValueError, \
        r"importance\[0\] must not overlap grad\[1\]"
    yield "fisher", dict(okf, importance=[torch.zeros(3, dtype=torch.float16)]), TypeError, \
        r"importance\[0\] must be float32 or bfloat16, got torch.float16"
    yield "fisher", dict(okf, grad=[torch.zeros(3, dtype=torch.int64)]), TypeError, \
        r"grad\[0\] must be float32, float16, bfloat16 or float64, got torch.int64"
    yield "fisher", dict(okf, grad=[]), ValueError, r"grad must hold one tensor per importance tensor \(1\), got 0"
    yield "fisher", dict(okf, grad=[f32(2, 2)]), ValueError, \
        r"grad\[0\] must have the shape of importance\[0\] \(\[3\]\), got \[2, 2\]"
    yield "fisher", dict(okf, scale=-1.0), ValueError, "scale must be a finite number >= 0, got -1"
    yield "fisher", dict(okf, grad=[torch.zeros(3, device="meta")]), ValueError, \
        r"grad\[0\] must be on importance\[0\]'s device \(cpu\), got meta"
    yield "fisher", dict(okf, grad=[shared], importance=[shared]), ValueError, \
        r"importance\[0\] must not overlap grad\[0\]"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[3][:40] if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("path", ["public", "native", "triton", "reference"])
def test_bad_input_gets_the_same_clear_error_everywhere(case, path):
    which, kw, err, match = case
    if which == "dampen":
        kw = {"alpha": 10.0, "lambd": 1.0, "exponent": 1.0, "bound": 1.0, **kw}
        names = ["param", "importance", "forget_importance", "alpha", "lambd", "exponent", "bound"]
        fn, op = ssd_dampen, "ssd_dampen"
    else:
        kw = {"scale": 1.0, "seed": 0, **kw}
        names = ["importance", "grad", "scale", "seed"]
        fn, op = fisher_accumulate, "fisher_accumulate"
    with pytest.raises(err, match=match):
        if path in ("public", "reference"):
            fn(*[kw[n] for n in names[:3 if which == "dampen" else 2]],
               **{n: kw[n] for n in names[3 if which == "dampen" else 2:]},
               backend=None if path == "public" else "reference")
        else:
            getattr(torch.ops.lethe, op if path == "native" else op + "_triton")(*[kw[n] for n in names])


# ------------------------------------------------------------------------------------------------
# Exact to the authors' protocol on a small classifier
# ------------------------------------------------------------------------------------------------

def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 5))


def _authors_importance(model, batches):
    """The authors' calc_importance, written down: per batch the CrossEntropyLoss's gradients
    squared and summed (`imp += grad.pow(2)`), then divided by the number of batches."""
    crit = torch.nn.CrossEntropyLoss()
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        for (n, p) in model.named_parameters():
            if p.grad is not None:
                imp[n].data += p.grad.data.clone().pow(2)
    for t in imp.values():
        t.data /= float(len(batches))
    return imp


def _authors_modify(model, oimp, fimp, alpha, lambd):
    """The authors' modify_weight (exponent 1, lower bound 1), written down."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            locations = torch.where(fimp[n] > oimp[n].mul(alpha))
            weight = (oimp[n].mul(lambd)).div(fimp[n]).pow(1)
            update = weight[locations]
            update[torch.where(update > 1)] = 1
            p[locations] = p[locations].mul(update)


@pytest.mark.parametrize("backend_name", ["native", "triton"])
def test_ssd_equals_the_authors_protocol_bit_for_bit_on_a_classifier(backend_name):
    g = _gen(8)
    x = torch.randn(96, 12, generator=g)
    y = torch.randint(0, 5, (96,), generator=g)
    forget = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 16, 8)]  # the first 16 rows
    full = [(x[i:i + 8], y[i:i + 8]) for i in range(16, 96, 8)] + forget  # retain then forget, unshuffled
    alpha, lambd = 2.0, 0.7
    theirs = _classifier().eval()
    fimp = _authors_importance(theirs, forget)
    oimp = _authors_importance(theirs, full)
    _authors_modify(theirs, oimp, fimp, alpha, lambd)

    ours = _classifier().eval()
    params = list(ours.parameters())
    crit = torch.nn.CrossEntropyLoss()
    fishers = []
    for batches in (forget, full):
        fd = FisherDiagonal(params, backend=backend_name)
        for xb, yb in batches:
            fd.accumulate(list(torch.autograd.grad(crit(ours(xb), yb), params)))
        fishers.append(fd.mean())
    for (n, _), a, b in zip(ours.named_parameters(), fishers[0], fishers[1]):
        assert torch.equal(a, fimp[n]) and torch.equal(b, oimp[n])
    st = ssd_dampen(params, fishers[1], fishers[0], alpha=alpha, lambd=lambd, backend=backend_name)
    assert int(st.selected.sum()) > 0
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------

def test_parameter_filter_by_name_and_module_type_visits_a_tied_weight_once():
    from lethe.methods.ssd import ssd_parameters

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.mlp = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    m = Tied()
    names = [n for n, _ in ssd_parameters(m)]
    assert names == ["embed.weight", "mlp.weight", "mlp.bias"]
    assert [n for n, _ in ssd_parameters(m, modules=("Linear",))] == ["mlp.weight", "mlp.bias"]
    assert [n for n, _ in ssd_parameters(m, params=("*.weight",), modules=("Linear",))] == ["mlp.weight"]
    with pytest.raises(ValueError, match=r"params: pattern 'nope\*' matches no parameter of the model"):
        ssd_parameters(m, params=("nope*",))
    with pytest.raises(ValueError, match=r"modules: no module of the model is a 'Conv2d'"):
        ssd_parameters(m, modules=("Conv2d",))
    with pytest.raises(ValueError, match="leaves no parameter"):
        ssd_parameters(m, params=("embed.*",), modules=("Linear",))


def test_ssd_config_errors_name_the_field():
    for kw, match in ((dict(alpha=0), "alpha must be a number > 0"), (dict(lambd=-1), "lambd must be a finite number"),
                      (dict(accumulator="fp8"), "accumulator must be one of"), (dict(batch_size=0), "batch_size"),
                      (dict(params=[]), "params must be None or a non-empty list")):
        with pytest.raises(ValueError, match=f"SSDConfig: {match}"):
            lm.SSDConfig(**kw)


def test_ssd_refuses_a_trainer_and_a_training_loop(models, sets, tmp_path):
    from lethe.integrations.hf import UnlearnTrainer, training_arguments

    with pytest.raises(ValueError, match="'ssd' is a one-shot method"):
        UnlearnTrainer(model=copy.deepcopy(models["target"]), args=training_arguments(lm.UnlearnConfig(), tmp_path),
                       method="ssd", forget=sets[0], retain=sets[1])
    with pytest.raises(ValueError, match="retain: method 'ssd' needs a retain set"):
        lm.unlearn(copy.deepcopy(models["target"]), sets[0], None, "ssd", progress=False)


@pytest.mark.parametrize("accumulator", ["float32", "bfloat16"])
def test_resume_equals_uninterrupted(models, sets, tmp_path, accumulator):
    cfg = {"accumulator": accumulator, **lm.SSD.benchmark_config}
    a = copy.deepcopy(models["target"])
    ra = lm.unlearn(a, sets[0], sets[1], "ssd", cfg, progress=False)
    b = copy.deepcopy(models["target"])
    part = lm.unlearn(b, sets[0], sets[1], "ssd", cfg, checkpoint_dir=tmp_path, checkpoint_every=5, stop_after=12,
                      progress=False)
    assert not part.complete and len(part.log) == 12
    c = copy.deepcopy(models["target"])
    done = lm.unlearn(c, sets[0], sets[1], "ssd", cfg, checkpoint_dir=tmp_path, checkpoint_every=5, resume=True,
                      progress=False)
    assert done.complete and [e["step"] for e in done.log] == [e["step"] for e in ra.log]
    assert done.log[-1]["selected"] == ra.log[-1]["selected"] > 0
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    again = lm.unlearn(copy.deepcopy(models["target"]), sets[0], sets[1], "ssd", cfg, checkpoint_dir=tmp_path,
                       checkpoint_every=5, resume=True, progress=False)  # finished: the saved model, nothing redone
    for p, q in zip(a.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_ssd_sweep_on_the_benchmark_forgets_and_keeps_utility(models, sets, bench):
    """A small sweep of alpha and lambda (SSD's default alpha = 10 is printed too): the best point
    (the highest forget quality among those keeping utility >= 0.8 of the target's) lowers the
    forget answers' probability to at most half the target's, and so does the benchmark point
    (SSD.benchmark_config, which `lethe demo` runs) at >= 0.8 of the utility."""
    from lethe.eval.evaluator import Evaluator, builtin_data

    ev = Evaluator(builtin_data(bench, "forget10"), bench.tokenizer(), models["retain"], retain_size=100,
                   world_size=100)
    t = ev.metrics(models["target"])
    rows = []
    for alpha in (2.0, 3.0, 5.0, 10.0):
        for lambd in (0.5, 1.0):
            m = copy.deepcopy(models["target"])
            res = lm.unlearn(m, sets[0], sets[1], "ssd", {"alpha": alpha, "lambd": lambd}, progress=False)
            got = ev.metrics(m)
            rows.append((alpha, lambd, got["forget"]["prob"], got["model_utility"], got["forget_quality"],
                         res.log[-1]["selected_fraction"], res.seconds))
            print(f"ssd alpha {alpha:g} lambda {lambd:g}: forget prob {t['forget']['prob']:.3f} -> {rows[-1][2]:.3f}, "
                  f"utility {t['model_utility']:.3f} -> {rows[-1][3]:.3f} ({rows[-1][3] / t['model_utility']:.2f}x), "
                  f"forget quality {rows[-1][4]:.3g}, {rows[-1][5]:.2%} of the weights dampened, {rows[-1][6]:.1f} s")
    keep = [r for r in rows if r[3] >= 0.8 * t["model_utility"]]
    best = max(keep, key=lambda r: r[4])
    print(f"ssd best point: alpha {best[0]:g} lambda {best[1]:g}")
    assert best[2] <= 0.5 * t["forget"]["prob"]
    point = next(r for r in rows if (r[0], r[1]) == (lm.SSD.benchmark_config["alpha"], lm.SSD.benchmark_config["lambd"]))
    assert point[2] <= 0.5 * t["forget"]["prob"] and point[3] >= 0.8 * t["model_utility"]


# ------------------------------------------------------------------------------------------------
# two gloo processes equal one process
# ------------------------------------------------------------------------------------------------

SHAPES_DIST = [(6, 3), (5,), (4, 2)]


def _dist_grads(n_batches=6):
    g = _gen(9)
    return [[torch.randn(s, generator=g) for s in SHAPES_DIST] for _ in range(n_batches)]


def _worker(rank, world, port, out, use_dtensor):
    with gloo.process_group(rank, world, port) as dist:
        grads = _dist_grads()
        if use_dtensor:  # FSDP2-like: every rank holds shards of the global batch's gradients
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            params = [distribute_tensor(torch.zeros(s), mesh, [Shard(0)]) for s in SHAPES_DIST]
            fd = FisherDiagonal(params, process_group=dist.group.WORLD)
            for gs in grads:
                fd.accumulate([distribute_tensor(x, mesh, [Shard(0)]) for x in gs])
        else:  # replicas: each rank takes every world-th batch
            fd = FisherDiagonal([torch.zeros(s) for s in SHAPES_DIST], process_group=dist.group.WORLD)
            for gs in grads[rank::world]:
                fd.accumulate(gs)
        torch.save([t.clone() for t in fd.mean()], os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("use_dtensor", [False, True], ids=["replicas", "dtensor"])
def test_two_gloo_processes_equal_one_process(tmp_path, use_dtensor):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, gloo.free_port(), str(tmp_path), use_dtensor), nprocs=2, join=True)
    one = FisherDiagonal([torch.zeros(s) for s in SHAPES_DIST])
    for gs in _dist_grads():
        one.accumulate(gs)
    want = one.mean()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for w, o in zip(want, got):
            if use_dtensor:  # the rank's rows of the whole (Shard(0): the first ceil(n / 2) on rank 0)
                cut = (w.shape[0] + 1) // 2
                w = w[:cut] if rank == 0 else w[cut:]
            torch.testing.assert_close(o, w, rtol=1e-6, atol=0)


def _method_worker(rank, world, port, out, target, sets):
    from transformers import AutoModelForCausalLM

    with gloo.process_group(rank, world, port):
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        res = lm.unlearn(model, sets[0], sets[1], "ssd", lm.SSD.benchmark_config, progress=False)
        torch.save({"state": model.state_dict(), "log": res.log}, os.path.join(out, f"method{rank}.pt"))


def test_ssd_under_two_gloo_processes_equals_one_process(models, sets, bench, tmp_path):
    """Each rank takes every second batch of both passes; the accumulators are summed over the
    ranks: both ranks end with the one-process weights (up to the sums' order: fp32 rounding, and
    the rare weight whose I_f / I_D lies within that rounding of alpha)."""
    import torch.multiprocessing as mp

    mp.spawn(_method_worker, args=(2, gloo.free_port(), str(tmp_path), bench.target, sets), nprocs=2, join=True)
    one = copy.deepcopy(models["target"])
    ref = lm.unlearn(one, sets[0], sets[1], "ssd", lm.SSD.benchmark_config, progress=False)
    want = one.state_dict()
    n = sum(v.numel() for v in want.values())
    for rank in range(2):
        got = torch.load(tmp_path / f"method{rank}.pt")
        assert len(got["log"]) < len(ref.log)  # its share of the batches, then the dampening
        assert abs(got["log"][-1]["selected"] - ref.log[-1]["selected"]) <= 1e-4 * n
        off = sum(int((~torch.isclose(got["state"][k], v, rtol=1e-5, atol=1e-7)).sum()) for k, v in want.items())
        assert off <= 1e-4 * n, f"rank {rank}: {off} of {n} weights differ"


def _fsdp_worker(rank, world, port, out, target, sets):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    with gloo.process_group(rank, world, port):
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        for layer in model.model.layers:  # the decoder blocks sharded (DTensors), the rest replicated
            fully_shard(layer)
        res = lm.unlearn(model, sets[0], sets[1], "ssd", lm.SSD.benchmark_config, progress=False)
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
                 for n, p in model.named_parameters()}
        torch.save({"state": state, "log": res.log}, os.path.join(out, f"fsdp{rank}.pt"))


def test_ssd_with_fsdp2_shards_equals_one_process(models, sets, bench, tmp_path):
    """FSDP2 (fully_shard on each decoder block, two gloo processes): every rank takes every batch,
    each keeps its shards' accumulators; the gathered weights and the whole-model figures equal
    one process's."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, gloo.free_port(), str(tmp_path), bench.target, sets), nprocs=2, join=True)
    one = copy.deepcopy(models["target"])
    ref = lm.unlearn(one, sets[0], sets[1], "ssd", lm.SSD.benchmark_config, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert len(got["log"]) == len(ref.log) and got["log"][-1]["selected"] == ref.log[-1]["selected"]
        for n, p in one.named_parameters():
            torch.testing.assert_close(got["state"][n], p.detach(), rtol=1e-6, atol=1e-8)
