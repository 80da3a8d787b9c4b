"""Evaluation: perplexity by ahead position (the paper's Table 1), benchmarks with the coprocessor
called once at the end of the prompt (Tables 2, 3, 4 and 8), and an lm-evaluation-harness `LM`.

    cacheaug eval ppl --text held_out.txt --json ppl.json [--coprocessor DIR] [--positions 32]
    cacheaug eval bench --tasks arc_easy,gsm8k --limit 50 --json bench.json --md bench.md \
        [--arms decoder,coprocessor,pause,cot] [--pause DIR] [--async-delay N]
    # the same run in N processes side by side (items i, i+N, ... each), then one merged result:
    for i in 0 1 2 3; do cacheaug eval bench --shard $i/4 --limit 500,gsm8k=200 --json b$i.json & done; wait
    cacheaug eval bench-merge b0.json b1.json b2.json b3.json --json bench.json --md bench.md

    from cacheaug_core import evaluate
    wb = evaluate.load_models(coprocessor="runs/x/final")
    res = evaluate.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, docs, positions=32)
    print(evaluate.results_table_markdown(res))

    # lm-evaluation-harness (pip install lm-eval): importing the class registers model "cacheaug"
    from cacheaug_core.evaluate import CacheAugLM
    python -m cacheaug_core.evaluate run --model cacheaug --model_args coprocessor=DIR --tasks arc_easy

Protocols, the JSON schema and how to reproduce a run: docs/evaluation.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import torch

from . import augment, families, kv, masks
from .decoder import sha256_file as _sha256

PAPER_POSITIONS = (1, 2, 4, 8, 16, 32)       # the rows of Table 1
ALL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu", "lambada", "gsm8k")
ARMS = ("decoder", "coprocessor", "pause", "cot")
COT_SUFFIX = " Let's think step by step."   # Kojima et al.'s zero-shot trigger (Table 4)
GSM8K_STOP = ("\n\n", "Question:")
TASK_NAMES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "piqa": "PIQA",
              "winogrande": "Winogrande", "boolq": "BoolQ", "mmlu": "MMLU", "lambada": "LAMBADA",
              "gsm8k": "GSM8K"}
ARM_NAMES = {"decoder": "decoder", "coprocessor": "+ coprocessor", "pause": "pause tokens", "cot": "0-shot CoT"}


class EvalError(ValueError):
    """A usage error of the evaluation commands; the CLI prints the message and exits with 2."""


# ---------------------------------------------------------------------------------------------
# Models and provenance.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "") -> str:
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    return device


def load_models(decoder: str = "", coprocessor: str = "", pause: str = "", device: str = "", dtype: str = "float32"):
    """A Workbench (decoder, tokenizer, info, coprocessor, pause) on `device` in `dtype`.

    No --coprocessor means the shipped default (or an untrained one, with a notice: Workbench.load).
    """
    from .checkpoint import load_coprocessor
    from .workbench import Workbench

    if dtype not in DTYPES:
        raise EvalError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev, dt = resolve_device(device), DTYPES[dtype]
    wb = Workbench.load(decoder or None, coprocessor or None)
    wb.decoder.to(device=dev, dtype=dt)
    wb.coprocessor.to(device=dev, dtype=dt)
    if pause:
        wb.pause = load_coprocessor(pause, wb.decoder, wb.info).to(device=dev, dtype=dt).eval()
        wb.pause_source = str(pause)
        if wb.pause.config.body != "none":
            print(f"note: --pause {pause} has body={wb.pause.config.body!r}, not 'none' (pause tokens)", file=sys.stderr)
    return wb


def git_commit() -> dict:
    """The checkout's commit and whether it has local changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _cop_record(cop, source: str) -> dict | None:
    if cop is None:
        return None
    ck = getattr(cop, "checkpoint_config", None) or {}
    return {"source": source, "config": dict(cop.config.__dict__), "status": ck.get("status", ""),
            "training": ck.get("training", {})}


