"""Small pure helpers the Gradio app (``app.py``) needs between Workbench results and ``viz``.

Plain data in, plain data / DataFrames / figures / escaped HTML out; nothing here runs a
model, so notebooks and tests can call the same functions::

    from cacheaug_core.viz.app_views import by_position_every, nth_ahead_per_token, notice_html
    df = by_position_every(res["nll_base"], res["nll_aug"])        # mode (b) matrices (P, A)
    base, aug = nth_ahead_per_token(res["nll_base"], res["nll_aug"], n=1)

Sign convention as everywhere in ``viz``: delta = NLL(decoder+coprocessor) − NLL(decoder),
negative = the latents help.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .tokens import clean_token, display_token

__all__ = [
    "notice_html",
    "status_html",
    "verdict_text",
    "arm_stats_frame",
    "join_prompt_continuation",
    "generation_notes",
    "first_divergence",
    "divergence_html",
    "by_position_once",
    "by_position_every",
    "nth_ahead_per_token",
    "by_scored_token",
    "message_figure",
    "explained_variance_text",
    "latent_readout_with_prompts",
    "token_detail_html",
    "evaluation_markdown",
    "strip_front_matter",
    "jsonable",
    "write_json",
    "split_prompts",
    "round_frame",
]

_LEVEL_STYLE = {
    # border, background (translucent so it reads on light and dark themes), icon
    "warning": ("rgb(217,119,6)", "rgba(245,158,11,0.16)", "\u26a0"),
    "error": ("rgb(220,38,38)", "rgba(220,38,38,0.14)", "\u2716"),
    "info": ("rgb(37,99,235)", "rgba(37,99,235,0.10)", "\u2139"),
}


def notice_html(notice: str | None, level: str = "warning", title: str | None = None) -> str:
    """A prominent banner for a notice (escaped; invisible characters made visible). '' -> ''."""
    if not notice or not str(notice).strip():
        return ""
    border, bg, icon = _LEVEL_STYLE.get(level, _LEVEL_STYLE["warning"])
    head = f"<strong>{html.escape(clean_token(title), quote=True)}</strong> " if title else ""
    body = html.escape(clean_token(str(notice)), quote=True)
    return (
        f'<div class="cacheaug-notice cacheaug-notice-{html.escape(level, quote=True)}" role="status" '
        f'style="border:2px solid {border};background:{bg};border-radius:8px;padding:0.6em 0.9em;'
        f'margin:0.3em 0;font-size:1.0em;line-height:1.45;">'
        f'<span aria-hidden="true">{icon}</span> {head}{body}</div>'
    )


def status_html(line: str, details: str = "", level: str = "info", title: str | None = None) -> str:
    """A short status banner with the longer text one click away (a <details> element); escaped."""
    if not (line or "").strip():
        return notice_html(details, level, title)
    html_line = notice_html(line, level, title)
    if not (details or "").strip():
        return html_line
    more = ('<details style="margin-top:0.3em;"><summary style="cursor:pointer;">details</summary>'
            f'{html.escape(clean_token(details), quote=True)}</details>')
    return html_line[: -len("</div>")] + more + "</div>"


def verdict_text(delta: np.ndarray, n_boot: int = 1000, reference: Any = None, ref_name: str = "",
                 where: str = "") -> str:
    """One plain sentence on a single text: its relative perplexity change with a token-bootstrap
    interval, whether that is within noise, and the typical value stored with the checkpoint."""
    from .figures import delta_interval

    d = np.asarray(delta, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return "No token was scored by both arms."
    rel = float(np.expm1(d.mean()) * 100)
    lo, hi = delta_interval(d, n_boot)
    out = f"This text{where}: perplexity {rel:+.1f}% with the latents over {d.size} token(s)"
    if math.isfinite(lo):
        out += f", 95% interval [{lo:+.1f}%, {hi:+.1f}%] (tokens resampled)"
        out += (": within noise, the interval includes 0." if lo <= 0 <= hi else
                (": lower beyond token-level noise." if hi < 0 else ": higher beyond token-level noise."))
    else:
        out += ": too few tokens to tell."
    if reference is not None:
        out += (f" Typical{' on ' + ref_name if ref_name else ''} at position {int(reference['position'])}: "
                f"{reference['rel_ppl_change_pct']:+.1f}% [{reference['ci_low']:+.1f}, {reference['ci_high']:+.1f}].")
    return out


def arm_stats_frame(stats: Sequence[dict]) -> pd.DataFrame:
    """One row per generation arm: tokens, time to first token, tokens/s (Arm.stats() dicts)."""
    cols = ["arm", "tokens", "time_to_first_token_s", "tokens_per_s"]
    rows = [{c: s.get(c) for c in cols} for s in stats]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("time_to_first_token_s", "tokens_per_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def join_prompt_continuation(prompt: str, continuation: str) -> str:
    """Prompt followed by a generated continuation as one text to score (a space between if needed)."""
    prompt = prompt or ""
    continuation = continuation or ""
    if not prompt or not continuation:
        return prompt + continuation
    if prompt[-1].isspace() or continuation[0].isspace():
        return prompt + continuation
    return prompt + " " + continuation


def generation_notes(arms: dict[str, Sequence[int]], eos_id: int | None, labels: dict[str, str] | None = None,
                     max_new_tokens: int | None = None, async_delay: int = 0,
                     augmented: Sequence[str] = ("coprocessor", "pause")) -> list[str]:
    """Plain-text notes on a (finished or stopped) generation: arms that ended at once (their first
    token was end-of-sequence, so their text is empty) and augmented arms whose asynchronous latents
    never arrived (the latents go in after `async_delay` generated tokens). `arms`: arm -> token ids."""
    labels = labels or {}
    notes = []
    ended = [a for a, ids in arms.items() if len(ids) == 1 and eos_id is not None and int(ids[0]) == int(eos_id)]
    if ended:
        names = ", ".join(labels.get(a, a) for a in ended)
        notes.append(f"{names}: ended immediately (the first token was end-of-sequence), so the output is empty.")
    delay = int(async_delay or 0)
    if delay > 0:
        if max_new_tokens is not None and delay >= int(max_new_tokens):
            notes.append(f"Asynchronous delay {delay} ≥ max new tokens {int(max_new_tokens)}: the latents never "
                         "arrived, so the augmented arm generated like the decoder alone.")
        else:
            late = [a for a in augmented if a in arms and a not in ended and len(arms[a]) <= delay]
            if late:
                names = ", ".join(labels.get(a, a) for a in late)
                notes.append(f"{names}: ended within the asynchronous delay ({delay} tokens), so the latents never "
                             "arrived.")
    return notes


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first generated token where two arms differ (the shorter one's length when one
    is a prefix of the other); None when they are identical."""
    a, b = [int(x) for x in a], [int(x) for x in b]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergence_html(tokens_a: Sequence[str], tokens_b: Sequence[str], at: int | None,
                    labels: tuple[str, str] = ("decoder alone", "decoder + coprocessor")) -> str:
    """Both arms' generated tokens, the shared prefix plain and the first differing token marked."""
    if at is None:
        return ('<div class="cacheaug-diverge">Both arms generated the same tokens.</div>' if tokens_a else "")
    rows = []
    for lab, toks in zip(labels, (tokens_a, tokens_b)):
        head = html.escape(clean_token("".join(toks[:at])), quote=True)
        mark = html.escape(display_token(toks[at]) if at < len(toks) else "(end)", quote=True)
        tail = html.escape(clean_token("".join(toks[at + 1: at + 12])), quote=True)
        rows.append(f'<div><strong>{html.escape(lab)}</strong>: <span style="opacity:0.7">…{head[-80:]}</span>'
                    f'<mark style="background:rgba(245,158,11,0.45);padding:0 2px;border-radius:3px;">{mark}</mark>'
                    f'{tail}…</div>')
    return (f'<div class="cacheaug-diverge" style="line-height:1.6;font-family:ui-monospace,monospace;">'
            f'<div>The arms part at generated token #{int(at)}:</div>{"".join(rows)}</div>')


