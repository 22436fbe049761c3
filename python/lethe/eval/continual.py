"""The continual evaluation (FIT, 2026): after every `every` requests of a stream, the forget score
F over everything requested so far and the retain score R, each Score = 100 * cbrt(Prob *
ROUGE-L * Acc), and against the reference the Forget Degree F.D. = max(0, 1 - |F/F_ref - 1|) and
the Retain Utility R.U. = max(0, 1 - |R/R_ref - 1|).

Scoring, without the slips of the authors' code: Acc is the forget set's or retain set's own
accuracy (never the other's), every example keeps its own question with its own answer, and
ROUGE-L scores the greedy continuation only, never the prompt with it. Prob is the length-
normalised answer probability, ROUGE-L the F-measure of the greedy answer (stemmed), Acc the
teacher-forced token accuracy of the answer (the argmax given the true prefix; lethe.ops.token_stats
gives the argmax with the log-probabilities in one fused pass): the authors' code's three (github.com/
XiaoyuXU1/FIT, Evaluations/evaluator.py), on question/answer pairs.

The authors' reference interpolates both F and R linearly between the fine-tuned model's and the
retain model's scores on the whole split; lethe measures F_ref instead, as follows.

The reference. After k of N requests the ideal model is the one retrained without the first k
requests' facts. Its forget score on those facts is, to the noise floor, the score of the model
retrained without *all* N requests (neither saw them; the people of the corpus are independent), so
F_ref(k) is that model's score on the set requested so far, measured at every checkpoint (no
interpolation). Its retain score lies between the target's (k = 0) and the all-requests
retrained model's (k = N); R_ref(k) is their linear interpolation in k. That serves because both
end points memorise the retain facts (their R differ by the `reference_gap` the report shows, a
point or two on the built-in benchmark), so no retrained model at an inner checkpoint could move
R_ref by more than that gap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from lethe.eval import metrics as M
from lethe.eval.data import Example

__all__ = ["ContinualEvaluator", "set_score", "builtin_continual", "plot_curves", "run_continual", "continual_runner",
           "stream_attacks",
           "BASELINE_TRAIN"]


def set_score(scorer, examples: Sequence[Example]) -> dict:
    """FIT's score of one model (a Scorer) on `examples`: prob, rouge, acc (set means) and score."""
    prompts = [e.prompt for e in examples]
    answers = [e.answer for e in examples]
    lp, _, _, mask, hit = scorer.token_stats(prompts, answers, hits=True)
    gens = scorer.generate(prompts, int(mask.sum(1).max()) + 2)
    prob = float(np.mean(M.answer_probability(lp, mask)))
    rouge = float(np.mean(M.rouge_l_fmeasure(gens, answers)))
    acc = float(np.mean(M.token_accuracy(hit, mask)))
    return {"prob": prob, "rouge": rouge, "acc": acc, "score": M.fit_score(prob, rouge, acc),
            "rouge_recall": float(np.mean(M.rouge_l_recall(gens, answers))),
            "exact": float(np.mean(M.exact_match(gens, answers)))}


def _unique(examples):
    seen, out = set(), []
    for e in examples:
        if (e.prompt, e.answer) not in seen:
            seen.add((e.prompt, e.answer))
            out.append(e)
    return out


