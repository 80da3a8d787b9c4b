"""Corpus view: where does augmentation help, over many documents rather than one text.

Mode (b) of the app (latents after every token, the n-th token ahead scored) run over a set of
documents, then pooled: the Δ-by-position curve with bootstrap intervals over documents (the
paper's Table 1 for your own text, split into document starts and body), tables of documents and
tokens sorted by Δloss, and Δ bucketed by the decoder's own surprisal and by token kind.

Definitions shared with `cacheaug eval ppl`:
* sink: with sink "auto" a start-of-text token (the tokenizer's BOS, else EOS / <|endoftext|>) is
  put before every document; both arms read it; it is never a target.
* doc_start: targets whose index in their document is < 4 (index 0 = the document's first
  token, which is only a target when a sink precedes it); body: the rest.
* Δ = NLL(decoder + coprocessor) − NLL(decoder) in nats; relative perplexity change
  = (exp(mean Δ) − 1) × 100 %, negative = the latents help.

Documents are scored one at a time (each with `augment.score_after_every_token`, which batches the
augmentation points of a document into a few passes), so the caller gets every document's result
as soon as it is done (progress, Stop, partial figures).

    from cacheaug_core.corpus import CorpusConfig, read_corpus, score_corpus, summarize
    docs = read_corpus("assets/heldout/wiki.jsonl")
    res = score_corpus(wb, docs[:20], CorpusConfig(positions=8, max_tokens=256))
    tables = summarize(res)          # by_position, documents, tokens, by_surprisal, by_kind

CLI: ``cacheaug corpus --text X.jsonl --json OUT [--csv tokens.csv] [--html curve.html]``.
Rebuild the bundled held-out sample: ``python -m cacheaug_core.corpus --build-bundled``.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"wiki": ASSETS / "heldout" / "wiki.jsonl"}   # held-out Wikipedia lead summaries (never trained on)
DOC_START = 4            # targets with index < 4 in their document are "doc_start" (as `eval ppl`)
MAX_DOCS = 200
SURPRISAL_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, float("inf"))  # nats of the decoder alone
KINDS = ("doc_start", "digit", "word_start", "word_piece", "punctuation", "whitespace")


class CorpusError(ValueError):
    """Unusable corpus input (no file, no documents, bad settings); the message is shown as is."""


@dataclass
class CorpusConfig:
    """Settings of a corpus run.

    positions: tokens ahead scored after every augmentation point (1..positions).
    max_docs: documents read (the first ones of the file).
    max_tokens: each document's first tokens scored (longer documents are cut, never chunked).
    sink: "auto" = a start-of-text token before every document (BOS, else EOS); "none" = no sink.
    ahead: the n-th token ahead whose Δ the per-token tables, buckets and token view use.
    n_boot, seed: bootstrap resamples (documents drawn with replacement, both arms paired).
    arms: augmented arms scored: "coprocessor", and "pause" when a pause checkpoint is loaded.
    """

    positions: int = 8
    max_docs: int = 20
    max_tokens: int = 256
    sink: str = "auto"
    ahead: int = 1
    n_boot: int = 1000
    seed: int = 0
    arms: tuple[str, ...] = ("coprocessor", "pause")
    points_per_pass: int | None = None

    def check(self) -> "CorpusConfig":
        if not 1 <= self.positions <= 64:
            raise CorpusError(f"positions must be in 1..64, got {self.positions}")
        if not 1 <= self.ahead <= self.positions:
            raise CorpusError(f"ahead must be in 1..positions ({self.positions}), got {self.ahead}")
        if not 1 <= self.max_docs <= MAX_DOCS:
            raise CorpusError(f"max_docs must be in 1..{MAX_DOCS}, got {self.max_docs}")
        if not 2 <= self.max_tokens <= 2048:
            raise CorpusError(f"max_tokens must be in 2..2048, got {self.max_tokens}")
        if self.sink not in ("auto", "none"):
            raise CorpusError(f"sink must be 'auto' or 'none', got {self.sink!r}")
        return self


# ---------------------------------------------------------------------------------------------
# Reading documents


def read_corpus(path: str | Path) -> list[dict]:
    """Documents of a file as `eval ppl` reads them (`eval.ppl.load_documents`: .jsonl one
    {"text", "title"?} a line with the title joined to its text; other files separated by form-feed
    lines, so a title is never split from its body), or a bundled set by name ("wiki").
    Returns [{"title", "text"}], the title being the document's first line for display."""
    from .eval.ppl import load_documents
    from .eval.provenance import EvalError

    p = BUNDLED.get(str(path), Path(str(path)).expanduser())
    if not p.exists():
        raise CorpusError(f"{path}: no such file (give a .jsonl / .txt file, or 'wiki' for the bundled set)")
    if p.is_dir():
        raise CorpusError(f"{path} is a folder; give a .jsonl or .txt file")
    try:
        docs = load_documents(p)
    except EvalError as e:
        raise CorpusError(str(e).replace("--text ", "")) from None
    return [{"title": _title(d.text), "text": unicodedata.normalize("NFC", d.text)} for d in docs]