def provenance(wb, t0: float, args=None) -> dict:
    """Everything needed to tell two result files apart: command, code, machine, models, time."""
    import transformers

    dec = wb.decoder
    return {
        "command_line": shlex.join(sys.argv),
        "arguments": {k: v for k, v in vars(args).items() if k != "fn"} if args is not None else None,
        "git": git_commit(),
        "device": device_name(dec.device),
        "dtype": str(augment.decoder_dtype(dec)).replace("torch.", ""),
        "decoder": wb.info.to_dict() if getattr(wb, "info", None) is not None else None,
        "coprocessor": _cop_record(wb.coprocessor, getattr(wb, "coprocessor_source", "")),
        "pause": _cop_record(getattr(wb, "pause", None), getattr(wb, "pause_source", "")),
        "notice": getattr(wb, "notice", ""),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _clean_json(x):
    """NaN/inf -> None and numpy scalars -> Python, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean_json(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(obj: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean_json(obj), indent=1, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Perplexity by ahead position (Table 1).


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text file (separated by blank lines) or a .jsonl file (one {"text": ...} a line)."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--text {p}: no such file")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{p}:{i}: expected a JSON object with a 'text' field ({e})") from e
    else:
        docs = re.split(r"\n\s*\n", raw)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise EvalError(f"{p} holds no text")
    return docs


def document_chunks(tokenizer, docs: list[str], chunk: int, max_tokens: int = 0) -> list[tuple[int, list[int]]]:
    """(document index, token ids) of every chunk of <= `chunk` tokens, in order, until
    `max_tokens` tokens are read (0 = all). Chunks never cross documents; a chunk is scored on
    its own (its first token has no context and is not scored), like a validation sequence."""
    out, total = [], 0
    for d, text in enumerate(docs):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for s in range(0, len(ids), chunk):
            piece = ids[s: s + chunk]
            if max_tokens:
                piece = piece[: max_tokens - total]
            if len(piece) >= 2:
                out.append((d, piece))
            total += len(piece)
            if max_tokens and total >= max_tokens:
                return out
    return out


def ppl_summary(sum_aug: np.ndarray, sum_base: np.ndarray, count: np.ndarray) -> dict:
    """Perplexity by position from summed NLLs. Each argument (A,) or (U, A) summed over units.

    rel_ppl_change_pct = (ppl_aug / ppl_dec - 1) * 100: negative when the latents lower perplexity,
    the sign of the paper's Table 1.
    """
    sa, sb, n = (np.asarray(x, dtype=np.float64) for x in (sum_aug, sum_base, count))
    if sa.ndim == 2:
        sa, sb, n = sa.sum(0), sb.sum(0), n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = sa / n, sb / n
        rel = (np.exp(ma - mb) - 1.0) * 100.0
    return {"nll_decoder": mb, "nll_augmented": ma, "ppl_decoder": np.exp(mb), "ppl_augmented": np.exp(ma),
            "rel_ppl_change_pct": rel, "tokens_scored": n.astype(np.int64)}


def bootstrap_rel_change(sum_aug: np.ndarray, sum_base: np.ndarray, count: np.ndarray, n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95) -> np.ndarray:
    """Percentile bootstrap interval of rel_ppl_change_pct per position, resampling units.

    Each argument is (U, A): per unit (document or chunk) summed NLL of each arm and the number of
    tokens scored. A resample draws U units with replacement; both arms use the same draw (paired).
    Returns (A, 2) [low, high].
    """
    U = sum_aug.shape[0]
    if U < 2:
        point = ppl_summary(sum_aug, sum_base, count)["rel_ppl_change_pct"]
        return np.stack([point, point], 1)
    rng = np.random.default_rng(seed)
    W = rng.multinomial(U, np.full(U, 1.0 / U), size=n_boot).astype(np.float64)     # (n_boot, U)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = W @ count
        rel = (np.exp((W @ sum_aug - W @ sum_base) / n) - 1.0) * 100.0             # (n_boot, A)
    a = (1 - level) / 2 * 100
    return np.nanpercentile(rel, [a, 100 - a], axis=0).T


@torch.no_grad()
def check_ppl_settings(positions: int, chunk: int, points_per_pass: int) -> None:
    """EvalError unless the settings of `perplexity_by_position` can run (the CLI checks them before
    loading a model)."""
    if positions < 1 or chunk < 2 or positions >= chunk:
        raise EvalError(f"need 1 <= --positions < --chunk, got positions={positions}, chunk={chunk}")
    if points_per_pass < 1:
        raise EvalError("--points-per-pass must be at least 1")


def perplexity_by_position(decoder, tokenizer, coprocessor, docs: list[str], positions: int = 32, chunk: int = 256,
                           max_tokens: int = 0, points_per_pass: int = 64, n_boot: int = 1000, seed: int = 0,
                           bootstrap_unit: str = "document", progress: bool = False) -> dict:
    """The paper's perplexity protocol: latents after every token, the n-th token ahead scored.

    For every chunk, `augment.score_after_every_token` inserts the coprocessor's latents after each
    token p (batched: `points_per_pass` points per masked decoder pass) and scores x_{p+n} for
    n = 1..positions, given x_0..x_p, the latents and x_{p+1}..x_{p+n-1}. The decoder arm scores the
    same tokens given the same text without latents. Mean NLLs are pooled over all scored tokens.
    """
    if coprocessor is None:
        raise EvalError("perplexity by position compares the decoder with the augmented decoder: it needs a coprocessor")
    check_ppl_settings(positions, chunk, points_per_pass)
    chunks = document_chunks(tokenizer, docs, chunk, max_tokens)
    if not chunks:
        raise EvalError("the text produced no chunk of at least two tokens")
    U, A = len(chunks), positions
    sa, sb, n = np.zeros((U, A)), np.zeros((U, A)), np.zeros((U, A))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    it = chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="ppl", unit="chunk", file=sys.stderr)
    for u, (_, ids) in enumerate(it):
        x = torch.tensor([ids], device=decoder.device)                                 # (1, T)
        aug, base = augment.score_after_every_token(decoder, coprocessor, x, A, points_per_pass, pad_id=pad)
        aug, base = aug.double().cpu().numpy(), base.double().cpu().numpy()           # (T-1, A)
        ok = np.isfinite(aug) & np.isfinite(base)
        sa[u], sb[u], n[u] = np.where(ok, aug, 0).sum(0), np.where(ok, base, 0).sum(0), ok.sum(0)
    doc_of = np.array([d for d, _ in chunks])
    n_docs = len(set(doc_of.tolist()))
    # Resample documents (chunks of one document are correlated); with a single document, chunks.
    unit = bootstrap_unit if bootstrap_unit == "chunk" or n_docs >= 2 else "chunk"
    ua, ub, un = sa, sb, n
    if unit == "document":                                                           # (U, A) -> (D, A)
        keys, inv = np.unique(doc_of, return_inverse=True)
        ua, ub, un = (np.zeros((len(keys), A)) for _ in range(3))
        for dst, src in ((ua, sa), (ub, sb), (un, n)):
            np.add.at(dst, inv, src)
    res = {"kind": "ppl", "positions": list(range(1, A + 1))}
    res |= {k: v.tolist() for k, v in ppl_summary(sa, sb, n).items()}
    res["rel_ppl_change_ci95"] = bootstrap_rel_change(ua, ub, un, n_boot, seed).tolist()
    res["bootstrap"] = {"unit": unit, "units": int(ua.shape[0]), "resamples": n_boot, "seed": seed,
                        "method": "percentile, paired (both arms share each resample)"}
    res["data"] = {"documents": n_docs, "chunks": U, "tokens_read": int(sum(len(c) for _, c in chunks))}
    res["settings"] = {"positions": A, "chunk": chunk, "max_tokens": max_tokens, "points_per_pass": points_per_pass,
                       "num_latents": coprocessor.config.num_latents}
    return res


# ---------------------------------------------------------------------------------------------
# Log-likelihood scoring of continuations, augmented once at the end of the context.


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval splits them: trailing spaces of the context
    move to the continuation, the continuation's ids are the tail of encode(context + continuation)
    after encode(context). An empty context becomes the prefix token (EOS/BOS)."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    if not context:
        if prefix_id is None:
            raise EvalError("empty context and the tokenizer has no BOS/EOS token to condition on")
        return [prefix_id], tokenizer.encode(continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def prefix_token_id(tokenizer) -> int | None:
    for name in ("bos_token_id", "eos_token_id"):
        t = getattr(tokenizer, name, None)
        if t is not None:
            return int(t)
    return None


def max_positions(decoder) -> int:
    return int(getattr(decoder.config, "max_position_embeddings", None) or 2048)


@dataclass
class ChoiceScores:
    logprobs: list[float]            # summed log-prob of each continuation (nats)
    token_logprobs: list[list[float]]
    greedy: list[bool]               # every continuation token is the argmax


def _token_logprobs(decoder, hidden: torch.Tensor, targets: torch.Tensor):
    """hidden (C, n, d), targets (C, n) -> log-probs (C, n), is-argmax (C, n); one row's logits at a time."""
    lps, gs = [], []
    for h, t in zip(hidden, targets):
        logits = augment.hidden_to_logits(decoder, h).float()                       # (n, V)
        lps.append(torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0])
        gs.append(logits.argmax(-1) == t)
    return torch.stack(lps), torch.stack(gs)


def request_batches(lengths: list[int], max_tokens: int = 16384, max_rows: int = 256) -> list[list[int]]:
    """Indices of requests grouped into batches of at most `max_tokens` padded tokens (rows x the
    longest row) and `max_rows` rows, longest first, so rows of one batch have similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur, longest = [], [], 0
    for i in order:
        L = max(longest, lengths[i])
        if cur and (L * (len(cur) + 1) > max_tokens or len(cur) >= max_rows):
            out.append(cur)
            cur, L = [], lengths[i]
        cur.append(i)
        longest = L
    if cur:
        out.append(cur)
    return out


def _shared_context_pass(decoder, reqs, tc: torch.Tensor, targets: torch.Tensor, pad_id: int,
                         keep_continuation: bool = False):
    """The plain reading of a batch whose requests share contexts: each distinct context is run
    once (right-padded, (U, Pc)); its cache is repeated to the requests' rows, and the
    continuations (R, L-1) are read against it with a 4-D mask that hides each row's context
    padding. -> (cache (R, Pc): contexts only, the plain arm's log-probs and is-argmax (R, L),
    latents(cop) -> (R, 1, NL, d): each context's latents, computed once, and with
    `keep_continuation` the cache with the continuations after the padded contexts
    (R, Pc + L - 1), else None: what a group reads when its latents arrive late)."""
    dev = targets.device
    R, L = targets.shape
    ctx_of: dict[tuple, int] = {}
    u = torch.tensor([ctx_of.setdefault(tuple(c), len(ctx_of)) for c, _ in reqs], device=dev)   # (R,) context index
    ctxs = list(ctx_of)
    tcu = torch.tensor([len(c) for c in ctxs], device=dev)                             # (U,)
    Pc = int(tcu.max())
    cids = torch.full((len(ctxs), Pc), pad_id, dtype=torch.long, device=dev)
    for i, c in enumerate(ctxs):
        cids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    o = decoder.base_model(input_ids=cids, use_cache=True, **kv.cache_kwargs(None))
    ctx_cache = kv.returned(o)                                                         # (U, Pc)
    hidden = o.last_hidden_state[u, tc - 1][:, None]                                   # (R, 1, d): predicts token 1
    del o
    cache = kv.select_rows(ctx_cache, u)                                               # (R, Pc)
    full = None
    if L > 1:
        k = torch.arange(L - 1, device=dev)
        seen = torch.arange(Pc, device=dev)[None] < tc[:, None]                        # (R, Pc) not padding
        allowed = masks.append_allowed(seen, torch.ones(R, L - 1, dtype=torch.bool, device=dev))
        full = kv.fork(cache)                                                          # grows to (R, Pc + L - 1)
        pos = tc[:, None] + k                                                          # (R, L-1)
        families.attach(decoder)       # key_positions: sliding layers apply their window to this mask
        o = decoder.base_model(input_ids=targets[:, : L - 1], position_ids=pos,
                               attention_mask=masks.to_additive(allowed, augment.decoder_dtype(decoder)),
                               key_positions=masks.key_positions(Pc, pos), use_cache=True, **kv.cache_kwargs(full))
        hidden = torch.cat([hidden, o.last_hidden_state], dim=1)                       # (R, L, d)
        del o
    plp, pg = _token_logprobs(decoder, hidden, targets)

    def latents(cop):
        return cop(ctx_cache, (tcu - 1)[:, None])[u]                                   # (R, 1, NL, d)

    return cache, plp, pg, latents, (full if keep_continuation else None)


def _delayed_group_mask(tc: torch.Tensor, Pc: int, K: int, N: int, group_len: int, hide_point: bool,
                        dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (R, 1, G, K + G) of groups whose latents arrive after the first N
    continuation tokens, read against a cache of the padded contexts (Pc) followed by the
    continuations (K = Pc + L - 1): a row's group sees its context (t < tc, not its padding) and
    its first N continuation entries (N - 1 when the re-fed point stands in for the last of
    them), then its own rows causally: the keys `masks.group_allowed` gives the point tc - 1 + N
    in the unpadded layout."""
    t = torch.arange(K, device=tc.device)[None]                                        # (1, K)
    cont = (t >= Pc) & (t < Pc + N - int(hide_point))
    seen = (t < tc[:, None]) | cont                                                     # (R, K)
    new = torch.ones(len(tc), group_len, dtype=torch.bool, device=tc.device)
    return masks.to_additive(masks.append_allowed(seen, new), dtype)


