"""The method layer on the reduced built-in benchmark (conftest.py's bench and models): each
method's default run forgets and keeps utility, exact resume, the losses against full-logits
definitions, SAF against GradDiff under int4, `lethe unlearn`, `lethe demo`, and the error paths.
The figures are printed (pytest -s) and reported in benchmarks/RESULTS.md."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lethe.methods as lm
from lethe.eval.evaluator import Evaluator, builtin_data
from lethe.methods.base import Encoded
from lethe.methods.driver import UnlearnConfig, step_batches


@pytest.fixture(scope="session")
def tok(bench):
    return bench.tokenizer()


@pytest.fixture(scope="session")
def method_eval(bench, tok, models):
    return Evaluator(builtin_data(bench, "forget10"), tok, models["retain"], retain_size=100, world_size=100)


@pytest.fixture(scope="session")
def target_metrics(method_eval, models):
    return method_eval.metrics(models["target"])


_RUNS = {}


@pytest.fixture(scope="session")
def default_run(models, sets):
    """name -> the target model after the method's default run (built once per session)."""
    def run(name):
        if name not in _RUNS:
            m = copy.deepcopy(models["target"])
            method = lm.make_method(name)
            res = lm.unlearn(m, sets[0], sets[1] if method.needs_retain() else None, method, progress=False)
            _RUNS[name] = (m, res)
        return _RUNS[name]
    return run


def test_registry_lists_every_method_and_refuses_unknown_names():
    assert lm.available() == ["ga", "graddiff", "npo", "simnpo", "shred", "saf", "gu", "ssd", "kfade", "fit"]
    assert lm.get("npo") is lm.NPO and lm.get("npo").Config().beta == 0.1
    from lethe.demo import default_methods
    assert "kfade" in default_methods() and "ssd" in default_methods() and "fit" not in default_methods()
    assert lm.get("npo+gu") is lm.GU and lm.make_method("graddiff+gu").config.base == "graddiff"
    assert lm.make_method("npo+gu").label == "npo+gu" and lm.make_method("gu").label == "npo+gu"
    with pytest.raises(ValueError, match=r"method 'npo\+saf': 'saf' is not a plug-in method \(the plug-ins: \['gu'\]\)"):
        lm.get("npo+saf")
    with pytest.raises(ValueError, match="method must be one of"):
        lm.get("nope+gu")
    with pytest.raises(ValueError, match=r"method must be one of \['ga', 'graddiff'.*got 'nope'"):
        lm.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        @lm.register
        class Other(lm.Method):
            name = "npo"


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo", "shred", "saf"])
def test_default_run_forgets_and_keeps_utility(name, default_run, method_eval, target_metrics, sets):
    model, res = default_run(name)
    got = method_eval.metrics(model)
    t = target_metrics
    print(f"{name}: forget prob {t['forget']['prob']:.3f} -> {got['forget']['prob']:.3f}, exact "
          f"{t['forget']['exact']:.3f} -> {got['forget']['exact']:.3f}; utility {t['model_utility']:.3f} -> "
          f"{got['model_utility']:.3f} ({got['model_utility'] / t['model_utility']:.2f}x); forget quality "
          f"{got.get('forget_quality'):.3g}; {res.seconds:.1f} s for {len(res.log)} steps")
    assert len(res.log) == UnlearnConfig.for_method(name).resolved(len(sets[0])).steps and res.complete
    assert got["forget"]["prob"] <= 0.5 * t["forget"]["prob"]
    if name != "ga":  # gradient ascent is known to collapse: only its forgetting is asserted
        assert got["model_utility"] >= 0.8 * t["model_utility"]


