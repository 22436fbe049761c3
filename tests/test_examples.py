"""The quantisation-recovery demo (`make demo`) on a smaller problem."""
import subprocess
import sys

from lethe.examples.quant_recovery import PRESETS, run


def test_demo_runs_and_reports_every_precision():
    lines = []
    res = run(subjects=256, forget_size=32, train_steps=200, unlearn_steps=15, out=lines.append)
    assert set(res) == {"GradDiff", "DurableUn-SAF"}
    for row in res.values():
        assert set(row) == {"fp32", *PRESETS}
        assert all(0.0 <= f <= 1.0 and 0.0 <= r <= 1.0 for f, r in row.values())
        assert row["fp32"][0] < 1.0  # unlearning removed something at full precision
    text = "\n".join(lines)
    assert "forget accuracy" in text and "quantisation recovery under" in text


def test_cli_demo_help():
    r = subprocess.run([sys.executable, "-m", "lethe.cli", "demo", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--unlearn-steps" in r.stdout
