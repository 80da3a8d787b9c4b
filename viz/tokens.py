"""Safe, visible rendering of token text, and the per-token Δloss HTML view.

Token strings come straight from a tokenizer and can contain anything: markup
(``<script>``), quotes that would break out of an HTML attribute, newlines,
invisible zero-width characters, bidirectional overrides that visually reorder
the surrounding text, and even lone surrogates that make ``str.encode`` raise.
Everything in this module turns such strings into text that is both harmless
and *visible*, so a reader sees exactly which characters a token holds.

Usage::

    from cacheaug_core.viz.tokens import token_delta_html, display_token
    html = token_delta_html(tokens, nll_aug - nll_base, nll_base, nll_aug)
    # -> put into gr.HTML(...) or a notebook's IPython.display.HTML(...)

    display_token(" the\\n")      # '␣the↵'  (plain text, for tables)
    plotly_text("<b>")            # '&lt;b&gt;' (for plotly labels / hover text)

Sign convention used everywhere in ``viz``: ``delta = nll_aug - nll_base``.
Negative delta means the coprocessor's latents *lower* the loss (help) and is
drawn blue; positive means they raise it (hurt) and is drawn red.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np

__all__ = [
    "HELP_RGB",
    "HURT_RGB",
    "clean_token",
    "display_token",
    "plotly_text",
    "truncate_label",
    "delta_colour",
    "token_delta_html",
]

# Diverging colours, centred at 0. Drawn as translucent backgrounds (alpha grows
# with |delta|) so inherited text colour stays legible on light and dark themes.
HELP_RGB = (37, 99, 235)  # blue: augmentation lowers loss
HURT_RGB = (220, 38, 38)  # red: augmentation raises loss
_MAX_ALPHA = 0.75

# Characters that reorder or hide text. Shown as ``\uXXXX`` so they can never
# act on the page (a raw U+202E would visually reverse everything after it).
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}
_ZERO_WIDTH = {0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x180E, 0x00AD, 0x034F}
# Visible stand-ins for ordinary whitespace.
_NEWLINE_GLYPH = "\u21b5"  # ↵
_TAB_GLYPH = "\u21e5"  # ⇥
_CR_GLYPH = "\u240d"  # ␍
_SPACE_GLYPH = "\u2423"  # ␣


def _esc_cp(cp: int) -> str:
    """``\\u202e``-style visible escape for one code point."""
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _as_str(tok: object) -> str:
    """Coerce a token to ``str`` without ever raising (bytes are decoded leniently)."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, (bytes, bytearray)):
        return bytes(tok).decode("utf-8", errors="replace")
    return str(tok)


def clean_token(tok: object) -> str:
    """Make invisible or dangerous characters visible; keep ordinary whitespace.

    Escapes (as ``\\uXXXX`` / ``\\xXX`` text): bidi controls, zero-width
    characters, lone surrogates, C0/C1 control characters other than ``\\n``,
    ``\\t`` and ``\\r``. The result always encodes as UTF-8. It is *not*
    HTML-escaped; use it for CSV cells and data tables.
    """
    s = _as_str(tok)
    out: list[str] = []
    for ch in s:
        cp = ord(ch)
        if ch in "\n\t\r":
            out.append(ch)
        elif (
            0xD800 <= cp <= 0xDFFF  # lone surrogate: cannot be encoded
            or cp in _BIDI
            or cp in _ZERO_WIDTH
            or cp < 0x20
            or 0x7F <= cp <= 0x9F
        ):
            out.append(_esc_cp(cp))
        else:
            out.append(ch)
    return "".join(out)


def display_token(tok: object, visible_spaces: bool = True) -> str:
    """Plain-text form of a token for tables and labels: whitespace made visible.

    ``" the\\n"`` -> ``"␣the↵"`` (spaces become ␣ only if ``visible_spaces``),
    tabs -> ⇥, carriage returns -> ␍, plus everything :func:`clean_token` does.
    An empty token is shown as ``∅`` so an empty cell is never ambiguous.
    """
    s = clean_token(tok)
    s = s.replace("\r", _CR_GLYPH).replace("\n", _NEWLINE_GLYPH).replace("\t", _TAB_GLYPH)
    if visible_spaces:
        s = s.replace(" ", _SPACE_GLYPH)
    return s if s else "\u2205"


