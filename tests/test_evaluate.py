"""Evaluation metrics on tiny random decoders, checked against slow obvious computations. CPU, seconds.

    pytest -m "not integration" tests/test_evaluate.py   # fast, tiny models
    pytest -m integration tests/test_evaluate.py         # `eval bench --limit 5` on the real default model
"""

import json
import math
import re

import numpy as np
import pytest
import torch

from cacheaug_core import augment
from cacheaug_core import eval as ev
from cacheaug_core.eval import cli as eval_cli
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.workbench import Workbench
from tests.conftest import TinyTokenizer, byte_tokenizer, save_tiny_decoder, tiny_decoder

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine the thread
    hand-offs cost more than the matmuls (several seconds per test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DOCS = ["the quick brown fox jumps over the lazy dog",
        "pack my box with five dozen liquor jugs, said the sphinx of black quartz",
        "how vexingly quick daft zebras jump"]


def _wb(arch="llama", num_latents=3, tokenizer=None, pause=False, **layout):
    dec = tiny_decoder(arch)
    cop = Coprocessor(CoprocessorConfig(num_latents=num_latents, num_layers=2, **layout), dec).eval()
    wb = Workbench(dec, tokenizer or TinyTokenizer(), None, cop, "untrained-test")
    if pause:
        wb.pause = Coprocessor(CoprocessorConfig(num_latents=2, body="none"), dec).eval()
    return wb


@torch.no_grad()
def _hand_logprob(dec, cop, ctx, cont, delay=0):
    """Summed log-prob of cont after ctx, token by token through the streaming decode state
    (separate forwards, no group masks): plain, or latents from the context inserted after
    `delay` continuation tokens."""
    if cop is None:
        x = torch.tensor([ctx + cont])
        lp = torch.log_softmax(dec(input_ids=x).logits[0].float(), -1)
        return sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    st = augment._AugState(dec, cop)
    logits = st.feed_clean(torch.tensor([ctx]))
    z = st.latents_now()                                     # computed from the context alone
    in_group = False
    if delay == 0:
        logits, in_group = st.insert(z, torch.tensor(ctx[-1])), True
    total = 0.0
    for i, y in enumerate(cont):
        total += float(torch.log_softmax(logits.float(), -1)[y])
        t = torch.tensor([y])
        if not in_group and i + 1 == delay:                  # y is continuation token number `delay`
            st.feed_clean(t.view(1, 1))
            logits, in_group = st.insert(z, t), True
        elif in_group:
            logits = st.feed_after(t)
        else:
            logits = st.feed_clean(t.view(1, 1))
    return total


# -- perplexity by position -------------------------------------------------------------------


def test_load_documents(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Title\n\nits body\nstill one\n\f\n  \n\f \nsecond doc\n")
    assert ev.read_documents(p) == ["Title\n\nits body\nstill one", "second doc"]  # blank lines do not split
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"title": "Fox", "text": "a b", "source": "wiki"}) + "\n\n" + json.dumps({"text": "c"})
                 + "\n" + json.dumps({"title": "Dog", "text": "Dog\n\nbarks"}) + "\n")
    docs = ev.load_documents(j)
    assert [d.text for d in docs] == ["Fox\n\na b", "c", "Dog\n\nbarks"]       # a title already in front: once
    assert [d.source for d in docs] == ["wiki", "", ""]
    for bad in ('{"no_text": 1}\n', '[1, 2]\n', '{"text": 3}\n', "not json\n"):
        j.write_text(bad)
        with pytest.raises(ev.EvalError, match="t.jsonl:1"):
            ev.read_documents(j)


@pytest.mark.parametrize("sink", [None, 95])
def test_document_windows_never_split_a_document(sink):
    """Every augmentation point of a document is scored in exactly one window; that window starts with
    the sink, holds the document's start or at least `context` tokens before the point, and holds all
    of the point's targets; windows keep to `chunk`."""
    chunk, A, ctx = 16, 3, 4
    for L in [1, 2, 5, 14, 15, 16, 17, 40, 61]:
        ids = list(range(1, L + 1))
        ws = ev.document_windows(ids, 7, chunk, A, ctx, sink)
        P = 0 if sink is None else 1
        owned = [j for w in ws for j in range(*w.own)]
        assert owned == list(range(-P, L - 1)) if L + P >= 2 else ws == []
        for w in ws:
            assert w.doc == 7 and len(w.ids) <= chunk and w.prefix == P
            assert w.ids[:P] == ([] if sink is None else [sink])
            assert w.ids[P:] == ids[w.first: w.first + len(w.ids) - P]          # contiguous document text
            q0, q1 = w.own
            assert w.first == 0 or w.first <= q0 - ctx                          # the start, or enough context
            last_target = min(q1 - 1 + A, L - 1)
            assert last_target < w.first + len(w.ids) - P                       # every target inside
        if 2 <= L + P <= chunk:
            assert len(ws) == 1 and ws[0].first == 0


def test_resolve_sink():
    tok = TinyTokenizer()
    assert ev.resolve_sink(tok, "auto")["token_id"] == tok.eos_token_id    # no BOS: EOS
    tok.bos_token_id = 5
    assert ev.resolve_sink(tok, "auto") == {"mode": "auto", "token_id": 5, "token": tok.decode([5])}
    assert ev.resolve_sink(tok, "none")["token_id"] is None
    assert ev.resolve_sink(tok, "a")["token_id"] == tok.get_vocab()["a"]
    with pytest.raises(ev.EvalError, match="not a token"):
        ev.resolve_sink(tok, "<|nope|>")
    bpe = byte_tokenizer()                     # has <|endoftext|>: the document separator comes first
    bpe.bos_token = "a"
    assert ev.resolve_sink(bpe, "auto")["token"] == "<|endoftext|>"


