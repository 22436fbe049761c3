"""`lethe unlearn`: one method on a Hugging Face model directory and JSONL forget / retain files.
Bad configuration is refused before any work starts (exit status 2, a message, no traceback); the
run checkpoints every --checkpoint-every steps into --out, and --resume continues it."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lethe.eval.cli import UsageError, _load_model, guarded


def add_parser(sub) -> None:
    from lethe.methods import available
    from lethe.methods.driver import UnlearnConfig

    d = UnlearnConfig()
    per = " (default: the method's setting for the built-in benchmark, UnlearnConfig.for_method; else"
    u = sub.add_parser(
        "unlearn", help="unlearn a forget set from a model with one method",
        description="Unlearns --forget from --model with --method (or handles --requests, a stream of deletion "
                    "requests, one at a time: fit, or a gradient method request by request) and writes the unlearned "
                    "model (a Hugging Face model directory with its tokenizer) and run.json (the settings and every "
                    "step's or request's log) to --out. "
                    f"Methods: {', '.join(available())}; a plug-in on a gradient method as BASE+PLUGIN (npo+gu, "
                    "graddiff+gu). The optimiser defaults are the built-in benchmark's tiny "
                    "model's: a real model wants its own --lr and --steps. A one-shot method (ssd, kfade) trains nothing "
                    "through the optimiser: it takes none of the optimiser flags (--steps, --lr, --batch-size, "
                    "--warmup, --clip, --seed; its settings are --set KEY=VALUE: batch_size=N, kfade's steps=N), and "
                    "checkpoints count its work units (batches, and kfade's Gauss-Newton steps).")
    u.add_argument("--method", required=True, help=f"the method ({', '.join(available())}, or BASE+gu)")
    u.add_argument("--model", required=True, help="a Hugging Face causal LM directory (with its tokenizer)")
    u.add_argument("--forget", default=None,
                   help="JSONL file of the forget set ({\"question\",\"answer\"} lines); or --requests")
    u.add_argument("--requests", default=None,
                   help="JSONL file of deletion requests, one per line ({\"facts\": [{\"question\",\"answer\"}, ...]}, "
                        "{\"question\",\"answer\"} or {\"text\"}), handled one at a time (continual unlearning: fit, "
                        "or a gradient method request by request); the model and the request log are saved after "
                        "each request, and --resume continues with the requests not yet handled")
    u.add_argument("--retain", default=None, help="JSONL file of the retain set (for the methods that use one)")
    u.add_argument("--out", required=True, help="directory for the unlearned model, run.json and the checkpoint")
    u.add_argument("--steps", type=int, default=None, help=f"optimiser steps{per} {d.steps})")
    u.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate{per} {d.lr:g})")
    u.add_argument("--batch-size", type=int, default=None,
                   help=f"forget (and retain) examples per step (default: the method's setting for the built-in "
                        f"benchmark, a fraction of the forget set; else {d.batch_size})")
    u.add_argument("--warmup", type=float, default=None, help=f"fraction of warm-up steps{per} {d.warmup:g})")
    u.add_argument("--clip", type=float, default=None, help=f"gradient-norm clipping, 0 for none{per} {d.clip:g})")
    u.add_argument("--seed", type=int, default=None, help="seed of the batch order (default 0)")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the method's config (repeatable), e.g. --set beta=0.2 (see its docstring)")
    u.add_argument("--layers", action="append", default=None, metavar="PATTERN",
                   help="train (ssd, kfade: change) only the parameters whose names match this glob pattern "
                        "(repeatable)")
    u.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)")
    u.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    u.add_argument("--template", default="Question: {q}\nAnswer:", help="prompt template of question lines")
    u.add_argument("--no-progress", action="store_true", help="no progress bar")


def _value(text: str, field):
    """A --set value parsed as the config field's type."""
    t = field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str,
                                                           "bool": bool}.get(str(field.type))
    if t is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if t is float:
        return float(text)
    if t is int:
        return int(text)
    return text


def method_overrides(cls, pairs) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set: expected KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        if k not in fields:
            raise UsageError(f"--set: method {cls.name!r} has no setting {k!r}; its settings are {sorted(fields)}")
        try:
            out[k] = _value(v, fields[k])
        except ValueError as e:
            raise UsageError(f"--set {k}: {e}") from None
    return out


def run_unlearn(a) -> int:
    return guarded("unlearn", _run, a, "the last checkpoint in --out is kept: rerun with --resume")


