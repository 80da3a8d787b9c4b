"""The training fast path (`fastpath.py`) against the dense path, on tiny models on CPU.

    pytest tests/test_fastpath.py

FlexAttention has no backward on CPU, so losses and gradients are compared with the fast path's
dense-mask attention; the FlexAttention masks (block skipping, padded groups, the latent gate as a
score_mod) are compared forward-only. On a GPU the tests marked for it compare the compiled fast
path with FlexAttention against the dense path (every block kind, odd shapes, the trainer's save
and resume); the GPU run of `bench/train_throughput.py` repeats the comparison at the reference
shape in bf16 (results/train_throughput.json, "parity").
"""

import os

import pytest
import torch
import torch.nn.functional as F

from cacheaug_core import augment, fastpath, masks
from cacheaug_core.config import CoprocessorConfig, TrainConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.train import TrainingError, train
from tests.conftest import save_tiny_decoder, tiny_decoder

COPROCESSORS = {
    "copy": dict(),
    "compact-gated": dict(num_layers=2, refeed_last=True, hide_point=True, shift_ahead=False,
                          latent_gate=True, gate_init=-1.0),
    "shared-positions": dict(num_layers=2, layer_map="spread", latent_pos="shared", refeed_last=True),
    "lora": dict(body="lora", lora_rank=4),
    "pause": dict(body="none", refeed_last=True),
    "two-rounds": dict(num_layers=2, rounds=2, refeed_last=True),
}


def _setup(arch, cop_kw, T=40, P=5, B=2, seed=1, hidden=32, NL=4, device="cpu"):
    dec = tiny_decoder(arch, layers=3, hidden=hidden).to(device)
    cop = Coprocessor(CoprocessorConfig(num_latents=NL, **cop_kw), dec).float()
    with torch.no_grad():  # move off the identity / zero initialisation so every gradient is exercised
        for p in cop.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (B, T), generator=g)
    pts = masks.sample_points(T, P, B, g)
    return dec, cop, ids.to(device), pts.to(device)


def _grads(cop):
    return {n: p.grad.detach().clone() for n, p in cop.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "qwen3", "mistral", "olmo2"])
@pytest.mark.parametrize("name", list(COPROCESSORS))
def test_fast_loss_and_gradients_match_dense(arch, name):
    dec, cop, ids, pts = _setup(arch, COPROCESSORS[name])
    loss_d, _ = augment.multi_point_loss(dec, cop, ids, pts, 6, cache=augment.prefill_cache(dec, ids))
    loss_d.backward()
    gd = _grads(cop)
    cop.zero_grad(set_to_none=True)
    loss_f = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense")
    loss_f.backward()
    gf = _grads(cop)
    torch.testing.assert_close(loss_f, loss_d, atol=1e-5, rtol=1e-5)
    assert gd.keys() == gf.keys() and len(gd) > 0
    for n in gd:
        scale = gd[n].abs().max().clamp(min=1e-8)
        assert float((gf[n] - gd[n]).abs().max() / scale) < 1e-3, n


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: k and v projections with biases
def test_stacked_kv_projection_matches_two_matmuls(arch):
    dec, cop, ids, pts = _setup(arch, {})
    out = {}
    for fuse in (True, False):
        cop.zero_grad(set_to_none=True)
        loss = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense", fuse_kv=fuse)
        loss.backward()
        out[fuse] = (loss.detach(), _grads(cop))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-6)
    assert out[True][1].keys() == out[False][1].keys()
    for n, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][n], atol=1e-6, rtol=1e-5)


def test_points_near_the_end_are_weighted_out():
    """Ahead tokens past the end of the text count for nothing on both paths."""
    dec, cop, ids, _ = _setup("llama", {})
    pts = torch.tensor([[3, 20, 37, 38], [0, 10, 30, 38]])                  # T = 40: the last ones run off
    loss_d, nll = augment.multi_point_loss(dec, cop, ids, pts, 6, cache=augment.prefill_cache(dec, ids))
    assert torch.isnan(nll).any()
    loss_f = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense")
    torch.testing.assert_close(loss_f, loss_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["copy", "compact-gated"])