def test_ppl_summary_sign_and_arithmetic():
    # two positions; augmented NLL lower at position 1, higher at position 2
    sa, sb, n = np.array([[2.0, 6.0]]), np.array([[3.0, 5.0]]), np.array([[4, 4]])
    s = ev.ppl_summary(sa, sb, n)
    assert s["ppl_decoder"][0] == pytest.approx(math.exp(0.75))
    assert s["ppl_augmented"][0] == pytest.approx(math.exp(0.5))
    assert s["rel_ppl_change_pct"][0] == pytest.approx((math.exp(0.5) / math.exp(0.75) - 1) * 100)
    assert s["rel_ppl_change_pct"][0] < 0 < s["rel_ppl_change_pct"][1]    # negative = latents help
    assert s["tokens_scored"].tolist() == [4, 4]


def test_bootstrap_interval_contains_point():
    rng = np.random.default_rng(0)
    U, A = 40, 3
    n = rng.integers(5, 30, (U, A)).astype(float)
    sb = n * (2.0 + rng.normal(0, 0.3, (U, A)))
    sa = sb - n * (0.05 + rng.normal(0, 0.1, (U, A)))
    point = ev.ppl_summary(sa, sb, n)["rel_ppl_change_pct"]
    ci = ev.bootstrap_rel_change(sa, sb, n, n_boot=500)
    assert ci.shape == (A, 2)
    assert np.all(ci[:, 0] <= point) and np.all(point <= ci[:, 1]) and np.all(ci[:, 0] < ci[:, 1])


@torch.no_grad()
def _hf_nll(dec, seq: list[int], i: int) -> float:
    """NLL of seq[i] given seq[:i], from the decoder's own transformers forward."""
    lp = torch.log_softmax(dec(input_ids=torch.tensor([seq[:i]])).logits[0, -1].float(), -1)
    return -float(lp[seq[i]])


def _force_path(monkeypatch, fast: bool) -> None:
    """fast=False: `score_after_every_token` takes the transformers path (what a GPU runs) on CPU too."""
    if not fast:
        monkeypatch.setattr(augment.fastpath, "unsupported", lambda *a, **k: "the GPU's path, forced by the test")


@pytest.mark.parametrize("sink,fast", [(None, True), (0, True), (0, False)])
def test_perplexity_by_position_decoder_arm_is_the_plain_forward(sink, fast, monkeypatch):
    """Whole documents with the sink in front: every scored sequence starts with the same sink for
    every arm, the decoder arm's position-1 NLL is transformers' own next-token NLL over each whole
    document after the sink (the sink never a target), and body + doc_start add up to the total."""
    _force_path(monkeypatch, fast)
    wb = _wb()
    seen = []
    real = augment.score_after_every_token

    def spy(dec, cop, x, *a, **k):
        seen.append((cop, x[0].tolist()))
        return real(dec, cop, x, *a, **k)

    monkeypatch.setattr(augment, "score_after_every_token", spy)
    pause = Coprocessor(CoprocessorConfig(num_latents=2, body="none"), wb.decoder).eval()
    res = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, DOCS, positions=3, chunk=80,
                                          points_per_pass=5, n_boot=200, sink=sink, others={"pause": pause})
    enc = [wb.tokenizer.encode(d) for d in DOCS]
    pre = [] if sink is None else [sink]
    assert [x for c, x in seen if c is wb.coprocessor] == [pre + ids for ids in enc]          # whole documents
    assert [x for c, x in seen if c is pause] == [x for c, x in seen if c is wb.coprocessor]   # same input, same sink
    # position 1, decoder arm: transformers' next-token NLL of every token after the sink (or the first token)
    first = [_hf_nll(wb.decoder, pre + ids, i) for ids in enc for i in range(1, len(pre) + len(ids))]
    assert res["tokens_scored"][0] == len(first)
    assert res["nll_decoder"][0] == pytest.approx(float(np.mean(first)), rel=1e-5)
    # doc_start at position 1: document indices 0-3 after a sink, 1-3 without (index 0 has no context)
    assert res["tokens_scored_doc_start"][0] == (4 if sink is not None else 3) * len(DOCS)
    # the split adds up: token counts and NLL sums of both arms, at every position
    for arm in ("decoder", "augmented"):
        for i in range(3):
            n, nb, ns = (res[k][i] for k in ("tokens_scored", "tokens_scored_body", "tokens_scored_doc_start"))
            assert n == nb + ns
            assert res[f"nll_{arm}"][i] * n == pytest.approx(res[f"nll_{arm}_body"][i] * nb
                                                             + res[f"nll_{arm}_doc_start"][i] * ns, rel=1e-9)
    assert res["data"]["documents"] == res["documents"] == 3 and res["bootstrap"]["unit"] == "document"
    for (lo, hi), p in zip(res["rel_ppl_change_ci95"], res["rel_ppl_change_pct"]):
        assert lo <= p <= hi
    # the comparison: the difference of the two arms' changes, with an interval around it
    cmp = res["compare"]["pause"]["all"]
    want = np.array(res["rel_ppl_change_pct"]) - np.array(res["arms"]["pause"]["rel_ppl_change_pct"])
    np.testing.assert_allclose(cmp["difference_pct_points"], want, rtol=1e-9)
    assert cmp["mean_1_3"] == pytest.approx(want.mean())
    assert all(lo <= d <= hi for (lo, hi), d in zip(cmp["ci95"], want))


def test_long_document_windows_score_each_target_once():
    """A document longer than the chunk: every (point, position) pair is scored once, so the token
    counts equal those of one window over the whole document."""
    wb = _wb()
    doc = [" ".join(DOCS)]
    kw = dict(positions=3, points_per_pass=8, n_boot=20, sink=0)
    one = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, doc, chunk=200, **kw)
    many = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, doc, chunk=40, context=8, **kw)
    assert many["data"]["windows"] > 3 and one["data"]["windows"] == 1
    for k in ("tokens_scored", "tokens_scored_body", "tokens_scored_doc_start"):
        assert many[k] == one[k]


