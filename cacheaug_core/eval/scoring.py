"""Scoring primitives of the benchmarks: log-likelihood of (context, continuation) requests with the
coprocessor called once at the end of the context (optionally late), batched across requests, and
greedy generation with the latents inserted at the end of the prompt.

    from cacheaug_core.eval.scoring import encode_pair, score_requests, generate_text
    ctx, cont = encode_pair(tok, "Q: sky colour?\nA:", " blue")
    sc = score_requests(decoder, [(ctx, cont)], {"decoder": None, "coprocessor": cop})
    sc["coprocessor"].logprobs[0]       # summed log-prob of the continuation, nats

Checked against token-by-token decoding in tests/test_evaluate.py (`-k "score or generate"`);
timed by bench/scoring_delay.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch

from .. import augment, families, kv, masks
from .provenance import EvalError


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

GSM8K_STOP = ("\n\n", "Question:")
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