@pytest.mark.parametrize("block,align", [(128, 32), (16, 8), (16, 1), ((8, 16), 8), ((16, 8), 4)])
def test_flex_masks_match_dense_forward(name, block, align):
    """FlexAttention's BlockMask (with groups padded to tile its blocks, and the gate as a
    score_mod) reads the same latents and hidden states as the dense mask."""
    dec, cop, ids, pts = _setup("llama", COPROCESSORS[name])
    layout = cop.layout(6)
    tokens, _, _ = masks.group_tokens(ids, pts, layout)
    out = {}
    with torch.no_grad():
        for att in ("dense", "flex"):
            pre = fastpath.prefill(dec, ids, att, block=block, align=align)
            lat = cop(pre, pts)
            out[att] = (lat, fastpath.group_hidden(dec, pre, pts, lat, tokens, layout, cop.gate_bias))
    torch.testing.assert_close(out["flex"][0], out["dense"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex"][1], out["dense"][1], atol=1e-5, rtol=1e-5)
    assert out["dense"][1].shape == (2, pts.shape[1], 6, dec.config.hidden_size)


@pytest.mark.parametrize("T,block", [(40, 16), (64, 16)])
def test_prefix_key_grads_dropped_from_the_key_major_lists_only(T, block):
    """`masks.without_prefix_key_grads` leaves the query-major block lists (forward, query
    gradients) alone and lists no query blocks for key blocks wholly inside the prefix; a key
    block that straddles the prefix's end keeps its query blocks."""
    pts = masks.sample_points(T, 4, 2, torch.Generator().manual_seed(0))
    bm = masks.group_block_mask(T, pts, 8, block_size=block)
    out = masks.without_prefix_key_grads(bm, T)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_indices", "full_q_indices"):
        assert torch.equal(getattr(out, name), getattr(bm, name)), name
    n = T // block
    for name in ("q_num_blocks", "full_q_num_blocks"):
        new, old = getattr(out, name), getattr(bm, name)
        assert (new[..., :n] == 0).all() and torch.equal(new[..., n:], old[..., n:]), name
    assert int(bm.q_num_blocks[..., :n].sum()) > 0  # there was something to drop
    assert out.to_dense().equal(bm.to_dense())       # to_dense reads the query-major lists


def _flex_case(device="cuda"):
    """A group-attention case for compiled FlexAttention: T prefix keys without gradient, P groups
    of G rows, 6 query heads over 2 key/value heads, bf16. -> (T, G, points, q, prefix k, v,
    group k, v, output gradient)."""
    T, P, G, B = 256, 8, 32, 2
    pts = masks.sample_points(T, P, B, torch.Generator().manual_seed(0)).to(device)
    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=grad)
    return (T, G, pts, rand(B, 6, P * G, 64, grad=True), rand(B, 2, T, 64), rand(B, 2, T, 64),
            rand(B, 2, P * G, 64, grad=True), rand(B, 2, P * G, 64, grad=True), rand(B, 6, P * G, 64))


def _flex_grads(fa, case, block_mask, **kw):
    """Output and gradients of the queries and the group keys/values for one BlockMask."""
    _, _, _, q, kp, vp, kg, vg, do = case
    o = fa(q, torch.cat([kp, kg], 2), torch.cat([vp, vg], 2), block_mask=block_mask, enable_gqa=True, **kw)
    return (o, *torch.autograd.grad(o, (q, kg, vg), do))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_prefix_key_grads_dropped_leaves_other_gradients_alone():
    """Compiled FlexAttention with the frozen-prefix BlockMask: the same output and the same
    gradients of the queries and of the appended keys and values."""
    from torch.nn.attention.flex_attention import flex_attention

    case = _flex_case()
    T, G, pts = case[:3]
    bm = masks.group_block_mask(T, pts, G)
    fa = torch.compile(flex_attention, dynamic=False)
    res = [_flex_grads(fa, case, m) for m in (bm, masks.without_prefix_key_grads(bm, T))]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_kernel_options_auto_only_where_tuned():
    """"auto" kernel options: the tuned configuration on a Hopper GPU with head dim 64 only; on
    CPU (dense masks) nothing, and explicit options pass through."""
    dec, _, ids, _ = _setup("llama", {})
    assert fastpath.prefill(dec, ids).kernel_options is None
    assert fastpath.prefill(dec, ids, "flex").kernel_options is None
    opts = {"fwd_num_warps": 8}
    assert fastpath.prefill(dec, ids, "flex", kernel_options=opts).kernel_options == opts
    assert fastpath._auto_kernel_options(torch.device("cpu"), 64, 128) is None
    assert all(128 % v == 0 for k, v in fastpath.TUNED_KERNEL_OPTIONS.items() if "BLOCK" in k)


@pytest.mark.parametrize("block", [128, 64, (64, 128), (128, 64), (32, 64), 32])
def test_kernel_options_fit_the_blocks(block):
    """Tuned tiles shrink to the BlockMask's blocks (queries: M tiles, keys: N tiles) and keep the
    backward kernel's constraints, so every tile divides the block it walks."""
    qb, kb = fastpath._blocks(block)
    opts = fastpath.fit_kernel_options(fastpath.TUNED_KERNEL_OPTIONS, block)
    for key in ("fwd_BLOCK_M", "bwd_BLOCK_M1", "bwd_BLOCK_M2"):
        assert qb % opts[key] == 0 and opts[key] <= fastpath.TUNED_KERNEL_OPTIONS[key], key
    for key in ("fwd_BLOCK_N", "bwd_BLOCK_N1", "bwd_BLOCK_N2"):
        assert kb % opts[key] == 0 and opts[key] <= fastpath.TUNED_KERNEL_OPTIONS[key], key
    assert opts["bwd_BLOCK_N1"] % opts["bwd_BLOCK_M1"] == 0 and opts["bwd_BLOCK_M2"] % opts["bwd_BLOCK_N2"] == 0
    if qb >= 64 and kb >= 64:
        assert opts == fastpath.TUNED_KERNEL_OPTIONS   # nothing to shrink


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("block", [64, (32, 64)])
def test_small_blocks_compile_and_match_128(block):
    """Compiled FlexAttention over BlockMasks of blocks under 128 (the backward config list is
    extended for them): the same output and gradients as with 128-blocks, up to bf16 rounding."""
    from torch.nn.attention.flex_attention import flex_attention

    case = _flex_case()
    T, G, pts = case[:3]
    fastpath._allow_small_blocks()
    fa = torch.compile(flex_attention, dynamic=False)
    res = []
    for b in (128, block):
        m = masks.without_prefix_key_grads(masks.group_block_mask(T, pts, G, block_size=b), T)
        res.append(_flex_grads(fa, case, m, kernel_options=fastpath.fit_kernel_options(fastpath.TUNED_KERNEL_OPTIONS, b)))
    for a, b in zip(*res):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def _compiled_flex_against_dense(arch, cop_kw, T=96, P=6, NL=4, A=6, hidden=64):
    """Loss and coprocessor gradients of the compiled fast path with FlexAttention against the
    dense path, on a GPU in float32."""
    dec, cop, ids, pts = _setup(arch, cop_kw, T, P, seed=3, hidden=hidden, NL=NL, device="cuda")
    loss_d, _ = augment.multi_point_loss(dec, cop, ids, pts, A, cache=augment.prefill_cache(dec, ids))
    loss_d.backward()
    gd = _grads(cop)
    cop.zero_grad(set_to_none=True)
    fastpath.enable_compile()
    try:
        loss_f = fastpath.multi_point_loss(dec, cop, ids, pts, A, attention="flex")
        loss_f.backward()
    finally:
        fastpath.enable_compile(False)
    gf = _grads(cop)
    torch.testing.assert_close(loss_f, loss_d, atol=1e-4, rtol=1e-4)
    assert gf.keys() == gd.keys()
    for n in gd:
        torch.testing.assert_close(gf[n], gd[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("name", ["copy", "compact-gated", "two-rounds"])
def test_compiled_flex_matches_dense_on_gpu(arch, name):
    """On a GPU: the compiled blocks with FlexAttention (BlockMask, padded groups, the latent gate
    as a score_mod, frozen-prefix key blocks dropped from the backward) give the dense path's loss
    and coprocessor gradients, for every block kind the fast path writes (head dim 16)."""
    _compiled_flex_against_dense(arch, COPROCESSORS[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch,hidden,T,P,NL,A", [
    ("llama", 256, 50, 3, 5, 3),     # head dim 64: the tuned tiles and 64-blocks on Hopper
    ("llama", 256, 200, 7, 1, 1),    # one-row groups
    ("llama", 256, 130, 1, 16, 16),  # one point
    ("qwen2", 256, 64, 16, 3, 5),
    ("gpt2", 64, 77, 5, 7, 2),
])
def test_compiled_flex_on_odd_shapes(arch, hidden, T, P, NL, A):
    """Sequence lengths, point counts and group lengths that tile no block still compile and
    match the dense path."""
    _compiled_flex_against_dense(arch, {}, T, P, NL, A, hidden)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tuned_kernels_and_small_blocks_on_hopper_only():
    """On a Hopper GPU with head dim 64: 64 x 64 blocks and the tuned tiles; elsewhere 128 x 128
    and FlexAttention's default tiles, unless blocks under 128 are asked for (tiles that fit)."""
    dev = torch.device("cuda")
    hopper = torch.cuda.get_device_capability(dev) == (9, 0)
    assert fastpath._auto_block(dev, 64) == (fastpath.BLOCK if hopper else 128)
    assert fastpath._auto_kernel_options(dev, 64, 128) == (fastpath.TUNED_KERNEL_OPTIONS if hopper else None)
    assert fastpath._auto_kernel_options(dev, 128, 128) is None and fastpath._auto_block(dev, 128) == 128
    assert fastpath._auto_kernel_options(dev, 128, 64) == fastpath.fit_kernel_options(fastpath.TUNED_KERNEL_OPTIONS, 64)


def test_prefill_cache_matches_transformers():
    """The prefix K/V are the decoder's own cache entries (the last layer stops after K/V)."""
    from cacheaug_core import kv

    dec, _, ids, _ = _setup("qwen2", {})
    pre = fastpath.prefill(dec, ids)
    ref = kv.to_layers(augment.prefill_cache(dec, ids))
    assert len(pre.k) == len(ref)
    for k, v, (k0, v0) in zip(pre.k, pre.v, ref):
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [7, 64])
def test_linear_cross_entropy(chunk):
    """Fused head + cross-entropy: the weighted sum of F.cross_entropy and its input gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (23,), generator=g)
    wt = (torch.rand(23, generator=g) > 0.3).float()
    got = fastpath.linear_cross_entropy(h, w, t, wt, chunk=chunk)
    (gh,) = torch.autograd.grad(2.0 * got, h)
    h2 = h.detach().clone().requires_grad_()
    want = (F.cross_entropy(h2 @ w.t(), t, reduction="none") * wt).sum()
    (gh2,) = torch.autograd.grad(2.0 * want, h2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gh, gh2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["copy", "compact-gated"])
def test_per_point_attention_matches_dense_forward(name):
    """The scoring layout (one point per batch row, each attending to its own prefix and rows)
    reads the same latents and hidden states as the dense mask, points in any order."""
    dec, cop, ids, pts = _setup("llama", COPROCESSORS[name])
    pts = pts.flip(1)
    layout = cop.layout(6)
    tokens, _, _ = masks.group_tokens(ids, pts, layout)
    out = {}
    with torch.no_grad():
        for att in ("dense", "points"):
            pre = fastpath.prefill(dec, ids, att)
            lat = cop(pre, pts)
            out[att] = (lat, fastpath.group_hidden(dec, pre, pts, lat, tokens, layout, cop.gate_bias))
    torch.testing.assert_close(out["points"][0], out["dense"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["points"][1], out["dense"][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("name", list(COPROCESSORS))
def test_score_every_matches_the_transformers_path(arch, name):
    """Mode (b) scoring on the fast path: the same NLL table as the dense transformers path,
    NaN in the same places (ahead tokens past the end), whatever the points per pass."""
    dec, cop, ids, _ = _setup(arch, COPROCESSORS[name], T=23, B=1)
    ref_aug, ref_base = augment.score_after_every_token(dec, cop, ids, 5, points_per_pass=8, fast=False)
    seen = []
    aug, base = augment.score_after_every_token(dec, cop, ids, 5, points_per_pass=6, progress=seen.append)
    assert aug.shape == ref_aug.shape == (22, 5)
    assert torch.equal(torch.isnan(aug), torch.isnan(ref_aug)) and torch.isnan(aug[-1, 1:]).all()
    torch.testing.assert_close(aug, ref_aug, atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(base, ref_base, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_head_nll_is_cross_entropy():
    """The vocabulary-sliced running log-sum-exp equals cross-entropy over the whole head (with
    a bias, and slices that do not divide the vocabulary)."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50)

    import types

    class Dec:
        config = types.SimpleNamespace()

        def get_output_embeddings(self):
            return head

    h = torch.randn(9, 16, generator=g)
    t = torch.randint(0, 50, (9,), generator=g)
    want = F.cross_entropy(head(h), t, reduction="none")
    for chunk in (7, 50, 64):
        torch.testing.assert_close(fastpath.head_nll(Dec(), h, t, vocab_chunk=chunk), want, atol=1e-5, rtol=1e-5)
    # Gemma-2's final logit softcap is applied slice by slice
    Dec.config.final_logit_softcapping = 0.5
    want = F.cross_entropy(torch.tanh(head(h) / 0.5) * 0.5, t, reduction="none")
    torch.testing.assert_close(fastpath.head_nll(Dec(), h, t, vocab_chunk=7), want, atol=1e-5, rtol=1e-5)


def test_fused_cross_entropy_with_softcap_matches_autograd():
    """linear_cross_entropy's loss and input gradient through the final logit softcap."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (11,), generator=g)
    wt = torch.rand(11, generator=g)
    for cap in (None, 0.7):
        h1 = torch.randn(11, 16, generator=g, requires_grad=True)
        h2 = h1.detach().clone().requires_grad_(True)
        got = fastpath.linear_cross_entropy(h1, w, t, wt, chunk=4, cap=cap)
        logits = h2 @ w.t()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        want = (F.cross_entropy(logits, t, reduction="none") * wt).sum()
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)


def test_group_padding_lengths():
    assert [fastpath._aligned(g, 32) for g in (31, 32, 33, 16, 12, 5)] == [32, 32, 64, 16, 16, 8]
    assert fastpath._aligned(31, 1) == 31


def test_unsupported_decoders_are_named():
    assert fastpath.unsupported(tiny_decoder("llama")) is None
    assert fastpath.unsupported(tiny_decoder("gpt2")) is None
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    why = fastpath.unsupported(neox)
    assert why and "gpt_neox" in why
    dec = tiny_decoder("llama")
    assert fastpath.unsupported(dec, Coprocessor(CoprocessorConfig(num_latents=2, rounds=2), dec)) is None


def _cfg(tmp_path, decoder, data, **kw):
    base = dict(decoder=decoder, data=data, out_dir=str(tmp_path / "run"), seq_len=40, points=5, n_ahead=4,
                batch_size=2, steps=3, warmup=1, lr=3e-3, eval_every=0, save_every=3, log_every=1,
                device="cpu", fast=True)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_takes_the_fast_path(tmp_path, repeated_text_file, monkeypatch, arch):
    """`cacheaug train --fast` runs its steps through fastpath.multi_point_loss (gated layout too)."""
    calls = []
    real = fastpath.multi_point_loss
    monkeypatch.setattr(fastpath, "multi_point_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    decoder = save_tiny_decoder(tmp_path / "dec", arch, layers=3)
    cop_cfg = CoprocessorConfig(num_latents=3, num_layers=2, refeed_last=True, hide_point=True, shift_ahead=False,
                                latent_gate=True)
    last = train(_cfg(tmp_path, decoder, repeated_text_file), cop_cfg, show_progress=False)
    assert (last / "trainer_state.json").exists() and len(calls) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_fast_on_gpu_saves_and_resumes(tmp_path, repeated_text_file):
    """On a GPU `--fast` compiles the blocks, steps a fused AdamW in bf16 autocast, and a resumed run
    loads that optimizer's moments and goes on."""
    import json

    decoder = save_tiny_decoder(tmp_path / "dec", "llama", layers=2, hidden=64)   # head dim 16: FlexAttention's least
    cop_cfg = CoprocessorConfig(num_latents=4, num_layers=2, rounds=2)   # FlexAttention for both rounds' groups
    kw = dict(device="", precision="bf16", seq_len=64, points=4, batch_size=4, steps=4, save_every=2,
              stop_after=2)
    last = train(_cfg(tmp_path, decoder, repeated_text_file, **kw), cop_cfg, show_progress=False)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2
    last = train(_cfg(tmp_path, decoder, repeated_text_file, **(kw | {"resume": True, "stop_after": 0})), cop_cfg,
                 show_progress=False)
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 4 and all(l == l and l < 100 for l in losses)   # finite, logged every step


def test_fast_path_names_head_dims_flex_attention_cannot_take():
    dec = tiny_decoder("llama", hidden=32)                       # 4 heads of 8
    assert fastpath.unsupported(dec) is None                      # on CPU the dense masks take any
    why = fastpath.unsupported(dec, device=torch.device("cuda"))
    assert why is not None and "head dim" in why and "16" in why
    assert fastpath.unsupported(tiny_decoder("llama", hidden=64), device=torch.device("cuda")) is None


def test_trainer_refuses_fast_for_gpt2_with_attention_dropout(tmp_path, repeated_text_file):
    """A GPT-2 coprocessor body with attention dropout (GPT-2's own configs have 0.1) trains on the
    transformers path only: the fast path's attention kernels have no dropout."""
    from cacheaug_core.decoder import byte_level_tokenizer

    tok = byte_level_tokenizer()
    model = tiny_decoder("gpt2", vocab=len(tok), layers=2)
    model.config.attn_pdrop = 0.1
    model.save_pretrained(tmp_path / "dec")
    tok.save_pretrained(tmp_path / "dec")
    with pytest.raises(TrainingError, match="--fast.*attention dropout"):
        train(_cfg(tmp_path, str(tmp_path / "dec"), repeated_text_file), CoprocessorConfig(num_latents=2),
              show_progress=False)


def _bench(monkeypatch, name: str = "train_throughput"):
    """bench/<name>.py as a module, registered under its name for the test (its dataclasses look
    their module up; bench/step_breakdown.py imports train_throughput)."""
    import importlib.util
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, src)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_throughput_bench_interleaves_paths_on_cpu(tmp_path, monkeypatch):
    """bench/train_throughput.py on a tiny model: every path times its steps (taken in turns),
    and the parity check finds the fast path's loss and gradients equal to the dense path's."""
    import json

    bench = _bench(monkeypatch)
    out = tmp_path / "tp.json"
    bench.main(["--tiny", "--steps", "3", "--warmup", "1", "--paths", "dense,dense@4,fast,fast-b64@4", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["order"] == "interleaved"
    row = doc["runs"][0]
    for name, batch in (("dense", 2), ("dense@4", 4), ("fast", 2), ("fast-b64@4", 4)):
        r = row[name]
        assert "error" not in r, r
        assert r["batch"] == batch and len(r["step_s_all"]) == 3 and r["step_s"] in r["step_s_all"]
        assert r["orig_tokens_per_s"] == pytest.approx(batch * 64 / r["step_s"])
    assert set(row["speedup_over_dense"]) == {"dense", "dense@4", "fast", "fast-b64@4"}
    rates = {k: row[k]["orig_tokens_per_s"] for k in ("dense", "dense@4")}
    assert row["best_dense"] == max(rates, key=rates.get) and row["speedup_over_best_dense"][row["best_dense"]] == 1.0
    assert min(row["speedup_over_best_dense"][k] for k in rates) <= 1.0
    for p in doc["parity"]:
        assert p["grad_cosine"] > 0.9999 and abs(p["loss_fast"] - p["loss_dense"]) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_throughput_bench_profiles_one_replay_of_a_graph_path_on_gpu(tmp_path, monkeypatch):
    """bench/train_throughput.py --profile of a +graph path timed in sequential order (whose graph
    is freed after timing): the profile holds one replayed step, as many kernel launches as the
    same step without the graph, not the warm-up steps and capture of a new graph."""
    import csv

    bench = _bench(monkeypatch)
    prof = tmp_path / "prof.txt"
    bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--order", "sequential", "--no-parity",
                "--paths", "fast,fast+graph", "--profile", str(prof), "--out", str(tmp_path / "tp.json")])

    def launches(name):
        with open(f"{prof}.{name}.kernels.csv", newline="") as f:
            return sum(int(r["calls"]) for r in csv.DictReader(f) if "#" not in r["kernel"].split(" ")[0])

    plain, graph = launches("fast"), launches("fast_graph")
    assert plain > 0 and 0.8 * plain <= graph <= 1.2 * plain, (plain, graph)


def test_layer_variants_bench_agrees_on_cpu(tmp_path):
    """bench/layer_variants.py on a tiny layer: every formulation of the projections gives the
    same output in every pass, and each is timed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "lv.json"
    subprocess.run([sys.executable, str(root / "bench" / "layer_variants.py"), "--tiny", "--iters", "1",
                    "--out", str(out)], check=True, cwd=root, capture_output=True)
    doc = json.loads(out.read_text())
    assert set(doc["passes"]) == {"prefill", "group", "coprocessor"}
    for rows in doc["passes"].values():
        assert len(rows) >= 6
        for r in rows.values():
            assert r["rel_diff_vs_first"] < 1e-5 and r["median_ms"] > 0


def test_throughput_benches_take_another_decoders_shape(tmp_path, monkeypatch):
    """--decoder-config: bench/train_throughput.py and bench/step_breakdown.py measure and count
    the shape of a decoder folder (here a tiny Qwen2) instead of SmolLM2-135M's; a config the
    counted-FLOP model does not cover (GPT-2) or a missing path is refused with the reason."""
    import json

    from transformers import AutoConfig

    bench = _bench(monkeypatch)
    qwen = save_tiny_decoder(tmp_path / "qwen", "qwen2", hidden=48)
    out = tmp_path / "tp.json"
    bench.main(["--tiny", "--decoder-config", qwen, "--steps", "1", "--warmup", "1", "--paths", "dense,fast",
                "--no-parity", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["decoder_config"] == qwen
    row = doc["runs"][0]
    cfg = AutoConfig.from_pretrained(qwen)
    assert cfg.model_type == "qwen2" and cfg.hidden_size == 48
    assert row["flops_breakdown_per_seq"] == bench.counted_flops(cfg, 1, 64, 4, 4, 4)["per_seq"]
    assert row["flops_breakdown_per_seq"] != bench.counted_flops(bench.smollm2_config(True), 1, 64, 4, 4, 4)["per_seq"]
    assert "error" not in row["fast"] and row["fast"]["counted_flops_per_step"] == \
        bench.counted_flops(cfg, 2, 64, 4, 4, 4)["per_step"]
    gpt2 = save_tiny_decoder(tmp_path / "gpt2", "gpt2")
    for bad, why in ((gpt2, "covers llama, qwen2 configs, not 'gpt2'"), (str(tmp_path / "none"), "no such folder")):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", "--decoder-config", bad, "--out", str(tmp_path / "x.json")])
        with pytest.raises(ValueError, match=why):
            bench.decoder_config(bad)
    sb = _bench(monkeypatch, "step_breakdown")
    csv = tmp_path / "k.csv"
    csv.write_text('kernel,calls,self_us\n"nvjet_sm90_tst_NNN",2,1000.0\n')
    doc = sb.main([str(csv), "--batch", "2", "--T", "64", "--points", "4", "--latents", "4", "--ahead", "4",
                   "--decoder-config", qwen])
    assert doc["counted_flops_per_step"] == bench.counted_flops(cfg, 2, 64, 4, 4, 4)["per_step"]


@pytest.mark.parametrize("decoder", ["", "qwen2"])
def test_trainer_throughput_bench_on_cpu(tmp_path, decoder):
    """bench/trainer_throughput.py on a tiny decoder (SmolLM2-135M's tiny stand-in, or a tiny
    Qwen2 through --decoder-config): `cacheaug train --fast` runs, and the step time comes from the
    run's own log."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "tt.json"
    extra = ["--decoder-config", save_tiny_decoder(tmp_path / "dec", decoder, hidden=48)] if decoder else []
    subprocess.run([sys.executable, str(root / "bench" / "trainer_throughput.py"), "--tiny", "--steps", "4",
                    "--skip", "1", "--out", str(out)] + extra, check=True, cwd=root, capture_output=True)
    doc = json.loads(out.read_text())
    assert doc["decoder_config"] == (extra[1] if decoder else "SmolLM2-135M")
    assert doc["timed_steps"] == 3 and doc["step_s"] > 0
    assert doc["orig_tokens_per_s"] == pytest.approx(doc["batch"] * doc["shape"]["T"] / doc["step_s"])
    assert doc["final_loss"] == doc["final_loss"]   # finite (not NaN)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-head-dim"])
def test_throughput_bench_counts_the_matmuls_the_fast_path_runs(arch, monkeypatch):
    """`counted_flops`'s matmul part (bench/train_throughput.py: what the fraction of bf16 peak
    is taken over) against every matmul FLOP the fast path runs for a loss and its backward, counted by
    torch's FlopCounterMode: equal, up to the one piece of work the path does and the count
    leaves out as useless: the query projection, in the group pass's last layer, of the rows whose
    outputs no loss reads (the path skips their attention output projection and MLP).
    "llama-head-dim": heads wider than hidden / heads (query width 64 for a hidden size of 32)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _bench(monkeypatch)
    B, T, P, NL, A = 2, 40, 5, 4, 6
    dec, cop, ids, pts = _setup(arch.removesuffix("-head-dim"), COPROCESSORS["copy"], T=T, P=P, B=B, NL=NL)
    if arch == "llama-head-dim":
        from transformers import AutoModelForCausalLM

        from cacheaug_core.decoder import freeze

        cfg = dec.config
        cfg.head_dim = 16
        torch.manual_seed(0)
        dec = freeze(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32))
        cop = Coprocessor(CoprocessorConfig(num_latents=NL, **COPROCESSORS["copy"]), dec).float()
    with FlopCounterMode(display=False) as counter:
        fastpath.multi_point_loss(dec, cop, ids, pts, A, attention="dense", align=1).backward()
    ran = sum(n for op, n in counter.get_flop_counts()["Global"].items()
              if str(op) in ("aten.mm", "aten.addmm"))
    cfg = dec.config
    d = cfg.hidden_size
    qd = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)
    assert qd == (64 if arch == "llama-head-dim" else d)
    unread = cop.layout(A).group_len - A                           # rows before those that predict
    unneeded = B * 2 * 2 * d * qd * P * unread                     # forward + input gradient
    counted = B * sum(bench.counted_flops(cfg, B, T, P, NL, A)["linear_per_seq"].values())
    assert ran == counted + unneeded


@pytest.mark.parametrize("name", ["copy", "two-rounds", "compact-gated"])
def test_last_layer_rows_trimmed_or_not_give_the_same_loss_and_gradients(name):
    """The appended passes' last layer makes only the rows read after it (`Prefix.trim_last`):
    loss and coprocessor gradients equal those of every row made (the bench's fast-fullrows)."""
    dec, cop, ids, pts = _setup("llama", COPROCESSORS[name])
    out = []
    for trim in (True, False):
        cop.zero_grad(set_to_none=True)
        loss = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense", trim_last=trim)
        loss.backward()
        out.append((loss.detach(), _grads(cop)))
    (l1, g1), (l2, g2) = out
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-5, msg=n)


def test_mlp_kernel_choice_and_its_errors():
    """`resolve_mlp`: "auto" keeps the compiled MLP off a Hopper GPU with quack; an explicit
    "quack" that cannot run says why; GPT-2's MLP (GELU, biases) is never fused."""
    llama, gpt2 = tiny_decoder("llama"), tiny_decoder("gpt2")
    layer = fastpath.blocks(llama)[0]
    assert fastpath._fusable_mlp(layer)
    assert fastpath._fusable_mlp(fastpath.blocks(tiny_decoder("qwen2"))[0])
    assert not fastpath._fusable_mlp(fastpath.blocks(gpt2)[0])
    cpu = torch.device("cpu")
    assert fastpath.resolve_mlp("auto", cpu, layer) == "compiled"
    assert fastpath.resolve_mlp("compiled", cpu, layer) == "compiled"
    with pytest.raises(ValueError, match="quack-kernels"):
        fastpath.resolve_mlp("quack", cpu, layer)
    with pytest.raises(ValueError, match="mlp must be one of"):
        fastpath.resolve_mlp("cutlass", cpu, layer)


def test_mlp_kernel_runs_in_bf16_only(monkeypatch):
    """quack's fused MLP was measured in bf16: "auto" keeps the compiled MLP for fp32 compute (a
    GPU run with --precision no) and an explicit "quack" says why, before touching the GPU."""
    monkeypatch.setattr(fastpath, "_quack_available", lambda: True)
    layer = fastpath.blocks(tiny_decoder("llama"))[0]
    gpu = torch.device("cuda")
    assert fastpath.resolve_mlp("auto", gpu, layer, torch.float32) == "compiled"
    with pytest.raises(ValueError, match="runs in bf16"):
        fastpath.resolve_mlp("quack", gpu, layer, torch.float32)


def test_quack_installs_known_to_fail_are_named():
    """The two ways an installed quack was seen to fail at its first GEMM are said before any
    step: a cutlass DSL too new for quack 0.6, and an install outside a site-packages folder."""
    good = {"quack-kernels": "0.6.5", "nvidia-cutlass-dsl": "4.7.1"}
    cutlass = "nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py"
    site = f"/venv/lib/python3.12/site-packages/{cutlass}".replace("/", os.sep)
    assert fastpath._quack_problem(good, site) is None
    why = fastpath._quack_problem(good | {"nvidia-cutlass-dsl": "4.8.1"}, site)
    assert why and "nvidia-cutlass-dsl==4.7.1" in why
    why = fastpath._quack_problem(good, f"/tmp/site/{cutlass}".replace("/", os.sep))   # pip install --target /tmp/site
    assert why and "site-packages" in why


@pytest.mark.parametrize("kind", ["quack", "quack-all"])
def test_fused_mlp_serves_the_frozen_decoder_only(monkeypatch, kind):
    """With the fused MLP chosen ("quack"), the decoder's layers (prefill and group pass) call it
    and the trained coprocessor's do not (its weights need gradients, which quack ran slower);
    with "quack-all" the coprocessor's call it too. The loss and gradients equal the compiled
    MLP's. The fused kernel is a GPU one: here a stand-in with the same math records who calls it."""
    dec, cop, ids, pts = _setup("llama", COPROCESSORS["copy"])
    ref = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense", mlp="compiled")
    ref.backward()
    g_ref = _grads(cop)
    cop.zero_grad(set_to_none=True)
    called = []

    def stand_in(m, h, x):
        called.append(id(m))
        w1 = torch.cat([m.gate_proj.weight, m.up_proj.weight])     # (2 * hidden, d): gate, then up
        g, u = F.linear(h, w1).chunk(2, dim=-1)
        return x + F.linear(F.silu(g) * u, m.down_proj.weight)

    monkeypatch.setattr(fastpath, "_quack_mlp", stand_in)
    monkeypatch.setattr(fastpath, "resolve_mlp", lambda mlp, device, layer, dtype: kind)
    loss = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense")
    loss.backward()
    dec_mlps = {id(b.mlp) for b in fastpath.blocks(dec)}
    cop_mlps = {id(b.mlp) for b in fastpath.blocks(cop.body)}
    if kind == "quack":
        assert set(called) == dec_mlps and not set(called) & cop_mlps
    else:
        assert set(called) == dec_mlps | cop_mlps
    # the group pass's every layer and the prefill's but its last (which stops at its k/v)
    assert len(called) == 2 * len(dec_mlps) - 1 + (len(cop_mlps) if kind == "quack-all" else 0)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    g = _grads(cop)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_fused_mlp_leaves_one_compiled_graph_per_layer(monkeypatch):
    """The fused MLP runs outside torch.compile (a graph break). Called from the compiled block
    itself, each layer compiles to one graph before it; called from a nested helper it split the
    block in two, both halves read the layer's input, and the backward summed their two
    gradients of it in an extra kernel per layer. Here: no tensor of the step is read by two
    compiled graphs (inductor replaced by aot_eager, which keeps the graph splits)."""
    import collections

    dec, cop, ids, pts = _setup("llama", COPROCESSORS["copy"])

    class StandIn(torch.autograd.Function):   # an opaque fused MLP, as quack's is to autograd
        @staticmethod
        def forward(ctx, h, x, w1, w2):
            g, u = F.linear(h, w1).chunk(2, dim=-1)
            return x + F.linear(F.silu(g) * u, w2)

        @staticmethod
        def backward(ctx, dout):
            return None, dout, None, None

    @torch.compiler.disable
    def stand_in(m, h, x):
        return StandIn.apply(h, x, fastpath._gate_up(m), m.down_proj.weight)

    monkeypatch.setattr(fastpath, "_quack_mlp", stand_in)
    monkeypatch.setattr(fastpath, "resolve_mlp", lambda mlp, device, layer, dtype: "quack")
    torch._dynamo.reset()
    monkeypatch.setitem(fastpath._compiled, "prefill", torch.compile(fastpath.prefill_block, backend="aot_eager"))
    monkeypatch.setitem(fastpath._compiled, "group", torch.compile(fastpath.group_block, backend="aot_eager"))
    try:
        loss = fastpath.multi_point_loss(dec, cop, ids, pts, 6, attention="dense")
    finally:
        torch._dynamo.reset()
    readers = collections.Counter()   # (grad node, output index) -> compiled graphs reading it
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, i in node.next_functions:
            if nxt is not None and "CompiledFunction" in node.name():
                readers[(nxt, i)] += 1
            stack.append(nxt)
    assert sum(1 for n in seen if "StandIn" in n.name()) == len(fastpath.blocks(dec))   # the group pass's
    assert readers and max(readers.values()) == 1


def _quack_ready() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and fastpath._quack_available())