@pytest.mark.parametrize("fast", [True, False])
def test_extra_keys_arm_is_the_decoder_reading_inserted_sink_tokens(fast, monkeypatch):
    """The third arm through the augmentation code equals transformers' forward over the text with
    N sink tokens physically inserted after each augmentation point (default layout: the latents
    continue the positions, the text after them shifted), on the CPU fast path and on the
    transformers path a GPU takes."""
    _force_path(monkeypatch, fast)
    wb = _wb()
    N, A, sink = 2, 3, 7
    keys = ev.sink_keys(wb.decoder, wb.coprocessor, N, sink)
    ids = wb.tokenizer.encode(DOCS[2])[:12]
    sc = ev.score_documents(wb.decoder, wb.tokenizer, {"extra_keys": keys}, [wb.tokenizer.decode(ids)],
                                  positions=A, chunk=64, sink=sink, points_per_pass=4)
    seq = [sink] + ids
    want, cnt = np.zeros((2, A)), np.zeros((2, A))
    for p in range(len(seq) - 1):
        for n in range(1, A + 1):
            if p + n >= len(seq):
                continue
            s = int(p + n - 1 >= 4)                                   # the target's index in the document
            want[s, n - 1] += _hf_nll(wb.decoder, seq[: p + 1] + [sink] * N + seq[p + 1: p + n + 1], p + N + n)
            cnt[s, n - 1] += 1
    np.testing.assert_allclose(sc.nll["extra_keys"][0], want, rtol=1e-4)
    np.testing.assert_array_equal(sc.count[0], cnt)


def test_extra_keys_arm_sits_behind_the_coprocessors_learned_gate():
    """With a gated coprocessor the sink copies get its learned gate (not the initial one, not
    none): they are exactly as visible to the decoder as the latents they stand in for."""
    dec = tiny_decoder()
    cop = Coprocessor(CoprocessorConfig(num_latents=3, num_layers=1, refeed_last=True, hide_point=True,
                                        shift_ahead=False, latent_gate=True), dec)
    with torch.no_grad():
        cop.gate_bias.copy_(torch.linspace(-3.0, 1.0, cop.gate_bias.numel()))       # "trained"
    keys = ev.sink_keys(dec, cop, 5, 7)
    assert keys.config.latent_gate and keys.config.hide_point and not keys.config.shift_ahead
    torch.testing.assert_close(augment.gate_of(keys), augment.gate_of(cop))
    assert torch.equal(keys.soft_tokens[0], augment.embed(dec, torch.tensor([7]))[0])


# -- multiple choice --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mc_plain_arm_equals_plain_decoder(arch):
    wb = _wb(arch)
    ctx, conts = [5, 9, 14, 3, 22], [[7], [8, 2, 40], [11, 12]]
    sc = ev.score_choices(wb.decoder, ctx, conts, {"decoder": None}, max_tokens=16)["decoder"]
    for c, lp in zip(conts, sc.logprobs):
        assert lp == pytest.approx(_hand_logprob(wb.decoder, None, ctx, c), abs=2e-4)
    for c, tl in zip(conts, sc.token_logprobs):
        assert len(tl) == len(c)


GATED = {"refeed_last": True, "hide_point": True, "shift_ahead": False, "latent_gate": True, "gate_init": -1.0}


@pytest.mark.parametrize("layout", [{}, {"refeed_last": True}, {"latent_pos": "shared"}, GATED],
                         ids=["default", "refeed", "shared", "gated"])
@pytest.mark.parametrize("delay", [0, 2])
def test_mc_augmented_equals_hand_computation(layout, delay):
    wb = _wb("llama", **layout)
    ctx, conts = [5, 9, 14, 3, 22, 17], [[7], [8, 2, 40, 33], [11, 12], [1, 2, 3, 4, 5]]
    arms = {"decoder": None, "coprocessor": wb.coprocessor}
    out = ev.score_choices(wb.decoder, ctx, conts, arms, async_delay=delay, max_tokens=24)
    for i, c in enumerate(conts):
        assert out["coprocessor"].logprobs[i] == pytest.approx(
            _hand_logprob(wb.decoder, wb.coprocessor, ctx, c, delay), abs=3e-4)
        assert out["decoder"].logprobs[i] == pytest.approx(_hand_logprob(wb.decoder, None, ctx, c), abs=3e-4)
    if delay:   # a continuation of <= delay tokens never reads the latents
        assert out["coprocessor"].logprobs[0] == pytest.approx(out["decoder"].logprobs[0], abs=1e-5)
    else:       # the first token is predicted after the latents, so it differs from the plain arm
        assert out["coprocessor"].token_logprobs[0][0] != pytest.approx(out["decoder"].token_logprobs[0][0], abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("delay", [0, 2])
def test_score_requests_batches_across_contexts(arch, delay):
    """Requests with different contexts share batches (right-padded rows, per-row points); every
    score equals the request scored alone, token by token, and the packing does not matter."""
    wb = _wb(arch, **GATED)
    reqs = [([5, 9, 14], [7]), ([3, 22, 17, 8, 2, 40, 6], [8, 2, 40, 33]), ([11], [12, 13]),
            ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5]), ([30, 31], [32, 33, 34])]
    arms = {"decoder": None, "coprocessor": wb.coprocessor}
    one = ev.score_requests(wb.decoder, reqs, arms, async_delay=delay)       # one batch
    small = ev.score_requests(wb.decoder, reqs, arms, async_delay=delay, max_tokens=12)
    assert len(ev.request_batches([len(c) + len(t) for c, t in reqs], 12)) > 2
    for i, (c, t) in enumerate(reqs):
        for arm, cop in arms.items():
            want = _hand_logprob(wb.decoder, cop, c, t, delay)
            assert one[arm].logprobs[i] == pytest.approx(want, abs=3e-4)
            assert small[arm].logprobs[i] == pytest.approx(want, abs=3e-4)
            assert len(one[arm].token_logprobs[i]) == len(t)