@torch.no_grad()
def score_requests(decoder, requests: list[tuple[list[int], list[int]]], coprocessors: dict,
                   async_delay: int = 0, pad_id: int = 0, max_tokens: int = 16384) -> dict[str, ChoiceScores]:
    """Log-likelihood of each (context, continuation) request, for several arms, batched across requests.

    coprocessors: arm name -> coprocessor, or None for the plain decoder. An augmented arm calls its
    coprocessor once, on the cache of the context (at its last token), and the decoder reads the
    latents before the continuation, as in generation: the continuation's first token is predicted
    from the last latent (or from the re-fed context token with `refeed_last`).

    async_delay=N (Table 8, applied to scoring): the latents, still computed from the context alone,
    arrive after the first N continuation tokens. Those N tokens are scored by the plain decoder;
    the latents are inserted after continuation token N and the rest is scored with them. A
    continuation of <= N tokens is scored plainly.

    Requests are packed into batches of at most `max_tokens` padded tokens. Per batch: a plain
    reading that scores the plain arm and leaves a cache every arm reads (each distinct context of
    the batch is run once and its continuations read against it, `_shared_context_pass`); then per
    augmented arm one coprocessor call at each distinct context's end and one masked group pass
    (`augment.group_forward`). A group reads only cache entries up to its own point, so padding
    and later continuation entries stay unseen (with a delay: its context and its first N
    continuation entries, `_delayed_group_mask`).
    """
    dev, N = decoder.device, int(async_delay)
    if any(len(c) == 0 for c, _ in requests):
        raise EvalError("every request needs at least one context token (a BOS or prefix token)")
    out = {a: ChoiceScores([None] * len(requests), [None] * len(requests), [None] * len(requests))
           for a in coprocessors}
    lengths = [len(c) + max(len(t), 1) for c, t in requests]
    for idx in request_batches(lengths, max_tokens):
        reqs = [requests[i] for i in idx]
        R = len(reqs)
        tc = torch.tensor([len(c) for c, _ in reqs], device=dev)                       # (R,) context lengths
        lens = torch.tensor([len(t) for _, t in reqs], device=dev)                     # (R,) continuation lengths
        L, T = max(int(lens.max()), 1), max(len(c) + len(t) for c, t in reqs)
        rows = torch.full((R, T), pad_id, dtype=torch.long, device=dev)               # context + continuation
        for r, (c, t) in enumerate(reqs):
            rows[r, : len(c) + len(t)] = torch.tensor(list(c) + list(t), dtype=torch.long)
        k = torch.arange(L, device=dev)[None]                                          # (1, L)
        valid = k < lens[:, None]                                                      # (R, L)
        tpos = (tc[:, None] + k).clamp(max=T - 1)                                      # (R, L) continuation positions
        targets = torch.gather(rows, 1, tpos)                                          # (R, L)
        cache, plp, pg, latents, full = _shared_context_pass(decoder, reqs, tc, targets, pad_id,
                                                             keep_continuation=N > 0)
        for arm, cop in coprocessors.items():
            lp, g = plp, pg
            if cop is not None and int(lens.max()) > N:
                A = L - N                                                              # tokens read with latents
                layout = cop.layout(A)
                z = latents(cop)                                                       # (R, 1, NL, d)
                pts = (tc - 1 + N).clamp(max=T - 1)[:, None]                           # (R, 1)
                tokens, _, _ = masks.group_tokens(rows, pts, layout, pad_id)            # (R, 1, n_tokens)
                if N == 0:   # the cache of the contexts: each group sees up to its point
                    go = augment.group_forward(decoder, cache, pts, z, tokens, layout, gate=augment.gate_of(cop))
                else:        # contexts + continuations: the mask picks each row's entries
                    mask = _delayed_group_mask(tc, kv.length(cache), kv.length(full), N, layout.group_len,
                                               layout.hide_point, augment.decoder_dtype(decoder))
                    Pc = kv.length(cache)       # positions of full's keys: contexts, then continuations
                    cpos = torch.cat([torch.arange(Pc, device=dev)[None].expand(R, Pc),
                                      tc[:, None] + torch.arange(kv.length(full) - Pc, device=dev)], dim=1)
                    go = augment.group_forward(decoder, full, pts, z, tokens, layout, attention_mask=mask,
                                               gate=augment.gate_of(cop), cache_positions=cpos)
                h = go.last_hidden_state.view(R, layout.group_len, -1)[:, -A:]         # (R, A, d)
                glp, gg = _token_logprobs(decoder, h, targets[:, N:])                  # (R, A)
                aug = (lens > N)[:, None]                                              # rows that read latents
                lp = torch.cat([plp[:, :N], torch.where(aug, glp, plp[:, N:])], 1)
                g = torch.cat([pg[:, :N], torch.where(aug, gg, pg[:, N:])], 1)
            lp = torch.where(valid, lp.double(), 0.0)
            for r, i in enumerate(idx):
                n = int(lens[r])
                out[arm].token_logprobs[i] = lp[r, :n].tolist()
                out[arm].logprobs[i] = float(lp[r].sum())
                out[arm].greedy[i] = bool(g[r][valid[r]].all())
    return out


def score_choices(decoder, ctx_ids: list[int], conts: list[list[int]], coprocessors: dict,
                  async_delay: int = 0, pad_id: int = 0, max_tokens: int = 16384) -> dict[str, ChoiceScores]:
    """Log-likelihood of each continuation after one context, for several arms (`score_requests`)."""
    return score_requests(decoder, [(list(ctx_ids), list(c)) for c in conts], coprocessors, async_delay, pad_id,
                          max_tokens)


