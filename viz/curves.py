"""Training curves: held-out relative perplexity change by ahead position over training steps.

Pure functions over the trainer's `metrics.jsonl` records (the lines with an "eval" entry), so the
same figure serves notebooks, the app and `bench/plot_curves.py` (which also renders PNGs)::

    from cacheaug_core.viz.curves import read_metrics, curve_frame, training_curve_figure
    runs = {"gated": read_metrics("results/runs/gated_metrics.jsonl")}
    fig = training_curve_figure(curve_frame(runs), positions=(1, 2, 4, 8, 16))

Sign: negative = the latents lower perplexity (the paper's sign).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go

__all__ = ["read_metrics", "chain_stages", "curve_frame", "training_curve_figure"]


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON records of a metrics.jsonl file; blank or truncated lines (a killed run) are skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def chain_stages(stages: Sequence[list[dict]]) -> list[dict]:
    """One run trained in stages (a later stage `--init-from` the previous one's weights, its steps
    counted from 0 again) as one record list: each stage's steps continue from the previous stage's
    last step."""
    out, offset = [], 0
    for records in stages:
        last = offset
        for r in records:
            if "step" in r:
                r = dict(r, step=int(r["step"]) + offset)
                last = max(last, r["step"])
            out.append(r)
        offset = last
    return out


def curve_frame(runs: Mapping[str, Iterable[dict]]) -> pd.DataFrame:
    """Long table: run, step, position (1-based), rel_ppl_change_pct, nll_base, nll_aug."""
    rows = []
    for run, records in runs.items():
        for r in records:
            ev = r.get("eval")
            if not ev or "rel_ppl_change_pct" not in ev:
                continue
            for i, rel in enumerate(ev["rel_ppl_change_pct"]):
                rows.append({"run": run, "step": int(r["step"]), "position": i + 1, "rel_ppl_change_pct": float(rel),
                             "nll_base": float(ev["nll_base"][i]), "nll_aug": float(ev["nll_aug"][i])})
    cols = ["run", "step", "position", "rel_ppl_change_pct", "nll_base", "nll_aug"]
    return pd.DataFrame(rows, columns=cols).sort_values(["run", "position", "step"], kind="stable").reset_index(drop=True)


def training_curve_figure(df: pd.DataFrame, positions: Sequence[int] = (1, 2, 4, 8, 16),
                          title: str = "Held-out relative perplexity change during training") -> go.Figure:
    """One line per (run, position): relative perplexity change (%) against the training step."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    colors = ["#2563eb", "#dc2626", "#059669", "#7c3aed", "#d97706", "#0891b2", "#db2777", "#4b5563"]
    for ri, (run, part) in enumerate(df.groupby("run", sort=False)):
        for pi, pos in enumerate(positions):
            sel = part[part["position"] == pos]
            if sel.empty:
                continue
            fig.add_trace(go.Scatter(
                x=sel["step"], y=sel["rel_ppl_change_pct"], mode="lines+markers",
                name=f"{run} · pos {pos}", line={"dash": dashes[ri % len(dashes)], "color": colors[pi % len(colors)]},
                marker={"color": colors[pi % len(colors)]},
                hovertemplate=f"{run}<br>position {pos}<br>step %{{x}}<br>%{{y:+.2f}}%<extra></extra>"))
    fig.add_hline(y=0, line_color="gray", line_width=1)
    fig.update_layout(title=title, xaxis_title="training step",
                      yaxis_title="relative perplexity change, % (negative = latents help)",
                      template="plotly_white", width=1000, height=560, legend={"font": {"size": 10}})
    return fig
