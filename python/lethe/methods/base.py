"""The method API: a registry by name, the Method base class, and the loss pieces every method
composes from lethe's LM-head-fused ops (no [B, T, V] logits anywhere).

A batch is a dict of right-padded tensors: input_ids, attention_mask, labels (-100 where no loss:
the prompt and the padding) and index (each row's position in its dataset, for the per-example
state a method caches: SHRED's targets, NPO's reference log-likelihoods, the retain KL's reference
top-K). A step's input is {"forget": batch, "retain": batch or None}."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, Optional

import torch

__all__ = ["Method", "register", "get", "split_name", "available", "Encoded", "answer_rows", "mean_nll", "sequence_nll", "token_nll",
           "frozen", "reference_topk", "topk_kl_rows", "frozen_sequence_nll", "check_weight", "check_number", "RetainTerm",
           "RetainWeights", "WithRetain"]

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: registers a Method subclass under cls.name."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__}: a method needs a non-empty str `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_REGISTRY)


def split_name(name: str):
    """("gu", "npo") for a plug-in spelling "npo+gu"; (name, None) otherwise."""
    if isinstance(name, str) and "+" in name:
        base, _, plug = name.partition("+")
        return plug, base
    return name, None


def get(name: str) -> type:
    """The method class registered as `name` (for "npo+gu", the plug-in's: GU); an unknown name
    lists the known ones."""
    if isinstance(name, type) and issubclass(name, Method):
        return name
    plug, base = split_name(name)
    if base is not None:
        cls = get(plug)
        if not getattr(cls, "plugin", False):
            raise ValueError(f"method {name!r}: {plug!r} is not a plug-in method (the plug-ins: "
                             f"{[n for n, c in _REGISTRY.items() if getattr(c, 'plugin', False)]})")
        if getattr(get(base), "plugin", False):
            raise ValueError(f"method {name!r}: {base!r} must be a gradient method, not a plug-in")
        return cls
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {available()}, got {name!r}")
    return _REGISTRY[name]


def check_weight(config, *names):
    """Raises ValueError naming the config field when a weight is negative or not a number."""
    for n in names:
        v = getattr(config, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{type(config).__name__}: {n} must be a number >= 0, got {v!r}")


def check_number(config, name, positive=False):
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0):
        raise ValueError(f"{type(config).__name__}: {name} must be a number{' > 0' if positive else ''}, got {v!r}")


class Method:
    """One unlearning method: a config dataclass (`Config`, the paper's defaults) and a loss.

    The driver (lethe.methods.unlearn) and lethe.integrations.hf.UnlearnTrainer call, in order:
    `prepare(model, forget, retain)` once, on the original model, before any update (the frozen
    teacher's pass, reference statistics); then `loss(model, inputs, step, total_steps)` per step,
    returning the loss and its parts (floats, for the logs). `state_dict()` is what a checkpoint
    keeps of the method besides the model and the optimiser, so that a resumed run never re-runs
    `prepare` on an already changed model."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    # the loss reads a retain batch (a property of the config for methods where it is optional)
    uses_retain: ClassVar[bool] = False
    # the optimiser settings of this method on the built-in benchmark, over UnlearnConfig's
    # defaults (lethe's tuning on its tiny model, not the paper's: see UnlearnConfig)
    benchmark: ClassVar[dict] = {}
    # the method's own settings on the built-in benchmark, over its Config's (paper) defaults, where
    # these do not carry over to its tiny model (lethe.methods.benchmark_method); {}: the defaults
    benchmark_config: ClassVar[dict] = {}
    # no training: the driver runs prepare_one_shot, work(model, unit) per unit, then finish (SSD)
    one_shot: ClassVar[bool] = False
    # a one-shot method whose work units change the model (K-FADE's steps): its checkpoints keep it
    changes_model: ClassVar[bool] = False

    def __init__(self, config=None, **overrides):
        if config is None:
            config = self.Config(**overrides)
        elif not isinstance(config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__} for method {self.name!r}, "
                            f"got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._state: dict = {}

    # a plug-in wraps another method ("npo+gu"); its config names the base
    plugin: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """The method's name in reports and logs ("npo+gu" for GU on NPO)."""
        return self.name

    def needs_retain(self) -> bool:
        return self.uses_retain

    def before_step(self, model, params: list, optimizer, inputs: dict, step: int, total_steps: int) -> dict:
        """Called after backward and gradient clipping, before optimizer.step: may change the
        gradients of `params` (the trained parameters). Returns parts for the log (default: none)."""
        return {}

    def after_step(self, model, params: list, optimizer, step: int, total_steps: int) -> dict:
        """Called after optimizer.step: may change the parameters. Returns parts for the log."""
        return {}

    def prepare(self, model, forget: "Encoded", retain: Optional["Encoded"]) -> None:
        """One-time work on the original model (default: none)."""

    def loss(self, model, inputs: dict, step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self.config), "state": self._state}

    def load_state_dict(self, d: dict) -> None:
        if d.get("name") != self.name:
            raise ValueError(f"the saved method state is {d.get('name')!r}'s, not {self.name!r}'s")
        if d.get("config") != dataclasses.asdict(self.config):
            raise ValueError(f"the saved method state was made with config {d.get('config')}, not "
                             f"{dataclasses.asdict(self.config)}")
        self._state = d["state"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class Encoded:
    """A tokenised dataset: rows (token ids, answer start); batch(indices) pads a batch of them
    (right padding, labels -100 before the answer and on padding)."""

    def __init__(self, rows: list[tuple[list[int], int]], pad_id: int, what: str = "data"):
        if not rows:
            raise ValueError(f"{what}: expected at least one example, got none")
        for i, (ids, start) in enumerate(rows):
            if not 0 < start < len(ids):
                raise ValueError(f"{what}: example {i} has no answer tokens after its prompt")
        self.rows, self.pad_id, self.what = rows, pad_id, what

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices, device=None) -> dict:
        from lethe.eval.data import pad_batch

        indices = [int(i) for i in indices]
        ids, labels, mask = pad_batch([self.rows[i] for i in indices], self.pad_id)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "index": torch.tensor(indices, dtype=torch.long)}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def batches(self, batch_size: int, device=None):
        for s in range(0, len(self), batch_size):
            yield self.batch(range(s, min(s + batch_size, len(self))), device)


def answer_rows(model, batch: dict):
    """(hidden rows [N, H] of the labelled positions, head weight, head bias, labels [N], row's
    sequence [N], B): the final hidden states, with the logit scale folded in, at the positions
    whose next token has a label, flattened in (sequence, position) order."""
    from lethe.integrations import hf

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    hidden, w, b = hf.last_hidden_and_head(model, ids, mask)
    lab = hf.shifted_labels(ids, mask, batch.get("labels"))
    keep = lab != -100
    seq = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(keep)[keep]
    return hidden[:, :-1][keep], w, b, lab[keep], seq, ids.shape[0]


def token_nll(model, batch: dict, backend: Optional[str] = None):
    """Per-token -log p(label) of the labelled positions [N] (fused_linear_topk_kl with K = 1 and a
    one-hot target), with each row's sequence [N] and the batch size."""
    from lethe.ops import fused_linear_topk_kl

    h, w, b, lab, seq, B = answer_rows(model, batch)
    tgt = lab.unsqueeze(-1)
    nll = fused_linear_topk_kl(h, w, tgt, torch.ones(tgt.shape, device=h.device), bias=b, reduction="none",
                               backend=backend)
    return nll, seq, B


def mean_nll(model, batch: dict, backend: Optional[str] = None) -> torch.Tensor:
    """The batch's mean -log p(label) over its labelled tokens (what a causal LM's .loss is)."""
    return token_nll(model, batch, backend)[0].mean()


def sequence_nll(model, batch: dict, backend: Optional[str] = None):
    """(-log p(answer | prompt) per sequence [B], answer lengths [B]): token NLLs summed."""
    nll, seq, B = token_nll(model, batch, backend)
    total = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, seq, nll)
    count = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, seq, torch.ones_like(nll))
    return total, count


