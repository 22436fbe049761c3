"""shred family through the public API on every backend: the public functions against the
reference with gradients and reductions, torch.compile, ShredLoss, the Hugging Face helper, and
bad input."""
import pytest
import torch
from torch import nn
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import backends as B
import lethe
from lethe.nn import ShredLoss
from lethe.ops import _backend
from lethe.ops import shred as S
from lethe.ops import shred_reference as R

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[B.needs_gpu, pytest.mark.gpu])]


def _problem(N=37, H=19, V=101, K=7, seed=0, dtype=torch.float32, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * scale / H**0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    ids, lp, _ = R.teacher_topk_reference(hidden, weight, b, labels, K)
    forget = torch.rand(N, generator=g) < 0.5
    q = R.demote_targets_reference(ids, lp, labels, forget)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels, ids, q


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["full", "topk"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_topk_kl_matches_reference_with_gradients(backend, reduction, normalize, bias):
    hidden, weight, b, labels, ids, q = _problem(bias=bias)
    mask = labels != -100
    w = torch.rand(hidden.shape[0]) + 0.5
    params = [hidden, weight] + ([b] if bias else [])
    gy = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1)) if reduction == "none" else \
        torch.tensor(1.7)

    kw = dict(mask=mask, weights=w, reduction=reduction, normalize=normalize, chunk_size=5)

    def run(device, loss):
        ps = [p.to(device).clone().requires_grad_(True) for p in params]
        out = loss(ps[0], ps[1], ps[2] if bias else None)
        return out.cpu(), [g.cpu() for g in torch.autograd.grad(out, ps, gy.to(out.device))]

    out, grads = run(backend.device, lambda h, wt, bb: backend.public(S.fused_linear_topk_kl, h, wt, ids, q, bias=bb, **kw))
    out_ref, grads_ref = run("cpu", lambda h, wt, bb: S.fused_linear_topk_kl(h, wt, ids, q, bias=bb, backend="reference",
                                                                            **kw))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["full", "topk"])
