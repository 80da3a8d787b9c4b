"""Tests for the ``viz`` package: escaping of hostile token text, exact values in
hover titles, NaN handling, table arithmetic, PCA shapes and figure structure.

Fast and model-free: run with ``pytest tests/test_viz.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from cacheaug_core import viz
from cacheaug_core.viz import (
    attention_to_latents_figure,
    delta_by_position_figure,
    delta_heatmap_figure,
    entropy,
    figure_to_html,
    frame_to_csv,
    kl_divergence,
    latent_pca,
    latent_pca_figure,
    latent_readout_frame,
    per_token_frame,
    summary_table,
    token_delta_html,
    topk_compare_frame,
    topk_frame,
)

HOSTILE = [
    "<script>alert(1)</script>",
    '" onmouseover="x',
    "' onfocus='y",
    "\u202eevil\u202c",
    "a\u2066b\u2069",
    "zero\u200bwidth",
    "\ud800lone",
    "line\nbreak",
    "\t",
    "",
    "&amp;",
]


class _Collector(HTMLParser):
    """Records every start tag with its attributes, and all text data."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html_str: str) -> _Collector:
    c = _Collector()
    c.feed(html_str)
    c.close()
    return c


# ---------------------------------------------------------------------------
# token_delta_html
# ---------------------------------------------------------------------------


def test_token_html_escapes_hostile_tokens():
    delta = np.linspace(-1, 1, len(HOSTILE))
    out = token_delta_html(HOSTILE, delta, delta + 2, delta * 2 + 2)
    # It must always be encodable, even with a lone surrogate in the input.
    out.encode("utf-8")
    assert "<script" not in out.lower()
    assert "onmouseover=\"" not in out and "onfocus='" not in out
    for ch in ("\u202e", "\u202c", "\u2066", "\u2069", "\u200b", "\ud800"):
        assert ch not in out
    assert "\\u202e" in out and "\\u200b" in out and "\\ud800" in out
    p = _parse(out)
    spans = [a for t, a in p.tags if t == "span" and "tok" in a.get("class", "").split()]
    assert len(spans) == len(HOSTILE)
    # No attribute breakout: every element carries only the attributes we emit.
    allowed = {"class", "style", "title", "data-idx", "data-delta"}
    for tag, attrs in p.tags:
        assert tag in {"div", "span", "br"}
        assert set(attrs) <= allowed, attrs
        assert not any(k.startswith("on") for k in attrs)
    # Text survives as text: the parsed page shows the script token literally.
    text = "".join(p.text)
    assert "<script>alert(1)</script>" in text
    assert '" onmouseover="x' in text
    assert "&amp;" in text  # the literal token "&amp;" stays as typed
    assert "\u21b5" in text  # newline made visible
    assert out.count("<br>") == 1


def test_token_html_container_and_indices():
    out = token_delta_html(["a", "b", "c"], np.array([0.1, -0.2, 0.0]), selected=1)
    assert out.startswith('<div class="cacheaug-tokens">')
    p = _parse(out)
    spans = [a for t, a in p.tags if t == "span" and "tok" in a.get("class", "").split()]
    assert [s["data-idx"] for s in spans] == ["0", "1", "2"]
    assert "selected" in spans[1]["class"].split()
    assert "<script" not in out and "onclick" not in out


def test_token_html_titles_have_exact_values():
    toks = ["x"] * 18
    base = np.full(18, 1.0)
    aug = np.full(18, 1.0)
    base[17], aug[17] = 2.345, 2.222
    delta = aug - base
    out = token_delta_html(toks, delta, base, aug)
    assert 'title="Δloss=-0.123 · base 2.345 · aug 2.222 · #17"' in out
    assert 'title="Δloss=+0.000 · base 1.000 · aug 1.000 · #0"' in out


