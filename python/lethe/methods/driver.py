"""The plain-loop driver: unlearn(model, forget, retain=None, method=...).

AdamW over the parameters that require grad, a linear warm-up and decay, gradient clipping, a
tqdm bar with each loss part, a log entry per step, a checkpoint every `checkpoint_every` steps
(the model, the optimiser, the schedule, the method's state and the log so far) and exact resume:
the batches of step s are a function of (seed, s) only, so an interrupted run that resumes from
its checkpoint ends with the same parameters as an uninterrupted one (bit for bit on CPU)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from lethe.methods.base import Encoded, Method, get, split_name

__all__ = ["UnlearnConfig", "UnlearnResult", "unlearn", "encode", "make_method", "benchmark_method", "step_batches",
           "build_optimizer", "select_parameters", "write_log", "CHECKPOINT"]

CHECKPOINT = "lethe_unlearn_state.pt"


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """The optimiser settings. The defaults are the built-in benchmark's (its tiny Llama that
    memorised its corpus at lr 3e-3), not any paper's: a model of your own wants its own (papers on
    TOFU with 1-8B models use lr 1e-5 and about 5 epochs)."""

    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 16  # forget examples per step (and retain examples, when the method uses them)
    # forget examples per step as a fraction of the forget set instead (rounded, at least 1): the
    # same number of steps then covers a larger forget set with larger batches
    batch_fraction: Optional[float] = None
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping (0: none)
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UnlearnConfig: {f} must be a positive int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"UnlearnConfig: lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup <= 1):
            raise ValueError(f"UnlearnConfig: warmup must be a fraction in [0, 1], got {self.warmup!r}")
        for f in ("weight_decay", "clip"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"UnlearnConfig: {f} must be a number >= 0, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"UnlearnConfig: seed must be an int, got {self.seed!r}")
        f = self.batch_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise ValueError(f"UnlearnConfig: batch_fraction must be a number in (0, 1] or None, got {f!r}")

    def resolved(self, n_forget: int) -> "UnlearnConfig":
        """This config with `batch_fraction` turned into `batch_size` for a forget set of n_forget examples."""
        if self.batch_fraction is None:
            return self
        return dataclasses.replace(self, batch_size=max(1, round(self.batch_fraction * n_forget)),
                                   batch_fraction=None)

    @classmethod
    def for_method(cls, method, **overrides) -> "UnlearnConfig":
        """The built-in benchmark's settings for `method` (a name, class or instance): these
        defaults with the method's `benchmark` overrides, then `overrides`."""
        m = method if isinstance(method, Method) else make_method(method)
        if "batch_size" in overrides:  # a given batch size wins over the method's fraction
            overrides.setdefault("batch_fraction", None)
        return cls(**{**m.benchmark, **overrides})


@dataclasses.dataclass
class UnlearnResult:
    model: torch.nn.Module
    method: Method
    log: list  # one dict per step: step, loss, its parts, lr
    seconds: float  # of this call's steps
    complete: bool = True  # False when stop_after ended the call early


def make_method(method, config=None) -> Method:
    """A Method instance from a name, a Method class or instance, with an optional config (its
    dataclass or a dict of overrides)."""
    if isinstance(method, Method):
        if config is not None:
            raise ValueError("config: give it with a method name, not with a Method instance")
        return method
    cls = get(method)
    _, base = split_name(method)
    if base is not None:  # "npo+gu": the plug-in with that base
        if config is None:
            config = {}
        if isinstance(config, dict):
            config = {"base": base, **config}
        elif getattr(config, "base", base) != base:
            raise ValueError(f"config: its base {config.base!r} is not the {base!r} of {method!r}")
    if isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        bad = sorted(set(config) - fields)
        if bad:
            raise ValueError(f"config: {cls.name} has no setting {bad[0]!r}; its settings are {sorted(fields)}")
        return cls(**config)
    return cls(config)


def benchmark_method(name) -> Method:
    """The method `name` with its settings on the built-in benchmark (its class's benchmark_config
    over the paper defaults; `lethe demo` runs these)."""
    cls = get(name)
    return make_method(name, dict(cls.benchmark_config) if cls.benchmark_config else None)


