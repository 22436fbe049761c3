"""K-FADE (methods/kfade.py) on the reduced built-in benchmark: the trust region's predicted retain
KL against the measured one per step, forgetting and utility against NPO, exact resume with the
factors in the checkpoint, EK-FAC and the other options, two gloo processes, `lethe unlearn`, and
the config errors. The figures are printed (pytest -s) and reported in benchmarks/RESULTS.md."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import gloo
import lethe.methods as lm


@pytest.fixture(scope="module")
def evaluator(bench, models):
    from lethe.eval.evaluator import Evaluator, builtin_data

    return Evaluator(builtin_data(bench, "forget10"), bench.tokenizer(), models["retain"], retain_size=100,
                     world_size=100)


def _steps(log):
    return [e for e in log if e.get("pass") == "step"]


def test_kfade_trust_region_predicts_the_retain_kl_and_it_forgets_as_well_as_npo(models, sets, evaluator):
    t = evaluator.metrics(models["target"])
    npo = copy.deepcopy(models["target"])
    lm.unlearn(npo, sets[0], sets[1], "npo", progress=False)
    n = evaluator.metrics(npo)
    model = copy.deepcopy(models["target"])
    res = lm.unlearn(model, sets[0], sets[1], "kfade", progress=False)  # the defaults (chosen on this benchmark)
    k = evaluator.metrics(model)
    steps = _steps(res.log)
    for e in steps:
        print(f"kfade step {e['step']}: forget loss {e['forget_loss']:.3f}, eta {e['eta']:.3g}, retain KL predicted "
              f"{e['kl_predicted']:.4f} (undamped K-FAC {e['kl_kfac']:.2e}), measured {e['kl_measured']:.4f}")
    for name, g in (("target", t), ("npo", n), ("kfade", k)):
        print(f"{name}: forget prob {g['forget']['prob']:.3f}, exact {g['forget']['exact']:.3f}; utility "
              f"{g['model_utility']:.3f}; forget quality {g.get('forget_quality', float('nan')):.3g}"
              + (f"; {res.seconds:.1f} s" if name == "kfade" else ""))
    assert len(steps) == lm.KFADEConfig().steps
    ratios = [e["kl_measured"] / e["kl_predicted"] for e in steps]
    assert all(0.5 <= r <= 2 for r in ratios), ratios
    assert k["forget"]["prob"] <= 0.5 * t["forget"]["prob"]
    assert k["forget_quality"] >= n["forget_quality"]
    assert k["model_utility"] >= n["model_utility"]


def test_kfade_resume_equals_uninterrupted_with_the_factors_in_the_checkpoint(models, sets, tmp_path):
    cfg = {"steps": 3, "refresh": 2, "curvature": "ekfac", "damping_mode": "tikhonov", "fisher": "empirical",
           "layers": "mlp", "batch_size": 64, "kl_examples": 16}
    a = copy.deepcopy(models["target"])
    ra = lm.unlearn(a, sets[0], sets[1], "kfade", cfg, progress=False)
    kinds = [e.get("pass") for e in ra.log]
    # two capture passes (steps 0 and 2), each with its eigenbasis and Lambda pass
    assert kinds.count("eigen") == 2 and kinds.count("step") == 3 and kinds.count("reduce_lambda") == 2
    assert ra.log[-1]["layers"] == 2 * 3  # gate, up and down projections of both blocks
    b = copy.deepcopy(models["target"])
    cut = kinds.index("step") + 3  # after two steps and the refresh's first capture batch
    part = lm.unlearn(b, sets[0], sets[1], "kfade", cfg, checkpoint_dir=tmp_path, checkpoint_every=1, stop_after=cut,
                      progress=False)
    assert not part.complete
    c = copy.deepcopy(models["target"])
    done = lm.unlearn(c, sets[0], sets[1], "kfade", cfg, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True,
                      progress=False)
    assert done.complete and [e["step"] for e in done.log] == [e["step"] for e in ra.log]
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    for e, f in zip(_steps(ra.log), _steps(done.log)):
        assert e == f
    # the hooks came off: the model runs without the method
    assert all(not m._forward_hooks for m in c.modules())


def test_kfade_config_errors_name_the_field(models, sets):
    for kw, match in ((dict(curvature="kfac2"), r"curvature must be one of \('kfac', 'ekfac'\)"),
                      (dict(fisher="mc"), "fisher must be one of"), (dict(damping=0), "damping must be a number > 0"),
                      (dict(epsilon=float("inf")), "epsilon must be finite"), (dict(steps=0), "steps must be an int >= 1"),
                      (dict(curvature="ekfac"), "curvature='ekfac' needs damping_mode='tikhonov'"),
                      (dict(layers=3), "layers must be None, 'mlp' or glob patterns"),
                      (dict(positions="some"), r"positions must be one of \('all', 'loss'\)")):
        with pytest.raises(ValueError, match=f"KFADEConfig: {match}"):
            lm.KFADEConfig(**kw)
    assert lm.KFADEConfig(layers="model.layers.0.*,model.layers.1.mlp.*").layers == ("model.layers.0.*",
                                                                                   "model.layers.1.mlp.*")
    with pytest.raises(ValueError, match="layers: pattern 'nope.\\*' matches no Linear or Conv1D layer"):
        lm.unlearn(copy.deepcopy(models["target"]), sets[0], sets[1], "kfade", {"layers": ("nope.*",)}, progress=False)
    with pytest.raises(ValueError, match="retain: method 'kfade' needs a retain set"):
        lm.unlearn(copy.deepcopy(models["target"]), sets[0], None, "kfade", progress=False)
    with pytest.raises(ValueError, match="lr: method 'kfade' trains nothing"):
        lm.unlearn(copy.deepcopy(models["target"]), sets[0], sets[1], "kfade", lr=1e-3, progress=False)
    with pytest.raises(RuntimeError, match="kfade is a one-shot method"):
        lm.make_method("kfade").loss(None, {}, 0, 1)


def _method_worker(rank, world, port, out, target, sets, cfg):
    from transformers import AutoModelForCausalLM

    with gloo.process_group(rank, world, port):
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        res = lm.unlearn(model, sets[0], sets[1], "kfade", cfg, progress=False)
        torch.save({"state": model.state_dict(), "log": res.log}, os.path.join(out, f"kfade{rank}.pt"))


def test_kfade_under_two_gloo_processes_equals_one_process(models, sets, bench, tmp_path):
    """Each rank captures every second retain batch; the all-reduced factors, the inverses (each on
    one rank, broadcast) and so the steps are the one-process ones, up to the sums' fp32 order."""
    import torch.multiprocessing as mp

    cfg = {"steps": 2, "fisher": "empirical", "batch_size": 64, "kl_examples": 16, "layers": "mlp"}
    mp.spawn(_method_worker, args=(2, gloo.free_port(), str(tmp_path), bench.target, sets, cfg), nprocs=2, join=True)
    one = copy.deepcopy(models["target"])
    ref = lm.unlearn(one, sets[0], sets[1], "kfade", cfg, progress=False)
    want = one.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"kfade{rank}.pt")
        assert len(got["log"]) < len(ref.log)  # its share of the capture batches
        for e, f in zip(_steps(got["log"]), _steps(ref.log)):
            assert e["eta"] == pytest.approx(f["eta"], rel=1e-4)
            assert e["kl_measured"] == pytest.approx(f["kl_measured"], rel=1e-3)
        for k, v in want.items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-6)


def test_cli_unlearn_with_kfade(bench, tmp_path):
    from lethe.eval.evaluator import builtin_data

    data = builtin_data(bench, "forget10")
    paths = {}
    for what, rows in (("forget", data.forget), ("retain", data.retain[:200])):
        p = tmp_path / f"{what}.jsonl"
        p.write_text("".join(json.dumps({"question": e.prompt[len("Question: "):-len("\nAnswer:")],
                                         "answer": e.answer}) + "\n" for e in rows))
        paths[what] = str(p)
    out = tmp_path / "kfade"
    r = subprocess.run([sys.executable, "-m", "lethe.cli", "unlearn", "--method", "kfade", "--model", str(bench.target),
                        "--forget", paths["forget"], "--retain", paths["retain"], "--out", str(out), "--no-progress",
                        "--set", "steps=2", "--set", "layers=mlp", "--set", "fisher=empirical"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "kfade" and log["config"]["steps"] == 2 and log["config"]["layers"] == "mlp"
    assert len(_steps(log["steps"])) == 2 and all(e["kl_measured"] > 0 for e in _steps(log["steps"]))