def _title(text: str, n: int = 60) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= n else line[: n - 1] + "…"


def sink_token_id(tokenizer, sink: str = "auto") -> int | None:
    """The start-of-text token put before every document, as `eval ppl --sink` picks it
    (`eval.ppl.resolve_sink`: <|endoftext|> where the vocabulary has it, else BOS, else EOS); None
    for sink 'none'."""
    from .eval.ppl import resolve_sink
    from .eval.provenance import EvalError

    try:
        return resolve_sink(tokenizer, sink)["token_id"]
    except EvalError as e:
        raise CorpusError(str(e).replace("--sink", "sink")) from None


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class DocScore:
    """Mode (b) scores of one document.

    tokens: the document's tokens (no sink). offset: 1 with a sink, else 0.
    nll_base: (P, A) decoder alone; nll_aug: arm -> (P, A). Row p = latents after input token p
    (the sink is input token 0 when offset is 1), column n-1 = the n-th token ahead, i.e. document
    token p + n - offset; NaN past the end."""

    index: int
    title: str
    text: str
    tokens: list[str]
    offset: int
    nll_base: np.ndarray
    nll_aug: dict[str, np.ndarray]
    cut_from: int | None = None   # the document's token count when it was cut to max_tokens

    def target_index(self) -> np.ndarray:
        """(P, A) index in the document of every cell's target."""
        P, A = self.nll_base.shape
        return np.arange(P)[:, None] + np.arange(1, A + 1)[None, :] - self.offset

    def per_token(self, arm: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(T_doc,) NLLs of each document token scored with the latents inserted n tokens earlier."""
        from cacheaug_core.viz.app_views import nth_ahead_per_token  # pure numpy; one definition of the indexing

        b, a = nth_ahead_per_token(self.nll_base, self.nll_aug[arm], n)
        return b[self.offset:], a[self.offset:]


@dataclass
class CorpusResult:
    config: CorpusConfig
    docs: list[DocScore] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)
    sink_token: str | None = None
    source: str = ""
    finished: bool = False
    in_progress: str = ""   # set while the last of `docs` is a partial document (what is scored of it so far)


def score_corpus(wb, docs: list[dict], cfg: CorpusConfig, progress: Callable[[float, str], None] | None = None,
                 source: str = "") -> Iterator[CorpusResult]:
    """Score documents one by one; yields the growing CorpusResult after each (the last has finished=True).

    The first document also streams pass by pass (its first arm): those yields hold it as a partial
    last document (NaN rows for the points not scored yet, `in_progress` says how far), so the first
    views come after one pass of points rather than one whole document (a 256-token document took
    ~9 s on a 2-core CPU before anything showed).

    `wb`: a Workbench (decoder, tokenizer, coprocessor, optional pause). `progress(fraction, text)`
    is called between passes; raising from it stops the run (the partial result was already yielded)."""
    from . import augment

    cfg.check()
    arms = [a for a in cfg.arms if (wb.coprocessor if a == "coprocessor" else getattr(wb, a, None)) is not None]
    if not arms:
        raise CorpusError("no augmented arm is loaded (need a coprocessor)")
    docs = docs[: cfg.max_docs]
    if not docs:
        raise CorpusError("no documents to score")
    sink = sink_token_id(wb.tokenizer, cfg.sink)
    res = CorpusResult(cfg, arms=arms, source=source,
                       sink_token=None if sink is None else wb.tokenizer.decode([sink]))
    pad = getattr(wb.tokenizer, "pad_token_id", None) or 0
    dev = wb.decoder.device
    for d, doc in enumerate(docs):
        ids = wb.tokenizer.encode(doc["text"], add_special_tokens=False)
        cut = len(ids) if len(ids) > cfg.max_tokens else None
        ids = ids[: cfg.max_tokens]
        x = ([sink] if sink is not None else []) + ids
        if len(x) < 2:
            continue
        x_t = torch.tensor([x], device=dev)                                            # (1, T)
        out: dict[str, np.ndarray] = {}
        base = None
        for k, arm in enumerate(arms):
            cop = wb.coprocessor if arm == "coprocessor" else getattr(wb, arm)

            def inner(f, d=d, k=k):
                if progress is not None:
                    progress((d + (k + f) / len(arms)) / len(docs), f"document {d + 1}/{len(docs)}, {arm}")

            if d == 0 and k == 0:
                # 32 points a pass for the first document (unless set): its first views come sooner, and
                # the fast path takes as long in all at 32 as at 64 (see Workbench.iter_score_every)
                per_pass = cfg.points_per_pass or (32 if dev.type == "cpu" else None)
                title = doc.get("title") or _title(doc["text"])
                toks = wb.token_strings(ids)
                for done, aug, b in augment.iter_score_after_every_token(wb.decoder, cop, x_t, cfg.positions,
                                                                         per_pass, pad_id=pad, progress=inner):
                    if done < len(x) - 1:
                        nan = np.full(tuple(aug.shape), np.nan)
                        part = {a: (aug.double().cpu().numpy() if a == arm else nan) for a in arms}
                        res.docs.append(DocScore(d, title, doc["text"], toks, int(sink is not None),
                                                 b.double().cpu().numpy(), part, cut))
                        res.in_progress = f"document 1: {done} of {len(x) - 1} augmentation points"
                        yield res
                        res.docs.pop()
                        res.in_progress = ""
            else:
                aug, b = augment.score_after_every_token(wb.decoder, cop, x_t, cfg.positions, cfg.points_per_pass,
                                                         pad_id=pad, progress=inner)
            out[arm] = aug.double().cpu().numpy()
            base = b.double().cpu().numpy() if base is None else base
        res.docs.append(DocScore(d, doc.get("title") or _title(doc["text"]), doc["text"], wb.token_strings(ids),
                                 int(sink is not None), base, out, cut))
        yield res
    res.finished = True
    yield res


# ---------------------------------------------------------------------------------------------
# Pooled tables (pure numpy / pandas)


def _split_mask(doc: DocScore, split: str) -> np.ndarray:
    t = doc.target_index()
    if split == "doc_start":
        return t < DOC_START
    if split == "body":
        return t >= DOC_START
    return np.ones_like(t, dtype=bool)


def _bootstrap_rel(sa: np.ndarray, sb: np.ndarray, n: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(D, K) per-document sums -> (K, 2) percentile interval of the relative perplexity change (%)."""
    from .eval.stats import bootstrap_rel_change  # the same paired document bootstrap as `eval ppl`

    with warnings.catch_warnings():   # a bucket no resample reaches is NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(bootstrap_rel_change(sa, sb, n, n_boot, seed))


def _rel(sa, sb, n):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.expm1((sa - sb) / n) * 100.0


def by_position(res: CorpusResult) -> pd.DataFrame:
    """Per (arm, split, position): mean NLL of both arms, Δ (nats), relative perplexity change % with
    its bootstrap interval over documents, tokens and documents scored. split: all / body / doc_start."""
    cfg = res.config
    rows = []
    D = len(res.docs)
    for arm in res.arms:
        for split in ("all", "body", "doc_start"):
            sa, sb, n = (np.zeros((D, cfg.positions)) for _ in range(3))
            for i, doc in enumerate(res.docs):
                ok = np.isfinite(doc.nll_base) & np.isfinite(doc.nll_aug[arm]) & _split_mask(doc, split)
                sa[i] = np.where(ok, doc.nll_aug[arm], 0).sum(0)
                sb[i] = np.where(ok, doc.nll_base, 0).sum(0)
                n[i] = ok.sum(0)
            if D == 0:
                continue
            ci = _bootstrap_rel(sa, sb, n, cfg.n_boot, cfg.seed) if D >= 2 else np.full((cfg.positions, 2), np.nan)
            N = n.sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mb, ma = sb.sum(0) / N, sa.sum(0) / N
            for k in range(cfg.positions):
                if N[k] == 0:
                    continue
                rows.append({"arm": arm, "split": split, "position": k + 1, "nll_base": mb[k], "nll_aug": ma[k],
                             "delta": ma[k] - mb[k], "rel_ppl_change_pct": float(np.expm1(ma[k] - mb[k]) * 100),
                             "ci_low": ci[k, 0], "ci_high": ci[k, 1], "tokens": int(N[k]),
                             "documents": int((n[:, k] > 0).sum())})
    return pd.DataFrame(rows, columns=["arm", "split", "position", "nll_base", "nll_aug", "delta",
                                       "rel_ppl_change_pct", "ci_low", "ci_high", "tokens", "documents"])


def token_kinds(token: str, index: int) -> list[str]:
    """Kinds of one document token (several may apply): doc_start (index < 4), digit, word_start
    (begins with a space/newline then a letter, or is the document's first token and a letter),
    word_piece (a letter continuing a word), punctuation, whitespace."""
    kinds = []
    if index < DOC_START:
        kinds.append("doc_start")
    s = token or ""
    core = s.lstrip()
    if any(c.isdigit() for c in s):
        kinds.append("digit")
    if core and core[0].isalpha():
        kinds.append("word_start" if (s != core or index == 0) else "word_piece")
    if core and all(unicodedata.category(c).startswith("P") or unicodedata.category(c).startswith("S")
                    for c in core):
        kinds.append("punctuation")
    if s and not core:
        kinds.append("whitespace")
    return kinds


def tokens_frame(res: CorpusResult, arm: str | None = None, n: int | None = None) -> pd.DataFrame:
    """One row per scored document token (latents n tokens earlier): document, index, token, kinds,
    the decoder's surprisal (its NLL), the arm's NLL and Δ (nats)."""
    arm = arm or (res.arms[0] if res.arms else "coprocessor")
    n = int(n or res.config.ahead)
    cols = {k: [] for k in ("doc", "title", "index", "token", "kind", "nll_base", "nll_aug", "delta")}
    for doc in res.docs:
        b, a = doc.per_token(arm, n)
        for j in np.flatnonzero(np.isfinite(b) & np.isfinite(a)):
            cols["doc"].append(doc.index)
            cols["title"].append(doc.title)
            cols["index"].append(int(j))
            cols["token"].append(doc.tokens[j])
            cols["kind"].append(" ".join(token_kinds(doc.tokens[j], int(j))) or "other")
            cols["nll_base"].append(float(b[j]))
            cols["nll_aug"].append(float(a[j]))
            cols["delta"].append(float(a[j] - b[j]))
    df = pd.DataFrame(cols)
    df["token"] = df["token"].astype(object)
    return df


def documents_frame(res: CorpusResult, arm: str | None = None, n: int | None = None) -> pd.DataFrame:
    """One row per document: tokens scored (n ahead), mean NLL of both arms, mean Δ (nats) and the
    relative perplexity change %; sorted as read (sort in the table to find where it helps most)."""
    tf = tokens_frame(res, arm, n)
    rows = []
    for doc in res.docs:
        t = tf[tf["doc"] == doc.index]
        mb, ma = (float(t[c].mean()) if len(t) else float("nan") for c in ("nll_base", "nll_aug"))
        rows.append({"doc": doc.index, "title": doc.title, "tokens": len(doc.tokens), "scored": int(len(t)),
                     "nll_base": mb, "nll_aug": ma, "delta": ma - mb,
                     "rel_ppl_change_pct": float(np.expm1(ma - mb) * 100) if len(t) else float("nan")})
    return pd.DataFrame(rows, columns=["doc", "title", "tokens", "scored", "nll_base", "nll_aug", "delta",
                                       "rel_ppl_change_pct"])


def _bucket_table(tf: pd.DataFrame, labels: list[str], member: Callable[[pd.DataFrame, str], pd.Series],
                  n_docs: list[int], n_boot: int, seed: int, name: str) -> pd.DataFrame:
    docs = {d: i for i, d in enumerate(n_docs)}
    K = len(labels)
    sa, sb, n = (np.zeros((len(docs), K)) for _ in range(3))
    for k, lab in enumerate(labels):
        sub = tf[member(tf, lab)]
        if len(sub):
            g = sub.groupby("doc")
            for d, row in g[["nll_aug", "nll_base"]].sum().iterrows():
                sa[docs[d], k], sb[docs[d], k] = row["nll_aug"], row["nll_base"]
            for d, c in g.size().items():
                n[docs[d], k] = c
    ci = _bootstrap_rel(sa, sb, n, n_boot, seed) if len(docs) >= 2 else np.full((K, 2), np.nan)
    N = n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = (sa.sum(0) - sb.sum(0)) / N
    return pd.DataFrame({name: labels, "tokens": N.astype(np.int64), "mean_surprisal": [
        float(tf[member(tf, lab)]["nll_base"].mean()) if N[k] else float("nan") for k, lab in enumerate(labels)],
        "delta": delta, "rel_ppl_change_pct": np.expm1(delta) * 100, "ci_low": ci[:, 0], "ci_high": ci[:, 1]})


def by_surprisal(res: CorpusResult, arm: str | None = None, n: int | None = None) -> pd.DataFrame:
    """Δ bucketed by the decoder's own surprisal of the target (nats), with document-bootstrap intervals."""
    tf = tokens_frame(res, arm, n)
    edges = SURPRISAL_EDGES
    labels = [f"{lo:g}–{hi:g}" if np.isfinite(hi) else f"≥{lo:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    bounds = dict(zip(labels, zip(edges[:-1], edges[1:])))

    def member(df, lab):
        lo, hi = bounds[lab]
        return (df["nll_base"] >= lo) & (df["nll_base"] < hi)

    return _bucket_table(tf, labels, member, [d.index for d in res.docs], res.config.n_boot, res.config.seed,
                         "surprisal_nats")


def by_kind(res: CorpusResult, arm: str | None = None, n: int | None = None) -> pd.DataFrame:
    """Δ by token kind (see `token_kinds`; a token may count in several), with document-bootstrap intervals."""
    tf = tokens_frame(res, arm, n)

    def member(df, lab):
        return df["kind"].str.split().apply(lambda ks: lab in ks) if len(df) else pd.Series([], dtype=bool)

    return _bucket_table(tf, list(KINDS), member, [d.index for d in res.docs], res.config.n_boot, res.config.seed,
                         "kind")


def summarize(res: CorpusResult, arm: str | None = None, n: int | None = None) -> dict[str, pd.DataFrame]:
    """All tables of a corpus run (the per-token ones for `arm` and the n-th token ahead)."""
    return {"by_position": by_position(res), "documents": documents_frame(res, arm, n),
            "tokens": tokens_frame(res, arm, n), "by_surprisal": by_surprisal(res, arm, n),
            "by_kind": by_kind(res, arm, n)}


def result_json(res: CorpusResult, tables: dict[str, pd.DataFrame] | None = None, arm: str | None = None,
                n: int | None = None) -> dict:
    """The run as JSON-ready data: settings, definitions, tables and every document's score matrices."""
    tables = tables or summarize(res, arm, n)
    return {
        "kind": "corpus", "source": res.source, "finished": res.finished,
        "settings": asdict(res.config) | {"arms": list(res.arms)}, "sink_token": res.sink_token,
        "definitions": {"delta": "NLL(decoder+coprocessor) - NLL(decoder), nats; negative = the latents help",
                        "doc_start": f"target index in its document < {DOC_START}", "body": "the other targets",
                        "interval": "95% percentile bootstrap over documents, both arms paired"},
        "arm": arm or (res.arms[0] if res.arms else None), "ahead": int(n or res.config.ahead),
        **{k: v for k, v in tables.items() if k != "tokens"},
        "documents_scored": [{"doc": d.index, "title": d.title, "tokens": d.tokens, "cut_from_tokens": d.cut_from,
                              "offset": d.offset, "nll_base_by_point": d.nll_base,
                              "nll_aug_by_point": d.nll_aug} for d in res.docs],
    }


# ---------------------------------------------------------------------------------------------
# The checkpoint's stored evaluation as a reference for single texts


_PCT = r"([+-−]?\d+(?:\.\d+)?)%"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _pct(cell: str) -> float:
    return float(cell.replace("−", "-").rstrip("%"))


def reference_curves(evaluation: dict | None) -> dict[str, pd.DataFrame]:
    """Perplexity-by-position results stored with a checkpoint -> {name: DataFrame(position,
    rel_ppl_change_pct, ci_low, ci_high, tokens)}. Reads both forms a checkpoint holds: an `eval ppl`
    JSON (dict with positions / rel_ppl_change_pct / rel_ppl_change_ci95) and its Markdown table
    (| position | tokens | ... | rel. change | 95% CI | ...). Where the result splits the targets
    (the document protocol), the **body** numbers are taken: targets at index >= 4 in their document,
    the protocol's headline. Entries of any other shape are skipped."""
    out = {}
    for name, v in (evaluation or {}).items():
        rows = []
        if isinstance(v, dict) and "rel_ppl_change_pct" in v:
            body = "rel_ppl_change_pct_body" in v
            rel = v["rel_ppl_change_pct_body" if body else "rel_ppl_change_pct"]
            ci = v.get("rel_ppl_change_ci95_body" if body else "rel_ppl_change_ci95") or [[np.nan, np.nan]] * len(rel)
            tok = v.get("tokens_scored_body" if body else "tokens_scored") or [np.nan] * len(rel)
            pos = v.get("positions") or list(range(1, len(rel) + 1))
            rows = [(int(p), float(r), float(c[0]), float(c[1]), float(t))
                    for p, r, c, t in zip(pos, rel, ci, tok) if r is not None]
        elif isinstance(v, str) and "rel. change" in v:
            head = None
            for line in v.splitlines():
                if not line.startswith("|"):
                    head = None if head and not line.strip() else head
                    continue
                cells = _cells(line)
                if cells and cells[0] == "position":
                    head = cells if "rel. change" in cells else None
                    continue
                if head is None or not cells or not cells[0].isdigit() or len(cells) != len(head):
                    continue
                col, cic = ("body", "body 95% CI") if "body 95% CI" in head else ("rel. change", "95% CI")
                try:
                    lo, hi = (_pct(x) for x in cells[head.index(cic)].strip("[]").split(","))
                    rows.append((int(cells[0]), _pct(cells[head.index(col)]), lo, hi,
                                 float(cells[head.index("tokens")].replace(",", ""))))
                except (ValueError, IndexError):
                    continue
                # only the first table of an entry (later ones compare other arms)
            if rows:
                rows = [r for i, r in enumerate(rows) if i == 0 or r[0] > rows[i - 1][0]]
        if rows:
            df = pd.DataFrame(rows, columns=["position", "rel_ppl_change_pct", "ci_low", "ci_high", "tokens"])
            df.attrs["body"] = (isinstance(v, dict) and "rel_ppl_change_pct_body" in v) or (
                isinstance(v, str) and "body 95% CI" in v)
            out[str(name)] = df
    return out


def status_line(evaluation: dict | None) -> str:
    """One sentence from the checkpoint's first stored perplexity evaluation (no hand-written numbers):
    '<name>: perplexity -11.9% at the next token [-12.7, -11.1], -3.2% at 16 ahead ...'; '' if none."""
    curves = reference_curves(evaluation)
    if not curves:
        return ""
    name, df = next(iter(curves.items()))
    parts = []
    for pos in sorted({int(df.position.min()), 16 if (df.position == 16).any() else int(df.position.max())}):
        r = df[df.position == pos].iloc[0]
        where = "the next token" if pos == 1 else f"{pos} tokens ahead"
        parts.append(f"{r.rel_ppl_change_pct:+.1f}% at {where} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]")
    tok = df.tokens.max()
    what = ("perplexity of the body (targets at index >= 4 in their document) with the coprocessor "
            if df.attrs.get("body") else "perplexity with the coprocessor ")
    return (f"{name}: {what}" + ", ".join(parts)
            + (f" ({tok:,.0f} tokens scored)" if np.isfinite(tok) else "") + ". Negative = the latents help.")


def reference_at(curve: pd.DataFrame | None, position: int) -> pd.Series | None:
    """The stored reference row at `position`, or at the nearest stored position below it."""
    if curve is None or not len(curve):
        return None
    c = curve[curve.position <= int(position)]
    return (c if len(c) else curve).sort_values("position").iloc[-1]


# ---------------------------------------------------------------------------------------------
# `cacheaug corpus` (cli.py registers the parser and calls this)


def add_cli_args(p) -> None:
    p.add_argument("--text", default="wiki", help="a .jsonl ({\"text\": ...} a line) or .txt (form-feed-line "
                   "separated) file, or 'wiki' for the bundled held-out sample (default)")
    p.add_argument("--json", default="", help="write the run (settings, tables, every document's scores) here")
    p.add_argument("--csv", default="", help="write the per-token table here")
    p.add_argument("--html", default="", help="write the Δ-by-position figure (standalone HTML) here")
    for f, typ in (("positions", int), ("max_docs", int), ("max_tokens", int), ("ahead", int), ("n_boot", int),
                   ("seed", int)):
        p.add_argument("--" + f.replace("_", "-"), type=typ, default=getattr(CorpusConfig, f))
    p.add_argument("--sink", choices=("auto", "none"), default="auto")
    p.add_argument("--arm", default="coprocessor", choices=("coprocessor", "pause"),
                   help="the arm of the per-token tables and buckets")


def run_cli(args, load_workbench) -> int:
    """Score the documents, print the pooled table, write the exports. `load_workbench()` loads the model
    (called after the settings and the file are checked)."""
    import sys

    cfg = CorpusConfig(positions=args.positions, max_docs=args.max_docs, max_tokens=args.max_tokens, sink=args.sink,
                       ahead=args.ahead, n_boot=args.n_boot, seed=args.seed).check()
    docs = read_corpus(args.text)
    wb = load_workbench()
    from tqdm.auto import tqdm

    with tqdm(total=100, desc="corpus", unit="%", file=sys.stderr) as bar:
        res = None
        for res in score_corpus(wb, docs, cfg, progress=lambda f, _d: bar.update(round(100 * f) - bar.n),
                                source=str(args.text)):
            pass
    arm = args.arm if args.arm in res.arms else res.arms[0]
    tables = summarize(res, arm, cfg.ahead)
    bp = tables["by_position"]
    print(f"{len(res.docs)} documents, first {cfg.max_tokens} tokens each, sink {cfg.sink}; relative perplexity "
          "change % (negative = the latents help), 95% bootstrap interval over documents")
    print(bp.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.json:
        from cacheaug_core.viz.app_views import write_json

        write_json(result_json(res, tables, arm, cfg.ahead), args.json)
        print(f"run JSON: {args.json}")
    if args.csv:
        from cacheaug_core import viz

        viz.frame_to_csv(tables["tokens"], args.csv)
        print(f"per-token CSV: {args.csv}")
    if args.html:
        from cacheaug_core import viz
        from cacheaug_core.viz.corpus import corpus_curve_figure

        Path(args.html).write_text(viz.figure_to_html(corpus_curve_figure(bp)), encoding="utf-8")
        print(f"figure HTML: {args.html}")
    return 0


# ---------------------------------------------------------------------------------------------
# The bundled held-out sample


def build_bundled(out: Path = BUNDLED["wiki"], every: int = 60, longest: int = 40) -> Path:
    """Write a small sample of the held-out Wikipedia set (`sources.SOURCES['wiki']`, never in the
    training mix): every `every`-th document in the package's order, plus the `longest` longest
    documents (so runs of 256 tokens per document have enough text)."""
    from . import sources as S

    src = S.SOURCES["wiki"]
    files = S.fetch_source(src)
    docs = [S.normalize(t) for t in src.extract(files)]
    keep = set(range(0, len(docs), every)) | set(np.argsort([-len(d) for d in docs], kind="stable")[:longest].tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i in sorted(keep):
            title, _, body = docs[i].partition("\n\n")
            f.write(json.dumps({"title": title.strip(), "text": docs[i], "source": "wiki", "index": i},
                               ensure_ascii=False) + "\n")
    pkg = src.packages[0]
    meta = {"source": "wiki", "description": src.description, "licence": src.licence,
            "package": f"{pkg.registry}:{pkg.spec}", "documents": len(keep), "of": len(docs),
            "selection": f"every {every}th document in the package's order + the {longest} longest",
            "rebuild": "python -m cacheaug_core.corpus --build-bundled"}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cacheaug_core.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-bundled", action="store_true", help=f"rewrite {BUNDLED['wiki']}")
    args = ap.parse_args(argv)
    if args.build_bundled:
        print(build_bundled())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