def test_topk_kl_matches_reference_with_gradients(backend, reduction, normalize):
    hidden, weight, b, labels, ids, q = _problem()
    mask = labels != -100
    outs = []
    for run in (lambda z: backend.public(S.topk_kl, z, ids, q, mask=mask, reduction=reduction, normalize=normalize),
                lambda z: S.topk_kl(z, ids, q, mask=mask, reduction=reduction, normalize=normalize, backend="reference")):
        logits = (hidden @ weight.t() + b).to(backend.device if len(outs) == 0 else "cpu").requires_grad_(True)
        out = run(logits)
        (g,) = torch.autograd.grad(out, logits, torch.ones_like(out) * 0.3)
        outs.append((out.cpu(), g.cpu()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_gradient_is_softmax_minus_q():
    # the gradient wrt logits = softmax(z) - q (K-sparse q), for sum reduction, full vocabulary
    hidden, weight, b, labels, ids, q = _problem(N=6, V=30, K=5)
    z = (hidden @ weight.t() + b).requires_grad_(True)
    loss = S.topk_kl(z, ids, q, reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    expect = torch.softmax(z.detach(), -1) * q.sum(-1, keepdim=True)
    expect.scatter_add_(1, ids, -q)
    torch.testing.assert_close(g, expect, rtol=1e-5, atol=1e-6)


def test_fused_backward_scales_by_the_incoming_gradient():
    # the precomputed gradients are scaled in place by a non-unit upstream gradient
    hidden, weight, b, labels, ids, q = _problem(N=9)
    grads = []
    for factor in (1.0, -2.5):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        (factor * S.fused_linear_topk_kl(h, w, ids, q, bias=b)).backward()
        grads.append((h.grad, w.grad))
    for a, b1 in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, -2.5 * b1, rtol=1e-6, atol=1e-7)
    # a second backward through the same node must fail clearly, not scale twice
    h = hidden.clone().requires_grad_(True)
    loss = 3.0 * S.fused_linear_topk_kl(h, weight, ids, q, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same loss .retain_graph=True."):
        loss.backward()
    # backward of the loss itself (upstream gradient 1) may run twice: nothing was scaled
    h = hidden.clone().requires_grad_(True)
    loss = S.fused_linear_topk_kl(h, weight, ids, q, bias=b)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


class _FusedCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the (grad_hidden, grad_weight, grad_bias, check_values) of every fused op call, and
    whether it was given grad_row_scale (asked for any gradient at all)."""

    def __init__(self):
        super().__init__()
        self.calls, self.scaled = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("lethe::fused_linear_topk_kl"):
            names = [a.name for a in func._schema.arguments]
            bound = dict(zip(names, args), **(kwargs or {}))
            self.scaled.append(bound["grad_row_scale"] is not None)
            self.calls.append(tuple(bound.get(n, a.default_value) for n, a in zip(names, func._schema.arguments)
                                    if n in ("grad_hidden", "grad_weight", "grad_bias", "check_values")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias", "hidden+bias"])
def test_fused_computes_only_the_gradients_autograd_needs(backend, reduction, trainable):
    # a frozen head (LoRA, tied embeddings under no_grad) must not cost its [V, H] gradient
    hidden, weight, b, labels, ids, q = _problem(N=11)
    names = ("hidden", "weight", "bias")
    ps = [t.clone().requires_grad_(n in trainable) for n, t in zip(names, (hidden, weight, b))]
    refs = [t.clone().requires_grad_(n in trainable) for n, t in zip(names, (hidden, weight, b))]

    def run(xs, be):
        out = S.fused_linear_topk_kl(xs[0], xs[1], ids, q, bias=xs[2], reduction=reduction, chunk_size=4,
                                     backend=be)
        out.sum().backward()
        return out

    with _FusedCalls() as spy:
        out = run(ps, backend)
    ref = run(refs, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, p, r in zip(names, ps, refs):
        assert (p.grad is None) == (n not in trainable), n
        if n in trainable:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5)
    want = tuple(n in trainable for n in names)
    if reduction == "none":  # forward without gradients; backward computes them unchecked
        assert spy.calls[-1] == want + (False,)
    else:  # the gradients are computed in the forward pass, which checks the targets
        assert spy.calls == [want + (True,)]


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fused_computes_no_gradients_with_grad_mode_off(backend, reduction, mode):
    # evaluation under no_grad: the loss only, though the parameters require grad
    hidden, weight, b, labels, ids, q = _problem(N=11)
    ps = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    with getattr(torch, mode)(), _FusedCalls() as spy:
        out = S.fused_linear_topk_kl(ps[0], ps[1], ids, q, bias=ps[2], reduction=reduction, backend=backend)
    assert spy.scaled == [False] and not out.requires_grad
    ref = S.fused_linear_topk_kl(hidden, weight, ids, q, bias=b, reduction=reduction, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_all_positions_ignored_gives_zero_loss_and_gradient():
    hidden, weight, b, labels, ids, q = _problem(N=8)
    h = hidden.clone().requires_grad_(True)
    loss = S.fused_linear_topk_kl(h, weight, ids, q, bias=b, mask=torch.zeros(8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_low_precision_inputs_accumulate_in_fp32():
    hidden, weight, b, labels, ids, q = _problem(dtype=torch.float16)
    h = hidden.clone().requires_grad_(True)
    loss = S.fused_linear_topk_kl(h, weight, ids, q, bias=b)
    loss.backward()
    ref = R.fused_linear_topk_kl_reference(hidden.float(), weight.float(), b.float(), ids, q)
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float16
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)


def test_teacher_pipeline_matches_reference(backend):
    Bn, T, H, V, K = 3, 11, 16, 53, 8
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-3, 4, (Bn, T, H), generator=g).float()  # exact logits on every backend
    weight = torch.randint(-3, 4, (V, H), generator=g).float()
    labels = torch.randint(0, V, (Bn, T), generator=g)
    labels[0, :4] = -100
    labels[2] = -100  # a fully padded sequence
    ids, lp, llp = (t.cpu() for t in backend.public(S.teacher_topk, hidden, weight, labels, K, chunk_size=4))
    assert ids.shape == (Bn, T, K) and lp.shape == (Bn, T, K) and llp.shape == (Bn, T)
    r_ids, r_lp, r_llp = R.teacher_topk_reference(hidden.reshape(-1, H), weight, None, labels.reshape(-1), K)
    assert torch.equal(ids.reshape(-1, K), r_ids)
    torch.testing.assert_close(lp.reshape(-1, K), r_lp)
    torch.testing.assert_close(llp.reshape(-1), r_llp)
    forget = backend.public(S.select_forget_positions, llp, labels, 0.5, skip=2).cpu()
    assert torch.equal(forget, R.select_forget_positions_reference(llp, labels, 0.5, 2))
    assert not forget[2].any()
    for variant in ("A", "B"):
        qq = backend.public(S.demote_targets, ids, lp, labels, forget, variant, 0.3).cpu()
        rq = R.demote_targets_reference(ids.reshape(-1, K), lp.reshape(-1, K), labels.reshape(-1),
                                        forget.reshape(-1), variant, 0.3)
        torch.testing.assert_close(qq.reshape(-1, K), rq)


def test_shred_loss_end_to_end_against_full_logits():
    torch.manual_seed(0)
    B, T, H, V = 2, 9, 24, 61
    teacher_h = torch.randn(B, T, H)
    head = nn.Linear(H, V)
    labels = torch.randint(0, V, (B, T))
    labels[1, -3:] = -100
    loss_fn = ShredLoss(k=8, fraction=0.5, skip=1, variant="B", top_p=0.4, chunk_size=4)
    tg = loss_fn.targets(teacher_h, head.weight, labels, head.bias)
    assert tg.forget.sum() > 0 and not (tg.forget & ~tg.valid).any()
    student_h = (teacher_h + 0.1 * torch.randn(B, T, H)).requires_grad_(True)
    loss = loss_fn(student_h, head.weight, tg, head.bias)
    loss.backward()
    # the same loss from materialised logits, by the reference
    z = (student_h.detach() @ head.weight.t() + head.bias).reshape(-1, V).requires_grad_(True)
    ref = R.topk_kl_reference(z, tg.ids.reshape(-1, 8), tg.probs.reshape(-1, 8), tg.valid.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is not None and student_h.grad.abs().sum() > 0
    # demotion: the label's target probability is zero at every forget position
    lab = labels.clamp(min=0)[..., None]
    hit = (tg.ids == lab) & tg.forget[..., None]
    assert (tg.probs[hit] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_compile_training_step_fullgraph(device, frozen_head):
    torch._dynamo.reset()
    torch.manual_seed(0)
    N, H, V, K = 24, 16, 40, 6
    model = nn.Sequential(nn.Linear(H, H), nn.Tanh()).to(device)
    head = nn.Linear(H, V).to(device)
    if frozen_head:  # the traced forward must see the head's requires_grad (it skips grad_weight)
        head.weight.requires_grad_(False)
    x = torch.randn(N, H, device=device)
    ids, lp, _ = R.teacher_topk_reference(x, head.weight.detach(), head.bias.detach(),
                                          torch.zeros(N, dtype=torch.long, device=device), K)
    q = torch.softmax(lp, -1)

    def step(x):
        return S.fused_linear_topk_kl(model(x), head.weight, ids, q, bias=head.bias, chunk_size=7)

    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    eager = step(x)
    ge = torch.autograd.grad(eager, params)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):  # aot_eager, keeping the traced forward and backward graphs
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out = compiled(x)
    gc = torch.autograd.grad(out, params)
    calls = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.lethe.fused_linear_topk_kl.default]
    assert len(calls) == 1
    names = [a.name for a in calls[0].target._schema.arguments]
    bound = {**dict(zip(names, calls[0].args)), **calls[0].kwargs}
    assert bound.get("grad_weight", True) is (not frozen_head)  # traced with the head's requires_grad
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _opcheck_inputs():
    hidden, weight, b, labels, ids, q = _problem(N=9, H=8, V=20, K=4)
    rw = torch.rand(9)
    return hidden, weight, b, labels, ids, q, rw


def test_opcheck_shred_ops():
    hidden, weight, b, labels, ids, q, rw = _opcheck_inputs()
    ops = torch.ops.lethe
    torch.library.opcheck(ops.teacher_topk.default, (hidden, weight, b, labels, 4, 4))
    lp = torch.log_softmax(torch.randn(3, 5), -1)
    lab = torch.randint(0, 20, (3, 5))
    lab[0, 0] = -100
    torch.library.opcheck(ops.select_forget_positions.default, (lp, lab, 0.5, 1))
    tk_ids, tk_lp, _ = R.teacher_topk_reference(hidden, weight, b, labels, 4)
    torch.library.opcheck(ops.demote_targets.default, (tk_ids, tk_lp, labels.clamp(min=0), labels > 3, 1, 0.5))
    logits = (hidden @ weight.t()).requires_grad_(True)
    for full in (True, False):
        torch.library.opcheck(ops.topk_kl.default, (logits, ids, q, rw, full))
        torch.library.opcheck(ops.topk_kl.default, (logits, ids, q, None, full))
        lse = torch.logsumexp(logits.detach(), -1)
        torch.library.opcheck(ops.topk_kl_backward.default, (torch.rand(9), logits.detach(), ids, q, lse, rw, full))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    torch.library.opcheck(ops.fused_linear_topk_kl.default, (h, w, b, ids, q, rw, None, True, 4))
    torch.library.opcheck(ops.fused_linear_topk_kl.default, (h.detach(), w.detach(), None, ids, q, None, torch.rand(9), False, 3))
    torch.library.opcheck(ops.fused_linear_topk_kl.default,
                          (h.detach(), w.detach(), b, ids, q, rw, torch.rand(9), True, 4, False, True, True, False))
    torch.library.opcheck(ops.fused_linear_topk_kl.default,
                          (h.detach(), w.detach(), b, ids, q, None, torch.rand(9), False, 2, True, False, False))


SHRED_OPS = ("teacher_topk", "select_forget_positions", "demote_targets", "topk_kl", "topk_kl_backward",
             "fused_linear_topk_kl")


@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend_is_native(device):
    from lethe import _lib
    for op in SHRED_OPS:
        assert _lib.has_kernel(op, device.upper()), op
        assert _backend.resolve(op, torch.zeros(1, device=device), "auto") == "native"


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: S.teacher_topk(p[0], p[1], p[3], 0), ValueError, "k must be"),
        (lambda p: S.teacher_topk(p[0], p[1], p[3], 102), ValueError, "k must be"),
        (lambda p: S.teacher_topk(p[0][:, :5], p[1], p[3], 3), ValueError, "hidden's last dimension"),
        (lambda p: S.teacher_topk(p[0], p[1], p[3][:4], 3), ValueError, "labels must have shape"),
        (lambda p: S.teacher_topk(p[0], p[1], torch.full_like(p[3], 101), 3), (ValueError, RuntimeError), "labels"),
        (lambda p: S.teacher_topk(p[0], p[1], p[3].int(), 3), TypeError, "labels must be int64"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4][:3], p[5][:3]), ValueError, "target_ids and target_probs"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], -p[5]), (ValueError, RuntimeError), "target_probs"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], p[5] * 2), (ValueError, RuntimeError), "target_probs"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4] + 200, p[5]), (ValueError, RuntimeError), "target_ids"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], p[5], reduction="avg"), ValueError, "reduction must be"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], p[5], normalize="k"), ValueError, "normalize must be"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], p[5], chunk_size=0), ValueError, "chunk_size"),
        (lambda p: S.fused_linear_topk_kl(p[0], p[1], p[4], p[5], mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have"),
        (lambda p: S.topk_kl(p[0][:, :5], p[4], p[5]), ValueError,
         "target_ids has K = 7 columns, more than the vocabulary size V = 5"),
        (lambda p: S.select_forget_positions(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 1.5), ValueError, "fraction"),
        (lambda p: S.select_forget_positions(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.5, -1), ValueError, "skip"),
        (lambda p: S.demote_targets(p[4], p[5].log(), p[3], p[3] > 0, "C"), ValueError, "variant"),
        (lambda p: S.demote_targets(p[4], p[5].log(), p[3], p[3] > 0, "B", 0.0), ValueError, "top_p"),
    ],
)
def test_bad_input(call, exc, match):
    hidden, weight, b, labels, ids, q = _problem()
    with pytest.raises(exc, match=match):
        call((hidden, weight, b, labels, ids, q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_hf_causal_lm_helper(device, frozen_head):
    import transformers  # a test dependency (make deps installs it)
    from lethe.integrations import hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    teacher = transformers.LlamaForCausalLM(cfg).to(device)
    student = transformers.LlamaForCausalLM(cfg).to(device)
    student.load_state_dict(teacher.state_dict())
    batch = {"input_ids": torch.randint(0, 97, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, -2:] = 0
    batch = {k: v.to(device) for k, v in batch.items()}
    if frozen_head:  # as under LoRA: the head gets no gradient, the rest of the model does
        student.lm_head.weight.requires_grad_(False)
    loss_fn = ShredLoss(k=16, fraction=0.5, chunk_size=8)
    tg = hf.shred_targets(teacher, batch, loss_fn)
    assert tg.ids.shape == (2, 9, 16) and not tg.valid[1, -2:].any() and tg.ids.device.type == device
    loss = hf.shred_loss(student, batch, tg, loss_fn)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0  # the demoted label makes q differ from the teacher
    assert (student.lm_head.weight.grad is None) == frozen_head
    grads = [p.grad.clone() for p in student.parameters() if p.requires_grad]
    # the same number and gradients from the model's own full logits
    student.zero_grad()
    logits = student(**batch).logits[:, :-1].reshape(-1, 97)
    ref = R.topk_kl_reference(logits, tg.ids.reshape(-1, 16), tg.probs.reshape(-1, 16), tg.valid.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, [p for p in student.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_reference_teacher_pass_is_the_same_in_chunks():
    # the reference path (GPU tensors, for now) works chunk by chunk with identical results
    hidden, weight, b, labels, _, _ = _problem(N=23, V=41)
    whole = R.teacher_topk_reference(hidden, weight, b, labels, 6)
    chunked = R.teacher_topk_reference(hidden, weight, b, labels, 6, chunk_size=5)
    out = S.teacher_topk(hidden, weight, labels, 6, bias=b, chunk_size=5, backend="reference")
    for got in (chunked, out):
        assert torch.equal(got[0], whole[0])  # ids
        torch.testing.assert_close(got[1], whole[1])  # matmuls of other row counts may round apart
        torch.testing.assert_close(got[2], whole[2])


# ---- silent wrong results found by trying lethe as a new user would ----

def test_output_shapes_are_the_same_on_every_backend(backend):
    Bn, T, H, V, K = 2, 5, 8, 30, 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(Bn, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (Bn, T), generator=g)
    outs = {}
    for name, run in (("backend", lambda fn, *a, **k: backend.public(fn, *a, **k)),
                      ("reference", lambda fn, *a, **k: fn(*a, **k, backend="reference"))):
        ids, lp, llp = run(S.teacher_topk, hidden, weight, labels, K)
        forget = run(S.select_forget_positions, llp, labels, 0.5)
        q = run(S.demote_targets, ids, lp, labels, forget)
        shapes = [tuple(t.shape) for t in (ids, lp, llp, forget, q)]
        for red in ("mean", "sum", "none"):
            shapes.append(tuple(run(S.fused_linear_topk_kl, hidden, weight, ids, q, reduction=red).shape))
            shapes.append(tuple(run(S.topk_kl, (hidden @ weight.t()).reshape(-1, V), ids.reshape(-1, K),
                                    q.reshape(-1, K), reduction=red).shape))
        outs[name] = shapes
    assert outs["backend"] == outs["reference"]
    assert outs["backend"][5:7] == [(), ()] and outs["backend"][9] == (Bn, T) and outs["backend"][10] == (Bn * T,)
    loss_fn = ShredLoss(k=K, reduction="none", backend="reference")
    tg = loss_fn.targets(hidden, weight, labels)
    assert loss_fn(hidden, weight, tg).shape == (Bn, T)


def test_double_backward_is_refused_not_zero(backend):
    hidden, weight, b, labels, ids, q = _problem(N=6, V=30, K=5)
    z = backend.to(hidden @ weight.t()).requires_grad_(True)
    loss = backend.public(S.topk_kl, z, ids, q)
    with pytest.raises(RuntimeError, match="gradient is not differentiable .*create_graph=True"):
        torch.autograd.grad(loss, z, create_graph=True)
    h = backend.to(hidden).requires_grad_(True)
    loss = backend.public(S.fused_linear_topk_kl, h, weight, ids, q)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)
    # the reference differentiates its gradient
    zr = (hidden @ weight.t()).requires_grad_(True)
    (g,) = torch.autograd.grad(S.topk_kl(zr, ids, q, backend="reference"), zr, create_graph=True)
    (gg,) = torch.autograd.grad((g ** 2).sum(), zr)
    assert gg.abs().sum() > 0


def test_gradients_for_targets_are_refused_not_dropped(backend):
    hidden, weight, b, labels, ids, q = _problem(N=6, V=30, K=5)
    qg = q.clone().requires_grad_(True)
    wg = torch.rand(6, requires_grad=True)
    z = hidden @ weight.t()
    for kw, name in ((dict(), "target_probs"), (dict(weights=wg), "weights")):
        probs = qg if name == "target_probs" else q
        with pytest.raises(ValueError, match=f"{name} requires grad, but topk_kl's native and Triton kernels"):
            backend.public(S.topk_kl, z, ids, probs, **kw)
        with pytest.raises(ValueError, match=f"{name} requires grad, but fused_linear_topk_kl's"):
            backend.public(S.fused_linear_topk_kl, hidden, weight, ids, probs, **kw)
    with torch.no_grad():  # nothing to refuse without autograd
        backend.public(S.topk_kl, z, ids, qg)
    (gq,) = torch.autograd.grad(S.topk_kl(z, ids, qg, backend="reference"), qg)  # the reference computes it
    assert torch.isfinite(gq[q > 0]).all()


def test_empty_sizes(backend):
    # H = 0 (zero logits: every id tied), K = 0 targets, N = 0 rows: results, not reshape errors
    ids, lp, llp = backend.public(S.teacher_topk, torch.zeros(2, 3, 0), torch.zeros(7, 0), torch.zeros(2, 3, dtype=torch.long), 3)
    assert ids.shape == (2, 3, 3) and torch.equal(ids.cpu()[0, 0], torch.arange(3))
    torch.testing.assert_close(lp.cpu(), torch.full((2, 3, 3), -torch.log(torch.tensor(7.0)).item()))
    hidden, weight = torch.randn(2, 3, 8), torch.randn(7, 8)
    empty_k = backend.public(S.fused_linear_topk_kl, hidden, weight, torch.zeros(2, 3, 0, dtype=torch.long),
                             torch.zeros(2, 3, 0), reduction="none")
    assert empty_k.shape == (2, 3) and (empty_k.cpu() == 0).all()
    none = backend.public(S.fused_linear_topk_kl, hidden[:, :0], weight, torch.zeros(2, 0, 4, dtype=torch.long),
                          torch.zeros(2, 0, 4), reduction="none")
    assert none.shape == (2, 0)


def test_scalar_arguments():
    hidden, weight, b, labels, ids, q = _problem(N=6, V=30, K=5)
    import numpy as np

    lab2 = labels.reshape(2, 3)
    out = S.select_forget_positions(torch.randn(2, 3), lab2, np.float32(0.5), np.int64(1))
    assert out.shape == (2, 3)
    S.teacher_topk(hidden, weight, labels, np.int64(3))
    for kw, name in ((dict(chunk_size=2**63), "chunk_size"), ):
        with pytest.raises(ValueError, match=f"{name} must fit in 64 bits, got {2**63}"):
            S.fused_linear_topk_kl(hidden, weight, ids, q, **kw)
    with pytest.raises(ValueError, match="skip must fit in 64 bits"):
        S.select_forget_positions(torch.randn(2, 3), lab2, 0.5, 2**63)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        S.teacher_topk(hidden, weight, labels, 3.0)


def test_meta_tensors_mixed_with_cpu_ones_are_refused():
    lp = torch.zeros(2, 5, device="meta")
    lab = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must be on label_logprob's device \(meta\), got cpu"):
        S.select_forget_positions(lp, lab, 0.5)
    ids = torch.zeros(4, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"topk_logprobs must be on topk_ids's device \(meta\), got cpu"):
        S.demote_targets(ids, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target_ids must be on logits's device \(meta\), got cpu"):
        S.topk_kl(torch.zeros(4, 9, device="meta"), torch.zeros(4, 3, dtype=torch.long), torch.full((4, 3), 1 / 3))


def test_compiled_reference_still_checks_values():
    # traced by torch.compile, the reference's value checks become device-side asserts, not nothing
    torch._dynamo.reset()
    hidden, weight, b, labels, ids, q = _problem(N=6, V=30, K=5)
    z = hidden @ weight.t()
    f = torch.compile(lambda z, q: S.topk_kl(z, ids, q, backend="reference"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(z, q), S.topk_kl(z, ids, q, backend="reference"))
    with pytest.raises(RuntimeError, match="target_probs non-negative rows summing to 1"):
        f(z, q * 0.5)


def test_shred_loss_checks_its_arguments_at_construction():
    for kw, match in ((dict(k=0), "k must be >= 1"), (dict(fraction=1.5), r"fraction must be in \[0, 1\]"),
                      (dict(skip=-1), "skip must be >= 0"), (dict(variant="C"), "variant must be 'A' or 'B'"),
                      (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(reduction="avg"), "reduction must be"),
                      (dict(normalize="k"), "normalize must be"), (dict(chunk_size=0), "chunk_size must be >= 1"),
                      (dict(backend="cudnn"), "backend must be one of")):
        with pytest.raises(ValueError, match=match):
            ShredLoss(**kw)
    with pytest.raises(TypeError, match="k must be an int"):
        ShredLoss(k="64")


def test_info_and_demo_help_read_well():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lethe.info"], capture_output=True, text=True, check=True).stdout
    assert "['" not in out and "kernels cpu/cuda/triton" in out
    help_ = subprocess.run([sys.executable, "-m", "lethe.cli", "demo", "--help"], capture_output=True, text=True).stdout
    help_ = " ".join(help_.split())  # (argparse wraps at the terminal's width)
    assert "every registered method with its defaults (and GU on NPO and on GradDiff) on the forget10 split" in help_ and "--methods" in help_
