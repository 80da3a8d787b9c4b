"""Decoder families: where each transformers architecture keeps its blocks, attention, output head
and attention windows, and one registry entry per family that cacheaug supports.

Everything in cacheaug that depends on the decoder's architecture asks this module:

    families.blocks(model)            # the transformer blocks, in order
    families.attention(block)         # a block's self-attention module
    families.layer_windows(config)    # per layer: None (full attention) or its sliding window W
    families.logit_softcap(config)    # Gemma-2/3's final_logit_softcapping, or None
    families.check(decoder)           # None, or one line naming what cacheaug cannot reach

`FAMILIES` lists the supported families, each with a tiny random config (the parity matrix of
tests/test_families.py builds every entry) and what works for it. Adding a family is one entry
here; `check` refuses a model whose layout it does not know.

Sliding windows: transformers applies a layer's window only when it builds the mask itself; an
explicit 4-D mask (what every group pass of cacheaug passes) is used as given. So cacheaug's masks
apply the window themselves, per layer type (`masks.window_masks`), measured in position ids: a
query at position q sees a key at position k only if q - k < W, which is what the decoder's own
forward does over a plain sequence with the latents inserted as input embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# Where things are.

_BLOCK_NAMES = ("layers", "h")                      # Llama-likes, GPT-NeoX, Phi; GPT-2, Falcon
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")   # Llama; GPT-2; NeoX; Falcon


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a decoder, its base model or a coprocessor body, in order."""
    base = getattr(model, "base_model", model)
    for name in _BLOCK_NAMES:
        found = getattr(base, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return found
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def attention(block) -> torch.nn.Module:
    """A block's self-attention module (`self_attn`, GPT-2 `attn`, GPT-NeoX `attention`, Falcon
    `self_attention`)."""
    for name in _ATTENTION_NAMES:
        found = getattr(block, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    raise ValueError(f"cannot find the self-attention module of {type(block).__name__}")


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: None for full attention, W for a sliding window of W positions (a query
    at position q sees keys at q-W+1..q). From `layer_types` where the config has them, else a
    Mistral/Phi-3-style `sliding_window` on every layer."""
    L = config.num_hidden_layers
    W = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        out = []
        for t in types[:L]:
            if t == "full_attention":
                out.append(None)
            elif t == "sliding_attention":
                out.append(int(W))
            else:
                raise ValueError(f"unsupported attention layer type {t!r} (full_attention and sliding_attention are)")
        return out
    if getattr(config, "use_sliding_window", True) is False:   # Qwen2-style switch without layer_types
        return [None] * L
    return [int(W) if W else None] * L


def has_window(config) -> bool:
    return any(w is not None for w in layer_windows(config))


def logit_softcap(config) -> float | None:
    """Gemma-2/3's `final_logit_softcapping` c: logits = c * tanh(logits / c), or None."""
    c = getattr(config, "final_logit_softcapping", None)
    return float(c) if c else None


def attn_softcap(config) -> float | None:
    """Gemma-2's `attn_logit_softcapping` on attention scores, or None."""
    c = getattr(config, "attn_logit_softcapping", None)
    return float(c) if c else None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), as transformers' Gemma-2/3 heads apply it; identity for None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class Family:
    """One decoder family: its transformers `model_type`, a tiny random config for the tests, and
    what cacheaug supports on it."""

    name: str                       # the registry key (a model_type, or model_type + variant)
    model_type: str
    make_config: object             # (vocab, layers, hidden, window) -> a transformers config
    fast_path: bool = False         # fastpath.py covers its blocks
    attn: str = "sdpa"              # attention implementation its tiny test model uses
    notes: str = ""
    tags: tuple = field(default_factory=tuple)   # "window", "softcap", "embed_scale"


def _cfg(cls_name: str, **kw):
    import transformers

    return getattr(transformers, cls_name)(**(_TOKENS | kw))


def _llama_like(cls_name, vocab, layers, hidden, **kw):
    base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _cfg(cls_name, **(base | kw))


_TOKENS = dict(bos_token_id=1, eos_token_id=0, pad_token_id=0)   # inside any tiny vocabulary


def _gemma_like(cls_name, vocab, layers, hidden, **kw):
    return _llama_like(cls_name, vocab, layers, hidden, head_dim=hidden // 4, **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "llama", lambda v, n, d, w: _llama_like(
        "LlamaConfig", v, n, d, attention_bias=True, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        fast_path=True, notes="llama3 rope scaling, attention biases"),
    Family("qwen2", "qwen2", lambda v, n, d, w: _llama_like("Qwen2Config", v, n, d), fast_path=True),
    Family("qwen2-window", "qwen2", lambda v, n, d, w: _llama_like(
        "Qwen2Config", v, n, d, use_sliding_window=True, sliding_window=w, max_window_layers=1),
        notes="sliding window on the layers from max_window_layers on", tags=("window",)),
    Family("qwen3", "qwen3", lambda v, n, d, w: _llama_like("Qwen3Config", v, n, d, head_dim=d // 4),
        fast_path=True, notes="q/k RMSNorm"),
    Family("mistral", "mistral", lambda v, n, d, w: _llama_like("MistralConfig", v, n, d, sliding_window=None),
        fast_path=True),
    Family("mistral-window", "mistral", lambda v, n, d, w: _llama_like("MistralConfig", v, n, d, sliding_window=w),
        notes="every layer slides (Mistral-7B-v0.1)", tags=("window",)),
    Family("gemma", "gemma", lambda v, n, d, w: _gemma_like("GemmaConfig", v, n, d), tags=("embed_scale",),
        notes="embeddings scaled by sqrt(d)"),
    Family("gemma2", "gemma2", lambda v, n, d, w: _gemma_like(
        "Gemma2Config", v, n, d, sliding_window=w, final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
        query_pre_attn_scalar=d // 4), tags=("window", "softcap", "embed_scale"), attn="eager",
        notes="the paper's decoder: final logit softcap, attention softcap, alternating sliding layers"),
    Family("gemma3_text", "gemma3_text", lambda v, n, d, w: _gemma_like(
        "Gemma3TextConfig", v, n, d, sliding_window=w, final_logit_softcapping=2.0, query_pre_attn_scalar=d // 4,
        layer_types=["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)),
        tags=("window", "softcap", "embed_scale"), notes="local/global layers with two rotary bases"),
    Family("phi3", "phi3", lambda v, n, d, w: _llama_like("Phi3Config", v, n, d, sliding_window=None),
        notes="fused qkv and gate/up projections"),
    Family("phi3-window", "phi3", lambda v, n, d, w: _llama_like("Phi3Config", v, n, d, sliding_window=w),
        notes="every layer slides", tags=("window",)),
    Family("olmo2", "olmo2", lambda v, n, d, w: _llama_like("Olmo2Config", v, n, d),
        fast_path=True, notes="post-norm blocks, q/k RMSNorm"),
    Family("gpt2", "gpt2", lambda v, n, d, w: _cfg(
        "GPT2Config", vocab_size=v, n_embd=d, n_layer=n, n_head=4, n_positions=256, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0), fast_path=True, notes="learned positions"),
    Family("gpt_neox", "gpt_neox", lambda v, n, d, w: _cfg(
        "GPTNeoXConfig", vocab_size=v, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n,
        num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, hidden_dropout=0.0,
        attention_dropout=0.0), notes="Pythia: parallel residual, partial rotary"),
    Family("falcon", "falcon", lambda v, n, d, w: _cfg(
        "FalconConfig", vocab_size=v, hidden_size=d, num_hidden_layers=n, num_attention_heads=4,
        max_position_embeddings=256, alibi=False, hidden_dropout=0.0, attention_dropout=0.0),
        notes="multi-query attention; its layers do not pass extra arguments on to attention"),
    Family("stablelm", "stablelm", lambda v, n, d, w: _cfg(
        "StableLmConfig", vocab_size=v, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, partial_rotary_factor=0.5),
        notes="LayerNorm, partial rotary; its layers do not pass extra arguments on to attention"),
    Family("phi", "phi", lambda v, n, d, w: _cfg(
        "PhiConfig", vocab_size=v, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n,
        num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0, attention_dropout=0.0), notes="parallel attention and MLP, LM head bias"),
]}

SUPPORTED_MODEL_TYPES = tuple(sorted({f.model_type for f in FAMILIES.values()}))


def tiny_decoder(name: str, vocab: int = 128, layers: int = 2, hidden: int = 32, window: int = 8,
                 seed: int = 0, attn: str | None = None):
    """A tiny random frozen decoder of a registered family (tests, benchmarks, examples)."""
    from transformers import AutoModelForCausalLM

    from .decoder import freeze

    cfg = FAMILIES[name].make_config(vocab, layers, hidden, window)
    torch.manual_seed(seed)
    attn = attn or FAMILIES[name].attn
    return freeze(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32))


def check_config(cfg) -> str | None:
    """`check` on a config alone (before any weights are loaded)."""
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return (f"decoder architecture {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}; "
                f"adding one is an entry in cacheaug_core/families.py)")
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{mt}: encoder-decoder models are not supported"
    if mt == "falcon" and getattr(cfg, "alibi", False):
        return "falcon with ALiBi: its attention bias is not expressed by position ids, which cacheaug's groups need"
    try:
        layer_windows(cfg)
    except ValueError as e:
        return f"{mt}: {e}"
    return None


def check(decoder) -> str | None:
    """None when cacheaug can drive this decoder, else one line naming what is missing."""
    why = check_config(decoder.config)
    if why is not None:
        return why
    try:
        for b in blocks(decoder):
            attention(b)
    except ValueError as e:
        return f"{decoder.config.model_type}: {e}"
    return None


def require(decoder) -> None:
    """Raise ValueError with `check`'s line when cacheaug cannot drive this decoder."""
    why = check(decoder)
    if why is not None:
        raise ValueError(why)


# ---------------------------------------------------------------------------------------------
# Per-layer masks: the latent gate and sliding windows, applied at each attention module.
#
# A forward of a model `attach`ed here takes two more keyword arguments, which its own forward
# never sees (the model's pre-hook takes them out, so they reach every layer whatever the family's
# layers pass on: Falcon's and StableLM's layers do not hand extra arguments to attention):
#
#   latent_gate=(bias (L,), cols (K,) or (B, K) bool)   add bias[l] to layer l's scores on the keys
#       where cols is True; or latent_gate=masks (L, B, 1, n, K): layer l attends with masks[l].
#   key_positions=(B, K) long     the position id of every key (cached, then the new inputs): a
#       sliding layer of window W then also blocks keys with q - k >= W (q: the query's position,
#       the last n entries). A forward with an explicit 4-D mask on a windowed decoder must pass
#       it; the hook refuses otherwise, since transformers uses an explicit mask as given.


class _MaskState:
    def __init__(self, windows: list[int | None]):
        self.windows = windows
        self.depth = 0
        self.reset()

    def reset(self):
        self.gate = None
        self.key_pos = None
        self.explicit = False
        self.blocked = {}            # window -> (B, 1, n, K) bool: keys that window blocks


def _outer_pre(state: _MaskState):
    def hook(module, args, kwargs):
        gate = kwargs.pop("latent_gate", None)
        key_pos = kwargs.pop("key_positions", None)
        if state.depth == 0:
            state.reset()
            mask = kwargs.get("attention_mask")
            state.explicit = isinstance(mask, dict) or (torch.is_tensor(mask) and mask.dim() == 4)
        state.depth += 1
        if gate is not None:
            state.gate = gate
        if key_pos is not None:
            state.key_pos = key_pos
        return args, kwargs
    return hook


def _outer_post(state: _MaskState):
    def hook(module, args, kwargs, output):
        state.depth -= 1
        if state.depth == 0:
            state.reset()
        return output
    return hook


def _layer_pre(state: _MaskState, layer: int):
    W = state.windows[layer] if layer < len(state.windows) else None

    def hook(module, args, kwargs):
        if state.depth == 0 or (state.gate is None and (W is None or not state.explicit)):
            return None
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(state.gate):              # finished masks, one per layer (L, B, 1, n, K)
            mask = state.gate[layer]
        elif state.gate is not None:
            bias, cols = state.gate                  # bias (L,) learned; cols (K,) or (B, K) bool: latent keys
            if mask is None or not torch.is_tensor(mask) or mask.dim() != 4:
                raise RuntimeError(f"the latent gate needs an explicit 4-D float attention mask at layer {layer} "
                                   f"({type(module).__name__} got {type(mask).__name__})")
            add = torch.where(cols, bias[layer].to(mask.dtype), torch.zeros((), dtype=mask.dtype, device=mask.device))
            mask = mask + add.view(-1 if cols.dim() == 2 else 1, 1, 1, cols.shape[-1])
        if W is not None and state.explicit:
            if state.key_pos is None:
                raise RuntimeError(f"layer {layer} slides over {W} positions but got an explicit mask without "
                                   f"key_positions: its window cannot be applied")
            if not torch.is_tensor(mask) or mask.dim() != 4:
                raise RuntimeError(f"layer {layer} slides over {W} positions: its window needs a dense 4-D mask, "
                                   f"not {type(mask).__name__}")
            blocked = state.blocked.get(W)
            if blocked is None:
                kp = state.key_pos.to(mask.device)                               # (B, K)
                q = kp[:, -mask.shape[-2]:]                                     # (B, n)
                blocked = ((q[:, :, None] - kp[:, None, :]) >= W)[:, None]      # (B, 1, n, K)
                state.blocked[W] = blocked
            mask = torch.where(blocked[..., : mask.shape[-1]], torch.finfo(mask.dtype).min, mask)
        kwargs["attention_mask"] = mask
        return args, kwargs
    return hook


def attach(model) -> None:
    """Let `model` (a decoder, or a coprocessor body) take `latent_gate` and `key_positions` (see
    above). Idempotent; the model's weights are not changed, a forward without the arguments and
    without an explicit mask is untouched."""
    if getattr(model, "_cacheaug_masks", None) is not None:
        return
    require(model)
    state = _MaskState(layer_windows(model.config))
    outer = {id(model): model, id(model.base_model): model.base_model}
    for m in outer.values():
        m.register_forward_pre_hook(_outer_pre(state), with_kwargs=True)
        m.register_forward_hook(_outer_post(state), with_kwargs=True, always_call=True)
    for layer, block in enumerate(blocks(model)):
        attention(block).register_forward_pre_hook(_layer_pre(state, layer), with_kwargs=True)
    model._cacheaug_masks = state


class layer_masks:
    """Context for calling an `attach`ed model's blocks one by one (outside its own forward), with
    the arguments its forward would take: `with layer_masks(model, latent_gate=..., key_positions=...):`."""

    def __init__(self, model, latent_gate=None, key_positions=None):
        attach(model)
        self.state, self.gate, self.key_pos = model._cacheaug_masks, latent_gate, key_positions

    def __enter__(self):
        if self.state.depth:
            raise RuntimeError("layer_masks inside a forward of the same model")
        self.state.reset()
        self.state.depth = 1
        self.state.explicit = True
        self.state.gate, self.state.key_pos = self.gate, self.key_pos
        return self

    def __exit__(self, *exc):
        self.state.depth = 0
        self.state.reset()
        return False