def by_position_once(nll_base: np.ndarray, nll_aug: np.ndarray, point: int) -> pd.DataFrame:
    """Mode (a): the token k positions after the augmentation point, k = 1..; columns as
    ``viz.delta_by_position_figure`` expects (``position, nll_base, nll_aug, n``)."""
    b = np.asarray(nll_base, dtype=np.float64).reshape(-1)
    a = np.asarray(nll_aug, dtype=np.float64).reshape(-1)
    idx = np.arange(int(point) + 1, b.shape[0])
    keep = idx[np.isfinite(b[idx]) & np.isfinite(a[idx])]
    return pd.DataFrame({"position": (keep - int(point)).astype(np.int64), "nll_base": b[keep], "nll_aug": a[keep],
                         "n": np.ones(len(keep), dtype=np.int64)})


def by_position_every(nll_base: np.ndarray, nll_aug: np.ndarray) -> pd.DataFrame:
    """Mode (b): matrices (points, ahead) -> mean NLL per ahead position over all points
    where both arms are scored, with the count ``n``."""
    b = np.asarray(nll_base, dtype=np.float64)
    a = np.asarray(nll_aug, dtype=np.float64)
    if b.ndim != 2 or b.shape != a.shape:
        raise ValueError(f"need two (points, ahead) matrices of one shape, got {b.shape} and {a.shape}")
    ok = np.isfinite(b) & np.isfinite(a)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mb = np.where(ok, b, 0.0).sum(axis=0) / n
        ma = np.where(ok, a, 0.0).sum(axis=0) / n
    pos = np.arange(1, b.shape[1] + 1, dtype=np.int64)
    keep = n > 0
    return pd.DataFrame({"position": pos[keep], "nll_base": mb[keep], "nll_aug": ma[keep],
                         "n": n[keep].astype(np.int64)})


