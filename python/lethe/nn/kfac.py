"""K-FAC / EK-FAC curvature of a model's linear layers, captured by hooks and kept as Kronecker
factors (the lethe.ops.kfac ops do the arithmetic).

    kfac = KFAC(model)                          # every Linear / Conv1D of the decoder blocks
    for batch in retain.batches(16):
        kfac.accumulate_lm(model, batch)        # A and G, running means over the valid tokens
    kfac.reduce()                               # under torch.distributed: the global means
    pre = kfac.precondition(kfac.gradients(), damping=1e-3)   # (G + .)^-1 dW (A + .)^-1, and g^T F^-1 g

Conventions (lethe.ops.kfac's, curvlinops' KFACLinearOperator with a mean reduction and weight
sharing "expand"): every position whose target is not -100 is a token; for a layer s = W a (+ b),
A = mean_t a_t a_t^T (a ones entry last with a bias) and G = mean_t g_t g_t^T with g_t the gradient
of the summed token loss with respect to s at position t (what backward gives: for a position-wise
network token t's own gradient; in a transformer it also carries the later tokens' losses through
attention, as curvlinops' does). The Fisher of the token-mean loss is then A (x) G; for a summed
loss it is N times that. Positions without a target (a prompt, padding) are left out of both.

Fisher types: "true" samples the targets from the model's own distribution (`samples` draws per
token, seeded, G averaged over them): its Kronecker product approximates the Fisher of the
predictive distribution, the Hessian of the KL to the model (a trust region's metric); "empirical"
uses the given targets.

EK-FAC (George et al. 2018): after `eigen()`, a second pass (`accumulate_lm(..., into="lambda")`)
re-estimates the diagonal Lambda in the Kronecker eigenbasis from the per-token gradients g_t a_t^T:
per token, not per sequence, because every token is an example in the factors' convention and the
trust region's KL is a token mean; a sequence's gradient would be the sum of its tokens', whose
square has cross terms the factors do not have.

Under torch.distributed (`process_group`): every rank accumulates its own batches; `reduce()`
all-reduces the upper triangles (weighted by each rank's token count: the global running mean;
an EMA is averaged over the ranks); `inverses()` and `eigen()` give each factor to one rank by a
greedy n^3 rule, which computes it, and broadcast the results.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from typing import Optional, Sequence

import torch

from lethe.ops import kfac as K

__all__ = ["KFAC", "kfac_layers"]

FISHERS = ("true", "empirical")
AVERAGES = ("mean", "ema")
SPLITS = ("pi", "even")
INTO = ("factors", "lambda")
POSITIONS = ("loss", "all")


def _is_conv1d(mod) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): y = x W + b with W [in, out]
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "weight") and getattr(mod, "weight").dim() == 2


def _linear_like(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)


def kfac_layers(model: torch.nn.Module, layers=None) -> list:
    """[(name, module)] of the Linear and HF Conv1D layers K-FAC covers. layers: None, every one inside
    the decoder blocks (a module path with a numbered part: model.layers.3.mlp.up_proj, transformer.h.0.attn.c_attn;
    not the LM head or an embedding); "mlp", those of them with an `mlp` part; or glob patterns over
    the module names (each must match a Linear or Conv1D)."""
    every = [(n, m) for n, m in model.named_modules() if _linear_like(m)]
    if not every:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear or Conv1D layer for K-FAC")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = [(n, m) for n, m in every if m is not head and any(p.isdigit() for p in n.split("."))]
    if layers is None or layers == "mlp":
        out = blocks if layers is None else [(n, m) for n, m in blocks if "mlp" in n.split(".")]
        if not out:
            raise ValueError(f"layers={layers!r}: no Linear or Conv1D layer of {type(model).__name__} is inside a "
                             f"numbered block{' under an mlp module' if layers else ''} (its layers: "
                             f"{[n for n, _ in every[:6]]}); name them with glob patterns")
        return out
    pats = [layers] if isinstance(layers, str) else layers
    if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) and p for p in pats):
        raise ValueError(f"layers: expected None, 'mlp', a glob pattern or a list of them, got {layers!r}")
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in every):
            raise ValueError(f"layers: pattern {p!r} matches no Linear or Conv1D layer of the model (its layers are "
                             f"like {', '.join(n for n, _ in every[:4])}, ...)")
    return [(n, m) for n, m in every if any(fnmatch.fnmatchcase(n, p) for p in pats)]


class _Layer:
    def __init__(self, name, mod, dtype):
        self.name, self.mod, self.conv1d = name, mod, _is_conv1d(mod)
        w = mod.weight
        self.inp, self.out = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
        self.bias = getattr(mod, "bias", None) is not None
        dev = w.device
        n = self.inp + int(self.bias)
        self.A = torch.zeros(n, n, dtype=dtype, device=dev)
        self.G = torch.zeros(self.out, self.out, dtype=dtype, device=dev)
        self.lam = None  # EK-FAC's [out, in (+1)]
        self.q_a = self.q_g = self.e_a = self.e_g = None  # the eigenbasis (eigen())
        self.a = None  # this batch's inputs, for the Lambda pass

    def params(self):
        return [self.mod.weight] + ([self.mod.bias] if self.bias else [])

    def matrix(self, w, b):
        """[out, in (+1)]: the weight in Linear's layout with the bias as the last column."""
        w = w.T if self.conv1d else w
        return torch.cat([w, b.reshape(-1, 1)], dim=1) if b is not None else w

    def split(self, m):
        """The inverse of matrix(): (weight-shaped, bias-shaped or None)."""
        w = m[:, : self.inp]
        w = w.T if self.conv1d else w
        return w, (m[:, self.inp] if self.bias else None)


