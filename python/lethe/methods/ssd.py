"""SSD, Selective Synaptic Dampening (Foster, Schoepf, Brintrup 2023, "Fast Machine Unlearning
Without Retraining Through Selective Synaptic Dampening"): no training, no optimiser.

The authors' protocol (their ssd.py and ssd_tuning), on the original model in eval mode:
  1. I_f: the diagonal Fisher of the forget set, the mean over its batches (in order) of the
     squared batch-mean gradient of the loss;
  2. I_D: the same over the full training data, retain then forget (unshuffled);
  3. one dampening pass: where I_f > alpha I_D, theta <- theta * min((lambda I_D / I_f)^e, b).
alpha = 10, lambda = 1 (the paper's defaults); e = 1 and b = 1 (the code's exponent and lower
bound). For a causal LM the loss is the token-mean cross-entropy of the answers through the fused
LM-head path (lethe.methods.base.mean_nll). The Fisher passes are lethe.nn.FisherDiagonal
(fisher_accumulate), the dampening one ssd_dampen call over every chosen parameter.

The driver runs it as a one-shot method: one work unit per batch (progress, a checkpoint of the
accumulators every `checkpoint_every` batches, exact resume), then `finish`. Under
torch.distributed every rank takes every world-th batch and the accumulators are summed over the
ranks; with FSDP2 (DTensor parameters) every rank takes every batch and keeps its shards'
accumulators, which are never reduced."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import ClassVar, Optional

import torch

from lethe.methods.base import Encoded, Method, check_number, mean_nll, register
from lethe.nn.fisher import FisherDiagonal
from lethe.nn.retain_subspace import _local

ACCUMULATORS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SSDConfig:
    alpha: float = 10.0  # selection weighting: dampen where I_f > alpha * I_D
    lambd: float = 1.0  # dampening constant
    exponent: float = 1.0
    bound: float = 1.0  # the factor's upper bound (1: a weight never grows)
    params: Optional[tuple] = None  # glob patterns over parameter names (None: every parameter)
    modules: Optional[tuple] = None  # module class names (("Linear",) ...; None: any)
    batch_size: int = 16  # examples per importance batch
    accumulator: str = "float32"  # or "bfloat16" (stochastic rounding: half the memory)
    seed: int = 0  # of the bf16 accumulators' rounding

    def __post_init__(self):
        check_number(self, "alpha", positive=True)
        for f in ("lambd", "bound"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"SSDConfig: {f} must be a finite number >= 0, got {v!r}")
        check_number(self, "exponent")
        if not math.isfinite(self.alpha) or not math.isfinite(self.exponent):
            raise ValueError(f"SSDConfig: alpha and exponent must be finite, got {self.alpha!r}, {self.exponent!r}")
        for f in ("params", "modules"):
            v = getattr(self, f)
            if isinstance(v, str):  # "Linear,Embedding" (the CLI's --set modules=...)
                object.__setattr__(self, f, tuple(x.strip() for x in v.split(",")))
            elif isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
            v = getattr(self, f)
            if v is not None and (not v or not all(isinstance(x, str) and x for x in v)):
                raise ValueError(f"SSDConfig: {f} must be None or a non-empty list of non-empty strings, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SSDConfig: batch_size must be a positive int, got {self.batch_size!r}")
        if self.accumulator not in ACCUMULATORS:
            raise ValueError(f"SSDConfig: accumulator must be one of {ACCUMULATORS}, got {self.accumulator!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SSDConfig: seed must be an int, got {self.seed!r}")


def ssd_parameters(model: torch.nn.Module, params=None, modules=None, layers=None) -> list:
    """(name, parameter) pairs that SSD may change: matching any of the `params` / `layers` glob
    patterns (when given) and owned by a module whose class name is in `modules` (when given).
    A tied parameter is visited once (under its first name). A filter that matches nothing is an error."""
    owned = []
    seen = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            owned.append((f"{mname}.{pname}" if mname else pname, type(mod).__name__, p))
    out = owned
    for what, pats in (("params", params), ("layers", layers)):
        if pats is None:
            continue
        pats = (pats,) if isinstance(pats, str) else tuple(pats)
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _, _ in owned):
                some = ", ".join(n for n, _, _ in owned[:4])
                raise ValueError(f"{what}: pattern {pat!r} matches no parameter of the model (its names are like "
                                 f"{some}, ...)")
        out = [x for x in out if any(fnmatch.fnmatchcase(x[0], pat) for pat in pats)]
    if modules is not None:
        kinds = sorted({k for _, k, _ in owned})
        for m in modules:
            if m not in kinds:
                raise ValueError(f"modules: no module of the model is a {m!r} (its parameters' modules: {kinds})")
        out = [x for x in out if x[1] in modules]
    if not out:
        raise ValueError(f"the parameter filter (params={params!r}, modules={modules!r}, layers={layers!r}) leaves "
                         "no parameter")
    return [(n, p) for n, _, p in out]


@register
class SSD(Method):
    name = "ssd"
    Config = SSDConfig
    uses_retain = True  # I_D is over the full training data: retain and forget
    one_shot: ClassVar[bool] = True
    # The selection needs I_f > alpha I_D, and I_D (over retain and forget) holds the forget batches
    # too: a parameter that matters to the forget set alone has I_f / I_D close to the ratio of the
    # passes' batch counts, about 10 for forget10, so the paper's alpha = 10 (tuned on forget sets
    # of a few percent of CIFAR) selects almost nothing there (0.1% of the weights; forget prob
    # 0.98 -> 0.96). The benchmark's point, from the sweep in benchmarks/RESULTS.md (the lowest
    # forget probability of the full benchmark at >= 0.8 of the target's utility):
    benchmark_config: ClassVar[dict] = {"alpha": 2.0, "lambd": 1.0}

    # ---- the one-shot protocol (lethe.methods.driver runs it)

    def _world(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
        return 0, 1, None

    def _passes(self, forget: Encoded, retain: Encoded):
        """[(pass name, the pass's number of batches)]: the forget set, then the full data."""
        bs = self.config.batch_size
        return [("forget", -(-len(forget) // bs)), ("full", -(-(len(retain) + len(forget)) // bs))]

    def units(self, forget: Encoded, retain: Encoded) -> int:
        """This rank's work units: its batches of both passes (after prepare_one_shot)."""
        return len(self._plan)

    def _setup(self, model, forget, retain, layers):
        c = self.config
        self._named = ssd_parameters(model, c.params, c.modules, layers)
        self._full = Encoded(retain.rows + forget.rows, forget.pad_id, "full")
        self._forget = forget
        rank, world, group = self._world()
        if any(type(p).__name__ == "DTensor" for _, p in self._named):
            # FSDP2 shards: every rank takes every batch (the same one), so that the reduce-scattered
            # shard gradient is that batch's gradient, as the authors' per-batch square wants; the
            # replicated parameters' accumulators are then the same on every rank: nothing to reduce
            rank, world, group = 0, 1, None
        dtype = torch.float32 if c.accumulator == "float32" else torch.bfloat16
        self._fisher = {k: FisherDiagonal([p for _, p in self._named], dtype=dtype, seed=c.seed * 2 + i,
                                          process_group=group) for i, k in enumerate(("forget", "full"))}
        self._plan = [(k, b) for k, n in self._passes(forget, retain) for b in range(rank, n, world)]

    def prepare_one_shot(self, model, forget: Encoded, retain: Encoded, layers=None) -> None:
        self._setup(model, forget, retain, layers)
        self._state = {"names": [n for n, _ in self._named]}

    def resume_one_shot(self, model, forget: Encoded, retain: Encoded, layers=None) -> None:
        """After load_state_dict: the accumulators from the saved state."""
        self._setup(model, forget, retain, layers)
        if self._state.get("names") != [n for n, _ in self._named]:
            raise ValueError("the saved SSD state is of other parameters than this run's filter selects")
        for k, f in self._fisher.items():
            if k in self._state:
                f.load_state_dict(self._state[k])

    def work(self, model, unit: int) -> dict:
        """One batch of the Fisher passes: the gradient of the batch's mean loss, squared into its pass."""
        which, b = self._plan[unit]
        data = self._forget if which == "forget" else self._full
        bs = self.config.batch_size
        model.eval()  # the authors' protocol: no dropout
        dev = self._named[0][1].device
        batch = data.batch(range(b * bs, min((b + 1) * bs, len(data))), dev)
        params = [p for _, p in self._named]
        chosen = {id(p) for p in params}
        # the authors' zero_grad, backward, read .grad (FSDP2 leaves the reduce-scattered shard
        # gradients there); only the chosen parameters need gradients
        others = [q for q in model.parameters() if q.requires_grad and id(q) not in chosen]
        for q in others:
            q.requires_grad_(False)
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = mean_nll(model, batch)
                loss.backward()
            self._fisher[which].accumulate([p.grad for p in params])
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            for q in others:
                q.requires_grad_(True)
        return {"loss": loss.item(), "pass": which}

    def checkpoint_state(self) -> None:
        """Copies the accumulators into the method state (what a checkpoint saves)."""
        self._state.update({k: f.state_dict() for k, f in self._fisher.items()})

    def finish(self, model) -> dict:
        """The dampening pass; returns what it changed."""
        from lethe.ops import ssd_dampen

        c = self.config
        i_f = self._fisher["forget"].mean()
        i_d = self._fisher["full"].mean()
        params = [_local(p.data) for _, p in self._named]
        stats = ssd_dampen(params, i_d, i_f, alpha=c.alpha, lambd=c.lambd, exponent=c.exponent, bound=c.bound)
        counts = stats.selected.double().cpu()
        sums = (stats.mean_factor.cpu() * counts)
        sizes = torch.tensor([float(p.numel()) for _, p in self._named], dtype=torch.float64)
        shard = torch.tensor([type(p).__name__ == "DTensor" for _, p in self._named])
        if shard.any():  # the whole tensors' figures: the shards' counts summed over the ranks
            import torch.distributed as dist

            part = torch.stack([counts, sums, sizes]) * shard
            dev = params[0].device
            both = part.to(dev)
            dist.all_reduce(both)
            counts, sums, sizes = (both.cpu() + torch.stack([counts, sums, sizes]) * ~shard).unbind(0)
        sel, total = int(counts.sum()), int(sizes.sum())
        factor = float(sums.sum() / sel) if sel else 1.0
        self._state["dampened"] = {n: int(s) for (n, _), s in zip(self._named, counts.tolist()) if s}
        return {"selected": sel, "selected_fraction": sel / max(total, 1), "mean_factor": factor}

    def loss(self, model, inputs, step, total_steps):
        raise RuntimeError("ssd is a one-shot method (no training): run it with lethe.methods.unlearn or "
                           "`lethe unlearn`, not a training loop")
