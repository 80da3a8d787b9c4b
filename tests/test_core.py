"""The method's invariants on tiny random decoders (Llama-, Qwen2-, GPT-2-style), CPU, seconds.

    pytest tests/test_core.py
"""

import pytest
import torch

from cacheaug_core import augment, kv, masks
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor
from tests.conftest import tiny_decoder

LAYOUTS = [
    dict(),
    dict(refeed_last=True),
    dict(latent_pos="shared"),
    dict(shift_ahead=False),
    dict(refeed_last=True, hide_point=True, shift_ahead=False, latent_gate=True, gate_init=-1.0),
]


def _ids(T=24, vocab=96, seed=1, B=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, T), generator=g)


def test_group_path_matches_full_pass(arch):
    """Cache + 4-D float mask + explicit position ids == one plain full pass."""
    dec = tiny_decoder(arch)
    ids = _ids(T=20, B=2)
    full = dec.base_model(input_ids=ids).last_hidden_state                     # (B, T, d)
    cache, _ = augment.prefill(dec, ids)
    points = torch.tensor([[3, 9, 14], [0, 5, 17]])
    layout = masks.GroupLayout(0, 3, shift_ahead=False)                          # no latents
    tokens, _, _ = masks.group_tokens(ids, points, layout)
    lat = torch.zeros(2, 3, 0, dec.config.hidden_size)
    out = augment.group_forward(dec, cache, points, lat, tokens, layout)
    h = out.last_hidden_state.view(2, 3, layout.group_len, -1)
    for b in range(2):
        for i, p in enumerate(points[b].tolist()):
            for j in range(layout.n_tokens):  # token x_{p+1+j}
                t = p + 1 + j
                if t < ids.shape[1]:
                    torch.testing.assert_close(h[b, i, j], full[b, t], atol=1e-4, rtol=1e-4)


def test_fork_leaves_source_untouched(arch):
    dec = tiny_decoder(arch)
    ids = _ids(T=12)
    cache, _ = augment.prefill(dec, ids)
    before = [k.clone() for k, _ in kv.to_layers(cache)]
    f = kv.fork(cache)
    dec(input_ids=ids[:, :3], past_key_values=f, use_cache=True)
    assert kv.length(f) == 15 and kv.length(cache) == 12
    for (k, _), k0 in zip(kv.to_layers(cache), before):
        assert torch.equal(k, k0)
    kv.crop(f, 12)
    assert kv.length(f) == 12
    with pytest.raises(ValueError):
        kv.crop(f, 13)


def test_select_rows_repeats_rows(arch):
    dec = tiny_decoder(arch)
    ids = _ids(T=8, B=2)                                       # (2, 8)
    cache, _ = augment.prefill(dec, ids)
    sel = kv.select_rows(cache, torch.tensor([1, 0, 1]))
    assert kv.length(sel) == 8
    for (k, v), (k2, v2) in zip(kv.to_layers(cache), kv.to_layers(sel)):
        assert k2.shape[0] == 3 and torch.equal(k2[0], k[1]) and torch.equal(k2[2], k[1]) and torch.equal(v2[1], v[0])
    out = dec(input_ids=ids[[1, 0, 1], :1], past_key_values=sel, use_cache=True)   # grows the selection only
    assert kv.length(cache) == 8 and out.logits.shape[0] == 3


def test_cache_continuation_matches_full(arch):
    dec = tiny_decoder(arch)
    ids = _ids(T=16)
    full = dec(input_ids=ids).logits
    cache, _ = augment.prefill(dec, ids[:, :10])
    out = dec(input_ids=ids[:, 10:], past_key_values=kv.from_layers(kv.to_layers(cache)), use_cache=True)
    torch.testing.assert_close(out.logits, full[:, 10:], atol=1e-4, rtol=1e-4)


