"""FIT (methods/fit.py) and the continual evaluation (eval/stream.py, eval/continual.py) on the
reduced built-in benchmark: the stream's marks, the scores against hand-computed values, the
filter's recall of the marked duplicates, the exact restore of the layer attribution, resume
between requests, FIT against NPO and GradDiff run request by request, and the errors. The figures
are printed (pytest -s) and reported in benchmarks/RESULTS.md."""
import copy
import json

import pytest
import torch

import lethe.methods as lm
from lethe.eval import metrics as M
from lethe.eval.data import DataError, examples_from_qas
from lethe.eval.stream import Request, StreamConfig, load_requests, make_stream, save_requests, text_chunks

# the continual runs of the comparison (lethe's settings on this benchmark: RESULTS.md, FIT)
FIT_CONFIG = {}
BASELINE_TRAIN = {"steps": 4, "lr": 3e-4, "batch_size": 11}
EVERY = 10


@pytest.fixture(scope="module")
def stream(bench):
    return make_stream(bench.corpus)


@pytest.fixture(scope="module")
def retain_examples(bench, stream):
    asked = {s for q in stream for s in q.subjects}
    return examples_from_qas([qa for p in bench.corpus.people if p not in asked for qa in bench.corpus.person_facts[p]])


@pytest.fixture(scope="module")
def continual(bench, models, stream):
    from transformers import AutoModelForCausalLM

    from lethe.eval.benchmark import build_stream_reference
    from lethe.eval.continual import builtin_continual

    rr = AutoModelForCausalLM.from_pretrained(build_stream_reference(bench, stream, progress=False)).eval()
    return builtin_continual(bench, stream, target=models["target"], retrained=rr)


_CURVES = {}


def _run(name, models, bench, stream, retain_examples, continual):
    if name not in _CURVES:
        model = copy.deepcopy(models["target"])
        run = lm.make_method("fit", FIT_CONFIG) if name == "fit" else lm.Sequential(name, **BASELINE_TRAIN)
        run.bind(model, bench.tokenizer(), retain=retain_examples)
        pts, entries = [], []
        for i, q in enumerate(stream):
            entries.append(run.handle(q))
            if (i + 1) % EVERY == 0:
                pts.append(continual.checkpoint(model, i + 1))
        _CURVES[name] = (pts, entries, model)
    return _CURVES[name]


# -- the stream ---------------------------------------------------------------------------------

def test_stream_is_deterministic_and_marks_its_duplicates(bench, stream):
    assert len(stream) >= 30
    again = make_stream(bench.corpus)
    assert [q.to_json() for q in again] == [q.to_json() for q in stream]
    assert [q.to_json() for q in make_stream(bench.corpus, StreamConfig(seed=1))] != [q.to_json() for q in stream]
    seen = set()
    kinds = {"dup": 0, "partial": 0, "new": 0}
    for q in stream:
        marks = [f in seen for f in q.facts]
        assert list(q.duplicate) == marks  # a chunk is marked when its fact was requested before
        kinds["dup" if all(marks) else "partial" if any(marks) else "new"] += 1
        seen.update(q.facts)
        for c, (s, a) in zip(q.chunks, q.facts):
            assert s in c.prompt  # every chunk names its person
    assert kinds["dup"] >= 3 and kinds["partial"] >= 2 and kinds["new"] >= 15, kinds


