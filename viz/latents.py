"""Views of the coprocessor's latent embeddings: PCA projector and vocabulary read-out.

The coprocessor emits ``num_latents`` vectors (size d = decoder hidden size) per
augmentation point. Collect them over prompts into an (N, d) array with, per
row, the prompt it came from and its latent slot, then::

    from cacheaug_core.viz.latents import latent_pca, latent_pca_figure, latent_readout_frame
    coords, evr = latent_pca(latents, n_components=2)          # (N, 2), (2,)
    fig = latent_pca_figure(latents, prompt_ids, latent_index,
                            labels=prompt_texts, color_by="prompt", dims=3,
                            hover_tokens=nearest_tokens)       # for gr.Plot
    table = latent_readout_frame(top_tokens, top_probs)        # one row per latent

No model code: nearest vocabulary tokens / read-out probabilities are computed
by the caller (e.g. by projecting latents through the decoder's LM head).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .tokens import display_token, plotly_text, truncate_label

__all__ = ["fit_latent_axes", "latent_pca", "latent_pca_figure", "latent_readout_frame", "project_latents"]


def fit_latent_axes(latents: np.ndarray, n_components: int = 3) -> dict:
    """Principal axes of a reference set of latents, to project other runs onto the same axes.

    Fitted once (e.g. on the latents of fixed reference prompts) and reused, the axes make PCA plots
    of different runs comparable: a run's own PCA rotates and flips with every set of prompts.

    Returns ``{"mean": (d,), "components": (k, d), "explained_variance_ratio": (k,), "n": N}`` with
    k = n_components; rows past what the reference supports are zeros (as in `latent_pca`).
    """
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"reference latents must be a finite (N, d) array, got shape {x.shape}")
    k = int(n_components)
    n, d = x.shape
    mean = x.mean(axis=0) if n else np.zeros(d)
    comps = np.zeros((k, d))
    ratio = np.zeros(k)
    centred = x - mean
    k_fit = min(k, n, d)
    if n >= 2 and k_fit >= 1 and np.any(centred):
        from sklearn.decomposition import PCA   # slow to import; only PCA needs it

        pca = PCA(n_components=k_fit, svd_solver="full").fit(x)
        comps[:k_fit] = pca.components_
        ratio[:k_fit] = np.nan_to_num(pca.explained_variance_ratio_, nan=0.0)
    return {"mean": mean, "components": comps, "explained_variance_ratio": ratio, "n": int(n)}


def project_latents(latents: np.ndarray, axes: dict, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N, n_components) of latents on fitted axes (`fit_latent_axes`), and the share of
    these latents' own variance each axis holds (n_components,): low shares mean the reference axes
    miss how these latents vary."""
    x = np.asarray(latents, dtype=np.float64)
    comps = np.asarray(axes["components"], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != comps.shape[1]:
        raise ValueError(f"latents {x.shape} do not match the axes' size d={comps.shape[1]}: axes of another model?")
    if n_components > comps.shape[0]:
        raise ValueError(f"the axes have {comps.shape[0]} components, {n_components} asked")
    coords = (x - np.asarray(axes["mean"])) @ comps[:n_components].T                 # (N, k)
    total = float(((x - x.mean(axis=0)) ** 2).sum()) if len(x) > 1 else 0.0
    share = (((coords - coords.mean(axis=0)) ** 2).sum(axis=0) / total) if total > 0 else np.zeros(n_components)
    return coords, share


def latent_pca(latents: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Project latents onto their top principal components.

    Args:
        latents: (N, d) float array (one latent vector per row).
        n_components: 2 or 3 (any k ≥ 1 works).

    Returns:
        ``coords`` (N, n_components) and ``explained_variance_ratio`` (n_components,).
        When fewer components exist than asked (N or d below n_components, or all
        points identical), the missing columns / ratios are zeros, so shapes are
        always as requested and the ratios sum to at most 1.
    """
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"latents must be (N, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("latents contain NaN or inf")
    k = int(n_components)
    if k < 1:
        raise ValueError("n_components must be >= 1")
    n, d = x.shape
    coords = np.zeros((n, k), dtype=np.float64)
    ratio = np.zeros(k, dtype=np.float64)
    # PCA needs at least 2 samples and some spread; otherwise every coordinate is
    # 0 around the mean and there is no variance to explain.
    k_fit = min(k, n, d)
    if n < 2 or k_fit < 1:
        return coords, ratio
    centred = x - x.mean(axis=0, keepdims=True)
    if not np.any(centred):
        return coords, ratio
    # Imported here: sklearn is slow to import and only this function needs it.
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k_fit, svd_solver="full")
    coords[:, :k_fit] = pca.fit_transform(x)
    r = np.nan_to_num(pca.explained_variance_ratio_, nan=0.0)
    ratio[:k_fit] = r
    return coords, ratio


def _hover_list(hover_tokens, n: int) -> list[str]:
    """Per-point 'closest tokens' text, escaped for plotly. Accepts str or list[str] per point."""
    if hover_tokens is None:
        return [""] * n
    items = list(hover_tokens)
    if len(items) != n:
        raise ValueError(f"hover_tokens has {len(items)} entries but there are {n} latents")
    out = []
    for h in items:
        if isinstance(h, str):
            out.append(plotly_text(display_token(h, visible_spaces=False)))
        else:
            out.append(", ".join(plotly_text(display_token(t)) for t in h))
    return out


def latent_pca_figure(
    latents: np.ndarray,
    prompt_ids: Sequence[int] | np.ndarray,
    latent_index: Sequence[int] | np.ndarray,
    labels: Sequence[str] | None = None,
    color_by: str = "prompt",
    dims: int = 2,
    hover_tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    norms: np.ndarray | None = None,
    *,
    connect: bool = False,
    max_label_len: int = 40,
    title: str | None = None,
    axes: dict | None = None,
    overlay: np.ndarray | None = None,
    overlay_name: str = "pause tokens",
) -> go.Figure:
    """PCA scatter (2-D or 3-D) of latent embeddings.

    Args:
        latents: (N, d) latent vectors.
        prompt_ids: (N,) int, which prompt each latent came from.
        latent_index: (N,) int, the latent slot (0..num_latents-1) of each row.
        labels: optional prompt names indexed by prompt id (``labels[prompt_id]``),
            used for legend entries and hover; escaped and truncated.
        color_by: ``"prompt"`` (one legend entry / colour per prompt) or
            ``"latent"`` (continuous colour by latent slot, with a colour bar).
        dims: 2 or 3.
        hover_tokens: optional per-point closest vocabulary tokens, either a
            string or a list of strings per point.
        norms: optional (N,) L2 norms; computed from ``latents`` when omitted.
        connect: draw a line through each prompt's latents in slot order.
        axes: fitted reference axes (`fit_latent_axes`): every run is drawn on the same axes,
            so plots of different prompts compare; default: a PCA of these latents alone.
        overlay: optional (M, d) extra latents (e.g. a pause checkpoint's soft tokens, the same
            for every prompt) drawn on the same axes as one trace of distinct markers.

    Hover shows prompt, latent index, norm and closest tokens; the title gives
    each component's explained variance in %.
    """
    if color_by not in ("prompt", "latent"):
        raise ValueError("color_by must be 'prompt' or 'latent'")
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"latents must be (N, d), got shape {x.shape}")
    n = x.shape[0]
    pids = np.asarray(prompt_ids).reshape(-1).astype(np.int64)
    lidx = np.asarray(latent_index).reshape(-1).astype(np.int64)
    if pids.shape[0] != n or lidx.shape[0] != n:
        raise ValueError(f"prompt_ids ({pids.shape[0]}) and latent_index ({lidx.shape[0]}) must have N={n} entries")
    nrm = np.linalg.norm(x, axis=1) if norms is None else np.asarray(norms, dtype=np.float64).reshape(-1)
    if nrm.shape[0] != n:
        raise ValueError(f"norms has {nrm.shape[0]} entries but there are {n} latents")
    hov = _hover_list(hover_tokens, n)

    def prompt_name(pid: int) -> str:
        if labels is not None and 0 <= pid < len(labels):
            return plotly_text(truncate_label(display_token(labels[pid], visible_spaces=False), max_label_len))
        return f"prompt {pid}"

    if n == 0:
        fig = go.Figure()
        fig.update_layout(title=title or "Latent embeddings (no data)")
        return fig

    if axes is not None:
        coords, evr = project_latents(x, axes, dims)
        pct = [f"PC{i + 1} {100 * r:.1f}%" for i, r in enumerate(evr)]
        title = title or (f"Latent embeddings on reference axes (fitted on {axes.get('n', '?')} reference latents; "
                          f"these latents' variance: {', '.join(pct)})")
        axis_titles = [f"reference PC{i + 1} ({100 * r:.1f}% here)" for i, r in enumerate(evr)]
    else:
        coords, evr = latent_pca(x, n_components=dims)
        pct = [f"PC{i + 1} {100 * r:.1f}%" for i, r in enumerate(evr)]
        title = title or f"Latent embeddings, PCA ({', '.join(pct)}; total {100 * evr.sum():.1f}% of variance)"
        axis_titles = [f"PC{i + 1} ({100 * r:.1f}%)" for i, r in enumerate(evr)]

    # customdata columns: prompt name, latent slot, norm, closest tokens.
    names = [prompt_name(int(p)) for p in pids]
    custom = np.empty((n, 4), dtype=object)
    custom[:, 0] = names
    custom[:, 1] = lidx
    custom[:, 2] = [f"{v:.4g}" for v in nrm]
    custom[:, 3] = hov
    hovertemplate = (
        "%{customdata[0]}<br>latent #%{customdata[1]}<br>norm %{customdata[2]}"
        + ("<br>closest: %{customdata[3]}" if hover_tokens is not None else "")
        + "<extra></extra>"
    )
    scatter = go.Scatter3d if dims == 3 else go.Scatter
    size = 4 if dims == 3 else 8

    def make(idx: np.ndarray, name: str, marker: dict, showlegend: bool = True):
        # Points in slot order, so connecting lines follow latent 0 -> 1 -> ...
        idx = idx[np.argsort(lidx[idx], kind="stable")]
        kw = dict(
            x=coords[idx, 0], y=coords[idx, 1],
            mode="lines+markers" if connect else "markers",
            marker=marker, customdata=custom[idx], hovertemplate=hovertemplate,
            name=name, showlegend=showlegend,
        )
        if dims == 3:
            kw["z"] = coords[idx, 2]
        if connect:
            kw["line"] = {"width": 1}
        return scatter(**kw)

    fig = go.Figure()
    if color_by == "prompt":
        for pid in np.unique(pids):
            idx = np.nonzero(pids == pid)[0]
            fig.add_trace(make(idx, prompt_name(int(pid)), {"size": size}))
    else:
        marker = {
            "size": size, "color": lidx, "colorscale": "Viridis",
            "cmin": int(lidx.min()), "cmax": int(max(lidx.max(), lidx.min() + 1)),
            "colorbar": {"title": {"text": "latent #"}},
        }
        if connect:
            # One trace per prompt for the lines; the colour bar only once.
            for j, pid in enumerate(np.unique(pids)):
                idx = np.nonzero(pids == pid)[0]
                m = dict(marker, color=lidx[idx[np.argsort(lidx[idx], kind="stable")]], showscale=(j == 0))
                fig.add_trace(make(idx, prompt_name(int(pid)), m, showlegend=False))
        else:
            fig.add_trace(make(np.arange(n), "latents", marker, showlegend=False))

    if overlay is not None and len(overlay):
        fig.add_trace(_overlay_trace(np.asarray(overlay, dtype=np.float64), x, axes, dims, overlay_name))

    if dims == 3:
        fig.update_layout(scene={"xaxis": {"title": {"text": axis_titles[0]}},
                                 "yaxis": {"title": {"text": axis_titles[1]}},
                                 "zaxis": {"title": {"text": axis_titles[2]}}})
    else:
        fig.update_xaxes(title_text=axis_titles[0])
        fig.update_yaxes(title_text=axis_titles[1])
    fig.update_layout(title=title, legend={"title": {"text": "prompt"}})
    return fig


def _overlay_trace(overlay: np.ndarray, x: np.ndarray, axes: dict | None, dims: int, name: str):
    """Extra latents (M, d) on the figure's axes: the reference axes, or the PCA of `x` (refitted on
    `x` alone, so the main points keep their coordinates)."""
    if overlay.ndim != 2 or overlay.shape[1] != x.shape[1]:
        raise ValueError(f"overlay must be (M, {x.shape[1]}), got shape {overlay.shape}")
    fitted = axes if axes is not None else fit_latent_axes(x, dims)
    pts = project_latents(overlay, fitted, dims)[0]   # same sklearn fit as latent_pca(x): same axes and signs
    m = len(overlay)
    custom = np.empty((m, 2), dtype=object)
    custom[:, 0] = np.arange(m)
    custom[:, 1] = [f"{v:.4g}" for v in np.linalg.norm(overlay, axis=1)]
    kw = dict(x=pts[:, 0], y=pts[:, 1], mode="markers", name=plotly_text(name), customdata=custom,
              marker={"symbol": "diamond-open" if dims == 3 else "x", "size": 5 if dims == 3 else 11,
                      "color": "black", "line": {"width": 1}},
              hovertemplate=plotly_text(name) + "<br>latent #%{customdata[0]}<br>norm %{customdata[1]}<extra></extra>")
    if dims == 3:
        kw["z"] = pts[:, 2]
        return go.Scatter3d(**kw)
    return go.Scatter(**kw)


def latent_readout_frame(top_tokens: Sequence[Sequence[str]], top_probs: np.ndarray) -> pd.DataFrame:
    """"What each latent says": one row per latent with its top-k vocabulary read-out.

    Args:
        top_tokens: num_latents lists of k token strings (most likely first).
        top_probs: (num_latents, k) their probabilities.

    Returns:
        Columns ``latent``, then ``#1``, ``p#1``, ``#2``, ``p#2`` … ``#k``, ``p#k``
        (tokens with whitespace made visible), sorted within each row by
        descending probability.
    """
    probs = np.asarray(top_probs, dtype=np.float64)
    rows_tok = [list(r) for r in top_tokens]
    nl = len(rows_tok)
    if nl == 0:
        return pd.DataFrame({"latent": pd.Series([], dtype=np.int64)})
    if probs.ndim == 1 and nl == 1:
        probs = probs.reshape(1, -1)
    if probs.shape[0] != nl:
        raise ValueError(f"top_probs has {probs.shape[0]} rows but top_tokens has {nl}")
    k = probs.shape[1] if probs.ndim == 2 else 0
    data: dict[str, list] = {"latent": list(range(nl))}
    for j in range(k):
        data[f"#{j + 1}"] = []
        data[f"p#{j + 1}"] = []
    for i in range(nl):
        if len(rows_tok[i]) != k:
            raise ValueError(f"latent {i}: {len(rows_tok[i])} tokens but {k} probabilities")
        order = np.argsort(-probs[i], kind="stable")
        for j, o in enumerate(order):
            data[f"#{j + 1}"].append(display_token(rows_tok[i][o]))
            data[f"p#{j + 1}"].append(float(probs[i, o]))
    return pd.DataFrame(data)


def latent_similarity(latents: np.ndarray, prompt_ids, latent_index) -> dict:
    """Cosine similarity of every pair of latents, and its means over three kinds of pairs:
    same prompt (different slots), same slot across prompts, different slot across prompts. When
    "same slot across prompts" is far above "same prompt", the latents are organised by slot (index),
    not by what the prompt says. Also each slot's mean norm. Rows are sorted by (prompt, slot)."""
    z = np.asarray(latents, dtype=np.float64)
    pid = np.asarray(prompt_ids).reshape(-1)
    idx = np.asarray(latent_index).reshape(-1)
    unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T                                                                  # (N, N)
    same_p = pid[:, None] == pid[None, :]
    same_i = idx[:, None] == idx[None, :]
    off = ~np.eye(len(z), dtype=bool)

    def mean(mask):
        return float(cos[mask].mean()) if mask.any() else float("nan")

    norms = np.linalg.norm(z, axis=1)
    slots = np.unique(idx)
    return {"cos": cos, "within_prompt": mean(same_p & off), "same_slot_across_prompts": mean(same_i & ~same_p),
            "other_slot_across_prompts": mean(~same_i & ~same_p), "slots": slots,
            "slot_norm": np.array([norms[idx == s].mean() for s in slots])}


def latent_similarity_figure(latents: np.ndarray, prompt_ids, latent_index, labels: Sequence[str] | None = None,
                             title: str | None = None) -> go.Figure:
    """Heatmap of the latents' cosine similarities (rows/columns = prompt, then slot), with the
    within / across-prompt means in the title and each slot's mean norm as a bar below."""
    from plotly.subplots import make_subplots

    s = latent_similarity(latents, prompt_ids, latent_index)
    pid = np.asarray(prompt_ids).reshape(-1)
    idx = np.asarray(latent_index).reshape(-1)
    names = [plotly_text(truncate_label(display_token(labels[int(p)], visible_spaces=False), 16))
             if labels is not None and 0 <= int(p) < len(labels) else f"prompt {int(p)}" for p in pid]
    hover = [f"{n} · latent {int(i)}" for n, i in zip(names, idx)]
    title = title or (f"Cosine similarity of latents: same prompt {s['within_prompt']:.2f} · same slot across "
                      f"prompts {s['same_slot_across_prompts']:.2f} · other slots across prompts "
                      f"{s['other_slot_across_prompts']:.2f}")
    fig = make_subplots(rows=2, cols=1, row_heights=[0.75, 0.25], vertical_spacing=0.1,
                        subplot_titles=("", "mean norm of each latent slot"))
    fig.add_trace(go.Heatmap(z=s["cos"], x=list(range(len(idx))), y=list(range(len(idx))), zmin=-1, zmax=1,
                             colorscale="RdBu_r", customdata=np.array([[f"{a}<br>{b}" for b in hover] for a in hover],
                                                                       dtype=object),
                             hovertemplate="%{customdata}<br>cosine %{z:.3f}<extra></extra>",
                             colorbar={"title": {"text": "cosine"}, "len": 0.7, "y": 0.65}), row=1, col=1)
    fig.add_trace(go.Bar(x=[int(x) for x in s["slots"]], y=s["slot_norm"], marker_color="rgb(124,58,237)",
                         hovertemplate="slot %{x}: mean norm %{y:.2f}<extra></extra>", showlegend=False), row=2, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="latent slot", row=2, col=1)
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=620, margin={"t": 70})
    return fig