def encode(data, tokenizer=None, what: str = "forget") -> Encoded:
    """An Encoded dataset from lethe.eval Examples (or QA pairs, or dicts with question/answer), a
    JSONL path (lethe.eval.load_jsonl's format), or an Encoded as it is."""
    if isinstance(data, Encoded):
        return data
    from lethe.eval.data import Example, load_jsonl

    if isinstance(data, (str, os.PathLike)):
        data = load_jsonl(data, what=what)
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(f"{what}: expected a non-empty list of examples, a JSONL path or an Encoded dataset, "
                         f"got {type(data).__name__}")
    if tokenizer is None:
        raise ValueError(f"tokenizer: needed to encode the {what} examples")
    from lethe.eval.data import PROMPT
    from lethe.eval.evaluator import Scorer

    sc = Scorer(None, tokenizer)
    rows = []
    for i, e in enumerate(data):
        if isinstance(e, dict):
            if not isinstance(e.get("question"), str) or not isinstance(e.get("answer"), str):
                raise ValueError(f"{what}[{i}]: expected the keys 'question' and 'answer' (strings)")
            e = Example(PROMPT.format(q=e["question"]), e["answer"])
        elif hasattr(e, "question") and hasattr(e, "answer") and not isinstance(e, Example):
            e = Example(PROMPT.format(q=e.question), e.answer)
        if not isinstance(e, Example):
            raise ValueError(f"{what}[{i}]: expected an Example, a QA or a question/answer dict, got "
                             f"{type(e).__name__}")
        rows.append(sc.encode(e.prompt, e.answer))
    return Encoded(rows, sc.pad, what)


def _positions(n: int, batch: int, seed: int, step: int, stream: int) -> list[int]:
    """The example indices of `step`: consecutive slices of one shuffled order per epoch, the
    order a function of (seed, stream, epoch) alone."""
    out = []
    for p in range(step * batch, step * batch + batch):
        epoch, i = divmod(p, n)
        if not out or epoch != last:
            g = torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
            last = epoch
        out.append(int(perm[i]))
    return out


def step_batches(forget: Encoded, retain: Optional[Encoded], cfg: UnlearnConfig, step: int, device=None) -> dict:
    """The inputs of `step` ({"forget": batch, "retain": batch or None}); forget batches hold
    min(batch_size, len(forget)) examples."""
    fb = min(cfg.batch_size, len(forget))
    out = {"forget": forget.batch(_positions(len(forget), fb, cfg.seed, step, 0), device), "retain": None}
    if retain is not None:
        rb = min(cfg.batch_size, len(retain))
        out["retain"] = retain.batch(_positions(len(retain), rb, cfg.seed, step, 1), device)
    return out