class ContinualEvaluator:
    """Scores models along a stream of `requests` (lethe.eval.stream.Request).

    retain: the retain examples (never requested). forget_set(k): the examples F is measured on
    after k requests (default: the unique chunks of the first k requests; the built-in stream uses
    its facts' canonical question/answer pairs, `builtin_continual`). target / retrained: the model
    before any request and the model retrained without all of them, for the reference (without
    them, no F.D. and R.U.)."""

    def __init__(self, requests, retain: Sequence[Example], tokenizer, *, target=None, retrained=None,
                 forget_set: Optional[Callable[[int], list]] = None, batch_size: int = 256, backend=None):
        from lethe.eval.evaluator import Scorer

        if not requests:
            raise ValueError("requests: expected a non-empty list of requests")
        if not retain:
            raise ValueError("retain: expected a non-empty list of examples")
        if (target is None) != (retrained is None):
            raise ValueError("target and retrained: give both (the reference's two end points) or neither")
        self.requests, self.retain, self.tok = list(requests), list(retain), tokenizer
        self.batch_size, self.backend = batch_size, backend
        self.forget_set = forget_set or (lambda k: _unique([c for q in self.requests[:k] for c in q.chunks]))
        self._Scorer, self._tokens = Scorer, {}
        self.target, self.retrained = target, retrained
        self._ref: dict = {}

    def _score(self, model, examples):
        return set_score(self._Scorer(model, self.tok, self.batch_size, self.backend, cache=self._tokens), examples)

    def reference(self, k: int) -> Optional[dict]:
        """F_ref(k) and R_ref(k) (see the module docstring), or None without reference models."""
        if self.target is None:
            return None
        if "R_target" not in self._ref:
            self._ref["R_target"] = self._score(self.target, self.retain)["score"]
            self._ref["R_retrained"] = self._score(self.retrained, self.retain)["score"]
        if k not in self._ref:
            self._ref[k] = self._score(self.retrained, self.forget_set(k))["score"] if k else None
        n = len(self.requests)
        rt, rr = self._ref["R_target"], self._ref["R_retrained"]
        return {"F_ref": self._ref[k], "R_ref": rt + (k / n) * (rr - rt), "R_target": rt, "R_retrained": rr,
                "reference_gap": rr - rt}

    def checkpoint(self, model, k: int) -> dict:
        """The scores of `model` after the first k requests (k >= 1)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.requests):
            raise ValueError(f"k must be an int in [1, {len(self.requests)}], got {k!r}")
        f = self._score(model, self.forget_set(k))
        r = self._score(model, self.retain)
        out = {"requests": k, "forget": f, "retain": r, "F": f["score"], "R": r["score"]}
        ref = self.reference(k)
        if ref is not None:
            out.update(F_ref=ref["F_ref"], R_ref=ref["R_ref"], reference_gap=ref["reference_gap"],
                       forget_degree=M.forget_degree(f["score"], ref["F_ref"]),
                       retain_utility=M.retain_utility(r["score"], ref["R_ref"]))
        return out


def builtin_continual(bench, requests, *, retain_size: int = 200, retrained=None, target=None,
                      batch_size: int = 256, backend=None) -> ContinualEvaluator:
    """The evaluator of the built-in stream: F over the canonical question/answer pairs of every
    fact requested so far, R over an evenly spaced subset of `retain_size` facts of the people never
    requested and of the world."""
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import _subset

    corpus = bench.corpus
    canon = {(qa.subject, qa.attribute): qa for p in corpus.people for qa in corpus.person_facts[p]}
    asked = {f for q in requests for f in q.facts}
    people = {s for s, _ in asked}
    retain = examples_from_qas([qa for p in corpus.people if p not in people for qa in corpus.person_facts[p]])
    world = examples_from_qas(corpus.world)
    retain = _subset(retain, retain_size, "retain_size") + _subset(world, max(1, retain_size // 2), "retain_size")

    def forget_set(k):
        seen, out = set(), []
        for q in requests[:k]:
            for f in q.facts:
                if f not in seen:
                    seen.add(f)
                    out.append(canon[f])
        return examples_from_qas(out)

    return ContinualEvaluator(requests, retain, bench.tokenizer(), target=target, retrained=retrained,
                              forget_set=forget_set, batch_size=batch_size, backend=backend)


def stream_attacks(bench, requests, model, retrained, retain_size: int = 200, progress: bool = False) -> dict:
    """The quantisation and relearning attacks after a stream (lethe.eval.Evaluator): the forget set
    is every fact the requests asked for, the reference the all-requests retrained model. Returns
    the forget exact match natively, under paper-int4, the worst 4-bit (Q-INT4) and after relearning
    on half of each requested person's facts, with the retain utility and forget quality."""
    from lethe.eval.data import examples_from_qas
    from lethe.eval.evaluator import EvalData, Evaluator

    corpus = bench.corpus
    asked = {f for q in requests for f in q.facts}
    people = {s for s, _ in asked}
    forget = [qa for p in corpus.people for qa in corpus.person_facts[p] if (qa.subject, qa.attribute) in asked]
    retain = [qa for p in corpus.people if p not in people for qa in corpus.person_facts[p]]
    data = EvalData(examples_from_qas(forget), examples_from_qas(retain), examples_from_qas(corpus.holdout),
                    examples_from_qas(corpus.world))
    ev = Evaluator(data, bench.tokenizer(), retrained, retain_size=retain_size, world_size=retain_size,
                   progress=progress)
    r = ev.evaluate(model, attacks=("quant", "relearn")).results
    return {"forget_exact": r["native"]["forget"]["exact"], "forget_prob": r["native"]["forget"]["prob"],
            "model_utility": r["native"]["model_utility"], "forget_quality": r["native"].get("forget_quality"),
            "exact_paper_int4": r["quant"]["presets"]["paper-int4"]["forget"]["exact"], "q_int4": r["quant"]["q_int4"],
            "exact_relearnt": r["relearn"]["after"]["exact"], "exact_before_relearning": r["relearn"]["before"]["exact"]}


