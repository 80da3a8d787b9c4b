"""The training fast path: the one-pass multi-point loss written out as plain functions over the
weights of a Llama-family decoder (Llama, Qwen2), with block-sparse attention and a fused
cross-entropy. Same losses and gradients as the dense path of `augment.multi_point_loss`.

    loss = fastpath.multi_point_loss(decoder, coprocessor, ids, points, n_ahead)   # ids (B, T), points (B, P)
    loss.backward()
    fastpath.enable_compile()        # GPU: compile the block functions (once, shared by all layers)

    cacheaug train ... --fast                                 # the trainer's switch (compiled on GPU)

Why a second implementation of the same forward: at SmolLM2's width (d=576) the dense path spends
most of a step outside its matmuls. Its group mask is a dense float tensor, so every group query
is scored against every group of the batch row (~4x the useful attention work) by a kernel that
also reads the mask; the transformers layers read their KV cache through cache objects whose
per-layer state makes `torch.compile` trace each layer separately; and the cross-entropy
materialises full-precision logits for every predicted position. Here:

- the decoder's prefill returns plain per-layer K/V tensors (B, H_kv, T, hd), computed with the
  causal flash kernel; the last layer stops after its K/V projection (nothing reads its output);
- the coprocessor pass and the group pass attend with FlexAttention and the group `BlockMask`
  (`masks.group_block_mask`; 64 x 64 blocks on Hopper: `BLOCK`): key blocks that no query of a
  block may see are skipped. The coprocessor's latent gate (a learned bias on latent keys) is a
  FlexAttention `score_mod`;
- the prefix K/V come from the frozen decoder and need no gradient: the BlockMask lists no query
  blocks for the prefix key blocks in its key-major half, which only the key/value-gradient part
  of FlexAttention's backward reads, so the backward skips that work (most of it; `_group_mask`);
- FlexAttention's kernels run with the configuration its autotuning picked on an H100
  (`TUNED_KERNEL_OPTIONS`, Hopper with head dim 64; its defaults and 128 x 128 blocks elsewhere);
- k and v are projected by one matmul (each is 192 wide at SmolLM2's size);
- an appended pass's last layer makes only the rows read after it (the group rows that predict
  ahead tokens, the coprocessor's last NL rows); the others serve as keys and values only
  (`Prefix.trim_last`: 0.6% of the step's FLOPs, within the step's noise on an H100);
- one block function serves every layer of every model (the layer's modules are arguments), so
  `torch.compile` traces it once per pass kind and fuses the norms, rotary embeddings and
  activations around the matmuls and the attention kernel;
- on a Hopper GPU with quack-kernels installed, the frozen decoder's MLPs run through quack's
  GEMMs with the SwiGLU in their epilogues (`resolve_mlp`; the coprocessor keeps the compiled MLP);
- the LM head and cross-entropy run chunk by chunk in one autograd function that computes the
  input gradient during the forward (the loss is the last node, so its incoming gradient is a
  scalar): each chunk's logits exist once, and nothing is recomputed;
- groups are padded at their end to a length that tiles the attention blocks (31 -> 32 rows: four
  groups per 64-row block, their own keys in one key block); groups are causal, so no real row
  sees a padding row;
- no host synchronisation in the step: invalid ahead tokens (past the end of the text) are
  weighted out instead of selected out.

On CPU, where FlexAttention has no backward, the same functions attend through SDPA with the dense
group mask (what the tests compare). Throughput on one H100: results/train_throughput.md.

The same blocks also score without gradients: `score_every` is mode (b) of the app and of
`eval ppl` on CPU (latents after every token, n-th token ahead), with each point's group in its
own batch row attending to its own prefix and rows only (`PointMask`) and the LM head's NLL taken
by vocabulary slices (`head_nll`); `augment.score_after_every_token` dispatches to it.

    nll_aug, nll_base = fastpath.score_every(decoder, coprocessor, ids, positions=16)   # ids (1, T)

Supported: decoders whose layers are Llama-style (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
RMSNorm, rotary embeddings, full attention: Llama, Qwen2, Mistral without a window; Qwen3's per-head
q/k norms; OLMo-2's whole-projection q/k norms and post-norm blocks) or GPT-2's (`ln_1`, `attn.c_attn`/`c_proj`, `ln_2`,
`mlp`; learned position embeddings), coprocessor bodies copy/scratch/lora/none, any number of
rounds. `unsupported(decoder, coprocessor)` says why a pair is not; the trainer then refuses
`--fast`. The Llama-style blocks are the measured ones (results/train_throughput.md).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import families, masks
from .config import MLP_KERNELS

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "olmo2", "gpt2")
ATTENTION = ("auto", "flex", "dense", "points")   # auto: FlexAttention on CUDA, dense masks elsewhere

# FlexAttention's kernel configuration for the coprocessor and group passes with head dim 64 on a
# Hopper GPU: what inductor's autotuning picked for all four kernels (both passes, forward and
# backward) on an H100 at the reference shape (bench/train_throughput.py --autotune flex), 4%
# faster per step there than the defaults (64x128 backward tiles with 8 warps, 128x128 forward).
# Smaller BlockMask blocks get these tiles cut to fit (`fit_kernel_options`). kernel_options="auto"
# uses it on Hopper with head dim 64, with `BLOCK`. (From 4dc8002 to 4716861 prefixes past 1024
# tokens kept FlexAttention's defaults and 128 x 128 blocks, after one run at the paper's shape
# with batch 4 measured the tuned tiles 11% slower; steps of batch 4 there turned out to spread
# by +-25%. At batch 16, where the steps are steady, 64 x 64 blocks with these tiles took 277 ms
# against 307 ms for the defaults: results/train_throughput.md.)
TUNED_KERNEL_OPTIONS = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
    "bwd_num_warps": 4, "bwd_num_stages": 3,
}

# The BlockMask's block size (queries and keys). A 128-row block holds 4 groups (8 points' soft
# tokens in the coprocessor pass) and reads keys up to its last point's prefix; 64 x 64 blocks
# cut the attention work read per useful score from 1.73x to 1.33x (group pass) and from 1.97x
# to 1.48x (coprocessor pass) at the reference shape, and the step at batch 128 on an H100 from
# 272 to 254 ms (steps interleaved in one process; 270 -> 259 and 274 -> 257 in two other runs;
# 32 x 64 was slower again: 284 ms; results/train_throughput.md).
BLOCK = 64


def _blocks(block: int | tuple[int, int]) -> tuple[int, int]:
    """The BlockMask's (query block, key block) sizes from one size or a pair."""
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def fit_kernel_options(options: dict, block: int | tuple[int, int]) -> dict:
    """`options` with every kernel tile no larger than the BlockMask block it walks: query tiles
    (fwd_BLOCK_M, bwd_BLOCK_M1, bwd_BLOCK_M2) within the query block, key tiles (fwd_BLOCK_N,
    bwd_BLOCK_N1, bwd_BLOCK_N2) within the key block, keeping the backward kernel's constraints
    (BLOCK_N1 a multiple of BLOCK_M1, BLOCK_M2 a multiple of BLOCK_N2)."""
    qb, kb = _blocks(block)
    out = dict(options)
    for key, cap in (("fwd_BLOCK_M", qb), ("bwd_BLOCK_M1", qb), ("bwd_BLOCK_M2", qb),
                     ("fwd_BLOCK_N", kb), ("bwd_BLOCK_N1", kb), ("bwd_BLOCK_N2", kb)):
        if key in out:
            out[key] = min(out[key], cap)
    if "bwd_BLOCK_M1" in out and "bwd_BLOCK_N1" in out:
        out["bwd_BLOCK_M1"] = min(out["bwd_BLOCK_M1"], out["bwd_BLOCK_N1"])
    if "bwd_BLOCK_M2" in out and "bwd_BLOCK_N2" in out:
        out["bwd_BLOCK_N2"] = min(out["bwd_BLOCK_N2"], out["bwd_BLOCK_M2"])
    return out