# ---------------------------------------------------------------------------------------------
# Generation (GSM8K).

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def normalize_number(s: str) -> str | None:
    """'$1,000.' -> '1000', '3.50' -> '3.5', '-4' -> '-4'; None if it is not a number."""
    s = s.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str | None) -> str | None:
    """The final number of a GSM8K answer: after '####' if present (the dataset's and the few-shot
    exemplars' format), else after 'the answer is', else the last number in the text."""
    if not text:
        return None
    m = re.search(r"####\s*(" + _NUM + ")", text)
    if m:
        return normalize_number(m.group(1))
    m = re.findall(r"answer is\s*:?\s*(" + _NUM + ")", text, flags=re.IGNORECASE)
    if m:
        return normalize_number(m[-1])
    nums = re.findall(_NUM, text)
    return normalize_number(nums[-1]) if nums else None


def cut_at_stop(text: str, stop) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_text(decoder, tokenizer, coprocessor, prompt_ids: list[int], max_new_tokens: int = 256,
                  stop=GSM8K_STOP, async_delay: int = 0, temperature: float = 0.0, seed: int = 0) -> str:
    """Greedy (temperature 0) continuation of prompt_ids, cut at the first stop string.

    With a coprocessor, it is called once at the end of the prompt (`augment.stream_generate`);
    async_delay=N inserts those latents only after N generated tokens (Table 8).
    """
    ids = torch.tensor([prompt_ids], device=decoder.device)
    toks, text = [], ""
    for step in augment.stream_generate(decoder, tokenizer, coprocessor, ids, augment=coprocessor is not None,
                                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                        async_delay=async_delay if coprocessor is not None else 0):
        toks.append(step.token_id)
        text = tokenizer.decode(toks, skip_special_tokens=True)
        if any(s in text for s in stop):
            break
    return cut_at_stop(text, stop)


# ---------------------------------------------------------------------------------------------
# Benchmarks: arms, intervals, runners.


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (fractions)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap_delta(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b) over items resampled with replacement (paired).

    Resampling n items is a multinomial draw over the distinct values of a - b ({-1, 0, 1} for
    correctness), so no (n_boot, n) index matrix is built.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    if n == 0:
        return (float("nan"), float("nan"))
    vals, cnt = np.unique(d, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, cnt / n, size=n_boot)       # (n_boot, n_values)
    means = draws @ vals / n
    a_ = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a_, 100 - a_])
    return (float(lo), float(hi))


def _rate(correct: list[bool], base: list[bool] | None = None) -> dict:
    k, n = int(sum(correct)), len(correct)
    r = {"value": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n)), "correct": k, "n": n}
    if base is not None:
        r["delta_vs_decoder"] = r["value"] - sum(base) / n if n else float("nan")
        r["delta_ci95"] = list(paired_bootstrap_delta(correct, base))
    return r


def task_metrics(arms, correct: dict) -> dict:
    """Metrics of one task from per-item correctness: correct[arm][metric] = list of bools, in item
    order. An arm without an entry (CoT on log-likelihood tasks) gets None. Each metric is a `_rate`
    (Wilson interval); arms other than decoder add the paired-bootstrap delta against it. A sharded
    run's merge (`merge_bench`) calls this on the concatenated lists, so it equals a single run."""
    base = correct.get("decoder")
    metrics = {}
    for a in arms:
        if correct.get(a) is None:
            metrics[a] = None
            continue
        paired = a != "decoder" and base is not None
        metrics[a] = {k: _rate(v, base[k] if paired else None) for k, v in correct[a].items()}
    return metrics


def arm_coprocessors(wb, arms) -> dict:
    """Arm name -> coprocessor (None = plain decoder) for the arms that need a model call."""
    out = {}
    for a in arms:
        if a not in ARMS:
            raise EvalError(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
        if a == "decoder" or a == "cot":
            out[a] = None
        elif a == "coprocessor":
            out[a] = wb.coprocessor
        elif a == "pause":
            if getattr(wb, "pause", None) is None:
                raise EvalError("--arms pause needs --pause DIR (a coprocessor checkpoint with body 'none')")
            out[a] = wb.pause
    return out


def _fit_context(ctx: list[int], conts: list[list[int]], limit: int) -> list[int]:
    """Drop context tokens from the left so context + longest continuation fit in `limit` positions."""
    room = max(1, limit - max((len(c) for c in conts), default=0))
    return ctx[-room:]


def _latent_span(wb) -> int:
    cops = [c for c in (wb.coprocessor, getattr(wb, "pause", None)) if c is not None]
    return max((c.layout(1).offset + c.config.num_latents for c in cops), default=0)


def evaluate_multiple_choice(wb, items: list[dict], arms, async_delay: int = 0, progress: bool = False,
                             batch_tokens: int = 16384, block: int = 256) -> dict:
    """Zero-/few-shot multiple choice by log-likelihood (lm-eval's protocol), per arm.

    Each choice i is scored as log P(continuation_i | context_i) with item["pairs"][i] when given
    (WinoGrande: the option fills the blank in the context, the rest of the sentence is the shared
    continuation), else (item["context"], choice_i). acc: the choice with the highest summed log-prob;
    acc_norm: highest log-prob divided by the continuation's length in characters (lm-eval's
    acc_norm). A single-choice item (LAMBADA) is correct when its continuation is the greedy decode
    (lm-eval's LAMBADA acc); acc_norm is then the same. The CoT arm does not apply (None).

    The choices of `block` items at a time go to `score_requests` together, which packs them into
    batches of at most `batch_tokens` padded tokens.
    """
    tok, dec = wb.tokenizer, wb.decoder
    model_arms = {a: c for a, c in arm_coprocessors(wb, arms).items() if a != "cot"}
    pid, pad = prefix_token_id(tok), getattr(tok, "pad_token_id", None) or 0
    limit = max_positions(dec) - _latent_span(wb) - max(async_delay, 0)
    correct = {a: [] for a in model_arms}
    correct_norm = {a: [] for a in model_arms}
    records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="mc", unit="item", file=sys.stderr, leave=False)
    for s in range(0, len(items), block):
        part = items[s: s + block]
        pairs_of = [item.get("pairs") or [[item["context"], c] for c in item["choices"]] for item in part]
        reqs, starts = [], []
        for pairs in pairs_of:
            enc = [encode_pair(tok, c, t, pid) for c, t in pairs]
            conts = [t for _, t in enc]
            starts.append(len(reqs))
            reqs.extend((_fit_context(c_ids, conts, limit), t_ids) for c_ids, t_ids in enc)
        sc = score_requests(dec, reqs, model_arms, async_delay=async_delay, pad_id=pad, max_tokens=batch_tokens)
        for j, (item, pairs) in enumerate(zip(part, pairs_of)):
            mine = range(starts[j], starts[j] + len(pairs))
            gold = int(item["gold"])
            rec = {"id": item.get("id"), "gold": gold, "tokens": [len(reqs[i][1]) for i in mine]}
            for a in model_arms:
                lp = np.array([sc[a].logprobs[i] for i in mine])
                greedy = [sc[a].greedy[i] for i in mine]
                if len(mine) == 1:
                    pred = pred_norm = 0 if greedy[0] else -1
                    ok = ok_norm = greedy[0]
                else:
                    norm = lp / np.array([max(len(t), 1) for _, t in pairs])   # per character of the continuation
                    pred, pred_norm = int(np.argmax(lp)), int(np.argmax(norm))
                    ok, ok_norm = pred == gold, pred_norm == gold
                correct[a].append(bool(ok))
                correct_norm[a].append(bool(ok_norm))
                rec[a] = {"pred": pred, "pred_norm": pred_norm, "logprobs": [round(float(x), 4) for x in lp]}
            records.append(rec)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    per_item = {a: {"acc": correct[a], "acc_norm": correct_norm[a]} for a in model_arms}
    return {"type": "multiple_choice", "n": len(items), "metrics": task_metrics(arms, per_item), "items": records,
            "_correct": per_item}


