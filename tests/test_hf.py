"""The Hugging Face integration on real model classes (tiny, built from configs): wrappers and PEFT
unwrapped, the models' own logit transforms applied or refused, and the fused loss equal to the
KL computed from the model's own full logits, with its gradients."""
import pytest
import torch
import transformers

from lethe.integrations import hf
from lethe.nn import ShredLoss
from lethe.ops import shred_reference as R

V = 97


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, V, (2, 10), generator=g), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, -2:] = 0
    return batch


def _llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64))


def _check_against_full_logits(student, teacher, trainable):
    """The helper's SHRED loss equals the KL from the student's own full logits; the gradients of
    `trainable` parameters equal autograd's through those logits."""
    torch.manual_seed(0)
    student.eval()  # no dropout: both passes see the same network (gradients flow in eval mode too)
    batch = _batch()
    loss_fn = ShredLoss(k=16, fraction=0.5, chunk_size=8)
    tg = hf.shred_targets(teacher, batch, loss_fn)
    loss = hf.shred_loss(student, batch, tg, loss_fn)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable}
    for _, p in trainable:
        p.grad = None
    logits = student(**batch).logits[:, :-1].reshape(-1, V)
    ref = R.topk_kl_reference(logits, tg.ids.reshape(-1, 16), tg.probs.reshape(-1, 16), tg.valid.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-5)
    assert loss.item() > 0
    for n, p in trainable:
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    return grads


COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# The causal LMs of the installed transformers whose logits are transformed (grep of their modeling
# files for logit_scale, logits_scaling, lm_head_multiplier, final_logit_softcapping, logits_soft_cap,
# logit_softcap): a scale lethe folds into the hidden states ...
SCALED = {
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.37)),
    "Cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.37)),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=3.5)),
    "GraniteMoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(logits_scaling=3.5, num_local_experts=2, num_experts_per_tok=1)),
    "GraniteMoeShared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(logits_scaling=3.5, num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=32)),
    "FalconH1": ("FalconH1Config", "FalconH1ForCausalLM", dict(lm_head_multiplier=0.5)),
}
# ... and softcapping, which the fused kernels do not implement: refused, naming it
SOFTCAPPED = {
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=30.0, head_dim=8), "final_logit_softcapping"),
    "Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=30.0, head_dim=8),
               "final_logit_softcapping"),
    "VaultGemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(final_logit_softcapping=30.0, head_dim=8),
                   "final_logit_softcapping"),
    "RecurrentGemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(logits_soft_cap=30.0), "logits_soft_cap"),
}


def _make(config, model, kw):
    return getattr(transformers, model)(getattr(transformers, config)(**{**COMMON, **kw}))


@pytest.mark.parametrize("family", sorted(SCALED))
def test_scaled_logits_are_the_models_own(family):
    torch.manual_seed(0)
    teacher = _make(*SCALED[family])
    student = _make(*SCALED[family])
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert hf.logit_scale(student) != 1.0
    _check_against_full_logits(student, teacher, [(n, p) for n, p in student.named_parameters() if p.requires_grad])


@pytest.mark.parametrize("family", sorted(SOFTCAPPED))
def test_softcapped_logits_are_refused(family):
    config, model, kw, attr = SOFTCAPPED[family]
    with pytest.raises(ValueError, match=f"{model} transforms its logits \\({attr} = 30"):
        hf.shred_targets(_make(config, model, kw), _batch(), ShredLoss(k=8))


def test_an_unknown_logit_transform_is_refused():
    # a model whose logits are not its head applied to its hidden states, by no config attribute
    model = _llama()
    forward = model.forward

    def shifted(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits + 1.0  # e.g. a learned offset
        return out

    model.forward = shifted
    with pytest.raises(ValueError, match="logits are not its LM head applied to its last hidden states"):
        hf.shred_targets(model, _batch(), ShredLoss(k=8))


@pytest.mark.parametrize("make,targets", [(_llama, ["q_proj", "v_proj"]), (_gpt2, ["c_attn"])], ids=["llama", "gpt2"])
def test_peft_lora_models(make, targets):
    # PeftModel.base_model is peft's LoraModel, whose output [0] is the logits: the helper must go to
    # the transformers model inside. The LoRA weights get gradients, the frozen head none.
    import peft

    teacher = make()
    base = make()
    base.load_state_dict(teacher.state_dict())
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                        fan_in_fan_out=make is _gpt2))
    lora = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    grads = _check_against_full_logits(student, teacher, lora)
    assert all(g.abs().sum() > 0 for g in grads.values())
    head = hf.unwrap(student).get_output_embeddings()
    assert head.weight.grad is None