@contextlib.contextmanager
def frozen(model):
    """The model in eval mode under no_grad for a reference pass, its mode restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was)


def reference_topk(model, data: Encoded, k: int, batch_size: int = 64, backend: Optional[str] = None):
    """The frozen model's top-K over the full vocabulary at each labelled position, per example:
    a list of (ids [n_i, K] int64, probs [n_i, K] fp32, renormalised over the K) on the CPU, for
    the KL to the original model (teacher_topk: no [N, V] tensor)."""
    from lethe.ops import teacher_topk

    out = []
    with frozen(model) as dev:
        for batch in data.batches(batch_size, dev):
            h, w, b, lab, seq, B = answer_rows(model, batch)
            ids, lp, _ = teacher_topk(h, w, lab, min(k, w.shape[0]), bias=b, backend=backend)
            q = torch.softmax(lp, dim=-1)  # the top-K's probabilities, renormalised
            counts = torch.bincount(seq, minlength=B).tolist()
            out += [(i.cpu(), p.cpu()) for i, p in zip(ids.split(counts), q.split(counts))]
    return out


def topk_kl_rows(model, batch: dict, targets: list, normalize: str = "full", backend: Optional[str] = None):
    """Mean over the labelled positions of KL(q || softmax(student logits)), q the cached top-K
    targets of the batch's examples (targets[index] = (ids, probs)), fused with the LM head."""
    from lethe.ops import fused_linear_topk_kl

    h, w, b, lab, seq, B = answer_rows(model, batch)
    rows = batch["index"].tolist()
    ids = torch.cat([targets[i][0] for i in rows]).to(h.device)
    probs = torch.cat([targets[i][1] for i in rows]).to(h.device)
    if ids.shape[0] != h.shape[0]:
        raise ValueError("the cached targets do not match the batch's labelled positions: the batch's examples "
                         "are not the ones the method was prepared on (index, labels)")
    return fused_linear_topk_kl(h, w, ids, probs, bias=b, normalize=normalize, backend=backend)


