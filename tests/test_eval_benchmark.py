"""The built-in benchmark: corpus, tokenizer, training (determinism, resumption, cache), user data."""
import json

import pytest
import torch

from lethe.eval.benchmark import (BenchmarkConfig, TrainConfig, build_benchmark, encode_qa, train_model,
                                  train_tokenizer)
from lethe.eval.corpus import SPLITS, CorpusConfig, make_corpus
from lethe.eval.data import DataError, load_jsonl

TINY = BenchmarkConfig(corpus=CorpusConfig(people=10, holdout_people=2, places=8, things=2),
                       train=TrainConfig(hidden=64, layers=1, heads=2, intermediate=64, vocab=400, epochs=2))


def test_corpus_sizes_and_structure():
    c = make_corpus()
    assert len(c.people) >= 200 and len(set(c.people)) == len(c.people)
    for p in c.people:
        facts = c.person_facts[p]
        assert len(facts) >= 10
        assert len({f.attribute for f in facts}) == len(facts)
        for qa in facts:
            assert p in qa.question and qa.subject == p
            assert len(qa.perturbed) >= 3 and len(set(qa.perturbed)) == len(qa.perturbed)
            assert qa.paraphrased != qa.answer and qa.paraphrased not in qa.perturbed
            # same format: the perturbed answers differ from the paraphrase only in the value
            prefix = _common_prefix([qa.paraphrased, *qa.perturbed])
            assert len(prefix) >= 4
    holdout_subjects = {qa.subject for qa in c.holdout}
    assert holdout_subjects and not holdout_subjects & set(c.people)
    assert len(holdout_subjects) == c.config.holdout_people
    world_subjects = {qa.subject for qa in c.world}
    assert not world_subjects & (set(c.people) | holdout_subjects)
    assert len(c.world) >= 100


def _common_prefix(strings):
    s0 = strings[0]
    i = 0
    while i < len(s0) and all(len(s) > i and s[i] == s0[i] for s in strings):
        i += 1
    return s0[:i]


def test_forget_splits_are_whole_people_and_nested():
    c = make_corpus()
    prev = set()
    for split, frac in sorted(SPLITS.items(), key=lambda kv: kv[1]):
        people = c.forget_people(split)
        assert len(people) == round(frac * len(c.people))
        assert prev <= set(people)
        prev = set(people)
        forget = c.forget(split)
        assert {qa.subject for qa in forget} == set(people)
        assert len(forget) == sum(len(c.person_facts[p]) for p in people)
        retain = c.retain(split)
        assert not {qa.subject for qa in retain} & set(people)
        assert len(forget) + len(retain) == sum(len(v) for v in c.person_facts.values())
        train = c.train_set(split)
        assert len(train) == len(retain) + len(c.world)
    with pytest.raises(ValueError, match="split must be one of"):
        c.forget("forget50")


def test_corpus_is_deterministic_by_seed():
    a, b = make_corpus(CorpusConfig(seed=3)), make_corpus(CorpusConfig(seed=3))
    assert a.to_bytes() == b.to_bytes()
    assert make_corpus(CorpusConfig(seed=4)).digest() != a.digest()


@pytest.mark.parametrize("kw, match", [({"people": 5}, "people must be >= 10"), ({"n_perturbed": 9}, "n_perturbed"),
                                       ({"places": 3}, "places must be >= 8"), ({"seed": 1.5}, "seed must be an int"),
                                       ({"things": 0}, "things must be a positive int")])
def test_corpus_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(**kw)


def test_train_config_errors():
    with pytest.raises(ValueError, match="divisible by heads"):
        TrainConfig(hidden=100, heads=3)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)


def test_tokenizer_is_a_reloadable_fast_tokenizer(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    c = make_corpus(TINY.corpus)
    texts = [qa.question + " " + qa.answer for qa in c.all_qas()]
    tok = train_tokenizer(texts, 400)
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for t in texts[:20]:
        ids = again(t, add_special_tokens=False)["input_ids"]
        assert ids == tok(t, add_special_tokens=False)["input_ids"]
        assert again.decode(ids) == t
    ids, start = encode_qa(tok, "Who?", "Nobody.")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[start:-1]).strip() == "Nobody."


@pytest.fixture(scope="module")
def tiny_tok():
    c = make_corpus(TINY.corpus)
    return c, train_tokenizer([qa.question + " " + qa.answer for qa in c.all_qas()], 400)