def nth_ahead_per_token(nll_base: np.ndarray, nll_aug: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mode (b) matrices (T-1, A) -> per-token (T,) NLLs for tokens scored with latents inserted
    ``n`` tokens earlier: token j uses row j-n, column n-1. NaN where there is no such point."""
    b = np.asarray(nll_base, dtype=np.float64)
    a = np.asarray(nll_aug, dtype=np.float64)
    P, A = a.shape
    T = P + 1
    if not 1 <= int(n) <= A:
        raise ValueError(f"n must be in 1..{A}, got {n}")
    n = int(n)
    base = np.full(T, np.nan)
    aug = np.full(T, np.nan)
    rows = np.arange(0, max(0, T - n))          # points p with token p+n inside the text
    base[rows + n] = b[rows, n - 1]
    aug[rows + n] = a[rows, n - 1]
    return base, aug


def by_scored_token(delta: np.ndarray) -> np.ndarray:
    """Mode (b) (points P, ahead A) -> (A, T = P + 1) indexed by the scored token: cell (n-1, j) is
    token j scored with the latents inserted n tokens earlier (row j-n of the input); NaN elsewhere."""
    d = np.asarray(delta, dtype=np.float64)
    P, A = d.shape
    out = np.full((A, P + 1), np.nan)
    for n in range(1, A + 1):
        out[n - 1, n:] = d[: P + 1 - n, n - 1]
    return out


def message_figure(title: str, message: str) -> go.Figure:
    """An empty figure that says why it is empty (plotly's own text is escaped by the caller's choice)."""
    safe = html.escape(clean_token(message), quote=False)
    fig = go.Figure()
    fig.update_layout(
        title=html.escape(clean_token(title), quote=False),
        xaxis={"visible": False}, yaxis={"visible": False}, height=260,
        annotations=[{"text": safe, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
    )
    return fig


def explained_variance_text(evr: Sequence[float]) -> str:
    """'Explained variance: PC1 12.3%, PC2 4.5% (total 16.8%)'."""
    r = [float(x) for x in evr]
    parts = ", ".join(f"PC{i + 1} {100 * x:.1f}%" for i, x in enumerate(r))
    return f"Explained variance: {parts} (total {100 * sum(r):.1f}%)"


def latent_readout_with_prompts(readout: pd.DataFrame, prompt_ids: Sequence[int], latent_index: Sequence[int],
                                labels: Sequence[str]) -> pd.DataFrame:
    """Replace the row counter of ``latent_readout_frame`` by (prompt, latent slot) columns."""
    pids = np.asarray(prompt_ids).reshape(-1)
    lidx = np.asarray(latent_index).reshape(-1)
    if len(readout) != len(pids):
        raise ValueError(f"{len(readout)} read-out rows but {len(pids)} latents")
    out = readout.drop(columns=["latent"]).copy()
    names = [display_token(labels[int(p)], visible_spaces=False) if 0 <= int(p) < len(labels) else str(p) for p in pids]
    out.insert(0, "prompt", pd.Series(names, dtype=object))
    out.insert(1, "latent", lidx.astype(np.int64))
    return out


def _f(x: float | None, fmt: str = ".4f") -> str:
    return format(float(x), fmt) if x is not None and math.isfinite(float(x)) else "n/a"


def token_detail_html(token: str, index: int, point: int, nll_base: float | None, nll_aug: float | None,
                      kl: float | None, ahead: int | None = None) -> str:
    """One escaped line describing the selected token and the KL between the two arms' predictions."""
    tok = html.escape(display_token(token), quote=True)
    d = (float(nll_aug) - float(nll_base)) if nll_base is not None and nll_aug is not None else None
    where = f"latents inserted after token #{int(point)}" + (f" ({int(ahead)} ahead)" if ahead else "")
    return (
        '<div class="cacheaug-detail" style="line-height:1.6;">'
        f'Token <code>#{int(index)}</code> <code class="cacheaug-detail-token">{tok}</code> \u00b7 {where}<br>'
        f"NLL decoder {_f(nll_base)} \u00b7 decoder+coprocessor {_f(nll_aug)} \u00b7 \u0394loss "
        f"{_f(d, '+.4f')}<br>"
        f"<strong>KL(decoder+coprocessor \u2016 decoder) = {_f(kl, '.5f')} nats</strong> "
        "(full vocabulary, next-token distributions predicting this token)</div>"
    )


def strip_front_matter(md: str) -> str:
    """Drop a leading YAML front-matter block (``---`` … ``---``) from a model card."""
    if not md.startswith("---"):
        return md
    end = md.find("\n---", 3)
    if end < 0:
        return md
    return md[end + 4:].lstrip("\n")


def evaluation_markdown(evaluation: dict | None) -> str:
    """The checkpoint's evaluation section as Markdown (tables kept, dicts as JSON blocks)."""
    if not evaluation:
        return "_No evaluation results are stored with this coprocessor._"
    import re

    # Paths of the machine the checkpoint was trained on mean nothing here.
    machine = re.compile(r"(?<![\w.])/(?:tmp|root|home|mnt|scratch|work|opt|data)/[^\s,;)`'\"|]+")
    evaluation = {k: machine.sub("(a path on the training machine)", v) if isinstance(v, str) else v
                  for k, v in evaluation.items()}
    parts = []
    for name, table in evaluation.items():
        parts.append(f"#### {clean_token(str(name))}")
        if isinstance(table, str):
            parts.append(clean_token(table))
        elif isinstance(table, dict) and table and all(not isinstance(v, (dict, list)) for v in table.values()):
            parts += ["| metric | value |", "|---|---|"]
            parts += [f"| {clean_token(str(k)).replace('|', '/')} | {clean_token(str(v)).replace('|', '/')} |"
                      for k, v in table.items()]
        else:
            parts.append("```\n" + json.dumps(jsonable(table), indent=1).replace("```", "'''") + "\n```")
        parts.append("")
    return "\n".join(parts)


def jsonable(obj: Any) -> Any:
    """Numpy arrays / scalars, DataFrames, tuples -> JSON types; NaN and inf -> None."""
    if isinstance(obj, pd.DataFrame):
        return [jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, str):
        return clean_token(obj) if _has_lone_surrogate(obj) else obj
    return obj


def _has_lone_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``jsonable(obj)`` as UTF-8 JSON (strict: no NaN), creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return p


def split_prompts(text: str | None, max_prompts: int = 16) -> tuple[list[str], str]:
    """One prompt per non-blank line; returns (prompts, notice) with at most ``max_prompts``."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    notice = ""
    if len(lines) > max_prompts:
        notice = f"Only the first {max_prompts} of {len(lines)} prompts are used."
        lines = lines[:max_prompts]
    return lines, notice


def summary_display(df: pd.DataFrame) -> pd.DataFrame:
    """`viz.summary_table` as the app shows it: every cell text, so each row reads in its own unit.
    The arms' rows hold mean NLLs (nats) and perplexities; the change row holds the *signed*
    difference of mean NLLs in nats and the signed relative perplexity change in % with its interval
    (as plain floats a positive change showed as an unsigned `9.209` beside absolute values).
    Exports (CSV, run JSON) keep the numeric table."""
    def fmt(x, spec):
        return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)

    out = pd.DataFrame({"arm": df["arm"]})
    change = df["arm"] == "change"
    out["mean NLL"] = [fmt(v, "+.4f") + " nats" if c and fmt(v, "+.4f") else fmt(v, ".4f")
                       for v, c in zip(df["mean NLL"], change)]
    out["perplexity"] = [fmt(v, ".3f") for v in df["perplexity"]]
    out["relative change %"] = [fmt(v, "+.2f") + "%" if fmt(v, "+.2f") else "" for v in df["relative change %"]]
    out["95% interval %"] = df["95% interval %"]
    out["tokens scored"] = df["tokens scored"]
    return out


def round_frame(df: pd.DataFrame, decimals: int = 4) -> pd.DataFrame:
    """A copy with float columns rounded for display (exports keep full precision)."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].round(decimals)
    return out