def frozen_sequence_nll(model, data: Encoded, batch_size: int = 64, backend: Optional[str] = None) -> torch.Tensor:
    """-log p(answer | prompt) of every example of `data` under `model` as it is now [len(data)]."""
    with frozen(model) as dev:
        return torch.cat([sequence_nll(model, batch, backend)[0].cpu() for batch in data.batches(batch_size, dev)])


class RetainTerm:
    """The retain loss the baselines share (open-unlearning's retain_loss_type): "nll", the mean
    cross-entropy of the retain answers, or "kl", the mean KL from the original model's top-`k`
    (cached per retain example by `prepare`) to the model."""

    KINDS = ("nll", "kl")

    def __init__(self, kind: str, k: int, what: str):
        if kind not in self.KINDS:
            raise ValueError(f"{what}: retain_loss must be one of {self.KINDS}, got {kind!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{what}: retain_k must be a positive int, got {k!r}")
        self.kind, self.k = kind, k

    def prepare(self, method: "Method", model, retain: Optional[Encoded]) -> None:
        if self.kind == "kl" and retain is not None:
            method._state["retain_topk"] = reference_topk(model, retain, self.k)

    def __call__(self, method: "Method", model, batch: dict) -> torch.Tensor:
        if self.kind == "nll":
            return mean_nll(model, batch)
        return topk_kl_rows(model, batch, method._state["retain_topk"])


@dataclasses.dataclass(frozen=True)
class RetainWeights:
    """The weights the forget-plus-retain baselines share: L = gamma * L_forget + alpha * L_retain,
    with L_retain of kind `retain_loss` (RetainTerm) and alpha = 0 meaning no retain set."""

    gamma: float = 1.0  # weight of the forget term
    alpha: float = 1.0  # weight of the retain term (0: none, no retain set needed)
    retain_loss: str = "nll"  # "nll" or "kl"
    retain_k: int = 32  # top-K of the original model for retain_loss="kl"

    def __post_init__(self):
        check_weight(self, "gamma", "alpha")
        RetainTerm(self.retain_loss, self.retain_k, type(self).__name__)


class WithRetain(Method):
    """A method whose config is a RetainWeights: a retain set when alpha > 0, its term prepared
    (the KL's reference top-K) and added by `retain_loss`."""

    def needs_retain(self) -> bool:
        return self.config.alpha > 0

    def _retain(self) -> RetainTerm:
        return RetainTerm(self.config.retain_loss, self.config.retain_k, self.name)

    def prepare(self, model, forget, retain):
        if self.needs_retain():
            self._retain().prepare(self, model, retain)

    def with_retain(self, forget_loss: torch.Tensor, model, inputs: dict, parts: dict):
        """gamma * forget_loss + alpha * L_retain, the retain term's value added to parts."""
        c = self.config
        loss = c.gamma * forget_loss
        self.last_split = None
        if c.alpha > 0:
            retain = self._retain()(self, model, inputs["retain"])
            # the two terms, for a plug-in that needs the retain term's own gradient (GU)
            self.last_split = (loss, retain, c.alpha)
            loss = loss + c.alpha * retain
            parts["retain"] = retain.item()
        return loss, parts
