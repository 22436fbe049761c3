"""`lethe ...` command line (also `python -m lethe.cli ...`)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lethe", description="machine unlearning kernels and methods")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, what was built, and which backend each op uses")
    d = sub.add_parser("demo", help="quantisation-recovery demo on a tiny model built on the spot")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic facts and the models (default 0)")
    d.add_argument("--unlearn-steps", type=int, default=40,
                   help="optimiser steps of each unlearning run, GradDiff and DurableUn-SAF (default 40)")
    d.add_argument("--unlearn-lr", type=float, default=1e-3, help="learning rate of the unlearning runs (default 1e-3)")
    d.add_argument("--saf-alpha", type=float, default=1.0,
                   help="DurableUn-SAF's weight alpha of the quantised forget term (default 1.0)")
    a = p.parse_args(argv)
    if a.cmd == "info":
        from lethe.info import main as info

        info()
    elif a.cmd == "demo":
        from lethe.examples.quant_recovery import run

        run(seed=a.seed, unlearn_steps=a.unlearn_steps, unlearn_lr=a.unlearn_lr, saf_alpha=a.saf_alpha)
    return 0


if __name__ == "__main__":
    sys.exit(main())
