"""Perplexity by ahead position on whole documents (the paper's Table 1 protocol, `cacheaug eval ppl`).

Documents are the unit: read from .jsonl or form-feed separated text (`load_documents`), each read
after the same start-of-text sink token by every arm (`resolve_sink`), long ones in windows that
carry the text before them (`document_windows`), every target split by its index in its document
(doc_start < 4 <= body). `perplexity_by_position` compares the decoder with the coprocessor and,
optionally, more augmented arms (a pause checkpoint, the `sink_keys` extra-keys control), with
paired bootstrap intervals over documents. Protocol and JSON keys: docs/evaluation.md.

    from cacheaug_core.eval import load_models, load_documents, resolve_sink, perplexity_by_position
    wb = load_models(coprocessor="assets/coprocessor")
    docs = [d.text for d in load_documents("data/corpus/heldout/wiki.jsonl")]
    res = perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, docs, positions=32,
                                 sink=resolve_sink(wb.tokenizer)["token_id"])
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import augment
from .provenance import EvalError
from .stats import percentile_interval, ppl_summary, rel_change, resample_weights


DOC_START = 4          # a target at index < DOC_START in its document counts as "doc_start", the rest "body"
MEAN_POSITIONS = 16    # `--compare` also reports the difference averaged over positions 1..this


@dataclass
class Document:
    """One evaluation unit: the whole text of a document (a title joined to its body) and its source."""

    text: str
    source: str = ""


def load_documents(path: str | Path) -> list[Document]:
    """The documents of a .jsonl or .txt file, each one unit that is never split from its start.

    .jsonl: one JSON object a line with a "text" field; an optional "title" is joined in front of
    the text with a blank line ("title\\n\\ntext", one document) unless the text already starts
    with it (`prepare-data`'s held-out sets keep the title as the text's first line), and an
    optional "source" is kept.
    Any other file: documents are separated by lines holding only a form feed (printf '\\f\\n');
    a file without one is a single document (blank lines do not separate documents: a Wikipedia
    title and its summary are one document).
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--text {p}: no such file")
    raw = p.read_text(encoding="utf-8", errors="replace")
    docs = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, title, source = obj["text"], obj.get("title") or "", obj.get("source") or ""
                if not isinstance(text, str) or not isinstance(title, str):
                    raise TypeError("'text' and 'title' must be strings")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise EvalError(f"{p}:{i}: expected a JSON object with a 'text' field ({e})") from e
            text, title = text.strip(), title.strip()
            if title and not text.startswith(title):    # a text that already opens with its title keeps it once
                text = f"{title}\n\n{text}" if text else title
            docs.append(Document(text, str(source)))
    else:
        docs = [Document(d) for d in re.split(r"(?m)^\f[ \t\r]*$", raw)]
    docs = [Document(d.text.strip(), d.source) for d in docs if d.text and d.text.strip()]
    if not docs:
        raise EvalError(f"{p} holds no text")
    return docs


def read_documents(path: str | Path) -> list[str]:
    """The texts of `load_documents(path)`."""
    return [d.text for d in load_documents(path)]


SINK_DOCUMENT_TOKEN = "<|endoftext|>"   # what GPT-2-style pretraining puts between documents


def resolve_sink(tokenizer, spec: str = "auto") -> dict:
    """The start-of-text token every arm reads before each document (`--sink`).

    "auto": <|endoftext|> where the vocabulary has it (the document separator of GPT-2-style
    pretraining: GPT-2, Qwen2, SmolLM2), else the tokenizer's BOS (Llama, Gemma), else its EOS.
    <|endoftext|> comes first because a chat model's BOS can be a chat token: SmolLM2-Instruct's
    BOS is <|im_start|>, after which the plain decoder expects a role name and stays several times
    more perplexed for the first words of a document than after <|endoftext|> (bench/doc_start_effect.py
    measures it), a doc-start deficit that any extra keys could then "fix". "none": no sink (a
    document's first token is read without context and never scored); anything else: that token.
    -> {"mode", "token_id" (None for none), "token"}.
    """
    if spec == "none":
        return {"mode": "none", "token_id": None, "token": None}
    vocab = tokenizer.get_vocab()
    if spec == "auto":
        tid = vocab.get(SINK_DOCUMENT_TOKEN)
        if tid is None:
            tid = next((getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id")
                        if getattr(tokenizer, n, None) is not None), None)
        if tid is None:
            raise EvalError(f"--sink auto: the tokenizer has no {SINK_DOCUMENT_TOKEN}, BOS or EOS token; name one "
                            "with --sink TOKEN, or --sink none")
    else:
        if spec not in vocab:
            raise EvalError(f"--sink {spec!r} is not a token of this tokenizer (e.g. --sink auto, --sink none)")
        tid = vocab[spec]
    tid = int(tid)
    return {"mode": spec, "token_id": tid, "token": tokenizer.convert_ids_to_tokens([tid])[0]}