def _tuned_applies(device: torch.device, head_dim: int) -> bool:
    """Where `TUNED_KERNEL_OPTIONS` and `BLOCK` were measured to help: Hopper, head dim 64."""
    return (device.type == "cuda" and head_dim == 64
            and torch.cuda.get_device_capability(device) == (9, 0))


def _auto_block(device: torch.device, head_dim: int) -> int:
    """`BLOCK` where the tuned kernels apply (where it was measured), else FlexAttention's 128."""
    return BLOCK if _tuned_applies(device, head_dim) else 128


def _auto_kernel_options(device: torch.device, head_dim: int, block: int | tuple[int, int]) -> dict | None:
    """The tuned tiles (cut to fit the blocks) where they apply; on a GPU, blocks under 128 take
    them anywhere (FlexAttention's own default tiles may be 128 wide and not fit); else None."""
    small = min(_blocks(block)) < 128
    if device.type == "cuda" and (_tuned_applies(device, head_dim) or small):
        return fit_kernel_options(TUNED_KERNEL_OPTIONS, block)
    return None


_SMALL_BLOCK_CARRIER = (32, 32, 32, 32)   # backward tiles (M1, N1, M2, N2) that divide blocks of 32 and up


def _allow_small_blocks() -> None:
    """Let FlexAttention's backward compile for BlockMasks with blocks under 128 on Hopper.

    Inductor's lowering (torch 2.11-2.13) first keeps those configurations of its built-in list
    whose tiles divide the BlockMask's blocks, and only then lays `kernel_options` over them. On
    Hopper with head dim 64 the list holds a single configuration with 128-wide tiles, so a
    BlockMask of 64-row or 64-key blocks keeps none and fails (NoValidChoicesError) even when
    `kernel_options` name tiles that divide its blocks. This appends one configuration with
    32-wide tiles to the list: the filter keeps it, and explicit tile options replace its tiles.
    Installed once, only when such a BlockMask is built on a GPU."""
    import dataclasses

    from torch._inductor import choices

    cls = choices.InductorChoices
    if getattr(cls.get_flex_attention_bwd_configs, "_with_small_blocks", False):
        return
    orig = cls.get_flex_attention_bwd_configs

    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
        configs = list(orig(self, head_dim, dtype, device_type))
        if configs and dataclasses.is_dataclass(configs[0]):
            m1, n1, m2, n2 = _SMALL_BLOCK_CARRIER
            extra = dataclasses.replace(configs[0], block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2)
            if extra not in configs:
                configs.append(extra)
        return configs

    get_flex_attention_bwd_configs._with_small_blocks = True
    cls.get_flex_attention_bwd_configs = get_flex_attention_bwd_configs


FLEX_MIN_HEAD_DIM = 16   # FlexAttention's kernels take head dims of 16 and up


def unsupported(decoder, coprocessor=None, device: torch.device | str | None = None,
                training: bool = False) -> str | None:
    """Why this decoder (and coprocessor) cannot take the fast path, or None if it can. On a GPU
    (`device`), where the fast path attends with FlexAttention, the head dim must be 16 or more.
    Every coprocessor body and number of rounds is covered; for `training`, a GPT-2 body must have
    no attention dropout (the fast path's attention kernels have none; its other dropouts are
    applied as transformers applies them)."""
    cfg = decoder.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"the fast path covers {', '.join(SUPPORTED_MODEL_TYPES)} decoders, not {cfg.model_type!r}"
    if families.has_window(cfg):
        return f"the fast path covers full-attention layers only ({cfg.model_type} here has sliding-window layers)"
    if cfg.model_type != "gpt2" and getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"the fast path covers SiLU MLPs, not {cfg.hidden_act!r}"
    if getattr(cfg, "add_cross_attention", False):
        return "the fast path covers decoders without cross-attention"
    body = getattr(getattr(coprocessor, "module", coprocessor), "body", None)
    if training and body is not None and getattr(body.config, "attn_pdrop", 0.0) > 0:
        return (f"the fast path has no attention dropout; this coprocessor body's attn_pdrop is "
                f"{body.config.attn_pdrop}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if device is not None and torch.device(device).type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        return (f"on a GPU the fast path attends with FlexAttention, which needs a head dim of at least "
                f"{FLEX_MIN_HEAD_DIM}; this decoder's is {head_dim}")
    return None


# ---------------------------------------------------------------------------------------------
# The pieces of a Llama block, written as transformers writes them (same dtypes, same order of
# operations), so that both paths agree to rounding.


# The frozen decoder's MLP with the SwiGLU inside its GEMMs (quack's CuTe DSL kernels, an optional
# GPU dependency: `pip install quack-kernels`). cuBLAS writes g = h Wg^T and u = h Wu^T and an
# elementwise kernel reads them back to write silu(g) * u, and the backward does the same around
# the down projection's input gradient: ~30 ms of a ~243 ms step at the reference shape on an
# H100. quack's `gemm_gated` applies the SwiGLU in the gate/up GEMM's epilogue and `gemm_dgated`
# its backward in the epilogue of the down projection's input-gradient GEMM. One MLP, bench/quack_mlp.py
# on an H100: 0.84 -> 0.54 ms over the prefill's 65,536 rows (forward), 1.77 -> 1.35 ms over the
# group pass's (forward + input gradient); with weight gradients (the coprocessor) it was slower
# (1.44 -> 1.63 ms; in the whole step 227.5 -> 252.3 ms), so the trained coprocessor keeps the
# compiled MLP. MLP = "auto" uses quack for the frozen decoder on Hopper, in bf16, when it is
# installed. The whole step replayed as a CUDA graph at batch 128: 250.2 ms with the compiled MLP,
# 231.2 ms with quack's in the same run, 227.5 ms once the down GEMM also adds the residual
# (another run; results/train_throughput.md). "quack-all" runs a trained coprocessor's MLP through
# the same fused GEMMs too (`_TrainedSwiGLU`: its weight gradients by cuBLAS over the contiguous
# interleaved gate/up gradient): as fast, lighter (222.8 against 223.7 ms and 2.8 GiB less at
# batch 128; 333.1 against 332.9 ms and 4.6 GiB less at 192), so an option, not the default. The
# choices (`config.MLP_KERNELS`) are also the trainer's --mlp.