def _reference_point_nll(dec, cop, ids, p, n_ahead):
    """The same quantity computed the slow, obvious way: separate forwards for one point."""
    layout = cop.layout(n_ahead)
    cache_p, _ = augment.prefill(dec, ids[:, : p + 1])
    NL = cop.config.num_latents
    pts = torch.tensor([[p]])
    if cop.body is None:
        lat = cop._scale(cop.soft_tokens[None])
    else:
        x = cop.soft_tokens[None]
        lat = None
        for r in range(cop.config.rounds):
            inp = x if lat is None else torch.cat([lat, x], dim=1)
            pos = p + 1 + torch.arange(inp.shape[1]) if cop.config.latent_pos == "continue" else \
                torch.full((inp.shape[1],), p + 1)
            out = cop.body(inputs_embeds=inp, position_ids=pos[None],
                           past_key_values=kv.select_layers(cache_p, cop.layer_ids), use_cache=True)
            lat = cop._scale(cop.out_proj(out.last_hidden_state[:, -NL:]))
    tokens, targets, valid = masks.group_tokens(ids, pts, layout)
    x = torch.cat([lat, dec.get_input_embeddings()(tokens[0])], dim=1)
    pos = masks.group_positions(pts, layout)[0]
    extra = {}
    if layout.hide_point:  # the group reads x_0..x_{p-1}: the re-fed x_p stands in for the original
        cache_p = kv.prefix(cache_p, p)
    if cop.gate_bias is not None:  # causal mask plus the gate bias on the latent keys
        K, G = kv.length(cache_p) + x.shape[1], x.shape[1]
        allowed = torch.ones(G, K, dtype=torch.bool)
        allowed[:, -G:] = torch.ones(G, G, dtype=torch.bool).tril()
        cols = torch.zeros(K, dtype=torch.bool)
        cols[K - G: K - G + NL] = True
        extra = {"attention_mask": masks.to_additive(allowed[None], torch.float32),
                 "latent_gate": (cop.gate_bias, cols)}
    logits = dec(inputs_embeds=x, position_ids=pos, past_key_values=kv.fork(cache_p), use_cache=True, **extra).logits
    nll = augment.token_nll(logits[0, -n_ahead:], targets[0, 0], valid[0, 0])
    return nll


@pytest.mark.parametrize("arch_", ["llama", "qwen2", "gpt2"])
def test_closed_gate_is_the_plain_decoder(arch_, tiny_tokenizer):
    """hide_point + no shift + a closed gate: the augmented decoder computes the plain decoder's
    predictions at every ahead position, in the one-pass scorer and in streaming generation."""
    dec = tiny_decoder(arch_)
    cfg = CoprocessorConfig(num_latents=3, refeed_last=True, hide_point=True, shift_ahead=False,
                            latent_gate=True, gate_init=-1e4)
    cop = Coprocessor(cfg, dec).eval()
    ids = _ids(T=20)
    aug, base = augment.score_after_every_token(dec, cop, ids, positions=5, points_per_pass=7)
    torch.testing.assert_close(aug, base, atol=1e-4, rtol=1e-4, equal_nan=True)
    tiny_tokenizer.eos_token_id = None
    prompt = ids[:, :8]
    kw = dict(max_new_tokens=8, reaugment_every=3)
    got = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, **kw)]
    plain = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, augment=False, **kw)]
    assert got == plain
    # an open gate (bias 0) changes the predictions: the latents are read
    with torch.no_grad():
        cop.gate_bias.zero_()
    aug0, _ = augment.score_after_every_token(dec, cop, ids, positions=5)
    assert not torch.allclose(aug0[:-1, 0], base[:-1, 0], atol=1e-3)


def test_gate_gets_gradients_and_needs_refeed():
    dec = tiny_decoder("llama")
    cop = Coprocessor(CoprocessorConfig(num_latents=2, refeed_last=True, hide_point=True, shift_ahead=False,
                                        latent_gate=True), dec)
    loss, _ = augment.multi_point_loss(dec, cop, _ids(T=16, B=2), torch.tensor([[3, 9], [1, 12]]), 4)
    loss.backward()
    assert cop.gate_bias.grad is not None and cop.gate_bias.grad.abs().sum() > 0
    assert "gate_bias" in cop.trainable_state()
    with pytest.raises(ValueError, match="--hide-point needs --refeed-last"):
        CoprocessorConfig(hide_point=True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_multi_point_equals_point_by_point(arch, layout):
    dec = tiny_decoder(arch)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **layout), dec)
    ids = _ids(T=18, B=2)
    points = torch.tensor([[2, 7, 15], [0, 11, 16]])
    loss, nll = augment.multi_point_loss(dec, cop, ids, points, n_ahead=4)
    for b in range(2):
        for i, p in enumerate(points[b].tolist()):
            ref = _reference_point_nll(dec, cop, ids[b: b + 1], p, 4)
            torch.testing.assert_close(nll[b, i], ref, atol=2e-4, rtol=2e-4, equal_nan=True)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("body,extra", [("copy", {"rounds": 2}), ("lora", {"lora_rank": 4}), ("scratch", {}),
                                        ("none", {}), ("copy", {"num_layers": 2, "layer_map": "spread"})])
