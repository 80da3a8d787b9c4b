"""Mode (a) scoring: `augment.score_continuation` and `workbench.compare_next_token` against
whole-matrix references (the row-chunked CPU paths must give the same numbers)."""

import pytest
import torch
import torch.nn.functional as F

from cacheaug_core import augment
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.workbench import compare_next_token
from tests.conftest import tiny_decoder


@pytest.mark.parametrize("layout", [dict(), dict(refeed_last=True), dict(latent_pos="shared"),
                                    dict(refeed_last=True, hide_point=True, shift_ahead=False, latent_gate=True,
                                         gate_init=-1.0)],
                         ids=["default", "refeed", "shared", "gated"])  # "gated": the shipped layout
def test_score_continuation_matches_reference(arch, layout):
    dec = tiny_decoder(arch)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **layout), dec).eval()
    T = 21
    ids = torch.randint(1, 96, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = dec(input_ids=ids).logits[0].float()
    for point in (0, 6, T - 2):  # 20 scored rows per arm (several 8-row chunks, a partial one), 14, 1
        C = T - 1 - point
        sc = augment.score_continuation(dec, cop, ids, point)
        with torch.no_grad():
            mp = augment.multi_point(dec, cop, ids, torch.tensor([[point]]), C)
        ref_base, ref_aug = full[point:-1], mp.logits[0, 0].float()
        tgt = ids[0, point + 1:]
        assert sc.logits_base.shape == sc.logits_aug.shape == (C, full.shape[-1])
        assert sc.logits_base.dtype == sc.logits_aug.dtype == torch.float32
        torch.testing.assert_close(sc.logits_base, torch.log_softmax(ref_base, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc.logits_aug, torch.log_softmax(ref_aug, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc.nll_base, F.cross_entropy(ref_base, tgt, reduction="none"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc.nll_aug, augment.token_nll(ref_aug, mp.targets[0, 0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc.latents, mp.latents[0, 0])


@pytest.mark.parametrize("gated", [False, True], ids=["default", "gated"])
def test_score_continuation_with_attention_reads_the_group_once(arch, gated):
    """With attention the scores come from the eager pass that also yields the attention weights:
    the same NLLs as the SDPA pass, and each row's attention on the latents is a share of 1."""
    layout = dict(refeed_last=True, hide_point=True, shift_ahead=False, latent_gate=True, gate_init=-1.0) if gated else {}
    dec = tiny_decoder(arch)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, **layout), dec).eval()
    ids = torch.randint(1, 96, (1, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = augment.score_continuation(dec, cop, ids, 5)
        both = augment.score_continuation(dec, cop, ids, 5, with_attention=True)
        cache, _ = augment.prefill(dec, ids)
        ref = augment.latent_attention(dec, cop, cache, ids, 5, both.latents[None, None])
    assert plain.attn_to_latents is None and both.attn_to_latents.shape == (11, 3)
    torch.testing.assert_close(both.nll_aug, plain.nll_aug, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.nll_base, plain.nll_base)
    torch.testing.assert_close(both.attn_to_latents, ref)
    assert bool((both.attn_to_latents >= 0).all()) and bool((both.attn_to_latents.sum(-1) <= 1 + 1e-5).all())


@pytest.mark.parametrize("rows", [1, 3, 8, 100])
def test_compare_next_token_matches_whole_matrix(rows):
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(19, 50, generator=g) * 3
    xa = xb + torch.randn(19, 50, generator=g)
    lb, la = torch.log_softmax(xb, -1), torch.log_softmax(xa, -1)
    (ib, pb), (ia, pa), kl = compare_next_token(lb, la, 5, rows_per_chunk=rows)
    kb, ka = lb.topk(5, -1), la.topk(5, -1)
    assert torch.equal(ib, kb.indices) and torch.equal(ia, ka.indices)
    torch.testing.assert_close(pb, kb.values.exp())
    torch.testing.assert_close(pa, ka.values.exp())
    torch.testing.assert_close(kl, F.kl_div(lb, la, reduction="none", log_target=True).sum(-1))
    assert (kl >= -1e-6).all()


def test_score_text_reuses_the_last_analysis(monkeypatch):
    """Token clicks re-read the last mode (a) analysis instead of scoring the text again."""
    from cacheaug_core.workbench import Workbench
    from tests.conftest import TinyTokenizer

    dec = tiny_decoder("llama")
    cop = Coprocessor(CoprocessorConfig(num_latents=2), dec).eval()
    wb = Workbench(dec, TinyTokenizer(), None, cop, "untrained-test")
    calls = []
    real = augment.score_continuation
    monkeypatch.setattr(augment, "score_continuation", lambda *a, **k: calls.append(k) or real(*a, **k))
    text = "abcdefghijklmnop"
    first = wb.score_text(text, point=3, top_k=4, with_attention=True)
    again = wb.score_text(text, point=3, top_k=4, with_attention=False)     # a click: attention not needed
    assert len(calls) == 1
    for k in ("nll_base", "nll_aug", "kl_aug_base", "latents"):
        assert (first[k] == again[k])[~(first[k] != first[k])].all()      # equal where not NaN
    again["nll_aug"][:] = 0                                                  # callers get copies
    assert not (wb.score_text(text, point=3, top_k=4)["nll_aug"] == 0).all()
    wb.score_text(text, point=4, top_k=4)                                    # another point: scored again
    wb.score_text(text + "q", point=4, top_k=4)                              # another text: scored again
    assert len(calls) == 3


@pytest.mark.parametrize("fast", [False, True], ids=["transformers", "fastpath"])
def test_partial_rows_of_mode_b_equal_the_final_rows(fast):
    """Mode (b) pass by pass: each partial result holds exactly the final rows of the points scored so
    far (NaN after them), and the last one is `score_after_every_token`'s result."""
    dec = tiny_decoder("llama")
    cop = Coprocessor(CoprocessorConfig(num_latents=3), dec).eval()
    T, A = 23, 4
    ids = torch.randint(1, 96, (1, T), generator=torch.Generator().manual_seed(5))
    final_aug, final_base = augment.score_after_every_token(dec, cop, ids, A, points_per_pass=5, fast=fast)
    seen = []
    parts = list(augment.iter_score_after_every_token(dec, cop, ids, A, points_per_pass=5, fast=fast,
                                                      progress=seen.append))
    assert [d for d, _, _ in parts] == [5, 10, 15, 20, 22] and seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for done, aug, base in parts:
        assert aug.shape == final_aug.shape == (T - 1, A)
        torch.testing.assert_close(aug[:done], final_aug[:done], equal_nan=True, atol=0, rtol=0)
        assert torch.isnan(aug[done:]).all()
        torch.testing.assert_close(base, final_base, equal_nan=True, atol=0, rtol=0)
    assert parts[0][1] is not parts[-1][1]                       # a partial is not overwritten by later passes
    torch.testing.assert_close(parts[-1][1], final_aug, equal_nan=True, atol=0, rtol=0)
