"""Figures of a corpus run (``cacheaug_core.corpus``): DataFrames in, plotly figures out.

    from cacheaug_core.viz.corpus import corpus_curve_figure, bucket_figure
    fig = corpus_curve_figure(tables["by_position"])          # Δ% by position, bootstrap bands
    fig = bucket_figure(tables["by_surprisal"], "surprisal_nats", "decoder surprisal (nats)")

Sign convention as everywhere in ``viz``: relative perplexity change
(exp(mean NLL(decoder+coprocessor) − mean NLL(decoder)) − 1) × 100 %, negative = the latents help.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .figures import NEG_HELPS, _empty_figure
from .tokens import plotly_text

__all__ = ["corpus_curve_figure", "bucket_figure"]

_ARM = {"coprocessor": ("decoder+coprocessor", (124, 58, 237)), "pause": ("pause tokens", (217, 119, 6))}
_SPLIT = {"all": ("all targets", "solid"), "body": ("body", "dash"), "doc_start": ("document starts", "dot")}


def corpus_curve_figure(df: pd.DataFrame, splits=("all", "body", "doc_start"), title: str | None = None,
                        partial: str = "") -> go.Figure:
    """Relative perplexity change by position ahead, one line per (arm, split), with the 95% bootstrap
    band over documents for the "all" split (columns of ``corpus.by_position``). `partial`: a note
    appended to the title while documents are still being scored."""
    title = title or f"Perplexity change by position ahead, over documents ({NEG_HELPS})"
    if partial:
        title += f" · {partial}"
    if df is None or len(df) == 0:
        return _empty_figure(title, "no document scored yet")
    fig = go.Figure()
    for arm in dict.fromkeys(df["arm"]):
        name, (r, g, b) = _ARM.get(arm, (arm, (37, 99, 235)))
        for split in splits:
            d = df[(df["arm"] == arm) & (df["split"] == split)].sort_values("position")
            if not len(d):
                continue
            label, dash = _SPLIT[split]
            x = d["position"].to_numpy()
            if split == "all" and d["ci_low"].notna().any():
                fig.add_trace(go.Scatter(x=x, y=d["ci_high"], mode="lines", line={"width": 0}, hoverinfo="skip",
                                         showlegend=False, legendgroup=f"{arm}-{split}"))
                fig.add_trace(go.Scatter(x=x, y=d["ci_low"], mode="lines", line={"width": 0}, fill="tonexty",
                                         fillcolor=f"rgba({r},{g},{b},0.16)", hoverinfo="skip",
                                         name=f"{name}: 95% interval (documents)", legendgroup=f"{arm}-{split}"))
            custom = np.column_stack([d["ci_low"], d["ci_high"], d["tokens"], d["documents"], d["delta"]])
            fig.add_trace(go.Scatter(
                x=x, y=d["rel_ppl_change_pct"], mode="lines+markers", name=f"{name}, {label}",
                # document starts are few tokens (4 per document) and swing widely: one legend click away
                visible="legendonly" if split == "doc_start" else True,
                legendgroup=f"{arm}-{split}", line={"color": f"rgb({r},{g},{b})", "dash": dash,
                                                    "width": 2.5 if split == "all" else 1.5},
                customdata=custom,
                hovertemplate=(f"{plotly_text(name)}, {label}<br>position %{{x}}<br>change %{{y:+.2f}}% "
                               "[%{customdata[0]:+.2f}, %{customdata[1]:+.2f}]<br>Δ %{customdata[4]:+.4f} nats"
                               "<br>%{customdata[2]} tokens, %{customdata[3]} documents<extra></extra>")))
    fig.add_hline(y=0, line={"color": "rgba(127,127,127,0.8)", "dash": "dash"})
    fig.update_xaxes(title_text="position ahead of the augmentation point", dtick=1)
    fig.update_yaxes(title_text="Δ perplexity (%)")
    fig.update_layout(title={"text": plotly_text(title), "font": {"size": 14}}, hovermode="closest",
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 60, "l": 50, "r": 10}, height=420)
    return fig


def bucket_figure(df: pd.DataFrame, key: str, xlabel: str, title: str | None = None) -> go.Figure:
    """Bars of the relative perplexity change per bucket with the bootstrap interval as error bars
    (columns of ``corpus.by_surprisal`` / ``corpus.by_kind``); bars with no token are left out."""
    title = title or f"Perplexity change by {xlabel}"
    if df is None or len(df) == 0 or not (df["tokens"] > 0).any():
        return _empty_figure(title, "no token scored yet")
    d = df[df["tokens"] > 0]
    y = d["rel_ppl_change_pct"].to_numpy(dtype=np.float64)
    lo, hi = d["ci_low"].to_numpy(dtype=np.float64), d["ci_high"].to_numpy(dtype=np.float64)
    err = {"type": "data", "symmetric": False, "array": np.nan_to_num(hi - y), "arrayminus": np.nan_to_num(y - lo)}
    colours = ["rgb(37,99,235)" if v < 0 else "rgb(220,38,38)" for v in y]
    fig = go.Figure(go.Bar(
        x=[plotly_text(str(k)) for k in d[key]], y=y, error_y=err, marker_color=colours,
        customdata=np.column_stack([d["tokens"], lo, hi, d["delta"]]),
        hovertemplate=("%{x}<br>change %{y:+.2f}% [%{customdata[1]:+.2f}, %{customdata[2]:+.2f}]"
                       "<br>Δ %{customdata[3]:+.4f} nats · %{customdata[0]} tokens<extra></extra>")))
    fig.add_hline(y=0, line={"color": "rgba(127,127,127,0.8)"})
    fig.update_xaxes(title_text=xlabel, type="category")
    fig.update_yaxes(title_text="Δ perplexity (%)")
    fig.update_layout(title={"text": plotly_text(title), "font": {"size": 14}}, margin={"t": 60, "l": 50, "r": 10},
                      height=340, showlegend=False)
    return fig