@pytest.mark.parametrize("base", ["npo", "graddiff"])
def test_gu_keeps_utility_closer_to_the_target_than_its_base(base, default_run, method_eval, target_metrics, sets):
    """GU's projection (the default: the realised update, last two blocks + norm + head) on NPO and
    GradDiff at the base's own optimiser settings: utility closer to the target model's, forget
    quality no worse (the figures are in benchmarks/RESULTS.md)."""
    t = target_metrics
    out = {}
    for name in (base, f"{base}+gu"):
        model, res = default_run(name)
        out[name] = method_eval.metrics(model)
        g = out[name]
        print(f"{name}: forget prob {g['forget']['prob']:.3f}, exact {g['forget']['exact']:.3f}; utility "
              f"{g['model_utility']:.3f} (target {t['model_utility']:.3f}); forget quality {g['forget_quality']:.3g}; "
              f"{res.seconds:.1f} s")
    plain, gu = out[base], out[f"{base}+gu"]
    assert abs(gu["model_utility"] - t["model_utility"]) < abs(plain["model_utility"] - t["model_utility"])
    assert gu["forget_quality"] >= plain["forget_quality"]
    assert gu["forget"]["prob"] <= 0.5 * t["forget"]["prob"]


@pytest.mark.parametrize("mode", ["update", "adam", "gradient"])
def test_gu_removes_the_first_order_retain_change(mode, models, sets):
    """Per step, the retain loss's first-order change g_r^T D (g_r the step's retain gradient, in the
    basis) relative to the unprojected step's: <= 1e-4 for the realised update (exact for AdamW);
    reported for the gradient projections, which AdamW's own preconditioning and momentum bend."""
    from lethe.methods.driver import build_optimizer

    model = copy.deepcopy(models["target"])
    method = lm.make_method("npo+gu", {"mode": mode})
    cfg = UnlearnConfig.for_method(method).resolved(len(sets[0]))
    method.prepare(model, sets[0], sets[1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = build_optimizer(params, cfg)
    ratios = []
    tensors = method._ensure(model, params)
    for step in range(6):
        inputs = step_batches(sets[0], sets[1], cfg, step)
        loss, _ = method.loss(model, inputs, step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        start = [p.detach().clone() for p in tensors]
        g_r, _ = method.retain_gradient(model, tensors, inputs["retain"])
        # the unprojected step first (the same gradients and optimiser state), then undone
        grads = {p: p.grad.clone() for p in params if p.grad is not None}
        state = copy.deepcopy(opt.state_dict())
        every = [p.detach().clone() for p in params]
        opt.step()
        unprojected = [p.detach() - s for p, s in zip(tensors, start)]
        with torch.no_grad():
            for p, s in zip(params, every):
                p.copy_(s)
        opt.load_state_dict(state)
        for p in params:
            p.grad = grads.get(p)
        method.before_step(model, params, opt, inputs, step, cfg.steps)
        opt.step()
        method.after_step(model, params, opt, step, cfg.steps)
        delta = [p.detach() - s for p, s in zip(tensors, start)]
        sched.step()
        if step == 0:  # the warm-up's first step has lr 0
            continue
        num = abs(sum(float((g.double() * d.double()).sum()) for g, d in zip(g_r, delta)))
        den = abs(sum(float((g.double() * d.double()).sum()) for g, d in zip(g_r, unprojected)))
        ratios.append(num / den)
    print(f"gu mode {mode}: first-order retain change per step relative to the unprojected step's: " +
          ", ".join(f"{r:.1e}" for r in ratios))
    if mode == "update":
        assert max(ratios) <= 1e-4


def test_saf_forgets_no_worse_than_graddiff_under_paper_int4(default_run, models, sets, method_eval):
    """At the same optimiser settings (GradDiff's defaults), SAF's extra quantised forget term
    leaves no more forget accuracy under paper-int4 than GradDiff's."""
    from lethe.nn.quant import quantized_weights

    graddiff, _ = default_run("graddiff")
    saf = copy.deepcopy(models["target"])
    lm.unlearn(saf, sets[0], sets[1], "saf", train=UnlearnConfig.for_method("graddiff"), progress=False)
    out = {}
    for name, model in (("graddiff", graddiff), ("saf", saf)):
        native = method_eval.metrics(model)
        with quantized_weights(model, "paper-int4"):
            q = method_eval.metrics(model)
        out[name] = (native["forget"]["exact"], q["forget"]["exact"], q["model_utility"])
    print("forget exact native -> paper-int4 (utility at int4): " + "; ".join(
        f"{n} {a:.3f} -> {b:.3f} ({u:.3f})" for n, (a, b, u) in out.items()))
    assert out["saf"][1] <= out["graddiff"][1]


@pytest.mark.parametrize("name", ["npo", "shred", "saf", "graddiff", "npo+gu"])
def test_resume_equals_uninterrupted(name, models, sets, tmp_path):
    kw = dict(steps=6, progress=False)
    retain = sets[1]
    if name == "graddiff":
        config = {"retain_loss": "kl"}
    else:
        config = None
    a = copy.deepcopy(models["target"])
    lm.unlearn(a, sets[0], retain, name, config, **kw)
    b = copy.deepcopy(models["target"])
    part = lm.unlearn(b, sets[0], retain, name, config, checkpoint_dir=tmp_path, checkpoint_every=2, stop_after=4, **kw)
    assert not part.complete and len(part.log) == 4
    c = copy.deepcopy(models["target"])  # a fresh process would start from the original model
    with torch.no_grad():
        for p in c.parameters():
            p.add_(1.0)  # prepare() must not run again: the state comes from the checkpoint
    done = lm.unlearn(c, sets[0], retain, name, config, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **kw)
    assert done.complete and [e["step"] for e in done.log] == list(range(1, 7))
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), n


def test_resume_refuses_another_runs_checkpoint(models, sets, tmp_path):
    m = copy.deepcopy(models["target"])
    lm.unlearn(m, sets[0], None, "shred", steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="resume: the checkpoint .* is of another run"):
        lm.unlearn(m, sets[0], None, "shred", {"k": 32}, steps=2, checkpoint_dir=tmp_path, resume=True,
                   progress=False)


# ---- the losses against their definitions, computed from the model's full logits -------------------

def _full_logp(model, batch):
    """log p(label) per labelled token from the model's own [B, T, V] logits, with the sequences."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    lab = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    keep = lab != -100
    lp = torch.log_softmax(logits, -1)[keep].gather(-1, lab[keep].unsqueeze(-1)).squeeze(-1)
    seq = torch.arange(lab.shape[0]).unsqueeze(1).expand_as(keep)[keep]
    return lp, seq, torch.log_softmax(logits, -1)[keep]


def _seq_sum(x, seq, B):
    return torch.zeros(B, dtype=x.dtype).index_add(0, seq, x)


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo", "shred", "saf"])
def test_loss_equals_its_full_logits_definition(name, models, sets):
    forget, retain = Encoded(sets[0].rows[:12], sets[0].pad_id), Encoded(sets[1].rows[:12], sets[1].pad_id)
    model = copy.deepcopy(models["target"])
    with torch.no_grad():  # move off the memorised optimum, so that every term is non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method = lm.make_method(name)
    method.prepare(models["target"], forget, retain)
    inputs = step_batches(forget, retain, UnlearnConfig(batch_size=5), 0)
    got, parts = method.loss(model, inputs, step=9, total_steps=10)
    f, r = inputs["forget"], inputs["retain"]
    lp_f, seq_f, _ = _full_logp(model, f)
    lp_r, _, _ = _full_logp(model, r)
    B = f["input_ids"].shape[0]
    c = method.config
    if name == "ga":
        want = lp_f.mean()
    elif name == "graddiff":
        want = c.gamma * lp_f.mean() - c.alpha * lp_r.mean()
    elif name == "npo":
        ref_lp, ref_seq, _ = _full_logp(models["target"], f)
        ratio = _seq_sum(lp_f, seq_f, B) - _seq_sum(ref_lp.detach(), ref_seq, B)
        want = c.gamma * (2 / c.beta) * torch.log1p(torch.exp(c.beta * ratio)).mean() - c.alpha * lp_r.mean()
    elif name == "simnpo":
        n = torch.bincount(seq_f, minlength=B).float()
        want = c.gamma * -(2 / c.beta) * F.logsigmoid(-(c.beta / n) * _seq_sum(lp_f, seq_f, B) - c.delta).mean() \
            - c.alpha * lp_r.mean()
    elif name == "shred":
        from lethe.ops.shred_reference import demote_targets_reference, select_forget_positions_reference
        from lethe.integrations import hf

        with torch.no_grad():
            logits = models["target"](input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits[:, :-1]
            tlp = torch.log_softmax(logits.float(), -1)
        labels = hf.shifted_labels(f["input_ids"], f["attention_mask"], f["labels"])
        top = tlp.topk(c.k, dim=-1)
        label_lp = tlp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(labels == -100, 0)
        fpos = select_forget_positions_reference(label_lp, labels, c.fraction, c.skip)
        q = demote_targets_reference(top.indices.reshape(-1, c.k), top.values.reshape(-1, c.k), labels.reshape(-1),
                                     fpos.reshape(-1), c.variant, c.top_p).reshape(top.values.shape)
        _, _, slp = _full_logp(model, f)
        keep = labels != -100
        qk, ik = q[keep], top.indices[keep]
        want = (qk * (torch.log(qk.clamp_min(1e-30)) - slp.gather(-1, ik))).sum(-1).mean()
    else:  # saf at step 9 of 10: alpha ramped up fully
        from lethe.nn.quant import quantized_weights

        a = c.alpha_at(9, 10)
        assert a == c.alpha
        with quantized_weights(model, c.preset), torch.no_grad():
            lq, _, _ = _full_logp(model, f)
        want = lp_f.mean() + a * lq.mean() - c.lam * lp_r.mean()
    assert got.item() == pytest.approx(want.item(), rel=2e-4, abs=2e-5), parts


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo", "shred", "saf", "npo+gu"])
def test_loss_never_runs_the_lm_head_module(name, models, sets, monkeypatch):
    """Every loss goes through the fused ops on the head's weight: the model's own lm_head
    (which would make [B, T, V] logits) is never called, nor is log_softmax over the vocabulary."""
    from lethe.integrations import hf

    model = copy.deepcopy(models["target"])
    inputs = step_batches(sets[0], sets[1], UnlearnConfig(batch_size=4), 0)
    hf.last_hidden_and_head(model, inputs["forget"]["input_ids"][:1])  # the one-off logits check, first
    method = lm.make_method(name)
    method.prepare(model, Encoded(sets[0].rows, sets[0].pad_id), sets[1])

    def boom(*a, **k):
        raise AssertionError("full logits computed")
    monkeypatch.setattr(model.lm_head, "forward", boom)
    monkeypatch.setattr(torch, "log_softmax", boom)
    monkeypatch.setattr(torch.Tensor, "log_softmax", boom)
    loss, _ = method.loss(model, inputs, 9, 10)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    method.before_step(model, params, opt, inputs, 9, 10)  # GU's retain gradient: the fused ops too
    opt.step()
    method.after_step(model, params, opt, 9, 10)


def test_saf_quantised_term_has_straight_through_gradients(models, sets):
    """The quantised forward's gradient reaches the full-precision weights (no copy of the model)."""
    method = lm.make_method("saf", {"alpha": 1.0, "lam": 0.0, "warmup": 0.0, "ramp": 0.0})
    model = copy.deepcopy(models["target"])
    inputs = step_batches(sets[0], sets[1], UnlearnConfig(batch_size=4), 0)
    loss, parts = method.loss(model, inputs, 0, 10)
    loss.backward()
    assert "forget_nll_quant" in parts
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    # and differs from the full-precision term's gradient alone
    model2 = copy.deepcopy(models["target"])
    l2, _ = lm.make_method("saf", {"alpha": 0.0, "lam": 0.0}).loss(model2, inputs, 0, 10)
    l2.backward()
    assert not torch.allclose(w.grad, model2.model.layers[0].mlp.up_proj.weight.grad)


def test_layers_pattern_trains_only_the_matching_parameters(models, sets):
    m = copy.deepcopy(models["target"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    lm.unlearn(m, sets[0], sets[1], "graddiff", steps=2, layers="model.layers.1.mlp.*", progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.mlp.") for n in changed)
    assert all(p.requires_grad for p in m.parameters())  # restored after the run


# ---- error paths -------------------------------------------------------------------------------------

def test_bad_configuration_is_refused_before_any_work(models, sets):
    m = models["target"]
    with pytest.raises(ValueError, match="method must be one of"):
        lm.unlearn(m, sets[0], sets[1], "gradient-ascent")
    with pytest.raises(ValueError, match="retain: method 'npo' needs a retain set"):
        lm.unlearn(m, sets[0], None, "npo")
    assert lm.make_method("npo", {"alpha": 0.0}).needs_retain() is False
    with pytest.raises(ValueError, match=r"layers: pattern 'model.decoder.\*' matches no trainable parameter"):
        lm.unlearn(m, sets[0], sets[1], "graddiff", layers="model.decoder.*")
    with pytest.raises(ValueError, match="has no output embedding"):
        lm.unlearn(m.model, sets[0], sets[1], "graddiff")  # the base LlamaModel: no LM head
    with pytest.raises(ValueError, match="NPOConfig: beta must be a number > 0"):
        lm.make_method("npo", {"beta": 0})
    with pytest.raises(ValueError, match="config: npo has no setting 'betta'"):
        lm.make_method("npo", {"betta": 0.2})
    with pytest.raises(ValueError, match="SAFConfig: preset must be one of"):
        lm.SAF(preset="int3")
    with pytest.raises(ValueError, match="UnlearnConfig: lr must be a number > 0"):
        UnlearnConfig(lr=0)
    with pytest.raises(ValueError, match="tokenizer: needed"):
        lm.unlearn(m, [{"question": "q", "answer": "a"}], None, "shred")
    with pytest.raises(ValueError, match="GUConfig: mode must be one of"):
        lm.make_method("npo+gu", {"mode": "metric"})
    with pytest.raises(ValueError, match="GUConfig: joint=True adds the retain gradient"):
        lm.make_method("npo+gu", {"joint": True})
    with pytest.raises(ValueError, match="GUConfig: base must be a gradient method's name, got 'gu'"):
        lm.make_method("gu", {"base": "gu"})
    with pytest.raises(ValueError, match=r"GUConfig: rank must be an int in \[1, 16\)"):
        lm.make_method("npo+gu", {"rank": 17})
    with pytest.raises(ValueError, match=r"retain: method 'npo\+gu' needs a retain set"):
        lm.unlearn(m, sets[0], None, "npo+gu")
    with pytest.raises(ValueError, match=r"GUConfig.layers: \('nothing.\*',\) match no parameter"):
        lm.unlearn(m, sets[0], sets[1], "npo+gu", {"layers": ("nothing.*",)}, steps=1, progress=False)


@pytest.mark.parametrize("base, extra", [("ga", {}), ("graddiff", {"retain_loss": "kl"}), ("npo", {"mode": "adam"}),
                                         ("simnpo", {"scope": "group"}), ("saf", {"when_full": "freeze", "rank": 2}),
                                         ("shred", {"orthogonalize": "cholqr2"})])
def test_gu_wraps_every_gradient_method(base, extra, models, sets):
    """GU on each base: the base's loss, the subspace growing, the update projected (gu_kept < 1)."""
    m = copy.deepcopy(models["target"])
    res = lm.unlearn(m, sets[0], sets[1], f"{base}+gu", extra, steps=4, progress=False)
    method = res.method
    assert method.label == f"{base}+gu" and method.inner.name == base
    ranks = [e["gu_rank"] for e in res.log]
    assert ranks == ([1.0, 2.0, 2.0, 2.0] if extra.get("rank") == 2 else [1.0, 2.0, 3.0, 4.0])
    assert all(0 < e["gu_kept"] < 1 for e in res.log[1:])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_gu_joint_step_and_its_default_layers(models, sets):
    """GU trains its layers only (the last two blocks, the final norm, the LM head); the joint
    step adds beta * g_r to the projected gradient."""
    m = copy.deepcopy(models["target"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = lm.unlearn(m, sets[0], sets[1], "graddiff+gu", {"mode": "gradient", "joint": True, "beta": 0.5,
                                                          "scope": "group", "orthogonalize": "cholqr2"},
                     steps=3, progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    n_layers = len(m.model.layers)
    allowed = tuple(f"model.layers.{i}." for i in (n_layers - 2, n_layers - 1)) + ("model.norm.", "lm_head.")
    assert changed and all(n.startswith(allowed) for n in changed), changed
    assert any(n.startswith("model.layers") for n in changed) and any(n.startswith("lm_head") for n in changed)
    assert [e["gu_rank"] for e in res.log] == [1.0, 2.0, 3.0]
    assert all(0 < e["gu_kept"] <= 1 for e in res.log) and "retain" in res.log[0]


def _write_jsonl(path, exs):
    path.write_text("".join(json.dumps({"question": e.prompt[len("Question: "):-len("\nAnswer:")],
                                        "answer": e.answer}) + "\n" for e in exs))
    return str(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lethe.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def jsonl(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("jsonl")
    data = builtin_data(bench, "forget10")
    return {"forget": _write_jsonl(d / "forget.jsonl", data.forget),
            "retain": _write_jsonl(d / "retain.jsonl", data.retain[:200]), "model": str(bench.target)}


@pytest.mark.parametrize("extra, match", [
    (["--method", "nope"], r"--method: method must be one of \['ga'"),
    (["--method", "npo"], "--retain: method 'npo' needs a retain set"),
    (["--method", "shred", "--layers", "lm_head.nothing*"], "layers: pattern 'lm_head.nothing\\*' matches no"),
    (["--method", "npo", "--set", "beta"], "--set: expected KEY=VALUE"),
    (["--method", "npo", "--set", "gamma=x"], "--set gamma: could not convert"),
    (["--method", "shred", "--set", "k=0"], "k must be >= 1"),
    (["--method", "shred", "--steps", "0"], "UnlearnConfig: steps must be a positive int"),
])
def test_cli_unlearn_errors_without_traceback(extra, match, jsonl, tmp_path):
    r = _cli("unlearn", "--model", jsonl["model"], "--forget", jsonl["forget"], "--out", str(tmp_path / "o"), *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    import re
    assert re.search(match, r.stderr), r.stderr


def test_cli_unlearn_refuses_a_model_without_lm_head(jsonl, models, tmp_path):
    d = tmp_path / "base"
    models["target"].model.save_pretrained(d)  # a LlamaModel: hidden states, no head
    r = _cli("unlearn", "--method", "shred", "--model", str(d), "--forget", jsonl["forget"], "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_cli_unlearn_writes_a_model_and_a_log_and_resumes(jsonl, tmp_path):
    out = tmp_path / "npo"
    args = ("unlearn", "--method", "npo", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
            jsonl["retain"], "--out", str(out), "--steps", "4", "--no-progress", "--set", "beta=0.2")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "npo" and log["config"]["beta"] == 0.2 and len(log["steps"]) == 4
    assert {"loss", "npo", "retain", "lr"} <= set(log["steps"][0])
    assert not (out / lm.driver.CHECKPOINT).exists()
    r = _cli(*args)
    assert r.returncode == 2 and "already holds a model" in r.stderr
    r = _cli(*args, "--resume")
    assert r.returncode == 0 and "already holds the finished run" in r.stdout


def test_demo_runs_evaluates_and_resumes(bench, tmp_path, monkeypatch):
    from bench_fixtures import EVAL_TEST
    from lethe.demo import run_demo

    import lethe.demo
    # the continual part on the tests' stream (its retrained reference is cached), FIT alone
    monkeypatch.setattr(lethe.demo, "STREAM_REQUESTS", 30)
    monkeypatch.setattr(lethe.demo, "STREAM_EVERY", 15)
    monkeypatch.setattr(lethe.demo, "STREAM_BASELINES", ())
    lines = []
    out = tmp_path / "demo"
    res = run_demo(out, methods=["npo", "shred", "ssd", "fit"], cache=bench.root.parent.parent, bench_config=EVAL_TEST,
                   progress=False, retain_size=60, echo=lines.append)
    assert any("Forget Degree" in x for x in lines) and (out / "continual" / "continual.png").exists()
    assert json.loads((out / "demo.json").read_text())["continual"]["requests"] == 30
    names = [r["name"] for r in res["rows"]]
    assert names == ["target", "retain", "npo", "shred", "ssd"]
    ssd = res["rows"][4]  # the one-shot method: its benchmark point, no optimiser settings
    assert ssd["config"]["alpha"] == lm.SSD.benchmark_config["alpha"] and ssd["train"] is None
    assert ssd["log"][-1]["selected"] > 0
    table = res["table"]
    print(table)
    for col in ("forget prob", "forget quality", "utility", "MIA AUC", "exact @int4", "exact relearnt"):
        assert col in table.splitlines()[0]
    d = json.loads((out / "demo.json").read_text())
    assert d["rows"][2]["results"]["relearn"]["after"]["exact"] is not None
    assert d["rows"][3]["results"]["quant"]["presets"]["paper-int4"]["forget"]["exact"] is not None
    assert (out / "forget_quality_vs_utility.png").stat().st_size > 0
    assert (out / "quantisation_recovery.png").stat().st_size > 0
    # an interrupted demo continues: finished methods are kept, not run again
    (out / "reports" / "shred.json").unlink()
    lines.clear()
    run_demo(out, methods=["npo", "shred", "ssd", "fit"], cache=bench.root.parent.parent, bench_config=EVAL_TEST,
             progress=False, retain_size=60, echo=lines.append)
    assert any("npo: done before, kept" in x for x in lines) and any("fit: done before, kept" in x for x in lines)
    assert any("shred: unlearning" in x for x in lines)


def test_cli_unlearn_with_gu(jsonl, tmp_path):
    out = tmp_path / "npo_gu"
    r = _cli("unlearn", "--method", "npo+gu", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
             jsonl["retain"], "--out", str(out), "--steps", "2", "--no-progress", "--set", "rank=4")
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "npo+gu" and log["config"]["rank"] == 4 and log["config"]["base"] == "npo"
    assert {"gu_rank", "gu_kept", "npo"} <= set(log["steps"][-1])
    r = _cli("unlearn", "--method", "saf+gu", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
             jsonl["retain"], "--out", str(tmp_path / "o"), "--set", "mode=sideways")
    assert r.returncode == 2 and "GUConfig: mode must be one of" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_demo_help():
    r = _cli("demo", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "--methods" in r.stdout
    r = _cli("demo", "--methods", "nope", "--out", "/tmp/lethe-demo-never")
    assert r.returncode == 2 and "method must be one of" in r.stderr and "Traceback" not in r.stderr


def test_cli_unlearn_with_ssd(jsonl, tmp_path):
    out = tmp_path / "ssd"
    r = _cli("unlearn", "--method", "ssd", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
             jsonl["retain"], "--out", str(out), "--no-progress", "--set", "alpha=2", "--set", "modules=Linear")
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "ssd" and log["config"]["alpha"] == 2 and log["config"]["modules"] == ["Linear"]
    assert log["steps"][-1]["selected"] > 0 and "training" not in r.stdout
    bad = _cli("unlearn", "--method", "ssd", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
               jsonl["retain"], "--out", str(tmp_path / "bad"), "--set", "modules=Conv9d")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "no module of the model is a 'Conv9d'" in bad.stderr
    bad = _cli("unlearn", "--method", "ssd", "--model", jsonl["model"], "--forget", jsonl["forget"], "--retain",
               jsonl["retain"], "--out", str(tmp_path / "bad2"), "--lr", "1e-3")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--lr: method 'ssd' trains nothing" in bad.stderr