def _check_choice(v, name, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")


class KFAC:
    def __init__(self, model: torch.nn.Module, layers=None, *, fisher: str = "true", samples: int = 1, seed: int = 0,
                 average: str = "mean", beta: float = 0.95, positions: str = "loss",
                 dtype: torch.dtype = torch.float32, process_group=None, backend: Optional[str] = None):
        _check_choice(fisher, "fisher", FISHERS)
        _check_choice(positions, "positions", POSITIONS)
        _check_choice(average, "average", AVERAGES)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if dtype not in K.FACTOR_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.fisher, self.samples, self.seed, self.average, self.beta = fisher, samples, seed, average, float(beta)
        self.dtype, self.process_group, self.backend = dtype, process_group, backend
        self.positions = positions
        self.layers = [_Layer(n, m, dtype) for n, m in kfac_layers(model, layers)]
        self.names = [l.name for l in self.layers]
        self.tokens = 0  # loss tokens accumulated into G (this rank's, until reduce())
        self.seen = 0  # positions accumulated into A (the loss tokens, or every attended position)
        self.lam_tokens = 0
        self.batches = 0
        self._capture = None  # (into, mask, scale/decay per sample) while a batch runs
        self._inv = None
        self._handles = [l.mod.register_forward_hook(self._forward_hook(l)) for l in self.layers]

    def remove(self) -> None:
        """Removes the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def memory_bytes(self) -> int:
        ts = [t for l in self.layers for t in (l.A, l.G, l.lam, l.q_a, l.q_g) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    # ---- capture

    def _forward_hook(self, layer):
        def hook(mod, inputs, output):
            cap = self._capture
            if cap is None:
                return
            if layer.name in cap["outputs"]:
                raise RuntimeError(f"KFAC: layer {layer.name!r} ran more than once in one forward (shared weights or "
                                   "activation checkpointing): its factors would be wrong")
            a = inputs[0].detach()
            mask = cap["pos"]
            if a.shape[:-1] != mask.shape:
                raise ValueError(f"KFAC: layer {layer.name!r}'s input has leading shape {list(a.shape[:-1])}, but the "
                                 f"targets (the token mask) have shape {list(mask.shape)}")
            if cap["into"] == "factors":
                dec, sc = cap["a_weights"](0)
                K.kfac_factor_update(layer.A, a, mask, bias=layer.bias, scale=sc, decay=dec, backend=self.backend)
            else:
                layer.a = a
            cap["outputs"][layer.name] = output
        return hook

    def _weights(self, n, m, S):
        """(decay, scale) of sample i's update, for a batch of m tokens after n: a running mean over
        the tokens (or an EMA of the batch means), each of the S samples weighted 1/S."""
        if self.average == "mean" or n == 0:
            first = (n / (n + m), 1.0 / ((n + m) * S))
        else:
            first = (self.beta, (1 - self.beta) / (m * S))
        return lambda i: first if i == 0 else (1.0, first[1])

    def accumulate(self, forward, targets: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                   into: str = "factors") -> float:
        """One batch: runs forward() (the model on the batch; it returns logits [..., C] whose leading
        shape is every layer's input's, the positions), the summed cross-entropy of the targets
        (targets [...], -100: not a token; for fisher="true" sampled from the logits instead) and its
        backward, once per sample, and updates the factors (into="lambda": EK-FAC's Lambda, after
        eigen()). positions (bool, targets' shape; default: targets != -100): the positions whose
        inputs and output gradients enter the sums; A is their mean, G and Lambda their sums divided
        by the number of loss tokens, so that A (x) G stays the Fisher of the token-mean loss when
        positions without a target of their own (a prompt) are included. Only the layers' output gradients are computed (no .grad changes). Returns the
        batch's mean loss (of the given targets)."""
        _check_choice(into, "into", INTO)
        if into == "lambda" and any(l.q_a is None for l in self.layers):
            raise RuntimeError("KFAC: accumulate(into='lambda') needs the eigenbasis: call eigen() first")
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError("targets must be an int64 tensor of class indices (-100: ignored)")
        mask = targets != -100
        pos = mask if positions is None else positions
        if not isinstance(pos, torch.Tensor) or pos.dtype != torch.bool or pos.shape != targets.shape:
            raise ValueError(f"positions must be a bool tensor of the targets' shape {list(targets.shape)}")
        m, P = int(mask.sum()), int(pos.sum())
        if m == 0 or P == 0:
            return float("nan")
        n = self.tokens if into == "factors" else self.lam_tokens
        if into == "lambda":
            for l in self.layers:
                if l.lam is None:
                    l.lam = torch.zeros(l.out, l.inp + int(l.bias), dtype=self.dtype, device=l.A.device)
        params = [p for l in self.layers for p in l.params()]
        flags = [p.requires_grad for p in params]
        self._capture = {"into": into, "pos": pos, "weights": self._weights(n, m, self.samples),
                         "a_weights": self._weights(self.seen, P, 1), "outputs": {}}
        try:
            for p in params:  # so that the layers' outputs have gradients, even in a frozen model
                p.requires_grad_(True)
            with torch.enable_grad():
                logits = forward()
                if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != targets.shape:
                    got = list(logits.shape[:-1]) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(f"targets must have the logits' leading shape {got}, got {list(targets.shape)}")
                outs = self._capture["outputs"]
                missing = [l.name for l in self.layers if l.name not in outs]
                if missing:
                    raise RuntimeError(f"KFAC: layer {missing[0]!r} did not run in forward()")
                z = logits[mask]
                z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
                mean_loss = float(torch.nn.functional.cross_entropy(z.detach(), targets[mask].long()))
                if self.fisher == "true":
                    gen = torch.Generator(device=z.device).manual_seed(
                        (self.seed * 1_000_003 + self.batches) * 7 + (into == "lambda"))
                    # inverse-CDF sampling (torch.multinomial is 10x slower here on the CPU)
                    cdf = torch.softmax(z.detach(), -1).cumsum_(-1)
                    u = torch.rand(z.shape[0], self.samples, generator=gen, dtype=cdf.dtype, device=z.device)
                    u.mul_(cdf[:, -1:])  # (the last entry is 1 up to rounding)
                    ys = torch.searchsorted(cdf, u).clamp_(max=z.shape[-1] - 1).T
                else:
                    ys = targets[mask].long().unsqueeze(0)
                order = [outs[l.name] for l in self.layers]
                for i, y in enumerate(ys):
                    loss = torch.nn.functional.cross_entropy(z, y, reduction="sum")
                    # the gradients of the summed loss at the layers' outputs, no weight gradient
                    gs = torch.autograd.grad(loss, order, retain_graph=i + 1 < len(ys), allow_unused=True)
                    dec, sc = self._capture["weights"](i)
                    for l, o, g in zip(self.layers, order, gs):
                        g = torch.zeros_like(o) if g is None else g.detach()
                        if into == "factors":
                            K.kfac_factor_update(l.G, g, pos, scale=sc, decay=dec, backend=self.backend)
                        else:
                            K.kfac_eigen_update(l.lam, l.a, g, l.q_a, l.q_g, pos, bias=l.bias, scale=sc,
                                                decay=dec, backend=self.backend)
        finally:
            self._capture = None
            for l in self.layers:
                l.a = None
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        if into == "factors":
            self.tokens += m
            self.seen += P
            self._inv = None
        else:
            self.lam_tokens += m
        self.batches += 1
        return mean_loss

    def accumulate_lm(self, model, batch: dict, *, into: str = "factors") -> float:
        """accumulate() for a Hugging Face causal LM and a batch (input_ids, attention_mask, labels):
        the loss tokens are the positions whose next token has a label; the positions in the sums
        are those (positions="loss") or every attended one (positions="all": a prompt's positions
        carry the answer's loss through attention)."""
        from lethe.integrations import hf

        ids, att = batch["input_ids"], batch.get("attention_mask")
        lab = hf.shifted_labels(ids, att, batch.get("labels"))
        targets = torch.cat([lab, torch.full_like(lab[:, :1], -100)], dim=1)  # the last position predicts nothing
        pos = None
        if self.positions == "all":
            pos = torch.ones_like(ids, dtype=torch.bool) if att is None else att.bool()
        return self.accumulate(lambda: model(input_ids=ids, attention_mask=att).logits, targets, positions=pos,
                               into=into)

    # ---- distributed

    def _world(self):
        if self.process_group is None:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def reduce(self, what: str = "factors") -> None:
        """Under a process group: every rank's factors (or Lambda) become the global ones, the upper
        triangles all-reduced in one buffer, weighted by the ranks' token counts (a running mean; an
        EMA is averaged over the ranks). Without one, nothing to do."""
        _check_choice(what, "what", INTO)
        rank, world = self._world()
        if world == 1:
            return
        import torch.distributed as dist

        n = self.tokens if what == "factors" else self.lam_tokens
        # (matrix, its upper-triangle indices or None, its weight's slot): A by positions, G and
        # Lambda by loss tokens (an EMA: every rank weighs 1)
        if what == "factors":
            jobs = [(t, torch.triu_indices(t.shape[0], t.shape[0], device=t.device), slot)
                    for l in self.layers for t, slot in ((l.A, 0), (l.G, 1))]
        else:
            jobs = [(l.lam, None, 1) for l in self.layers]
        dev = jobs[0][0].device
        w = [float(self.seen), float(n)] if self.average == "mean" else [1.0, 1.0]
        parts = [(t[iu[0], iu[1]] if iu is not None else t.reshape(-1)) * w[slot] for t, iu, slot in jobs]
        buf = torch.cat(parts + [torch.tensor(w, dtype=self.dtype, device=dev)])
        cnt = torch.tensor([float(n), float(self.seen)], dtype=torch.float64, device=dev)
        dist.all_reduce(buf, group=self.process_group)
        dist.all_reduce(cnt, group=self.process_group)
        total = buf[-2:].tolist()  # the ranks' weights summed
        if min(total[slot] for _, _, slot in jobs) == 0:
            raise ValueError("KFAC.reduce: no rank accumulated a token")
        off = 0
        for (t, iu, slot), p in zip(jobs, parts):
            v = buf[off: off + p.numel()] / total[slot]
            off += p.numel()
            if iu is not None:
                t.zero_()
                t[iu[0], iu[1]] = v
                t.copy_(torch.triu(t) + torch.triu(t, 1).T)
            else:
                t.copy_(v.reshape(t.shape))
        if what == "factors":
            self.tokens, self.seen = int(cnt[0].item()), int(cnt[1].item())
            self._inv = None
        else:
            self.lam_tokens = int(cnt[0].item())

    def _assign(self, sizes):
        """Rank of each job (greedy by n^3: the largest to the least loaded rank)."""
        _, world = self._world()
        load = [0.0] * world
        owner = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i] ** 3):
            r = min(range(world), key=lambda r: load[r])
            owner[i] = r
            load[r] += float(sizes[i]) ** 3
        return owner

    def _broadcast(self, results, owner):
        rank, world = self._world()
        if world == 1:
            return results
        import torch.distributed as dist

        for i, r in enumerate(owner):
            for t in results[i]:
                dist.broadcast(t, src=dist.get_global_rank(self.process_group, r) if hasattr(dist, "get_global_rank")
                               else r, group=self.process_group)
        return results

    # ---- damping, inversion and the eigenbasis

    def _check_tokens(self):
        if self.tokens == 0:
            raise RuntimeError("KFAC: no token was accumulated (call accumulate or accumulate_lm first)")

    def _dampings(self, damping, split):
        d = K._finite(damping, "damping")
        _check_choice(split, "split", SPLITS)
        out = []
        for l in self.layers:
            pi = 1.0
            if split == "pi":  # Martens & Grosse 2015: sqrt of the ratio of the factors' mean eigenvalues
                ta, tg = float(torch.trace(l.A)) / l.A.shape[0], float(torch.trace(l.G)) / l.G.shape[0]
                pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
            out += [pi * math.sqrt(d), math.sqrt(d) / pi]
        return out

    def inverses(self, damping: float, split: str = "pi") -> list:
        """[((A + pi sqrt(d) I)^-1, (G + sqrt(d)/pi I)^-1)] per layer (split="even": pi = 1), cached until
        the factors change. Every factor's inversion runs on one rank of a process group."""
        self._check_tokens()
        key = (float(damping), split)
        if self._inv is not None and self._inv[0] == key:
            return self._inv[1]
        damp = self._dampings(damping, split)
        mats = [t for l in self.layers for t in (l.A, l.G)]
        rank, world = self._world()
        owner = self._assign([t.shape[0] for t in mats])
        mine = [i for i, r in enumerate(owner) if r == rank]
        res = [[torch.empty_like(t)] for t in mats]
        if mine:
            inv = K.kfac_damped_inverse([mats[i] for i in mine], [damp[i] for i in mine], backend=self.backend)
            for i, t in zip(mine, inv.inverses):
                res[i] = [t]
        self._broadcast(res, owner)
        out = [(res[2 * j][0], res[2 * j + 1][0]) for j in range(len(self.layers))]
        self._inv = (key, out)
        return out

    def eigen(self) -> None:
        """The eigenbases Q_A, Q_G of the factors (eigenvalues clamped at 0), and K-FAC's diagonal
        Lambda = outer(eig G, eig A) in it (an EK-FAC pass, into="lambda", replaces it)."""
        self._check_tokens()
        mats = [t for l in self.layers for t in (l.A, l.G)]
        rank, _ = self._world()
        owner = self._assign([t.shape[0] for t in mats])
        res = []
        for i, t in enumerate(mats):
            if owner[i] == rank:
                e, q = torch.linalg.eigh(t.double())
                res.append([e.clamp_min(0).to(t.dtype), q.to(t.dtype).contiguous()])
            else:
                res.append([t.new_empty(t.shape[0]), torch.empty_like(t)])
        self._broadcast(res, owner)
        for j, l in enumerate(self.layers):
            (l.e_a, l.q_a), (l.e_g, l.q_g) = res[2 * j], res[2 * j + 1]
            l.lam = torch.outer(l.e_g, l.e_a).contiguous()
        self.lam_tokens = 0

    def restart(self) -> None:
        """A new pass: the counts start again, so that the next batch replaces the factors (decay 0)
        instead of averaging into them; the factors stay usable until then."""
        self.tokens = self.seen = 0

    # ---- gradients and steps

    def gradients(self) -> list:
        """The layers' current .grad as [out, in (+1)] matrices in the factors' dtype (zeros where None)."""
        out = []
        for l in self.layers:
            w, b = l.mod.weight, (l.mod.bias if l.bias else None)
            gw = w.grad if w.grad is not None else torch.zeros_like(w)
            gb = None if b is None else (b.grad if b.grad is not None else torch.zeros_like(b))
            out.append(l.matrix(gw, gb).to(self.dtype).contiguous())
        return out

    def precondition(self, grads: Sequence[torch.Tensor], damping: float, *, split: str = "pi",
                     eigen: bool = False) -> K.Preconditioned:
        """F^-1 g per layer and the quadratic forms g^T F^-1 g: with eigen=False the Kronecker
        inverse of the split-damped factors; with eigen=True (after eigen(), and an EK-FAC pass for
        EK-FAC) Q_G[(Q_G^T g Q_A) / (Lambda + damping)]Q_A^T, exact Tikhonov damping of the eigen form."""
        grads = list(grads)
        if len(grads) != len(self.layers):
            raise ValueError(f"grads: expected one matrix per layer ({len(self.layers)}), got {len(grads)}")
        if eigen:
            if any(l.q_a is None for l in self.layers):
                raise RuntimeError("KFAC: precondition(eigen=True) needs the eigenbasis: call eigen() first")
            ls = self.layers
            return K.kfac_eigen_precondition(grads, [l.q_a for l in ls], [l.q_g for l in ls], [l.lam for l in ls],
                                             damping=damping, backend=self.backend)
        inv = self.inverses(damping, split)
        return K.kfac_precondition(grads, [a for a, _ in inv], [g for _, g in inv], backend=self.backend)

    def quadratic(self, dirs: Sequence[torch.Tensor], eigen: bool = False) -> torch.Tensor:
        """Per layer <D, F D> with the undamped curvature (A (x) G, or the eigen form): the second-order
        KL of a step D is half its sum."""
        out = []
        for l, d in zip(self.layers, dirs):
            d = d.to(self.dtype)
            if eigen:
                r = l.q_g.T @ d @ l.q_a
                out.append((r.double() ** 2 * l.lam.double()).sum())
            else:
                out.append((d.double() * (l.G.double() @ d.double() @ l.A.double())).sum())
        return torch.stack(out)

    @torch.no_grad()
    def add_to_parameters(self, dirs: Sequence[torch.Tensor], alpha: float) -> None:
        """theta <- theta + alpha * D, D per layer in the [out, in (+1)] layout."""
        for l, d in zip(self.layers, dirs):
            w, b = l.split(d)
            l.mod.weight.add_(w.to(l.mod.weight.dtype), alpha=alpha)
            if b is not None:
                l.mod.bias.add_(b.to(l.mod.bias.dtype), alpha=alpha)

    # ---- state

    def state_dict(self) -> dict:
        """Tensors by layer name (<name>.A, .G and, after eigen(), .q_a, .q_g, .e_a, .e_g, .lam) and the counts."""
        t = {}
        for l in self.layers:
            t[f"{l.name}.A"], t[f"{l.name}.G"] = l.A, l.G
            for k in ("q_a", "q_g", "e_a", "e_g", "lam"):
                if getattr(l, k) is not None:
                    t[f"{l.name}.{k}"] = getattr(l, k)
        meta = {"names": self.names, "tokens": self.tokens, "seen": self.seen, "lam_tokens": self.lam_tokens,
                "batches": self.batches, "positions": self.positions,
                "fisher": self.fisher, "samples": self.samples, "average": self.average, "dtype": str(self.dtype)}
        return {"tensors": {k: v.detach().clone() for k, v in t.items()}, "meta": meta}

    def load_state_dict(self, d: dict) -> None:
        meta, t = d["meta"], d["tensors"]
        if meta["names"] != self.names:
            raise ValueError(f"KFAC: the saved factors are of the layers {meta['names'][:4]}..., not of this model's "
                             f"selection {self.names[:4]}...")
        if meta["dtype"] != str(self.dtype):
            raise ValueError(f"KFAC: the saved factors are {meta['dtype']}, not {self.dtype}")
        for l in self.layers:
            for k in ("A", "G"):
                s = t[f"{l.name}.{k}"]
                if s.shape != getattr(l, k).shape:
                    raise ValueError(f"KFAC: the saved {l.name}.{k} has shape {list(s.shape)}, not "
                                     f"{list(getattr(l, k).shape)}")
                getattr(l, k).copy_(s)
            for k in ("q_a", "q_g", "e_a", "e_g", "lam"):
                key = f"{l.name}.{k}"
                setattr(l, k, t[key].to(l.A.device).clone() if key in t else None)
        self.tokens, self.lam_tokens, self.batches = int(meta["tokens"]), int(meta["lam_tokens"]), int(meta["batches"])
        self.seen = int(meta["seen"])
        self._inv = None

    def save(self, path) -> None:
        """The factors as a safetensors file, under the layers' names (the counts in its metadata)."""
        from safetensors.torch import save_file

        d = self.state_dict()
        save_file({k: v.contiguous().cpu() for k, v in d["tensors"].items()}, str(path),
                  metadata={"lethe.kfac": json.dumps(d["meta"])})

    def load(self, path) -> None:
        """Loads a file written by save() (the same layers, dtype and shapes, or an error)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if "lethe.kfac" not in md:
                raise ValueError(f"path: {str(path)!r} is not a KFAC factor file (no lethe.kfac metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.load_state_dict({"meta": json.loads(md["lethe.kfac"]), "tensors": tensors})

    def __repr__(self) -> str:
        return (f"KFAC({len(self.layers)} layers, fisher={self.fisher!r}, {self.tokens} tokens, "
                f"{self.memory_bytes / 2**20:.1f} MiB)")