@dataclass
class Window:
    """One scored sequence: [sink] + a document's tokens doc[first : first + len(ids) - prefix].

    Its augmentation points are named by the document index of the token they follow (-1: the
    sink); the window scores the points in [own[0], own[1]), every earlier one only gives context.
    """

    doc: int
    ids: list[int]
    first: int
    prefix: int
    own: tuple[int, int]


def document_windows(ids: list[int], doc: int, chunk: int, positions: int, context: int,
                     sink: int | None) -> list[Window]:
    """The windows of one document (token ids without the sink), each at most `chunk` tokens.

    A document that fits is one window scored whole. A longer one is read in windows that each
    start with the sink and carry at least `context` tokens of the document before their first
    scored point; each point is scored in exactly one window, and a window owns only points whose
    `positions` targets all lie inside it (the last window: every point left). So no document's
    body is ever read without the text before it, and the cost is chunk / (chunk - 1 - context -
    positions) times that of one pass on those documents only.
    """
    P = 0 if sink is None else 1
    pre = [] if sink is None else [int(sink)]
    L, W = len(ids), chunk - P
    if L + P < 2:
        return []
    if L <= W:
        return [Window(doc, pre + list(ids), 0, P, (-P, L - 1))]
    out, q0, a = [], -P, 0
    while q0 < L - 1:
        if a + W >= L:
            a = max(0, L - W)
            q1 = L - 1
        else:
            q1 = a + W - positions
        out.append(Window(doc, pre + list(ids[a: a + W]), a, P, (q0, q1)))
        q0 = q1
        a = q0 - context
    return out


def check_ppl_settings(positions: int, chunk: int, points_per_pass: int, context: int | None = None) -> None:
    """EvalError unless the settings of `perplexity_by_position` can run (the CLI checks them before
    loading a model). context None: chunk // 4."""
    context = chunk // 4 if context is None else context
    if positions < 1 or chunk < 2 or positions >= chunk:
        raise EvalError(f"need 1 <= --positions < --chunk, got positions={positions}, chunk={chunk}")
    if points_per_pass < 1:
        raise EvalError("--points-per-pass must be at least 1")
    if context < 0 or chunk - 1 - positions - context < 1:
        raise EvalError(f"need 0 <= --context and --positions + --context < --chunk - 1 (a long document's "
                        f"windows must each score a point), got positions={positions}, context={context}, "
                        f"chunk={chunk}")


def sink_keys(decoder, like, num_keys: int, sink_id: int):
    """The extra-keys control: a pause-token "coprocessor" (body none) whose `num_keys` latents are
    the sink token's own input embedding, laid out as `like`'s latents (same position ids, re-fed
    token, shift) and, where `like` has a latent gate, behind a copy of its learned gate. Through the
    augmentation code the decoder then reads `num_keys` plain copies of the start-of-text token exactly
    where the latents would go and as visible as they are: what more keys alone give, with nothing
    computed from the context. (Ungated copies of a start-of-text token in the middle of a text read
    as a document boundary to the decoder: +1,000% and worse at every position with the shipped
    layout, a control nothing fails to beat.)"""
    from ..config import CoprocessorConfig
    from ..coprocessor import Coprocessor

    if num_keys < 1:
        raise EvalError("--extra-keys must be at least 1")
    c = like.config
    cfg = CoprocessorConfig(num_latents=num_keys, body="none", latent_norm="none", refeed_last=c.refeed_last,
                            latent_pos=c.latent_pos, shift_ahead=c.shift_ahead, hide_point=c.hide_point,
                            latent_gate=c.latent_gate)
    cop = Coprocessor(cfg, decoder)
    gate = augment.gate_of(like)                                                                   # (L,) or None
    with torch.no_grad():
        if gate is not None:
            cop.gate_bias.copy_(gate.detach().to(cop.gate_bias.dtype))
        e = augment.embed(decoder, torch.tensor([sink_id], device=decoder.device))[0]             # (d,)
        cop.soft_tokens.copy_(e.to(cop.soft_tokens.dtype).expand(num_keys, -1))
        cop.latent_gain.fill_(1.0)
    return cop.to(dtype=augment.decoder_dtype(decoder)).eval()