def test_token_html_nan_is_neutral_and_legend_present():
    delta = np.array([np.nan, np.nan, -0.5, 0.5])
    out = token_delta_html(["p", "q", "a", "b"], delta)
    p = _parse(out)
    spans = [a for t, a in p.tags if t == "span" and "tok" in a.get("class", "").split()]
    assert "background:transparent" in spans[0]["style"]
    assert "unscored" in spans[0]["class"]
    assert spans[0]["title"] == "not scored · #0"
    assert "rgba(37,99,235" in spans[2]["style"]  # negative = blue
    assert "rgba(220,38,38" in spans[3]["style"]  # positive = red
    assert "cacheaug-legend" in out
    assert "Negative (blue) = augmentation lowers the loss" in out


def test_token_html_all_nan_and_delta_from_nll():
    out = token_delta_html(["a", "b"], np.array([np.nan, np.nan]))
    assert "NaN" not in out
    out2 = token_delta_html(["a"], None, np.array([2.0]), np.array([1.5]))
    assert "Δloss=-0.500" in out2
    with pytest.raises(ValueError):
        token_delta_html(["a", "b"], np.array([0.0]))


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


def test_summary_table_arithmetic_and_nan():
    base = np.array([1.0, 2.0, np.nan, 3.0, 4.0])
    aug = np.array([0.5, 2.5, 1.0, 2.0, np.nan])
    t = summary_table(base, aug)
    assert list(t["arm"]) == ["decoder", "decoder+coprocessor", "change"]
    # Paired positions: 0, 1, 3 -> base mean 2.0, aug mean 5/3.
    mb, ma = 2.0, 5.0 / 3.0
    row = t.set_index("arm")
    assert row.loc["decoder", "mean NLL"] == pytest.approx(mb)
    assert row.loc["decoder+coprocessor", "mean NLL"] == pytest.approx(ma)
    assert row.loc["decoder", "perplexity"] == pytest.approx(math.exp(mb))
    assert row.loc["decoder+coprocessor", "perplexity"] == pytest.approx(math.exp(ma))
    assert row.loc["change", "mean NLL"] == pytest.approx(ma - mb)
    assert np.isnan(row.loc["change", "perplexity"])          # no difference of perplexities (mixed scales)
    assert row.loc["change", "relative change %"] == pytest.approx((math.exp(ma) / math.exp(mb) - 1) * 100)
    assert list(t["tokens scored"]) == [3, 3, 3]
    # The interval: percentiles of exp(mean of resampled deltas) - 1 over the 3 paired tokens.
    lo, hi = (float(x.rstrip("%")) for x in row.loc["change", "95% interval %"].strip("[]").split(", "))
    d = np.array([-0.5, 0.5, -1.0])
    assert np.expm1(d.min()) * 100 - 1e-9 <= lo <= hi <= np.expm1(d.max()) * 100 + 1e-9 and lo < hi


def test_delta_interval_covers_the_mean_and_shrinks_with_tokens():
    from cacheaug_core.viz.figures import delta_interval

    rng = np.random.default_rng(1)
    small = rng.normal(-0.1, 1.0, 20)
    big = rng.normal(-0.1, 1.0, 2000)
    lo_s, hi_s = delta_interval(small)
    lo_b, hi_b = delta_interval(big)
    assert lo_s <= np.expm1(small.mean()) * 100 <= hi_s
    assert hi_b - lo_b < hi_s - lo_s
    assert np.isnan(delta_interval(np.array([1.0]))[0])


def test_summary_table_empty():
    t = summary_table(np.array([np.nan]), np.array([1.0]))
    assert t["tokens scored"].tolist() == [0, 0, 0]
    assert t["mean NLL"].isna().all()


