"""The method layer: one unlearning step per method (lethe.methods.available()), CPU fp32, with
lethe's fused LM-head losses against a full-logits twin of the same loss, written here the way
open-unlearning writes it (`model(**batch).logits` or `.loss`, cross-entropy / log_softmax over
[B, T, V]).

A step is what lethe.methods.unlearn does per step: the method's loss, zero_grad, backward,
gradient clipping at 1.0, AdamW. The model is the built-in benchmark's tiny Llama
(lethe.eval.benchmark.TrainConfig / _new_model: width 128, 2 layers, 4 heads, MLP 256), untrained
(speed and memory do not depend on the weights), at its vocabulary (V = 2048) and at V = 32000 (as
real tokenizers have), and at V = 32000 with batches twice as large (the claimed methods only).
Batches: 16 (32) forget (+ as many retain) sequences of 32-64 random token ids, right-padded, the
answer (the labelled part) over each sequence's last half; each method's defaults (its Config).
NPO's reference log-likelihoods and SHRED's teacher targets are computed once before the steps, as
the methods' prepare() does (the twins from full logits: SHRED's teacher top-K by torch.topk over
the full log_softmax, demoted by lethe.ops.demote_targets). The first step's losses of the two
implementations (same weights, same batch) must agree, and their gradients at V = 2048.

Time: per method and setting both implementations run in one process, one warm-up step each, then
`--rounds` steps each (default 3; 1 at the larger batch) on the steps' varying batches,
interleaved with the order reversed every round; medians.

Peak memory: each (method, setting, implementation) in a fresh process, forked from a worker that
has imported everything and computed nothing (the imports are paid once): the model, its AdamW
state, the data and the method's prepared state exist, lethe's CPU output cache is emptied; then
two identical steps, and the second one's peak is VmHWM minus the RSS before it (conftest's
helpers) plus what lethe's CPU output cache holds between the steps (the buffers the second step
reuses). It counts what both implementations pay alike (parameter gradients, AdamW's temporaries,
the model's activations) beside the logits (fused: one [min(rows, chunk), V] block). The memory
processes run glibc with a fixed mmap threshold (MALLOC_ENV), so that freed blocks go back to the
system and RSS follows the live memory. The first step's peak (with the process's one-time costs)
is in the JSON too. Also reported: what lethe's cache holds after the timed steps, whose batches
vary in shape.

    .venv/bin/python benchmarks/bench_methods.py [--quick] [--rounds 3]    # about 5 minutes
    # or with the other benchmark files: make bench (test_methods)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
from conftest import peak_rss, reset_peak_rss, rss, write_results  # noqa: E402

import lethe.methods as lm  # noqa: E402
from lethe.methods.driver import UnlearnConfig, step_batches  # noqa: E402

CLAIM = ("shred", "ga", "npo")  # the issue: at V = 32000 their fused peak <= 1/3 of the full-logits one
# name: (vocabulary, sequences per batch, shortest and longest sequence, methods (None: all), timed rounds
# (None: --rounds)). The third: twice the batch, so that the answer rows (~770) exceed lethe's chunk
# (512 rows at V = 32000) and the logits dominate; the claimed methods only, one timed round (time).
SETTINGS = {"V2048": (2048, 16, 32, 64, None, None), "V32000": (32000, 16, 32, 64, None, None),
            "V32000-b32": (32000, 32, 32, 64, CLAIM, 1)}
TOTAL_STEPS = 40  # the steps the methods' schedules assume (SAF's alpha ramp); the timed ones are 20..
STEP0 = 20  # ... from here on, where SAF's quantised term is on (alpha = 1)
PAD, BOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# the model and the data
# ------------------------------------------------------------------------------------------------

class _Vocab:
    """What lethe.eval.benchmark._new_model reads of a tokenizer."""

    def __init__(self, n):
        self.n, self.pad_token_id, self.bos_token_id, self.eos_token_id = n, PAD, BOS, EOS

    def __len__(self):
        return self.n


def make_model(vocab: int, seed: int = 0):
    from lethe.eval.benchmark import TrainConfig, _new_model

    return _new_model(TrainConfig(vocab=vocab), _Vocab(vocab), seed)


def make_data(vocab: int, lo: int, hi: int, n_examples: int, seed: int = 0):
    """Forget and retain sets of n_examples each: random ids after <s>, the answer over the last
    half of each row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        rows = []
        for _ in range(n_examples):
            n = int(torch.randint(lo, hi + 1, (), generator=g))
            ids = [BOS] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()
            rows.append((ids, n // 2))
        out.append(lm.Encoded(rows, PAD))
    return out


def step_inputs(forget, retain, batch: int, steps: int, uses_retain: bool):
    cfg = UnlearnConfig(steps=TOTAL_STEPS, batch_size=batch)
    return [step_batches(forget, retain if uses_retain else None, cfg, STEP0 + s) for s in range(steps)]


# ------------------------------------------------------------------------------------------------
# the full-logits twins: the same losses as lethe's methods, written as open-unlearning writes them
# ------------------------------------------------------------------------------------------------

def _hf(batch, labels=True):
    d = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if labels:
        d["labels"] = batch["labels"]
    return d


def mean_nll(model, batch):
    """open-unlearning's `model(**inputs).loss`: HF's ForCausalLMLoss over the [B, T, V] logits."""
    return model(**_hf(batch)).loss


def batch_nll(model, batch):
    """open-unlearning's compute_batch_nll: the summed NLL of each sequence [B] from the full
    logits (it also passes the labels to the model, which then computes a loss it does not use;
    left out here, so that the twin holds one [B, T, V] cross-entropy fewer than open-unlearning)."""
    logits = model(**_hf(batch, labels=False)).logits
    labels = batch["labels"][..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    return F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=-100, reduction="none").sum(-1)


class FullLogits:
    """A full-logits twin of a lethe Method: the same config, prepare() and loss()."""

    def __init__(self, method):
        self.method, self.config, self._state = method, method.config, {}
        if getattr(self.config, "retain_loss", "nll") != "nll":
            raise NotImplementedError("the twins implement the default retain loss (nll) only")

    def needs_retain(self):
        return self.method.needs_retain()

    def prepare(self, model, forget, retain):
        pass

    def retain(self, model, inputs):
        return mean_nll(model, inputs["retain"])


class GAFull(FullLogits):
    def loss(self, model, inputs, step, total_steps):
        return -mean_nll(model, inputs["forget"]), {}


class GradDiffFull(FullLogits):
    def loss(self, model, inputs, step, total_steps):
        c = self.config
        return -c.gamma * mean_nll(model, inputs["forget"]) + c.alpha * self.retain(model, inputs), {}


class NPOFull(FullLogits):
    @torch.no_grad()
    def prepare(self, model, forget, retain):
        was = model.training
        model.eval()
        self._state["ref_nll"] = torch.cat([batch_nll(model, b) for b in forget.batches(64)])
        model.train(was)

    def loss(self, model, inputs, step, total_steps):
        c, f = self.config, inputs["forget"]
        nll = batch_nll(model, f)
        ref = self._state["ref_nll"][f["index"]]
        loss = c.gamma * -(2.0 / c.beta) * F.logsigmoid(-c.beta * (ref - nll)).mean()
        return (loss + c.alpha * self.retain(model, inputs) if c.alpha > 0 else loss), {}


class SimNPOFull(FullLogits):
    def loss(self, model, inputs, step, total_steps):
        c, f = self.config, inputs["forget"]
        count = (f["labels"][..., 1:] != -100).sum(-1)
        loss = c.gamma * -(2.0 / c.beta) * F.logsigmoid(c.beta * batch_nll(model, f) / count - c.delta).mean()
        return (loss + c.alpha * self.retain(model, inputs) if c.alpha > 0 else loss), {}


class ShredFull(FullLogits):
    """The teacher's top-K from its full log_softmax (torch.topk), the demotion by lethe's op (it
    reads [B, T, K] only), and the student's KL from its full log_softmax."""

    @torch.no_grad()
    def prepare(self, model, forget, retain):
        from lethe.ops import demote_targets, select_forget_positions

        c = self.config
        if c.normalize != "full":
            raise NotImplementedError("the twin implements normalize='full' (SHRED's) only")
        was = model.training
        model.eval()
        targets = []
        for b in forget.batches(64):
            logp = F.log_softmax(model(**_hf(b, labels=False)).logits[:, :-1].float(), dim=-1)
            labels = b["labels"][:, 1:]
            valid = labels != -100
            lp, ids = torch.topk(logp, c.k, dim=-1)
            label_lp = torch.gather(logp, -1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
            del logp
            fgt = select_forget_positions(label_lp, labels, c.fraction, c.skip)
            probs = demote_targets(ids, lp, labels, fgt, c.variant, c.top_p)
            targets += [(ids[r][valid[r]], probs[r][valid[r]]) for r in range(labels.shape[0])]
        model.train(was)
        self._state["targets"] = targets

    def loss(self, model, inputs, step, total_steps):
        f = inputs["forget"]
        labels = f["labels"][:, 1:]
        valid = labels != -100
        rows = f["index"].tolist()
        t = self._state["targets"]
        ids = torch.zeros(*labels.shape, self.config.k, dtype=torch.long)
        q = torch.zeros(*labels.shape, self.config.k)
        ids[valid] = torch.cat([t[i][0] for i in rows])
        q[valid] = torch.cat([t[i][1] for i in rows])
        logp = F.log_softmax(model(**_hf(f, labels=False)).logits[:, :-1], dim=-1)
        kl = (torch.xlogy(q, q) - q * torch.gather(logp, -1, ids)).sum(-1)
        return (kl * valid).sum() / valid.sum(), {}


class _HFLoss(nn.Module):
    """The model's own `.loss` as a module, for functional_call (its attribute is named `model`,
    as SAF's quantised-weight names expect)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return mean_nll(self.model, batch)


class SAFFull(FullLogits):
    def loss(self, model, inputs, step, total_steps):
        c, f = self.config, inputs["forget"]
        a = c.alpha_at(step, total_steps)
        loss = -mean_nll(model, f) + c.lam * mean_nll(model, inputs["retain"])
        if a > 0:
            # the same quantised weights as lethe's SAF (lethe.fake_quantize, straight-through)
            loss = loss - a * torch.func.functional_call(_HFLoss(model), self.method._quantised(model), (f,),
                                                         strict=False)
        return loss, {}


FULL = {"ga": GAFull, "graddiff": GradDiffFull, "npo": NPOFull, "simnpo": SimNPOFull, "shred": ShredFull,
        "saf": SAFFull}


def make_impl(name: str, impl: str):
    m = lm.get(name)()
    return m if impl == "fused" else FULL[name](m)


# ------------------------------------------------------------------------------------------------
# one training step, as lethe.methods.unlearn takes it
# ------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, name: str, impl: str, setting: str):
        vocab, self.batch, lo, hi = SETTINGS[setting][:4]
        self.model = make_model(vocab)
        self.model.train()
        self.m = make_impl(name, impl)
        # two batches an epoch (every epoch shuffles anew, so batches vary in shape step by step)
        self.forget, self.retain = make_data(vocab, lo, hi, 2 * self.batch)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0)
        # AdamW's state exists before the first step, as it does from the second step of a run on:
        # a zero gradient leaves the weights as they are
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def inputs(self, steps: int):
        return step_inputs(self.forget, self.retain, self.batch, steps, self.m.needs_retain())

    def prepare(self):
        self.m.prepare(self.model, self.forget, self.retain if self.m.needs_retain() else None)
        self.model.train()

    def step(self, inputs, s: int) -> float:
        loss, _ = self.m.loss(self.model, inputs, STEP0 + s, TOTAL_STEPS)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile"))


def measure_peak(name: str, setting: str, impl: str) -> dict:
    """In a fresh process (model, AdamW state, data and the method's prepared state in place):
    a first step, then the same step again, whose peak is taken: VmHWM minus the RSS before it, plus
    what lethe's CPU output cache holds between the steps (buffers the second step reuses instead of
    allocating them; the full-logits twin's large tensors go back to the system when freed). The
    first step's peak in the fresh process is kept too: it also counts the process's one-time costs
    (MKL's buffers, code pages, the allocator's arenas), alike for both implementations."""
    from lethe import _lib

    r = Runner(name, impl, setting)
    inputs = r.inputs(1)
    r.prepare()
    _lib.empty_cpu_cache()  # (prepare's buffers: a one-time pass, not the step's)
    base0 = rss()
    reset_peak_rss()
    r.step(inputs[0], 0)
    first = peak_rss() - base0
    held = _lib.cpu_cache_info().get("cached_bytes", 0)
    base, base_file = rss(), _rss_file()
    reset_peak_rss()
    r.step(inputs[0], 0)
    step = peak_rss() - base
    return {"peak_MiB": (step + held) / 2**20, "transient_MiB": step / 2**20, "lethe_cache_MiB": held / 2**20,
            "first_step_MiB": first / 2**20, "retained_after_first_MiB": (base - base0) / 2**20,
            "file_MiB_second_step": (_rss_file() - base_file) / 2**20}


def _memory_worker(jobs: list) -> None:
    """Forks one child per job (a process that has imported everything and computed nothing, so
    each child starts clean), prints one JSON line per job."""
    import lethe.eval.benchmark  # noqa: F401  (and transformers' Llama, through _new_model's first use)
    from transformers import LlamaForCausalLM  # noqa: F401

    for job in jobs:
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rd)
            code = 0
            try:
                out = {"ok": True, **measure_peak(*job)}
            except BaseException as e:  # noqa: BLE001
                out, code = {"ok": False, "error": f"{type(e).__name__}: {e}"}, 1
            with os.fdopen(wr, "w") as f:
                f.write(json.dumps(out))
            os._exit(code)
        os.close(wr)
        with os.fdopen(rd) as f:
            text = f.read()
        os.waitpid(pid, 0)
        print(json.dumps({"job": job, **(json.loads(text) if text else {"ok": False, "error": "no output"})}),
              flush=True)


# The memory processes' allocator: every block of 128 KiB or more is mmap'ed and goes back to the
# system when freed (glibc's default raises that threshold to the largest block freed so far, up to
# 32 MiB, and keeps such blocks in its heap, where a second step reuses them without RSS growing), so
# that a step's RSS peak is the memory it has live at once. Only the memory processes: the timed
# steps run under the default allocator.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peaks(cases) -> dict:
    """{setting: {method: {impl: measure_peak's dict}}} for the (method, setting) cases."""
    jobs = [(n, s, i) for n, s in cases for i in ("fused", "full")]
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(jobs)],
                       capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            if not d.pop("ok"):
                raise RuntimeError(f"peak of {d['job']}: {d['error']}")
            n, s, i = d.pop("job")
            out.setdefault(s, {}).setdefault(n, {})[i] = d
    missing = [j for j in jobs if j[2] not in out.get(j[1], {}).get(j[0], {})]
    if missing:
        raise RuntimeError(f"no peak for {missing}: {r.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------------------------
# time, and the same losses
# ------------------------------------------------------------------------------------------------

def times(name: str, setting: str, rounds: int) -> dict:
    """Both implementations in one process, prepared on the same initial weights; the warm-up step's
    losses (same weights, same batch) must agree. Then `rounds` steps each, interleaved."""
    from lethe import _lib

    _lib.empty_cpu_cache()  # (the cache is the process's: what earlier methods left in it is not this one's)
    runners = {i: Runner(name, i, setting) for i in ("fused", "full")}
    inputs = runners["fused"].inputs(rounds + 1)
    for r in runners.values():
        r.prepare()
    first = {i: r.step(inputs[0], 0) for i, r in runners.items()}
    if abs(first["fused"] - first["full"]) > 1e-4 * max(1.0, abs(first["full"])):
        raise AssertionError(f"{name}/{setting}: the fused loss {first['fused']} is not the full-logits "
                             f"twin's {first['full']}")
    ts = {i: [] for i in runners}
    for k in range(rounds):
        for i in ("fused", "full") if k % 2 == 0 else ("full", "fused"):
            s = time.perf_counter()
            runners[i].step(inputs[k + 1], k + 1)
            ts[i].append(time.perf_counter() - s)
    c = _lib.cpu_cache_info()
    return {"fused_s": statistics.median(ts["fused"]), "full_s": statistics.median(ts["full"]),
            "first_loss": first, "rounds": rounds,
            # lethe's CPU output cache after rounds + 1 steps on batches of varying shape
            "lethe_cache_MiB_after": c.get("cached_bytes", 0) / 2**20, "lethe_cache_buffers": c.get("cached_buffers", 0)}


def same_gradients(name: str, setting: str = "V2048") -> float:
    """The largest relative difference between the fused and the twin's gradients (same weights,
    same batch, no optimiser step)."""
    grads = {}
    for i in ("fused", "full"):
        r = Runner(name, i, setting)
        inputs = r.inputs(1)[0]
        r.prepare()
        r.opt.zero_grad(set_to_none=True)
        r.m.loss(r.model, inputs, STEP0, TOTAL_STEPS)[0].backward()
        grads[i] = [p.grad.clone() for p in r.params]
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
               for a, b in zip(grads["fused"], grads["full"]))


# ------------------------------------------------------------------------------------------------
# the run, the report, the plot
# ------------------------------------------------------------------------------------------------

def _methods(setting: str) -> list:
    return [n for n in lm.available() if SETTINGS[setting][4] is None or n in SETTINGS[setting][4]]


def run(quick: bool = False, rounds: int = 3, plot: bool = True) -> dict:
    """The whole benchmark; quick: V = 2048 only, one timed round, nothing written."""
    settings = ["V2048"] if quick else list(SETTINGS)
    if quick:
        rounds = 1
    t0 = time.perf_counter()
    mem = peaks([(n, s) for s in settings for n in _methods(s)])
    t_mem = time.perf_counter() - t0
    res = {}
    for s in settings:
        for n in _methods(s):
            t = times(n, s, SETTINGS[s][5] or rounds)
            p = mem[s][n]
            res.setdefault(s, {})[n] = {
                **t, "time_ratio_full_over_fused": t["full_s"] / t["fused_s"],
                "peak_MiB": {"fused": p["fused"]["peak_MiB"], "full": p["full"]["peak_MiB"]},
                "peak_ratio_fused_over_full": p["fused"]["peak_MiB"] / p["full"]["peak_MiB"],
                "peak_detail": p}
            print(f"{s} {n}: {t['fused_s'] * 1e3:.0f} ms fused, {t['full_s'] * 1e3:.0f} ms full; peak "
                  f"{p['fused']['peak_MiB']:.0f} vs {p['full']['peak_MiB']:.0f} MiB", flush=True)
    grad_err = {n: same_gradients(n) for n in lm.available()}
    claim = {s: {n: res[s][n]["peak_ratio_fused_over_full"] <= 1 / 3 for n in CLAIM}
             for s in res if SETTINGS[s][0] == 32000}
    payload = {"settings": {k: dict(zip(("vocab", "batch", "min_len", "max_len", "methods", "rounds"), v))
                            for k, v in SETTINGS.items()},
               "model": "lethe.eval.benchmark TrainConfig (hidden 128, 2 layers, 4 heads, MLP 256), untrained",
               "step": "method loss, zero_grad, backward, clip_grad_norm_(1.0), AdamW(lr 1e-3)",
               "peak": "second of two identical steps in a fresh process: VmHWM - RSS before it + lethe's CPU cache "
                       f"held between them; allocator {MALLOC_ENV}",
               "rounds": rounds, "quick": quick, "memory_phase_s": t_mem, "total_s": time.perf_counter() - t0,
               "results": res, "max_rel_grad_diff_V2048": grad_err, "claim_fused_peak_le_third": claim}
    path = "(not written: --quick)" if quick else write_results("methods_cpu", payload)
    print(table(res))
    print("gradients, fused vs full (V = 2048, largest relative difference): "
          + ", ".join(f"{n} {e:.1e}" for n, e in grad_err.items()))
    print(f"claim (fused peak <= 1/3 of full at V = 32000): {claim}; written to {path} "
          f"({payload['total_s']:.0f} s)")
    if plot and not quick:
        make_plot(res, os.path.join(BENCH_DIR, "methods_memory.png"))
    return payload


def _label(s: str) -> str:
    v, b, lo, hi = SETTINGS[s][:4]
    return f"V = {v}, batch {b} x {lo}-{hi} tokens"


def table(res: dict) -> str:
    lines = ["| setting | method | fused step | full-logits step | full / fused time | fused peak | full-logits peak "
             "| fused / full peak | lethe cache after the timed steps |", "|---|---|---|---|---|---|---|---|---|"]
    for s, per in res.items():
        for n, r in per.items():
            lines.append(f"| {_label(s)} | {n} | {r['fused_s'] * 1e3:.0f} ms | {r['full_s'] * 1e3:.0f} ms | "
                         f"{r['time_ratio_full_over_fused']:.2f}x | {r['peak_MiB']['fused']:.0f} MiB | "
                         f"{r['peak_MiB']['full']:.0f} MiB | {r['peak_ratio_fused_over_full']:.2f} | "
                         f"{r['lethe_cache_MiB_after']:.0f} MiB ({r['lethe_cache_buffers']} buffers) |")
    return "\n".join(lines)


def make_plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res), figsize=(4.8 * len(res), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [len(per) for per in res.values()]})
    for ax, (s, per) in zip(axes[0], res.items()):
        names = list(per)
        x = list(range(len(names)))
        fu = [per[n]["peak_MiB"]["fused"] for n in names]
        fl = [per[n]["peak_MiB"]["full"] for n in names]
        ax.bar([i - 0.2 for i in x], fu, 0.4, label="lethe (fused)")
        ax.bar([i + 0.2 for i in x], fl, 0.4, label="full logits")
        for i, (a, b) in enumerate(zip(fu, fl)):
            ax.text(i, max(a, b) * 1.02, f"{a / b:.2f}", ha="center", fontsize=8)
        ax.set_xticks(x, names)
        ax.set_ylim(0, max(fu + fl) * 1.25)
        ax.set_ylabel("peak memory of one step (MiB)")
        ax.set_title(_label(s), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle("one unlearning step per method, CPU fp32 (above the bars: fused / full peak)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def test_methods():
    """make bench: the full run (results/methods_cpu.json, methods_memory.png)."""
    payload = run()
    for s in payload["results"].values():
        for n, r in s.items():
            assert r["peak_MiB"]["fused"] > 0 and r["peak_MiB"]["full"] > 0, n
    assert max(payload["max_rel_grad_diff_V2048"].values()) < 1e-3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: one timed round, nothing written")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--memory-worker", metavar="JOBS", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_worker:
        _memory_worker([tuple(j) for j in json.loads(a.memory_worker)])
        return
    run(quick=a.quick, rounds=a.rounds, plot=not a.no_plot)


if __name__ == "__main__":
    main()