@dataclass
class DocumentScores:
    """Summed NLLs per document, split and position, for the decoder and every augmented arm."""

    nll: dict[str, np.ndarray]    # arm ("decoder", "coprocessor", ...) -> (D, 2, A); split 0 doc_start, 1 body
    count: np.ndarray             # (D, 2, A) tokens scored
    windows: list[Window]
    tokens_read: int              # document tokens (the sinks not counted)
    documents_read: int           # documents read (those too short to score anything included)


@torch.no_grad()
def score_documents(decoder, tokenizer, arms: dict, docs: list[str], positions: int = 32, chunk: int = 512,
                    context: int | None = None, sink: int | None = None, max_tokens: int = 0, points_per_pass: int = 64,
                    progress: bool = False) -> DocumentScores:
    """Every document through `document_windows`, every window through
    `augment.score_after_every_token` once per augmented arm (arms: name -> coprocessor); the
    decoder arm's NLLs come with the first. Sums each owned (point, position) pair's NLL into its
    document, split by the target's index in its document (< DOC_START: doc_start). The sink is
    read by every arm and is never a target. Whole documents are read until `max_tokens` document
    tokens (0 = all): the document that reaches it is read whole."""
    context = chunk // 4 if context is None else context
    if not arms:
        raise EvalError("perplexity by position compares the decoder with an augmented decoder: it needs a coprocessor")
    A = positions
    enc, total = [], 0
    for text in docs:
        if max_tokens and total >= max_tokens:
            break
        ids = tokenizer.encode(text, add_special_tokens=False)
        enc.append(ids)
        total += len(ids)
    windows = [w for d, ids in enumerate(enc) for w in document_windows(ids, d, chunk, A, context, sink)]
    if not windows:
        raise EvalError("the text produced no document of at least two tokens")
    D = len(enc)
    names = ["decoder", *arms]
    nll = {a: np.zeros((D, 2, A)) for a in names}
    count = np.zeros((D, 2, A))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    it = windows
    if progress:
        from tqdm import tqdm

        it = tqdm(windows, desc="ppl", unit="window", file=sys.stderr)
    n = np.arange(1, A + 1)
    for w in it:
        x = torch.tensor([w.ids], device=decoder.device)                               # (1, T)
        T = x.shape[1]
        p = np.arange(T - 1)                                                            # point after token p
        j = w.first + p - w.prefix                                                      # its document index
        owned = (j >= w.own[0]) & (j < w.own[1])
        valid = owned[:, None] & (p[:, None] + n[None] < T)                            # (T-1, A)
        body = (j[:, None] + n[None]) >= DOC_START                                      # target's document index
        got = {}
        for a, cop in arms.items():
            aug, base = augment.score_after_every_token(decoder, cop, x, A, points_per_pass, pad_id=pad)
            got[a] = aug.double().cpu().numpy()                                         # (T-1, A)
            got.setdefault("decoder", base.double().cpu().numpy())
        for a in names:
            if not np.isfinite(got[a][valid]).all():
                raise EvalError(f"arm {a}: non-finite NLL in document {w.doc} (try --dtype float32)")
            for s, m in enumerate((valid & ~body, valid & body)):
                nll[a][w.doc, s] += np.where(m, got[a], 0.0).sum(0)
        for s, m in enumerate((valid & ~body, valid & body)):
            count[w.doc, s] += m.sum(0)
    keep = count.sum((1, 2)) > 0                     # a one-token document without a sink scores nothing
    return DocumentScores({a: v[keep] for a, v in nll.items()}, count[keep], windows, total, len(enc))


def _arm_summary(sc: DocumentScores, arm: str, W: np.ndarray | None) -> dict:
    """Perplexity by position of one arm against the decoder: all targets, and split by doc_start/body."""
    out = {}
    for key, sl in (("", slice(None)), ("_doc_start", slice(0, 1)), ("_body", slice(1, 2))):
        sa, sb, n = (x[:, sl].sum(1) for x in (sc.nll[arm], sc.nll["decoder"], sc.count))    # (D, A)
        s = ppl_summary(sa, sb, n)
        ci = (percentile_interval(rel_change(W @ sa, W @ sb, W @ n)) if W is not None
              else np.stack([s["rel_ppl_change_pct"]] * 2, 1))
        out |= {k + key: v.tolist() for k, v in s.items()}
        out["rel_ppl_change_ci95" + key] = ci.tolist()
    return out


