"""K-FAC's curvature passes (the kfac ops), CPU fp32, against what a user writes and against the
machine's fp32 matmul throughput measured in the same run (a 2048 x 2048 @ 2048 x 2048 GEMM,
2 n^3 flops):
  * batched damped inversion, lethe.ops.kfac_damped_inverse of T = 16 SPD factors of n x n
    (F = X^T X / 2n + 1e-4 I from Gaussian X [2n, n], damping 1e-3), n = 128, 256, 512, 1024,
    against (a) the loop `torch.cholesky_inverse(torch.linalg.cholesky(F + lam I))` and (b) the
    loop `torch.linalg.inv(F + lam I)`; the residual max_i ||(F_i + lam I) X_i - I||_F / ||I||_F
    (in fp64); GFLOP/s counting n^3 flops per inverse for every variant (LAPACK's potrf n^3/3 +
    potri 2n^3/3: the flops an SPD inverse needs; lethe's recursive block inversion executes about
    4/3 n^3, inv's LU-based getrf + getri about 2 n^3);
  * factor accumulation, lethe.ops.kfac_factor_update(F, x) with x [8192 tokens, 4096] and
    F 4096 x 4096, GFLOP/s counting N d^2 flops (a symmetric rank-k update: what SYRK does), against
    eager `F.addmm_(x.T, x)` (counted as the GEMM it is: 2 N d^2);
  * end to end, lethe.nn.KFAC's capture of the benchmark model's factors over a retain set of the
    benchmark's size (990 examples), as a ratio to one training epoch over the same batches.
Every case's variants run interleaved, round after round (the order reversed every round), each
round with the matmul anchor beside them, after one warm-up round; medians.

    .venv/bin/python benchmarks/bench_kfac.py [--quick] [--out PATH]    # about 40 s on 2 idle cores
    # or with the other benchmark files: make bench (test_kfac)
Writes benchmarks/results/kfac_cpu.json (--out) and the plot benchmarks/kfac_inverse_sweep.png;
--quick: small sizes, one timed round, nothing written unless --out / --plot are given;
--plot-only redraws the plot from the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
from conftest import RESULTS_DIR, machine  # noqa: E402

from lethe.ops import kfac_damped_inverse, kfac_factor_update  # noqa: E402

DAMPING = 1e-3
FULL = {"sizes": (128, 256, 512, 1024), "factors": 16, "anchor": 2048, "tokens": 8192, "features": 4096,
        "rounds": 5, "update_rounds": 3, "capture_examples": 990}
QUICK = {"sizes": (64, 128, 256), "factors": 4, "anchor": 512, "tokens": 1024, "features": 512,
         "rounds": 1, "update_rounds": 1, "capture_examples": 64}
OUT = os.path.join(RESULTS_DIR, "kfac_cpu.json")
PLOT = os.path.join(BENCH_DIR, "kfac_inverse_sweep.png")
TARGETS = {"inverse_vs_cholesky_loop": 1.5, "inverse_vs_inv_loop": 3.0, "residual": 1e-4,
           "update_x_of_matmul": 0.70}


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each fn, the fns run one after the other every round (order reversed every
    other round), after one warm-up round."""
    names = list(fns)
    ts = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if r:
                ts[n].append(dt)
    return {n: statistics.median(v) for n, v in ts.items()}


def _anchor(n: int):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=c)), 2 * n ** 3