@pytest.mark.skipif(not _quack_ready(), reason="needs a Hopper GPU with quack-kernels installed")
def test_quack_mlp_matches_the_compiled_mlp_on_gpu():
    """The fused SwiGLU GEMMs against the compiled MLP, bf16, on the fast path's step: the same
    loss and coprocessor gradients up to bf16 rounding (quack keeps g and u in fp32 registers)."""
    fastpath.enable_compile()
    dec, cop, ids, pts = _setup("llama", COPROCESSORS["copy"], T=128, P=4, B=2, hidden=64, device="cuda")
    dec = dec.to(torch.bfloat16)
    out = {}
    for mlp in ("compiled", "quack", "quack-all"):   # quack-all: the coprocessor's trained MLP too
        cop.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fastpath.multi_point_loss(dec, cop, ids, pts, 6, mlp=mlp)
        loss.backward()
        grads = _grads(cop)
        out[mlp] = (loss.detach().float(), torch.cat([g.flatten() for g in grads.values()]), grads.keys())
    l1, g1, k1 = out["compiled"]
    for mlp in ("quack", "quack-all"):
        l2, g2, k2 = out[mlp]
        assert k2 == k1, mlp
        torch.testing.assert_close(l1, l2, atol=2e-2, rtol=2e-3, msg=mlp)
        assert F.cosine_similarity(g1, g2, dim=0) > 0.999, mlp