def _fusable_mlp(layer) -> bool:
    """A Llama-style MLP of plain bias-free linears with a SiLU gate, at quack's alignment."""
    m = getattr(layer, "mlp", None)
    if hasattr(layer, "post_feedforward_layernorm"):     # OLMo-2 norms the MLP's output: no fused epilogue
        return False
    lins = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(x) is torch.nn.Linear and x.bias is None for x in lins):
        return False
    act = type(getattr(m, "act_fn", None)).__name__
    return act in ("SiLU", "SiLUActivation") and all(x.in_features % 16 == 0 and x.out_features % 16 == 0 for x in lins)


def _quack_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("quack") is not None


def _quack_problem(versions: dict | None = None, where: str | None = None) -> str | None:
    """Why an installed quack would fail at its first GEMM, from the two failures seen on an H100
    (results/train_throughput.md), or None. versions: {package: version} (default: installed);
    where: the cutlass DSL's module file (default: where `cutlass` imports from)."""
    if versions is None:
        import importlib.metadata as md

        versions = {}
        for pkg in ("quack-kernels", "nvidia-cutlass-dsl"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
    if where is None:
        import importlib.util

        try:
            spec = importlib.util.find_spec("cutlass")
        except (ImportError, ValueError):
            spec = None
        where = spec.origin if spec is not None and spec.origin else ""
    q, c = versions.get("quack-kernels") or "", versions.get("nvidia-cutlass-dsl") or ""
    if q.startswith("0.6.") and tuple(int(x) for x in c.split(".")[:2] if x.isdigit()) >= (4, 8):
        return (f"quack-kernels {q} fails with nvidia-cutlass-dsl {c} (it cannot fingerprint 4.8's "
                "epilogue helpers); install nvidia-cutlass-dsl==4.7.1")
    if where and not any(f"{os.sep}{d}{os.sep}" in where for d in ("site-packages", "dist-packages")):
        return (f"the cutlass DSL is installed outside a site-packages folder ({where}): quack then "
                "fingerprints cutlass's own code and fails; install it into a folder named site-packages")
    return None


def resolve_mlp(mlp: str, device: torch.device, layer, dtype: torch.dtype = torch.bfloat16) -> str:
    """"auto" -> "quack" on a Hopper GPU with quack installed, a fusable MLP and bf16 compute
    (where it was measured), else "compiled"; an installed quack that is known to fail
    (`_quack_problem`) is passed over with a warning. An explicit "quack" or "quack-all" (the
    coprocessor's trained MLP too) that cannot run is an error. dtype: what the MLP's matmuls
    compute in (the autocast dtype, else the weights')."""
    if mlp not in MLP_KERNELS:
        raise ValueError(f"mlp must be one of {MLP_KERNELS}, not {mlp!r}")
    ok = device.type == "cuda" and _fusable_mlp(layer) and _quack_available()
    if mlp == "compiled" or (mlp == "auto" and not (ok and dtype == torch.bfloat16)):
        return "compiled"
    if not ok:
        raise ValueError(f"mlp={mlp!r} needs a CUDA GPU, the quack-kernels package and a Llama-style "
                         "SiLU MLP of bias-free linears")
    if dtype != torch.bfloat16:
        raise ValueError(f"mlp={mlp!r} runs in bf16 (bf16 weights or bf16 autocast), not {dtype}")
    if mlp == "auto" and torch.cuda.get_device_capability(device) != (9, 0):
        return "compiled"
    why = _quack_problem()
    if why is None:
        return "quack" if mlp == "auto" else mlp
    if mlp != "auto":
        raise ValueError(f"mlp={mlp!r}: {why}")
    warnings.warn(f"the fast path keeps the compiled MLP: {why}", stacklevel=2)
    return "compiled"


_GATE_UP: dict = {}


def _gate_up(m) -> torch.Tensor:
    """gate_proj and up_proj stacked (2 * hidden, d), made once per frozen weight version."""
    g, u = m.gate_proj.weight, m.up_proj.weight
    key = (g.data_ptr(), g._version, u.data_ptr(), u._version)
    hit = _GATE_UP.get(id(m))
    if hit is None or hit[0] != key:
        hit = _GATE_UP[id(m)] = (key, torch.cat([g, u]).detach())
    return hit[1]


class _FrozenSwiGLU(torch.autograd.Function):
    """x + down(silu(gate(h)) * up(h)) for frozen weights, in three quack GEMMs: the gate/up GEMM
    writes silu(g) * u from its epilogue (and g, u interleaved for the backward), the down GEMM
    adds the residual x in its epilogue, and the backward's down-projection GEMM applies the
    SwiGLU's derivative in its epilogue. h, x (N, d); w1 (2 * hidden, d) gate then up; w2 (d, hidden)."""

    @staticmethod
    def forward(ctx, h, x, w1, w2):
        from quack.gemm_interface import gemm_add, gemm_gated

        grad = h.requires_grad
        preact, postact = gemm_gated(h, w1.T, activation="swiglu", store_preact=grad,
                                     concat_layout=("B",))                  # (N, 2 hidden), (N, hidden)
        out = gemm_add(postact, w2.T, x)                                    # (N, d)
        ctx.save_for_backward(preact, w1, w2)
        return out

    @staticmethod
    def backward(ctx, dout):
        from quack.gemm_interface import gemm, gemm_dgated

        preact, w1, w2 = ctx.saved_tensors
        dout = dout.contiguous()
        dh = None
        if ctx.needs_input_grad[0]:
            dpreact, _ = gemm_dgated(dout, w2, preact, activation="swiglu")  # (N, 2 hidden), interleaved
            dh = gemm(dpreact, w1, dynamic_scheduler=True, concat_layout=("B",))
        return dh, dout, None, None


class _TrainedSwiGLU(torch.autograd.Function):
    """`_FrozenSwiGLU` for weights that take gradients (a coprocessor's MLP, with "quack-all"):
    the same fused forward and input gradient, and the weight gradients as cuBLAS matmuls over
    the contiguous interleaved gate/up gradient (whose (2 * hidden, d) result is de-interleaved:
    a small copy) and over the SwiGLU output that the backward's fused GEMM writes again.
    h, x (N, d) in the compute dtype; wg, wu (hidden, d), wd (d, hidden) the parameters."""

    @staticmethod
    def forward(ctx, h, x, wg, wu, wd):
        from quack.gemm_interface import gemm_add, gemm_gated

        w1, w2 = torch.cat([wg, wu]).to(h.dtype), wd.to(h.dtype)                # (2 hidden, d), (d, hidden)
        preact, postact = gemm_gated(h, w1.T, activation="swiglu", store_preact=True,
                                     concat_layout=("B",))                  # (N, 2 hidden) interleaved, (N, hidden)
        out = gemm_add(postact, w2.T, x)                                    # (N, d)
        ctx.save_for_backward(h, preact, w1, w2)
        ctx.dtypes = (wg.dtype, wu.dtype, wd.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        from quack.gemm_interface import gemm, gemm_dgated

        h, preact, w1, w2 = ctx.saved_tensors
        dout = dout.contiguous()
        dpreact, postact = gemm_dgated(dout, w2, preact, activation="swiglu")   # (N, 2 hidden), (N, hidden)
        dh = gemm(dpreact, w1, dynamic_scheduler=True, concat_layout=("B",)) if ctx.needs_input_grad[0] else None
        dw1 = dpreact.T @ h                                                 # (2 hidden, d): gate, up rows interleaved
        dwd = dout.T @ postact                                              # (d, hidden)
        tg, tu, td = ctx.dtypes
        return dh, dout, dw1[0::2].to(tg), dw1[1::2].to(tu), dwd.to(td)


@torch.compiler.disable
def _quack_mlp(m, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + down(silu(gate(h)) * up(h)) through quack's fused GEMMs: `_FrozenSwiGLU` for frozen
    weights, `_TrainedSwiGLU` for weights that take gradients. h, x (B, Q, d). Outside
    torch.compile (a graph break): quack's ops compiled into inductor's graph ran slower."""
    dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    ws = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    with torch.autocast(h.device.type, enabled=False):
        h2, x2 = h.to(dt).flatten(0, -2), x.to(dt).flatten(0, -2)
        if any(w.requires_grad for w in ws):
            out = _TrainedSwiGLU.apply(h2, x2, *ws)
        else:
            out = _FrozenSwiGLU.apply(h2, x2, _gate_up(m).to(dt), ws[2].to(dt))
    return out.view(*x.shape[:-1], -1).to(x.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dt = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin                          # x (B, H, Q, hd); cos (B, 1, Q, hd)


def _qkv(layer, x: torch.Tensor, cos, sin, fuse_kv: bool = True, with_q: bool = True):
    """Pre-norm, projections, rotary. x (B, Q, d) -> q (B, H, Q, hd), k, v (B, H_kv, Q, hd);
    q is None without `with_q`.

    With `fuse_kv` k and v come out of one matmul over their stacked weights: at SmolLM2's width
    each is only 192 wide, and one 384-wide matmul (one for their input gradient too) took a
    coprocessor layer's forward + backward from 3.45 to 3.31 ms and a group-pass layer's from
    4.61 to 4.54 ms on an H100 at the reference shape (bench/layer_variants.py; q/k/v as one
    matmul, gate/up as one, or the rotary embedding before the transpose gained less or nothing).
    Projections that are not plain linear layers (LoRA-wrapped) stay two matmuls. GPT-2 layers
    (LayerNorm; q, k, v from one Conv1D; learned positions, so no rotary): cos, sin are None."""
    if hasattr(layer, "ln_1"):
        a = layer.attn
        B, Q, _ = x.shape
        q, k, v = a.c_attn(layer.ln_1(x)).split(a.split_size, dim=2)   # one Conv1D for all three
        q, k, v = (t.view(B, Q, -1, a.head_dim).transpose(1, 2) for t in (q, k, v))
        return (q if with_q else None), k, v
    a = layer.self_attn
    B, Q, _ = x.shape
    hd = a.head_dim
    ln = getattr(layer, "input_layernorm", None)          # OLMo-2 blocks have no pre-norm
    h = x if ln is None else _rms(x, ln.weight, ln.variance_epsilon)
    # q/k norms: Qwen3's per head (over hd, after the head split), OLMo-2's over the whole projection
    qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
    whole = qn is not None and qn.weight.shape[0] != hd

    def heads(t, norm):                                   # (B, Q, n*hd) -> (B, n, Q, hd)
        if norm is not None and whole:
            t = norm(t)
        t = t.view(B, Q, -1, hd)
        if norm is not None and not whole:
            t = norm(t)
        return t.transpose(1, 2)

    q = heads(a.q_proj(h), qn) if with_q else None
    if fuse_kv and isinstance(a.k_proj, torch.nn.Linear) and isinstance(a.v_proj, torch.nn.Linear):
        bias = None if a.k_proj.bias is None else torch.cat([a.k_proj.bias, a.v_proj.bias])
        kv = F.linear(h, torch.cat([a.k_proj.weight, a.v_proj.weight]), bias)   # (B, Q, 2 H_kv hd)
        n = kv.shape[-1] // 2
        k, v = heads(kv[..., :n], kn), heads(kv[..., n:], None)
    else:
        k, v = heads(a.k_proj(h), kn), heads(a.v_proj(h), None)
    return (_rope(q, cos, sin) if with_q else None), _rope(k, cos, sin), v


def _out_and_mlp(layer, x: torch.Tensor, o: torch.Tensor, mlp: str = "compiled"):
    """Attention output projection + residual, then the MLP + residual. o (B, Q, H*hd).
    mlp "compiled": plain ops (compiled with the block) -> the layer's output. mlp "quack": the
    MLP is left to the caller -> (x, h), the residual stream and the MLP's normed input, for
    `_quack_mlp(layer.mlp, h, x)`. The caller makes that call itself: a graph break inside a
    nested function splits the compiled block in two at the call to the nested function, both
    halves then read the layer's input and the backward adds their two gradients of it in a
    kernel of its own (on an H100 at the reference shape, one bf16 add over 65k x 576 per
    group-pass layer: 2.2 ms a step)."""
    if hasattr(layer, "ln_2"):   # GPT-2, its dropouts as transformers applies them (none in eval mode)
        x = x + layer.attn.resid_dropout(layer.attn.c_proj(o))
        return x + layer.mlp(layer.ln_2(x))
    m = layer.mlp
    if hasattr(layer, "post_feedforward_layernorm"):   # OLMo-2: norms after attention and MLP
        x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(o))
        return x + layer.post_feedforward_layernorm(m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x)))
    x = x + layer.self_attn.o_proj(o)
    n = layer.post_attention_layernorm
    h = _rms(x, n.weight, n.variance_epsilon)
    if mlp == "quack":
        return x, h
    return x + m.down_proj(m.act_fn(m.gate_proj(h)) * m.up_proj(h))


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a decoder, its base model or a coprocessor body (`families.blocks`)."""
    return families.blocks(model)


def attention(block) -> torch.nn.Module:
    """A block's self-attention module (`families.attention`)."""
    return families.attention(block)


def _embedding(base):
    return base.embed_tokens if hasattr(base, "embed_tokens") else base.wte


def _with_positions(base, x: torch.Tensor, pos: torch.Tensor):
    """Rows x (B, Q, d) at positions pos (B, Q) -> (x, cos, sin). Rotary decoders: cos, sin
    (B, 1, Q, hd) for the blocks; GPT-2: its learned position embeddings added to x (and its
    embedding dropout, as transformers does), no rotary."""
    if hasattr(base, "rotary_emb"):
        cos, sin = base.rotary_emb(x, pos)                           # (B, Q, hd)
        return x, cos[:, None], sin[:, None]
    return base.drop(x + base.wpe(pos)), None, None


def _final_norm(base, x: torch.Tensor) -> torch.Tensor:
    if hasattr(base, "norm"):
        return _rms(x, base.norm.weight, base.norm.variance_epsilon)
    return base.ln_f(x)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, hd) -> (B, Q, H*hd)."""
    B, _, Q, _ = o.shape
    return o.transpose(1, 2).reshape(B, Q, -1)


def prefill_block(layer, x: torch.Tensor, cos, sin, last: bool, fuse_kv: bool = True, mlp: str = "compiled"):
    """One layer over the original tokens, causal. -> (x, k, v); with `last` only k, v are made
    (the group pass reads every layer's K/V, but nothing reads the last layer's output; compiled,
    inductor drops the unused work anyway, eager it is skipped here)."""
    q, k, v = _qkv(layer, x, cos, sin, fuse_kv, with_q=not last)
    if last:
        return x, k, v
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                       scale=attention(layer).scaling, enable_gqa=True)
    if mlp == "quack":
        x, h = _out_and_mlp(layer, x, _merge_heads(o), mlp)
        return _quack_mlp(layer.mlp, h, x), k, v          # here, not in the helper: see `_out_and_mlp`
    return _out_and_mlp(layer, x, _merge_heads(o), mlp), k, v


@dataclass
class PointMask:
    """Per-point attention, for scoring on CPU: the appended rows are laid out one point per batch
    row (B*P, G, d) and each point's rows attend to the first `keep` cached positions (copied per
    point) and to their own group only, through SDPA with `bias` (B*P, 1, G, keep + G). The dense
    mask scores every row of a pass against every group of the pass; here a group costs
    attention over its own prefix and its own rows, the same work as the BlockMask's."""
    bias: torch.Tensor
    keep: int
    repeats: int   # P: points per cached sequence

    def keys(self, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Each point's keys (or values): the kept prefix, then its own rows.
        past (B, H_kv, T, hd), new (B*P, H_kv, G, hd) -> (B*P, H_kv, keep + G, hd), written once."""
        BP, H, G, hd = new.shape
        out = new.new_empty(BP, H, self.keep + G, hd)
        out.view(-1, self.repeats, H, self.keep + G, hd)[:, :, :, :self.keep] = past[:, None, :, :self.keep]
        out[:, :, self.keep:] = new
        return out


def point_mask(T: int, points: torch.Tensor, group_len: int, hide_point: bool, dtype: torch.dtype) -> PointMask:
    """The group mask in per-point form. points (B, P) -> PointMask with bias (B*P, 1, G, keep + G):
    cached key t is seen by point p's rows iff t <= p (t < p with `hide_point`); own rows causally."""
    B, P = points.shape
    keep = min(T, int(points.max()) + 1)
    t = torch.arange(keep, device=points.device)
    to_orig = t[None, :] <= (points.reshape(-1) - int(hide_point))[:, None]        # (B*P, keep)
    own = torch.ones(B * P, group_len, dtype=torch.bool, device=points.device)
    allowed = masks.append_allowed(to_orig, own)                                   # (B*P, G, keep + G)
    return PointMask(masks.to_additive(allowed, dtype), keep, P)


def _gate_score_mod(gate_cols: torch.Tensor):
    """FlexAttention score_mod adding the latent gate's bias of each key (gate_cols (T + Q,))."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + gate_cols[kv_idx]
    return score_mod


def group_block(layer, x: torch.Tensor, cos, sin, k_past, v_past, mask, attn_dtype: torch.dtype,
                gate_cols=None, kernel_options=None, fuse_kv: bool = True, rows: tuple[int, int, int] | None = None,
                mlp: str = "compiled"):
    """One layer over appended rows (groups, or the coprocessor's soft tokens) that attend to the
    cached original tokens and to each other as `mask` allows.

    x (B, Q, d); k_past, v_past (B, H_kv, T, hd). `mask` is the group `BlockMask` (FlexAttention:
    key blocks nobody sees are skipped) or the same mask as a dense additive float tensor
    (B, 1, Q, T + Q) through SDPA (CPU, where FlexAttention has no backward), or a `PointMask`
    (x is then (B*P, G, d), one point per row). gate_cols (T + Q,)
    float: the latent gate's bias on each key (zero off the latents), or None. Attention runs in
    `attn_dtype` (under autocast SDPA would cast to the autocast dtype; FlexAttention is not on
    autocast's lists). kernel_options: FlexAttention's (block sizes, warps; None: its defaults).
    fuse_kv: k and v from one matmul (`_qkv`). rows (n, lo, hi): only rows lo..hi-1 of every run
    of n rows (a group) come out, (B, Q * (hi - lo) / n, d): in a pass's last layer the other rows
    are needed as keys and values only, so their attention output projection and MLP are skipped.
    mlp: how the MLP runs (`_out_and_mlp`).
    """
    q, k, v = _qkv(layer, x, cos, sin, fuse_kv)
    q = q.to(attn_dtype)
    if isinstance(mask, PointMask):
        K = mask.keys(k_past.to(attn_dtype), k.to(attn_dtype))        # (B*P, H_kv, keep + G, hd)
        V = mask.keys(v_past.to(attn_dtype), v.to(attn_dtype))
        mask = mask.bias
    else:
        K = torch.cat([k_past.to(attn_dtype), k.to(attn_dtype)], dim=2)   # (B, H_kv, T + Q, hd)
        V = torch.cat([v_past.to(attn_dtype), v.to(attn_dtype)], dim=2)
    scale = attention(layer).scaling
    if isinstance(mask, torch.Tensor):
        if gate_cols is not None:
            mask = mask + gate_cols.to(mask.dtype)
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask.to(attn_dtype), scale=scale, enable_gqa=True)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        score_mod = None if gate_cols is None else _gate_score_mod(gate_cols)
        o = flex_attention(q, K, V, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=True,
                           kernel_options=_main_kernel(kernel_options, q.device))
    o = _merge_heads(o)                                               # (B, Q, H*hd)
    if rows is not None:
        x, o = _keep_rows(x, *rows), _keep_rows(o, *rows)
    if mlp == "quack":
        x, h = _out_and_mlp(layer, x, o, mlp)
        return _quack_mlp(layer.mlp, h, x)                 # here, not in the helper: see `_out_and_mlp`
    return _out_and_mlp(layer, x, o, mlp)


def _keep_rows(x: torch.Tensor, n: int, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi-1 of every run of n rows. x (B, Q, d) -> (B, Q // n * (hi - lo), d)."""
    B, Q, d = x.shape
    return x.view(B, Q // n, n, d)[:, :, lo:hi].contiguous().view(B, -1, d)   # GPT-2's Conv1D views its input


def _main_kernel(options: dict | None, device: torch.device) -> dict | None:
    """FlexAttention's kernel options with its main (training) kernel forced on a GPU. Under 128
    query rows inductor would otherwise pick its decoding kernel (made for generation), whose
    configurations may fit none of these passes: on an H100 with torch 2.11 a group pass of 96
    rows (6 points of 16) failed to compile (NoValidChoicesError) while 64 and 128 rows compiled."""
    if device.type != "cuda":
        return options
    out = dict(options or {})
    if "BACKEND" not in out:
        out.setdefault("FORCE_USE_FLEX_ATTENTION", True)
    return out


_compiled: dict = {}


def enable_compile(on: bool = True) -> None:
    """torch.compile the block functions (GPU). Every layer of the decoder and the coprocessor
    goes through the same two functions with its modules as arguments, so each compiles once per
    kind of pass (prefill, coprocessor, group; forward and backward), not once per layer. The
    cross-entropy chunk compiles too (its softmax, one-hot and weighting fuse into one kernel).
    Without compilation FlexAttention runs an unfused reference implementation: correct, for
    tests on CPU, but slow and memory-hungry."""
    if not on:
        _compiled.clear()
        return
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _compiled["prefill"] = torch.compile(prefill_block, dynamic=False)
    _compiled["group"] = torch.compile(group_block, dynamic=False)
    _compiled["ce"] = torch.compile(_ce_chunk, dynamic=False)
    # the passes' final norm and the coprocessor's output projection and rescale too: left eager,
    # each ran as a handful of fp32 kernels over the kept rows, forward and backward
    _compiled["final"] = torch.compile(_final_norm, dynamic=False)
    _compiled["latent_out"] = torch.compile(_latent_out, dynamic=False)


def _block(kind: str):
    return _compiled.get(kind, prefill_block if kind == "prefill" else group_block)


# ---------------------------------------------------------------------------------------------
# The three passes.


@dataclass
class Prefix:
    """The decoder's cache of the original tokens as plain tensors, one (k, v) per decoder layer,
    each (B, H_kv, T, hd), rotary embeddings applied. What the coprocessor and the groups read."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    attention: str = "dense"  # how rows appended after it attend: "flex", "dense" or "points" (see `prefill`)
    block: int | tuple[int, int] = 128   # FlexAttention BlockMask block size: one for queries and keys, or a pair
    align: int = 32           # with FlexAttention, groups are padded to a multiple (or divisor) of this
    frozen: bool = True       # with FlexAttention, skip the key/value gradients of these K/V (see `_group_mask`)
    kernel_options: dict | None = None  # FlexAttention kernel options (None: its defaults; see `prefill`)
    fuse_kv: bool = True      # k and v projected by one matmul in every block (`_qkv`)
    trim_last: bool = True    # an appended pass's last layer makes only the rows read after it (`group_block`)
    mlp: str = "compiled"     # the MLPs: "compiled", "quack" (the frozen decoder's) or "quack-all" (`resolve_mlp`)

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


def _base(model):
    return getattr(model, "base_model", model)


@torch.no_grad()
def prefill(decoder, input_ids: torch.Tensor, attention: str = "auto", block: int | tuple[int, int] | str = "auto",
            align: int = 32, frozen: bool = True, kernel_options: dict | str | None = "auto",
            with_hidden: bool = False, fuse_kv: bool = True, trim_last: bool = True, mlp: str = "auto"):
    """The frozen decoder over input_ids (B, T): every layer's K/V. `attention` picks how the
    coprocessor's and the groups' rows will attend to it (tests pin it; see `_group_mask`);
    `block`, `frozen` and `kernel_options` how FlexAttention runs (see `Prefix`; "auto":
    `BLOCK` and `TUNED_KERNEL_OPTIONS` on a Hopper GPU with head dim 64, else 128 and
    FlexAttention's defaults; `fuse_kv`: see `_qkv`; `trim_last`: see `Prefix`; `mlp`: how the
    decoder's MLPs run, see `resolve_mlp`). -> Prefix; with `with_hidden`,
    (Prefix, last hidden state after the final norm (B, T, d)) for the plain decoder's own
    predictions (scoring), else no output rows are made at all."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    if attention == "auto":  # FlexAttention has no backward on CPU
        attention = "flex" if input_ids.device.type == "cuda" else "dense"
    base = _base(decoder)
    B, T = input_ids.shape
    x = _embedding(base)(input_ids)                                 # (B, T, d)
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    x, cos, sin = _with_positions(base, x, pos)
    ks, vs = [], []
    layers = blocks(base)
    n = len(layers)
    dev = input_ids.device.type
    mlp = resolve_mlp(mlp, input_ids.device, layers[0],       # the MLP computes in the autocast dtype, else x's
                      torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
    blk = _block("prefill")
    for i, layer in enumerate(layers):
        x, k, v = blk(layer, x, cos, sin, i == n - 1 and not with_hidden, fuse_kv,
                      "compiled" if mlp == "compiled" else "quack")
        ks.append(k)
        vs.append(v)
    hd = ks[0].shape[-1]
    if block == "auto":
        block = _auto_block(input_ids.device, hd) if attention == "flex" else 128
    if kernel_options == "auto":
        kernel_options = _auto_kernel_options(input_ids.device, hd, block) if attention == "flex" else None
    prefix = Prefix(ks, vs, attention, block, align, frozen, kernel_options, fuse_kv, trim_last, mlp)
    if with_hidden:
        return prefix, _final_norm(base, x)
    return prefix


def _group_mask(T: int, points: torch.Tensor, group_len: int, hide_point: bool, prefix: "Prefix"):
    """The group mask in the form `group_block` takes: a BlockMask ("flex"), a `PointMask`
    ("points") or a dense float mask.

    The prefix K/V come from the frozen decoder (no gradient), yet they are concatenated with the
    appended rows' own K/V, so FlexAttention's backward would compute key/value gradients for every
    prefix key block a query block reads: most of its work, thrown away. With `prefix.frozen` (and
    prefix tensors that indeed need no gradient) the BlockMask lists no query blocks for the prefix
    key blocks in its key-major half, which only that part of the backward reads
    (`masks.without_prefix_key_grads`): forward and query gradients are unchanged, the gradients
    of the appended rows' own keys and values too."""
    if prefix.attention == "flex":
        if points.device.type == "cuda" and min(_blocks(prefix.block)) < 128:
            _allow_small_blocks()
        bm = masks.group_block_mask(T, points, group_len, hide_point, block_size=_blocks(prefix.block))
        if prefix.frozen and not any(t.requires_grad for t in prefix.k + prefix.v):
            bm = masks.without_prefix_key_grads(bm, T)
        return bm
    if prefix.attention == "points":
        return point_mask(T, points, group_len, hide_point, torch.float32)
    return masks.dense_group_mask(T, points, group_len, torch.float32, hide_point)


def _aligned(group_len: int, align: int) -> int:
    """Group length padded up to a divisor or multiple of `align` (see `group_hidden`)."""
    if group_len >= align:
        return -(-group_len // align) * align
    n = 1
    while n < group_len:
        n *= 2
    return n


def _appended_pass(base, x: torch.Tensor, pos: torch.Tensor, prefix: Prefix, layer_ids, block_mask,
                   gate_cols=None, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Rows x (B, Q, d) at positions pos (B, Q) through `base`'s layers; layer j reads the prefix
    K/V of decoder layer layer_ids[j]. -> last hidden state after the final norm (B, Q, d); with
    rows (n, lo, hi) that of rows lo..hi-1 of every n only (`group_block`), (B, Q // n * (hi - lo), d)."""
    x, cos, sin = _with_positions(base, x, pos)
    dev = x.device.type
    attn_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    blk = _block("group")
    layers = blocks(base)
    # the fused MLP serves frozen layers (the decoder's); a trained body keeps the compiled one
    # unless "quack-all" asks for it too
    frozen = not any(p.requires_grad for p in layers[0].mlp.parameters())
    mlp = "quack" if prefix.mlp != "compiled" and _fusable_mlp(layers[0]) and (
        frozen or prefix.mlp == "quack-all") else "compiled"
    for j, layer in enumerate(layers):
        i = layer_ids[j]
        last = rows if j == len(layers) - 1 and prefix.trim_last else None
        x = blk(layer, x, cos, sin, prefix.k[i], prefix.v[i], block_mask, attn_dtype,
                None if gate_cols is None else gate_cols[j], prefix.kernel_options, prefix.fuse_kv, last, mlp)
    if rows is not None and not prefix.trim_last:
        x = _keep_rows(x, *rows)
    return _compiled.get("final", _final_norm)(base, x)


def _latent_out(core, h: torch.Tensor) -> torch.Tensor:
    """The coprocessor's last hidden states (B, P, NL, d) -> its latents: output projection, rescale."""
    return core._scale(core.out_proj(h.to(core.soft_tokens.dtype)))


def coprocessor_latents(core, prefix: Prefix, points: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The latents of a coprocessor with a body from a `Prefix`: what `Coprocessor.forward` does
    with a transformers cache, and calls this for. core: the Coprocessor; points (B, P); soft
    (B, P, NL, d) its soft tokens -> (B, P, NL, d). With `rounds` > 1 each later round reads
    [previous latents, soft tokens] (2 NL rows per point, causal within the point) and keeps the
    last NL rows' outputs, as the transformers path does."""
    B, P, NL, d = soft.shape
    T = prefix.length
    layout = masks.GroupLayout(NL, 1, latent_pos=core.config.latent_pos)
    body_dtype = next(core.body.parameters()).dtype
    latents = None
    for _ in range(core.config.rounds):
        x = soft if latents is None else torch.cat([latents, soft], dim=2)     # (B, P, G, d), G = NL or 2 NL
        G = x.shape[2]
        pos = masks.latent_positions(points, layout, n=G)                      # (B, P, G)
        bm = _group_mask(T, points, G, False, prefix)
        rows = (B * P, G) if prefix.attention == "points" else (B, P * G)      # one point per batch row
        h = _appended_pass(core.body, x.reshape(*rows, d).to(body_dtype), pos.reshape(rows), prefix,
                           core.layer_ids, bm, rows=(G, G - NL, G))
        h = h.view(B, P, NL, d)                                                 # the last NL rows' outputs
        latents = _compiled.get("latent_out", _latent_out)(core, h)
    return latents


def group_hidden(decoder, prefix: Prefix, points: torch.Tensor, latents: torch.Tensor, tokens: torch.Tensor,
                 layout: masks.GroupLayout, gate: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
    """Every point's group read against the prefix. latents (B, P, NL, d), tokens (B, P, n_tokens)
    -> normed hidden states of the rows that predict the ahead tokens (B, P, A, d).

    With FlexAttention each group gets padding rows at its end up to a length that tiles the
    kernel's blocks (31 -> 32: two groups per 64-row block, and each block's own keys in one
    key block instead of straddling two). Groups are causal, so no real row sees a padding row;
    padding outputs are dropped.
    """
    base = _base(decoder)
    B, P = points.shape
    T = prefix.length
    embed = _embedding(base)
    x = torch.cat([latents.to(embed.weight.dtype), embed(tokens)], dim=2)   # (B, P, G, d)
    pos = masks.group_positions(points, layout)                             # (B, P, G)
    G = x.shape[2]
    Gp = _aligned(G, prefix.align) if prefix.attention == "flex" else G
    if Gp > G:
        pad = torch.full((B, P, Gp - G), pad_id, dtype=tokens.dtype, device=tokens.device)
        x = torch.cat([x, embed(pad)], dim=2)                               # (B, P, Gp, d)
        pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, Gp - G + 1, device=pos.device)], dim=2)
    bm = _group_mask(T, points, Gp, layout.hide_point, prefix)
    per_point = isinstance(bm, PointMask)
    gate_cols = None
    if gate is not None:
        if per_point:   # keys: the kept prefix, then the point's own group
            k = torch.arange(bm.keep + Gp, device=points.device)
            cols = (k >= bm.keep) & (k < bm.keep + layout.num_latents)       # (keep + Gp,) bool
        else:
            padded = masks.GroupLayout(layout.num_latents, layout.n_ahead + Gp - G, **{
                k: getattr(layout, k) for k in ("refeed_last", "latent_pos", "shift_ahead", "hide_point")})
            cols = masks.latent_columns(T, P, padded).to(points.device)      # (T + P*Gp,) bool
        gate_cols = gate.float()[:, None] * cols                             # (L, keys)
    ids = list(range(len(blocks(base))))
    rows = (B * P, Gp) if per_point else (B, P * Gp)                         # one point per batch row
    # only the rows that predict the ahead tokens leave the last layer
    h = _appended_pass(base, x.reshape(*rows, -1), pos.reshape(rows), prefix, ids, bm, gate_cols,
                       rows=(Gp, G - layout.n_ahead, G))
    return h.view(B, P, layout.n_ahead, -1)


# ---------------------------------------------------------------------------------------------
# LM head + cross-entropy, fused by chunks.


def _ce_chunk(h: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              cap: float | None = None):
    """One chunk: weighted summed cross-entropy, and its gradient with respect to h.
    h (c, d), head_weight (V, d), targets (c,), weights (c,) -> (scalar, (c, d)). `cap`: the
    decoder's final logit softcap (Gemma-2/3), logits = cap * tanh(raw / cap)."""
    raw = (h @ head_weight.t()).float()                                  # (c, V)
    if cap is None:
        logits = raw
    else:
        t = torch.tanh(raw / cap)
        logits = t * cap
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets[:, None])[:, 0]
    loss = ((lse - picked) * weights).sum()
    # d loss / d logits = weights * (softmax - onehot); through the cap, times 1 - tanh^2
    onehot = torch.arange(logits.shape[1], device=h.device)[None] == targets[:, None]
    g = (torch.exp(logits - lse[:, None]) - onehot.float()) * weights[:, None]
    if cap is not None:
        g = g * (1 - t * t)
    return loss, (g.to(head_weight.dtype) @ head_weight).to(h.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h (N, d) through a frozen head (V, d) against targets (N,), with
    weights (N,) (0 drops a row). The input gradient is computed in the forward, chunk by chunk,
    and kept (N, d): the backward only scales it by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, h, head_weight, targets, weights, chunk, cap=None):
        fn = _compiled.get("ce", _ce_chunk)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grads = []
        for s in range(0, h.shape[0], chunk):
            loss, g = fn(h[s: s + chunk], head_weight, targets[s: s + chunk], weights[s: s + chunk], cap)
            total = total + loss
            grads.append(g)
        ctx.save_for_backward(torch.cat(grads) if h.requires_grad else None)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * g.to(grad.dtype)), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, chunk: int = 4096, cap: float | None = None) -> torch.Tensor:
    """Sum over rows of weights * CE(softcap(hidden @ head_weight.T), targets). hidden (N, d),
    targets (N,); `cap` the decoder's final logit softcap or None (`families.logit_softcap`)."""
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        head_weight = head_weight.to(hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, head_weight, targets, weights.float(), chunk, cap)


# ---------------------------------------------------------------------------------------------
# The step.


def multi_point_loss(decoder, coprocessor, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int,
                     prefix: Prefix | None = None, pad_id: int = 0, attention: str = "auto",
                     block: int | tuple[int, int] | str = "auto", align: int = 32, frozen: bool = True,
                     kernel_options: dict | str | None = "auto", fuse_kv: bool = True,
                     trim_last: bool = True, mlp: str = "auto") -> torch.Tensor:
    """Mean cross-entropy over the valid ahead tokens of every point: `augment.multi_point_loss`'s
    loss, computed on the fast path. input_ids (B, T), points (B, P) -> scalar.

    `coprocessor` may be wrapped (DDP): it is called, so the wrapper's gradient hooks run.
    """
    if prefix is None:
        prefix = prefill(decoder, input_ids, attention, block, align, frozen, kernel_options, fuse_kv=fuse_kv,
                         trim_last=trim_last, mlp=mlp)
    core = getattr(coprocessor, "module", coprocessor)
    layout = core.layout(n_ahead)
    latents, gate = coprocessor(prefix, points, with_gate=True)             # (B, P, NL, d), (L,) or None
    tokens, targets, valid = masks.group_tokens(input_ids, points, layout, pad_id)
    h = group_hidden(decoder, prefix, points, latents, tokens, layout, gate, pad_id)
    w = valid.flatten().float()
    head = decoder.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the fast path's fused cross-entropy covers LM heads without a bias")
    total = linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, targets.flatten(), w,
                                 cap=families.logit_softcap(decoder.config))
    return total / w.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Scoring (no gradients): the paper's evaluation after every token.


@torch.no_grad()
def head_nll(decoder, hidden: torch.Tensor, targets: torch.Tensor, vocab_chunk: int = 2048) -> torch.Tensor:
    """NLL (nats, float32) of targets (N,) under the LM head on hidden (N, d), by slices of the
    vocabulary with a running log-sum-exp. The (N, V) logits never exist whole (4096 rows x 49k
    words would be 800 MB), and each slice of the head's weight is read once for all N rows: row
    chunks against the whole vocabulary re-read the 113 MB head from memory for every chunk and
    ran at half the speed on a 2-core CPU."""
    head = decoder.get_output_embeddings()
    w, b = head.weight, head.bias
    N = hidden.shape[0]
    m = torch.full((N,), float("-inf"), device=hidden.device)               # running max
    acc = torch.zeros(N, device=hidden.device)                              # running sum of exp(logit - m)
    picked = torch.zeros(N, device=hidden.device)
    cap = families.logit_softcap(decoder.config)
    for v in range(0, w.shape[0], vocab_chunk):
        logits = F.linear(hidden, w[v: v + vocab_chunk], None if b is None else b[v: v + vocab_chunk]).float()
        logits = families.softcap(logits, cap)
        new_m = torch.maximum(m, logits.amax(-1))
        acc = acc * torch.exp(m - new_m) + torch.exp(logits - new_m[:, None]).sum(-1)
        m = new_m
        here = (targets >= v) & (targets < v + logits.shape[1])
        picked[here] = logits[here, targets[here] - v]
    return m + acc.log() - picked


@torch.no_grad()
def score_every(decoder, coprocessor, input_ids: torch.Tensor, positions: int = 16, points_per_pass: int = 64,
                pad_id: int = 0, progress=None):
    """The final scores of `iter_score_every` (see there): -> (nll_aug (T-1, A), nll_base (T-1, A))."""
    for _, nll_aug, nll_base in iter_score_every(decoder, coprocessor, input_ids, positions, points_per_pass,
                                                  pad_id, progress):
        pass
    return nll_aug, nll_base


@torch.no_grad()
def iter_score_every(decoder, coprocessor, input_ids: torch.Tensor, positions: int = 16, points_per_pass: int = 64,
                     pad_id: int = 0, progress=None, fp32_outside_groups: bool = False):
    """`augment.score_after_every_token` on the fast path: latents after every token of input_ids
    (1, T), the n-th token ahead scored for n = 1..positions. -> (nll_aug (T-1, A), nll_base (T-1, A)),
    NaN past the end of the text.

    Every point's group attends per point (`PointMask`): its own prefix and its own rows, so the
    attention work is what the groups need, not (points per pass)^2 as with the dense mask. Points
    go `points_per_pass` at a time (the progress callback gets the fraction done after each pass);
    a pass keeps only the prefix its last point sees. Ahead rows past the end of the text skip the
    LM head.

    Yields after each pass (points_done, nll_aug, nll_base): rows >= points_done of nll_aug are still
    NaN; a partial nll_aug is a copy (later passes do not change it), the last yield is the result.

    `fp32_outside_groups`: under autocast (bf16 scoring), the prefill (the plain decoder's arm, and the
    cache the groups read) and the LM head still run in float32; only the coprocessor and the group
    passes take the autocast dtype. A bf16 LM head rounds 49k logits of magnitude ~20 to 8 bits of
    mantissa, which alone was half of bf16's NLL error to float32 (SmolLM2-135M, 256 tokens x 16
    ahead, 2-core AMX CPU: mean |ΔNLL| 0.027 -> 0.015 nats with the float32 head, for ~10% more
    time; the prefill is ~3% of the work). Off by default: other callers compare the autocast paths
    as the trainer runs them.
    """
    T = input_ids.shape[1]
    dev = input_ids.device
    core = getattr(coprocessor, "module", coprocessor)
    layout = core.layout(positions)

    def full_precision():
        return torch.autocast(dev.type, enabled=False) if fp32_outside_groups else contextlib.nullcontext()

    with full_precision():
        prefix, h = prefill(decoder, input_ids, "points", with_hidden=True)
        base = head_nll(decoder, h[0, :-1], input_ids[0, 1:])               # (T-1,): token t+1 given x_0..x_t
    all_points = torch.arange(T - 1, device=dev)
    idx = all_points[:, None] + torch.arange(positions, device=dev)          # (T-1, A): index into base
    nan = torch.full(idx.shape, float("nan"), device=dev)
    nll_base = torch.where(idx < T - 1, base[idx.clamp(max=T - 2)], nan)
    nll_aug = nan.clone()
    chunks = list(torch.split(all_points, points_per_pass))
    if not chunks:   # a one-token text: no augmentation point
        yield 0, nll_aug, nll_base
        return
    gate = getattr(core, "gate_bias", None)
    for i, pts in enumerate(chunks):
        pts = pts[None]                                                      # (1, P)
        latents = coprocessor(prefix, pts)                                   # (1, P, NL, d)
        tokens, targets, valid = masks.group_tokens(input_ids, pts, layout, pad_id)
        hid = group_hidden(decoder, prefix, pts, latents, tokens, layout, gate, pad_id)   # (1, P, A, d)
        rows = nll_aug[pts[0]]                                               # (P, A)
        with full_precision():
            out = hid[0][valid[0]]
            rows[valid[0]] = head_nll(decoder, out.float() if fp32_outside_groups else out, targets[0][valid[0]])
        nll_aug[pts[0]] = rows
        if progress is not None:
            progress((i + 1) / len(chunks))
        done = int(pts[0, -1]) + 1
        yield done, (nll_aug if i == len(chunks) - 1 else nll_aug.clone()), nll_base
