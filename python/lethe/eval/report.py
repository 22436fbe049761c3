"""The evaluation report: a table when printed, JSON and PNG plots when saved."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Report", "versions"]

_SET_KEYS = ("prob", "rouge", "exact", "truth_ratio")


def versions() -> dict:
    import torch
    import transformers

    import lethe

    return {"lethe": lethe.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.3f}"
    return str(v)


def _rows(m: dict) -> list[tuple[str, object]]:
    rows = []
    for s in ("forget", "retain", "world"):
        if s in m:
            rows += [(f"{s} {k}", m[s].get(k)) for k in _SET_KEYS if k in m[s]]
    for k in ("forget_quality", "model_utility"):
        if k in m:
            rows.append((k, m[k]))
    for a, v in m.get("mia_auc", {}).items():
        rows.append((f"MIA AUC {a}", v))
    for a, v in m.get("priv_leak", {}).items():
        rows.append((f"PrivLeak {a}", v))
    return rows


@dataclasses.dataclass
class Report:
    """The results of one evaluation: `results["native"]` (the model as it is), and per attack
    `results["quant"]` (per preset, Q-INT4, the certificate) and `results["relearn"]`."""

    name: str
    results: dict
    truth_ratios: Optional[np.ndarray] = None
    reference_truth_ratios: Optional[np.ndarray] = None
    config: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key):
        return self.results[key]

    def table(self) -> str:
        cols = [("native", self.results["native"])]
        q = self.results.get("quant")
        if q:
            cols += list(q["presets"].items())
        rows = _rows(self.results["native"])
        head = ["metric"] + [c for c, _ in cols]
        lines = [head]
        for label, _ in rows:
            vals = [label]
            for _, m in cols:
                vals.append(_fmt(dict(_rows(m)).get(label)))
            lines.append(vals)
        w = [max(len(r[i]) for r in lines) for i in range(len(head))]
        out = [f"{self.name}"]
        out += ["  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) for r in lines]
        if q:
            c = q["certificate"]
            out.append(f"Q-INT4 (forget exact match under 4-bit): {_fmt(q['q_int4'])}; "
                       f"({c['epsilon']:g}, {{{', '.join(c['precisions'])}}})-durability certificate: "
                       f"{'holds' if c['holds'] else 'fails'} (worst: {c['worst']} {_fmt(c['worst_score'])})")
        r = self.results.get("relearn")
        if r:
            rec = ", ".join(f"{k} {_fmt(r['before'][k])} -> {_fmt(r['after'][k])}" for k in _SET_KEYS
                            if k in r["before"])
            out.append(f"relearning ({r['config']['steps']} steps on {r['train_examples']} forget examples, "
                       f"held-back {r['held_out_examples']}): {rec}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        def conv(x):
            if isinstance(x, dict):
                return {str(k): conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            if isinstance(x, np.ndarray):
                return x.tolist()
            if isinstance(x, (np.floating, np.integer, np.bool_)):
                return x.item()
            if isinstance(x, float) and not np.isfinite(x):
                return None
            return x
        out = {"name": self.name, "versions": versions(), "config": conv(self.config), "meta": conv(self.meta),
               "results": conv(self._strip(self.results)),
               "forget_truth_ratios": conv(self.truth_ratios),
               "reference_forget_truth_ratios": conv(self.reference_truth_ratios)}
        return out

    @staticmethod
    def _strip(d):
        if isinstance(d, dict):
            return {k: Report._strip(v) for k, v in d.items() if not str(k).startswith("_")}
        return d

    def save(self, out_dir) -> list[Path]:
        """Writes report.json and the PNG plots into `out_dir` (created); returns the paths. Files
        are written under a temporary name and renamed, so an interruption leaves no torn file."""
        out = Path(os.fspath(out_dir))
        out.mkdir(parents=True, exist_ok=True)
        paths = [_write(out / "report.json", json.dumps(self.to_json(), indent=1).encode())]
        paths += self.plots(out)
        return paths

    def plots(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        m = self.results["native"]
        sets = [s for s in ("forget", "retain", "world") if s in m]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        keys = [k for k in _SET_KEYS if any(k in m[s] for s in sets)]
        x = np.arange(len(sets))
        for i, k in enumerate(keys):
            ax.bar(x + (i - (len(keys) - 1) / 2) * 0.2, [m[s].get(k, np.nan) for s in sets], 0.2, label=k)
        ax.set_xticks(x, sets)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{self.name}: metrics per set")
        ax.legend(fontsize=8, ncols=len(keys))
        paths.append(_savefig(fig, out / "metrics.png"))
        plt.close(fig)
        if self.truth_ratios is not None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            bins = np.linspace(0, max(2.0, float(np.nanmax(self.truth_ratios))), 40)
            ax.hist(self.truth_ratios, bins=bins, alpha=0.6, label=self.name)
            if self.reference_truth_ratios is not None:
                ax.hist(self.reference_truth_ratios, bins=bins, alpha=0.6, label="reference (retain model)")
            fq = m.get("forget_quality")
            ax.set_title("forget-set truth ratios" + (f" (forget quality {_fmt(fq)})" if fq is not None else ""))
            ax.set_xlabel("truth ratio")
            ax.legend(fontsize=8)
            paths.append(_savefig(fig, out / "truth_ratios.png"))
            plt.close(fig)
        q = self.results.get("quant")
        if q:
            names = ["native"] + list(q["presets"])
            ms = [m] + list(q["presets"].values())
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for k in ("exact", "rouge", "prob"):
                ax.plot(names, [mm["forget"].get(k, np.nan) for mm in ms], marker="o", label=f"forget {k}")
            ax.plot(names, [mm["model_utility"] for mm in ms], marker="s", label="model utility")
            ax.axhline(q["certificate"]["epsilon"], color="grey", ls="--", lw=1, label="epsilon")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{self.name}: recovery under quantisation")
            ax.legend(fontsize=8)
            paths.append(_savefig(fig, out / "quantisation.png"))
            plt.close(fig)
        return paths


def _write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _savefig(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path