def generate_texts(decoder, tokenizer, coprocessor, prompts: list[list[int]], max_new_tokens: int = 256,
                   stops=None, async_delay: int = 0, batch_tokens: int = 65536, progress=None) -> list[str]:
    """`generate_text` for many prompts, batched (`augment.greedy_generate_batch`): greedy, each
    cut at the first of its stop strings (stops: one tuple per prompt, default GSM8K_STOP).
    Prompts are grouped by length into batches of at most `batch_tokens` (prompt + new) tokens."""
    stops = stops or [GSM8K_STOP] * len(prompts)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    texts = [""] * len(prompts)
    for idx in request_batches([len(p) + max_new_tokens for p in prompts], batch_tokens):
        def should_stop(b, toks, idx=idx):
            # the stop strings are short: the tail of the text is enough to see one appear
            tail = tokenizer.decode(toks[-16:], skip_special_tokens=True)
            return any(s and s in tail for s in stops[idx[b]])

        outs = augment.greedy_generate_batch(decoder, coprocessor, [prompts[i] for i in idx], max_new_tokens,
                                             async_delay=async_delay if coprocessor is not None else 0,
                                             pad_id=pad, stop_ids={eos}, should_stop=should_stop)
        for i, toks in zip(idx, outs):
            texts[i] = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), stops[i])
        if progress is not None:
            progress.update(len(idx))
    return texts


def evaluate_generation(wb, items: list[dict], arms, async_delay: int = 0, max_new_tokens: int = 256,
                        stop=GSM8K_STOP, progress: bool = False, batch_tokens: int = 65536) -> dict:
    """GSM8K-style generation: greedy decoding from the (few-shot) prompt, cut at the item's "stop"
    strings (else `stop`), exact match of the final number (`extract_answer` on both the completion
    and the gold answer). Arms: decoder; + coprocessor / pause (called once at the end of the
    prompt, or `async_delay` tokens late); cot = the plain decoder with COT_SUFFIX appended.
    Each arm generates for all items in batches of at most `batch_tokens` (prompt + new) tokens."""
    tok, dec = wb.tokenizer, wb.decoder
    cops = arm_coprocessors(wb, arms)
    limit = max_positions(dec) - _latent_span(wb) - max_new_tokens
    golds = [extract_answer(str(item["answer"])) for item in items]
    stops = [tuple(item.get("stop") or stop) for item in items]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items) * len(arms), desc="gen", unit="item", file=sys.stderr, leave=False)
    texts = {}
    for a in arms:
        prompts = [item["prompt"].rstrip() + COT_SUFFIX if a == "cot" else item["prompt"] for item in items]
        ids = [tok.encode(p, add_special_tokens=False)[-max(limit, 1):] for p in prompts]
        texts[a] = generate_texts(dec, tok, cops[a], ids, max_new_tokens, stops, async_delay, batch_tokens, bar)
    if bar is not None:
        bar.close()
    correct = {a: [] for a in arms}
    records = []
    for j, item in enumerate(items):
        rec = {"id": item.get("id"), "gold": golds[j]}
        for a in arms:
            pred = extract_answer(texts[a][j])
            correct[a].append(pred is not None and pred == golds[j])
            rec[a] = {"pred": pred, "correct": correct[a][-1], "text": texts[a][j]}
        records.append(rec)
    per_item = {a: {"exact_match": correct[a]} for a in arms}
    return {"type": "generation", "n": len(items), "metrics": task_metrics(arms, per_item), "items": records,
            "settings": {"max_new_tokens": max_new_tokens, "stop": list(stop), "decoding": "greedy",
                         "cot_suffix": COT_SUFFIX}, "_correct": per_item}


def task_type(name: str, items: list[dict]) -> str:
    """"multiple_choice" (items with "choices") or "generation" (items with "prompt")."""
    if not items:
        raise EvalError(f"task {name} has no items")
    if "choices" in items[0]:
        return "multiple_choice"
    if "prompt" in items[0]:
        return "generation"
    raise EvalError(f"task {name}: items have neither 'choices' nor 'prompt'")


def run_bench(wb, tasks: dict[str, list[dict]], arms=("decoder", "coprocessor"), async_delay: int = 0,
              max_new_tokens: int = 256, progress: bool = False, keep_items: bool = True,
              types: dict[str, str] | None = None, keep_correct: bool = False, batch_tokens: int = 16384) -> dict:
    """Every task through every arm. tasks: name -> items (multiple choice {"context", "choices",
    "gold"} or generation {"prompt", "answer"}, as `benchmarks.load_task` returns them).

    types: name -> task type, for tasks whose item list may be empty (a shard of a small task);
    keep_correct: keep each task's per-item correctness as r["correct"][arm][metric] (what
    `merge_bench` recomputes the metrics from); batch_tokens: padded tokens per batched pass (multiple
    choice; generation batches take 4x as many, most of a decode step's cost is fixed)."""
    res = {"kind": "bench", "arms": list(arms), "async_delay": async_delay, "tasks": {}}
    for name, items in tasks.items():
        kind = (types or {}).get(name) or task_type(name, items)
        t0 = time.perf_counter()
        if kind == "multiple_choice":
            r = evaluate_multiple_choice(wb, items, arms, async_delay, progress, batch_tokens=batch_tokens)
        else:
            r = evaluate_generation(wb, items, arms, async_delay, max_new_tokens, progress=progress,
                                    batch_tokens=4 * batch_tokens)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        correct = r.pop("_correct")
        if keep_correct:
            r["correct"] = correct
        if not keep_items:
            r.pop("items")
        res["tasks"][name] = r
        if progress:
            print(_task_line(name, r), file=sys.stderr)
    return res


def _task_line(name: str, r: dict) -> str:
    key = "acc" if r["type"] == "multiple_choice" else "exact_match"
    vals = [f"{a}={m[key]['value'] * 100:.1f}" for a, m in r["metrics"].items() if m is not None]
    return f"{name}: n={r['n']} {key} " + " ".join(vals) + f" ({r['seconds']}s)"


# ---------------------------------------------------------------------------------------------
# Tables (pure functions of the result JSON; also used by the app and the README).


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.2f}%"


def _ppl_rows(res: dict, rows: str) -> list[int]:
    pos = res["positions"]
    if rows == "all":
        return list(range(len(pos)))
    want = set(PAPER_POSITIONS) | {pos[-1]}
    return [i for i, p in enumerate(pos) if p in want]


def _ppl_table(res: dict, rows: str = "paper") -> str:
    ci = res.get("rel_ppl_change_ci95") or [[None, None]] * len(res["positions"])
    lines = ["| position | tokens | ppl decoder | ppl + coprocessor | rel. change | 95% CI |",
             "|---:|---:|---:|---:|---:|---|"]
    for i in _ppl_rows(res, rows):
        lo, hi = ci[i]
        pd_, pa = res["ppl_decoder"][i], res["ppl_augmented"][i]
        lines.append(f"| {res['positions'][i]} | {res['tokens_scored'][i]:,} | "
                     f"{'n/a' if pd_ is None else f'{pd_:.3f}'} | {'n/a' if pa is None else f'{pa:.3f}'} | "
                     f"{_pct(res['rel_ppl_change_pct'][i])} | [{_pct(lo)}, {_pct(hi)}] |")
    d = res.get("data", {})
    cop = (res.get("provenance") or {}).get("coprocessor") or {}
    foot = f"\n\n{d['tokens_read']:,} tokens from {d['documents']} documents" if "tokens_read" in d else ""
    if cop:
        foot += f"; coprocessor: {cop.get('source')} ({cop.get('config', {}).get('num_latents')} latents)"
    if foot:
        foot += ". Negative = the latents lower perplexity."
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
        foot += f" Coprocessor: {_repo_relative(cop.get('source'))} ({cop.get('config', {}).get('num_latents')} latents)."
    foot += _provenance_line(prov)
    return "\n".join(lines) + foot


