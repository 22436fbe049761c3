"""lethe.integrations.hf.UnlearnTrainer: the methods in a transformers.Trainer.

On the reduced built-in benchmark (conftest's session fixtures bench and models, bench_fixtures.EVAL_TEST:
a 0.8M-parameter Llama that memorised its corpus; LETHE_TEST_CACHE for a prebuilt cache), on the CPU (use_cpu=True, so that the figures do
not depend on the machine):
- the Trainer path makes the plain loop's updates (lethe.methods.unlearn): with
  training_arguments(cfg) the parameters after 10 steps of NPO and of SHRED (and 4 of GA with
  weight decay, decay_all=True) are bit-identical on CPU (measured max |difference| 0.0); the
  test allows 1e-6;
- LoRA (peft) runs of SHRED and NPO forget (the forget answers' mean probability drops well below
  the target model's) with the LM head frozen and given no gradient;
- resuming from a Trainer checkpoint ends with the parameters of an uninterrupted run, without
  running `prepare` again;
- a user dataset of {"forget", "retain"} items goes through ForgetRetainCollator; without "index",
  SHRED gives a clear error."""
import copy
import os
import sys

import pytest
import torch

import lethe.methods as lm
from lethe.eval.data import examples_from_qas
from lethe.eval.evaluator import Scorer, builtin_data

transformers = pytest.importorskip("transformers")

from lethe.integrations.hf import (ForgetRetainCollator, METHOD_STATE, UnlearnStepDataset,  # noqa: E402
                                   UnlearnTrainer, training_arguments)

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def data(bench, models):
    tok = bench.tokenizer()
    forget_ex = builtin_data(bench, "forget10").forget
    retain_ex = examples_from_qas(bench.corpus.retain("forget10"))
    return {"tok": tok, "forget_ex": forget_ex, "retain_ex": retain_ex[:200],
            "forget": lm.encode(forget_ex, tok, "forget"), "retain": lm.encode(retain_ex, tok, "retain"),
            "target": models["target"]}  # (never trained here: every run trains a deep copy)


def _args(cfg, out, **kw):
    kw = {"save_strategy": "no", "disable_tqdm": True, "logging_steps": 5, "use_cpu": True, **kw}
    return training_arguments(cfg, out, **kw)


def _trainer(data, model, cfg, out, method, **kw):
    args = kw.pop("args", None) or _args(cfg, out)
    return UnlearnTrainer(model=model, args=args, method=method, forget=data["forget"], retain=data["retain"],
                          batch_size=cfg.batch_size, **kw)


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _answer_prob(model, tok, examples):
    """The mean over the examples of exp(mean log-prob of the answer's tokens)."""
    lp, _, _, mask = Scorer(model, tok).token_stats([e.prompt for e in examples], [e.answer for e in examples])
    return torch.exp((lp * mask).sum(1) / mask.sum(1)).mean().item()


def test_hf_module_imports_no_transformers(monkeypatch):
    """hf.py's top level never imports transformers (UnlearnTrainer & co. are imported on first use)."""
    import importlib.util

    import lethe.integrations.hf as hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    spec = importlib.util.spec_from_file_location("_lethe_hf_probe", hf.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.undo()
    assert mod.UnlearnTrainer is UnlearnTrainer and mod.training_arguments is training_arguments


def test_training_arguments_match_the_config(tmp_path):
    cfg = lm.UnlearnConfig(steps=40, lr=2e-3, warmup=0.25, weight_decay=0.01, clip=0.5, seed=3)
    a = training_arguments(cfg, tmp_path, save_steps=7)
    assert (a.learning_rate, a.max_steps, a.warmup_steps, a.weight_decay, a.max_grad_norm, a.seed) == (
        2e-3, 40, 10, 0.01, 0.5, 3)
    assert (a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.per_device_train_batch_size) == (0.9, 0.999, 1e-8, 1)
    assert getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type) == "linear"
    assert getattr(a.optim, "value", a.optim) == "adamw_torch"
    assert not a.fp16 and not a.bf16 and a.save_steps == 7


@pytest.mark.parametrize("method,weight_decay", [("npo", 0.0), ("shred", 0.0), ("ga", 0.1), ("npo+gu", 0.0)])
def test_trainer_equals_the_plain_loop(data, tmp_path, method, weight_decay):
    steps = 4 if method == "ga" else 10
    cfg = lm.UnlearnConfig(steps=steps, lr=1e-3, batch_size=16, seed=1, weight_decay=weight_decay)
    plain = copy.deepcopy(data["target"])
    res = lm.unlearn(plain, data["forget"], data["retain"], method=method, train=cfg, progress=False)
    model = copy.deepcopy(data["target"])
    # (decay_all: the plain loop decays the norm weights too, which the Trainer exempts by default)
    tr = _trainer(data, model, cfg, tmp_path, method, decay_all=weight_decay > 0)
    assert isinstance(tr.train_dataset, UnlearnStepDataset) and len(tr.train_dataset) == cfg.steps
    tr.train()
    diff = _max_diff(plain, model)
    print(f"{method}: max |trainer - plain loop| over the parameters after {cfg.steps} steps: {diff:.3g}")
    assert diff <= 1e-6
    assert _max_diff(model, data["target"]) > 1e-4  # (it trained)
    if method == "ga":
        return
    # the loss parts are logged with the loss (every 5 steps here: the mean of those steps)
    logged = [h for h in tr.state.log_history if "loss" in h]
    part = "kl" if method == "shred" else "npo"
    assert [h["step"] for h in logged] == [5, 10]
    if method == "npo+gu":  # the step hooks ran at the plain loop's places (GU's projection logged too)
        assert logged[-1]["gu_kept"] == pytest.approx(sum(e["gu_kept"] for e in res.log[5:]) / 5, rel=1e-5)
    want = sum(e[part] for e in res.log[5:]) / 5
    assert logged[-1][part] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method,lr,steps", [("shred", 4e-3, 20), ("npo", 5e-3, 25)])