def spd_factors(n: int, count: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(2 * n, n, generator=g)
        f = x.T @ x / (2 * n)
        f.diagonal().add_(1e-4)
        out.append(f)
    return out


def residual(factors, inverses, lam=DAMPING) -> float:
    """max_i ||(F_i + lam I) X_i - I||_F / ||I||_F, in fp64."""
    worst = 0.0
    for f, x in zip(factors, inverses):
        n = f.shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        r = (f.double() + lam * eye) @ x.double() - eye
        worst = max(worst, float(torch.linalg.matrix_norm(r) / n ** 0.5))
    return worst


def bench_inverse(n: int, count: int, anchor: int, rounds: int) -> dict:
    fs = spd_factors(n, count, seed=n)
    eye = torch.eye(n)
    mm, mm_flops = _anchor(anchor)
    variants = {
        "lethe": lambda: kfac_damped_inverse(fs, DAMPING).inverses,
        "cholesky_loop": lambda: [torch.cholesky_inverse(torch.linalg.cholesky(f + DAMPING * eye)) for f in fs],
        "inv_loop": lambda: [torch.linalg.inv(f + DAMPING * eye) for f in fs],
    }
    t = interleaved({**variants, "matmul": mm}, rounds)
    res = kfac_damped_inverse(fs, DAMPING)
    flops = count * n ** 3
    r = {"n": n, "factors": count, "retried": int(res.retried.sum()),
         "matmul_GFLOPs": mm_flops / t["matmul"] / 1e9,
         "residual": {"lethe": residual(fs, res.inverses)}}
    for k in variants:
        r[f"{k}_s"] = t[k]
        r[f"{k}_GFLOPs"] = flops / t[k] / 1e9
        r[f"{k}_x_of_matmul"] = r[f"{k}_GFLOPs"] / r["matmul_GFLOPs"]
        if k != "lethe":
            r["residual"][k] = residual(fs, variants[k]())
    r["speedup_vs_cholesky_loop"] = t["cholesky_loop"] / t["lethe"]
    r["speedup_vs_inv_loop"] = t["inv_loop"] / t["lethe"]
    print(f"damped inverse, {count} x {n}^2: lethe {t['lethe'] * 1e3:.1f} ms, cholesky + cholesky_inverse loop "
          f"{t['cholesky_loop'] * 1e3:.1f} ms ({r['speedup_vs_cholesky_loop']:.2f}x), inv loop "
          f"{t['inv_loop'] * 1e3:.1f} ms ({r['speedup_vs_inv_loop']:.2f}x); n^3 GFLOP/s {r['lethe_GFLOPs']:.1f} / "
          f"{r['cholesky_loop_GFLOPs']:.1f} / {r['inv_loop_GFLOPs']:.1f} against matmul {r['matmul_GFLOPs']:.1f} "
          f"({r['lethe_x_of_matmul']:.0%} / {r['cholesky_loop_x_of_matmul']:.0%} / {r['inv_loop_x_of_matmul']:.0%}); "
          f"residual {r['residual']['lethe']:.1e} (loops {r['residual']['cholesky_loop']:.1e} / "
          f"{r['residual']['inv_loop']:.1e}), {r['retried']} retried in fp64", flush=True)
    return r


def bench_update(tokens: int, d: int, anchor: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, d, generator=g)
    f_lethe, f_eager = torch.zeros(d, d), torch.zeros(d, d)
    mm, mm_flops = _anchor(anchor)
    t = interleaved({"lethe": lambda: kfac_factor_update(f_lethe, x), "eager_addmm": lambda: f_eager.addmm_(x.T, x),
                     "matmul": mm}, rounds)
    # both accumulated rounds + 1 times X^T X
    rel = float((f_lethe - f_eager).abs().max() / f_eager.abs().max())
    sym = bool(torch.equal(f_lethe, f_lethe.T))
    mmr = mm_flops / t["matmul"] / 1e9
    r = {"tokens": tokens, "d": d, "matmul_GFLOPs": mmr, "lethe_s": t["lethe"], "eager_addmm_s": t["eager_addmm"],
         "lethe_GFLOPs_syrk_count": tokens * d * d / t["lethe"] / 1e9,
         "lethe_GFLOPs_gemm_count": 2 * tokens * d * d / t["lethe"] / 1e9,
         "eager_addmm_GFLOPs_gemm_count": 2 * tokens * d * d / t["eager_addmm"] / 1e9,
         "lethe_over_eager_time": t["lethe"] / t["eager_addmm"], "max_rel_diff_vs_eager": rel, "lethe_symmetric": sym}
    for k in ("lethe_GFLOPs_syrk_count", "lethe_GFLOPs_gemm_count", "eager_addmm_GFLOPs_gemm_count"):
        r[k.replace("GFLOPs", "x_of_matmul")] = r[k] / mmr
    print(f"factor update, {tokens} tokens x {d}: lethe {t['lethe']:.2f} s = {r['lethe_GFLOPs_syrk_count']:.1f} "
          f"GFLOP/s counting N d^2 ({r['lethe_x_of_matmul_syrk_count']:.0%} of matmul; "
          f"{r['lethe_GFLOPs_gemm_count']:.1f} counting 2 N d^2), eager addmm_ {t['eager_addmm']:.2f} s = "
          f"{r['eager_addmm_GFLOPs_gemm_count']:.1f} GFLOP/s counting 2 N d^2 "
          f"({r['eager_addmm_x_of_matmul_gemm_count']:.0%}); matmul {mmr:.1f} GFLOP/s; lethe / eager time "
          f"{r['lethe_over_eager_time']:.2f}; max rel. diff {rel:.1e}, symmetric {sym}", flush=True)
    return r


def bench_capture(n_examples: int, rounds: int, vocab: int = 2048, batch: int = 16) -> dict:
    """End to end: lethe.nn.KFAC's factors of the benchmark's model (its TrainConfig's Llama: the
    architecture `lethe demo` trains) over a retain set, true Fisher with one label sample, every
    attended position (K-FADE's defaults), against one training epoch over the same batches
    (forward, backward of the mean NLL, AdamW step: what building the model costs per epoch)."""
    from lethe.eval.benchmark import TrainConfig, _new_model
    from lethe.methods.base import Encoded
    from lethe.nn import KFAC

    class _Vocab:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return vocab

    cfg = TrainConfig(vocab=vocab)
    model = _new_model(cfg, _Vocab(), 0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_examples):  # question-and-answer lengths like the benchmark's (about 20-40 tokens)
        n = int(torch.randint(20, 41, (), generator=g))
        rows.append(([1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist(), n // 2))
    data = Encoded(rows, 0)
    batches = list(data.batches(batch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def epoch():
        model.train()
        for b in batches:
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def capture():
        model.eval()
        k = KFAC(model, positions="all")
        for b in batches:
            k.accumulate_lm(model, b)
        k.remove()
        return k

    t = interleaved({"capture": capture, "epoch": epoch}, rounds)
    k = capture()
    r = {"examples": n_examples, "batch": batch, "layers": len(k.layers), "params": sum(p.numel() for p in model.parameters()),
         "factor_MiB": k.memory_bytes / 2**20, "capture_s": t["capture"], "epoch_s": t["epoch"],
         "capture_over_epoch": t["capture"] / t["epoch"]}
    print(f"capture of {r['layers']} layers' factors over {n_examples} examples: {r['capture_s']:.2f} s; one training "
          f"epoch {r['epoch_s']:.2f} s; ratio {r['capture_over_epoch']:.2f}", flush=True)
    return r


def run(quick: bool = False, out: str | None = None, plot: str | None = None, rounds: int | None = None) -> dict:
    cfg = dict(QUICK if quick else FULL)
    if rounds:
        cfg["rounds"] = rounds
    t0, load0 = time.perf_counter(), os.getloadavg()
    sweep = [bench_inverse(n, cfg["factors"], cfg["anchor"], cfg["rounds"]) for n in cfg["sizes"]]
    update = bench_update(cfg["tokens"], cfg["features"], cfg["anchor"], cfg["update_rounds"])
    capture = bench_capture(cfg["capture_examples"], cfg["update_rounds"])
    main = sweep[-1]
    met = {"inverse_vs_cholesky_loop": main["speedup_vs_cholesky_loop"] >= TARGETS["inverse_vs_cholesky_loop"],
           "inverse_vs_inv_loop": main["speedup_vs_inv_loop"] >= TARGETS["inverse_vs_inv_loop"],
           "residual": max(main["residual"].values()) <= TARGETS["residual"],
           "update_x_of_matmul": update["lethe_x_of_matmul_syrk_count"] >= TARGETS["update_x_of_matmul"]}
    payload = {"config": cfg, "quick": quick, "damping": DAMPING,
               "factors": "X^T X / 2n + 1e-4 I, X [2n, n] Gaussian",
               "flop_counts": {"inverse": "n^3 per inverse (potrf n^3/3 + potri 2n^3/3), every variant",
                               "update": "N d^2 (SYRK) for lethe, also 2 N d^2; eager addmm_ 2 N d^2 (GEMM)",
                               "matmul": "2 n^3"},
               "targets": TARGETS, "targets_met": met, "inverse": sweep, "update": update, "capture": capture,
               "total_s": time.perf_counter() - t0, "loadavg_1min_before_after": [load0[0], os.getloadavg()[0]]}
    print(f"targets (at n = {main['n']}): {met} ({payload['total_s']:.0f} s; 1-minute load average "
          f"{payload['loadavg_1min_before_after'][0]:.2f} before, {payload['loadavg_1min_before_after'][1]:.2f} after)")
    if out is None and not quick:
        out = OUT
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"machine": machine(), **payload}, fh, indent=1)
        print(f"wrote {out}")
    if plot is None and not quick:
        plot = PLOT
    if plot:
        make_plot(payload, plot)
    return payload


def make_plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = payload["inverse"]
    ns = [r["n"] for r in sw]
    labels = {"lethe": "lethe kfac_damped_inverse", "cholesky_loop": "loop: cholesky + cholesky_inverse",
              "inv_loop": "loop: torch.linalg.inv"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, lab in labels.items():
        a1.plot(ns, [r[f"{k}_s"] / r["factors"] * 1e3 for r in sw], "o-", label=lab)
        a2.plot(ns, [r[f"{k}_GFLOPs"] for r in sw], "o-", label=lab)
    a2.plot(ns, [r["matmul_GFLOPs"] for r in sw], "k--",
            label=f"fp32 matmul {payload['config']['anchor']}^2 (same rounds)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("factor size n")
        ax.legend(fontsize=8)
    a1.set_ylabel("ms per factor")
    a1.set_title(f"damped inverse, {sw[0]['factors']} factors per call")
    a2.set_ylabel("GFLOP/s (n^3 flops per inverse)")
    a2.set_title("throughput against the same run's matmul")
    fig.suptitle(f"K-FAC damped inverse, CPU fp32, {payload.get('machine', {}).get('threads', torch.get_num_threads())}"
                 " threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def test_kfac():
    """make bench: the full run (results/kfac_cpu.json, kfac_inverse_sweep.png)."""
    payload = run()
    assert payload["targets_met"]["residual"]
    assert payload["update"]["max_rel_diff_vs_eager"] < 1e-4 and payload["update"]["lethe_symmetric"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one timed round, nothing written by default")
    ap.add_argument("--out", help=f"the JSON results (default {os.path.relpath(OUT)}; --quick: none)")
    ap.add_argument("--plot", help=f"the sweep's plot (default {os.path.relpath(PLOT)}; --quick: none)")
    ap.add_argument("--rounds", type=int, help="timed rounds of the inversion cases (default 5; --quick 1)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON (--out) and exit")
    a = ap.parse_args()
    if a.plot_only:
        with open(a.out or OUT) as fh:
            make_plot(json.load(fh), a.plot or PLOT)
        return
    run(quick=a.quick, out=a.out, plot=a.plot, rounds=a.rounds)


if __name__ == "__main__":
    main()