def test_request_batches_respect_budget():
    lengths = [5, 40, 7, 12, 40, 3, 9]
    batches = ev.request_batches(lengths, max_tokens=48, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 48 or len(b) == 1


def test_multiple_choice_metrics():
    wb = _wb(pause=True)
    items = [{"id": f"q{i}", "context": f"Question {i}: pick one.\nAnswer:", "choices": [" yes", " no", " maybe so"],
              "gold": i % 3} for i in range(6)]
    items.append({"id": "lam", "context": "the quick brown", "choices": [" fox"], "gold": 0})
    r = ev.evaluate_multiple_choice(wb, items, ["decoder", "coprocessor", "pause", "cot"])
    assert r["type"] == "multiple_choice" and r["n"] == 7 and r["metrics"]["cot"] is None
    for a in ("decoder", "coprocessor", "pause"):
        preds = [rec[a]["pred"] for rec in r["items"]]
        ok = [p == rec["gold"] for p, rec in zip(preds, r["items"])]
        for rec in r["items"][:6]:   # acc: argmax of summed log-prob; acc_norm: per character
            lp = np.array(rec[a]["logprobs"])
            assert rec[a]["pred"] == int(np.argmax(lp))
            assert rec[a]["pred_norm"] == int(np.argmax(lp / np.array([4, 3, 9])))
        m = r["metrics"][a]["acc"]
        assert m["correct"] == sum(ok) and m["n"] == 7 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert "delta_vs_decoder" in r["metrics"]["coprocessor"]["acc"]
    assert "delta_vs_decoder" not in r["metrics"]["decoder"]["acc"]


def test_multiple_choice_per_choice_contexts():
    """WinoGrande-style pairs: each option ends its own context, the continuation is shared."""
    wb = _wb()
    tok = wb.tokenizer
    pairs = [["Ann beat Bo so Ann", " won."], ["Ann beat Bo so Bo", " won."]]
    item = {"id": "w", "context": "Ann beat Bo so ", "choices": ["Ann", "Bo"], "gold": 0, "pairs": pairs}
    r = ev.evaluate_multiple_choice(wb, [item], ["decoder", "coprocessor"])
    for a, cop in (("decoder", None), ("coprocessor", wb.coprocessor)):
        for i, (c, t) in enumerate(pairs):
            want = _hand_logprob(wb.decoder, cop, tok.encode(c), tok.encode(t))
            assert r["items"][0][a]["logprobs"][i] == pytest.approx(want, abs=1e-3)


def test_intervals():
    lo, hi = ev.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert ev.wilson_interval(0, 5)[0] == 0.0
    a, b = [1] * 30 + [0] * 10, [1] * 20 + [0] * 20
    lo, hi = ev.paired_bootstrap_delta(a, b)
    assert lo <= 0.25 <= hi and lo > 0


# -- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("She has 5 apples.\n#### 1,234", "1234"), ("so 3 + 4 = 7. The answer is $18.", "18"),
    ("first 12 then 13.50", "13.5"), ("-4 degrees", "-4"), ("no number here", None), ("#### 72.0", "72"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
])
def test_extract_answer(text, want):
    assert ev.extract_answer(text) == want


def test_cut_at_stop():
    assert ev.cut_at_stop("x = 3\n\nQuestion: next", ev.GSM8K_STOP) == "x = 3"
    assert ev.cut_at_stop("3 Question: 4\n\n", ev.GSM8K_STOP) == "3 "


def test_generation_arms_and_async_delay():
    wb = _wb("qwen2", pause=True)
    tok = wb.tokenizer
    tok.eos_token_id = None
    items = [{"id": "g1", "prompt": "Question: 2+3?\nAnswer:", "answer": "2+3=5\n#### 5"},
             {"id": "g2", "prompt": "Question: 1+1?\nAnswer:", "answer": "2"}]
    r = ev.evaluate_generation(wb, items, ["decoder", "coprocessor", "pause", "cot"], max_new_tokens=6,
                                     stop=("\n\n",))
    assert r["type"] == "generation" and set(r["metrics"]) == {"decoder", "coprocessor", "pause", "cot"}
    assert [rec["gold"] for rec in r["items"]] == ["5", "2"]
    for rec in r["items"]:
        for a in r["metrics"]:
            assert rec[a]["pred"] == ev.extract_answer(rec[a]["text"])
    # async: the first N tokens come before the latents, so they equal the plain decoder's
    ids = tok.encode(items[0]["prompt"])
    plain = ev.generate_text(wb.decoder, tok, None, ids, 8, stop=())
    late = ev.generate_text(wb.decoder, tok, wb.coprocessor, ids, 8, stop=(), async_delay=3)
    now = ev.generate_text(wb.decoder, tok, wb.coprocessor, ids, 8, stop=())
    assert late[:3] == plain[:3] and len(late) == 8
    assert now != plain   # sanity: random latents change a random model's greedy output
    r2 = ev.evaluate_generation(wb, items[:1], ["decoder", "coprocessor"], async_delay=2, max_new_tokens=4)
    assert r2["items"][0]["coprocessor"]["text"][:2] == r2["items"][0]["decoder"]["text"][:2]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layout", [{}, GATED], ids=["default", "gated"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(arch, layout):
    """Prompts of different lengths decoded together give each prompt's own greedy tokens."""
    wb = _wb(arch, **layout)
    prompts = [[5, 9, 14, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [30, 31, 40]]
    for cop, delay in ((None, 0), (wb.coprocessor, 0), (wb.coprocessor, 2)):
        got = augment.greedy_generate_batch(wb.decoder, cop, prompts, 8, async_delay=delay)
        for p, g in zip(prompts, got):
            want = [s.token_id for s in augment.stream_generate(wb.decoder, None, cop, torch.tensor([p]),
                                                                max_new_tokens=8, async_delay=delay, stop_ids=set())]
            assert g == want


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_decoding_logits_equal_one_prompt_at_a_time(arch):
    """After a gated group (hidden point entries, an open-ish gate), every row's logits in
    batched decoding equal those of its prompt decoded alone, step by step."""
    wb = _wb(arch, **GATED)
    with torch.no_grad():
        wb.coprocessor.gate_bias.copy_(torch.linspace(-1.0, 1.0, wb.coprocessor.gate_bias.numel()))
    prompts = [[5, 9, 14, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    feed = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35]])   # (B, steps)
    with torch.no_grad():
        st = augment._BatchState(wb.decoder, wb.coprocessor, prompts)
        st.prefill()
        B = len(prompts)
        got = [st.insert(st.latents(), st.ids[torch.arange(B), st.n - 1], st.n - 1)]
        for j in range(feed.shape[1]):
            got.append(st.step(feed[:, j]))
        got = torch.stack(got, dim=1)                                                     # (B, 1 + steps, V)
        for b, p in enumerate(prompts):
            one = augment._AugState(wb.decoder, wb.coprocessor)
            want = [one.prefill_and_insert(torch.tensor([p]))]
            want += [one.feed_after(feed[b, j: j + 1]) for j in range(feed.shape[1])]
            torch.testing.assert_close(got[b], torch.stack(want), atol=1e-4, rtol=1e-4)


