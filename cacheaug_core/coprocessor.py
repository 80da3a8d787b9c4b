"""The coprocessor, in one readable file: soft tokens -> body reading the decoder's cache -> latents.

For each augmentation point p, `num_latents` trainable soft tokens run through the body, a
transformer of the decoder's architecture whose layer j attends to the frozen decoder's layer
K/V for x_0..x_p as its prefix (and, causally, to the point's own soft tokens). The body's last
hidden states at those positions, through a learned projection and rescaled to the decoder's
input-embedding scale, are the latents the decoder then reads as extra input embeddings.

Body variants (`CoprocessorConfig.body`):
  copy     a trainable copy of the decoder's weights (the paper's default)
  lora     LoRA adapters on a frozen copy (only the adapters are trained and saved)
  scratch  the same architecture, randomly initialised
  none     pause tokens: the soft tokens themselves are the latents, no body
`num_layers=k` keeps only k layers (a compact coprocessor); `layer_map` picks the decoder layers
whose cache they read. `rounds>1` re-runs the soft tokens attending to the previous round's
latents (iterative deliberation) before the decoder sees the result.

With `latent_gate` the coprocessor also owns one learned bias per decoder layer that the decoder
adds to its attention scores on latent keys (`attach_gate`): the decoder's weights stay frozen and
untouched, the bias only reweights how much of its attention goes to the latents. Started negative,
the latents start nearly invisible and the augmented decoder starts as the plain one.

    cop = Coprocessor(CoprocessorConfig(num_latents=16), decoder)
    latents = cop(cache, points)      # cache of x (B, T); points (B, P) -> (B, P, NL, d)

Saving and loading are in `checkpoint.py`.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn
from transformers import AutoModel

from . import families, fastpath, kv, masks
from .config import CoprocessorConfig

_LAYER_KEY = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def layer_ids(n_decoder: int, n_body: int, how: str) -> list[int]:
    """Decoder layers whose cache the body's layers read."""
    if n_body > n_decoder:
        raise ValueError(f"the body has {n_body} layers but the decoder only {n_decoder}")
    if how == "first" or n_body == n_decoder:
        return list(range(n_body))
    if n_body == 1:
        return [n_decoder - 1]
    return [round(j * (n_decoder - 1) / (n_body - 1)) for j in range(n_body)]


def attach_gate(decoder) -> None:
    """Let the decoder's forward take `latent_gate=(bias (L,), cols)`: attention layer l then adds
    bias[l] to its scores on the keys where cols is True (on top of the 4-D mask it is given);
    or `latent_gate=masks` (L, B, 1, n, K), finished masks with the gate in them: layer l attends
    with masks[l] (decoding, where they are built once per group). Also `key_positions`, which
    sliding-window layers need with explicit masks. A forward without them is untouched.
    Idempotent; the decoder's weights are not changed (`families.attach`)."""
    families.attach(decoder)


