"""The augmented forward as plain functions: cache -> latents -> augmented logits.

Everything here takes and returns tensors; no callbacks, usable from a notebook:

    cache, logits = prefill(decoder, ids)                       # ids (1, T)
    latents = coprocessor(cache, torch.tensor([[T - 1]]))       # (1, 1, NL, d)
    out = multi_point(decoder, coprocessor, ids, points, n_ahead=16)   # many points, one pass
    nll = token_nll(out.logits, out.targets)                    # (B, P, A), NaN where invalid
    for step in stream_generate(decoder, tok, cop, prompt_ids, augment=True): ...

`coprocessor=None` everywhere means the plain decoder.

`multi_point` is the one-pass multi-point forward of training and evaluation: the decoder runs
the original tokens once (no gradient: it is frozen and nothing upstream is trained), the
coprocessor produces latents for every point in one batched pass, and every point's group
(latents + ahead tokens) is read in one more decoder pass against the shared cache with the
group mask of `masks.py`. Gradients flow from the ahead-token loss through the frozen decoder
into the latents and the coprocessor.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import families, fastpath, kv, masks


def embed(decoder, ids: torch.Tensor) -> torch.Tensor:
    return decoder.get_input_embeddings()(ids)


def decoder_dtype(decoder) -> torch.dtype:
    return next(decoder.parameters()).dtype


def hidden_to_logits(decoder, hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's output head on final hidden states (..., d) -> logits (..., V): the LM head,
    then Gemma-2/3's final logit softcap where the config has one (`families.logit_softcap`), as
    the decoder's own forward computes its logits. Every scoring path goes hidden -> logits here
    (or, by vocabulary slices, through `fastpath.head_nll` / `fastpath.linear_cross_entropy`, which
    apply the same cap).

    Flattened to one (N, d) matrix first: the hidden states of `multi_point` are a strided slice,
    and a linear on a non-contiguous 3-D/4-D input runs as a batched matmul against the broadcast
    vocabulary matrix, about 7x slower on CPU than one plain matmul.
    """
    logits = decoder.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)
    return families.softcap(logits, families.logit_softcap(decoder.config))


def _logits_to_keep(decoder, n: int) -> dict:
    """`logits_to_keep=n` (logits of the last n positions only) where the model's forward takes it."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(decoder.forward).parameters else {}


@torch.no_grad()
def prefill(decoder, input_ids: torch.Tensor):
    """Run the decoder over input_ids (B, T). -> (cache, logits (B, T, V))."""
    out = decoder(input_ids=input_ids, use_cache=True, **kv.cache_kwargs(None))
    return kv.returned(out), out.logits


@torch.no_grad()
def prefill_cache(decoder, input_ids: torch.Tensor):
    """Only the cache of input_ids (B, T): training needs no logits for the original tokens."""
    return kv.returned(decoder.base_model(input_ids=input_ids, use_cache=True, **kv.cache_kwargs(None)))


def compile_layers(model) -> None:
    """torch.compile each transformer block in place. At these widths (d=576) the step time is
    dominated by memory-bound norms, rotary and activations between small matmuls; compiling a
    block fuses them. Prefill, coprocessor and group passes have fixed shapes per run, so each
    block compiles a few times and then reuses the kernels."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    for block in fastpath.blocks(model):
        block.compile()


