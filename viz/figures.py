"""Figures and tables comparing the decoder alone with decoder+coprocessor.

Pure functions: numpy arrays / lists / DataFrames in, plotly figures or pandas
DataFrames out. Nothing here runs a model, so the same calls serve the Gradio
app (``gr.Plot`` / ``gr.Dataframe``), the CLI (``figure_to_html`` /
``frame_to_csv``) and notebooks.

Usage::

    from cacheaug_core.viz.figures import summary_table, per_token_frame, delta_by_position_figure
    table = summary_table(nll_base, nll_aug)          # (n,) arrays, NaN = unscored
    fig = delta_by_position_figure(by_position_df)    # position, nll_base, nll_aug
    figure_to_html(fig)                               # standalone, works offline

Sign convention: ``delta = nll_aug - nll_base``; relative perplexity change is
``(exp(mean nll_aug - mean nll_base) - 1) * 100`` %. Negative = augmentation
lowers loss/perplexity (helps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .tokens import clean_token, display_token, plotly_text, truncate_label

__all__ = [
    "DECODER",
    "AUGMENTED",
    "NEG_HELPS",
    "DIVERGING_SCALE",
    "summary_table",
    "delta_interval",
    "per_token_frame",
    "delta_by_position_figure",
    "delta_heatmap_figure",
    "topk_frame",
    "topk_compare_frame",
    "kl_divergence",
    "entropy",
    "attention_to_latents_figure",
    "figure_to_html",
    "fit_small_screens",
    "frame_to_csv",
]

DECODER = "decoder"
AUGMENTED = "decoder+coprocessor"
NEG_HELPS = "negative = augmentation lowers perplexity"

# Blue (negative, helps) -> white -> red (positive, hurts); same hues as viz.tokens.
DIVERGING_SCALE = [
    [0.0, "rgb(37,99,235)"],
    [0.5, "rgb(245,245,245)"],
    [1.0, "rgb(220,38,38)"],
]
_ARM_COLOURS = {DECODER: "#6b7280", AUGMENTED: "#7c3aed"}


def _empty_figure(title: str, message: str = "no data") -> go.Figure:
    """A figure that says why it is empty instead of showing blank axes."""
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[{"text": message, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
    )
    return fig


def _vec(a: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def summary_table(nll_base: np.ndarray, nll_aug: np.ndarray, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean NLL, perplexity and relative change for both arms.

    Args:
        nll_base, nll_aug: (n,) per-token NLL in nats. Only positions where
            *both* are finite count, so the two arms are scored on the same tokens.
        n_boot, seed: bootstrap resamples of the scored tokens for the interval.

    Returns:
        3 rows (``decoder``, ``decoder+coprocessor``, ``change``) with columns
        ``arm``, ``mean NLL``, ``perplexity``, ``relative change %``, ``95% interval %``,
        ``tokens scored``. The change row holds the signed Δ mean NLL (nats, aug − base),
        the relative perplexity change ``(ppl_aug / ppl_base − 1)·100`` and its 95% percentile
        bootstrap interval over tokens as text (``[-9.2%, +3.5%]``); its perplexity cell is empty
        (a difference of perplexities mixes scales). Tokens of one text are correlated, so the
        interval is a lower bound on the uncertainty: when it includes 0 the text says nothing.
    """
    b = _vec(nll_base, "nll_base")
    a = _vec(nll_aug, "nll_aug")
    if b.shape != a.shape:
        raise ValueError(f"nll_base {b.shape} and nll_aug {a.shape} differ in shape")
    mask = np.isfinite(b) & np.isfinite(a)
    n = int(mask.sum())
    ci = ""
    if n:
        mb, ma = float(b[mask].mean()), float(a[mask].mean())
        pb, pa = math.exp(mb), math.exp(ma)
        rel = math.expm1(ma - mb) * 100.0  # expm1: exact for small differences
        lo, hi = delta_interval(a[mask] - b[mask], n_boot, seed)
        if math.isfinite(lo):
            ci = f"[{lo:+.2f}%, {hi:+.2f}%]"
    else:
        mb = ma = pb = pa = rel = float("nan")
    return pd.DataFrame(
        {
            "arm": [DECODER, AUGMENTED, "change"],
            "mean NLL": [mb, ma, ma - mb],
            "perplexity": [pb, pa, float("nan")],
            "relative change %": [float("nan"), float("nan"), rel],
            "95% interval %": ["", "", ci],
            "tokens scored": [n, n, n],
        }
    )