def test_batched_generation_rejects_empty_prompts():
    wb = _wb("llama")
    for prompts in ([], [[5, 6], []]):
        with pytest.raises(ValueError, match="at least one"):
            augment.greedy_generate_batch(wb.decoder, None, prompts, 4)


def test_generate_texts_equals_generate_text():
    wb = _wb("qwen2")
    tok = wb.tokenizer
    prompts = [tok.encode(t) for t in ("Question: 2+3?\nAnswer:", "Q: 1?", "Question: what is 10 + 32 - 7?\nA:")]
    stops = [("\n\n",), ("e",), ("\n\n", "Q")]
    got = ev.generate_texts(wb.decoder, tok, wb.coprocessor, prompts, 10, stops, batch_tokens=30)
    for p, st, g in zip(prompts, stops, got):
        assert g == ev.generate_text(wb.decoder, tok, wb.coprocessor, p, 10, stop=st)


# -- tables, CLI ------------------------------------------------------------------------------


def test_results_table_markdown_ppl_and_bench():
    wb = _wb(pause=True)
    ppl = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, DOCS * 3, positions=33, chunk=80,
                                          n_boot=50)
    md = ev.results_table_markdown(json.loads(json.dumps(ev.clean_json(ppl))))
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 4, 8, 16, 32, 33]
    assert len(ev.results_table_markdown(ppl, rows="all").splitlines()) >= 35
    items = {"arc_easy": [{"id": 1, "context": "Q: sky?\nA:", "choices": [" blue", " red"], "gold": 0}],
             "gsm8k": [{"id": 2, "prompt": "Question: 1+1?\nAnswer:", "answer": "#### 2"}]}
    bench = ev.run_bench(wb, items, ["decoder", "coprocessor", "cot"], max_new_tokens=3)
    md = ev.results_table_markdown(bench)
    assert "| ARC-e | acc | 1 |" in md and "| ARC-e | acc_norm | 1 |" in md and "| GSM8K | exact_match | 1 |" in md
    arc_row = next(line for line in md.splitlines() if line.startswith("| ARC-e | acc |"))
    assert arc_row.rstrip().endswith("n/a |")          # CoT does not apply to log-likelihood tasks
    bench["provenance"] = {"command_line": "cacheaug eval bench --limit 1", "device": "cpu",
                           "git": {"commit": "0123456789abcdef", "dirty": False}}
    assert md.count("Reproduce:") == 0
    assert ("Reproduce: command: `cacheaug eval bench --limit 1`; commit 0123456; device: cpu."
            in ev.results_table_markdown(bench))


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from cacheaug_core.checkpoint import save_coprocessor
    from cacheaug_core.decoder import load_decoder

    root = tmp_path_factory.mktemp("evalmodels")
    dec_dir = save_tiny_decoder(root / "dec", "llama")
    dec, _, info = load_decoder(dec_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec)
    save_coprocessor(cop, root / "cop", info, status="untrained test coprocessor")
    pause = Coprocessor(CoprocessorConfig(num_latents=2, body="none"), dec)
    save_coprocessor(pause, root / "pause", info)
    return dec_dir, str(root / "cop"), str(root / "pause")


def test_cli_ppl(tiny_checkpoints, tmp_path, capsys):
    from cacheaug_core.cli import main

    dec_dir, cop_dir, pause_dir = tiny_checkpoints
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"title": f"T{i}", "text": d, "source": "s"}) + "\n" for i, d in enumerate(DOCS)))
    out = tmp_path / "ppl.json"
    rc = main(["eval", "ppl", "--text", str(text), "--json", str(out), "--decoder", dec_dir, "--coprocessor", cop_dir,
               "--max-tokens", "60", "--positions", "4", "--chunk", "24", "--device", "cpu", "--no-progress",
               "--bootstrap", "100", "--compare", pause_dir, "--extra-keys", "match"])
    assert rc == 0
    res = json.loads(out.read_text())
    for k in ("positions", "ppl_decoder", "ppl_augmented", "rel_ppl_change_pct", "tokens_scored",
              "rel_ppl_change_ci95", "provenance", "data", "settings", "rel_ppl_change_pct_body",
              "rel_ppl_change_pct_doc_start", "sink", "documents", "arms", "compare"):
        assert k in res
    first_two = [len(f"T{i}\n\n{d}".encode()) for i, d in enumerate(DOCS[:2])]     # byte tokenizer
    assert res["positions"] == [1, 2, 3, 4] and res["data"]["tokens_read"] == sum(first_two)   # whole documents
    assert res["documents"] == 2 and res["data"]["sources"] == {"s": 2}
    assert res["sink"]["mode"] == "auto" and res["sink"]["token"] == "<|endoftext|>"
    assert set(res["compare"]) == {"pause", "extra_keys"} and res["arms"]["extra_keys"]["num_latents"] == 2
    assert len(res["compare"]["pause"]["body"]["ci95"]) == 4
    prov = res["provenance"]
    assert prov["coprocessor"]["source"] == cop_dir and prov["coprocessor"]["config"]["num_latents"] == 2
    assert prov["decoder"]["model_type"] == "llama" and prov["seconds"] >= 0 and "git" in prov
    assert "device" in prov and prov["arguments"]["positions"] == 4
    printed = capsys.readouterr().out
    assert "| position |" in printed and "coprocessor vs pause" in printed and "coprocessor vs extra_keys" in printed


