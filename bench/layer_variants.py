"""One decoder layer of the fast path, forward + backward, in several formulations, timed side by
side: which way of writing the projections is fastest once compiled.

    python bench/layer_variants.py --out results/runs/layer_variants.json        # GPU
    python bench/layer_variants.py --tiny --iters 1 --out /tmp/lv.json            # CPU smoke test

The layer is SmolLM2-135M's (random weights) at the reference shape of
bench/train_throughput.py (T=512, 16 points, 16 latents, 16 ahead tokens, batch 128) in each of
the fast path's three passes: the prefill (frozen bf16 weights, causal SDPA, forward only), the
group pass (frozen bf16 weights, 32 rows per point, input gradient only) and the coprocessor pass
(fp32 weights under bf16 autocast, 16 rows per point, weight gradients too); the last two through
FlexAttention with the group BlockMask as `fastpath.group_block` runs it. Variants:

  separate         q, k, v and gate, up as five matmuls (the fast path before 8c1d952)
  rope-bqhd        separate, with the rotary embedding applied before the
                   (B, Q, H, hd) -> (B, H, Q, hd) transpose
  kv               k and v as one matmul (N = 2 x 192 instead of two of 192): `fastpath._qkv` now
  kv-bqhd          the same, rotary embedding before the transpose
  qkv              q, k and v as one matmul; rotary embedding on the q and k heads together
  qkv-bqhd         the same, rotary embedding before the transpose
  gateup           gate and up as one matmul
  kv+gateup        both
  qkv-bqhd+gateup  both

A variant name may end in `@tuned` (inductor's max-autotune for that variant's compile only: its
matmuls choose between cuBLAS and Triton templates with the neighbouring elementwise work fused
into their prologues and epilogues) or `@tma` (the same with Hopper's persistent TMA templates
among the choices).

Timed steps are interleaved (one step of every variant per round, the order rotated), and the
median per variant reported, in ms, with its minimum. Measured: results/train_throughput.md
("k and v as one matmul", "Inductor's max-autotune on the layer").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheaug_core import fastpath, masks  # noqa: E402
from cacheaug_core.fastpath import _merge_heads, _rms, _rope  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import smollm2_config  # noqa: E402


def _bias(*mods):
    bs = [m.bias for m in mods]
    return None if bs[0] is None else torch.cat(bs)


def qkv_separate(layer, h, cos, sin):
    a = layer.self_attn
    B, Q, _ = h.shape
    q, k, v = (p(h).view(B, Q, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _rope_bqhd(x, cos, sin):
    """Rotary embedding on x (B, Q, H, hd), cos/sin given as (B, 1, Q, hd) -> (B, H, Q, hd)."""
    return _rope(x, cos.transpose(1, 2), sin.transpose(1, 2)).transpose(1, 2)


def qkv_rope_bqhd(layer, h, cos, sin):
    a = layer.self_attn
    B, Q, _ = h.shape
    q, k, v = (p(h).view(B, Q, -1, a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))
    return _rope_bqhd(q, cos, sin), _rope_bqhd(k, cos, sin), v.transpose(1, 2)


def qkv_kv_bqhd(layer, h, cos, sin):
    a = layer.self_attn
    B, Q, _ = h.shape
    q = a.q_proj(h).view(B, Q, -1, a.head_dim)
    kv = F.linear(h, torch.cat([a.k_proj.weight, a.v_proj.weight]), _bias(a.k_proj, a.v_proj))
    kv = kv.view(B, Q, -1, a.head_dim)                                # (B, Q, 2 H_kv, hd)
    hk = kv.shape[2] // 2
    return _rope_bqhd(q, cos, sin), _rope_bqhd(kv[:, :, :hk], cos, sin), kv[:, :, hk:].transpose(1, 2)


def qkv_kv(layer, h, cos, sin):
    a = layer.self_attn
    B, Q, _ = h.shape
    hd = a.head_dim
    q = a.q_proj(h).view(B, Q, -1, hd).transpose(1, 2)
    kv = F.linear(h, torch.cat([a.k_proj.weight, a.v_proj.weight]), _bias(a.k_proj, a.v_proj))
    kv = kv.view(B, Q, -1, hd)                                        # (B, Q, 2 H_kv, hd)
    hk = kv.shape[2] // 2
    k, v = kv[:, :, :hk].transpose(1, 2), kv[:, :, hk:].transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _qkv_fused(layer, h):
    a = layer.self_attn
    B, Q, _ = h.shape
    w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    qkv = F.linear(h, w, _bias(a.q_proj, a.k_proj, a.v_proj)).view(B, Q, -1, a.head_dim)
    H = a.q_proj.weight.shape[0] // a.head_dim
    hk = a.k_proj.weight.shape[0] // a.head_dim
    return qkv, H, hk


def qkv_fused(layer, h, cos, sin):
    qkv, H, hk = _qkv_fused(layer, h)
    qk = _rope(qkv[:, :, :H + hk].transpose(1, 2), cos, sin)          # (B, H + H_kv, Q, hd)
    return qk[:, :H], qk[:, H:], qkv[:, :, H + hk:].transpose(1, 2)


def qkv_fused_bqhd(layer, h, cos, sin):
    qkv, H, hk = _qkv_fused(layer, h)
    c, s = cos.transpose(1, 2), sin.transpose(1, 2)                   # (B, Q, 1, hd)
    qk = _rope(qkv[:, :, :H + hk], c, s)                               # (B, Q, H + H_kv, hd)
    return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + hk:].transpose(1, 2)


def mlp_separate(m, h):
    return m.down_proj(m.act_fn(m.gate_proj(h)) * m.up_proj(h))


def mlp_gateup(m, h):
    gu = F.linear(h, torch.cat([m.gate_proj.weight, m.up_proj.weight]))
    g, u = gu.chunk(2, dim=-1)
    return m.down_proj(F.silu(g) * u)


VARIANTS = {
    "separate": (qkv_separate, mlp_separate),
    "rope-bqhd": (qkv_rope_bqhd, mlp_separate),
    "kv": (qkv_kv, mlp_separate),
    "kv-bqhd": (qkv_kv_bqhd, mlp_separate),
    "qkv": (qkv_fused, mlp_separate),
    "qkv-bqhd": (qkv_fused_bqhd, mlp_separate),
    "gateup": (qkv_separate, mlp_gateup),
    "kv+gateup": (qkv_kv, mlp_gateup),
    "qkv-bqhd+gateup": (qkv_fused_bqhd, mlp_gateup),
}


TUNING = {
    "": None,
    "tuned": {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "tma": {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON",
            "triton.enable_persistent_tma_matmul": True},
}


def make_block(qkv_fn, mlp_fn):
    """`fastpath.group_block` with the projections written by qkv_fn and mlp_fn."""
    from torch.nn.attention.flex_attention import flex_attention

    def block(layer, x, cos, sin, k_past, v_past, mask, attn_dtype, kernel_options):
        h = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q, k, v = qkv_fn(layer, h, cos, sin)
        if mask is not None:
            K = torch.cat([k_past.to(attn_dtype), k.to(attn_dtype)], dim=2)
            V = torch.cat([v_past.to(attn_dtype), v.to(attn_dtype)], dim=2)
        if mask is None:   # the prefill: causal over its own rows
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                               scale=layer.self_attn.scaling, enable_gqa=True)
        elif isinstance(mask, torch.Tensor):
            o = F.scaled_dot_product_attention(q.to(attn_dtype), K, V, attn_mask=mask.to(attn_dtype),
                                               scale=layer.self_attn.scaling, enable_gqa=True)
        else:
            o = flex_attention(q.to(attn_dtype), K, V, block_mask=mask, scale=layer.self_attn.scaling,
                               enable_gqa=True, kernel_options=kernel_options)
        x = x + layer.self_attn.o_proj(_merge_heads(o))
        n = layer.post_attention_layernorm
        return x + mlp_fn(layer.mlp, _rms(x, n.weight, n.variance_epsilon))
    return block


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/runs/layer_variants.json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="tiny layer on CPU (smoke test)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = smollm2_config(args.tiny)
    cfg.num_hidden_layers = 1
    T, P, NL, A, B = (64, 4, 4, 4, 2) if args.tiny else (512, 16, 16, 16, args.batch)
    torch.manual_seed(0)
    dec = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    dec = dec.to(dev).requires_grad_(False)
    cop_layer = AutoModelForCausalLM.from_config(cfg).to(dev).model.layers[0].float()   # trainable, fp32
    attention = "flex" if dev.type == "cuda" else "dense"
    pts = masks.sample_points(T, P, B, torch.Generator().manual_seed(0)).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    prefix = fastpath.prefill(dec, ids, attention)
    base = dec.model
    passes = {}   # name: (layer, x, cos, sin, mask or None (causal prefill), backward?)
    for name, rows, layer, dtype in (("group", 32, base.layers[0], torch.bfloat16),
                                     ("coprocessor", NL, cop_layer, torch.float32)):
        mask = fastpath._group_mask(T, pts, rows, False, prefix)
        x = torch.randn(B, P * rows, cfg.hidden_size, device=dev, dtype=dtype if dev.type == "cuda" else torch.float32)
        pos = (pts[:, :, None] + 1 + torch.arange(rows, device=dev)).reshape(B, -1)
        cos, sin = base.rotary_emb(x, pos)
        passes[name] = (layer, x.requires_grad_(), cos[:, None], sin[:, None], mask, True)
    x = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(x, torch.arange(T, device=dev)[None].expand(B, T))
    passes["prefill"] = (base.layers[0], x, cos[:, None], sin[:, None], None, False)
    names = args.variants.split(",")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    fns = {}
    for v in names:
        base_name, _, tuning = v.partition("@")
        fn = make_block(*VARIANTS[base_name])
        options = TUNING[tuning]
        fns[v] = torch.compile(fn, dynamic=False, options=options) if dev.type == "cuda" else fn
    attn_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def run(v, pass_name):
        layer, x, cos, sin, mask, backward = passes[pass_name]
        with torch.set_grad_enabled(backward), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                                enabled=dev.type == "cuda"):
            y = fns[v](layer, x, cos, sin, prefix.k[0], prefix.v[0], mask, attn_dtype, prefix.kernel_options)
        if backward:
            y.float().sum().backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)
        return y.detach().float()

    def timed(v, pass_name):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(v, pass_name)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "command": " ".join(["python"] + sys.argv), "batch": B, "T": T, "points": P, "passes": {}}
    for pass_name in ("prefill", "group", "coprocessor"):
        times = {v: [] for v in names}
        errs, ref = {}, None
        for v in names:   # compile and warm up; the outputs agree (the same function written differently)
            for _ in range(2):
                y = run(v, pass_name)
            ref = y if ref is None else ref
            errs[v] = float((y - ref).norm() / ref.norm())
        for r in range(args.iters):
            for v in names[r % len(names):] + names[:r % len(names)]:
                times[v].append(timed(v, pass_name))
        out["passes"][pass_name] = {v: {"median_ms": sorted(t)[len(t) // 2], "min_ms": min(t),
                                        "rel_diff_vs_first": errs[v]} for v, t in times.items()}
        print(pass_name, json.dumps(out["passes"][pass_name], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