def test_trainer_cuda_graph_says_what_it_needs(tmp_path, repeated_text_file):
    """--cuda-graph replays the fast path's step on one GPU: without --fast, with several
    micro-batches or on a CPU it is refused with the reason, before any step is taken."""
    from cacheaug_core.config import ConfigError

    with pytest.raises(ConfigError, match="add --fast"):
        TrainConfig(fast=False, cuda_graph=True)
    with pytest.raises(ConfigError, match="--grad-accum 1"):
        TrainConfig(fast=True, cuda_graph=True, grad_accum=2)
    decoder = save_tiny_decoder(tmp_path / "dec", "llama", layers=2)
    with pytest.raises(TrainingError, match="--cuda-graph: CUDA graphs need a GPU"):
        train(_cfg(tmp_path, decoder, repeated_text_file, cuda_graph=True), CoprocessorConfig(num_latents=2),
              show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_trainer_mlp_option_says_what_it_needs(tmp_path, repeated_text_file):
    """--mlp picks the fast path's MLP kernels: an unknown name or --mlp without --fast is a
    config error; quack's kernels asked for on a CPU are refused with the reason before any step
    (the same run with --mlp compiled trains)."""
    from cacheaug_core.config import ConfigError

    with pytest.raises(ConfigError, match="--mlp must be one of auto, compiled, quack, quack-all"):
        TrainConfig(fast=True, mlp="cutlass")
    with pytest.raises(ConfigError, match="add --fast"):
        TrainConfig(mlp="quack")
    decoder = save_tiny_decoder(tmp_path / "dec", "llama", layers=2)
    with pytest.raises(TrainingError, match="--mlp quack-all: .*needs a CUDA GPU"):
        train(_cfg(tmp_path, decoder, repeated_text_file, mlp="quack-all"), CoprocessorConfig(num_latents=2),
              show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train(_cfg(tmp_path, decoder, repeated_text_file, mlp="compiled", steps=1), CoprocessorConfig(num_latents=2),
          show_progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(not _quack_ready(), reason="needs a Hopper GPU with quack-kernels installed")
def test_trainer_mlp_quack_all_trains_like_the_compiled_mlp_on_gpu(tmp_path, repeated_text_file):
    """`train --fast --mlp quack-all` on a GPU: the run's losses are the compiled MLP's (same
    data and points, up to bf16 rounding), and what it saves loads back."""
    import json

    decoder = save_tiny_decoder(tmp_path / "dec", "llama", layers=2, hidden=64)
    cop_cfg = CoprocessorConfig(num_latents=4, num_layers=2)
    losses = {}
    for mlp in ("compiled", "quack-all"):
        run = tmp_path / f"run-{mlp}"
        kw = dict(device="", precision="bf16", seq_len=64, points=4, batch_size=4, steps=3, save_every=3,
                  out_dir=str(run), mlp=mlp)
        last = train(_cfg(tmp_path, decoder, repeated_text_file, **kw), cop_cfg, show_progress=False)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[mlp] = torch.tensor([r["loss"] for r in lines if "loss" in r])
        assert json.loads((last / "trainer_state.json").read_text())["step"] == 3
    assert len(losses["quack-all"]) == 3
    torch.testing.assert_close(losses["quack-all"], losses["compiled"], atol=3e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_cuda_graph_trains_like_the_plain_step(tmp_path, repeated_text_file):
    """On a GPU the replayed step gives the plain step's losses (same data, same points: up to
    the kernels' nondeterminism), and the run evaluates, saves and resumes as usual."""
    import json

    decoder = save_tiny_decoder(tmp_path / "dec", "llama", layers=2, hidden=64)
    cop_cfg = CoprocessorConfig(num_latents=4, num_layers=2)
    losses, last = {}, None
    for graph in (False, True):
        run = tmp_path / f"run-{graph}"
        kw = dict(device="", precision="bf16", seq_len=64, points=4, batch_size=4, steps=4, save_every=2,
                  eval_every=2, eval_batches=1, out_dir=str(run), cuda_graph=graph)
        last = train(_cfg(tmp_path, decoder, repeated_text_file, **kw), cop_cfg, show_progress=False)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[graph] = [r["loss"] for r in lines if "loss" in r]
    assert len(losses[True]) == 4
    assert sum("eval" in r for r in lines) == 2          # between replayed steps and at the end
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), atol=2e-2, rtol=1e-2)
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4


def test_step_breakdown_groups_kernels_and_rates_them(tmp_path, monkeypatch):
    """bench/step_breakdown.py: kernels sorted into matmul / attention / elementwise / ... by
    name (profiler annotations and C++ names with "#" in their lambdas told apart), each
    category's share, the matmuls' and attention's rates against their counted FLOPs, and the
    step time a fraction of peak asks for."""
    import json

    bench = _bench(monkeypatch)
    sb = _bench(monkeypatch, "step_breakdown")
    kernels = {
        "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN": ("matmul", 60.0),
        "kernel_cutlass_kernel_quackepiloguefrontendGemmMod_linear_act_epi": ("matmul", 20.0),
        "triton_tem_fused_flex_attention_backward_transpose_view_2": ("attention", 15.0),
        "triton_per_fused_flex_attention_backward_transpose_view_1": ("attention", 1.0),
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": ("attention", 4.0),
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": ("elementwise", 30.0),
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}": ("memory", 2.0),
        "Memset (Device)": ("memory", 1.0),
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>": ("optimizer", 1.5),
        "Optimizer.step#AdamW.step": ("annotation", 1.5),
        "void at::native::radixSortKVInPlace<2, -1, 16, 2, int, long>": ("other", 0.5),
    }
    csv = tmp_path / "k.csv"
    csv.write_text("kernel,calls,self_us\n" + "".join(f'"{k}",3,{ms * 1e3:.1f}\n' for k, (_, ms) in kernels.items()))
    for k, (cat, _) in kernels.items():
        assert sb.category(k) == cat, k
    out = tmp_path / "b.json"
    doc = sb.main([str(csv), "--batch", "4", "--out", str(out)])
    assert json.loads(out.read_text())["categories"] == doc["categories"]
    cats = doc["categories"]
    assert list(cats) == ["matmul", "attention", "elementwise", "optimizer", "memory", "other"]
    assert doc["kernel_ms"] == pytest.approx(135.0)                    # the annotation left out
    assert cats["matmul"]["ms"] == pytest.approx(80.0) and cats["matmul"]["calls"] == 6
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    fl = bench.counted_flops(bench.smollm2_config(), 4, 512, 16, 16, 16)
    linear = 4 * sum(fl["linear_per_seq"].values())
    assert cats["matmul"]["frac_peak"] == pytest.approx(linear / 0.080 / sb.H100_BF16)
    assert cats["attention"]["counted_flops"] == pytest.approx(fl["per_step"] - linear)
    assert "counted_flops" not in cats["elementwise"]
    assert doc["target_step_ms"] == pytest.approx(fl["per_step"] / (0.4 * sb.H100_BF16) * 1e3)
    assert doc["frac_peak_over_kernel_time"] == pytest.approx(fl["per_step"] / 0.135 / sb.H100_BF16)
    with pytest.raises(SystemExit):
        sb.main([str(tmp_path / "missing.csv"), "--batch", "4"])