def build_optimizer(params, cfg: UnlearnConfig):
    """AdamW and its schedule (linear warm-up over the first `warmup` of the steps, then linear decay
    to 0), the same as transformers' get_linear_schedule_with_warmup."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup * cfg.steps)
    total = cfg.steps

    def factor(s):
        if s < warm:
            return s / max(1, warm)
        return max(0.0, (total - s) / max(1, total - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def unlearn(model, forget, retain=None, method: Union[str, Method] = "npo", config=None, *,
            tokenizer=None, train: Optional[UnlearnConfig] = None, checkpoint_dir=None, checkpoint_every: int = 0,
            resume: bool = False, progress: bool = True, log: Optional[Callable[[dict], None]] = None,
            layers=None, stop_after: Optional[int] = None, **train_overrides) -> UnlearnResult:
    """Unlearns `forget` from `model` (in place) with `method` and returns an UnlearnResult.

    forget / retain: lethe.eval Examples, question/answer dicts, a JSONL path (with `tokenizer`),
    or an Encoded dataset. method: a registered name (lethe.methods.available()), a Method class or
    instance; config: its config dataclass or a dict of overrides. train (or keyword overrides such
    as steps=, lr=, batch_size=): the optimiser settings, UnlearnConfig; by default the built-in
    benchmark's for this method (UnlearnConfig.for_method).
    checkpoint_dir with checkpoint_every = N > 0: a checkpoint every N steps and at the end;
    resume=True continues from the checkpoint there (the method's state included, so `prepare`
    is not run again on the changed model). log(entry) is called after every step. layers: a
    glob pattern (or a list) over parameter names (fnmatch: "model.layers.1.*", "*mlp*"): only the
    matching parameters are trained, the others are frozen for the run.
    `stop_after` ends the call after that many steps of this call (to test resumption)."""
    m = make_method(method, config)
    if getattr(m, "continual", False):
        raise ValueError(f"method {m.label!r} is continual: it handles a stream of requests (method.bind(model, "
                         "tokenizer, retain=...).handle(request), or lethe unlearn --requests FILE), not one forget set")
    if m.one_shot and (train is not None or train_overrides):
        given = "train" if train is not None else sorted(train_overrides)[0]
        raise ValueError(f"{given}: method {m.label!r} trains nothing (one-shot: no optimiser settings); give its "
                         f"settings in config")
    if train is None:
        train = UnlearnConfig.for_method(m, **train_overrides)
    elif not isinstance(train, UnlearnConfig):
        raise TypeError(f"train must be an UnlearnConfig, got {type(train).__name__}")
    elif train_overrides:
        if "batch_size" in train_overrides:
            train_overrides.setdefault("batch_fraction", None)
        train = dataclasses.replace(train, **train_overrides)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_dir: needed with checkpoint_every > 0 or resume=True")
    from lethe.integrations import hf

    hf.check_causal_lm(model)
    f = encode(forget, tokenizer, "forget")
    r = None
    if m.needs_retain():
        if retain is None:
            raise ValueError(f"retain: method {m.label!r} needs a retain set (its config: {m.config})")
        r = encode(retain, tokenizer, "retain")
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if getattr(m, "one_shot", False):
        return _one_shot(model, m, f, r, ckpt, checkpoint_every, resume, progress, log, layers, stop_after)
    train = train.resolved(len(f))
    params = select_parameters(model, layers)
    opt, sched = build_optimizer(params, train)
    entries: list = []
    start = 0
    meta = {"method": m.label, "config": dataclasses.asdict(m.config), "train": dataclasses.asdict(train),
            "forget": len(f), "retain": None if r is None else len(r), "layers": layers}
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        if state["meta"] != meta:
            raise ValueError(f"resume: the checkpoint {str(ckpt)!r} is of another run ({state['meta']}), not of "
                             f"this one ({meta})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        m.load_state_dict(state["method"])
        entries, start = state["log"], state["step"]
    else:
        m.prepare(model, f, r)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(step):
        _save(ckpt, {"meta": meta, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "method": m.state_dict(), "log": entries})

    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _loop(model, m, f, r, train, params, opt, sched, entries, start, ckpt, checkpoint, checkpoint_every,
                     progress, log, stop_after)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _one_shot(model, m, f, r, ckpt, checkpoint_every, resume, progress, log, layers, stop_after) -> UnlearnResult:
    """A method without training (m.one_shot: SSD): m.work(model, unit) for each of its work units
    (a batch of a pass over the data, on the original model), then m.finish(model), which changes
    the model. A checkpoint every `checkpoint_every` units holds the method's state (its
    accumulators) and the log; the last one, after finish, also the model, so that a resumed run
    never repeats the change (every one, for a method whose units change the model: K-FADE).
    Under torch.distributed each rank keeps its own checkpoint (<name>.rank<r>.pt), and a resume
    must have the same world size."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if ckpt is not None and world > 1:  # each rank's accumulators and units are its own
        ckpt = ckpt.with_name(f"{ckpt.stem}.rank{rank}{ckpt.suffix}")
    meta = {"method": m.label, "config": dataclasses.asdict(m.config), "forget": len(f),
            "retain": None if r is None else len(r), "layers": layers, "world": world}
    entries: list = []
    start, done = 0, False
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        if state["meta"] != meta:
            raise ValueError(f"resume: the checkpoint {str(ckpt)!r} is of another run ({state['meta']}), not of "
                             f"this one ({meta})")
        m.load_state_dict(state["method"])
        entries, start, done = state["log"], state["step"], state["done"]
        if "model" in state:  # after finish, or a method whose units change it
            model.load_state_dict(state["model"])
        m.resume_one_shot(model, f, r, layers)
    else:
        m.prepare_one_shot(model, f, r, layers)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(step, finished):
        m.checkpoint_state()
        _save(ckpt, {"meta": meta, "step": step, "done": finished, "method": m.state_dict(), "log": entries,
                     **({"model": model.state_dict()} if finished or m.changes_model else {})})

    t0 = time.perf_counter()
    total = m.units(f, r)
    bar = tqdm(total=total, initial=start, desc=f"{m.label}: importances", disable=not progress or done, leave=False,
               dynamic_ncols=True)
    done_here = 0
    for unit in range(start, total if not done else start):
        entry = {"step": unit + 1, **m.work(model, unit)}
        entries.append(entry)
        if log is not None:
            log(entry)
        bar.update(1)
        done_here += 1
        if ckpt is not None and checkpoint_every and (unit + 1) % checkpoint_every == 0 and unit + 1 < total:
            checkpoint(unit + 1, False)
        if stop_after is not None and done_here >= stop_after and unit + 1 < total:
            bar.close()
            return UnlearnResult(model, m, entries, time.perf_counter() - t0, False)
    bar.close()
    if not done:
        entry = {"step": total + 1, **m.finish(model)}
        entries.append(entry)
        if log is not None:
            log(entry)
        if ckpt is not None and checkpoint_every:
            checkpoint(total, True)
    model.eval()
    return UnlearnResult(model, m, entries, time.perf_counter() - t0, True)