def token_nll(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, NaN where not valid. logits (..., V), targets (...)."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
    if valid is not None:
        nll = torch.where(valid, nll, torch.full_like(nll, float("nan")))
    return nll


def plain_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL of each token given the ones before it; position 0 is NaN. -> (B, T)."""
    nll = token_nll(logits[:, :-1], input_ids[:, 1:])
    return F.pad(nll, (1, 0), value=float("nan"))


@dataclass
class MultiPointOutput:
    hidden: torch.Tensor         # (B, P, A, d): decoder hidden states that predict the ahead tokens
    targets: torch.Tensor        # (B, P, A)
    valid: torch.Tensor          # (B, P, A): False past the end of the sequence
    latents: torch.Tensor        # (B, P, NL, d)
    logits: torch.Tensor | None  # (B, P, A, V) when asked for


def gate_of(coprocessor):
    """The coprocessor's latent gate bias (L,), or None (no gate, or no coprocessor)."""
    core = getattr(coprocessor, "module", coprocessor)  # unwrap DDP
    return getattr(core, "gate_bias", None)


def group_forward(decoder, cache, points: torch.Tensor, latents: torch.Tensor,
                  tokens: torch.Tensor, layout: masks.GroupLayout, attention_mask=None,
                  output_attentions: bool = False, gate: torch.Tensor | None = None,
                  cache_positions: torch.Tensor | None = None):
    """Read every point's group [latents, tokens] against the cache (T cached positions).

    points (B, P), latents (B, P, NL, d), tokens (B, P, n_tokens) -> decoder base output whose
    last_hidden_state is (B, P*G, d). `gate` is the coprocessor's latent gate bias (L,) if it has one.
    `cache_positions` (B, T): the position ids of the cached keys where they are not 0..T-1 (a
    cache that holds more than one text's prefix); sliding-window layers measure their window in them.
    """
    B, P = points.shape
    T = kv.length(cache)
    dtype = decoder_dtype(decoder)
    x = torch.cat([latents.to(dtype), embed(decoder, tokens)], dim=2)       # (B, P, G, d)
    G = x.shape[2]
    if attention_mask is None:
        impl = getattr(decoder.config, "_attn_implementation", None)
        # the gate and sliding windows add to a float mask, so such reads take the dense one
        dense = output_attentions or gate is not None or families.has_window(decoder.config)
        attention_mask = masks.group_mask(T, points, G, dtype, None if dense else impl, layout.hide_point)
    families.attach(decoder)
    extra = {}
    if gate is not None:
        extra["latent_gate"] = (gate, masks.latent_columns(T, P, layout).to(points.device))
    pos = masks.group_positions(points, layout).reshape(B, P * G)
    return decoder.base_model(
        inputs_embeds=x.reshape(B, P * G, -1),
        attention_mask=attention_mask,
        position_ids=pos,
        key_positions=(masks.key_positions(T, pos) if cache_positions is None
                       else torch.cat([cache_positions.to(pos.device).expand(B, T), pos], dim=1)),
        use_cache=True,
        output_attentions=output_attentions,
        **kv.cache_kwargs(kv.fork(cache)),
        **extra,
    )


def multi_point(decoder, coprocessor, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int,
                cache=None, with_logits: bool = True, pad_id: int = 0) -> MultiPointOutput:
    """One-pass multi-point forward. input_ids (B, T), points (B, P) -> MultiPointOutput.

    `cache` may hold only a prefix of input_ids (at least up to the last point).
    """
    if coprocessor is None:
        raise ValueError("multi_point needs a coprocessor; the plain decoder's scores come from plain_nll")
    B, T = input_ids.shape
    if cache is None:
        cache, _ = prefill(decoder, input_ids)
        cache = kv.detach(cache)
    core = getattr(coprocessor, "module", coprocessor)  # unwrap DDP/FSDP for the layout only
    layout = core.layout(n_ahead)
    latents, gate = coprocessor(cache, points, with_gate=True)              # (B, P, NL, d), (L,) or None
    tokens, targets, valid = masks.group_tokens(input_ids, points, layout, pad_id)
    out = group_forward(decoder, cache, points, latents, tokens, layout, gate=gate)
    d = out.last_hidden_state.shape[-1]
    hidden = out.last_hidden_state.view(B, points.shape[1], layout.group_len, d)[:, :, -n_ahead:]
    logits = hidden_to_logits(decoder, hidden) if with_logits else None
    return MultiPointOutput(hidden, targets, valid, latents, logits)


def multi_point_loss(decoder, coprocessor, input_ids, points, n_ahead, cache=None, pad_id: int = 0):
    """Mean cross-entropy over valid ahead tokens, and per-(point, ahead) NLL (B, P, A).

    The training fast path computes the same loss in `fastpath.multi_point_loss`.
    """
    out = multi_point(decoder, coprocessor, input_ids, points, n_ahead, cache=cache, pad_id=pad_id)
    nll = token_nll(out.logits, out.targets, out.valid)
    loss = nll[out.valid].mean()
    return loss, nll.detach()


# ---------------------------------------------------------------------------------------------
# Scoring: the paper's evaluation protocols on one text.


@torch.no_grad()
def score_after_every_token(decoder, coprocessor, input_ids: torch.Tensor, positions: int = 16,
                            points_per_pass: int | None = None, pad_id: int = 0, progress=None,
                            fast: bool | None = None):
    """Latents after every token, the n-th token ahead scored for n = 1..positions.

    input_ids (1, T). Returns (nll_aug (T-1, A), nll_base (T-1, A)): row p is the augmentation
    point after token p, column n-1 the token n ahead; NaN past the end of the text. Points are
    processed `points_per_pass` at a time against one shared cache, so memory stays bounded and
    the whole text costs a handful of batched passes, never one call per token.

    `fast` (default: on CPU wherever the decoder allows it, `fastpath.unsupported`) computes the same scores
    with `fastpath.score_every`: each group attends to its own prefix and rows only, and the LM
    head runs by vocabulary slices. Otherwise the groups of a pass go through transformers with
    the dense group mask (every group scored against every other, then masked). On a GPU the
    transformers path is the faster one in bf16 (0.33 vs 0.53 s for 512 tokens on an H100, equal
    in float32), its fewer, larger kernels outweighing the masked work; on CPU the fast path takes
    ~0.8x the time (results/app_latency.md).

    `points_per_pass` (default 64): on CPU the transformers path defaults to 16, since its dense
    mask makes attention grow with the points per pass (16 take about a quarter less time than
    64 there); per-point attention has no such cost and runs faster with larger matmuls.

    `iter_score_after_every_token` gives the rows pass by pass (for progressive views).
    """
    for _, nll_aug, nll_base in iter_score_after_every_token(decoder, coprocessor, input_ids, positions,
                                                             points_per_pass, pad_id, progress, fast):
        pass
    return nll_aug, nll_base


@torch.no_grad()
def iter_score_after_every_token(decoder, coprocessor, input_ids: torch.Tensor, positions: int = 16,
                                 points_per_pass: int | None = None, pad_id: int = 0, progress=None,
                                 fast: bool | None = None):
    """`score_after_every_token`, pass by pass: yields (points_done, nll_aug (T-1, A), nll_base (T-1, A))
    after each pass of `points_per_pass` points, rows >= points_done of nll_aug still NaN (not scored
    yet); the last yield (points_done = T-1) holds the same scores `score_after_every_token` returns.
    Each partial nll_aug is its own tensor: later passes do not change it."""
    on_cpu = input_ids.device.type == "cpu"
    if fast is None:
        fast = on_cpu and fastpath.unsupported(decoder, coprocessor) is None
    if points_per_pass is None:
        points_per_pass = 16 if on_cpu and not fast else 64
    if fast:
        yield from fastpath.iter_score_every(decoder, coprocessor, input_ids, positions, points_per_pass, pad_id,
                                             progress)
        return
    T = input_ids.shape[1]
    cache, logits = prefill(decoder, input_ids)
    base = plain_nll(logits, input_ids)[0]                                     # (T,)
    all_points = torch.arange(T - 1, device=input_ids.device)
    idx = all_points[:, None] + torch.arange(1, positions + 1, device=input_ids.device)
    nll_base = torch.where(idx < T, base[idx.clamp(max=T - 1)], torch.full(idx.shape, float("nan"), device=idx.device))
    rows = []
    chunks = list(torch.split(all_points, points_per_pass))
    if not chunks:   # a one-token text: no augmentation point
        yield 0, nll_base.clone(), nll_base
        return
    for i, pts in enumerate(chunks):
        out = multi_point(decoder, coprocessor, input_ids, pts[None], positions, cache=cache, pad_id=pad_id)
        rows.append(token_nll(out.logits, out.targets, out.valid)[0])
        if progress is not None:
            progress((i + 1) / len(chunks))
        done = int(pts[-1]) + 1
        if i == len(chunks) - 1:
            yield done, torch.cat(rows), nll_base
        else:   # the points not scored yet: NaN rows
            yield done, torch.cat([*rows, torch.full((T - 1 - done, positions), float("nan"),
                                                     dtype=rows[0].dtype, device=rows[0].device)]), nll_base


@dataclass
class ContinuationScore:
    nll_base: torch.Tensor      # (C,) NLL of each continuation token, plain decoder
    nll_aug: torch.Tensor       # (C,) same with latents inserted at the point
    logits_base: torch.Tensor   # (C, V) float32 log-probabilities (normalised logits)
    logits_aug: torch.Tensor    # (C, V) same
    latents: torch.Tensor       # (NL, d)
    attn_to_latents: torch.Tensor | None  # (C, NL): mean over heads and layers


@torch.no_grad()
def score_continuation(decoder, coprocessor, input_ids: torch.Tensor, point: int,
                       with_attention: bool = False) -> ContinuationScore:
    """Augment once after token `point` and score every later token. input_ids (1, T)."""
    T = input_ids.shape[1]
    if not 0 <= point <= T - 2:
        raise ValueError(f"the augmentation point must be in [0, {T - 2}], got {point}")
    C = T - 1 - point                                   # scored tokens: point+1..T-1
    out = decoder.base_model(input_ids=input_ids, use_cache=True, **kv.cache_kwargs(None))
    cache = kv.returned(out)
    pts = torch.tensor([[point]], device=input_ids.device)
    attn = None
    if with_attention:   # one eager group pass gives both the hidden states and the attention weights
        latents = coprocessor(kv.prefix(cache, point + 1), pts)                   # (1, 1, NL, d)
        hidden, attn = _group_with_attention(decoder, coprocessor, cache, input_ids, point, latents)
    else:
        mp = multi_point(decoder, coprocessor, input_ids, pts, C, cache=kv.prefix(cache, point + 1), with_logits=False)
        hidden, latents = mp.hidden[0, 0], mp.latents                              # (C, d), (1, 1, NL, d)
    # One LM head over both arms' scored rows (plain: positions point..T-2; one (2C, d) matmul runs
    # faster than two of C rows), then log-probabilities in place, a few rows at a time on CPU: a
    # (C, V) float matrix is ~37 MB for SmolLM2 and every whole-matrix temporary costs page faults
    # and a trip through memory. The NLL is a gather (cross-entropy would redo the log-softmax).
    logp = hidden_to_logits(decoder, torch.cat([out.last_hidden_state[0, point:-1], hidden])).float()
    rows = 8 if logp.device.type == "cpu" else 2 * C
    for i in range(0, 2 * C, rows):
        logp[i:i + rows] = torch.log_softmax(logp[i:i + rows], -1)
    nll = -logp.gather(-1, input_ids[0, point + 1:].repeat(2)[:, None])[:, 0]
    return ContinuationScore(nll[:C], nll[C:], logp[:C], logp[C:], latents[0, 0], attn)


def _group_with_attention(decoder, coprocessor, cache, input_ids, point, latents):
    """The group read after `point` (latents, then the rest of the text) with eager attention.
    -> (hidden of the scored positions (C, d), attention mass each of them puts on each latent (C, NL):
    mean over heads and layers)."""
    T = input_ids.shape[1]
    layout = coprocessor.layout(T - 1 - point)
    pts = torch.tensor([[point]], device=input_ids.device)
    tokens, _, _ = masks.group_tokens(input_ids, pts, layout)
    prev = getattr(decoder.config, "_attn_implementation", "sdpa")
    decoder.set_attn_implementation("eager")  # only eager returns attention weights
    try:
        out = group_forward(decoder, kv.prefix(cache, point + 1), pts, latents, tokens, layout,
                            output_attentions=True, gate=gate_of(coprocessor))
    finally:
        decoder.set_attn_implementation(prev)
    NL, A = layout.num_latents, layout.n_ahead
    # each (1, H, G, point+1+G): keys = cache then group; latents are group keys 0..NL-1
    mass = torch.stack([a[0, :, -A:, point + 1: point + 1 + NL] for a in out.attentions])
    return out.last_hidden_state[0, -A:], mass.float().mean(dim=(0, 1))


def latent_attention(decoder, coprocessor, cache, input_ids, point, latents):
    """Attention mass each continuation position puts on the latents (mean over heads, layers) -> (A, NL)."""
    return _group_with_attention(decoder, coprocessor, cache, input_ids, point, latents)[1]


# ---------------------------------------------------------------------------------------------
# Generation: the same sampling for both arms, streamed token by token.


@dataclass
class GenStep:
    token_id: int
    index: int            # 0-based index of the generated token
    elapsed: float        # seconds since generation started
    augmented_at: bool    # latents were (re)inserted right before this token


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if 0 < top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


# Decoders whose base model is exactly: token embeddings -> layers (one shared rotary embedding,
# one causal mask for every layer) -> final RMSNorm. The layer-split prefill re-runs those steps
# itself, so it is only exact where the base model's forward adds nothing else (Gemma scales the
# embeddings, sliding-window layers need masks of their own, GPT-2 adds position embeddings).
_SPLIT_MODEL_TYPES = ("llama", "qwen2")


def _split_depth(decoder, coprocessor) -> int | None:
    """K for the layer-split prefill (`_AugState.prefill_and_insert`): the coprocessor reads the
    decoder's cache of layers 0..K-1 only (K = max(layer_ids) + 1; 0 for pause tokens, which read
    none). None where the split does not apply or gains nothing (it reads every layer), and the
    prompt then runs through the whole decoder before the coprocessor, as at any later point."""
    core = getattr(coprocessor, "module", coprocessor)
    cfg = decoder.config
    base = decoder.base_model
    L = cfg.num_hidden_layers
    if core is None or cfg.model_type not in _SPLIT_MODEL_TYPES:
        return None
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None  # a dense float mask is what the combined pass needs (not a flex BlockMask)
    if families.has_window(cfg):
        return None
    if not all(hasattr(base, a) for a in ("layers", "rotary_emb", "norm")) or len(base.layers) != L:
        return None
    if "position_embeddings" not in inspect.signature(base.layers[0].forward).parameters:
        return None
    K = 0 if core.body is None else max(core.layer_ids) + 1
    return K if K < L else None


def _group_inputs(decoder, layout: masks.GroupLayout, latents: torch.Tensor, last_tokens: torch.Tensor,
                  points: torch.Tensor):
    """What a generation appends at its augmentation points: the latents, then (with
    `refeed_last`) the point token again. latents (B, NL, d), last_tokens (B,) the point tokens
    x_p, points (B, 1) their positions -> inputs_embeds (B, G, d), position ids (B, G)."""
    x = latents.to(decoder_dtype(decoder))
    if layout.refeed_last:
        x = torch.cat([x, embed(decoder, last_tokens.reshape(-1, 1))], dim=1)
    return x, masks.group_positions(points, layout)[:, 0, : x.shape[1]]


def _latent_keys(latent_cols: tuple[int, int], n_keys: int, device) -> torch.Tensor:
    """(n_keys,) bool: True at the latents' columns latent_cols = (start, end)."""
    cols = torch.zeros(n_keys, dtype=torch.bool, device=device)
    cols[latent_cols[0]: latent_cols[1]] = True
    return cols


def _gate_kwargs(gate, latent_cols: tuple[int, int] | None, n_keys: int, device) -> dict:
    """The `latent_gate` argument of a forward whose keys (n_keys cache columns after it) hold
    latents at columns latent_cols = (start, end); {} without a gate or latents."""
    if gate is None or latent_cols is None:
        return {}
    return {"latent_gate": (gate, _latent_keys(latent_cols, n_keys, device))}


class _AugState:
    """Decoding state with latents: the cache holds clean text up to `clean_len`, then a group.

    While a group is in the cache, every later forward gets an explicit 4-D mask when the layout
    hides the point's original entry or the coprocessor gates its latents (`_group_kwargs`).
    The first group at the end of the prompt can be built by `prefill_and_insert` instead of
    `feed_clean` + `latents_now` + `insert`: the same cache and logits, less time to first token.
    """

    def __init__(self, decoder, coprocessor):
        self.decoder, self.cop = decoder, coprocessor
        # Decoding needs only the last position's logits: the LM head over every prompt position
        # is a quarter of a 256-token prefill for SmolLM2-135M on CPU (its vocabulary is 49k).
        self.last_only = _logits_to_keep(decoder, 1)
        self.gate = gate_of(coprocessor)
        self.windowed = families.has_window(decoder.config)
        families.attach(decoder)
        self.cache = None
        self.key_pos = torch.zeros(1, 0, dtype=torch.long, device=decoder.device)   # (1, K) position of each cached key
        self.clean_len = 0      # cached clean tokens
        self.next_pos = 0       # position id of the next fed token
        self.hidden = None      # cache column the group must not see (the point's own entry), or None
        self.latent_cols = None  # (start, end) cache columns of the group's latents, or None
        self._rows = None        # decoding masks while a group is cached (`_decode_kwargs`)

    def feed_clean(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed real tokens (1, n) continuing the clean text. -> logits of the last one."""
        if self.latent_cols is not None:
            raise RuntimeError("feed_clean after a group: drop_group() first")
        pos = torch.arange(self.clean_len, self.clean_len + ids.shape[1], device=ids.device)[None]
        out = self.decoder(input_ids=ids, position_ids=pos, use_cache=True, **kv.cache_kwargs(self.cache),
                           **self.last_only)
        self.cache = kv.returned(out)
        self.key_pos = torch.cat([self.key_pos, pos], dim=1)
        self.clean_len += ids.shape[1]
        self.next_pos = self.clean_len
        return out.logits[0, -1]

    def drop_group(self) -> None:
        """Forget the group and everything after it: the cache holds the clean text again."""
        kv.crop(self.cache, self.clean_len)
        self.key_pos = self.key_pos[:, : self.clean_len]
        self.hidden = self.latent_cols = self._rows = None

    def latents_now(self) -> torch.Tensor:
        p = torch.tensor([[self.clean_len - 1]], device=self.decoder.device)
        return self.cop(kv.fork(self.cache), p)                           # (1, 1, NL, d)

    def _group_kwargs(self, new_pos: torch.Tensor) -> dict:
        """Mask (and gate) for a forward of inputs at positions new_pos (1, n_new) appended while a
        group is cached; records their key positions. On a sliding-window decoder every such
        forward takes an explicit mask and the keys' positions (the window counts positions, and
        the group's positions need not be its cache columns)."""
        n_new, device = new_pos.shape[1], new_pos.device
        self.key_pos = torch.cat([self.key_pos, new_pos], dim=1)
        if self.latent_cols is None or (self.hidden is None and self.gate is None and not self.windowed):
            return {}
        K = kv.length(self.cache) + n_new
        if n_new == 1 and not self.windowed:
            return self._decode_kwargs(K, device)
        seen = torch.ones(1, K - n_new, dtype=torch.bool, device=device)
        if self.hidden is not None:
            seen[:, self.hidden] = False
        allowed = masks.append_allowed(seen, torch.ones(1, n_new, dtype=torch.bool, device=device))
        return {"attention_mask": masks.to_additive(allowed, decoder_dtype(self.decoder)),  # (1, 1, n, K)
                "key_positions": self.key_pos, **_gate_kwargs(self.gate, self.latent_cols, K, device)}

    def _decode_kwargs(self, K: int, device) -> dict:
        """`_group_kwargs` for one new token over K keys. A decoding step's mask row is the
        previous step's plus one visible key, so the rows are built once per group, with room to
        grow, and each step passes views of their first K columns: with the gate, one finished
        mask per decoder layer (L, 1, 1, 1, K) that the attention hook uses as it is. Building the
        masks every step (a mask, then a gate bias added in each of the 30 layers) cost about as
        much as 1-2% of a SmolLM2-135M decoding step on a 2-core CPU."""
        if self._rows is None or self._rows.shape[-1] < K:
            C = max(2 * K, 256)
            row = torch.zeros(C, dtype=decoder_dtype(self.decoder), device=device)
            if self.hidden is not None:
                row[self.hidden] = torch.finfo(row.dtype).min
            if self.gate is not None:
                cols = _latent_keys(self.latent_cols, C, device)
                row = row + torch.where(cols, self.gate.detach().to(row.dtype)[:, None], 0.0)   # (L, C)
            self._rows = row.view(-1, 1, 1, 1, C)
        rows = self._rows[..., :K]                                          # (1 or L, 1, 1, 1, K)
        if self.gate is None:
            return {"attention_mask": rows[0]}
        return {"attention_mask": rows[0], "latent_gate": rows}

    def _enter_group(self, start: int, layout: masks.GroupLayout) -> None:
        """Record a group appended at cache column `start` after the clean text."""
        self._rows = None
        self.latent_cols = (start, start + layout.num_latents)
        self.hidden = self.clean_len - 1 if layout.hide_point else None
        self.next_pos = self.clean_len + layout.offset

    def insert(self, latents: torch.Tensor, last_token: torch.Tensor) -> torch.Tensor:
        """Append a group (latents, re-fed token) after the clean text. -> next-token logits."""
        layout = self.cop.layout(1)
        p = torch.tensor([[self.clean_len - 1]], device=latents.device)
        x, pos = _group_inputs(self.decoder, layout, latents[:, 0], last_token, p)   # (1, G, d), (1, G)
        self._enter_group(kv.length(self.cache), layout)
        out = self.decoder(inputs_embeds=x, position_ids=pos, use_cache=True, **kv.cache_kwargs(self.cache),
                           **self.last_only, **self._group_kwargs(pos))
        self.cache = kv.returned(out)
        return out.logits[0, -1]

    def prefill_and_insert(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Feed the prompt (1, n) and append a group at its end (point x_{n-1}). -> next-token
        logits, those of `feed_clean(prompt)`, then `insert(latents_now(), x_{n-1})`.

        Layer-split prefill: the coprocessor reads only the decoder's layers 0..K-1
        (`_split_depth`), so the prompt first runs through those layers alone, the coprocessor
        makes the latents from that partial cache, and the group (latents + re-fed x_{n-1}) runs
        through layers 0..K-1 against it. Layers K..L-1 then take prompt and group rows in ONE
        pass (n + G rows): prompt rows causal among themselves and blind to the group, group rows
        as in `insert` (the prompt but a hidden point entry, causal within the group, the gate on
        the latent keys). On CPU the G group rows add a few percent to a compute-bound n-row pass,
        where `insert` runs G rows through all L layers, bound by reading every weight once more.
        The cache afterwards is laid out as `insert` leaves it (per layer: n prompt entries, then
        G group entries), so `feed_after`, `drop_group` and re-augmentation work unchanged.
        Falls back to the three calls wherever `_split_depth` says the split does not apply.
        """
        K = _split_depth(self.decoder, self.cop)
        if K is None or prompt_ids.shape[0] != 1:
            self.feed_clean(prompt_ids)
            return self.insert(self.latents_now(), prompt_ids[0, -1])
        if self.cache is not None:
            raise RuntimeError("prefill_and_insert starts a generation: the cache must be empty")
        from transformers.masking_utils import create_causal_mask

        dec, base, dev = self.decoder, self.decoder.base_model, prompt_ids.device
        dtype = decoder_dtype(dec)
        layout = self.cop.layout(1)
        n = prompt_ids.shape[1]
        cache = kv.new_cache(dec.config)       # the cache the decoder's own prefill would start
        x = embed(dec, prompt_ids)                                               # (1, n, d)
        p = torch.tensor([[n - 1]], device=dev)
        pos_x = torch.arange(n, device=dev)[None]                               # (1, n)

        def run(h, layers, latent_gate=None, **kw):
            # the layers are called one by one: the gate reaches their attention through the
            # context the decoder's own forward would set up (`families.layer_masks`)
            with families.layer_masks(dec, latent_gate=latent_gate):
                for layer in layers:
                    h = layer(h, use_cache=True, **kv.cache_kwargs(cache), **kw)
            return h

        # 1. the prompt through layers 0..K-1, with the mask (None: SDPA's own causal path) the
        #    decoder's forward makes for it, so these layers' cache equals the plain prefill's
        causal = create_causal_mask(config=dec.config, inputs_embeds=x, attention_mask=None,
                                    position_ids=pos_x, **kv.cache_kwargs(cache))
        rope = base.rotary_emb(x, pos_x)
        hx = run(x, base.layers[:K], attention_mask=causal, position_ids=pos_x, position_embeddings=rope)
        # 2. latents from the partial cache (the coprocessor reads only layers 0..K-1)
        latents = self.cop(kv.select_layers(cache, list(range(K))), p)          # (1, 1, NL, d)
        g, pos_g = _group_inputs(dec, layout, latents[:, 0], prompt_ids[:, -1], p)   # (1, G, d), (1, G)
        G = g.shape[1]
        # keys of every layer once it is done: n prompt entries, then G group entries
        seen = torch.ones(1, n, dtype=torch.bool, device=dev)
        if layout.hide_point:
            seen[:, n - 1] = False
        group_rows = masks.append_allowed(seen, torch.ones(1, G, dtype=torch.bool, device=dev))  # (1, G, n+G)
        prompt_rows = torch.cat([torch.ones(n, n, dtype=torch.bool, device=dev).tril(),
                                 torch.zeros(n, G, dtype=torch.bool, device=dev)], dim=1)[None]  # (1, n, n+G)
        mask = masks.to_additive(torch.cat([prompt_rows, group_rows], dim=1), dtype)            # (1, 1, n+G, n+G)
        # the gate: prompt rows get it too, on keys their mask blocks anyway
        extra = _gate_kwargs(self.gate, (n, n + layout.num_latents), n + G, dev)
        pos = torch.cat([pos_x, pos_g], dim=1)                                   # (1, n+G)
        rope = base.rotary_emb(g, pos)     # elementwise in the position: slices equal separate calls
        # 3. the group through layers 0..K-1, against the prompt's entries there
        hg = run(g, base.layers[:K], attention_mask=mask[:, :, n:], position_ids=pos_g,
                 position_embeddings=tuple(r[:, n:] for r in rope), **extra)
        # 4. layers K..L-1 once, on prompt and group rows together
        h = run(torch.cat([hx, hg], dim=1), base.layers[K:], attention_mask=mask, position_ids=pos,
                position_embeddings=rope, **extra)
        # 5. the next token is read off the group's last row (the re-fed x_{n-1})
        logits = hidden_to_logits(dec, base.norm(h[:, -1:]))
        self.cache = cache
        self.clean_len = n
        self.key_pos = pos
        self._enter_group(n, layout)
        return logits[0, -1]

    def feed_after(self, token: torch.Tensor) -> torch.Tensor:
        """Feed a generated token after the group (shifted positions)."""
        pos = torch.tensor([[self.next_pos]], device=token.device)
        out = self.decoder(input_ids=token.view(1, 1), position_ids=pos, use_cache=True,
                           **kv.cache_kwargs(self.cache), **self._group_kwargs(pos))
        self.cache = kv.returned(out)
        self.next_pos += 1
        return out.logits[0, -1]


@torch.no_grad()
def stream_generate(decoder, tokenizer, coprocessor, prompt_ids: torch.Tensor, augment: bool = True,
                    max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0, reaugment_every: int = 0, async_delay: int = 0, stop_ids=None):
    """Yield GenStep per generated token. prompt_ids (1, n).

    augment=False (or no coprocessor) is the plain decoder with the identical sampling procedure
    and seed. `reaugment_every=k` calls the coprocessor again every k generated tokens (the old
    group is dropped and the text since it re-read clean, as in training where a group sees only
    original text). `async_delay=N` inserts the latents computed at the end of the prompt only
    after N more tokens were generated (the paper's Table 8). Without a delay the first group is
    built together with the prompt's prefill (`_AugState.prefill_and_insert`, the layer split).
    """
    gen = torch.Generator().manual_seed(seed)
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
    use = augment and coprocessor is not None
    st = _AugState(decoder, coprocessor)
    t0 = time.perf_counter()
    pending = None                 # latents waiting for an async insertion
    since = []                     # tokens generated since the last augmentation point
    in_group = False
    if use and async_delay == 0:
        logits = st.prefill_and_insert(prompt_ids)       # = feed_clean, latents_now, insert; sooner
        in_group = True
    else:
        logits = st.feed_clean(prompt_ids)
        if use:
            pending = st.latents_now()
    for i in range(max_new_tokens):
        tok = _sample(logits, temperature, top_k, top_p, gen)
        just_aug = use and in_group and not since
        yield GenStep(tok, i, time.perf_counter() - t0, just_aug)
        if tok in stop_ids or i == max_new_tokens - 1:
            return
        t = torch.tensor([tok], device=prompt_ids.device)
        since.append(tok)
        if pending is not None and len(since) >= async_delay:
            logits = st.feed_clean(t.view(1, 1))
            logits = st.insert(pending, t)
            pending, since, in_group = None, [], True
        elif use and in_group and reaugment_every > 0 and len(since) >= reaugment_every:
            st.drop_group()                                                     # drop group + tail
            st.feed_clean(torch.tensor([since], device=t.device))
            logits = st.insert(st.latents_now(), t)
            since = []
        elif in_group:
            logits = st.feed_after(t)
        else:
            logits = st.feed_clean(t.view(1, 1))


class _BatchState:
    """Greedy decoding state for B prompts of different lengths at once (benchmark generation).

    Prompts are right-padded into one (B, P) prefill, so the coprocessor reads each row's cache up
    to the row's own point as usual. Every later input is appended at the same cache column for all
    rows but carries its row's own position id; `keys` (B, K) says which cache columns later inputs
    may see (not the padding, not a hidden point entry), and every forward gets the 4-D mask built
    from it plus causality among the new inputs.
    """

    def __init__(self, decoder, coprocessor, prompts: list[list[int]], pad_id: int = 0):
        self.decoder, self.cop = decoder, coprocessor
        self.gate = gate_of(coprocessor)
        dev = decoder.device
        self.n = torch.tensor([len(p) for p in prompts], device=dev)                 # (B,) prompt lengths
        B, P = len(prompts), int(self.n.max())
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.ids = ids
        self.cache = None
        self.keys = torch.zeros(B, 0, dtype=torch.bool, device=dev)                 # (B, K) visible columns
        self.key_pos = torch.zeros(B, 0, dtype=torch.long, device=dev)              # (B, K) their position ids
        families.attach(decoder)
        self.latent_cols = None
        self.next_pos = self.n.clone()                                               # (B,) next position id

    def _forward(self, visible: torch.Tensor, pos: torch.Tensor, **inputs) -> torch.Tensor:
        """Append n inputs per row (visible (B, n): may later inputs see them) -> hidden (B, n, d)."""
        K = self.keys.shape[1] + visible.shape[1]
        allowed = masks.append_allowed(self.keys, visible)                            # (B, n, K)
        self.key_pos = torch.cat([self.key_pos, pos], dim=1)
        kw = {"attention_mask": masks.to_additive(allowed, decoder_dtype(self.decoder)),   # (B, 1, n, K)
              "key_positions": self.key_pos, **_gate_kwargs(self.gate, self.latent_cols, K, pos.device)}
        out = self.decoder.base_model(position_ids=pos, use_cache=True, **kv.cache_kwargs(self.cache), **inputs, **kw)
        self.cache = kv.returned(out)
        self.keys = torch.cat([self.keys, visible], dim=1)
        return out.last_hidden_state

    def prefill(self) -> torch.Tensor:
        """The prompts -> next-token logits (B, V) at each row's last prompt token."""
        B, P = self.ids.shape
        cols = torch.arange(P, device=self.ids.device)
        visible = cols[None] < self.n[:, None]                                        # (B, P) not padding
        h = self._forward(visible, cols[None].expand(B, P), input_ids=self.ids)
        last = h[torch.arange(B, device=h.device), self.n - 1]                         # (B, d)
        return hidden_to_logits(self.decoder, last)

    def latents(self) -> torch.Tensor:
        """Latents at each row's last prompt token, from the prompt's cache. -> (B, 1, NL, d)"""
        return self.cop(kv.fork(self.cache), (self.n - 1)[:, None])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) -> next-token logits (B, V)."""
        pos = self.next_pos[:, None]
        h = self._forward(torch.ones_like(pos, dtype=torch.bool), pos, input_ids=tokens[:, None])
        self.next_pos = self.next_pos + 1
        return hidden_to_logits(self.decoder, h[:, -1])

    def insert(self, latents: torch.Tensor, last_tokens: torch.Tensor, point_col: int | torch.Tensor):
        """Append each row's group (latents, re-fed last token) after its clean text.

        latents (B, 1, NL, d); last_tokens (B,) the point tokens x_p; point_col: the cache column
        of x_p's original entry (hidden from now on with `hide_point`). -> next-token logits (B, V).
        """
        layout = self.cop.layout(1)
        points = (self.next_pos - 1)[:, None]                                         # (B, 1) position of x_p
        x, pos = _group_inputs(self.decoder, layout, latents[:, 0], last_tokens, points)   # (B, G, d), (B, G)
        if layout.hide_point:
            rows = torch.arange(self.keys.shape[0], device=x.device)
            self.keys[rows, point_col] = False
        start = self.keys.shape[1]
        self.latent_cols = (start, start + layout.num_latents)
        h = self._forward(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), pos, inputs_embeds=x)
        self.next_pos = points[:, 0] + 1 + layout.offset
        return hidden_to_logits(self.decoder, h[:, -1])


@torch.no_grad()
def greedy_generate_batch(decoder, coprocessor, prompts: list[list[int]], max_new_tokens: int = 256,
                          async_delay: int = 0, pad_id: int = 0, stop_ids=(), should_stop=None) -> list[list[int]]:
    """Greedy continuations of several prompts at once; the same tokens as `stream_generate` with
    temperature 0 for each prompt alone (up to floating-point ties).

    coprocessor None: the plain decoder; otherwise it is called once at the end of each prompt and
    its latents are inserted there, or after `async_delay` generated tokens (Table 8). A row stops at
    a token in `stop_ids`, when `should_stop(row, tokens)` says so, or after max_new_tokens; the
    batch runs until every row has stopped.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate_batch needs at least one prompt, each of at least one token")
    st = _BatchState(decoder, coprocessor, prompts, pad_id)
    B = len(prompts)
    logits = st.prefill()
    use = coprocessor is not None
    pending = None
    if use:
        z = st.latents()
        if async_delay > 0:
            pending = z
        else:
            logits = st.insert(z, st.ids[torch.arange(B, device=st.ids.device), st.n - 1], st.n - 1)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop_ids = set(s for s in stop_ids if s is not None)
    for i in range(max_new_tokens):
        tok = logits.argmax(-1)                                                       # (B,)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                if t in stop_ids or (should_stop is not None and should_stop(b, out[b])):
                    done[b] = True
        if all(done) or i == max_new_tokens - 1:
            break
        if pending is not None and i + 1 >= async_delay:
            st.step(tok)                                                              # x_p: token `async_delay`
            logits = st.insert(pending, tok, st.keys.shape[1] - 1)
            pending = None
        else:
            logits = st.step(tok)
    return out