def delta_interval(delta: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """95% percentile bootstrap interval (tokens resampled) of the relative perplexity change, %,
    from per-token Δ = NLL(aug) − NLL(base); (nan, nan) for fewer than 2 tokens."""
    d = np.asarray(delta, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    rel = np.expm1(d[idx].mean(1)) * 100.0
    q = (1 - level) / 2 * 100
    lo, hi = np.percentile(rel, [q, 100 - q])
    return float(lo), float(hi)


def per_token_frame(
    tokens: Sequence[str],
    nll_base: np.ndarray,
    nll_aug: np.ndarray,
    offsets: np.ndarray | Sequence | None = None,
    *,
    raw: bool = False,
) -> pd.DataFrame:
    """One row per token: ``index, token, nll_base, nll_aug, delta`` (the CSV export).

    Args:
        tokens: n token strings.
        nll_base, nll_aug: (n,) per-token NLL; NaN = not scored (delta is NaN too).
        offsets: optional character offsets into the source text, either (n,)
            start positions (adds column ``offset``) or (n, 2) start/end pairs
            (adds ``start``, ``end``).
        raw: keep token text byte-exact. By default invisible/control characters
            (bidi overrides, zero-width, lone surrogates) are written as visible
            ``\\uXXXX`` escapes so the file is safe to open anywhere.
    """
    toks = list(tokens)
    n = len(toks)
    b = _vec(nll_base, "nll_base")
    a = _vec(nll_aug, "nll_aug")
    if b.shape[0] != n or a.shape[0] != n:
        raise ValueError(f"{n} tokens but nll_base has {b.shape[0]} and nll_aug {a.shape[0]} values")
    df = pd.DataFrame(
        {
            "index": np.arange(n, dtype=np.int64),
            # object dtype: pandas' default Arrow strings reject lone surrogates,
            # which raw token text may contain.
            "token": pd.Series([t if raw else clean_token(t) for t in toks], dtype=object),
            "nll_base": b,
            "nll_aug": a,
            "delta": a - b,  # NaN propagates: unscored stays unscored
        }
    )
    if offsets is not None:
        off = np.asarray(offsets)
        if off.shape[0] != n:
            raise ValueError(f"offsets has {off.shape[0]} rows but there are {n} tokens")
        if off.ndim == 2 and off.shape[1] == 2:
            df["start"] = off[:, 0].astype(np.int64)
            df["end"] = off[:, 1].astype(np.int64)
        else:
            df["offset"] = off.reshape(n).astype(np.int64)
    return df


def topk_frame(tokens: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """Top-k next-token table: columns ``rank`` (1-based), ``token`` (whitespace visible), ``prob``.

    Rows are sorted by descending probability whatever the input order.
    """
    p = _vec(probs, "probs")
    toks = list(tokens)
    if len(toks) != p.shape[0]:
        raise ValueError(f"{len(toks)} tokens but {p.shape[0]} probabilities")
    order = np.argsort(-p, kind="stable")
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1, dtype=np.int64),
            "token": [display_token(toks[i]) for i in order],
            "prob": p[order],
        }
    )


