"""lethe's unlearning methods in a Hugging Face `transformers.Trainer`: UnlearnTrainer.

    from lethe.integrations.hf import UnlearnTrainer, training_arguments
    import lethe.methods as lm

    cfg = lm.UnlearnConfig(steps=40, lr=1e-3, batch_size=16)
    forget, retain = lm.encode(forget_examples, tok, "forget"), lm.encode(retain_examples, tok, "retain")
    trainer = UnlearnTrainer(model=model, args=training_arguments(cfg, "out"), method="npo",
                             forget=forget, retain=retain, batch_size=cfg.batch_size)
    trainer.train()

A step's inputs are {"forget": batch, "retain": batch or None} (open-unlearning's layout), each
batch a dict of right-padded input_ids, attention_mask, labels (-100 where no loss) and index (the
rows' positions in the forget / retain set, which the methods use to look up what `prepare`
cached per example: NPO's reference log-likelihoods, SHRED's teacher targets, the retain KL's
reference top-K). The loss is the method's (lethe.methods), computed from the final hidden states
and the LM head's weight with lethe's fused ops: no [batch, seq, vocab] logits.

With `forget=` (and `retain=`) and no train_dataset, the trainer's dataset is UnlearnStepDataset:
item s is the plain loop's step s (lethe.methods.driver.step_batches), read in order
(a sequential sampler, per_device_train_batch_size=1, step_collator unwrapping it), so that with
training_arguments(cfg, ...) the Trainer makes the same updates as lethe.methods.unlearn(...,
train=cfg) (same parameters on CPU up to float rounding; see tests/test_methods_trainer.py).
A train_dataset of your own has items {"forget": example, "retain": example or None}, each
example a dict of 1-D input_ids, labels (default: the input_ids), attention_mask (default: ones)
and index; ForgetRetainCollator pads and stacks them (the Trainer's default sampler then).

`method.prepare` runs once, in train(), on the model as it is then (the original model), unless
train(resume_from_checkpoint=...) resumes, in which case the method's state is read from the
checkpoint's lethe_method_state.pt, which every Trainer checkpoint holds.

Differences from the plain loop to know about: with weight_decay > 0 the Trainer exempts biases
and normalisation weights from the decay (Trainer.get_decay_parameter_names) whereas
lethe.methods.unlearn decays every parameter (UnlearnTrainer(decay_all=True) decays them all
too); with gradient_accumulation_steps = G (or W processes) one optimizer step averages G (x W)
consecutive plain-loop steps' batches."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from lethe.methods.base import Encoded, Method
from lethe.methods.driver import UnlearnConfig, encode, make_method, step_batches

__all__ = ["UnlearnTrainer", "UnlearnStepDataset", "ForgetRetainCollator", "step_collator", "training_arguments",
           "METHOD_STATE"]

METHOD_STATE = "lethe_method_state.pt"  # the method's state_dict in each checkpoint folder
SIDES = ("forget", "retain")
IGNORE_INDEX = -100


def training_arguments(cfg: UnlearnConfig, output_dir, **kw) -> TrainingArguments:
    """The TrainingArguments with which UnlearnTrainer makes the updates lethe.methods.unlearn
    makes with `cfg`: AdamW (torch's, betas 0.9 / 0.999, eps 1e-8) at cfg.lr, cfg.steps steps, a
    linear warm-up over int(cfg.warmup * cfg.steps) of them then a linear decay to 0, gradient
    clipping at cfg.clip (0: none), cfg.weight_decay, cfg.seed, fp32, no reporting, a log entry
    per step. Keyword arguments are TrainingArguments fields that override these (save_steps=...,
    logging_steps=...); give the UnlearnTrainer batch_size=cfg.batch_size."""
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"cfg must be an UnlearnConfig, got {type(cfg).__name__}")
    if cfg.batch_fraction is not None:
        raise ValueError("cfg: give batch_size, not batch_fraction (cfg.resolved(len(forget)) turns one into the other)")
    a = dict(output_dir=os.fspath(output_dir), learning_rate=float(cfg.lr), max_steps=cfg.steps,
             warmup_steps=int(cfg.warmup * cfg.steps), lr_scheduler_type="linear", weight_decay=float(cfg.weight_decay),
             max_grad_norm=float(cfg.clip), adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
             per_device_train_batch_size=1, per_device_eval_batch_size=1, gradient_accumulation_steps=1, fp16=False, bf16=False, report_to=[],
             seed=cfg.seed, logging_steps=1, remove_unused_columns=False, dataloader_num_workers=0)
    a.update(kw)
    return TrainingArguments(**a)


class UnlearnStepDataset(Dataset):
    """Item s: the inputs of the plain loop's step s, step_batches(forget, retain, cfg, s)
    ({"forget": batch, "retain": batch or None}, on the CPU); `length` items (default cfg.steps)."""

    def __init__(self, forget: Encoded, retain: Optional[Encoded], cfg: UnlearnConfig, length: Optional[int] = None):
        if not isinstance(forget, Encoded) or (retain is not None and not isinstance(retain, Encoded)):
            raise TypeError("forget / retain: expected Encoded datasets (lethe.methods.encode)")
        self.forget, self.retain, self.cfg = forget, retain, cfg
        self.length = cfg.steps if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int) -> dict:
        step = int(step)
        if not 0 <= step < self.length:
            raise IndexError(f"step {step} out of range(0, {self.length})")
        return step_batches(self.forget, self.retain, self.cfg, step)


def step_collator(items: list) -> dict:
    """The collator of UnlearnStepDataset: a batch of one item, the step's inputs, unwrapped."""
    if len(items) != 1:
        raise ValueError(f"each item of UnlearnStepDataset is a whole step's inputs: the dataloader must take one item "
                         f"at a time (per_device_train_batch_size=1), got {len(items)}")
    return items[0]


class ForgetRetainCollator:
    """Pads and stacks items {"forget": example, "retain": example or None} into a step's inputs.
    An example is a dict of 1-D input_ids, labels (default: input_ids), attention_mask (default:
    ones) and index (the example's position in the forget / retain set; needed by the methods that
    cache per-example state: NPO, SHRED, a retain KL); right padding, labels -100 on padding."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = int(pad_id)

    def __call__(self, items: list) -> dict:
        if not items:
            raise ValueError("ForgetRetainCollator: an empty batch")
        out = {}
        for side in SIDES:
            rows = [it.get(side) if isinstance(it, Mapping) else None for it in items]
            if side == "forget" and any(r is None for r in rows):
                raise ValueError('ForgetRetainCollator: every item must be a dict with a "forget" example '
                                 '({"forget": {...}, "retain": {...} or None})')
            if all(r is None for r in rows):
                out[side] = None
            elif any(r is None for r in rows):
                raise ValueError('ForgetRetainCollator: some items have a "retain" example and some do not')
            else:
                out[side] = self.pad(rows, side)
        return out

    def pad(self, rows: list, what: str = "forget") -> dict:
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
        T, B = max(len(x) for x in ids), len(ids)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, (r, x) in enumerate(zip(rows, ids)):
            n = len(x)
            input_ids[i, :n] = x
            m, lab = r.get("attention_mask"), r.get("labels")
            m = torch.ones(n, dtype=torch.long) if m is None else torch.as_tensor(m, dtype=torch.long).reshape(-1)
            lab = x if lab is None else torch.as_tensor(lab, dtype=torch.long).reshape(-1)
            if len(lab) != n or len(m) != n:
                raise ValueError(f"ForgetRetainCollator: {what} example {i}: input_ids, labels and attention_mask "
                                 "must have the same length")
            mask[i, :n], labels[i, :n] = m, lab
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        has = ["index" in r and r["index"] is not None for r in rows]
        if any(has):
            if not all(has):
                raise ValueError(f"ForgetRetainCollator: some {what} examples have an 'index' and some do not")
            out["index"] = torch.tensor([int(torch.as_tensor(r["index"]).reshape(-1)[0]) for r in rows],
                                        dtype=torch.long)
        return out


class _MethodStepHooks(TrainerCallback):
    """Calls the method's before_step / after_step around each optimiser step."""

    def __init__(self, trainer: "UnlearnTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._method_hook("before", state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._method_hook("after", state)


def _overrides_prepare(method: Method) -> bool:
    return type(method).prepare is not Method.prepare


class UnlearnTrainer(Trainer):
    """A transformers.Trainer whose loss is a lethe unlearning method's.

    model: a transformers causal LM (PEFT-wrapped or not; keep the LM head out of a LoRA's
    target_modules: its frozen weight then gets no gradient, and the fused ops skip that GEMM).
    args: TrainingArguments (training_arguments(cfg, output_dir) for the plain loop's settings).
    method: a registered name (lethe.methods.available()), a Method class or instance;
    method_config: its config dataclass or a dict of overrides (with a name or class only).
    forget / retain: the forget and retain sets (Encoded, or examples encoded with
    processing_class, the tokenizer); the retain set is used only when the method needs one.
    batch_size: forget (and retain) examples per step of the built-in dataset (default
    UnlearnConfig's, 16); its order is seeded with args.data_seed or args.seed.
    decay_all: weight decay on every parameter, as lethe.methods.unlearn does (default: the
    Trainer's convention, no decay on biases and normalisation weights; the same with
    weight_decay = 0).
    train_dataset / data_collator: a dataset of your own of {"forget", "retain"} items instead
    (default collator ForgetRetainCollator); `forget` / `retain` are then what `prepare` runs on
    and what the items' "index" refers to.
    Other keyword arguments go to Trainer (processing_class, callbacks, eval_dataset, ...).
    The loss parts (e.g. npo, forget_nll, retain; kl for SHRED) are logged with the loss, averaged
    over the steps since the last log."""

    loss_is_scaled_for_ga = False  # the method's loss is a per-batch mean

    def __init__(self, model=None, args: Optional[TrainingArguments] = None,
                 method: Union[str, type, Method] = "npo", method_config=None,
                 forget=None, retain=None, *, batch_size: Optional[int] = None, decay_all: bool = False,
                 train_dataset=None, data_collator=None, **kwargs):
        if args is None:
            raise ValueError("args: give the TrainingArguments (lethe.integrations.hf.training_arguments(cfg, "
                             "output_dir) for lethe's UnlearnConfig)")
        if model is None:
            raise ValueError("model: UnlearnTrainer needs a model (model_init is not supported)")
        from lethe.integrations import hf

        hf.check_causal_lm(model)
        self.method = make_method(method, method_config)
        if getattr(self.method, "one_shot", False):
            raise ValueError(f"method: {self.method.label!r} is a one-shot method (no training, no optimiser): run it "
                             "with lethe.methods.unlearn or `lethe unlearn`, not a Trainer")
        tok = kwargs.get("processing_class")
        self.forget = None if forget is None else encode(forget, tok, "forget")
        needs_retain = self.method.needs_retain()
        self.retain = encode(retain, tok, "retain") if retain is not None and needs_retain else None
        if train_dataset is None:
            if self.forget is None:
                raise ValueError("forget: give the forget set (or a train_dataset of {'forget', 'retain'} items)")
            if needs_retain and self.retain is None:
                raise ValueError(f"retain: method {self.method.label!r} needs a retain set (its config: "
                                 f"{self.method.config})")
            if args.max_steps is None or args.max_steps <= 0:
                raise ValueError("args.max_steps: give the number of steps (> 0); the built-in dataset holds one "
                                 "item per step")
            if args.per_device_train_batch_size != 1:
                raise ValueError("args.per_device_train_batch_size must be 1 with the built-in dataset (each item is "
                                 f"a whole step's inputs; batch_size= sets the examples per step), got "
                                 f"{args.per_device_train_batch_size}")
            bs = UnlearnConfig().batch_size if batch_size is None else batch_size
            seed = args.data_seed if args.data_seed is not None else args.seed
            n = args.max_steps * args.gradient_accumulation_steps * max(1, args.world_size)
            cfg = dataclasses.replace(UnlearnConfig(), steps=n, batch_size=bs, seed=seed)
            train_dataset = UnlearnStepDataset(self.forget, self.retain, cfg)
            if data_collator is None:
                data_collator = step_collator
        else:
            if batch_size is not None:
                raise ValueError("batch_size: it sets the built-in dataset's batches; with a train_dataset of your "
                                 "own set args.per_device_train_batch_size")
            if data_collator is None:
                pad = self.forget.pad_id if self.forget is not None else getattr(tok, "pad_token_id", None)
                data_collator = ForgetRetainCollator(0 if pad is None else pad)
        self.decay_all = bool(decay_all)
        self._lethe_prepared = False
        self._lethe_parts: dict = {}
        self._lethe_inputs = None  # the last training batch, for the method's step hooks
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator, **kwargs)
        self.add_callback(_MethodStepHooks(self))

    # ---- the method's state: prepare once, or restore it from the checkpoint ----

    def prepare_method(self) -> None:
        """Runs method.prepare on the model as it is now (train() does it once, before training)."""
        if self.forget is None and _overrides_prepare(self.method):
            raise ValueError(f"forget: method {self.method.label!r} computes per-example state on the forget set before "
                             "training (prepare); give forget= (the examples the dataset's 'index' refers to)")
        self.method.prepare(self.model, self.forget, self.retain)
        self._lethe_prepared = True

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Trainer.train, after method.prepare on the original model (the first call), or with the
        method's state read from the checkpoint when resuming."""
        ckpt = None if resume_from_checkpoint is False else resume_from_checkpoint
        if ckpt is True:
            ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if ckpt is not None:
            path = os.path.join(ckpt, METHOD_STATE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {os.fspath(ckpt)!r} has no {METHOD_STATE} (the method's "
                                 "state, saved with each UnlearnTrainer checkpoint): it is not an UnlearnTrainer "
                                 "checkpoint, and running prepare on the changed model would train another model")
            self.method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self._lethe_prepared = True
        elif not self._lethe_prepared:
            self.prepare_method()
        return super().train(resume_from_checkpoint=ckpt, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir):
        # (called by _save_checkpoint with the checkpoint folder, before it is pushed or rotated)
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            tmp = os.path.join(output_dir, METHOD_STATE + ".tmp")
            torch.save(self.method.state_dict(), tmp)
            os.replace(tmp, os.path.join(output_dir, METHOD_STATE))

    def get_decay_parameter_names(self, model) -> list:
        if self.decay_all:
            return [n for n, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    # ---- the loss ----

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """method.loss(model, {"forget", "retain"}, step=state.global_step, total_steps=state.max_steps);
        return_outputs=True gives (loss, the loss parts)."""
        if not isinstance(inputs, Mapping) or not isinstance(inputs.get("forget"), Mapping):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f'UnlearnTrainer: a batch must be {{"forget": {{input_ids, attention_mask, labels, index}}, '
                             f'"retain": {{...}} or None}}, got {got}')
        batch = {"forget": inputs["forget"], "retain": inputs.get("retain")}
        if self.method.needs_retain() and batch["retain"] is None:
            raise ValueError(f"UnlearnTrainer: method {self.method.label!r} needs a retain batch, the batch has none")
        if not self._lethe_prepared and _overrides_prepare(self.method):
            raise RuntimeError("UnlearnTrainer: the method has not been prepared (call train(), or prepare_method())")
        total = self.state.max_steps or self.args.max_steps
        try:
            loss, parts = self.method.loss(model, batch, self.state.global_step, total)
        except KeyError as e:
            missing = [s for s in SIDES if batch[s] is not None and "index" not in batch[s]]
            if e.args and e.args[0] == "index" and missing:
                raise ValueError(f"UnlearnTrainer: the {missing[0]} batch has no 'index', which method "
                                 f"{self.method.label!r} needs to look up the state it cached per example in prepare: "
                                 "give each example its position in the forget / retain set passed to the trainer "
                                 "(a LongTensor 'index' per batch; ForgetRetainCollator stacks the items' 'index')"
                                 ) from e
            raise
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.method.label}: the loss is {loss.item()} at step {self.state.global_step}; "
                                     "lower the learning rate")
        if model.training:
            self._lethe_inputs = batch
            self._record(parts)
        return (loss, parts) if return_outputs else loss

    def _record(self, parts: dict) -> None:
        for k, v in parts.items():
            self._lethe_parts.setdefault(k, []).append(float(v))

    def _method_hook(self, which: str, state) -> None:
        """method.before_step / after_step around the optimiser step (GU's projections), on the
        trained parameters and the last batch, at the plain loop's place: after the clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = state.max_steps or self.args.max_steps
        if which == "before":
            parts = self.method.before_step(self.model, params, self.optimizer, self._lethe_inputs,
                                            state.global_step, total)
        else:
            parts = self.method.after_step(self.model, params, self.optimizer, state.global_step, total)
        self._record(parts)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The method's loss on an eval batch of the same layout (no logits, no labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._lethe_parts and "loss" in logs:
            for k, vs in self._lethe_parts.items():
                logs[k if k not in logs else f"{self.method.name}_{k}"] = sum(vs) / len(vs)
            self._lethe_parts = {}
        super().log(logs, *args, **kwargs)

    # ---- the Trainer's data handling, for nested {"forget", "retain"} batches ----

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(ds, UnlearnStepDataset):
            return SequentialSampler(ds)
        return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # (the columns are "forget" and "retain", not the model's arguments)

    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _sides(self, inputs):
        return [inputs[s] for s in SIDES if isinstance(inputs, Mapping) and isinstance(inputs.get(s), Mapping)]

    def floating_point_ops(self, inputs) -> int:
        return sum(super(UnlearnTrainer, self).floating_point_ops(b) for b in self._sides(inputs))

    def _track_num_input_tokens(self, inputs):
        for b in self._sides(inputs):
            super()._track_num_input_tokens(b)