def test_body_variants_match_reference(body, extra):
    dec = tiny_decoder("llama")
    cop = Coprocessor(CoprocessorConfig(num_latents=2, body=body, **extra), dec)
    ids = _ids(T=14)
    points = torch.tensor([[4, 9]])
    _, nll = augment.multi_point_loss(dec, cop, ids, points, n_ahead=3)
    for i, p in enumerate(points[0].tolist()):
        torch.testing.assert_close(nll[0, i], _reference_point_nll(dec, cop, ids, p, 3), atol=2e-4, rtol=2e-4)


def test_trainable_state_per_body():
    dec = tiny_decoder("llama")
    lora = Coprocessor(CoprocessorConfig(num_latents=2, body="lora", lora_rank=4), dec).trainable_state()
    assert all(("lora_" in k) or k in ("soft_tokens", "latent_gain") or k.startswith("out_proj") for k in lora)
    assert any("lora_A" in k for k in lora)
    pause = Coprocessor(CoprocessorConfig(num_latents=2, body="none"), dec).trainable_state()
    assert set(pause) == {"soft_tokens", "latent_gain"}
    small = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec)
    assert len(small.body.layers) == 1


def test_gradients_reach_coprocessor_and_decoder_stays_frozen(arch):
    dec = tiny_decoder(arch)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    cop = Coprocessor(CoprocessorConfig(num_latents=2), dec)
    opt = torch.optim.AdamW(cop.parameters(), lr=1e-2)
    ids = _ids(T=16, B=2)
    for step in range(3):
        pts = masks.sample_points(16, 3, 2, torch.Generator().manual_seed(step))
        loss, _ = augment.multi_point_loss(dec, cop, ids, pts, 4)
        opt.zero_grad()
        loss.backward()
        assert cop.soft_tokens.grad is not None and cop.soft_tokens.grad.abs().sum() > 0
        body_grads = [p.grad for p in cop.body.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in body_grads)
        assert all(p.grad is None for p in dec.parameters())
        opt.step()
    for k, v in dec.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not dec.training


def test_plain_generation_equals_hf_generate(arch, tiny_tokenizer):
    dec = tiny_decoder(arch)
    prompt = _ids(T=7)
    ref = dec.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    tiny_tokenizer.eos_token_id = None
    got = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, None, prompt, augment=False,
                                                        max_new_tokens=10)]
    assert got == ref


@pytest.mark.parametrize("layout", LAYOUTS[:3] + LAYOUTS[4:], ids=["default", "refeed", "shared", "gated"])
def test_augmented_generation_matches_scoring(layout, tiny_tokenizer):
    """Greedy augmented generation reads the same distribution the multi-point scorer does."""
    dec = tiny_decoder("llama")
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **layout), dec)
    prompt = _ids(T=9)
    tiny_tokenizer.eos_token_id = None
    steps = list(augment.stream_generate(dec, tiny_tokenizer, cop, prompt, augment=True, max_new_tokens=5))
    toks = torch.tensor([[s.token_id for s in steps]])
    full = torch.cat([prompt, toks], dim=1)
    sc = augment.score_continuation(dec, cop, full, point=8)
    assert sc.logits_aug.argmax(-1).tolist() == toks[0].tolist()


@pytest.mark.parametrize("arch_", ["llama", "gpt2"])
def test_gated_decoding_logits_match_scoring(arch_):
    """Decoding after a gated group (hidden point entry, open-ish gate) reuses its mask rows from
    step to step (`_AugState._decode_kwargs`); every step's logits equal the scorer's, also
    when the rows run out of room and are rebuilt."""
    dec = tiny_decoder(arch_)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **LAYOUTS[4]), dec)
    with torch.no_grad():
        cop.gate_bias.copy_(torch.linspace(-1.0, 1.0, cop.gate_bias.numel()))
    full = _ids(T=16)
    point = 8
    sc = augment.score_continuation(dec, cop, full, point=point)
    with torch.no_grad():
        st = augment._AugState(dec, cop)
        got = [st.prefill_and_insert(full[:, : point + 1])]
        for j in range(point + 1, full.shape[1] - 1):
            got.append(st.feed_after(full[0, j: j + 1]))
            if j % 2:   # keep the rows exactly as long as the cache: the next step must rebuild them
                st._rows = st._rows[..., : kv.length(st.cache)]
    got = torch.log_softmax(torch.stack(got).float(), dim=-1)        # the scorer keeps log-probabilities
    torch.testing.assert_close(got, sc.logits_aug[: len(got)], atol=1e-5, rtol=1e-5)