def _repo_relative(path) -> str:
    """A path inside this checkout written relative to it (tables travel; machines' paths don't)."""
    try:
        return str(Path(str(path)).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _provenance_line(prov: dict) -> str:
    """How to reproduce a table: the command, commit and device its JSON records."""
    git = prov.get("git") or {}
    parts = []
    if prov.get("reproduce") or prov.get("command_line"):
        parts.append(f"command: `{prov.get('reproduce') or prov.get('command_line')}`")
    if git.get("commit"):
        parts.append(f"commit {git['commit'][:7]}" + (" (uncommitted changes)" if git.get("dirty") else ""))
    if prov.get("device"):
        parts.append(f"device: {prov['device']}" + (f", {prov['dtype']}" if prov.get("dtype") else ""))
    return ("\n\nReproduce: " + "; ".join(parts) + ".") if parts else ""


def results_table_markdown(res: dict, rows: str = "paper") -> str:
    """A markdown table of a `ppl` or `bench` result (the dict or its JSON). rows (ppl only):
    "paper" = positions 1, 2, 4, 8, 16, 32 and the last; "all" = every position."""
    kind = res.get("kind") or ("ppl" if "positions" in res else "bench")
    return _ppl_table(res, rows) if kind == "ppl" else _bench_table(res)


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness model (optional dependency: pip install lm-eval).


@torch.no_grad()
def rolling_logprob(decoder, coprocessor, window: list[int], n_pred: int, points_per_pass: int = 64) -> float:
    """Summed log-prob of the last n_pred tokens of `window`, each given every token before it in the
    window; with a coprocessor, latents are inserted after the previous token (a fresh call per
    token, the group dropped afterwards), i.e. the paper's first-token protocol."""
    x = torch.tensor([window], device=decoder.device)                                # (1, T)
    if coprocessor is None:
        _, logits = augment.prefill(decoder, x)
        nll = augment.plain_nll(logits, x)[0, 1:]                                     # (T-1,)
    else:
        nll, _ = augment.score_after_every_token(decoder, coprocessor, x, 1, points_per_pass)
        nll = nll[:, 0]                                                               # (T-1,)
    return -float(nll[-n_pred:].double().sum())


_LM_CLASS = None


def _make_lm_class():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm

    class CacheAugLM(LM):
        """The frozen decoder + coprocessor as an lm-eval model ("cacheaug").

        loglikelihood: the coprocessor is called once at the end of each context; requests are
        scored in batches across contexts (`score_requests`, `batch_tokens` padded tokens per pass).
        loglikelihood_rolling: lm-eval's disjoint rolling windows; inside a window every token is
        predicted with latents inserted after the token before it (the augmentation then dropped),
        a proper left-to-right factorisation whose per-token perplexity is the paper's first-token
        perplexity. generate_until: coprocessor once at the end of the prompt; greedy requests are
        decoded in batches (`generate_texts`), sampled ones one at a time.
        augment=False gives the plain decoder through the same code (the baseline).

            lm_eval.simple_evaluate(model="cacheaug", model_args="coprocessor=DIR,device=cuda", tasks=[...])
        """

        def __init__(self, decoder: str = "", coprocessor: str = "", device: str = "", dtype: str = "float32",
                     augment: bool = True, async_delay: int = 0, max_gen_toks: int = 256, max_length: int = 0,
                     batch_tokens: int = 16384, workbench=None, batch_size=None, max_batch_size=None, **kwargs):
            super().__init__()
            self.wb = workbench if workbench is not None else load_models(decoder, coprocessor, device=device,
                                                                           dtype=dtype)
            self.cop = self.wb.coprocessor if augment else None
            self.async_delay, self.max_gen_toks = int(async_delay), int(max_gen_toks)
            self.batch_tokens = int(batch_tokens)   # padded tokens per batched pass (`score_requests`)
            span = self.cop.layout(1).offset + self.cop.config.num_latents if self.cop is not None else 0
            self.max_length = int(max_length) or max_positions(self.wb.decoder) - span - 1
            self._device = self.wb.decoder.device
            self.prefix = prefix_token_id(self.wb.tokenizer)

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.wb.tokenizer, "name_or_path", "cacheaug").replace("/", "__")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            tok, dec = self.wb.tokenizer, self.wb.decoder
            pad = getattr(tok, "pad_token_id", None) or 0
            reqs = []
            for r in requests:
                c_ids, t_ids = encode_pair(tok, *r.args, self.prefix)
                reqs.append((_fit_context(c_ids, [t_ids], self.max_length - self.async_delay), t_ids))
            out = [None] * len(requests)
            step = 1024   # requests per `score_requests` call: a progress tick, batches packed inside
            for s in tqdm(range(0, len(reqs), step), disable=disable_tqdm, desc="loglikelihood",
                          unit=f"x{step} requests"):
                sc = score_requests(dec, reqs[s: s + step], {"m": self.cop}, self.async_delay, pad,
                                    self.batch_tokens)["m"]
                for j, (lp, g) in enumerate(zip(sc.logprobs, sc.greedy)):
                    out[s + j] = (lp, g)
                    self.cache_hook.add_partial("loglikelihood", requests[s + j].args, (lp, g))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for r in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
                ids = self.wb.tokenizer.encode(r.args[0], add_special_tokens=False)
                total = 0.0
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix, max_seq_len=self.max_length, context_len=1))
                for ctx, pred in windows:
                    total += rolling_logprob(self.wb.decoder, self.cop, list(ctx) + list(pred), len(pred))
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            tok = self.wb.tokenizer
            out = [None] * len(requests)
            greedy: dict[int, list] = {}        # max_gen_toks -> [(index, ids, until)]: decoded in batches
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
            for i, r in enumerate(requests):
                ctx, kw = r.args
                kw = dict(kw or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if tok.eos_token_id is not None:  # lm-eval's HF model also stops at EOS text
                    until.append(tok.decode([tok.eos_token_id]))
                n = int(kw.get("max_gen_toks", self.max_gen_toks))
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                ids = tok.encode(ctx, add_special_tokens=False)[-max(self.max_length - n, 1):]
                if temp > 0:
                    out[i] = generate_text(self.wb.decoder, tok, self.cop, ids, n, until, self.async_delay, temp)
                    self.cache_hook.add_partial("generate_until", r.args, out[i])
                    bar.update(1)
                else:
                    greedy.setdefault(n, []).append((i, ids, tuple(until)))
            for n, group in greedy.items():
                texts = generate_texts(self.wb.decoder, tok, self.cop, [g[1] for g in group], n, [g[2] for g in group],
                                       self.async_delay, 4 * self.batch_tokens, bar)
                for (i, _, _), text in zip(group, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.close()
            return out

    CacheAugLM.__module__, CacheAugLM.__qualname__ = __name__, "CacheAugLM"
    try:
        register_model("cacheaug")(CacheAugLM)
    except ValueError:  # a class of an earlier import of this module holds the name; keep it
        pass
    return CacheAugLM


def lm_eval_class():
    """The `CacheAugLM` class (built and registered as "cacheaug" on first use; needs lm-eval)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        try:
            _LM_CLASS = _make_lm_class()
        except ImportError as e:
            raise ImportError(f"CacheAugLM needs lm-evaluation-harness: pip install lm-eval ({e})") from e
    return _LM_CLASS


def __getattr__(name):  # `from cacheaug_core.evaluate import CacheAugLM` without importing lm_eval eagerly
    if name == "CacheAugLM":
        return lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# CLI: `cacheaug eval ppl`, `cacheaug eval bench` and `cacheaug eval bench-merge`.


def _load_task(name: str, limit: int | None):
    from . import benchmarks

    return benchmarks.load_task(name, limit=limit)


def _model_args(p):
    p.add_argument("--decoder", default="", help="decoder: empty = embedded SmolLM2-135M-Instruct, a folder, or a Hub id")
    p.add_argument("--coprocessor", default="", help="coprocessor checkpoint folder (default: the shipped one)")
    p.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")




def cmd_ppl(args) -> int:
    t0 = time.perf_counter()
    check_ppl_settings(args.positions, args.chunk, args.points_per_pass)
    docs = read_documents(args.text)
    wb = load_models(args.decoder, args.coprocessor, device=args.device, dtype=args.dtype)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    res = perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, docs, positions=args.positions,
                                 chunk=args.chunk, max_tokens=args.max_tokens, points_per_pass=args.points_per_pass,
                                 n_boot=args.bootstrap, seed=args.seed, bootstrap_unit=args.bootstrap_unit,
                                 progress=not args.no_progress)
    res["data"] |= {"text_file": str(args.text), "text_sha256": _sha256(args.text)}
    res["provenance"] = provenance(wb, t0, args)
    write_json(res, args.json)
    print(results_table_markdown(res))
    print(f"\nJSON: {args.json}")
    return 0


def parse_limit(spec, tasks) -> tuple[dict[str, int | None], int | dict | None]:
    """`--limit`: "N" = the first N items of every task; "task=N,task2=M" = of those tasks, the
    others whole; "N,task=M" = N by default and M for that task. 0 = all.

    Returns (task -> limit or None for all, the result's "limit": N or null for the plain form,
    else {task: N or null} for every task)."""
    spec = str(spec if spec is not None else "").strip()
    default, per, plain, seen_default = 0, {}, True, False
    for part in (x.strip() for x in spec.split(",")):
        if not part:
            continue
        name, eq, num = part.partition("=")
        if not eq:
            name, num = "", name
        name = name.strip()
        try:
            n = int(num.strip())
        except ValueError:
            raise EvalError(f"--limit {spec!r}: {part!r} is neither N nor task=N") from None
        if n < 0:
            raise EvalError(f"--limit {spec!r}: {part!r} is negative (0 = all items)")
        if not eq:
            if seen_default:
                raise EvalError(f"--limit {spec!r}: more than one default N")
            default, seen_default = n, True
            continue
        plain = False
        if name not in tasks:
            raise EvalError(f"--limit {spec!r} names {name!r}, which is not in --tasks ({','.join(tasks)})")
        if name in per:
            raise EvalError(f"--limit {spec!r} names {name!r} twice")
        per[name] = n
    limits = {t: per.get(t, default) or None for t in tasks}
    return limits, ((default or None) if plain else limits)


def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m:
        raise EvalError(f"--shard {spec!r}: expected I/N, e.g. 0/8 (shard I of N, counted from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise EvalError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def shard_items(items: list, index: int, count: int) -> list:
    """The items of shard index/count: those whose position in the task's list is index mod count."""
    return items[index::count]


def cmd_bench(args) -> int:
    t0 = time.perf_counter()
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise EvalError(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    if "pause" in arms and not args.pause:
        raise EvalError("--arms pause needs --pause DIR (a coprocessor checkpoint with body 'none')")
    if args.async_delay < 0:
        raise EvalError("--async-delay must be >= 0")
    limits, limit_record = parse_limit(args.limit, tasks)
    shard = parse_shard(args.shard) if getattr(args, "shard", "") else None
    if shard and not args.json:
        raise EvalError("--shard needs --json: `eval bench-merge` reads the shard files")
    items, types, totals = {}, {}, {}
    for t in tasks:   # before the models: a bad task name or missing data fails fast
        try:
            full = _load_task(t, limits[t])
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise EvalError(f"task {t}: {e}") from e
        types[t], totals[t] = task_type(t, full), len(full)
        items[t] = shard_items(full, *shard) if shard else full
    wb = load_models(args.decoder, args.coprocessor, pause=args.pause, device=args.device, dtype=args.dtype)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    res = run_bench(wb, items, arms, async_delay=args.async_delay, max_new_tokens=args.max_new_tokens,
                    progress=not args.no_progress, keep_items=not args.no_items, types=types,
                    keep_correct=shard is not None, batch_tokens=args.batch_tokens)
    res["limit"] = limit_record
    if shard:
        i, n = shard
        res["shard"] = {"index": i, "count": n}
        for t, r in res["tasks"].items():
            # Per-item correctness as "0"/"1" strings, one character per item of this shard (items
            # i, i+N, i+2N, ... of the task's items_total): what the merge recomputes metrics from.
            r["shard"] = {"items_total": totals[t],
                          "correct": {a: {k: "".join("1" if x else "0" for x in v) for k, v in m.items()}
                                      for a, m in r.pop("correct").items()}}
    res["provenance"] = provenance(wb, t0, args)
    table = results_table_markdown(res)
    if args.json:
        write_json(res, args.json)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    print(table)
    if shard:
        print(f"\nshard {shard[0]}/{shard[1]}: metrics of this shard's items only; merge all {shard[1]} with "
              f"`cacheaug eval bench-merge`", file=sys.stderr)
    return 0


def _brief(x, width: int = 160) -> str:
    s = json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def _difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        return "; ".join(f"{k}: {_brief(b.get(k), 80)} vs {_brief(a.get(k), 80)}" for k in keys)
    return f"{_brief(b)} vs {_brief(a)}"


def _shard_fingerprint(res: dict) -> dict:
    """What must agree between the shards of one run (the settings that change any item's result)."""
    prov = res.get("provenance") or {}
    args = prov.get("arguments") or {}
    tasks = res["tasks"]
    return {
        "tasks": list(tasks), "arms": res.get("arms"), "async_delay": res.get("async_delay"),
        "limit": res.get("limit"), "task types": {t: r.get("type") for t, r in tasks.items()},
        "task sizes (items before sharding)": {t: (r.get("shard") or {}).get("items_total") for t, r in tasks.items()},
        "generation settings": {t: r.get("settings") for t, r in tasks.items() if r.get("settings") is not None},
        "max_new_tokens": args.get("max_new_tokens"), "dtype": prov.get("dtype"),
        "decoder": prov.get("decoder"), "coprocessor": prov.get("coprocessor"), "pause": prov.get("pause"),
        "per-item records (--no-items)": all("items" in r for r in tasks.values()),
    }


def merge_bench(shards: list[dict], names: list[str] | None = None, keep_items: bool = True,
                command_line: str | None = None) -> dict:
    """One `eval bench` result from the JSONs of a sharded run (`--shard 0/N` ... `--shard N-1/N`).

    Checks that the shards belong together: every one a sharded bench result, the same N, each
    index once and all N present, and the same tasks, arms, async delay, limit, task sizes,
    generation settings, max_new_tokens, dtype, decoder, coprocessor and pause arm. Then the
    per-item correctness (and the per-item records, if kept) is put back in item order and every
    metric, Wilson interval and paired-bootstrap delta is recomputed by `task_metrics`, the code
    a single run uses, so the result equals that of the unsharded run. Differences in git commit,
    library versions or device are allowed and listed under provenance.merge.warnings.
    """
    if not shards:
        raise EvalError("bench-merge needs the JSON files of all shards")
    names = list(names) if names else [f"shard file {k + 1}" for k in range(len(shards))]
    for res, f in zip(shards, names):
        if not isinstance(res, dict) or res.get("kind") != "bench" or not isinstance(res.get("tasks"), dict):
            raise EvalError(f"{f}: not an `eval bench` result")
        sh = res.get("shard")
        if not isinstance(sh, dict) or "index" not in sh or "count" not in sh:
            raise EvalError(f"{f}: not a sharded result (made by `eval bench --shard I/N --json ...`)")
    n, f0 = shards[0]["shard"]["count"], names[0]
    by_index: dict[int, int] = {}
    for k, (res, f) in enumerate(zip(shards, names)):
        i, c = res["shard"]["index"], res["shard"]["count"]
        if c != n:
            raise EvalError(f"{f} is shard {i}/{c} but {f0} is shard {shards[0]['shard']['index']}/{n}: "
                            "the shards of one run share N")
        if i in by_index:
            raise EvalError(f"shard {i}/{n} given twice: {names[by_index[i]]} and {f}")
        by_index[i] = k
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise EvalError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}: "
                        f"got {len(by_index)} of {n} ({', '.join(f'{i}/{n}' for i in sorted(by_index))})")
    order = [by_index[i] for i in range(n)]
    shards, names = [shards[k] for k in order], [names[k] for k in order]
    first, f0 = shards[0], names[0]
    fp0 = _shard_fingerprint(first)
    for res, f in zip(shards[1:], names[1:]):
        fp = _shard_fingerprint(res)
        for key, v0 in fp0.items():
            if fp[key] != v0 and (keep_items or key != "per-item records (--no-items)"):
                raise EvalError(f"{f} does not belong with {f0}: {key} differ ({_difference(v0, fp[key])})")
    arms = list(first["arms"])
    have_items = keep_items and fp0["per-item records (--no-items)"]
    tasks = {}
    for t, r0 in first["tasks"].items():
        total = r0["shard"]["items_total"]
        if not isinstance(total, int) or total < 1:
            raise EvalError(f"{f0}: task {t} records no items_total")
        correct: dict = {}
        items = [None] * total
        for i, (res, f) in enumerate(zip(shards, names)):
            r = res["tasks"][t]
            idx = range(i, total, n)
            if r.get("n") != len(idx) or (have_items and len(r["items"]) != len(idx)):
                raise EvalError(f"{f}: task {t} holds {r.get('n')} items, but shard {i}/{n} of {total} items "
                                f"should hold {len(idx)}")
            for a, per in r["shard"]["correct"].items():
                for key, flags in per.items():
                    if len(flags) != len(idx) or set(flags) - {"0", "1"}:
                        raise EvalError(f"{f}: task {t}, arm {a}, {key}: per-item correctness is malformed")
                    dst = correct.setdefault(a, {}).setdefault(key, [None] * total)
                    for j, x in zip(idx, flags):
                        dst[j] = x == "1"
            if have_items:
                for j, rec in zip(idx, r["items"]):
                    items[j] = rec
        for a, per in correct.items():
            for key, v in per.items():
                if any(x is None for x in v):
                    raise EvalError(f"task {t}, arm {a}, {key}: not every shard records it")
        m = {"type": r0["type"], "n": total, "metrics": task_metrics(arms, correct)}
        if have_items:
            m["items"] = items
        if r0.get("settings") is not None:
            m["settings"] = r0["settings"]
        m["seconds"] = round(sum(res["tasks"][t].get("seconds") or 0 for res in shards), 2)
        tasks[t] = m
    provs = [res.get("provenance") or {} for res in shards]
    warnings = []
    for key in ("git", "versions", "device"):
        vals = [p.get(key) for p in provs]
        if any(v != vals[0] for v in vals):
            warnings.append(f"the shards differ in {key}: "
                            + ", ".join(f"{i}/{n}: {_brief(v, 80)}" for i, v in enumerate(vals)))
    args0 = {k: v for k, v in (provs[0].get("arguments") or {}).items() if k not in ("shard", "json", "md")}
    secs = [float(p.get("seconds") or 0) for p in provs]
    prov = dict(provs[0])
    prov |= {"command_line": command_line if command_line is not None else shlex.join(sys.argv),
             "arguments": args0,
             "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "seconds": round(sum(secs), 2),
             "merge": {"shards": n, "longest_shard_seconds": round(max(secs), 2), "warnings": warnings,
                       "from": [{"file": str(f), "shard": f"{i}/{n}", "command_line": p.get("command_line"),
                                 "seconds": p.get("seconds"), "finished_at": p.get("finished_at"),
                                 "device": p.get("device"), "git": p.get("git")}
                                for i, (f, p) in enumerate(zip(names, provs))]}}
    return {"kind": "bench", "arms": arms, "async_delay": first["async_delay"], "tasks": tasks,
            "limit": first.get("limit"), "provenance": prov}


def cmd_bench_merge(args) -> int:
    shards = []
    for f in args.files:
        p = Path(f)
        if not p.is_file():
            raise EvalError(f"{f}: no such file")
        try:
            shards.append(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{f}: not a JSON file ({e})") from e
    res = merge_bench(shards, [str(f) for f in args.files], keep_items=not args.no_items)
    for w in res["provenance"]["merge"]["warnings"]:
        print(f"note: {w}", file=sys.stderr)
    table = results_table_markdown(res)
    write_json(res, args.json)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    print(table)
    print(f"\nmerged {res['provenance']['merge']['shards']} shards; JSON: {args.json}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    """Add `eval ppl`, `eval bench` and `eval bench-merge` to the `cacheaug` command."""
    p = subparsers.add_parser("eval", help="perplexity by ahead position; benchmarks with and without latents")
    sub = p.add_subparsers(dest="eval_command", required=True)

    q = sub.add_parser("ppl", help="relative perplexity change by token position, latents after every token (Table 1)")
    q.add_argument("--text", required=True, help="text file (documents separated by blank lines) or .jsonl with 'text'")
    q.add_argument("--json", required=True, help="write the result here")
    _model_args(q)
    q.add_argument("--max-tokens", type=int, default=0, help="read at most this many tokens in all (0 = all)")
    q.add_argument("--positions", type=int, default=32, help="score the n-th token ahead for n = 1..this")
    q.add_argument("--chunk", type=int, default=256, help="split documents into sequences of at most this many tokens")
    q.add_argument("--points-per-pass", type=int, default=64, help="augmentation points per batched decoder pass")
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    q.add_argument("--bootstrap-unit", default="document", choices=("document", "chunk"))
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    q.set_defaults(fn=cmd_ppl)

    b = sub.add_parser("bench", help="benchmarks, coprocessor called once at the end of the prompt (Tables 2-4, 8)")
    b.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated: " + ",".join(ALL_TASKS))
    b.add_argument("--limit", default="0", help="first N items of each task (0 = all); or per task: "
                   "'gsm8k=200,mmlu=1000' (the others all), '500,gsm8k=200' (500 by default)")
    b.add_argument("--shard", default="", metavar="I/N", help="evaluate only items whose index (after --limit) "
                   "is I mod N; merge the N JSONs with `eval bench-merge`")
    b.add_argument("--json", default="", help="write the full result (metrics, per-item predictions) here")
    b.add_argument("--md", default="", help="write the markdown table here")
    _model_args(b)
    b.add_argument("--arms", default="decoder,coprocessor", help="comma-separated: " + ",".join(ARMS))
    b.add_argument("--pause", default="", help="pause-token checkpoint (a coprocessor with body 'none')")
    b.add_argument("--async-delay", type=int, default=0, help="insert the latents this many tokens late (Table 8)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks: at most this many new tokens")
    b.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batched scoring pass "
                   "(generation: 4x this); lower it if memory runs out, raise it on a large GPU")
    b.add_argument("--no-items", action="store_true", help="leave per-item predictions out of the JSON")
    b.set_defaults(fn=cmd_bench)

    m = sub.add_parser("bench-merge", help="merge the JSONs of `eval bench --shard I/N` runs into one result")
    m.add_argument("files", nargs="+", metavar="SHARD_JSON", help="the JSON of every shard 0/N .. N-1/N")
    m.add_argument("--json", required=True, help="write the merged result here")
    m.add_argument("--md", default="", help="write the markdown table here")
    m.add_argument("--no-items", action="store_true", help="leave per-item predictions out of the JSON")
    m.set_defaults(fn=cmd_bench_merge)


if __name__ == "__main__":  # lm-eval's own CLI with "cacheaug" registered: python -m cacheaug_core.evaluate run ...
    from cacheaug_core import evaluate as _self

    _self.lm_eval_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