def topk_compare_frame(
    base_tokens: Sequence[str],
    base_probs: np.ndarray,
    aug_tokens: Sequence[str],
    aug_probs: np.ndarray,
) -> pd.DataFrame:
    """Side-by-side top-k of both arms at one position.

    Columns: ``rank``, ``decoder token``, ``decoder p``, ``decoder+coprocessor token``,
    ``decoder+coprocessor p``. Lists of different length are padded with ""/NaN.
    """
    b = topk_frame(base_tokens, base_probs)
    a = topk_frame(aug_tokens, aug_probs)
    k = max(len(b), len(a))

    def pad(df: pd.DataFrame, col: str, fill):
        vals = list(df[col])
        return vals + [fill] * (k - len(vals))

    return pd.DataFrame(
        {
            "rank": np.arange(1, k + 1, dtype=np.int64),
            f"{DECODER} token": pad(b, "token", ""),
            f"{DECODER} p": np.asarray(pad(b, "prob", float("nan")), dtype=np.float64),
            f"{AUGMENTED} token": pad(a, "token", ""),
            f"{AUGMENTED} p": np.asarray(pad(a, "prob", float("nan")), dtype=np.float64),
        }
    )


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """KL(p ‖ q) in nats between two distributions over the same support.

    Both are renormalised to sum to 1 (so top-k truncations can be compared);
    terms with p = 0 contribute 0, and q is floored at ``eps`` so a q = 0 where
    p > 0 gives a large finite value instead of inf. Identical inputs give 0.
    """
    pp = np.asarray(p, dtype=np.float64).reshape(-1)
    qq = np.asarray(q, dtype=np.float64).reshape(-1)
    if pp.shape != qq.shape:
        raise ValueError(f"p {pp.shape} and q {qq.shape} differ in shape")
    if np.any(pp < 0) or np.any(qq < 0) or not (np.all(np.isfinite(pp)) and np.all(np.isfinite(qq))):
        raise ValueError("p and q must be finite and non-negative")
    sp, sq = pp.sum(), qq.sum()
    if sp <= 0 or sq <= 0:
        raise ValueError("p and q must have positive mass")
    pp, qq = pp / sp, qq / sq
    nz = pp > 0
    kl = float(np.sum(pp[nz] * (np.log(pp[nz]) - np.log(np.maximum(qq[nz], eps)))))
    return max(kl, 0.0)  # clamp round-off below zero


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a (renormalised) distribution; 0·log 0 = 0."""
    pp = np.asarray(p, dtype=np.float64).reshape(-1)
    s = pp.sum()
    if s <= 0:
        return float("nan")
    pp = pp / s
    nz = pp > 0
    return float(-np.sum(pp[nz] * np.log(pp[nz])))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def delta_by_position_figure(df: pd.DataFrame, title: str | None = None, reference: pd.DataFrame | None = None,
                             reference_name: str = "reference", units: str = "pct", rolling: int = 5) -> go.Figure:
    """Relative perplexity change by ahead position, plus both arms' perplexities.

    Args:
        df: one row per ahead position with columns ``position`` (int ≥ 1),
            ``nll_base``, ``nll_aug`` (mean NLL at that position, nats); optional
            ``ci_low``, ``ci_high``: bounds of the relative change **in percent**
            (same units as the plotted line); optional ``n`` (tokens averaged).

    Returns:
        Two stacked panels sharing x. Top: ``(exp(nll_aug − nll_base) − 1)·100`` %
        (trace ``relative change``, with a zero line and an optional CI band).
        Bottom: perplexity of ``decoder`` and ``decoder+coprocessor`` (log scale).
        reference: optional typical values (``position, rel_ppl_change_pct, ci_low, ci_high``, e.g. the
        checkpoint's stored evaluation) drawn as grey markers with their intervals in the top panel.
        units: "pct" (relative perplexity change, for means over many tokens) or "nats" (Δloss per
        position with a `rolling`-position mean: one token per position, as after a single
        augmentation point, where a percentage of one token's perplexity explodes). title "" = none.
    """
    title = f"Perplexity change by position ahead ({NEG_HELPS})" if title is None else title
    nats = units == "nats"
    if df is None or len(df) == 0:
        return _empty_figure(title)
    missing = {"position", "nll_base", "nll_aug"} - set(df.columns)
    if missing:
        raise ValueError(f"df is missing columns {sorted(missing)}")
    d = df.sort_values("position").reset_index(drop=True)
    pos = d["position"].to_numpy()
    nb = d["nll_base"].to_numpy(dtype=np.float64)
    na = d["nll_aug"].to_numpy(dtype=np.float64)
    rel = np.expm1(na - nb) * 100.0
    ppl_b, ppl_a = np.exp(nb), np.exp(na)
    n_col = d["n"].to_numpy() if "n" in d.columns else np.full(len(d), np.nan)

    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        subplot_titles=((f"Δloss, nats (negative = the latents help); line: mean of {rolling} positions" if nats
                         else f"relative perplexity change, % ({NEG_HELPS})"), "perplexity of each arm"),
    )
    has_ci = "ci_low" in d.columns and "ci_high" in d.columns and not nats
    if has_ci:
        lo = d["ci_low"].to_numpy(dtype=np.float64)
        hi = d["ci_high"].to_numpy(dtype=np.float64)
        # Band: upper edge then lower edge filled to it; legend entry only once.
        fig.add_trace(
            go.Scatter(x=pos, y=hi, mode="lines", line={"width": 0}, hoverinfo="skip",
                       showlegend=False, name="CI high"),
            row=1, col=1,
        )
        fig.add_trace(
            go.Scatter(x=pos, y=lo, mode="lines", line={"width": 0}, fill="tonexty",
                       fillcolor="rgba(124,58,237,0.18)", hoverinfo="skip", name="confidence interval"),
            row=1, col=1,
        )
        ci_text = [f"[{a:+.2f}%, {b:+.2f}%]" for a, b in zip(lo, hi)]
    else:
        ci_text = [""] * len(d)
    custom = np.column_stack([nb, na, ppl_b, ppl_a, n_col, np.array(ci_text, dtype=object)])
    if nats:
        delta = na - nb
        roll = pd.Series(delta).rolling(max(int(rolling), 1), center=True, min_periods=1).mean().to_numpy()
        fig.add_trace(go.Scatter(x=pos, y=delta, mode="markers", name="Δloss per token",
                                 marker={"color": np.where(delta < 0, "rgb(37,99,235)", "rgb(220,38,38)"), "size": 6},
                                 customdata=np.column_stack([nb, na]),
                                 hovertemplate="position %{x}<br>Δloss %{y:+.4f} nats<br>NLL base %{customdata[0]:.4f}"
                                               " · aug %{customdata[1]:.4f}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=pos, y=roll, mode="lines", name=f"rolling mean ({rolling})",
                                 line={"color": "rgb(60,60,60)", "width": 2},
                                 hovertemplate="position %{x}<br>rolling mean %{y:+.4f} nats<extra></extra>"),
                      row=1, col=1)
        reference = None   # the stored reference is a percentage over many tokens: the verdict quotes it
    fig.add_trace(
        go.Scatter(
            x=pos, y=rel, mode="lines+markers", name="relative change", visible=not nats,
            line={"color": "rgb(60,60,60)"},
            customdata=custom,
            hovertemplate=(
                "position %{x}<br>change %{y:+.3f}% " + ("CI %{customdata[5]}" if has_ci else "")
                + "<br>NLL base %{customdata[0]:.4f} · aug %{customdata[1]:.4f}"
                "<br>PPL base %{customdata[2]:.3f} · aug %{customdata[3]:.3f}"
                + ("<br>tokens %{customdata[4]}" if "n" in d.columns else "")
                + "<extra></extra>"
            ),
        ),
        row=1, col=1,
    )
    if reference is not None and len(reference):
        r = reference[reference["position"] <= max(int(pos.max()), 1)] if len(pos) else reference
        ry = r["rel_ppl_change_pct"].to_numpy(dtype=np.float64)
        fig.add_trace(
            go.Scatter(
                x=r["position"], y=ry, mode="markers", name=plotly_text(reference_name),
                marker={"color": "rgb(100,100,100)", "symbol": "diamond", "size": 8},
                error_y={"type": "data", "symmetric": False, "array": r["ci_high"].to_numpy(dtype=np.float64) - ry,
                         "arrayminus": ry - r["ci_low"].to_numpy(dtype=np.float64), "color": "rgb(100,100,100)"},
                hovertemplate="typical at position %{x}: %{y:+.2f}%<extra>" + plotly_text(reference_name)[:60]
                + "</extra>",
            ),
            row=1, col=1,
        )
    fig.add_hline(y=0, line={"color": "rgba(127,127,127,0.8)", "dash": "dash"}, row=1, col=1)
    for name, ppl in ((DECODER, ppl_b), (AUGMENTED, ppl_a)):
        fig.add_trace(
            go.Scatter(
                x=pos, y=ppl, mode="lines+markers", name=name,
                line={"color": _ARM_COLOURS[name], "dash": "dot" if name == DECODER else "solid"},
                hovertemplate=f"{name}<br>position %{{x}}<br>perplexity %{{y:.3f}}<extra></extra>",
            ),
            row=2, col=1,
        )
    fig.update_yaxes(title_text="Δloss (nats)" if nats else "Δ perplexity (%)", zeroline=True, row=1, col=1)
    fig.update_yaxes(title_text="perplexity (log)", type="log", row=2, col=1)
    fig.update_xaxes(title_text="position ahead of the augmentation point", dtick=1 if len(d) <= 32 else None,
                     row=2, col=1)
    fig.update_layout(title=title or None, hovermode="closest", legend={"orientation": "h", "y": -0.15},
                      margin={"t": 80})
    return fig


def _token_axis(tokens: Sequence[str], max_len: int) -> tuple[list[int], list[str], list[str]]:
    """Numeric positions + escaped, truncated tick labels + escaped full hover labels.

    Numeric x (not the token strings) so repeated tokens get their own columns;
    a categorical axis would merge every "the" into one.
    """
    full = [plotly_text(display_token(t)) for t in tokens]
    ticks = [plotly_text(truncate_label(display_token(t), max_len)) for t in tokens]
    return list(range(len(tokens))), ticks, full


def delta_heatmap_figure(
    tokens: Sequence[str],
    delta_matrix: np.ndarray,
    title: str | None = None,
    max_label_len: int = 10,
    axis: str = "point",
) -> go.Figure:
    """Heatmap of Δloss: rows = ahead positions 1..n, columns = augmentation points
    (``axis="point"``) or scored tokens (``axis="token"``: column j = token j, scored with the
    latents inserted ``position`` tokens earlier; see ``viz.app_views.by_scored_token``).

    Args:
        tokens: m token strings; column i = the cache is augmented after token i.
        delta_matrix: (n_ahead, m) Δloss = nll_aug − nll_base of the token
            ``position`` steps after token i; NaN = not available (blank cell).

    The colour scale is diverging and centred at 0 (blue = helps, red = hurts),
    symmetric at the largest |Δ|; hover shows the exact value.
    """
    title = title or "Δloss by augmentation point and position ahead (negative = augmentation lowers loss)"
    z = np.asarray(delta_matrix, dtype=np.float64)
    if z.ndim == 1:
        z = z[None, :]
    toks = list(tokens)
    if z.size == 0 or len(toks) == 0:
        return _empty_figure(title)
    if z.shape[1] != len(toks):
        raise ValueError(f"delta_matrix has {z.shape[1]} columns but there are {len(toks)} tokens")
    xs, ticks, full = _token_axis(toks, max_label_len)
    ys = list(range(1, z.shape[0] + 1))
    finite = np.abs(z[np.isfinite(z)])
    zmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    # customdata (n_ahead, m): the full escaped token for every cell's hover.
    custom = np.array([full] * z.shape[0], dtype=object)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=xs, y=ys, customdata=custom,
            colorscale=DIVERGING_SCALE, zmid=0.0, zmin=-zmax, zmax=zmax,
            colorbar={"title": {"text": "Δloss"}},
            hovertemplate=("after token #%{x} %{customdata}<br>position ahead %{y}" if axis == "point" else
                           "token #%{x} %{customdata}<br>latents inserted %{y} token(s) earlier")
            + "<br>Δloss=%{z:+.4f}<extra></extra>",
            hoverongaps=False,
            name="Δloss",
        )
    )
    step = max(1, math.ceil(len(xs) / 60))  # keep tick labels readable on long texts
    fig.update_xaxes(tickmode="array", tickvals=xs[::step], ticktext=ticks[::step], tickangle=-60,
                     title_text="augmentation point (after token)" if axis == "point" else "scored token",
                     showgrid=False)
    fig.update_yaxes(title_text="position ahead" if axis == "point" else "latents inserted n tokens earlier",
                     tickmode="array", tickvals=ys, ticktext=[str(y) for y in ys], autorange="reversed", showgrid=False)
    # Unscored cells (NaN) stay see-through: a coloured plot background would read as a value.
    fig.update_layout(title=title, plot_bgcolor="rgba(0,0,0,0)")
    return fig


def attention_to_latents_figure(
    tokens: Sequence[str],
    mass: np.ndarray,
    title: str | None = None,
    max_label_len: int = 10,
) -> go.Figure:
    """Heatmap of the attention mass each continuation token puts on each latent.

    Args:
        tokens: n continuation token strings (columns).
        mass: (n, num_latents) attention probability mass on each latent slot,
            e.g. averaged over heads and layers; rows of tokens, columns of latents.

    Shown with latents as rows and tokens as columns (reading order left to right);
    a sequential colour scale from 0; hover gives the exact mass.
    """
    title = title or "Attention mass on each latent, per continuation token"
    m = np.asarray(mass, dtype=np.float64)
    toks = list(tokens)
    if m.size == 0 or len(toks) == 0:
        return _empty_figure(title)
    if m.ndim != 2 or m.shape[0] != len(toks):
        raise ValueError(f"mass must be (n_tokens={len(toks)}, num_latents), got {m.shape}")
    xs, ticks, full = _token_axis(toks, max_label_len)
    z = m.T  # (num_latents, n_tokens)
    ys = list(range(z.shape[0]))
    custom = np.array([full] * z.shape[0], dtype=object)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=xs, y=ys, customdata=custom, colorscale="Viridis", zmin=0.0,
            colorbar={"title": {"text": "attention"}},
            hovertemplate="token #%{x} %{customdata}<br>latent %{y}<br>mass=%{z:.5f}<extra></extra>",
            name="attention to latents",
        )
    )
    step = max(1, math.ceil(len(xs) / 60))
    fig.update_xaxes(tickmode="array", tickvals=xs[::step], ticktext=ticks[::step], tickangle=-60,
                     title_text="continuation token")
    fig.update_yaxes(title_text="latent", autorange="reversed")
    fig.update_layout(title=title)
    return fig


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def figure_to_html(fig: go.Figure) -> str:
    """Full standalone HTML page for a figure with plotly.js inlined (works offline, no CDN)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})