def select_parameters(model, layers=None) -> list:
    """The parameters to train: those that require grad, restricted to the names matching `layers`
    (a glob pattern or a list of them) when given. A pattern that matches nothing is an error."""
    import fnmatch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: no parameter requires grad, nothing to train")
    if layers is None:
        return [p for _, p in named]
    pats = [layers] if isinstance(layers, str) else list(layers)
    if not pats or not all(isinstance(x, str) and x for x in pats):
        raise ValueError(f"layers: expected a glob pattern or a list of them, got {layers!r}")
    for pat in pats:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            some = ", ".join(n for n, _ in named[:4])
            raise ValueError(f"layers: pattern {pat!r} matches no trainable parameter of the model (its names are "
                             f"like {some}, ...)")
    return [p for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]


def _loop(model, m, f, r, train, params, opt, sched, entries, start, ckpt, checkpoint, checkpoint_every, progress,
          log, stop_after):
    from tqdm.auto import tqdm

    device = params[0].device
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=train.steps, initial=start, desc=f"unlearning ({m.label})", disable=not progress, leave=False,
               dynamic_ncols=True)
    done_here = 0
    for step in range(start, train.steps):
        inputs = step_batches(f, r, train, step, device)
        loss, parts = m.loss(model, inputs, step, train.steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{m.label}: the loss is {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.clip:
            torch.nn.utils.clip_grad_norm_(params, train.clip)
        lr = sched.get_last_lr()[0]
        parts = {**parts, **m.before_step(model, params, opt, inputs, step, train.steps)}
        opt.step()
        parts.update(m.after_step(model, params, opt, step, train.steps))
        entry = {"step": step + 1, "loss": loss.item(), **parts, "lr": lr}
        sched.step()
        entries.append(entry)
        if log is not None:
            log(entry)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in entry.items() if k not in ("step", "lr")}, refresh=False)
        done_here += 1
        last = step + 1 == train.steps
        if ckpt is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0 or last):
            checkpoint(step + 1)
        if stop_after is not None and done_here >= stop_after and not last:
            break
    bar.close()
    model.eval()
    return UnlearnResult(model, m, entries, time.perf_counter() - t0, len(entries) == train.steps)


def write_log(path, result: UnlearnResult, extra: Optional[dict] = None) -> None:
    """The run log as JSON: the method, its config, the steps' entries and the time."""
    d = {"method": result.method.label, "config": dataclasses.asdict(result.method.config),
         "seconds": result.seconds, "steps": result.log, **(extra or {})}
    Path(path).write_text(json.dumps(d, indent=1))