def _arm_difference(sc: DocumentScores, arm: str, other: str, W: np.ndarray | None) -> dict:
    """rel_ppl_change_pct(arm) - rel_ppl_change_pct(other) per position and averaged over positions
    1..MEAN_POSITIONS, with paired bootstrap intervals over documents (the same resamples for both)."""
    A = sc.count.shape[-1]
    m = min(MEAN_POSITIONS, A)
    out = {"what": f"rel_ppl_change_pct({arm}) - rel_ppl_change_pct({other}) in percentage points; negative: "
                   f"{arm} lowers perplexity more", "mean_over_positions": [1, m]}
    for key, sl in (("all", slice(None)), ("doc_start", slice(0, 1)), ("body", slice(1, 2))):
        a, o, b, n = (x[:, sl].sum(1) for x in (sc.nll[arm], sc.nll[other], sc.nll["decoder"], sc.count))
        d = rel_change(a.sum(0), b.sum(0), n.sum(0)) - rel_change(o.sum(0), b.sum(0), n.sum(0))   # (A,)
        r = {"difference_pct_points": d.tolist(), f"mean_1_{m}": float(np.nanmean(d[:m]))}
        if W is not None:
            bd = rel_change(W @ a, W @ b, W @ n) - rel_change(W @ o, W @ b, W @ n)              # (n_boot, A)
            r["ci95"] = percentile_interval(bd).tolist()
            with np.errstate(invalid="ignore"):
                r[f"mean_1_{m}_ci95"] = percentile_interval(np.nanmean(bd[:, :m], 1)).tolist()
        out[key] = r
    return out


def perplexity_by_position(decoder, tokenizer, coprocessor, docs: list[str], positions: int = 32, chunk: int = 512,
                           max_tokens: int = 0, points_per_pass: int = 64, n_boot: int = 1000, seed: int = 0,
                           progress: bool = False, sink: int | None = None, context: int | None = None,
                           others: dict | None = None) -> dict:
    """The paper's perplexity protocol on whole documents: latents after every token, the n-th token
    ahead scored, the decoder and every augmented arm reading the same windows and the same sink.

    For every window (`document_windows`), `augment.score_after_every_token` inserts the coprocessor's
    latents after each token p (batched: `points_per_pass` points per masked decoder pass) and scores
    x_{p+n} for n = 1..positions, given x_0..x_p, the latents and x_{p+1}..x_{p+n-1}. The decoder
    arm scores the same tokens given the same text without latents. Mean NLLs are pooled over all
    scored tokens; intervals are percentile bootstraps over documents, paired (one draw for every
    arm and split). `others`: more augmented arms (name -> coprocessor: a pause checkpoint, the
    `sink_keys` control), each reported under "arms" and compared with the coprocessor under "compare".
    `context` (default chunk // 4): see `document_windows`.
    """
    context = chunk // 4 if context is None else context
    if coprocessor is None:
        raise EvalError("perplexity by position compares the decoder with the augmented decoder: it needs a coprocessor")
    check_ppl_settings(positions, chunk, points_per_pass, context)
    arms = {"coprocessor": coprocessor, **(others or {})}
    sc = score_documents(decoder, tokenizer, arms, docs, positions, chunk, context, sink, max_tokens,
                         points_per_pass, progress)
    D = sc.count.shape[0]
    W = resample_weights(D, n_boot, seed) if D >= 2 else None
    res = {"kind": "ppl", "positions": list(range(1, positions + 1))}
    res |= _arm_summary(sc, "coprocessor", W)
    res["documents"] = D
    res["bootstrap"] = {"unit": "document", "units": D, "resamples": n_boot if W is not None else 0, "seed": seed,
                        "method": "percentile, paired (every arm and split shares each resample)"}
    per_doc = np.bincount([w.doc for w in sc.windows])
    res["data"] = {"documents": D, "documents_read": sc.documents_read, "windows": len(sc.windows),
                   "tokens_read": sc.tokens_read,
                   "documents_in_several_windows": int((per_doc > 1).sum())}
    res["split"] = {"doc_start": f"targets at index < {DOC_START} in their document", "body": "all other targets"}
    res["settings"] = {"positions": positions, "chunk": chunk, "context": context, "max_tokens": max_tokens,
                       "points_per_pass": points_per_pass, "num_latents": coprocessor.config.num_latents}
    if others:
        res["arms"] = {a: {"num_latents": c.config.num_latents, **_arm_summary(sc, a, W)} for a, c in others.items()}
        res["compare"] = {a: _arm_difference(sc, "coprocessor", a, W) for a in others}
    return res
