"""Continual unlearning: a stream of deletion requests handled one at a time, resumable between
requests.

    fit = lm.make_method("fit")
    fit.bind(model, tokenizer, retain=retain_examples, checkpoint_dir="run")   # resumes what is there
    for request in requests:
        fit.handle(request)           # a dict: what was kept, the update chosen, the layers, the losses

`Sequential("npo")` runs any gradient method the same way, one `lethe.methods.unlearn` call per
request (the baselines of the continual evaluation). After each request the model, the method's
state (FIT's chunk memory) and the request log are saved together under one name in
checkpoint_dir, so an interruption loses at most the request in progress; a request whose id is
in the log is not handled again (rerunning a stream continues it)."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
import torch

__all__ = ["ContinualMethod", "Sequential", "CONTINUAL_CHECKPOINT", "request_examples"]

CONTINUAL_CHECKPOINT = "lethe_continual_state.pt"


def request_examples(request, what: str = "request"):
    """A request's chunks: a lethe.eval.stream.Request, or a list of Examples / question-answer dicts."""
    from lethe.eval.stream import Request

    if isinstance(request, Request):
        return request.id, list(request.chunks)
    if isinstance(request, (list, tuple)):
        if not request:
            raise ValueError(f"{what}: empty (no chunk to forget)")
        return None, list(request)
    raise TypeError(f"{what}: expected a lethe.eval.stream.Request or a list of examples, got {type(request).__name__}")


class ContinualMethod:
    """What every continual runner shares: bind(model, ...), handle(request), the log and the
    checkpoint. Subclasses implement `_handle(model, examples, encoded)` -> dict."""

    continual = True

    def bind(self, model, tokenizer, retain=None, checkpoint_dir=None, progress: bool = False):
        """Attaches the model (changed in place by every request), its tokenizer, the retain set
        (lethe.eval Examples, question/answer dicts or a JSONL path; the methods that need one) and
        the checkpoint folder; resumes from a checkpoint there of the same method and config."""
        from lethe.integrations import hf
        from lethe.methods.driver import encode

        hf.check_causal_lm(model)
        if tokenizer is None:
            raise ValueError("tokenizer: needed to encode the requests")
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.retain = encode(retain, tokenizer, "retain") if retain is not None else None
        if self.retain is None and self._needs_retain():
            raise ValueError(f"retain: method {self.label!r} needs a retain set")
        self.requests_log: list = []
        self.ckpt = Path(checkpoint_dir) / CONTINUAL_CHECKPOINT if checkpoint_dir is not None else None
        meta = self._meta()
        if self.ckpt is not None and self.ckpt.exists():
            state = torch.load(self.ckpt, weights_only=False, map_location="cpu")
            if state["meta"] != meta:
                raise ValueError(f"checkpoint_dir: {str(self.ckpt)!r} holds another run ({state['meta']}), not this one "
                                 f"({meta})")
            model.load_state_dict(state["model"])
            self._load_continual(state["method"])
            self.requests_log = state["log"]
        return self

    def _meta(self) -> dict:
        return {"method": self.label, "config": dataclasses.asdict(self.config),
                "retain": None if self.retain is None else len(self.retain)}

    def _needs_retain(self) -> bool:
        return getattr(self, "uses_retain", False)

    def _save(self) -> None:
        if self.ckpt is None:
            return
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        torch.save({"meta": self._meta(), "model": self.model.state_dict(), "method": self._continual_state(),
                    "log": self.requests_log}, tmp)
        os.replace(tmp, self.ckpt)

    def handled(self) -> list:
        """The ids of the requests handled so far, in order."""
        return [e["request"] for e in self.requests_log]

    def handle(self, request) -> dict:
        """Unlearns one request (a lethe.eval.stream.Request, or a list of Examples / question-answer
        dicts) from the bound model; returns its log entry. A request already in the log (by id) is
        not handled again: its entry is returned."""
        from lethe.methods.driver import encode

        if not hasattr(self, "model"):
            raise RuntimeError(f"{self.label}: call bind(model, tokenizer, ...) before handle(request)")
        rid, exs = request_examples(request)
        rid = rid if rid is not None else f"r{len(self.requests_log):03d}"
        for e in self.requests_log:
            if e["request"] == rid:
                return e
        enc = encode(exs, self.tokenizer, f"request {rid}")
        t0 = time.perf_counter()
        entry = {"request": rid, "index": len(self.requests_log), "chunks": len(exs),
                 **self._handle(self.model, exs, enc)}
        entry["seconds"] = time.perf_counter() - t0
        self.requests_log.append(entry)
        self._save()
        return entry

    # the method's own part of a checkpoint (FIT: the chunk memory)
    def _continual_state(self) -> dict:
        return {}

    def _load_continual(self, d: dict) -> None:
        pass


class Sequential(ContinualMethod):
    """A gradient method run request by request: one `lethe.methods.unlearn` call per request
    (its reference statistics prepared on the model as the request finds it), with `train`'s
    optimiser settings (steps per request) and the method's config."""

    def __init__(self, method: str = "npo", config=None, **train):
        from lethe.methods.driver import UnlearnConfig, make_method

        self.method = make_method(method, config)
        if self.method.one_shot or getattr(self.method, "continual", False):
            raise ValueError(f"method: Sequential runs a gradient method, not {self.method.label!r}")
        self.train = UnlearnConfig.for_method(self.method, **train)
        self.config = self.method.config
        self.label = f"{self.method.label} (sequential)"

    def _meta(self) -> dict:
        return {**super()._meta(), "train": dataclasses.asdict(self.train)}

    def _needs_retain(self) -> bool:
        return self.method.needs_retain()

    def _handle(self, model, exs, enc) -> dict:
        from lethe.methods.driver import make_method, unlearn

        m = make_method(self.method.label, self.method.config)  # fresh state per request
        was = [p.requires_grad for p in model.parameters()]
        res = unlearn(model, enc, self.retain if m.needs_retain() else None, m, train=self.train.resolved(len(enc)),
                      progress=self.progress)
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
        last = res.log[-1] if res.log else {}
        return {"update": self.method.label, "kept": len(exs), "steps": len(res.log),
                "loss": last.get("loss")}