def test_cli_ppl_refuses_bad_sink_and_reads_txt_as_form_feed_documents(tiny_checkpoints, tmp_path, capsys):
    from cacheaug_core.cli import main

    dec_dir, cop_dir, _ = tiny_checkpoints
    text = tmp_path / "held_out.txt"
    text.write_text("\n\f\n".join(DOCS))
    out = tmp_path / "ppl.json"
    common = ["--decoder", dec_dir, "--coprocessor", cop_dir, "--positions", "2", "--chunk", "24", "--device", "cpu",
              "--no-progress", "--bootstrap", "10"]
    assert main(["eval", "ppl", "--text", str(text), "--json", str(out), "--sink", "<|nope|>", *common]) == 2
    assert "is not a token" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "ppl", "--text", str(text), "--json", str(out), "--sink", "none", "--extra-keys", "2",
                 *common]) == 2
    assert "--extra-keys inserts copies of the sink token" in capsys.readouterr().err
    assert main(["eval", "ppl", "--text", str(text), "--json", str(out), "--sink", "none", *common]) == 0
    res = json.loads(out.read_text())
    assert res["documents"] == 3 and res["sink"]["token_id"] is None
    assert res["data"]["tokens_read"] == sum(len(d.encode()) for d in DOCS)


def test_cli_bench_fake_tasks(tiny_checkpoints, tmp_path, monkeypatch):
    from cacheaug_core.cli import main

    dec_dir, cop_dir, pause_dir = tiny_checkpoints
    fake = {"piqa": [{"id": i, "context": f"Goal {i}:", "choices": [" do a", " do b"], "gold": i % 2} for i in range(4)],
            "gsm8k": [{"id": 0, "prompt": "Question: 2+2?\nAnswer:", "answer": "4"}]}
    seen = []
    monkeypatch.setattr(eval_cli, "_load_task", lambda name, limit: seen.append(limit) or fake[name][:limit])
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["eval", "bench", "--tasks", "piqa,gsm8k", "--limit", "3", "--json", str(js), "--md", str(md),
               "--decoder", dec_dir, "--coprocessor", cop_dir, "--pause", pause_dir,
               "--arms", "decoder,coprocessor,pause,cot", "--async-delay", "1", "--max-new-tokens", "4",
               "--device", "cpu", "--no-progress"])
    assert rc == 0 and seen == [3, 3]
    res = json.loads(js.read_text())
    assert res["async_delay"] == 1 and res["tasks"]["piqa"]["n"] == 3 and res["tasks"]["gsm8k"]["n"] == 1
    assert res["tasks"]["piqa"]["metrics"]["cot"] is None
    assert res["tasks"]["gsm8k"]["metrics"]["pause"]["exact_match"]["n"] == 1
    assert res["provenance"]["pause"]["config"]["body"] == "none"
    assert "| PIQA | acc | 3 |" in md.read_text()
    assert main(["eval", "bench", "--tasks", "piqa", "--arms", "decoder,pause", "--decoder", dec_dir]) == 2


def test_parse_limit_and_shard():
    tasks = ["piqa", "mmlu", "gsm8k"]
    assert ev.parse_limit("0", tasks) == ({t: None for t in tasks}, None)
    assert ev.parse_limit("7", tasks) == ({t: 7 for t in tasks}, 7)
    lim, rec = ev.parse_limit("gsm8k=2, mmlu=5", tasks)
    assert lim == {"piqa": None, "mmlu": 5, "gsm8k": 2} and rec == lim
    lim, rec = ev.parse_limit("10,gsm8k=2", tasks)
    assert lim == {"piqa": 10, "mmlu": 10, "gsm8k": 2} and rec == lim
    assert ev.parse_limit("gsm8k=0", tasks)[0]["gsm8k"] is None
    for bad in ("x", "gsm8k=x", "-1", "hellaswag=3", "1,2", "gsm8k=1,gsm8k=2"):
        with pytest.raises(ev.EvalError):
            ev.parse_limit(bad, tasks)
    assert ev.parse_shard("1/4") == (1, 4) and ev.parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(ev.EvalError):
            ev.parse_shard(bad)
    assert ev.shard_items(list(range(7)), 1, 3) == [1, 4]


FAKE_TASKS = {
    "piqa": [{"id": f"p{i}", "context": f"Goal {i}:", "choices": [" do a", " do b", " c"], "gold": i % 3}
             for i in range(7)],
    "lambada": [{"id": f"l{i}", "context": "the quick brown" + " x" * i, "choices": [" fox"], "gold": 0}
                for i in range(3)],
    "gsm8k": [{"id": f"g{i}", "prompt": f"Question: {i}+2?\nAnswer:", "answer": str(i + 2)} for i in range(3)],
}