def test_reaugment_and_async_generation_run(tiny_tokenizer):
    dec = tiny_decoder("qwen2")
    cop = Coprocessor(CoprocessorConfig(num_latents=2, refeed_last=True), dec)
    prompt = _ids(T=6)
    tiny_tokenizer.eos_token_id = None
    a = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, max_new_tokens=9,
                                                      reaugment_every=3)]
    b = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, max_new_tokens=9,
                                                      async_delay=2)]
    plain = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, augment=False,
                                                          max_new_tokens=9)]
    assert len(a) == len(b) == 9
    # async: the first 2 tokens come before any latent is read, so they equal the plain arm's
    assert b[:2] == plain[:2]


# The layer-split prefill of the first augmentation (`_AugState.prefill_and_insert`) against the
# path it replaces (feed_clean, latents_now, insert): compact coprocessors of 1-2 of 4 decoder layers, so
# the combined pass of prompt and group rows spans more than one layer.
SPLIT_LAYOUTS = {   # name: (coprocessor config, K: decoder layers the split runs before the coprocessor)
    "default": (dict(num_layers=2), 2),
    "refeed": (dict(num_layers=1, refeed_last=True), 1),
    "shared": (dict(num_layers=2, latent_pos="shared", refeed_last=True), 2),
    "gated": (dict(num_layers=2, refeed_last=True, hide_point=True, shift_ahead=False, latent_gate=True,
                   gate_init=-1.0), 2),
    "pause": (dict(body="none", refeed_last=True, latent_gate=True, gate_init=0.5), 0),   # reads no layer
}


def _split_off(d, c):
    return None


def _three_call_state(dec, cop, prompt):
    st = augment._AugState(dec, cop)
    st.feed_clean(prompt)
    return st, st.insert(st.latents_now(), prompt[0, -1])


@pytest.mark.parametrize("arch_", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(SPLIT_LAYOUTS))
def test_layer_split_prefill_matches_insert(arch_, name):
    """Same first-token logits, same cache layout and contents, same later steps (a token after
    the group, then a re-augmentation through the unchanged path)."""
    layout, K = SPLIT_LAYOUTS[name]
    dec = tiny_decoder(arch_, layers=4)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **layout), dec).eval()
    assert augment._split_depth(dec, cop) == K
    prompt = _ids(T=11)
    with torch.no_grad():
        ref, ref_logits = _three_call_state(dec, cop, prompt)
        st = augment._AugState(dec, cop)
        logits = st.prefill_and_insert(prompt)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for attr in ("clean_len", "next_pos", "hidden", "latent_cols"):
            assert getattr(st, attr) == getattr(ref, attr), attr
        got, want = kv.to_layers(st.cache), kv.to_layers(ref.cache)
        assert len(got) == len(want) == dec.config.num_hidden_layers
        for (k, v), (k0, v0) in zip(got, want):
            assert k.shape == k0.shape and k.shape[2] == 11 + 3 + int(cop.config.refeed_last)
            torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)
        t = torch.tensor([int(logits.argmax())])
        torch.testing.assert_close(st.feed_after(t), ref.feed_after(t), atol=1e-5, rtol=1e-5)
        for s in (st, ref):
            s.drop_group()
            s.feed_clean(t.view(1, 1))
        torch.testing.assert_close(st.insert(st.latents_now(), t), ref.insert(ref.latents_now(), t),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch_", ["llama", "qwen2"])
@pytest.mark.parametrize("name", ["default", "gated", "pause"])
@pytest.mark.parametrize("reaugment_every", [0, 3])
def test_layer_split_generation_matches(arch_, name, reaugment_every, tiny_tokenizer, monkeypatch):
    """Whole greedy generations with the layer-split first augmentation equal the previous path's."""
    dec = tiny_decoder(arch_, layers=4)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **SPLIT_LAYOUTS[name][0]), dec).eval()
    assert augment._split_depth(dec, cop) == SPLIT_LAYOUTS[name][1]
    prompt = _ids(T=9, seed=4)
    tiny_tokenizer.eos_token_id = None
    kw = dict(max_new_tokens=10, reaugment_every=reaugment_every)
    got = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, **kw)]
    monkeypatch.setattr(augment, "_split_depth", _split_off)
    want = [s.token_id for s in augment.stream_generate(dec, tiny_tokenizer, cop, prompt, **kw)]
    assert got == want


