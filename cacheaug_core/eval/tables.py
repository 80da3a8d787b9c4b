"""Markdown tables of `eval ppl` and `eval bench` results: pure functions of the result JSON, so the
CLI, the app and the README all print the same table from the same file.

    python -c "import json; from cacheaug_core.eval import results_table_markdown as t; print(t(json.load(open('results/ppl_wiki.json'))))"
"""

from __future__ import annotations

import math

from .bench import ARM_NAMES, TASK_NAMES
from .ppl import DOC_START
from .provenance import provenance_line, repo_relative


PAPER_POSITIONS = (1, 2, 4, 8, 16, 32)       # the rows of Table 1


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.2f}%"


def _ppl_rows(res: dict, rows: str) -> list[int]:
    pos = res["positions"]
    if rows == "all":
        return list(range(len(pos)))
    want = set(PAPER_POSITIONS) | {pos[-1]}
    return [i for i, p in enumerate(pos) if p in want]


def _ci(ci, i) -> str:
    lo, hi = ci[i] if ci else (None, None)
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _ppl_table(res: dict, rows: str = "paper") -> str:
    n = len(res["positions"])
    ci = res.get("rel_ppl_change_ci95") or [[None, None]] * n
    split = "rel_ppl_change_pct_body" in res
    head = "| position | tokens | ppl decoder | ppl + coprocessor | rel. change | 95% CI |"
    rule = "|---:|---:|---:|---:|---:|---|"
    if split:
        head += " body | body 95% CI | doc start |"
        rule += "---:|---|---:|"
    lines = [head, rule]
    for i in _ppl_rows(res, rows):
        pd_, pa = res["ppl_decoder"][i], res["ppl_augmented"][i]
        line = (f"| {res['positions'][i]} | {res['tokens_scored'][i]:,} | "
                f"{'n/a' if pd_ is None else f'{pd_:.3f}'} | {'n/a' if pa is None else f'{pa:.3f}'} | "
                f"{_pct(res['rel_ppl_change_pct'][i])} | {_ci(ci, i)} |")
        if split:
            line += (f" {_pct(res['rel_ppl_change_pct_body'][i])} | {_ci(res.get('rel_ppl_change_ci95_body'), i)} | "
                     f"{_pct(res['rel_ppl_change_pct_doc_start'][i])} |")
        lines.append(line)
    for arm, cmp in (res.get("compare") or {}).items():
        other = res["arms"][arm]
        lines += ["", f"coprocessor vs {arm} ({other.get('source', '')}, {other.get('num_latents')} latents): "
                  "rel. change of each arm against the decoder, and the difference (percentage points) with "
                  "its paired 95% interval over documents", "",
                  f"| position | {arm} | {arm} body | difference | 95% CI | body difference | body 95% CI |",
                  "|---:|---:|---:|---:|---|---:|---|"]
        for i in _ppl_rows(res, rows):
            a, b = cmp["all"], cmp["body"]
            lines.append(f"| {res['positions'][i]} | {_pct(other['rel_ppl_change_pct'][i])} | "
                         f"{_pct(other['rel_ppl_change_pct_body'][i])} | {_pct(a['difference_pct_points'][i])} | "
                         f"{_ci(a.get('ci95'), i)} | {_pct(b['difference_pct_points'][i])} | {_ci(b.get('ci95'), i)} |")
        m = cmp["mean_over_positions"][1]
        a, b = cmp["all"], cmp["body"]
        lines.append(f"| mean 1-{m} | | | {_pct(a[f'mean_1_{m}'])} | {_ci(a.get(f'mean_1_{m}_ci95') and [a[f'mean_1_{m}_ci95']], 0)} | "
                     f"{_pct(b[f'mean_1_{m}'])} | {_ci(b.get(f'mean_1_{m}_ci95') and [b[f'mean_1_{m}_ci95']], 0)} |")
    d = res.get("data", {})
    cop = (res.get("provenance") or {}).get("coprocessor") or {}
    foot = f"\n\n{d['tokens_read']:,} tokens from {d['documents']} documents" if "tokens_read" in d else ""
    sink = res.get("sink")
    if sink:
        foot += (f", every arm reading the sink {sink['token']!r} before each document" if sink.get("token_id") is not None
                 else ", no sink token (a document's first token is read without context)")
    if cop:
        foot += f"; coprocessor: {repo_relative(cop.get('source'))} ({cop.get('config', {}).get('num_latents')} latents)"
    if foot:
        foot += ". Negative = the latents lower perplexity"
        if split:
            foot += f"; body: targets at index >= {DOC_START} in their document, doc start: the first {DOC_START}"
        foot += "."
    foot += provenance_line(res.get("provenance") or {}) if res.get("provenance") else ""
    return "\n".join(lines) + foot


def _cell(m: dict | None) -> str:
    if m is None or m.get("value") is None or not math.isfinite(m["value"]):
        return "n/a"
    v, (lo, hi) = m["value"], m["ci95"]
    s = f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]"
    if "delta_vs_decoder" in m:
        s += f" ({m['delta_vs_decoder'] * 100:+.1f})"
    return s


def _bench_table(res: dict) -> str:
    arms = res["arms"]
    head = "| task | metric | n | " + " | ".join(ARM_NAMES.get(a, a) for a in arms) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(arms)]
    for name, r in res["tasks"].items():
        keys = ("acc", "acc_norm") if r["type"] == "multiple_choice" else ("exact_match",)
        for k in keys:
            cells = [_cell(None if r["metrics"].get(a) is None else r["metrics"][a][k]) for a in arms]
            lines.append(f"| {TASK_NAMES.get(name, name)} | {k} | {r['n']} | " + " | ".join(cells) + " |")
    foot = ("\n\nAccuracy in % with 95% Wilson intervals; (±x) = difference from the decoder arm in points "
            "(paired bootstrap intervals in the JSON). The coprocessor is called once at the end of the prompt")
    foot += f", its latents inserted {res['async_delay']} tokens late." if res.get("async_delay") else "."
    prov = res.get("provenance") or {}
    cop = prov.get("coprocessor") or {}
    if cop:
        foot += f" Coprocessor: {repo_relative(cop.get('source'))} ({cop.get('config', {}).get('num_latents')} latents)."
    foot += provenance_line(prov)
    return "\n".join(lines) + foot


def results_table_markdown(res: dict, rows: str = "paper") -> str:
    """A markdown table of a `ppl` or `bench` result (the dict or its JSON). rows (ppl only):
    "paper" = positions 1, 2, 4, 8, 16, 32 and the last; "all" = every position."""
    kind = res.get("kind") or ("ppl" if "positions" in res else "bench")
    return _ppl_table(res, rows) if kind == "ppl" else _bench_table(res)