def _bench(main, tmp_path, name, extra, models):
    dec_dir, cop_dir, pause_dir = models
    js = tmp_path / f"{name}.json"
    rc = main(["eval", "bench", "--tasks", "piqa,lambada,gsm8k", "--json", str(js),
               "--md", str(tmp_path / f"{name}.md"),
               "--decoder", dec_dir, "--coprocessor", cop_dir, "--pause", pause_dir,
               "--arms", "decoder,coprocessor,pause,cot", "--max-new-tokens", "3", "--device", "cpu", "--no-progress",
               *extra])
    assert rc == 0
    return js


def _merge(main, tmp_path, name, files, extra=()):
    js, md = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
    rc = main(["eval", "bench-merge", *map(str, files), "--json", str(js), "--md", str(md), *extra])
    return rc, js, md


def _same_result(merged: dict, single: dict):
    assert list(merged) == list(single)
    for k in ("kind", "arms", "async_delay", "limit"):
        assert merged[k] == single[k]
    assert list(merged["tasks"]) == list(single["tasks"])
    for t, r in single["tasks"].items():
        m = merged["tasks"][t]
        assert set(m) == set(r) and m["type"] == r["type"] and m["n"] == r["n"]
        assert m["metrics"] == r["metrics"]                   # values, Wilson CIs, deltas and bootstrap CIs
        assert m.get("items") == r.get("items") and m.get("settings") == r.get("settings")


def test_cli_bench_shards_merge_equal_unsharded(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    from cacheaug_core.cli import main

    monkeypatch.setattr(eval_cli, "_load_task", lambda name, limit: FAKE_TASKS[name][:limit])
    single = _bench(main, tmp_path, "single", [], tiny_checkpoints)
    shards = [_bench(main, tmp_path, f"s{i}", ["--shard", f"{i}/2"], tiny_checkpoints) for i in (1, 0)]
    s0 = json.loads(shards[1].read_text())
    assert s0["shard"] == {"index": 0, "count": 2} and s0["provenance"]["arguments"]["shard"] == "0/2"
    assert s0["tasks"]["piqa"]["n"] == 4 and [x["id"] for x in s0["tasks"]["piqa"]["items"]] == ["p0", "p2", "p4", "p6"]
    assert s0["tasks"]["piqa"]["shard"]["items_total"] == 7
    assert len(s0["tasks"]["piqa"]["shard"]["correct"]["pause"]["acc_norm"]) == 4
    rc, merged_js, merged_md = _merge(main, tmp_path, "merged", shards)   # any order of files
    assert rc == 0
    merged, ref = json.loads(merged_js.read_text()), json.loads(single.read_text())
    _same_result(merged, ref)
    assert merged_md.read_text() == (tmp_path / "single.md").read_text()
    assert ref["tasks"]["piqa"]["metrics"]["coprocessor"]["acc"]["delta_ci95"] == \
        merged["tasks"]["piqa"]["metrics"]["coprocessor"]["acc"]["delta_ci95"]
    mp = merged["provenance"]["merge"]
    assert mp["shards"] == 2 and [x["shard"] for x in mp["from"]] == ["0/2", "1/2"] and not mp["warnings"]
    assert all(x["command_line"] and x["seconds"] >= 0 and x["file"].endswith(f"s{i}.json")
               for i, x in enumerate(mp["from"]))
    assert "shard" not in merged and "shard" not in merged["tasks"]["piqa"]
    assert "shard" not in merged["provenance"]["arguments"]
    assert merged["provenance"]["seconds"] == pytest.approx(sum(x["seconds"] for x in mp["from"]), abs=0.02)
    # --no-items on the merge drops the records only
    rc, js2, _ = _merge(main, tmp_path, "merged_noitems", shards, ["--no-items"])
    m2 = json.loads(js2.read_text())
    assert rc == 0 and "items" not in m2["tasks"]["piqa"]
    assert m2["tasks"]["gsm8k"]["metrics"] == ref["tasks"]["gsm8k"]["metrics"]

    # three shards with a per-task limit: gsm8k has one item, so two shards hold none of it
    lim = ["--limit", "5,gsm8k=1"]
    single = _bench(main, tmp_path, "single3", lim, tiny_checkpoints)
    shards = [_bench(main, tmp_path, f"t{i}", [*lim, "--shard", f"{i}/3"], tiny_checkpoints) for i in range(3)]
    assert json.loads(shards[2].read_text())["tasks"]["gsm8k"]["n"] == 0
    rc, merged_js, merged_md = _merge(main, tmp_path, "merged3", shards)
    assert rc == 0
    merged, ref = json.loads(merged_js.read_text()), json.loads(single.read_text())
    _same_result(merged, ref)
    assert ref["limit"] == {"piqa": 5, "lambada": 5, "gsm8k": 1} and ref["tasks"]["gsm8k"]["n"] == 1
    assert merged_md.read_text() == (tmp_path / "single3.md").read_text()

    # incompatible or missing shards: one line on stderr, exit status 2
    capsys.readouterr()
    cases = [([shards[0], shards[2]], "missing shard(s) 1/3"),
             ([shards[0], shards[1], shards[1], shards[2]], "given twice"),
             ([shards[0], shards[1], tmp_path / "s1.json"], "share N"),
             ([single, shards[1], shards[2]], "not a sharded result"),
             ([shards[0], shards[1], tmp_path / "nope.json"], "no such file")]
    for files, msg in cases:
        rc, _, _ = _merge(main, tmp_path, "bad", files)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (msg, err)
    base = [json.loads(f.read_text()) for f in shards]
    for edit, msg in [(lambda r: r.__setitem__("arms", ["decoder", "coprocessor"]), "arms differ"),
                      (lambda r: r["provenance"]["coprocessor"]["config"].__setitem__("num_latents", 9),
                       "coprocessor differ"),
                      (lambda r: r.__setitem__("limit", 4), "limit differ"),
                      (lambda r: r["tasks"]["piqa"]["shard"].__setitem__("items_total", 6), "task sizes"),
                      (lambda r: r["provenance"]["arguments"].__setitem__("max_new_tokens", 9), "max_new_tokens"),
                      (lambda r: r["tasks"].pop("lambada"), "tasks differ"),
                      (lambda r: r["tasks"]["piqa"].pop("items"), "--no-items")]:
        bad = json.loads(json.dumps(base))
        edit(bad[2])
        with pytest.raises(ev.EvalError, match=re.escape(msg)):
            ev.merge_bench(bad, ["a.json", "b.json", "c.json"])
    bad = json.loads(json.dumps(base))
    bad[1]["provenance"]["git"] = {"commit": "0" * 40, "dirty": True}     # allowed, noted
    assert "git" in ev.merge_bench(bad)["provenance"]["merge"]["warnings"][0]
    # usage errors of --shard and --limit fail before the models load
    dec_dir = tiny_checkpoints[0]
    for extra in (["--shard", "2/2", "--json", str(tmp_path / "x.json")], ["--shard", "0/2"],
                  ["--limit", "hellaswag=3"], ["--limit", "gsm8k=many"]):
        assert main(["eval", "bench", "--tasks", "piqa,gsm8k", "--decoder", dec_dir, *extra]) == 2


# -- lm-eval ----------------------------------------------------------------------------------


def test_cacheaug_lm_loglikelihood_hand_check():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    tok = byte_tokenizer()
    dec = tiny_decoder("llama", vocab=len(tok))
    cop = Coprocessor(CoprocessorConfig(num_latents=3, num_layers=2), dec).eval()
    wb = Workbench(dec, tok, None, cop, "test")
    CacheAugLM = ev.CacheAugLM
    assert get_model("cacheaug") is CacheAugLM
    lm, plain = CacheAugLM(workbench=wb), CacheAugLM(workbench=wb, augment=False)
    pairs = [("The sky is", " blue"), ("The sky is", " green today"), ("2 + 2 =", " 4"), ("", "hello")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got, got_plain = lm.loglikelihood(reqs, disable_tqdm=True), plain.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (lp, greedy), (lp0, _) in zip(pairs, got, got_plain):
        c_ids = tok.encode(ctx) if ctx else [tok.eos_token_id]
        t_ids = tok.encode(ctx + cont)[len(c_ids):] if ctx else tok.encode(cont)
        assert lp == pytest.approx(_hand_logprob(dec, cop, c_ids, t_ids), abs=3e-4)
        assert lp0 == pytest.approx(_hand_logprob(dec, None, c_ids, t_ids), abs=3e-4)
        assert isinstance(greedy, bool)
    # rolling: the plain arm is the decoder's log-likelihood given the prefix token; the augmented
    # arm is the sum of first-token (position-1) NLLs with latents after every token
    text = "abc defg hij"
    ids = [tok.eos_token_id] + tok.encode(text)
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    roll0 = plain.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    x = torch.tensor([ids])
    _, logits = augment.prefill(dec, x)
    assert roll0 == pytest.approx(-float(augment.plain_nll(logits, x)[0, 1:].sum()), abs=3e-4)
    aug, _ = augment.score_after_every_token(dec, cop, x, 1)
    assert roll == pytest.approx(-float(aug[:, 0].sum()), abs=3e-4)
    # windows shorter than the text still score every token exactly once
    short = CacheAugLM(workbench=wb, augment=False, max_length=5)
    r5 = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    assert r5 < 0 and math.isfinite(r5)
    gen = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 5}), 0)],
                            disable_tqdm=True)
    assert len(gen) == 1 and "\n" not in gen[0]
    # greedy requests are decoded in batches: each equals its own one-prompt decode
    asks = [("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 6}), ("A much longer question here?", {"until": ["e"]}),
            ("x", {"until": ["\n"], "max_gen_toks": 6})]
    many = lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(asks)], disable_tqdm=True)
    for (ctx, kw), text in zip(asks, many):
        until = list(kw["until"]) + ([tok.decode([tok.eos_token_id])] if tok.eos_token_id is not None else [])
        want = ev.generate_text(dec, tok, cop, tok.encode(ctx), kw.get("max_gen_toks", 256), until)
        assert text == want


