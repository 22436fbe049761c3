"""The evaluation on the built-in benchmark: it discriminates (target vs exactly retrained models),
the attacks, the report, and `lethe eval`'s error paths.

The benchmark is built once per test session, at a reduced size (bench_fixtures.EVAL_TEST), into
the session's cache folder (LETHE_TEST_CACHE, default a pytest temporary folder)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench_fixtures import EVAL_TEST  # noqa: F401  (the session fixtures bench and models: conftest.py)
from lethe.eval.evaluator import EvalData, Evaluator, RelearnConfig, builtin_data, _split_forget

@pytest.fixture(scope="session")
def evaluator(bench, models):
    return Evaluator(builtin_data(bench, "forget10"), bench.tokenizer(), models["retain"],
                     relearn=RelearnConfig(steps=10))


@pytest.fixture(scope="session")
def reports(evaluator, models):
    return {name: evaluator.evaluate(m, name=name) for name, m in models.items()}


def test_target_memorises_the_corpus(reports):
    r = reports["target"]["native"]
    print({s: r[s]["exact"] for s in ("forget", "retain", "world")})
    assert r["forget"]["exact"] >= 0.95 and r["retain"]["exact"] >= 0.95


def test_retain_models_never_learnt_the_forget_set(reports):
    for name in ("retain", "retain2"):
        r = reports[name]["native"]
        assert r["retain"]["exact"] >= 0.95
        assert r["forget"]["exact"] <= 0.2


def test_forget_quality_discriminates(reports):
    t, r2 = reports["target"]["native"]["forget_quality"], reports["retain2"]["native"]["forget_quality"]
    print(f"forget quality: target {t:.3g}, second-seed retain model {r2:.3g}")
    assert t < 0.01
    assert r2 > 0.05


def test_min_k_plus_plus_auc_discriminates(reports):
    t = reports["target"]["native"]["mia_auc"]["min_k_plus_plus"]
    r = reports["target"]["native"]["reference_mia_auc"]["min_k_plus_plus"]
    r2 = reports["retain2"]["native"]["mia_auc"]["min_k_plus_plus"]
    print(f"Min-K%++ AUC forget vs holdout: target {t:.3f}, retain {r:.3f}, retain (seed 2) {r2:.3f}")
    assert t >= 0.8
    assert abs(r - 0.5) <= 0.1 and abs(r2 - 0.5) <= 0.1
    # the reference's own evaluation gives the same AUC as the reference statistics
    assert reports["retain"]["native"]["mia_auc"]["min_k_plus_plus"] == pytest.approx(r, abs=1e-6)
    assert reports["retain"]["native"]["forget_quality"] == pytest.approx(1.0)


def test_model_utility_and_priv_leak(reports):
    t, r = reports["target"]["native"], reports["retain"]["native"]
    assert 0.3 < t["model_utility"] <= 1 and 0.3 < r["model_utility"] <= 1
    # MUSE's sign: the un-unlearned target is strongly negative, the reference itself is 0
    assert t["priv_leak"]["min_k_plus_plus"] < -0.3
    assert r["priv_leak"]["min_k_plus_plus"] == pytest.approx(0.0, abs=1e-9)


def test_quantisation_attack(evaluator, models, reports):
    q = evaluator.quant_attack(models["target"], presets=("int8", "int4-g128"), native=reports["target"]["native"])
    # int8 barely moves a memorised model; the target knows its forget set at every precision
    assert q["presets"]["int8"]["forget"]["exact"] == pytest.approx(reports["target"]["native"]["forget"]["exact"],
                                                                   abs=0.05)
    assert q["q_int4"] == q["presets"]["int4-g128"]["forget"]["exact"]
    assert q["certificate"]["holds"] is False and q["certificate"]["epsilon"] == evaluator.epsilon
    qr = evaluator.quant_attack(models["retain"], presets=("int4-g128",))
    assert qr["certificate"]["holds"] == (max(qr["presets"]["int4-g128"]["forget"]["exact"],
                                              reports["retain"]["native"]["forget"]["exact"]) <= evaluator.epsilon)
    # the weights are restored bit for bit after the attack
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(models["target"].name_or_path)
    for a, b in zip(fresh.parameters(), models["target"].parameters()):
        assert torch.equal(a, b)


def test_relearning_attack_fine_tunes_a_copy(evaluator, models):
    before = [p.detach().clone() for p in models["retain"].parameters()]
    r = evaluator.relearn_attack(models["retain"])
    assert r["train_examples"] + r["held_out_examples"] == len(evaluator.data.forget)
    assert set(r["recovery"]) >= {"prob", "rouge", "exact"}
    # the attack fine-tunes a copy: the evaluated model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, models["retain"].parameters()))
    # it trained: the relearnt half's facts are now likelier (measured through the fused loss)
    assert r["after"]["prob"] != r["before"]["prob"]


def test_split_forget_keeps_subjects_on_both_sides(evaluator):
    train, held = _split_forget(evaluator.data.forget, 0.5)
    assert not set(map(id, train)) & set(map(id, held))
    assert {e.subject for e in train} == {e.subject for e in held}


def test_evaluation_never_materialises_a_log_softmax(evaluator, models, monkeypatch):
    import torch.nn.functional as F

    def boom(*a, **k):
        raise AssertionError("a full log-softmax was computed")
    monkeypatch.setattr(F, "log_softmax", boom)
    monkeypatch.setattr(torch, "log_softmax", boom)
    monkeypatch.setattr(torch.Tensor, "log_softmax", boom)
    small = Evaluator(EvalData(evaluator.data.forget[:8], evaluator.data.retain[:8], evaluator.data.holdout[:8]),
                      evaluator.tok)
    m = small.metrics(models["target"])
    assert 0 <= m["forget"]["prob"] <= 1


def test_report_saves_json_and_plots(reports, tmp_path):
    r = reports["target"]
    paths = r.save(tmp_path)
    names = {p.name for p in paths}
    assert {"report.json", "metrics.png", "truth_ratios.png"} <= names
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["versions"]) >= {"lethe", "torch", "transformers"}
    assert "epsilon" in data["config"] and "relearn" in data["config"]
    assert data["results"]["native"]["forget_quality"] == pytest.approx(r["native"]["forget_quality"])
    assert len(data["forget_truth_ratios"]) == len(r.truth_ratios)
    text = str(r)
    assert "forget_quality" in text and "MIA AUC min_k_plus_plus" in text
    for p in paths:
        assert p.stat().st_size > 0


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lethe.cli", "eval", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_help_explains_every_option():
    r = _cli("--help")
    assert r.returncode == 0
    for opt in ("--model", "--reference", "--forget", "--retain", "--holdout", "--attacks", "--out", "--split",
                "--cache", "--epsilon", "--relearn-steps"):
        assert opt in r.stdout


@pytest.mark.parametrize("extra, match", [
    (["--attacks", "quant,fly"], "--attacks: each must be 'quant' or 'relearn'"),
    (["--forget", "x.jsonl"], "needs all of --forget, --retain and --holdout"),
    (["--epsilon", "2"], "--epsilon must be in"),
    (["--retain-size", "0"], "--retain-size must be >= 1"),
])
def test_cli_errors_without_traceback(tmp_path, extra, match):
    r = _cli("--out", str(tmp_path / "o"), *extra)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr


def test_cli_own_data_errors(tmp_path, bench):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n{oops\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    notlm = tmp_path / "notlm"
    notlm.mkdir()
    (notlm / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = str(bench.target)
    cases = [
        ([str(tmp_path / "missing"), good, good, good], "is not a directory"),
        ([str(tmp_path), good, good, good], "has no config.json"),
        ([str(notlm), good, good, good], "is not a causal LM that transformers can load"),
        ([model, str(tmp_path / "nope.jsonl"), good, good], "--forget file"),
        ([model, good, bad, good], "bad.jsonl:2: not valid JSON"),
        ([model, good, good, empty], "holds no examples"),
    ]
    for (m, f, r_, h), match in cases:
        res = _cli("--model", m, "--forget", str(f), "--retain", str(r_), "--holdout", str(h), "--out", str(out))
        assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, (match, res.stderr)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_runs_on_own_data(tmp_path, bench):
    c = bench.corpus
    for name, qas in (("forget", c.forget("forget10")[:12]), ("retain", c.retain("forget10")[:12]),
                      ("holdout", c.holdout[:12])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": q.question, "answer": q.answer, "paraphrased_answer": q.paraphrased,
                        "perturbed_answers": list(q.perturbed)}) + "\n" for q in qas))
    out = tmp_path / "out"
    r = _cli("--model", str(bench.target), "--reference", str(bench.retain["forget10"][0]),
             "--forget", str(tmp_path / "forget.jsonl"), "--retain", str(tmp_path / "retain.jsonl"),
             "--holdout", str(tmp_path / "holdout.jsonl"), "--attacks", "quant,relearn", "--relearn-steps", "3",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "report.json").read_text())
    assert "forget_quality" in data["results"]["native"] and "quant" in data["results"]
    assert data["results"]["relearn"]["config"]["steps"] == 3
    assert (out / "quantisation.png").exists()
    assert "forget_quality" in r.stdout


def test_cli_builtin_benchmark(tmp_path, bench, monkeypatch, capsys):
    """`lethe eval` with no data arguments, on the session's (reduced) built-in benchmark: it is
    loaded from the cache, nothing is trained again."""
    import lethe.eval.benchmark as B
    from lethe.cli import main

    monkeypatch.setattr(B, "BenchmarkConfig", lambda **kw: EVAL_TEST)
    monkeypatch.setattr(B, "_new_model", lambda *a, **k: pytest.fail("trained a model again"))
    rc = main(["eval", "--out", str(tmp_path / "o"), "--cache", str(bench.root.parent.parent), "--retain-size", "20",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "forget_quality" in out
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["name"] == "target"
    assert data["meta"]["benchmark"]["config"]["seed"] == 0
    assert data["meta"]["benchmark"]["corpus_sha256"] == bench.corpus.digest()


def test_evaluate_function_on_own_data(bench, models, evaluator):
    from lethe.eval import evaluate

    data = EvalData(evaluator.data.forget[:10], evaluator.data.retain[:10], evaluator.data.holdout[:10])
    rep = evaluate(models["target"], bench.tokenizer(), models["retain"], data=data, name="t")
    assert rep.name == "t" and "forget_quality" in rep["native"]
    with pytest.raises(ValueError, match="tokenizer: required"):
        evaluate(models["target"], data=data)
    with pytest.raises(ValueError, match="attacks: each must be"):
        evaluate(models["target"], bench.tokenizer(), data=data, attacks=("nope",))


def test_scorer_statistics_equal_the_models_own_log_softmax(bench, models, evaluator):
    from lethe.eval.data import pad_batch
    from lethe.eval.evaluator import Scorer

    model, exs = models["target"], evaluator.data.forget[:7] + evaluator.data.world[:6]
    sc = Scorer(model, bench.tokenizer(), batch_size=4)  # several batches, lengths sorted across them
    lp, mu, var, mask = sc.token_stats([e.prompt for e in exs], [e.paraphrased for e in exs])
    for k, e in enumerate(exs):
        ids, start = sc.encode(e.prompt, e.paraphrased)
        x, _, _ = pad_batch([(ids, start)], sc.pad)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        n = len(ids) - start
        assert mask[k].sum() == n
        want = logp[start - 1:len(ids) - 1]
        tgt = torch.tensor(ids[start:])
        torch.testing.assert_close(lp[k, :n].double(), want.gather(1, tgt[:, None])[:, 0], atol=2e-4, rtol=1e-4)
        m = (want.exp() * want).sum(-1)
        torch.testing.assert_close(mu[k, :n].double(), m, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(var[k, :n].double(), (want.exp() * (want - m[:, None]) ** 2).sum(-1),
                                   atol=2e-4, rtol=1e-3)
