"""Geometric-Disentanglement Unlearning (GU, 2025) as a plug-in on any gradient method.

The wrapped method's update is projected onto the complement of a subspace of recent retain
gradients (lethe.RetainSubspace), so that to first order it leaves the retain loss unchanged:

  mode="gradient"  g <- (I - Q Q^T) g before the optimiser step (exact for plain SGD);
  mode="adam"      the projection in AdamW's metric H = diag(sqrt(v_hat) + eps) of the previous
                   step, g <- g - Q (Q^T H^-1 Q)^-1 Q^T H^-1 g, so that H^-1 g is orthogonal to the
                   retain gradients (Euclidean at the first step, where v is not there yet);
  mode="update"    the realised update D of the optimiser, projected after its step, so that
                   G_r^T D = 0 for any optimiser (momentum and Adam's own v included).
  joint=True       the paper's joint step: g <- P g + beta * g_r (with mode "gradient" or "adam";
                   with a plain SGD optimiser of lr rho this is D = -rho (P g_f + beta g_r)).

Each `every` steps a retain gradient (the gradient of the retain loss, NLL or KL to the original
model, on the step's retain batch, through the fused ops) is added to the basis, which keeps `rank`
directions per tensor ("tensor" scope) or over all of GU's tensors ("group"), the oldest replaced
first ("fifo") or none once full ("freeze"). GU trains the tensors of its subspace only: by default,
as the authors, the last `blocks` transformer blocks, the final norm and the LM head; `layers`
(glob patterns over parameter names) chooses others. The other parameters get no update.

Names: "gu" wraps `base` (default "npo"); "npo+gu", "graddiff+gu", ... are the same with that base.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

import torch

from lethe.methods.base import Method, RetainTerm, check_number, register

MODES = ("gradient", "adam", "update")
# GU's lr on the built-in benchmark as a multiple of its base's (see GU.__init__)
BENCHMARK_LR_FACTOR = {"npo": 2.0, "graddiff": 1.4}


@dataclasses.dataclass(frozen=True)
class GUConfig:
    base: str = "npo"  # the wrapped method (any registered gradient method)
    base_config: Optional[dict] = None  # overrides of the base method's config
    mode: str = "update"
    scope: str = "tensor"  # "tensor" or "group"
    rank: int = 8  # directions per scope (<= 16)
    orthogonalize: str = "cgs2"  # or "cholqr2"
    when_full: str = "fifo"  # or "freeze"
    threshold: float = 1e-3  # a retain gradient with a smaller relative residual is dropped
    every: int = 1  # add a retain gradient every `every` steps
    blocks: int = 2  # default layers: the last `blocks` blocks, the final norm, the LM head
    layers: Optional[tuple] = None  # glob patterns over parameter names instead
    retain_loss: str = "nll"  # the retain gradient's loss: "nll" or "kl"
    retain_k: int = 32
    joint: bool = False
    beta: float = 1.0  # weight of the retain gradient in the joint step

    def __post_init__(self):
        from lethe.methods.base import get

        if not isinstance(self.base, str) or self.base == "gu" or getattr(get(self.base), "plugin", False):
            raise ValueError(f"GUConfig: base must be a gradient method's name, got {self.base!r}")
        if self.base_config is not None and not isinstance(self.base_config, dict):
            raise ValueError(f"GUConfig: base_config must be a dict of the base method's settings or None, "
                             f"got {type(self.base_config).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"GUConfig: mode must be one of {MODES}, got {self.mode!r}")
        if self.scope not in ("tensor", "group"):
            raise ValueError(f"GUConfig: scope must be 'tensor' or 'group', got {self.scope!r}")
        for f, lo, hi in (("rank", 1, 16), ("every", 1, None), ("blocks", 0, None)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"GUConfig: {f} must be an int in [{lo}, {hi if hi else 'inf'}), got {v!r}")
        if self.orthogonalize not in ("cgs2", "cholqr2"):
            raise ValueError(f"GUConfig: orthogonalize must be 'cgs2' or 'cholqr2', got {self.orthogonalize!r}")
        if self.when_full not in ("fifo", "freeze"):
            raise ValueError(f"GUConfig: when_full must be 'fifo' or 'freeze', got {self.when_full!r}")
        check_number(self, "threshold")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"GUConfig: threshold must be in [0, 1), got {self.threshold!r}")
        check_number(self, "beta")
        if not isinstance(self.joint, bool):
            raise ValueError(f"GUConfig: joint must be a bool, got {self.joint!r}")
        if self.joint and self.mode == "update":
            raise ValueError("GUConfig: joint=True adds the retain gradient to the projected gradient: use mode "
                             "'gradient' or 'adam' (mode 'update' would project it away again)")
        if self.layers is not None and (isinstance(self.layers, str) or not all(isinstance(p, str) for p in self.layers)):
            raise ValueError(f"GUConfig: layers must be a tuple of glob patterns or None, got {self.layers!r}")
        RetainTerm(self.retain_loss, self.retain_k, "GUConfig")


def default_layers(model, blocks: int) -> list:
    """The parameters of the last `blocks` blocks (the model's longest ModuleList of blocks), its
    final norm and its LM head (the output embeddings: with tied embeddings, the embedding)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    lists = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    chosen = []
    if lists and blocks:
        layers = max(lists, key=len)
        for b in layers[-blocks:]:
            chosen += list(b.parameters())
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    norm = getattr(body, "norm", None) or getattr(body, "final_layernorm", None) or getattr(body, "ln_f", None)
    if isinstance(norm, torch.nn.Module):
        chosen += list(norm.parameters())
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None:
        chosen += list(head.parameters())
    return chosen


@register
class GU(Method):
    name = "gu"
    Config = GUConfig
    uses_retain = True
    plugin = True  # wraps another method ("npo+gu")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        from lethe.methods.driver import make_method

        c = self.config
        self.inner = make_method(c.base, dict(c.base_config) if c.base_config else None)
        # the base method's benchmark settings with a larger lr (lethe's tuning on the built-in
        # benchmark, benchmarks/RESULTS.md): the projection removes a part of each step and GU
        # trains its layers only, so at the base's own lr it forgets less than the base
        self.benchmark = dict(self.inner.benchmark)
        from lethe.methods.driver import UnlearnConfig

        lr = self.benchmark.get("lr", UnlearnConfig().lr)
        self.benchmark["lr"] = lr * BENCHMARK_LR_FACTOR.get(c.base, 1.5)
        self.subspace = None
        self._saved_subspace = None
        self._tensors = None  # (names, params) of the subspace
        self._before = None
        self._g_r = None  # id(param) -> the retain term's gradient of this step, when the base has one

    @property
    def label(self) -> str:
        return f"{self.config.base}+gu"

    def needs_retain(self) -> bool:
        return True

    def _retain(self) -> RetainTerm:
        return RetainTerm(self.config.retain_loss, self.config.retain_k, self.name)

    def prepare(self, model, forget, retain):
        self.inner.prepare(model, forget, retain)
        self._retain().prepare(self, model, retain)

    def loss(self, model, inputs, step, total_steps):
        loss, parts = self.inner.loss(model, inputs, step, total_steps)
        self._g_r = None
        split = getattr(self.inner, "last_split", None)
        ic = self.inner.config
        same = (split is not None and getattr(ic, "retain_loss", None) == self.config.retain_loss
                and (self.config.retain_loss == "nll" or getattr(ic, "retain_k", None) == self.config.retain_k))
        if not same or not torch.is_grad_enabled():
            return loss, parts
        # The base's retain term is GU's retain loss on the same batch: its gradient is the one the
        # basis takes, and the update's share of it (alpha * g_r) goes into the loss as a linear
        # surrogate, so that the retain batch is run forward and backward once, not twice.
        forget, retain, alpha = split
        trained = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(retain, trained, allow_unused=True)
        surrogate = sum((g * p).sum() for g, p in zip(grads, trained) if g is not None)
        self._g_r = {id(p): g for p, g in zip(trained, grads)}
        value = forget + alpha * retain.detach()
        return value + alpha * (surrogate - surrogate.detach()), parts

    # ---- the subspace ----

    def _select(self, model, params):
        trained = {id(p) for p in params}
        if self.config.layers is None:
            chosen = {id(p) for p in default_layers(model, self.config.blocks)}
        else:
            named = list(model.named_parameters())
            chosen = {id(p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in self.config.layers)}
            if not chosen:
                raise ValueError(f"GUConfig.layers: {self.config.layers} match no parameter of the model")
        out = [(n, p) for n, p in model.named_parameters() if id(p) in chosen and id(p) in trained]
        if not out:
            raise ValueError("gu: none of the trained parameters is in GU's layers (GUConfig.layers / blocks)")
        return out

    def _ensure(self, model, params):
        if self.subspace is None:
            from lethe.nn.retain_subspace import RetainSubspace

            c = self.config
            named = self._select(model, params)
            self._tensors = named
            self.subspace = RetainSubspace(named, c.rank, scope=c.scope, orthogonalize=c.orthogonalize,
                                           when_full=c.when_full, threshold=c.threshold)
            if self._saved_subspace is not None:
                self.subspace.load_state_dict(self._saved_subspace)
                self._saved_subspace = None
        return [p for _, p in self._tensors]

    def retain_gradient(self, model, tensors, batch) -> list:
        """The gradient of the retain loss on `batch` with respect to `tensors` (fused ops)."""
        loss = self._retain()(self, model, batch)
        return list(torch.autograd.grad(loss, tensors, allow_unused=True)), loss

    def before_step(self, model, params, optimizer, inputs, step, total_steps) -> dict:
        c = self.config
        tensors = self._ensure(model, params)
        keep = {id(p) for p in tensors}
        for p in params:  # GU trains its subspace's tensors only
            if id(p) not in keep:
                p.grad = None
        parts = {}
        g_r = None
        if step % c.every == 0 or c.joint:
            if self._g_r is not None:  # the base's retain term's gradient, from loss()
                g_r = [self._g_r.get(id(p)) for p in tensors]
            else:
                g_r, lr = self.retain_gradient(model, tensors, inputs["retain"])
                parts["retain_loss"] = lr.item()
            g_r = [torch.zeros_like(p) if g is None else g for g, p in zip(g_r, tensors)]
            if step % c.every == 0:
                self.subspace.add(g_r)
        self._g_r = None
        parts["gu_rank"] = sum(self.subspace.rank) / len(self.subspace.rank)
        for p in tensors:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in tensors]
        if c.mode == "update":
            if self._before is None:
                self._before = [p.detach().clone() for p in tensors]
            else:
                torch._foreach_copy_(self._before, [p.detach() for p in tensors])
            return parts
        v, eps = None, 1e-8
        if c.mode == "adam":
            v, eps = _adam_metric(optimizer, tensors)
        before, after = self.subspace.project(grads, exp_avg_sq=v, eps=eps)
        parts["gu_kept"] = _ratio(after, before)
        if c.joint:
            torch._foreach_add_(grads, g_r, alpha=c.beta)
        return parts

    def after_step(self, model, params, optimizer, step, total_steps) -> dict:
        if self.config.mode != "update":
            return {}
        tensors = [p for _, p in self._tensors]
        before, after = self.subspace.project_update(tensors, self._before)
        return {"gu_kept": _ratio(after, before)}

    # ---- state ----

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["inner"] = self.inner.state_dict()
        d["subspace"] = self.subspace.state_dict() if self.subspace is not None else self._saved_subspace
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.inner.load_state_dict(d["inner"])
        self._saved_subspace = d.get("subspace")
        if self.subspace is not None and self._saved_subspace is not None:
            self.subspace.load_state_dict(self._saved_subspace)
            self._saved_subspace = None


def _ratio(after, before) -> float:
    b = float((before ** 2).sum())
    return float((after ** 2).sum() / b) ** 0.5 if b > 0 else 1.0


def _adam_metric(optimizer, tensors):
    """(exp_avg_sq per tensor, eps) of an Adam-type optimiser's previous step, the eps scaled so that
    sqrt(v) + eps' is proportional to sqrt(v_hat) + eps (v_hat = v / (1 - beta2^t)); (None, 0) before
    the first step (the metric is then uniform: the Euclidean projection)."""
    vs = []
    eps, beta2, t = 1e-8, 0.999, None
    for p in tensors:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st:
            return None, 1e-8
        vs.append(st["exp_avg_sq"])
        step = st.get("step")
        t = float(step) if step is not None else t
    for g in optimizer.param_groups:
        if any(q is tensors[0] for q in g["params"]):
            eps, beta2 = g.get("eps", eps), g.get("betas", (0.9, beta2))[1]
    if t is None or t < 1:
        return None, 1e-8
    return vs, eps * (1.0 - beta2 ** t) ** 0.5