def test_per_token_frame_and_csv(tmp_path):
    toks = ["a", "\u202eb", "\ud800c"]
    df = per_token_frame(toks, np.array([1.0, 2.0, np.nan]), np.array([0.5, 2.5, 1.0]), offsets=[[0, 1], [1, 3], [3, 5]])
    assert list(df.columns[:5]) == ["index", "token", "nll_base", "nll_aug", "delta"]
    assert df["delta"].tolist()[:2] == [-0.5, 0.5]
    assert math.isnan(df["delta"].iloc[2])
    assert df["token"].iloc[1] == "\\u202eb"
    assert df["start"].tolist() == [0, 1, 3]
    path = frame_to_csv(df, tmp_path / "sub" / "tokens.csv")
    back = pd.read_csv(path)
    assert back["token"].tolist() == ["a", "\\u202eb", "\\ud800c"]
    # raw mode keeps the exact text; the CSV writer still never raises.
    raw = per_token_frame(toks, np.zeros(3), np.zeros(3), raw=True)
    assert raw["token"].iloc[1] == "\u202eb"
    frame_to_csv(raw, tmp_path / "raw.csv")


def test_topk_frames_and_kl():
    f = topk_frame([" the", "a", "\n"], np.array([0.2, 0.5, 0.3]))
    assert f["token"].tolist() == ["a", "↵", "␣the"]
    assert f["rank"].tolist() == [1, 2, 3]
    c = topk_compare_frame(["x", "y"], np.array([0.6, 0.4]), ["z"], np.array([1.0]))
    assert list(c.columns) == ["rank", "decoder token", "decoder p", "decoder+coprocessor token", "decoder+coprocessor p"]
    assert c["decoder+coprocessor token"].tolist() == ["z", ""]
    assert math.isnan(c["decoder+coprocessor p"].iloc[1])

    p = np.array([0.1, 0.2, 0.7])
    assert kl_divergence(p, p) == 0.0
    q = np.array([0.3, 0.3, 0.4])
    expected = float(np.sum(p * np.log(p / q)))
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) > 10  # finite, large
    assert math.isfinite(kl_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    assert entropy(np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        kl_divergence(p, q[:2])


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------


def test_delta_by_position_figure():
    df = pd.DataFrame({"position": [2, 1, 3], "nll_base": [2.0, 2.0, 2.0], "nll_aug": [1.9, 1.8, 2.1],
                       "ci_low": [-12.0, -20.0, 5.0], "ci_high": [-8.0, -15.0, 15.0]})
    fig = delta_by_position_figure(df)
    names = [t.name for t in fig.data]
    assert {"relative change", "decoder", "decoder+coprocessor", "confidence interval"} <= set(names)
    rel = next(t for t in fig.data if t.name == "relative change")
    assert list(rel.x) == [1, 2, 3]  # sorted by position
    assert rel.y[0] == pytest.approx((math.exp(-0.2) - 1) * 100)
    dec = next(t for t in fig.data if t.name == "decoder")
    assert dec.y[0] == pytest.approx(math.exp(2.0))
    assert "negative = augmentation lowers perplexity" in fig.layout.title.text
    assert any(s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)  # zero line
    # Without CI columns there is no band; empty input gives a labelled empty figure.
    assert "confidence interval" not in [t.name for t in delta_by_position_figure(df.drop(columns=["ci_low", "ci_high"])).data]
    assert len(delta_by_position_figure(df.iloc[:0]).data) == 0


def test_delta_heatmap_figure_escapes_and_keeps_duplicates():
    toks = ["the", "<b>x</b>", "the"]
    m = np.array([[0.1, -0.2, np.nan], [0.3, 0.0, -0.4]])
    fig = delta_heatmap_figure(toks, m)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    hm = fig.data[0]
    assert list(hm.x) == [0, 1, 2] and list(hm.y) == [1, 2]
    assert hm.zmid == 0
    assert hm.zmin == -0.4 and hm.zmax == 0.4
    assert "Δloss=%{z" in hm.hovertemplate
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[1] == "&lt;b&gt;x&lt;/b&gt;"
    assert "<b>" not in "".join(ticks)
    with pytest.raises(ValueError):
        delta_heatmap_figure(["a"], m)


def test_attention_to_latents_figure():
    mass = np.random.default_rng(0).random((4, 3))
    fig = attention_to_latents_figure(["a", "b", "c", "<i>"], mass)
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    assert np.asarray(hm.z).shape == (3, 4)  # latents x tokens
    assert np.allclose(np.asarray(hm.z), mass.T)
    assert "&lt;i&gt;" in list(fig.layout.xaxis.ticktext)


def test_latent_pca_shapes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    coords, evr = latent_pca(x, 3)
    assert coords.shape == (20, 3) and evr.shape == (3,)
    assert evr.sum() <= 1 + 1e-9 and np.all(evr >= 0)
    assert np.all(np.diff(evr) <= 1e-12)  # sorted descending
    # Fewer samples than components: padded with zeros, shapes kept.
    c2, e2 = latent_pca(x[:2], 3)
    assert c2.shape == (2, 3) and e2.shape == (3,)
    assert np.all(c2[:, 2] == 0) and e2[2] == 0 and e2.sum() <= 1 + 1e-9
    c1, e1 = latent_pca(x[:1], 2)
    assert c1.shape == (1, 2) and np.all(c1 == 0) and np.all(e1 == 0)
    c0, e0 = latent_pca(np.zeros((0, 8)), 2)
    assert c0.shape == (0, 2) and e0.shape == (2,)
    cs, es = latent_pca(np.ones((5, 4)), 2)  # identical points: no variance
    assert np.all(cs == 0) and np.all(es == 0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("color_by", ["prompt", "latent"])
def test_latent_pca_figure(dims, color_by):
    rng = np.random.default_rng(1)
    n_prompts, nl, d = 3, 4, 16
    x = rng.normal(size=(n_prompts * nl, d))
    pids = np.repeat(np.arange(n_prompts), nl)
    lidx = np.tile(np.arange(nl), n_prompts)
    hover = [["<tok>", " the"]] * (n_prompts * nl)
    fig = latent_pca_figure(x, pids, lidx, labels=["p0", "<b>p1</b>", "p2"], color_by=color_by, dims=dims,
                            hover_tokens=hover)
    trace_type = go.Scatter3d if dims == 3 else go.Scatter
    assert all(isinstance(t, trace_type) for t in fig.data)
    assert len(fig.data) == (n_prompts if color_by == "prompt" else 1)
    assert sum(len(t.x) for t in fig.data) == n_prompts * nl
    _, evr = latent_pca(x, dims)
    assert f"PC1 {100 * evr[0]:.1f}%" in fig.layout.title.text
    cd = np.concatenate([np.asarray(t.customdata) for t in fig.data])
    assert "&lt;tok&gt;" in cd[0, 3] and "<tok>" not in cd[0, 3]
    norms = sorted(float(v) for v in cd[:, 2])
    assert norms == pytest.approx(sorted(float(f"{v:.4g}") for v in np.linalg.norm(x, axis=1)))
    if color_by == "prompt":
        assert "&lt;b&gt;p1&lt;/b&gt;" in [t.name for t in fig.data]
    assert "norm" in fig.data[0].hovertemplate and "closest" in fig.data[0].hovertemplate


def test_reference_axes_make_runs_comparable_and_overlay_pause_latents():
    from sklearn.decomposition import PCA

    from cacheaug_core.viz.latents import fit_latent_axes, project_latents

    rng = np.random.default_rng(2)
    ref = rng.normal(size=(24, 10)) * np.linspace(3, 0.5, 10)          # (N, d), anisotropic
    axes = fit_latent_axes(ref, 3)
    pca = PCA(3).fit(ref)                                                  # the library's own projection
    run_a, run_b = rng.normal(size=(8, 10)), rng.normal(size=(6, 10))
    np.testing.assert_allclose(project_latents(run_a, axes, 3)[0], pca.transform(run_a), atol=1e-9)
    # One run's coordinates do not depend on what else is plotted: that is what makes runs comparable.
    both = project_latents(np.concatenate([run_a, run_b]), axes, 2)[0]
    np.testing.assert_allclose(both[:8], project_latents(run_a, axes, 2)[0], atol=1e-12)
    share = project_latents(run_a, axes, 2)[1]
    assert share.shape == (2,) and np.all(share >= 0) and share.sum() <= 1 + 1e-9
    with pytest.raises(ValueError, match="another model"):
        project_latents(rng.normal(size=(3, 7)), axes, 2)
    pids, lidx = np.repeat([0, 1], 4), np.tile(np.arange(4), 2)
    pause = rng.normal(size=(4, 10))
    for dims in (2, 3):
        fig = latent_pca_figure(run_a, pids, lidx, dims=dims, axes=axes, overlay=pause)
        *main, over = fig.data
        xs = np.concatenate([np.asarray(t.x) for t in main])
        assert np.allclose(np.sort(xs), np.sort(pca.transform(run_a)[:, 0]))
        assert over.name == "pause tokens" and over.marker.symbol != main[0].marker.symbol
        np.testing.assert_allclose(np.asarray(over.x), pca.transform(pause)[:, 0], atol=1e-9)
        assert "reference" in fig.layout.title.text
    # Without reference axes the overlay goes on the run's own PCA, whose coordinates stay latent_pca's.
    fig = latent_pca_figure(run_a, pids, lidx, color_by="latent", overlay=pause)
    own = PCA(2).fit(run_a)
    np.testing.assert_allclose(np.sort(np.asarray(fig.data[0].x)), np.sort(latent_pca(run_a, 2)[0][:, 0]))
    np.testing.assert_allclose(np.abs(np.asarray(fig.data[-1].x)), np.abs(own.transform(pause)[:, 0]), atol=1e-9)


def test_latent_readout_frame():
    df = latent_readout_frame([["a", " b"], ["c", "d"]], np.array([[0.1, 0.6], [0.5, 0.2]]))
    assert df["latent"].tolist() == [0, 1]
    assert df["#1"].tolist() == ["␣b", "c"]
    assert df["p#1"].tolist() == [0.6, 0.5]
    assert list(df.columns) == ["latent", "#1", "p#1", "#2", "p#2"]


def test_figure_to_html_is_offline(tmp_path):
    fig = delta_heatmap_figure(["</script><script>alert(1)</script>"], np.array([[0.5]]))
    h = figure_to_html(fig)
    assert h.lstrip().lower().startswith("<html") or "<!doctype" in h.lower()[:50] or "<html" in h[:200]
    assert "<script src=" not in h and 'src="https://' not in h
    assert "alert(1)</script>" not in h
    assert len(h) > 1_000_000  # plotly.js is inlined


def test_no_torch_import():
    # A fresh interpreter: other tests in the session may have imported torch.
    code = "import sys, viz; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
    for name in viz.__all__:
        assert callable(getattr(viz, name))


def test_training_curves_chain_stages(tmp_path):
    """A run trained in two stages plots as one curve: stage 2's steps continue from stage 1's last."""
    from cacheaug_core.viz.curves import chain_stages, curve_frame, read_metrics, training_curve_figure

    ev = {"rel_ppl_change_pct": [-1.0, -2.0], "nll_base": [2.0, 2.1], "nll_aug": [1.98, 2.06]}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"step": 100, "loss": 3.0}\n{"step": 250, "eval": %s}\n{"step": 260}\n' % json.dumps(ev))
    b.write_text('{"step": 250, "eval": %s}\n{"step": 500, "eval": {"rel_ppl_change_pct": [-3.0, -4.0], '
                 '"nll_base": [2.0, 2.1], "nll_aug": [1.94, 2.02]}}\n{"step": 5' % json.dumps(ev))  # truncated line
    runs = {"gated": chain_stages([read_metrics(a), read_metrics(b)])}
    df = curve_frame(runs)
    assert sorted(df["step"].unique().tolist()) == [250, 510, 760]
    last = df[df["step"] == 760].sort_values("position")
    assert last["rel_ppl_change_pct"].tolist() == [-3.0, -4.0]
    fig = training_curve_figure(df, positions=(1, 2))
    assert len(fig.data) == 2 and list(fig.data[0].x) == [250, 510, 760]


def test_generation_notes_name_empty_arms_and_latents_that_never_arrived():
    from cacheaug_core.viz.app_views import generation_notes

    labels = {"decoder": "decoder alone", "coprocessor": "decoder + coprocessor"}
    notes = generation_notes({"decoder": [5, 6], "coprocessor": [0]}, 0, labels, 8)
    assert len(notes) == 1 and notes[0].startswith("decoder + coprocessor: ended immediately")
    assert generation_notes({"decoder": [5, 6], "coprocessor": [7, 8]}, 0, labels, 8) == []
    never = generation_notes({"decoder": [1] * 4, "coprocessor": [1] * 4}, 0, labels, 4, async_delay=4)
    assert len(never) == 1 and "never arrived" in never[0]
    late = generation_notes({"decoder": [1] * 8, "coprocessor": [1, 0]}, 0, labels, 8, async_delay=3)
    assert len(late) == 1 and late[0].startswith("decoder + coprocessor: ended within")
    assert generation_notes({"decoder": [1] * 8, "coprocessor": [1] * 8}, 0, labels, 8, async_delay=3) == []


def test_heatmap_by_scored_token_and_see_through_gaps():
    from cacheaug_core.viz.app_views import by_scored_token, nth_ahead_per_token

    rng = np.random.default_rng(0)
    base, aug = rng.random((5, 3)), rng.random((5, 3))
    base[4, 1:] = aug[4, 1:] = np.nan           # past the end of a 6-token text
    m = by_scored_token(aug - base)             # (3, 6)
    for n in (1, 2, 3):
        b, a = nth_ahead_per_token(base, aug, n)
        assert np.allclose(m[n - 1], a - b, equal_nan=True)   # the same cells the token colours use
    fig = delta_heatmap_figure(list("abcdef"), m, axis="token")
    assert fig.layout.plot_bgcolor == "rgba(0,0,0,0)"
    assert fig.layout.xaxis.title.text == "scored token"


def test_latent_similarity_separates_slot_from_prompt_structure():
    from cacheaug_core.viz.latents import latent_similarity, latent_similarity_figure

    rng = np.random.default_rng(0)
    slot_dirs = rng.normal(size=(4, 16))                      # each slot has its own direction
    z = np.concatenate([slot_dirs + 0.1 * rng.normal(size=(4, 16)) for _ in range(3)])   # 3 prompts x 4 slots
    pid, idx = np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3)
    s = latent_similarity(z, pid, idx)
    assert s["same_slot_across_prompts"] > 0.9 > s["within_prompt"]
    assert s["cos"].shape == (12, 12) and np.allclose(np.diag(s["cos"]), 1)
    assert np.allclose(s["slot_norm"], [np.linalg.norm(z[idx == k], axis=1).mean() for k in range(4)])
    fig = latent_similarity_figure(z, pid, idx, labels=["<b>a</b>", "b", "c"])
    assert fig.data[0].type == "heatmap" and "&lt;b&gt;" in str(fig.data[0].customdata[0][0])


def test_first_divergence_and_its_html():
    from cacheaug_core.viz.app_views import divergence_html, first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([1, 2], [1, 2]) is None
    assert first_divergence([1, 2], [1, 2, 5]) == 2
    h = divergence_html([" 3", " +", " 5", " =", " 8"], [" 3", " +", " 5", " =", " 13<"], 4)
    assert "#4" in h and "<mark" in h and "13&lt;" in h and "13<" not in h


def test_by_position_in_nats_with_rolling_mean():
    df = pd.DataFrame({"position": [1, 2, 3, 4], "nll_base": [1.0, 2.0, 3.0, 0.5], "nll_aug": [0.5, 2.5, 1.0, 0.5]})
    fig = delta_by_position_figure(df, title="", units="nats", rolling=3)
    pts = next(t for t in fig.data if t.name == "Δloss per token")
    roll = next(t for t in fig.data if t.name.startswith("rolling mean"))
    assert np.allclose(pts.y, [-0.5, 0.5, -2.0, 0.0])
    assert np.allclose(roll.y, [0.0, -2.0 / 3, -0.5, -1.0])
    assert fig.layout.title.text is None
    assert next(t for t in fig.data if t.name == "relative change").visible is False
    assert fig.layout.yaxis2.type == "log"


def test_evaluation_markdown_hides_training_machine_paths():
    from cacheaug_core.viz.app_views import evaluation_markdown

    md = evaluation_markdown({"wiki": "coprocessor: /tmp/cacheaug/runs/x/last (16 latents); `results/a.json`; "
                                      "Coprocessor: /work/main/assets/coprocessor."})
    assert "/tmp/" not in md and "/work/" not in md and "results/a.json" in md
    assert md.count("(a path on the training machine)") == 2


def test_fit_small_screens_keeps_room_for_the_plot_on_a_phone():
    from cacheaug_core.viz.corpus import corpus_curve_figure

    names = [f"arm {i}: a fairly long legend entry" for i in range(8)]
    fig = go.Figure([go.Scatter(x=[1, 2], y=[i, i + 1], name=n) for i, n in enumerate(names)])
    fig.update_layout(title="A long title that a phone would cut off at its right edge, so it is wrapped", height=300)
    out = viz.fit_small_screens(fig, plot_height=250)
    assert out is fig
    lay = fig.layout
    assert lay.margin.l <= 60 and lay.margin.r <= 20                       # not plotly's 80 px a side
    assert lay.legend.orientation == "h" and lay.legend.yanchor == "top" and lay.legend.y < 0   # under the plot
    assert "<br>" in lay.title.text and lay.title.yanchor == "top"          # wrapped, in the top margin
    assert lay.margin.t >= 2 * 17 * 1.3                                        # room for its two lines
    assert max(len(x) for x in lay.title.text.split("<br>")) <= 300 / (0.55 * 17) + 1
    # 8 long entries take 8 legend rows on a phone: the figure grows by them and keeps 250 px of plot.
    assert lay.margin.b >= 56 + 8 * 21
    assert lay.height >= 250 + lay.margin.b
    # Fewer entries, less height; no legend, no legend room.
    few = viz.fit_small_screens(go.Figure([go.Scatter(x=[1], y=[1], name="one")]))
    none = viz.fit_small_screens(go.Figure([go.Scatter(x=[1], y=[1], showlegend=False)]))
    assert none.layout.margin.b < few.layout.margin.b < lay.margin.b
    # A real figure of the app: the corpus curve with its interval bands (hidden from the legend).
    rows = [{"arm": arm, "split": split, "position": pos, "rel_ppl_change_pct": -3.0 + pos, "ci_low": -5.0,
             "ci_high": -1.0, "tokens": 40, "documents": 4, "delta": -0.03}
            for arm in ("coprocessor", "pause") for split in ("all", "body", "doc_start") for pos in (1, 2)]
    curve = corpus_curve_figure(pd.DataFrame(rows))
    h0 = curve.layout.height
    viz.fit_small_screens(curve, plot_height=260)
    assert curve.layout.legend.orientation == "h" and curve.layout.height >= h0
    legend_rows = sum(1 for t in curve.data if t.showlegend is not False and t.name)     # 8 long entries
    assert curve.layout.height - curve.layout.margin.b >= 260 and legend_rows == 8