def test_request_file_round_trip_and_errors(stream, tmp_path):
    p = tmp_path / "requests.jsonl"
    save_requests(stream, p)
    back = load_requests(p)
    assert [(q.id, [(c.prompt, c.answer) for c in q.chunks], q.duplicate) for q in back] == \
        [(q.id, [(c.prompt, c.answer) for c in q.chunks], q.duplicate) for q in stream]
    bad = tmp_path / "bad.jsonl"
    for line, msg in [('{"facts": []}', r"bad.jsonl:2: \"facts\" must be a non-empty list"),
                      ('{"facts": [{"question": "q"}]}', r"bad.jsonl:2: facts\[0\] must be an object"),
                      ('not json', r"bad.jsonl:2: not valid JSON"),
                      ('{"text": "one"}', r"bad.jsonl:2: \"text\" must be a string of at least two words"),
                      ('{"other": 1}', r"bad.jsonl:2: expected \"facts\""),
                      ('{"question": "q", "answer": "a", "duplicate": [true, false]}',
                       r"bad.jsonl:2: \"duplicate\" must be a list of 1 booleans")]:
        bad.write_text('{"question": "q", "answer": "a"}\n' + line + "\n")
        with pytest.raises(DataError, match=msg):
            load_requests(bad)
    bad.write_text('{"id": "x", "question": "q", "answer": "a"}\n{"id": "x", "question": "r", "answer": "b"}\n')
    with pytest.raises(DataError, match="the id 'x' is used twice"):
        load_requests(bad)
    bad.write_text("\n")
    with pytest.raises(DataError, match="holds no request"):
        load_requests(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_requests(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="empty"):
        Request("r", ())


def test_text_chunks_split_sentences_within_the_word_budget():
    text = "Alpha beta gamma. Delta epsilon! Zeta eta theta iota kappa? Lambda."
    cs = text_chunks(text, chunk_words=5)
    assert [c.text for c in cs] == ["Alpha beta gamma. Delta epsilon!", "Zeta eta theta iota kappa? Lambda."]
    assert cs[0].prompt == "Alpha beta" and cs[0].answer == "gamma. Delta epsilon!"
    with pytest.raises(ValueError, match="chunk_words"):
        text_chunks(text, chunk_words=1)


# -- the scores -----------------------------------------------------------------------------------

def test_fit_scores_against_hand_computed_values():
    assert M.fit_score(0.8, 0.5, 0.4) == pytest.approx(100 * (0.16) ** (1 / 3))
    assert M.fit_score(1, 1, 1) == 100 and M.fit_score(0, 1, 1) == 0
    assert M.forget_degree(30, 40) == pytest.approx(0.75)
    assert M.forget_degree(50, 40) == pytest.approx(0.75)  # forgetting too little or too much
    assert M.forget_degree(100, 40) == 0.0
    assert M.retain_utility(90, 100) == pytest.approx(0.9)
    assert M.forget_degree(0, 0) == 1.0 and M.forget_degree(1, 0) == 0.0
    f = M.rouge_l_fmeasure(["the cat sat on the mat today"], ["the cat sat"])
    assert f[0] == pytest.approx(2 * 1.0 * (3 / 7) / (1.0 + 3 / 7))  # recall 1, precision 3/7
    acc = M.token_accuracy(torch.tensor([[True, False, True], [True, True, False]]),
                           torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert acc.tolist() == pytest.approx([2 / 3, 1.0])
    with pytest.raises(ValueError, match="prob must be a number in"):
        M.fit_score(1.5, 1, 1)
    with pytest.raises(ValueError, match="reference_score must be a number >= 0"):
        M.retain_utility(1, -1)
    with pytest.raises(ValueError, match="hits must be 0/1"):
        M.token_accuracy([[0.5]], [[1]])


def test_continual_reference_end_points(continual, models, stream):
    """The target model scores near 100 on everything; the all-requests retrained model is the
    reference at the end (F.D. = R.U. = 1), and R_ref's end points differ by the small gap."""
    n = len(stream)
    t = continual.checkpoint(models["target"], n)
    r = continual.checkpoint(continual.retrained, n)
    print(f"target: F {t['F']:.1f}, R {t['R']:.1f}; retrained: F {r['F']:.1f}, R {r['R']:.1f}; reference gap "
          f"{t['reference_gap']:.3f}")
    assert t["F"] > 90 and t["R"] > 90 and r["F"] < 0.7 * t["F"]
    assert r["forget_degree"] == pytest.approx(1.0) and r["retain_utility"] == pytest.approx(1.0)
    assert t["forget_degree"] < 0.3
    assert abs(t["reference_gap"]) < 2.0
    with pytest.raises(ValueError, match="k must be an int"):
        continual.checkpoint(models["target"], 0)


# -- FIT's parts ----------------------------------------------------------------------------------

def test_attribution_restores_every_parameter_exactly_without_a_model_copy(models, bench, stream, retain_examples):
    model = copy.deepcopy(models["target"])
    fit = lm.make_method("fit").bind(model, bench.tokenizer(), retain=retain_examples[:20])
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    enc = lm.encode(list(stream[0].chunks), bench.tokenizer())
    batch = enc.batch(range(len(enc)))
    scores = fit.attribution(batch)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    # the definition, on a copy: zero one decoder block's parameters, |delta loss|
    from lethe.methods.base import mean_nll
    from lethe.methods.fit import decoder_layers
    with torch.no_grad():
        base = float(mean_nll(model, batch))
        for i, (_, block) in enumerate(decoder_layers(model)):
            m2 = copy.deepcopy(model)
            for p in decoder_layers(m2)[i][1].parameters():
                p.zero_()
            assert scores[i] == pytest.approx(abs(float(mean_nll(m2, batch)) - base), rel=1e-6)


def test_importance_is_the_input_embedding_gradient_norm(models, bench, stream, retain_examples):
    model = copy.deepcopy(models["target"])
    fit = lm.make_method("fit").bind(model, bench.tokenizer(), retain=retain_examples[:20])
    enc = lm.encode(list(stream[1].chunks), bench.tokenizer())
    batch = enc.batch(range(len(enc)))
    s = fit.importance(batch)
    # the definition through inputs_embeds and the model's own loss on the answer tokens
    e = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=e, attention_mask=batch["attention_mask"], labels=batch["labels"])
    (g,) = torch.autograd.grad(out.loss, e)
    assert s == pytest.approx(float(g.norm()), rel=1e-4)
    assert fit.route(0.0) == "random_label" and fit.route(1e9) == "npo_rt"


def test_fit_config_and_input_errors(models, bench, retain_examples, stream):
    with pytest.raises(ValueError, match="top_layers=3 is larger than the model's 2 decoder layers"):
        lm.make_method("fit", {"top_layers": 3}).bind(copy.deepcopy(models["target"]), bench.tokenizer(),
                                                      retain=retain_examples[:5])
    with pytest.raises(ValueError, match="s_high .* must be >= s_low"):
        lm.FITConfig(s_low=1, s_high=0.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        lm.FITConfig(steps=0)
    with pytest.raises(ValueError, match="not a directory"):
        lm.make_method("fit", {"embedding": "/nonexistent"}).bind(copy.deepcopy(models["target"]), bench.tokenizer(),
                                                                  retain=retain_examples[:5])
    with pytest.raises(RuntimeError, match="call bind"):
        lm.make_method("fit").handle(stream[0])
    fit = lm.make_method("fit").bind(copy.deepcopy(models["target"]), bench.tokenizer(), retain=retain_examples[:5])
    with pytest.raises(ValueError, match="empty"):
        fit.handle([])
    # a text request (a passage split into sentence chunks) goes through the same steps
    person = stream[0].subjects[0]
    passage = " ".join(f"{person}: {qa.answer}" for qa in bench.corpus.person_facts[person][:4])
    e = fit.handle(Request("passage", tuple(text_chunks(passage, chunk_words=8)), "text"))
    assert e["chunks"] == 4 and e["kept"] == 4 and e["update"] in ("npo_rt", "npo", "random_label")
    with pytest.raises(ValueError, match="retain: method 'fit' needs a retain set"):
        lm.make_method("fit").bind(copy.deepcopy(models["target"]), bench.tokenizer())
    with pytest.raises(ValueError, match="is continual"):
        lm.unlearn(copy.deepcopy(models["target"]), retain_examples[:4], method="fit", tokenizer=bench.tokenizer())


def test_fit_resumes_between_requests_bit_for_bit(models, bench, stream, retain_examples, tmp_path):
    tok = bench.tokenizer()
    a = copy.deepcopy(models["target"])
    fa = lm.make_method("fit").bind(a, tok, retain=retain_examples[:50], checkpoint_dir=tmp_path / "a")
    la = [fa.handle(q) for q in stream[:4]]
    b = copy.deepcopy(models["target"])
    fb = lm.make_method("fit").bind(b, tok, retain=retain_examples[:50], checkpoint_dir=tmp_path / "b")
    for q in stream[:2]:
        fb.handle(q)
    del fb  # "interrupted": a new process binds a fresh copy of the original model to the same folder
    b = copy.deepcopy(models["target"])
    fb = lm.make_method("fit").bind(b, tok, retain=retain_examples[:50], checkpoint_dir=tmp_path / "b")
    assert fb.handled() == [q.id for q in stream[:2]]
    lb = [fb.handle(q) for q in stream[:4]]  # the first two are in the log: not handled again
    assert [e["request"] for e in fb.requests_log] == [q.id for q in stream[:4]]
    for x, y in zip(la, lb):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="holds another run"):
        lm.make_method("fit", {"steps": 3}).bind(copy.deepcopy(models["target"]), tok, retain=retain_examples[:50],
                                                 checkpoint_dir=tmp_path / "b")


# -- on the benchmark -----------------------------------------------------------------------------

def test_fit_filters_the_marked_duplicates(models, bench, stream, retain_examples, continual):
    pts, entries, _ = _run("fit", models, bench, stream, retain_examples, continual)
    dup_dropped = dup = new_kept = new = 0
    for q, e in zip(stream, entries):
        for kept, d in zip(e["kept_mask"], q.duplicate):
            dup += d
            dup_dropped += d and not kept
            new += not d
            new_kept += (not d) and kept
    routes = {r: sum(e["update"] == r for e in entries) for r in ("npo_rt", "npo", "random_label", None)}
    print(f"fit filtering: {dup_dropped}/{dup} marked duplicate chunks dropped, {new_kept}/{new} novel chunks kept; "
          f"updates {routes}")
    assert dup_dropped >= 0.8 * dup
    assert new_kept >= 0.9 * new


def test_fit_keeps_retain_utility_above_npo_and_graddiff_request_by_request(models, bench, stream, retain_examples,
                                                                             continual, tmp_path_factory):
    curves = {n: _run(n, models, bench, stream, retain_examples, continual)[0] for n in ("fit", "npo", "graddiff")}
    for name, pts in curves.items():
        print(f"{name}: " + "; ".join(f"{p['requests']} requests: F {p['F']:.1f} (ref {p['F_ref']:.1f}), R "
                                      f"{p['R']:.1f}, F.D. {p['forget_degree']:.3f}, R.U. {p['retain_utility']:.3f}"
                                      for p in pts))
    from lethe.eval.continual import plot_curves
    out = tmp_path_factory.mktemp("fit") / "fit_curves.png"
    assert plot_curves(curves, out).exists()
    from lethe.eval.continual import stream_attacks
    for name in curves:
        a = stream_attacks(bench, stream, _CURVES[name][2], continual.retrained, retain_size=100)
        print(f"{name} after the stream: forget exact {a['forget_exact']:.3f}, at paper-int4 {a['exact_paper_int4']:.3f}, "
              f"Q-INT4 {a['q_int4']:.3f}, relearnt {a['exact_relearnt']:.3f} (before {a['exact_before_relearning']:.3f}); "
              f"utility {a['model_utility']:.3f}")
        assert 0 <= a["q_int4"] <= 1 and 0 <= a["exact_relearnt"] <= 1
    mean = lambda pts, k: sum(p[k] for p in pts) / len(pts)  # noqa: E731
    for base in ("npo", "graddiff"):
        assert mean(curves["fit"], "retain_utility") > mean(curves[base], "retain_utility"), base
        assert mean(curves["fit"], "forget_degree") >= mean(curves[base], "forget_degree"), base


# -- the command line and the continual run -----------------------------------------------------

def _cli(*args):
    """`lethe ...` in this process (the subprocess form is tested in test_methods.py): returncode, stdout, stderr."""
    import contextlib
    import io
    import types

    from lethe.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse
            rc = e.code
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_lethe_unlearn_requests_resumes_and_refuses_bad_input(bench, stream, retain_examples, tmp_path):
    reqs = tmp_path / "requests.jsonl"
    save_requests(stream[:3], reqs)
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"question": e.prompt.split("Question: ")[1].split("\n")[0], "answer": e.answer})
                              + "\n" for e in retain_examples[:30]))
    out = tmp_path / "out"
    args = ["unlearn", "--method", "fit", "--model", str(bench.target), "--requests", str(reqs), "--retain", str(retain),
            "--out", str(out), "--no-progress"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (out / "requests.log.jsonl").read_text().splitlines()]
    assert [e["request"] for e in log] == [q.id for q in stream[:3]]
    assert (out / "config.json").exists() and "handled 3 requests" in r.stdout
    r = _cli(*args)  # its checkpoint is there: a rerun without --resume is refused
    assert r.returncode == 2 and "--resume continues it" in r.stderr
    save_requests(stream[:5], reqs)
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (out / "requests.log.jsonl").read_text().splitlines()]
    assert [e["request"] for e in log] == [q.id for q in stream[:5]] and "handled 5 requests" in r.stdout
    # a gradient method request by request
    r = _cli("unlearn", "--method", "npo", "--model", str(bench.target), "--requests", str(reqs), "--retain",
             str(retain), "--out", str(tmp_path / "npo"), "--steps", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "npo" / "run.json").read_text())["method"] == "npo (sequential)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"facts": 3}\n')
    for extra, msg in [(["--requests", str(bad)], "bad.jsonl:2: \"facts\" must be a non-empty list"),
                       (["--requests", str(reqs), "--steps", "3"], "--steps: method 'fit' takes its settings as --set"),
                       (["--requests", str(reqs), "--set", "top_layers=9"], "top_layers=9 is larger than the model's 2"),
                       ([], "give one of --forget"),
                       (["--forget", str(retain)], "--requests: method 'fit' is continual")]:
        r = _cli("unlearn", "--method", "fit", "--model", str(bench.target), "--retain", str(retain), "--out",
                 str(tmp_path / "x"), "--no-progress", *extra)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
    r = _cli("eval", "--continual", "--model", "target", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "--model is not taken" in r.stderr
    r = _cli("eval", "--continual", "--methods", "fit,nope", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "--methods: method must be one of" in r.stderr


def test_run_continual_writes_curves_and_resumes(bench, tmp_path):
    from lethe.eval.continual import run_continual
    out = tmp_path / "c"
    # the tests' stream (its retrained reference is cached), FIT only (the baselines run above)
    res = run_continual(out, ("fit",), bench=bench, every=15, retain_size=40, attacks=False, progress=False,
                        echo=lambda *a: None)
    assert [p["requests"] for p in res["curves"]["fit"]] == [15, 30]
    assert (out / "continual.png").exists() and json.loads((out / "fit.json").read_text())["complete"]
    said = []
    again = run_continual(out, ("fit",), bench=bench, every=15, retain_size=40, attacks=False, progress=False,
                          echo=said.append)
    assert again["mean"] == res["mean"] and any("done before, kept" in s for s in said)


def test_fit_with_a_sentence_transformers_embedding(models, bench, stream, retain_examples, tmp_path):
    """embedding= a sentence-transformers directory (the authors' SimCSE; here a tiny random BERT
    built locally, nothing downloaded): FIT's embeddings are that model's, unit length, and an exact
    repeat of an unlearnt request is found (similarity 1) and filtered by the second test."""
    from sentence_transformers import SentenceTransformer, models as st_models
    from transformers import BertConfig, BertModel
    tok = bench.tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    SentenceTransformer(modules=[st_models.Transformer(str(tmp_path / "bert")), st_models.Pooling(32, "mean")],
                        device="cpu").save(str(tmp_path / "st"))
    fit = lm.make_method("fit", {"embedding": str(tmp_path / "st")}).bind(copy.deepcopy(models["target"]), tok,
                                                                        retain=retain_examples[:50])
    exs = list(stream[0].chunks)
    e = fit.embed(exs, lm.encode(exs, tok))
    ref = torch.nn.functional.normalize(torch.as_tensor(
        SentenceTransformer(str(tmp_path / "st"), device="cpu").encode([x.text for x in exs])), dim=-1)
    assert e.shape == (len(exs), 32) and torch.allclose(e, ref, atol=1e-5)
    first = fit.handle(stream[0])
    assert first["kept"] == len(exs) and first["update"] is not None
    again = fit.handle(Request("again", stream[0].chunks))
    assert min(again["similarity"]) > 0.999
    # similar to the memory, so each repeat is kept only while the model still holds it (p > epsilon)
    assert again["kept_mask"] == [p > lm.FITConfig().epsilon for p in again["answer_probability"]]
    assert again["kept"] < len(exs)