@pytest.mark.parametrize("arch_,layout", [
    ("gpt2", dict(num_layers=1, refeed_last=True, hide_point=True, latent_gate=True)),  # no rotary in its layers
    ("llama", dict()),                                                 # the coprocessor reads every layer
    ("qwen2", dict(num_layers=2, layer_map="spread", refeed_last=True)),  # layers 0 and 3 of 4: K == L
], ids=["gpt2", "all-layers", "spread"])
def test_layer_split_falls_back(arch_, layout, tiny_tokenizer):
    """Where the split does not apply or gains nothing, prefill_and_insert takes the previous path
    (feed_clean, latents_now, insert) and generation works as before."""
    tiny_tokenizer.eos_token_id = None
    prompt = _ids(T=8)
    dec = tiny_decoder(arch_, layers=4)
    cop = Coprocessor(CoprocessorConfig(num_latents=2, **layout), dec).eval()
    assert augment._split_depth(dec, cop) is None
    with torch.no_grad():
        _, ref_logits = _three_call_state(dec, cop, prompt)
        logits = augment._AugState(dec, cop).prefill_and_insert(prompt)
    assert torch.equal(logits, ref_logits)
    steps = list(augment.stream_generate(dec, tiny_tokenizer, cop, prompt, max_new_tokens=6, reaugment_every=2))
    assert len(steps) == 6 and steps[0].augmented_at and steps[0].token_id == int(ref_logits.argmax())


def test_score_after_every_token_shapes_and_base(arch):
    dec = tiny_decoder(arch)
    cop = Coprocessor(CoprocessorConfig(num_latents=2), dec)
    ids = _ids(T=12)
    aug, base = augment.score_after_every_token(dec, cop, ids, positions=4, points_per_pass=5)
    assert aug.shape == base.shape == (11, 4)
    _, logits = augment.prefill(dec, ids)
    plain = augment.plain_nll(logits, ids)[0]
    assert torch.allclose(base[3, 0], plain[4]) and torch.isnan(base[10, 1])
    assert torch.isnan(aug[10, 1]) and torch.isfinite(aug[:8]).all()


def test_sample_points_distinct_sorted():
    p = masks.sample_points(32, 8, 4, torch.Generator().manual_seed(0))
    assert p.shape == (4, 8) and (p[:, 1:] > p[:, :-1]).all() and p.max() <= 30


def test_block_mask_equals_dense_mask():
    """The FlexAttention BlockMask's rule is exactly the dense group mask (checked element-wise;
    flex itself has no CPU backward and is numerically unreliable on CPU, so the GPU benchmark
    compares losses and gradients end to end)."""
    T, G = 30, 5
    pts = masks.sample_points(T, 4, 3, torch.Generator().manual_seed(1))
    bm = masks.group_block_mask(T, pts, G)
    B, P = pts.shape
    b = torch.arange(B)[:, None, None]
    q = torch.arange(P * G)[None, :, None]
    k = torch.arange(T + P * G)[None, None, :]
    rule = bm.mask_mod(b, torch.zeros(()), q, k)
    assert torch.equal(rule, masks.group_allowed(T, pts, G))
    assert bm.shape[-2:] == (P * G, T + P * G)


def test_append_allowed():
    seen = torch.tensor([[True, False, True], [True, True, False]])        # (B=2, K=3)
    new = torch.tensor([[True, True], [False, True]])                       # (B=2, n=2)
    a = masks.append_allowed(seen, new)                                     # (2, 2, 5)
    assert a.shape == (2, 2, 5)
    assert a[0].tolist() == [[True, False, True, True, False], [True, False, True, True, True]]
    assert a[1].tolist() == [[True, True, False, False, False], [True, True, False, False, True]]


def test_decoder_paths_that_do_not_exist_and_pickled_weights_are_refused(tmp_path):
    """A missing local folder says so (not a Hub id error), and a folder with only a pickled
    `pytorch_model.bin` is refused rather than unpickled."""
    from cacheaug_core.decoder import DecoderLoadError, load_decoder
    from tests.conftest import byte_tokenizer

    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(DecoderLoadError, match="no folder at"):
            load_decoder(name)
    tok = byte_tokenizer()
    model = tiny_decoder("llama", vocab=len(tok))
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")   # the old pickled format
    tok.save_pretrained(tmp_path / "pickled")
    with pytest.raises(DecoderLoadError, match="could not load decoder"):
        load_decoder(str(tmp_path / "pickled"))


def test_app_module_imports_from_any_working_directory(tmp_path):
    """`cacheaug app` imports `cacheaug_core.app`: it must be installed with the package, not only
    found in the checkout."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import cacheaug_core.app as app, sys; sys.stdout.write(app.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("app.py")