def _run(a) -> int:
    import lethe.methods as lm
    from lethe.eval.data import DataError, load_jsonl
    from lethe.methods.driver import UnlearnConfig, encode

    try:
        cls = lm.get(a.method)
    except ValueError as e:
        raise UsageError(f"--method: {e}") from None
    if (a.forget is None) == (a.requests is None):
        raise UsageError("give one of --forget (a forget set) and --requests (a stream of deletion requests)")
    if a.requests is not None or getattr(cls, "continual", False):
        return _run_requests(a, cls)
    try:
        method = lm.make_method(a.method, method_overrides(cls, a.set))
        given = {k: getattr(a, k) for k in ("steps", "lr", "batch_size", "warmup", "clip", "seed")
                 if getattr(a, k) is not None}
        if method.one_shot and given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UsageError(f"{flag}: method {method.label!r} trains nothing (one-shot: no optimiser); its settings "
                             f"are --set KEY=VALUE of {sorted(f.name for f in dataclasses.fields(cls.Config))}")
        train = UnlearnConfig.for_method(method, **given)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if a.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {a.checkpoint_every}")
    if method.needs_retain() and a.retain is None:
        raise UsageError(f"--retain: method {method.label!r} needs a retain set (its settings: {method.config})")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {a.out!r} exists and is not a directory")
    if (out / "config.json").exists() and not a.resume:
        raise UsageError(f"--out: {a.out!r} already holds a model; choose another directory (or --resume to "
                         "finish its run)")
    try:
        forget = load_jsonl(a.forget, a.template, "--forget")
        retain = load_jsonl(a.retain, a.template, "--retain") if method.needs_retain() else None
    except DataError as e:
        raise UsageError(str(e)) from None
    model, tok = _load_model(a.model, "--model")
    try:
        from lethe.integrations import hf
        from lethe.methods.driver import select_parameters

        hf.check_causal_lm(model)
        select_parameters(model, a.layers)
        f = encode(forget, tok, "--forget")
        r = encode(retain, tok, "--retain") if retain is not None else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists():  # finished before: nothing to do
        print(f"lethe unlearn: {a.out} already holds the finished run's model")
        return 0
    try:
        res = lm.unlearn(model, f, r, method, train=None if method.one_shot else train, checkpoint_dir=out,
                         checkpoint_every=a.checkpoint_every or train.steps, resume=a.resume,
                         progress=not a.no_progress, layers=a.layers)
    except (ValueError, FloatingPointError) as e:
        raise UsageError(str(e)) from None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    used = None if method.one_shot else dataclasses.asdict(train.resolved(len(f)))  # (SSD: no optimiser)
    lm.write_log(out / "run.json", res, {"train": used, "model": str(Path(a.model).resolve()),
                                         "forget": a.forget, "retain": a.retain, "layers": a.layers})
    (out / lm.driver.CHECKPOINT).unlink(missing_ok=True)
    last = res.log[-1] if res.log else {}
    print(f"unlearnt with {method.label} in {res.seconds:.1f} s ({len(res.log)} steps); last step: "
          + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    print(f"saved to {out}/")
    return 0


def _run_requests(a, cls) -> int:
    """--requests: each request handled in turn by a continual method (fit) or by a gradient
    method request by request; after each request the model, the method state and the log are
    checkpointed in --out, and requests.log.jsonl gets the request's entry."""
    import lethe.methods as lm
    from lethe.eval.data import DataError, load_jsonl
    from lethe.eval.stream import load_requests
    from tqdm.auto import tqdm

    if a.requests is None:
        raise UsageError(f"--requests: method {a.method!r} is continual: it handles a file of deletion requests, "
                         "not --forget")
    if cls.one_shot:
        raise UsageError(f"--method: {a.method!r} is one-shot; --requests takes fit or a gradient method")
    given = {k: getattr(a, k) for k in ("steps", "lr", "batch_size", "warmup", "clip", "seed")
             if getattr(a, k) is not None}
    try:
        if getattr(cls, "continual", False):
            if given:
                raise UsageError(f"--{next(iter(given)).replace('_', '-')}: method {a.method!r} takes its settings as "
                                 f"--set KEY=VALUE of {sorted(f.name for f in dataclasses.fields(cls.Config))}")
            run = lm.make_method(a.method, method_overrides(cls, a.set))
        else:
            run = lm.Sequential(a.method, method_overrides(cls, a.set) or None, **given)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {a.out!r} exists and is not a directory")
    from lethe.methods.continual import CONTINUAL_CHECKPOINT

    if (out / CONTINUAL_CHECKPOINT).exists() and not a.resume:
        raise UsageError(f"--out: {a.out!r} holds a run's checkpoint; --resume continues it (or choose another "
                         "directory)")
    try:
        requests = load_requests(a.requests, a.template)
        retain = load_jsonl(a.retain, a.template, "--retain") if a.retain else None
    except DataError as e:
        raise UsageError(str(e)) from None
    needs = run._needs_retain()
    if needs and retain is None:
        raise UsageError(f"--retain: method {run.label!r} needs a retain set")
    model, tok = _load_model(a.model, "--model")
    try:
        run.bind(model, tok, retain=retain, checkpoint_dir=out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    done = set(run.handled())
    bar = tqdm(total=len(requests), initial=sum(q.id in done for q in requests), desc=f"{run.label}: requests",
               disable=a.no_progress, dynamic_ncols=True)
    log = out / "requests.log.jsonl"
    for q in requests:
        if q.id in done:
            continue
        try:
            run.handle(q)
        except (ValueError, FloatingPointError) as e:
            raise UsageError(f"request {q.id!r}: {e}") from None
        tmp = log.with_name(log.name + ".tmp")  # the whole log, so that it always matches the checkpoint
        tmp.write_text("".join(json.dumps(e) + "\n" for e in run.requests_log), encoding="utf-8")
        os.replace(tmp, log)
        bar.update(1)
    bar.close()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"method": run.label, "config": dataclasses.asdict(run.config),
                                              "requests": run.requests_log, "model": str(Path(a.model).resolve()),
                                              "requests_file": a.requests, "retain": a.retain}, indent=1))
    print(f"handled {len(run.requests_log)} requests with {run.label}; saved to {out}/")
    return 0