def plot_curves(curves: dict, path) -> Path:
    """F.D. and R.U. against the number of requests, one line per method: curves[name] is a list
    of checkpoint dicts (ContinualEvaluator.checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lethe.eval.report import _savefig

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "forget_degree", "Forget Degree"), (axes[1], "retain_utility", "Retain Utility")):
        for name, pts in curves.items():
            pts = [p for p in pts if key in p]
            if pts:
                ax.plot([p["requests"] for p in pts], [p[key] for p in pts], marker="o", label=name)
        ax.set_xlabel("requests handled")
        ax.set_ylabel(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title} (1 = the retrained reference)")
    axes[1].legend(fontsize=8)
    p = _savefig(fig, Path(path))
    plt.close(fig)
    return p


# the continual runs of `lethe eval --continual` and `lethe demo` (lethe's settings on the built-in
# benchmark: a baseline gets the same few AdamW steps per request; RESULTS.md, FIT)
BASELINE_TRAIN = {"steps": 4, "lr": 3e-4, "batch_size": 11}


def continual_runner(name: str, config=None):
    """FIT (or another continual method) by name, else the gradient method `name` request by
    request (lethe.methods.Sequential with BASELINE_TRAIN)."""
    import lethe.methods as lm

    cls = lm.get(name)
    if getattr(cls, "continual", False):
        return lm.make_method(name, config)
    return lm.Sequential(name, config, **BASELINE_TRAIN)


def run_continual(out, methods=("fit", "npo", "graddiff"), *, bench=None, stream_config=None, every: int = 5,
                  cache=None, retain_size: int = 200, attacks: bool = True, progress: bool = True, echo=print) -> dict:
    """Runs each method over the built-in stream from the target model, scoring every `every`
    requests, then (attacks=True) the quantisation and relearning attacks on the final model
    (stream_attacks); writes out/<method>.json (the checkpoints' scores, the attacks and every request's log entry),
    out/continual.json and out/continual.png. Resumable: a method's run checkpoints after each
    request under out/<method>/, its scores after each checkpoint, and a finished method is kept."""
    from transformers import AutoModelForCausalLM

    from lethe.eval.benchmark import build_benchmark, build_stream_reference
    from lethe.eval.data import examples_from_qas
    from lethe.eval.report import _write
    from lethe.eval.stream import make_stream, save_requests

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    for n in methods:
        continual_runner(n)  # an unknown name fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench = bench or build_benchmark(splits=(), cache=cache, progress=progress, retain_seeds=0)
    stream = make_stream(bench.corpus, stream_config)
    save_requests(stream, out / "requests.jsonl")
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    target = load(bench.target)
    ev = builtin_continual(bench, stream, target=target, retrained=load(build_stream_reference(bench, stream, progress)),
                           retain_size=retain_size)
    asked = {s for q in stream for s in q.subjects}
    retain = examples_from_qas([qa for p in bench.corpus.people if p not in asked for qa in bench.corpus.person_facts[p]])
    from tqdm.auto import tqdm

    curves, attacked = {}, {}
    for name in methods:
        path = out / f"{name}.json"
        done = json.loads(path.read_text()) if path.exists() else {"checkpoints": []}
        if done.get("complete"):
            curves[name], attacked[name] = done["checkpoints"], done.get("attacks")
            echo(f"  {name}: done before, kept")
            continue
        model = load(bench.target)
        run = continual_runner(name).bind(model, bench.tokenizer(), retain=retain, checkpoint_dir=out / name)
        pts = done["checkpoints"]
        bar = tqdm(total=len(stream), desc=f"{name}: requests", disable=not progress, leave=False, dynamic_ncols=True)
        for i, q in enumerate(stream):
            run.handle(q)
            bar.update(1)
            k = i + 1
            if (k % every == 0 or k == len(stream)) and not any(p["requests"] == k for p in pts):
                pts.append(ev.checkpoint(model, k))
                _write(path, json.dumps({"checkpoints": pts, "requests": run.requests_log, "complete": False},
                                        indent=1).encode())
        bar.close()
        curves[name] = pts
        attacked[name] = stream_attacks(bench, stream, model, ev.retrained, retain_size) if attacks else None
        _write(path, json.dumps({"checkpoints": pts, "requests": run.requests_log, "attacks": attacked[name],
                                 "complete": True}, indent=1).encode())
        last = pts[-1]
        echo(f"  {name}: after {last['requests']} requests F.D. {last['forget_degree']:.3f}, R.U. "
             f"{last['retain_utility']:.3f} (F {last['F']:.1f} vs {last['F_ref']:.1f}, R {last['R']:.1f} vs "
             f"{last['R_ref']:.1f})")
    summary = {"requests": len(stream), "every": every, "curves": curves, "attacks": attacked,
               "mean": {n: {k: float(np.mean([p[k] for p in c])) for k in ("forget_degree", "retain_utility")}
                        for n, c in curves.items()}}
    _write(out / "continual.json", json.dumps(summary, indent=1).encode())
    summary["plot"] = str(plot_curves(curves, out / "continual.png"))
    return summary