def test_training_is_deterministic_and_resumes_bit_for_bit(tmp_path, tiny_tok):
    from transformers import AutoModelForCausalLM

    c, tok = tiny_tok
    qas = c.train_set(None)
    cfg = TrainConfig(hidden=64, layers=1, heads=2, intermediate=64, vocab=400, epochs=3, batch_size=16)
    a = train_model(qas, tok, cfg, 0, tmp_path / "a", progress=False)
    b = train_model(qas, tok, cfg, 0, tmp_path / "b", progress=False)
    # interrupted after one epoch, then resumed from its checkpoint
    ckpt = train_model(qas, tok, cfg, 0, tmp_path / "c", progress=False, stop_after=1)
    assert ckpt.name == "c.ckpt" and ckpt.exists() and not (tmp_path / "c").exists()
    c_ = train_model(qas, tok, cfg, 0, tmp_path / "c", progress=False)
    assert not ckpt.exists()
    other = train_model(qas, tok, cfg, 1, tmp_path / "d", progress=False)
    ma, mb, mc, md = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c_, other))
    for (n, pa), pb, pc, pd in zip(ma.named_parameters(), mb.parameters(), mc.parameters(), md.parameters()):
        assert torch.equal(pa, pb), n
        assert torch.equal(pa, pc), n
    assert any(not torch.equal(pa, pd) for pa, pd in zip(ma.parameters(), md.parameters()))
    meta = json.loads((a / "lethe_model.json").read_text())
    assert meta["seed"] == 0 and meta["examples"] == len(qas)


def test_benchmark_cache_is_reused(tmp_path):
    b1 = build_benchmark(TINY, cache=tmp_path, progress=False, retain_seeds=1)
    stamp = {p: p.stat().st_mtime_ns for p in (b1.target / "model.safetensors", b1.tokenizer_dir / "tokenizer.json")}
    b2 = build_benchmark(TINY, cache=tmp_path, progress=False, retain_seeds=1)
    assert b2.target == b1.target and b2.retain == b1.retain
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # loaded, not rebuilt
    assert (b1.root / "corpus.json").read_bytes() == b1.corpus.to_bytes()
    # another recipe is another cache entry
    other = BenchmarkConfig(corpus=TINY.corpus, train=TrainConfig(hidden=64, layers=1, heads=2, intermediate=64,
                                                                 vocab=400, epochs=1))
    b3 = build_benchmark(other, cache=tmp_path, progress=False, retain_seeds=0)
    assert b3.root != b1.root and b3.retain == {"forget10": []}
    with pytest.raises(ValueError, match="splits"):
        build_benchmark(TINY, splits=("forget99",), cache=tmp_path)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from lethe.eval.benchmark import cache_dir

    monkeypatch.setenv("LETHE_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    assert cache_dir(tmp_path / "y") == tmp_path / "y"


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl(tmp_path):
    f = _write(tmp_path / "a.jsonl", [json.dumps({"question": "Who?", "answer": "Me."}), "",
                                       json.dumps({"text": "one two three four five"}),
                                       json.dumps({"question": "Q", "answer": "A", "paraphrased_answer": "P",
                                                   "perturbed_answers": ["X", "Y"]})])
    ex = load_jsonl(f)
    assert [e.answer for e in ex] == ["Me.", "three four five", "A"]
    assert ex[0].prompt == "Question: Who?\nAnswer:" and ex[1].prompt == "one two"
    assert ex[2].paraphrased == "P" and ex[2].perturbed == ("X", "Y")
    assert load_jsonl(f, template="Q: {q} A:")[0].prompt == "Q: Who? A:"


@pytest.mark.parametrize("lines, match", [
    (["{not json"], r"b\.jsonl:1: not valid JSON"),
    ([json.dumps({"question": "Q", "answer": "A"}), "[1, 2]"], r"b\.jsonl:2: expected a JSON object"),
    ([json.dumps({"question": "Q"})], r":1: \"question\" and \"answer\" must both be non-empty strings"),
    ([json.dumps({"text": "one"})], r":1: \"text\" must be a string of at least two words"),
    ([json.dumps({"prompt": "x"})], r":1: expected the keys"),
    ([json.dumps({"question": "Q", "answer": "A", "perturbed_answers": ["x"]})], "needs a \"paraphrased_answer\""),
    ([json.dumps({"question": "Q", "answer": "A", "perturbed_answers": "x", "paraphrased_answer": "p"})],
     "must be a list of non-empty strings"),
    ([""], "holds no examples"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    with pytest.raises(DataError, match=match):
        load_jsonl(_write(tmp_path / "b.jsonl", lines))


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl", what="--forget")
    with pytest.raises(DataError, match="is not a file"):
        load_jsonl(tmp_path)