# -- the real default model -------------------------------------------------------------------


@pytest.mark.integration
def test_bench_on_default_model(tmp_path):
    pytest.importorskip("cacheaug_core.benchmarks")
    from cacheaug_core.cli import main

    js = tmp_path / "bench.json"
    rc = main(["eval", "bench", "--tasks", "arc_easy,gsm8k", "--limit", "5", "--json", str(js), "--md",
               str(tmp_path / "bench.md"), "--max-new-tokens", "16", "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["tasks"]["arc_easy"]["n"] == 5 and res["tasks"]["gsm8k"]["n"] == 5
    dec = res["tasks"]["arc_easy"]["metrics"]["decoder"]["acc"]
    assert 0 <= dec["value"] <= 1 and dec["n"] == 5


@pytest.mark.integration
def test_ppl_on_default_model_with_all_arms(tmp_path):
    """The GPU command's path on the shipped pair, on CPU and two short documents: the default
    tokenizer's sink is <|endoftext|> (not its chat BOS), and every arm runs."""
    from cacheaug_core.cli import main
    from cacheaug_core.workbench import SHIPPED_PAUSE

    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"title": t, "text": d}) + "\n" for t, d in
                            [("Fox", DOCS[0]), ("Sphinx", DOCS[1])]))
    js = tmp_path / "ppl.json"
    rc = main(["eval", "ppl", "--text", str(text), "--json", str(js), "--positions", "2", "--compare",
               str(SHIPPED_PAUSE), "--extra-keys", "match", "--device", "cpu", "--no-progress", "--bootstrap", "50"])
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["sink"]["token"] == "<|endoftext|>" and res["documents"] == 2
    assert res["arms"]["extra_keys"]["num_latents"] == res["settings"]["num_latents"] == 16
    assert all(math.isfinite(x) for x in res["compare"]["pause"]["body"]["difference_pct_points"])