def embedding_rms(emb: nn.Module, chunk: int = 8192) -> torch.Tensor:
    """Mean RMS of the token embeddings as the decoder's input embedding module outputs them.
    Measured on the module's output, not its weight: Gemma's embedding module multiplies by
    sqrt(d) inside its forward (transformers 5.x), so the raw weight is sqrt(d) times too small
    there, and latents rescaled to it would enter far below the token scale. Chunked over the
    vocabulary so a 256k-word embedding never exists twice."""
    V = emb.weight.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, V, chunk):
        ids = torch.arange(s, min(s + chunk, V), device=emb.weight.device)
        total += emb(ids).float().pow(2).mean(-1).sqrt().sum().double().cpu()
    return (total / V).float()


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)), base frozen. Wraps nn.Linear and GPT-2's Conv1D."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        if isinstance(base, nn.Linear):
            d_in, d_out = base.in_features, base.out_features
        else:  # transformers' Conv1D keeps weight as (in, out)
            d_in, d_out = base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))  # zero: starts as the base layer
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def _inject_lora(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D":
            setattr(module, name, LoRALinear(child, rank, alpha))
        else:
            _inject_lora(child, rank, alpha)


def build_body(decoder, cfg: CoprocessorConfig) -> tuple[nn.Module | None, list[int]]:
    """The body module and the decoder layers it reads."""
    n_dec = decoder.config.num_hidden_layers
    n_body = cfg.num_layers or n_dec
    ids = layer_ids(n_dec, n_body, cfg.layer_map)
    if cfg.body == "none":
        return None, ids
    bcfg = copy.deepcopy(decoder.config)
    bcfg.num_hidden_layers = n_body
    if getattr(bcfg, "layer_types", None):
        bcfg.layer_types = [bcfg.layer_types[i] for i in ids]
    attn = getattr(decoder.config, "_attn_implementation", None) or "sdpa"
    torch.manual_seed(cfg.init_seed)
    body = AutoModel.from_config(bcfg, attn_implementation=attn)
    if cfg.body != "scratch":
        # body layer j <- decoder layer ids[j]; everything else (final norm, rotary, wpe) copied
        src = decoder.base_model.state_dict()
        inv = {i: j for j, i in enumerate(ids)}
        mapped = {}
        for k, v in src.items():
            m = _LAYER_KEY.search(k)
            if m:
                i = int(m.group(3))
                if i not in inv:
                    continue
                k = k[: m.start(3)] + str(inv[i]) + k[m.end(3):]
            mapped[k] = v.detach().clone()
        missing, unexpected = body.load_state_dict(mapped, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"copying decoder weights failed: missing={missing} unexpected={unexpected}")
    # The body never looks up token ids (its inputs are soft tokens), so its copy of the vocabulary
    # embedding is dead weight: replace it with a single frozen row.
    d = decoder.config.hidden_size
    body.set_input_embeddings(nn.Embedding(1, d))
    body.get_input_embeddings().requires_grad_(False)
    body.to(next(decoder.parameters()).dtype)
    if cfg.body == "lora":
        body.requires_grad_(False)
        _inject_lora(body, cfg.lora_rank, cfg.lora_alpha)
    return body, ids


class Coprocessor(nn.Module):
    """Soft tokens + body + latent projection. See the module docstring."""

    def __init__(self, cfg: CoprocessorConfig, decoder):
        super().__init__()
        families.require(decoder)        # one line naming what is missing, before any work
        self.config = cfg
        emb = decoder.get_input_embeddings()
        d = decoder.config.hidden_size
        self.hidden_size = d
        self.body, self.layer_ids = build_body(decoder, cfg)
        # Soft tokens start as random vocabulary embeddings: in-distribution inputs for the body.
        g = torch.Generator().manual_seed(cfg.init_seed)
        rows = torch.randint(0, emb.weight.shape[0], (cfg.num_latents,), generator=g)
        with torch.no_grad():
            init = emb(rows.to(emb.weight.device)).float().cpu()
            embed_rms = embedding_rms(emb)
        self.soft_tokens = nn.Parameter(init)                                 # (NL, d)
        # Latents must enter the decoder at the scale of its input embeddings: the body's last
        # hidden state is far larger, and a decoder fed it starts with a loss several times the
        # plain one. The projection starts as the identity.
        self.register_buffer("embed_rms", embed_rms.detach().cpu(), persistent=False)
        if cfg.body != "none":
            self.out_proj = nn.Linear(d, d)
            with torch.no_grad():
                self.out_proj.weight.copy_(torch.eye(d))
                self.out_proj.bias.zero_()
        else:
            self.out_proj = None
        self.latent_gain = nn.Parameter(torch.ones(()))
        if cfg.latent_gate:
            n_dec = decoder.config.num_hidden_layers
            self.gate_bias = nn.Parameter(torch.full((n_dec,), float(cfg.gate_init)))  # (L,)
        else:
            self.gate_bias = None
        # every group pass hands the decoder (and the body) explicit masks: the hooks apply the
        # gate and, on sliding-window layers, the window, whatever the family's layers pass on
        attach_gate(decoder)
        if self.body is not None:
            families.attach(self.body)
        dev = next(decoder.parameters()).device
        self.to(dev)

    @property
    def layout_kwargs(self) -> dict:
        c = self.config
        return dict(refeed_last=c.refeed_last, latent_pos=c.latent_pos, shift_ahead=c.shift_ahead,
                    hide_point=c.hide_point)

    def layout(self, n_ahead: int) -> masks.GroupLayout:
        return masks.GroupLayout(self.config.num_latents, n_ahead, **self.layout_kwargs)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor (LoRA: adapters only)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def _scale(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.latent_norm == "embed_rms":
            rms = h.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            h = (h.float() * (self.embed_rms / rms)).to(h.dtype)
        return h * self.latent_gain.to(h.dtype)

    def forward(self, cache, points: torch.Tensor, with_gate: bool = False):
        """Latents for each point. cache: the decoder's cache of x (B, T); points (B, P) -> (B, P, NL, d).

        With `with_gate`, (latents, gate): the latent gate's bias (L,) or None, as an output of this
        forward. Training reads the gate this way: under FSDP the parameter is whole only inside
        the coprocessor's forward, and an output's gradient is what brings its backward in."""
        latents = self._latents(cache, points)
        if not with_gate:
            return latents
        return latents, (None if self.gate_bias is None else self.gate_bias * 1.0)

    def _latents(self, cache, points: torch.Tensor) -> torch.Tensor:
        B, P = points.shape
        NL, d = self.config.num_latents, self.hidden_size
        dtype = self.soft_tokens.dtype
        soft = self.soft_tokens[None, None].expand(B, P, NL, d)
        if self.body is None:  # pause tokens
            return self._scale(soft)
        if isinstance(cache, fastpath.Prefix):  # the training fast path's plain K/V tensors
            return fastpath.coprocessor_latents(self, cache, points, soft)
        T = kv.length(cache)
        prefix = kv.select_layers(cache, self.layer_ids)
        layout = masks.GroupLayout(NL, 1, latent_pos=self.config.latent_pos)
        latents = None
        for r in range(self.config.rounds):
            if latents is None:
                x = soft                                                      # (B, P, NL, d)
                pos = masks.latent_positions(points, layout)                  # (B, P, NL)
            else:  # later rounds: [previous latents, soft tokens], causal within the point
                x = torch.cat([latents, soft], dim=2)                         # (B, P, 2NL, d)
                pos = masks.latent_positions(points, layout, n=2 * NL)
            G = x.shape[2]
            body_dtype = next(self.body.parameters()).dtype
            impl = getattr(self.body.config, "_attn_implementation", None)
            if families.has_window(self.body.config):
                impl = None          # sliding layers get their window added to a dense mask
            mask = masks.group_mask(T, points, G, body_dtype, impl)
            pos = pos.reshape(B, P * G)
            out = self.body(
                inputs_embeds=x.reshape(B, P * G, d).to(body_dtype),
                attention_mask=mask,
                position_ids=pos,
                key_positions=masks.key_positions(T, pos),
                use_cache=True,
                **kv.cache_kwargs(kv.fork(prefix)),
            )
            h = out.last_hidden_state.view(B, P, G, d)[:, :, -NL:]           # (B, P, NL, d)
            latents = self._scale(self.out_proj(h.to(dtype)))
        return latents