def test_lora_on_the_head_is_refused():
    import peft

    student = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="LM head of LlamaForCausalLM carries a PEFT adapter"):
        hf.shred_loss(student, _batch(), hf.shred_targets(_llama(), _batch(), ShredLoss(k=8)), ShredLoss(k=8))


def test_wrappers_are_unwrapped():
    model = _llama()
    assert hf.unwrap(torch.nn.DataParallel(model)) is model
    assert hf.unwrap(torch.compile(model)) is model


def test_length_one_sequences():
    # nothing is left after the shift: empty targets and a zero loss, not a reshape error
    model = _llama()
    batch = {"input_ids": torch.randint(0, V, (2, 1))}
    loss_fn = ShredLoss(k=8)
    tg = hf.shred_targets(model, batch, loss_fn)
    assert tg.ids.shape == (2, 0, 8)
    loss = hf.shred_loss(model, batch, tg, loss_fn)
    assert loss.item() == 0.0


def _stats_from_logits(logits, labels, ignore_index=-100):
    """The statistics from the model's own logits [B, T - 1, V], in fp64: log_softmax, gather, moments."""
    z = logits.double()
    logp = torch.log_softmax(z, -1)
    valid = labels != ignore_index
    label_lp = torch.gather(logp, -1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[..., None]) ** 2).sum(-1)
    return label_lp, torch.logsumexp(z, -1), mu, var, z.argmax(-1)


def _check_token_stats(model, batch, labels=None, ignore_index=-100, **kw):
    st = hf.token_stats(model, batch["input_ids"], labels, batch.get("attention_mask"), ignore_index=ignore_index,
                        chunk_size=5, **kw)
    B_, T = batch["input_ids"].shape
    assert isinstance(st, hf.TokenStats)
    assert all(t.shape == (B_, T - 1) for t in st)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    want_labels = (labels if labels is not None else batch["input_ids"]).clone()
    if "attention_mask" in batch:
        want_labels[batch["attention_mask"] == 0] = ignore_index
    want = _stats_from_logits(logits, want_labels[:, 1:], ignore_index)
    for name, a, b in zip(st._fields[:4], st[:4], want[:4]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.equal(st.argmax, want[4])
    return st, want_labels[:, 1:]


@pytest.mark.parametrize("family", ["llama", "Granite"])
def test_token_stats_against_the_models_logits(family):
    torch.manual_seed(0)
    model = _llama() if family == "llama" else _make(*SCALED[family])
    batch = _batch(3)  # row 1 padded at its last two positions
    st, lab = _check_token_stats(model, batch)
    assert (st.label_logprob[lab == -100] == 0).all() and (st.label_logprob[lab != -100] < 0).all()
    assert int((lab == -100).sum()) == 2
    # explicit labels with ignored entries, and another ignore_index
    labels = batch["input_ids"].clone()
    labels[0, :4] = -100
    _check_token_stats(model, batch, labels)
    labels[0, :4] = -1
    st, lab = _check_token_stats(model, batch, labels, ignore_index=-1)
    assert (st.label_logprob[lab == -1] == 0).all() and int((lab == -1).sum()) == 5  # 3 + the 2 padded
    # no attention mask; the model left as it was (train mode, parameters requiring grad)
    model.train()
    _check_token_stats(model, {"input_ids": batch["input_ids"]}, backend="reference")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_token_stats_length_one_sequences():
    model = _llama()
    st = hf.token_stats(model, torch.randint(0, V, (2, 1)), None)
    assert all(t.shape == (2, 0) for t in st)
    assert st.argmax.dtype == torch.int64 and st.lse.dtype == torch.float32
