"""Quantisation-robustness demo: does INT4 quantisation bring forgotten knowledge back?

A tiny model memorises synthetic facts (subject -> answer); gradient-difference unlearning
removes a forget set with small, careful steps; then the unlearned model is round-tripped through
each quantisation preset (lethe.quantized_weights) and the forget accuracy is measured again.
DurableUn (2026) reports that such small updates can fall inside the quantisation grid, so the
quantised model recalls the facts again. The same run then unlearns with the DurableUn-SAF
objective L = -L_f(theta) - alpha * L_f(Q_STE(theta)) + lambda * L_r(theta), whose middle term sees
the model through the fake quantiser (lethe.fake_quantize, straight-through gradient).

Runs in well under a minute on a laptop CPU; needs no download.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lethe

PRESETS = ("paper-int4", "int4-g128", "nf4-b64", "int4-g128-asym", "int8")


class FactModel(nn.Module):
    def __init__(self, subjects: int, answers: int, dim: int = 128, hidden: int = 256):
        super().__init__()
        self.emb = nn.Embedding(subjects, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, answers)

    def forward(self, ids):
        return self.down(F.gelu(self.up(self.emb(ids))))


def accuracy(model, ids, answers, params=None) -> float:
    with torch.no_grad():
        logits = model(ids) if params is None else functional_call(model, params, (ids,))
        return (logits.argmax(-1) == answers).float().mean().item()


def quantised_params(model, preset):
    """The model's parameters with every weight matrix passed through the fake quantiser."""
    return {n: lethe.fake_quantize(p, preset) if p.dim() >= 2 else p for n, p in model.named_parameters()}


def unlearn(model, forget, retain, steps, lr, saf_alpha=0.0, saf_preset="int4-g128", lam=1.0, log=None):
    """Gradient difference; with saf_alpha > 0, the DurableUn-SAF objective."""
    (f_ids, f_ans), (r_ids, r_ans) = forget, retain
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        loss = -F.cross_entropy(model(f_ids), f_ans) + lam * F.cross_entropy(model(r_ids), r_ans)
        if saf_alpha:
            logits_q = functional_call(model, quantised_params(model, saf_preset), (f_ids,))
            loss = loss - saf_alpha * F.cross_entropy(logits_q, f_ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1}/{steps}: loss {loss.item():+.3f}, forget acc {accuracy(model, f_ids, f_ans):.2f}")


def run(subjects=2048, answers=64, forget_size=128, seed=0, train_steps=600, unlearn_steps=40,
        unlearn_lr=1e-3, saf_alpha=1.0, saf_preset="int4-g128", out=print) -> dict:
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = torch.arange(subjects)
    ans = torch.randint(0, answers, (subjects,), generator=g)
    perm = torch.randperm(subjects, generator=g)
    forget = (ids[perm[:forget_size]], ans[perm[:forget_size]])
    retain = (ids[perm[forget_size:]], ans[perm[forget_size:]])

    base = FactModel(subjects, answers)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    out(f"lethe {lethe.__version__} quantisation-recovery demo: {subjects} synthetic facts, "
        f"forget set of {forget_size}")
    out(f"  training the fact model ({train_steps} steps) ...")
    for _ in range(train_steps):
        loss = F.cross_entropy(base(ids), ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Released as an INT4 checkpoint: the weights sit on the int4-g128 grid, as after loading a
    # quantised release (or merging into one). Updates smaller than half a step then vanish
    # when the unlearned model is quantised again.
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() >= 2:
                p.copy_(lethe.fake_quantize(p, saf_preset))
    out(f"  trained and stored at {saf_preset}: forget acc {accuracy(base, *forget):.2f}, "
        f"retain acc {accuracy(base, *retain):.2f}")

    results = {}
    for name, alpha in (("GradDiff", 0.0), ("DurableUn-SAF", saf_alpha)):
        model = FactModel(subjects, answers)
        model.load_state_dict(base.state_dict())
        out(f"  unlearning with {name} ({unlearn_steps} Adam steps, lr {unlearn_lr}) ...")
        unlearn(model, forget, retain, unlearn_steps, unlearn_lr, saf_alpha=alpha, saf_preset=saf_preset, log=out)
        row = {"fp32": (accuracy(model, *forget), accuracy(model, *retain))}
        for preset in PRESETS:
            with lethe.quantized_weights(model, preset):
                row[preset] = (accuracy(model, *forget), accuracy(model, *retain))
        results[name] = row

    out("")
    out("forget accuracy (lower is better) / retain accuracy, by precision of the unlearned model:")
    cols = ("fp32",) + PRESETS
    out(f"  {'method':14s}" + "".join(f"{c:>16s}" for c in cols))
    for name, row in results.items():
        out(f"  {name:14s}" + "".join(f"{row[c][0]:>9.2f} / {row[c][1]:.2f}" for c in cols))
    ga, saf = results["GradDiff"], results["DurableUn-SAF"]
    worst = max(PRESETS, key=lambda p: ga[p][0] - ga["fp32"][0])
    out("")
    out(f"  quantisation recovery under {worst}: GradDiff forget acc {ga['fp32'][0]:.2f} -> {ga[worst][0]:.2f}, "
        f"DurableUn-SAF {saf['fp32'][0]:.2f} -> {saf[worst][0]:.2f}")
    out(f"  ({time.perf_counter() - t0:.1f} s)")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlearn-steps", type=int, default=40)
    p.add_argument("--unlearn-lr", type=float, default=1e-3)
    p.add_argument("--saf-alpha", type=float, default=1.0)
    a = p.parse_args(argv)
    run(seed=a.seed, unlearn_steps=a.unlearn_steps, unlearn_lr=a.unlearn_lr, saf_alpha=a.saf_alpha)


if __name__ == "__main__":
    main()