def plotly_text(s: object) -> str:
    """Escape a string for plotly labels, hover text and titles.

    Plotly renders a small subset of HTML in these strings, so ``<`` ``>`` ``&``
    must be escaped. Only the entities plotly decodes (``&lt; &gt; &amp;``) are
    used; ``html.escape``'s ``&quot;`` would be shown literally by plotly.
    """
    s = clean_token(s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def truncate_label(s: str, max_len: int = 12) -> str:
    """Shorten a (plain) label to ``max_len`` characters, marking the cut with …."""
    if max_len <= 1 or len(s) <= max_len:
        return s
    return s[: max_len - 1] + "\u2026"


def delta_colour(delta: float, scale: float) -> str:
    """CSS background for one Δloss value: blue (negative) / red (positive), alpha ∝ |delta|/scale.

    NaN (unscored token) -> ``"transparent"``.
    """
    if delta is None or not math.isfinite(float(delta)) or scale <= 0:
        return "transparent"
    s = max(-1.0, min(1.0, float(delta) / scale))
    r, g, b = HELP_RGB if s < 0 else HURT_RGB
    return f"rgba({r},{g},{b},{abs(s) * _MAX_ALPHA:.3f})"


def _auto_scale(delta: np.ndarray) -> float:
    """Colour-scale half-width: the 95th percentile of |delta| over scored tokens.

    A percentile (not the max) keeps one extreme token from washing out the rest;
    values beyond the scale saturate. Falls back to 1.0 when nothing is scored.
    """
    finite = np.abs(delta[np.isfinite(delta)])
    if finite.size == 0:
        return 1.0
    s = float(np.percentile(finite, 95))
    if not math.isfinite(s) or s <= 0:
        s = float(finite.max())
    return s if s > 0 else 1.0


def _fmt(x: float, signed: bool = False) -> str:
    return (f"{x:+.3f}" if signed else f"{x:.3f}") if math.isfinite(x) else "n/a"


def _opt_array(a: Sequence[float] | np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if a is None:
        return None
    arr = np.asarray(a, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values but there are {n} tokens")
    return arr


def _legend_html(scale: float) -> str:
    """Gradient bar -scale … 0 … +scale with the sign convention spelled out."""
    h = HELP_RGB
    r = HURT_RGB
    grad = (
        f"linear-gradient(to right, rgba({h[0]},{h[1]},{h[2]},{_MAX_ALPHA}), "
        f"rgba({h[0]},{h[1]},{h[2]},0) 50%, rgba({r[0]},{r[1]},{r[2]},0) 50%, "
        f"rgba({r[0]},{r[1]},{r[2]},{_MAX_ALPHA}))"
    )
    return (
        '<div class="cacheaug-legend" style="display:flex;align-items:center;gap:0.5em;'
        'font-size:0.85em;margin:0.25em 0;">'
        f"<span>\u0394loss \u2212{scale:.3g} (helps)</span>"
        f'<span style="display:inline-block;width:12em;height:0.9em;border:1px solid rgba(127,127,127,0.5);'
        f'background:{grad};"></span>'
        f"<span>+{scale:.3g} (hurts)</span>"
        "</div>"
    )


def token_delta_html(
    tokens: list[str],
    delta: np.ndarray | None,
    nll_base: np.ndarray | None = None,
    nll_aug: np.ndarray | None = None,
    selected: int | None = None,
    scale: float | None = None,
    *,
    visible_spaces: bool = False,
    show_legend: bool = True,
    caption: str | None = None,
) -> str:
    """Per-token Δloss as inline HTML spans, one per token, for ``gr.HTML`` or notebooks.

    Args:
        tokens: token strings, length n (any content; all of it is escaped).
        delta: (n,) ``nll_aug - nll_base`` per token; NaN = not scored (e.g. the
            prompt) and drawn neutral. If None, computed from the two NLL arrays.
        nll_base, nll_aug: optional (n,) per-token NLL of each arm, shown on hover.
        selected: index of a token to outline (e.g. the one a user clicked).
        scale: |delta| at which colour saturates; default = 95th percentile of |delta|.
        visible_spaces: draw spaces as ␣ (newlines are always ↵, tabs ⇥).
        show_legend: prepend the colour legend.
        caption: override the sign-convention caption text (escaped).

    Returns:
        ``<div class="cacheaug-tokens">…</div>`` with one ``<span class="tok" data-idx=i
        title="Δloss=-0.123 · base 2.345 · aug 2.222 · #i">`` per token. No scripts,
        no event handlers; styling is inline so it works inside any page.
    """
    toks = list(tokens)
    n = len(toks)
    base = _opt_array(nll_base, n, "nll_base")
    aug = _opt_array(nll_aug, n, "nll_aug")
    if delta is None:
        if base is None or aug is None:
            raise ValueError("delta is None: pass delta or both nll_base and nll_aug")
        d = aug - base
    else:
        d = _opt_array(delta, n, "delta")
    assert d is not None
    if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
        scale = _auto_scale(d)
    scale = float(scale)

    spans: list[str] = []
    for i, tok in enumerate(toks):
        di = float(d[i])
        # Split on real newlines first so that a literal "↵" inside a token is not
        # mistaken for one; each newline becomes a visible ↵ plus a real <br>.
        # Text is escaped before any markup is added.
        lines = _as_str(tok).split("\n")
        if lines == [""]:
            body = "\u2205"  # empty token: show ∅ rather than a zero-width span
        else:
            body = (_NEWLINE_GLYPH + "<br>").join(
                html.escape(display_token(ln, visible_spaces=visible_spaces), quote=True) if ln else ""
                for ln in lines
            )
        parts = [f"\u0394loss={_fmt(di, signed=True)}" if math.isfinite(di) else "not scored"]
        if base is not None:
            parts.append(f"base {_fmt(float(base[i]))}")
        if aug is not None:
            parts.append(f"aug {_fmt(float(aug[i]))}")
        parts.append(f"#{i}")
        title = html.escape(" \u00b7 ".join(parts), quote=True)
        bg = delta_colour(di, scale)
        style = f"background:{bg};border-radius:3px;padding:0 1px;"
        cls = "tok"
        if not math.isfinite(di):
            cls += " unscored"
            style += "opacity:0.7;"
        if selected is not None and i == int(selected):
            cls += " selected"
            style += "outline:2px solid currentColor;outline-offset:1px;"
        spans.append(
            f'<span class="{cls}" data-idx="{i}" data-delta="{f"{di:.6g}" if math.isfinite(di) else "nan"}" '
            f'title="{title}" style="{style}">{body}</span>'
        )

    if caption is None:
        caption = (
            "Background = \u0394loss = NLL(decoder+coprocessor) \u2212 NLL(decoder) per token. "
            "Negative (blue) = augmentation lowers the loss (helps); positive (red) = raises it (hurts); "
            "no colour = not scored. Hover a token for exact values."
        )
    head = _legend_html(scale) if show_legend else ""
    cap = f'<div class="cacheaug-caption" style="font-size:0.85em;opacity:0.8;margin-bottom:0.4em;">{html.escape(caption, quote=True)}</div>'
    # pre-wrap keeps the tokens' own spaces; line-height leaves room for the backgrounds.
    body_div = (
        '<div class="cacheaug-token-body" style="white-space:pre-wrap;word-break:break-word;'
        'line-height:1.9;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;">'
        + "".join(spans)
        + "</div>"
    )
    return f'<div class="cacheaug-tokens">{head}{cap}{body_div}</div>'

