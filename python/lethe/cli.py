"""`lethe ...` command line (also `python -m lethe.cli ...`)."""
from __future__ import annotations

import argparse
import sys


def _eval_parser(sub):
    e = sub.add_parser(
        "eval", help="evaluate a model: forgetting, utility, membership inference, attacks",
        description="Evaluates a causal LM. With no data arguments it runs on the built-in fictitious-facts "
                    "benchmark (built on first use and cached under LETHE_CACHE, default ~/.cache/lethe); "
                    "otherwise on your JSONL files ({\"question\",\"answer\"} or {\"text\"} lines). Writes "
                    "report.json and PNG plots to --out and prints the table.")
    e.add_argument("--model", default=None,
                   help="a Hugging Face causal LM directory; on the built-in benchmark also 'target' (the "
                        "default: the model trained on everything) or 'retain' (its exactly retrained model)")
    e.add_argument("--reference", default=None,
                   help="the reference model directory (the model retrained without the forget set) for forget "
                        "quality and PrivLeak; default on the built-in benchmark: its retain model")
    e.add_argument("--forget", default=None, help="JSONL file of the forget set (your own data)")
    e.add_argument("--retain", default=None, help="JSONL file of the retain set (your own data)")
    e.add_argument("--holdout", default=None,
                   help="JSONL file of data never trained on, for membership inference (your own data)")
    e.add_argument("--world", default=None, help="optional JSONL file of other general facts for utility")
    e.add_argument("--split", default="forget10", choices=["forget01", "forget05", "forget10"],
                   help="the built-in benchmark's forget split (TOFU's 1%%, 5%%, 10%% of the people; default forget10)")
    e.add_argument("--attacks", default="",
                   help="comma-separated attacks to run: quant (every metric under int8, paper-int4, int4-g128, "
                        "nf4-b64, Q-INT4 and the durability certificate), relearn (a short fine-tune on half of "
                        "the forget set); default none")
    e.add_argument("--out", required=True, help="directory for report.json and the plots (created)")
    e.add_argument("--cache", default=None, help="cache directory of the built-in benchmark (default LETHE_CACHE)")
    e.add_argument("--seed", type=int, default=0, help="seed of the built-in benchmark (default 0)")
    e.add_argument("--retain-size", type=int, default=200,
                   help="examples of the retain and world sets evaluated (an evenly spaced subset; default 200)")
    e.add_argument("--epsilon", type=float, default=0.05,
                   help="the durability certificate's bound on the forget exact match (default 0.05)")
    e.add_argument("--relearn-steps", type=int, default=20, help="steps of the relearning attack (default 20)")
    e.add_argument("--relearn-lr", type=float, default=1e-3, help="learning rate of the relearning attack (default 1e-3)")
    e.add_argument("--template", default="Question: {q}\nAnswer:",
                   help="prompt template of question lines, with {q} (default 'Question: {q}\\nAnswer:')")
    e.add_argument("--batch-size", type=int, default=256, help="sequences per forward pass (default 256)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--continual", action="store_true",
                   help="the continual evaluation instead (FIT's): a stream of deletion requests on the built-in "
                        "benchmark, handled by each of --methods from the target model, with the Forget Degree and "
                        "Retain Utility every --every requests; writes continual.json, continual.png and each "
                        "method's scores and request log to --out (resumable)")
    e.add_argument("--methods", default="fit,npo,graddiff",
                   help="with --continual: comma-separated methods (fit, or gradient methods run request by request; "
                        "default fit,npo,graddiff)")
    e.add_argument("--every", type=int, default=5, help="with --continual: requests between scores (default 5)")
    e.add_argument("--requests", type=int, default=30, help="with --continual: requests in the stream (default 30)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lethe", description="machine unlearning kernels and methods")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, what was built, and which backend each op uses")
    d = sub.add_parser("demo", help="every unlearning method on the built-in benchmark, evaluated: a leaderboard",
                       description="Builds (or loads from the cache) the built-in fictitious-facts benchmark, runs "
                                   "every registered method with its defaults (and GU on NPO and on GradDiff) on the forget10 split, evaluates each "
                                   "(every metric, the quantisation and relearning attacks), prints a leaderboard and "
                                   "writes demo.json and plots to --out. Interrupted, a rerun continues with the "
                                   "methods not yet done.")
    d.add_argument("--out", default="lethe-demo", help="directory for the reports and plots (default lethe-demo)")
    d.add_argument("--methods", default=None, help="comma-separated methods to run, e.g. npo,npo+gu (default: all registered, and npo+gu, graddiff+gu)")
    d.add_argument("--cache", default=None, help="cache directory of the benchmark (default LETHE_CACHE or ~/.cache/lethe)")
    d.add_argument("--seed", type=int, default=0, help="seed of the benchmark (default 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    from lethe.methods.cli import add_parser

    add_parser(sub)
    _eval_parser(sub)
    a = p.parse_args(argv)
    if a.cmd == "eval":
        from lethe.eval.cli import run_eval

        return run_eval(a)
    if a.cmd == "info":
        from lethe.info import main as info

        info()
    elif a.cmd == "demo":
        from lethe.demo import main as demo

        return demo(a)
    elif a.cmd == "unlearn":
        from lethe.methods.cli import run_unlearn

        return run_unlearn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