def test_lora_forgets_with_the_head_frozen(data, tmp_path, method, lr, steps):
    import peft

    torch.manual_seed(0)  # (peft's initialisation of lora_A)
    model = peft.get_peft_model(copy.deepcopy(data["target"]),
                                peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    head = model.get_output_embeddings()
    head0 = head.weight.detach().clone()
    assert not head.weight.requires_grad
    cfg = lm.UnlearnConfig(steps=steps, lr=lr)
    tr = _trainer(data, model, cfg, tmp_path, method)
    tr.train()
    tok = data["tok"]
    before = _answer_prob(data["target"], tok, data["forget_ex"])
    after = _answer_prob(model, tok, data["forget_ex"])
    retain_before = _answer_prob(data["target"], tok, data["retain_ex"])
    retain_after = _answer_prob(model, tok, data["retain_ex"])
    print(f"LoRA {method} (lr {lr:g}, {steps} steps): forget answer prob {before:.3f} -> {after:.3f}, "
          f"retain {retain_before:.3f} -> {retain_after:.3f}")
    assert after < 0.9 * before
    assert torch.equal(head.weight, head0)
    # one more step's backward: the LoRA weights get gradients, the head's weight none
    model.zero_grad(set_to_none=True)
    loss = tr.compute_loss(model, tr._prepare_inputs(tr.train_dataset[0]))
    loss.backward()
    assert head.weight.grad is None
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_resume_equals_an_uninterrupted_run(data, tmp_path, monkeypatch):
    cfg = lm.UnlearnConfig(steps=10, lr=1e-3, batch_size=16)
    full = copy.deepcopy(data["target"])
    out = tmp_path / "run"
    _trainer(data, full, cfg, out, "npo", args=_args(cfg, out, save_strategy="steps", save_steps=5)).train()
    ckpt = out / "checkpoint-5"
    assert (ckpt / METHOD_STATE).is_file() and (out / "checkpoint-10" / METHOD_STATE).is_file()

    def no_prepare(*a, **k):
        raise AssertionError("prepare must not run again when resuming")

    model = copy.deepcopy(data["target"])
    tr = _trainer(data, model, cfg, tmp_path / "resumed", "npo")
    monkeypatch.setattr(tr.method, "prepare", no_prepare)
    tr.train(resume_from_checkpoint=str(ckpt))
    assert tr.state.global_step == cfg.steps
    diff = _max_diff(full, model)
    print(f"resumed at step 5 vs uninterrupted: max |difference| {diff:.3g}")
    assert diff <= 1e-6
    # another method's (or another config's) checkpoint is refused
    other = _trainer(data, copy.deepcopy(data["target"]), cfg, tmp_path / "other", "npo",
                     method_config={"beta": 0.2})
    with pytest.raises(ValueError, match="config"):
        other.train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=METHOD_STATE):
        (tmp_path / "empty").mkdir()
        _trainer(data, copy.deepcopy(data["target"]), cfg, tmp_path / "x", "npo").train(
            resume_from_checkpoint=str(tmp_path / "empty"))


class _Items(torch.utils.data.Dataset):
    """A user's dataset: item i = {"forget": forget example i, "retain": None}."""

    def __init__(self, enc, index=True):
        self.enc, self.index = enc, index

    def __len__(self):
        return len(self.enc)

    def __getitem__(self, i):
        b = self.enc.batch([i])
        ex = {"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()}
        if self.index:
            ex["index"] = i
        return {"forget": ex, "retain": None}


def test_user_dataset_and_the_default_collator(data, tmp_path):
    enc = data["forget"]
    items = _Items(enc)
    got = ForgetRetainCollator(enc.pad_id)([items[i] for i in (3, 0, 7)])
    want = enc.batch([3, 0, 7])
    assert got["retain"] is None and set(got["forget"]) == set(want)
    for k in want:
        assert torch.equal(got["forget"][k], want[k]), k
    cfg = lm.UnlearnConfig(steps=3, lr=1e-3)
    model = copy.deepcopy(data["target"])
    tr = UnlearnTrainer(model=model, args=_args(cfg, tmp_path, per_device_train_batch_size=8), method="shred",
                        forget=enc, train_dataset=items)
    tr.train()
    assert tr.state.global_step == 3 and _max_diff(model, data["target"]) > 0


def test_a_batch_without_index_is_a_clear_error(data, tmp_path):
    cfg = lm.UnlearnConfig(steps=2, lr=1e-3)
    tr = UnlearnTrainer(model=copy.deepcopy(data["target"]), args=_args(cfg, tmp_path, per_device_train_batch_size=4),
                        method="shred", forget=data["forget"], train_dataset=_Items(data["forget"], index=False))
    with pytest.raises(ValueError, match=r"forget batch has no 'index'.*'shred'"):
        tr.train()
    # and the built-in dataset's settings are checked up front
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        _trainer(data, copy.deepcopy(data["target"]), cfg, tmp_path, "npo",
                 args=_args(cfg, tmp_path, per_device_train_batch_size=2))
    with pytest.raises(ValueError, match="retain"):
        UnlearnTrainer(model=copy.deepcopy(data["target"]), args=_args(cfg, tmp_path), method="npo",
                       forget=data["forget"])
