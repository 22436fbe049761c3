"""Evaluating a causal LM: per-split metrics, forget quality, model utility, membership inference,
and the quantisation and relearning attacks.

Every per-token statistic comes from the fused op `lethe.ops.token_stats` (through
`lethe.integrations.hf.token_stats`): no `[B, T, V]` log-softmax is ever materialised. Greedy
answers come from the model's `generate` (which keeps only the last position's logits).

What is measured (TOFU, Maini et al. 2024; MUSE, Shi et al. 2024; DurableUn, Khan & Sohel 2026):
- per set (forget, retain, world): the length-normalised answer probability `prob`, ROUGE-L recall
  `rouge` and exact match `exact` of the greedy answer, the truth ratio score `truth_ratio`;
- `forget_quality`: the KS-test p-value between the model's and the reference's truth ratios on
  the forget set; `model_utility`: the harmonic mean of the retain and world metrics;
- membership inference, forget (members of the target's training data) vs holdout (never trained
  on): the AUC of the LOSS, zlib, Min-K% and Min-K%++ scores, and PrivLeak against the reference;
- attacks: every metric again under each quantisation preset (with Q-INT4 and the (epsilon, P)
  durability certificate), and after a short fine-tune on part of the forget set (relearning).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch

from lethe.eval import metrics as M
from lethe.eval.data import Example, pad_batch

__all__ = ["EvalData", "Scorer", "Evaluator", "QUANT_PRESETS", "RelearnConfig", "MIA_ATTACKS", "builtin_data"]

QUANT_PRESETS = ("int8", "paper-int4", "int4-g128", "nf4-b64")
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


@dataclasses.dataclass
class EvalData:
    """The sets an evaluation runs on. `world` is optional (utility then uses retain only)."""

    forget: list[Example]
    retain: list[Example]
    holdout: list[Example]
    world: Optional[list[Example]] = None

    def __post_init__(self):
        for name in ("forget", "retain", "holdout"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or not v:
                raise ValueError(f"{name}: expected a non-empty list of examples, got {type(v).__name__} "
                                 f"of length {len(v) if hasattr(v, '__len__') else '?'}")
        if self.world is not None and not self.world:
            raise ValueError("world: expected a non-empty list of examples or None")

    def sets(self):
        out = {"forget": self.forget, "retain": self.retain}
        if self.world is not None:
            out["world"] = self.world
        return out


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """The relearning attack (defaults are lethe's, for the built-in benchmark's tiny models):
    fine-tune a copy of the model with AdamW for `steps` steps of `batch_size` examples at `lr` on
    the first `fraction` of each forget subject's examples (of the forget examples, when they name
    no subject), then measure the forget metrics on the held-back rest."""

    steps: int = 20
    lr: float = 1e-3
    batch_size: int = 16
    fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"RelearnConfig: steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"RelearnConfig: batch_size must be a positive int, got {self.batch_size!r}")
        if not (self.lr > 0):
            raise ValueError(f"RelearnConfig: lr must be > 0, got {self.lr!r}")
        if not (0 < self.fraction < 1):
            raise ValueError(f"RelearnConfig: fraction must be in (0, 1), got {self.fraction!r}")


class Scorer:
    """Per-token statistics and greedy answers of one model on lists of examples."""

    def __init__(self, model, tokenizer, batch_size: int = 256, backend: Optional[str] = None,
                 cache: Optional[dict] = None):
        self.model, self.tok, self.batch_size, self.backend = model, tokenizer, batch_size, backend
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self._cache: dict = {} if cache is None else cache  # text -> token ids (shareable across models)

    def _ids(self, text: str) -> list[int]:
        key = ("t", text)
        if key not in self._cache:
            self._cache[key] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[key]

    def encode(self, prompt: str, answer: str) -> tuple[list[int], int]:
        p = ([self.bos] if self.bos is not None else []) + self._ids(prompt)
        a = self._ids(" " + answer) + ([self.eos] if self.eos is not None else [])
        return p + a, len(p)

    def _device(self):
        return next(self.model.parameters()).device

    def _batches(self, lengths):
        """Index batches with similar lengths together, the model in eval mode meanwhile."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        was = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                yield order[b:b + self.batch_size]
        finally:
            self.model.train(was)

    @torch.no_grad()
    def token_stats(self, prompts: Sequence[str], answers: Sequence[str], hits: bool = False):
        """Per-token statistics of the answer tokens given the prompt: (label log-prob, mu, var,
        mask), each [n, L] (L the longest answer), on the CPU; with hits=True also a fifth,
        argmax == label (teacher-forced greedy hits)."""
        from lethe.integrations import hf
        from lethe.ops import token_stats

        enc = [self.encode(p, a) for p, a in zip(prompts, answers)]
        L = max(len(ids) - s for ids, s in enc)
        lp = torch.zeros(len(enc), L)
        mu, var = torch.zeros(len(enc), L), torch.zeros(len(enc), L)
        mask = torch.zeros(len(enc), L, dtype=torch.bool)
        hit = torch.zeros(len(enc), L, dtype=torch.bool)
        dev = self._device()
        for rows in self._batches([len(x) for x, _ in enc]):
            ids, labels, att = pad_batch([enc[i] for i in rows], self.pad)
            ids, labels, att = ids.to(dev), labels.to(dev), att.to(dev)
            # the statistics of the answer positions only (the LM head runs on those rows)
            hidden, w, bias = hf.last_hidden_and_head(self.model, ids, att)
            lab = hf.shifted_labels(ids, att, labels)
            keep = lab != -100
            st = token_stats(hidden[:, :-1][keep], w, lab[keep], bias, backend=self.backend)
            counts = keep.sum(1).tolist()
            for r, part in enumerate(zip(*(t.cpu().split(counts) for t in
                                          (st.label_logprob, st.mean_logprob, st.var_logprob,
                                           st.argmax == lab[keep])))):
                i, n = rows[r], counts[r]
                lp[i, :n], mu[i, :n], var[i, :n], hit[i, :n] = part
                mask[i, :n] = True
        return (lp, mu, var, mask, hit) if hits else (lp, mu, var, mask)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers (left-padded batches), decoded without special tokens and stripped."""
        out = [None] * len(prompts)
        enc = [([self.bos] if self.bos is not None else []) + self._ids(p) for p in prompts]
        dev = self._device()
        for rows in self._batches([len(x) for x in enc]):
            T = max(len(enc[i]) for i in rows)
            ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
            att = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, T - len(enc[i]):] = torch.tensor(enc[i])
                att[r, T - len(enc[i]):] = 1
            gen = self.model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad,
                                      eos_token_id=self.eos)
            for r, i in enumerate(rows):
                out[i] = self.tok.decode(gen[r, T:], skip_special_tokens=True).strip()
        return out


def _set_metrics(sc: Scorer, exs: list[Example], generate: bool = True, truth: bool = True) -> dict:
    """prob, rouge, exact, truth ratios (raw and score) and the MIA scores' inputs of one set
    (generate=False: no greedy answers; truth=False: no truth ratios, as the holdout set needs)."""
    prompts = [e.prompt for e in exs]
    answers = [e.answer for e in exs]
    lp, mu, var, mask = sc.token_stats(prompts, answers)
    res = {"prob": float(np.mean(M.answer_probability(lp, mask))), "_lp": lp, "_mu": mu, "_var": var,
           "_mask": mask}
    if generate:
        n_new = int(mask.sum(1).max()) + 2
        gens = sc.generate(prompts, n_new)
        res["rouge"] = float(np.mean(M.rouge_l_recall(gens, answers)))
        res["exact"] = float(np.mean(M.exact_match(gens, answers)))
        res["_generations"] = gens
    with_tr = [i for i, e in enumerate(exs) if e.paraphrased is not None and e.perturbed] if truth else []
    if with_tr:
        m = min(len(exs[i].perturbed) for i in with_tr)
        para_lp, _, _, para_mask = sc.token_stats([prompts[i] for i in with_tr], [exs[i].paraphrased for i in with_tr])
        pert_p = [prompts[i] for i in with_tr for _ in range(m)]
        pert_a = [exs[i].perturbed[j] for i in with_tr for j in range(m)]
        pert_lp, _, _, pert_mask = sc.token_stats(pert_p, pert_a)
        para = M.mean_logprob(para_lp, para_mask)
        pert = np.asarray(M.mean_logprob(pert_lp, pert_mask)).reshape(len(with_tr), m)
        ratios = M.truth_ratio(para, pert)
        res["truth_ratio"] = float(M.truth_ratio_score(ratios))
        res["_truth_ratios"] = np.asarray(ratios)
    return res


def _mia_scores(s: dict, texts: list[str]) -> dict:
    lp, mu, var, mask = s["_lp"], s["_mu"], s["_var"], s["_mask"]
    return {"loss": M.loss_score(lp, mask), "zlib": M.zlib_score(lp, mask, texts),
            "min_k": M.min_k_score(lp, mask), "min_k_plus_plus": M.min_k_plus_plus_score(lp, mu, var, mask)}


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


class Evaluator:
    """Evaluates models on one `EvalData` against one reference model (the exactly retrained
    model), whose statistics are computed once and reused for every evaluated model.

    `retain_size` / `world_size` cap the retain and world sets (a fixed, evenly spaced subset, as
    TOFU evaluates a subset of its retain set); `None` keeps all."""

    def __init__(self, data: EvalData, tokenizer, reference=None, *, retain_size: Optional[int] = 200,
                 world_size: Optional[int] = 200, batch_size: int = 256, backend: Optional[str] = None,
                 epsilon: float = 0.05, relearn: RelearnConfig = RelearnConfig(), progress: bool = False):
        if not isinstance(data, EvalData):
            raise TypeError(f"data must be an EvalData, got {type(data).__name__}")
        if not (0 <= epsilon <= 1):
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.data = EvalData(data.forget, _subset(data.retain, retain_size, "retain_size"), data.holdout,
                             None if data.world is None else _subset(data.world, world_size, "world_size"))
        self.tok, self.batch_size, self.backend = tokenizer, batch_size, backend
        self.epsilon, self.relearn_config, self.progress = epsilon, relearn, progress
        self.reference = reference
        self._ref = None
        self._tokens: dict = {}

    def _scorer(self, model) -> Scorer:
        return Scorer(model, self.tok, self.batch_size, self.backend, cache=self._tokens)

    def _reference_stats(self):
        if self._ref is None and self.reference is not None:
            sc = self._scorer(self.reference)
            forget = _set_metrics(sc, self.data.forget, generate=False)
            holdout = _set_metrics(sc, self.data.holdout, generate=False, truth=False)
            self._ref = {"truth_ratios": forget.get("_truth_ratios"), "mia": self._mia(forget, holdout)}
        return self._ref

    def _mia(self, forget: dict, holdout: dict) -> dict:
        f = _mia_scores(forget, [e.answer for e in self.data.forget])
        h = _mia_scores(holdout, [e.answer for e in self.data.holdout])
        return {a: float(M.auc(f[a], h[a])) for a in MIA_ATTACKS}

    def metrics(self, model) -> dict:
        """Every metric of `model` as it is now (no attack)."""
        sc = self._scorer(model)
        sets = {name: _set_metrics(sc, exs) for name, exs in self.data.sets().items()}
        holdout = _set_metrics(sc, self.data.holdout, generate=False, truth=False)
        out = {name: _public(s) for name, s in sets.items()}
        utility = [sets["retain"][k] for k in ("prob", "rouge", "truth_ratio") if k in sets["retain"]]
        if "world" in sets:
            utility += [sets["world"][k] for k in ("prob", "rouge", "truth_ratio") if k in sets["world"]]
        out["model_utility"] = float(M.model_utility(utility))
        out["mia_auc"] = self._mia(sets["forget"], holdout)
        ref = self._reference_stats()
        raw = {"forget_truth_ratios": sets["forget"].get("_truth_ratios")}
        if ref is not None:
            if ref["truth_ratios"] is not None and raw["forget_truth_ratios"] is not None:
                out["forget_quality"] = float(M.forget_quality(raw["forget_truth_ratios"], ref["truth_ratios"]))
            out["reference_mia_auc"] = dict(ref["mia"])
            out["priv_leak"] = {a: float(M.priv_leak(out["mia_auc"][a], ref["mia"][a])) for a in MIA_ATTACKS}
        out["_raw"] = raw
        return out

    def quant_attack(self, model, presets=QUANT_PRESETS, native: Optional[dict] = None, bar=None) -> dict:
        """Every metric under each preset of `lethe.quantized_weights`, Q-INT4 and the (epsilon, P)
        durability certificate over the forget set's exact match (forget accuracy), with P the
        native precision and every preset."""
        from lethe.nn.quant import quantized_weights

        per = {}
        for p in presets:
            with quantized_weights(model, p):
                per[p] = self.metrics(model)
            if bar is not None:
                bar.update(1)
        native = native if native is not None else self.metrics(model)
        scores = {"native": native["forget"]["exact"], **{p: per[p]["forget"]["exact"] for p in presets}}
        return {"presets": per, "q_int4": M.q_int4(scores),
                "certificate": M.durability_certificate(scores, self.epsilon)}

    def relearn_attack(self, model) -> dict:
        """Fine-tunes a copy of `model` on part of the forget set (RelearnConfig) and measures the
        forget metrics on the held-back rest, before and after."""
        cfg = self.relearn_config
        train, held = _split_forget(self.data.forget, cfg.fraction)
        before = _public(_set_metrics(self._scorer(model), held))
        attacked = copy.deepcopy(model)
        _finetune(attacked, self.tok, train, cfg, self.backend)
        after = _public(_set_metrics(self._scorer(attacked), held))
        del attacked
        return {"config": dataclasses.asdict(cfg), "train_examples": len(train), "held_out_examples": len(held),
                "before": before, "after": after,
                "recovery": {k: after[k] - before[k] for k in before if isinstance(before[k], float)}}

    def evaluate(self, model, name: str = "model", attacks: Sequence[str] = (), save_to=None,
                 meta: Optional[dict] = None):
        """A Report of every metric of `model`, and of each attack in `attacks` ("quant",
        "relearn"). With `save_to`, the report is saved there after each part (nothing computed is
        lost if a later part is interrupted). `meta` (model paths, the benchmark's config and seeds)
        is stored in the report as it is."""
        from lethe.eval.report import Report

        attacks = tuple(attacks)
        for a in attacks:
            if a not in ("quant", "relearn"):
                raise ValueError(f"attacks: each must be 'quant' or 'relearn', got {a!r}")
        from tqdm.auto import tqdm

        bar = tqdm(total=1 + (len(QUANT_PRESETS) if "quant" in attacks else 0) + ("relearn" in attacks),
                   desc=f"evaluating {name}", disable=not self.progress, leave=False, dynamic_ncols=True)
        res = self.metrics(model)
        raw = res.pop("_raw")
        ref = self._reference_stats()
        bar.update(1)
        report = Report(name=name, results={"native": res}, truth_ratios=raw["forget_truth_ratios"],
                        reference_truth_ratios=None if ref is None else ref["truth_ratios"],
                        config={"epsilon": self.epsilon, "relearn": dataclasses.asdict(self.relearn_config),
                                "attacks": list(attacks),
                                "sizes": {k: len(v) for k, v in self.data.sets().items()} |
                                {"holdout": len(self.data.holdout)}}, meta=dict(meta or {}))
        if save_to is not None:
            report.save(save_to)
        for a in attacks:
            if a == "quant":
                q = self.quant_attack(model, native=res, bar=bar)
                for m in q["presets"].values():
                    m.pop("_raw", None)
                report.results["quant"] = q
            else:
                report.results["relearn"] = self.relearn_attack(model)
                bar.update(1)
            if save_to is not None:
                report.save(save_to)
        bar.close()
        return report


def _subset(exs, size, what):
    if size is None or len(exs) <= size:
        return list(exs)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{what} must be a positive int or None, got {size!r}")
    step = len(exs) / size
    return [exs[int(i * step)] for i in range(size)]


def _split_forget(exs: list[Example], fraction: float):
    by = {}
    for e in exs:
        by.setdefault(e.subject, []).append(e)
    if len(by) == 1 and "" in by:  # no subjects: split the list itself
        k = max(1, min(len(exs) - 1, round(fraction * len(exs))))
        return exs[:k], exs[k:]
    train, held = [], []
    for group in by.values():
        k = max(1, min(len(group) - 1, round(fraction * len(group)))) if len(group) > 1 else 1
        train += group[:k]
        held += group[k:]
    if not held:
        raise ValueError("the relearning attack needs a forget subject with at least two examples")
    return train, held


def _finetune(model, tok, exs: list[Example], cfg: RelearnConfig, backend):
    """AdamW on the answer tokens' cross-entropy (benchmark.answer_loss: the fused LM-head op)."""
    from lethe.eval.benchmark import answer_loss

    sc = Scorer(model, tok)
    enc = [sc.encode(e.prompt, e.answer) for e in exs]
    dev = sc._device()
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    for step in range(cfg.steps):
        rows = torch.randint(len(enc), (min(cfg.batch_size, len(enc)),), generator=g).tolist()
        ids, labels, att = pad_batch([enc[i] for i in rows], sc.pad)
        loss = answer_loss(model, ids.to(dev), labels.to(dev), att.to(dev), backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def builtin_data(bench, split: str = "forget10") -> EvalData:
    """The built-in benchmark's sets for `split`: its forget people, the retain people, the holdout
    people and the world facts."""
    from lethe.eval.data import examples_from_qas

    c = bench.corpus
    return EvalData(examples_from_qas(c.forget(split)), examples_from_qas(c.retain(split)),
                    examples_from_qas(c.holdout), examples_from_qas(c.world))