def frame_to_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as UTF-8 CSV without the index; creates parent folders.

    Characters UTF-8 cannot encode (lone surrogates in raw token text) are
    written as backslash escapes rather than raising. Returns the path.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(p, index=False, encoding="utf-8", errors="backslashreplace", lineterminator="\n")
    return p


def _wrap_plotly_text(text: str, width: int) -> str:
    """Break a plotly title / annotation into lines of about `width` characters at spaces (plotly
    never wraps text itself: a long title is cut off on a narrow screen). Text already holding
    line breaks is left as it is."""
    if not text or len(text) <= width or "<br>" in text:
        return text
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return "<br>".join(lines + [cur])


def fit_small_screens(fig: go.Figure, plot_height: int = 260, width_px: int = 300) -> go.Figure:
    """Make a figure readable from a 390-px phone to a desktop, in place (returned for chaining).

    Plotly keeps a figure's margins and legend whatever the width: on a phone the default 80-px side
    margins and a legend at the right leave a plot area of 40-160 px, and a legend of many rows under
    a fixed-height figure squeezes the plot vertically. So: narrow side margins, long titles and
    annotations wrapped, the legend as rows at the bottom of the figure, and the figure made taller
    by the legend's rows (counted as on a phone, about 320 px a row), keeping `plot_height` px per
    subplot row for the plots themselves. Text is wrapped to `width_px` at about 0.55 em a character.
    On a wide screen the legend takes fewer rows and leaves some space below it."""
    lay = fig.layout

    def chars(size) -> int:
        return max(20, int(width_px / (0.55 * float(size or 12))))

    top = 28
    if lay.title is not None and lay.title.text:
        size = lay.title.font.size or (lay.font.size if lay.font and lay.font.size else None) or 17
        wrapped = _wrap_plotly_text(lay.title.text, chars(size))
        # From the top of the figure down, in a top margin sized for its lines (plotly lays the lines
        # of a title anchored at the plot's edge out over the plot); 36 px clear of the top edge,
        # where Gradio draws the gr.Plot's own label over the figure.
        fig.update_layout(title={"text": wrapped, "x": 0.02, "xanchor": "left", "xref": "container",
                                 "y": 1, "yanchor": "top", "yref": "container", "pad": {"t": 36}})
        top = 48 + int((wrapped.count("<br>") + 1) * 1.35 * float(size))
    for ann in fig.layout.annotations or ():
        if isinstance(ann.text, str):
            ann.text = _wrap_plotly_text(ann.text, chars(ann.font.size or 12))
    shown = [t for t in fig.data if t.showlegend is not False and (t.name or "")]
    legend_px = 0
    if shown and fig.layout.showlegend is not False:
        # Entries per 320-px row: about 6.5 px a character plus 45 px of symbol and gap.
        rows, used = 1, 0.0
        for t in shown:
            w = min(1.0, (45 + 6.5 * len(str(t.name))) / 320)
            if used + w > 1.0:
                rows, used = rows + 1, 0.0
            used += w
        legend_px = 21 * rows + (21 if lay.legend.title.text else 0) + 8
    bottom = 56 + legend_px
    n_rows = max(1, len({getattr(a, "domain", None) and tuple(a.domain) for a in
                         (fig.layout[k] for k in fig.layout if str(k).startswith("yaxis"))}))
    if any(t.type in ("scatter3d",) for t in fig.data):
        n_rows = 1
    height = max(int(fig.layout.height or 0), plot_height * n_rows + top + bottom)
    fig.update_layout(margin={"l": 56, "r": 18, "t": top, "b": bottom}, height=height)
    if legend_px:
        # Right under the x-axis title whatever the width (the plot area's height is fixed by the margins);
        # what a wide screen does not need of the legend's room stays blank below it.
        fig.update_layout(legend={"orientation": "h", "x": 0, "xanchor": "left", "yref": "paper", "yanchor": "top",
                                  "y": -50 / max(height - top - bottom, 1)})
    return fig
