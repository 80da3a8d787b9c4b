"""The parity matrix: every decoder family of `families.FAMILIES` against its own transformers forward.

    pytest tests/test_families.py            # ~1 min on 2 CPU cores

Each family is a tiny random model (2 layers, hidden 32, vocabulary 128, sliding window 8 where the
family has one; Gemma-2/3 with a small final logit softcap so that dropping it shows). The
references are the decoder's own forward over a plain sequence with the latents inserted as input
embeddings (the paper's layout), at texts three times longer than the window:

- a closed latent gate, and scoring without a coprocessor, give the plain decoder's numbers;
- the one-pass multi-point forward (training loss, mode (b)) and mode (a) give the reference's;
- streaming generation with latents gives the reference's greedy tokens;
- the training loss has gradients for the coprocessor only; checkpoints round-trip;
- the fast path equals the dense path where it covers the family, and refuses the rest by name.

`test_the_matrix_catches_*` drop the softcap, the embedding scale or the window on purpose and
check that the parity test fails: the matrix cannot pass on a path that silently skips them.
A new family is one entry in `families.FAMILIES`.
"""

import pytest
import torch

from cacheaug_core import augment, checkpoint, families, fastpath, masks
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor

NAMES = list(families.FAMILIES)
V, T, W, NL, A = 128, 24, 8, 2, 4


def _decoder(name):
    return families.tiny_decoder(name, vocab=V, layers=2, hidden=32, window=W)


def _coprocessor(dec, **kw):
    cop = Coprocessor(CoprocessorConfig(num_latents=NL, init_seed=1, **kw), dec).float()
    with torch.no_grad():  # move off the identity / zero start so latents differ from soft tokens
        for p in cop.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return cop


def _ids(seed=0, n=T):
    return torch.randint(1, V, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference_logits(dec, ids, p, latents, n_ahead):
    """The decoder's own forward over x_0..x_p, the latents, x_{p+1}..x_{p+n_ahead-1} as input
    embeddings (positions 0..), plain causal: logits of the last n_ahead positions (n_ahead, V)."""
    emb = dec.get_input_embeddings()
    x = torch.cat([emb(ids[:, : p + 1]), latents.reshape(1, -1, latents.shape[-1]),
                   emb(ids[:, p + 1: p + n_ahead])], dim=1)
    return dec(inputs_embeds=x).logits[0, -n_ahead:]


def check_augmented_parity(dec, cop, ids, pts):
    """multi_point's logits at every point == the reference with the latents inserted."""
    out = augment.multi_point(dec, cop, ids, pts, A)
    for j, p in enumerate(pts[0].tolist()):
        n_valid = int(out.valid[0, j].sum())       # fewer ahead tokens at the end of the text
        ref = _reference_logits(dec, ids, p, out.latents[0, j], n_valid)
        torch.testing.assert_close(out.logits[0, j, :n_valid], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_builds_copy_compact_lora(name):
    dec = _decoder(name)
    ids = _ids()
    cache, _ = augment.prefill(dec, ids)
    for kw in (dict(), dict(num_layers=1, layer_map="spread"), dict(body="lora", lora_rank=2)):
        cop = _coprocessor(dec, **kw)
        z = cop(cache, torch.tensor([[5, T - 2]]))
        assert z.shape == (1, 2, NL, 32) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", NAMES)
def test_augmented_scores_equal_the_decoders_own_forward(name):
    dec = _decoder(name)
    cop = _coprocessor(dec)
    ids = _ids(1)
    pts = torch.tensor([[3, 11, 17, 21]])        # points past the window, and near the end of the text
    check_augmented_parity(dec, cop, ids, pts)


@pytest.mark.parametrize("name", NAMES)
def test_latents_enter_at_the_token_embedding_scale(name):
    dec = _decoder(name)
    cop = _coprocessor(dec, body="none")          # pause tokens: the rescale is all that acts
    with torch.no_grad():
        cop.latent_gain.fill_(1.0)
        z = cop(None, torch.tensor([[3]]))
        tok = dec.get_input_embeddings()(torch.arange(V))          # what the decoder reads for tokens
    rms = lambda t: t.float().pow(2).mean(-1).sqrt().mean()       # noqa: E731
    torch.testing.assert_close(rms(z), rms(tok), rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_closed_gate_and_no_coprocessor_are_the_plain_decoder(name, tiny_tokenizer):
    dec = _decoder(name)
    ids = _ids(2)
    plain = dec(input_ids=ids).logits[0]                                    # (T, V)
    # a closed gate: the group computes the plain decoder's hidden states for x_p..x_{p+A-1}
    cop = _coprocessor(dec, refeed_last=True, hide_point=True, shift_ahead=False, latent_gate=True,
                       gate_init=-1e4)
    pts = torch.tensor([[4, 12, 19]])
    out = augment.multi_point(dec, cop, ids, pts, A)
    for j, p in enumerate(pts[0].tolist()):
        n = int(out.valid[0, j].sum())
        torch.testing.assert_close(out.logits[0, j, :n], plain[p: p + n], atol=1e-4, rtol=1e-4)
    # scoring with augmentation off is the decoder's own NLL
    _, base = augment.score_after_every_token(dec, cop, ids, positions=2, fast=False)
    own = torch.nn.functional.cross_entropy(plain[:-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(base[:, 0], own, atol=1e-5, rtol=1e-5)
    # generation with a closed gate: the plain decoder's greedy tokens, past the window
    prompt = ids[:, :10]
    got = [s.token_id for s in augment.stream_generate(dec, None, cop, prompt, augment=True, max_new_tokens=12)]
    want = [s.token_id for s in augment.stream_generate(dec, None, None, prompt, augment=False, max_new_tokens=12)]
    assert got == want


@pytest.mark.parametrize("name", NAMES)
def test_training_loss_and_gradients(name):
    dec = _decoder(name)
    cop = _coprocessor(dec, num_layers=1, latent_gate=True, gate_init=-1.0)
    ids = torch.cat([_ids(3), _ids(4)])
    pts = masks.sample_points(T, 4, 2, torch.Generator().manual_seed(0))
    loss, nll = augment.multi_point_loss(dec, cop, ids, pts, A)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in cop.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert cop.gate_bias.grad.abs().sum() > 0 and cop.soft_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.parameters())
    # the loss is the mean NLL of the reference's predictions
    out = augment.multi_point(dec, cop, ids, pts, A)
    torch.testing.assert_close(loss, augment.token_nll(out.logits, out.targets, out.valid)[out.valid].mean())


def _greedy_reference(dec, cop, prompt, n_new):
    """Greedy tokens of the decoder's own forward over prompt, latents, generated tokens."""
    emb = dec.get_input_embeddings()
    cache, _ = augment.prefill(dec, prompt)
    z = cop(cache, torch.tensor([[prompt.shape[1] - 1]]))[0, 0]                  # (NL, d)
    seq, toks = torch.cat([emb(prompt)[0], z]), []
    for _ in range(n_new):
        t = int(dec(inputs_embeds=seq[None]).logits[0, -1].argmax())
        toks.append(t)
        seq = torch.cat([seq, emb(torch.tensor([t]))])
    return toks


@pytest.mark.parametrize("name", NAMES)
def test_streaming_generation_equals_the_reference(name):
    dec = _decoder(name)
    cop = _coprocessor(dec)
    prompt = _ids(5, 10)
    got = [s.token_id for s in augment.stream_generate(dec, None, cop, prompt, augment=True, max_new_tokens=14)]
    assert got == _greedy_reference(dec, cop, prompt, 14)
    # re-augmentation and batched generation run on every family (same procedure, other entry points)
    steps = list(augment.stream_generate(dec, None, cop, prompt, augment=True, max_new_tokens=10, reaugment_every=3))
    assert len(steps) == 10
    batch = augment.greedy_generate_batch(dec, cop, [prompt[0].tolist(), prompt[0, :7].tolist()], max_new_tokens=14)
    assert batch[0] == got


@pytest.mark.parametrize("name", NAMES)
def test_mode_a_and_b_scores(name):
    dec = _decoder(name)
    cop = _coprocessor(dec)
    ids = _ids(6)
    point = 9
    s = augment.score_continuation(dec, cop, ids, point)
    C = T - 1 - point
    ref = _reference_logits(dec, ids, point, s.latents, C)
    want = torch.nn.functional.cross_entropy(ref, ids[0, point + 1:], reduction="none")
    torch.testing.assert_close(s.nll_aug, want, atol=1e-4, rtol=1e-4)
    plain = dec(input_ids=ids).logits[0, point:-1]
    torch.testing.assert_close(s.nll_base, torch.nn.functional.cross_entropy(plain, ids[0, point + 1:], reduction="none"),
                               atol=1e-4, rtol=1e-4)
    aug, _ = augment.score_after_every_token(dec, cop, ids, positions=A, points_per_pass=7, fast=False)
    for p in (2, point, T - 3):
        n = min(A, T - 1 - p)
        ref = _reference_logits(dec, ids, p, cop(augment.prefill(dec, ids)[0], torch.tensor([[p]]))[0, 0], n)
        want = torch.nn.functional.cross_entropy(ref, ids[0, p + 1: p + 1 + n], reduction="none")
        torch.testing.assert_close(aug[p, :n], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("delay", [0, 2])
def test_benchmark_scoring_equals_the_reference(name, delay):
    """eval.score_requests (benchmarks; padded contexts of several lengths, latents arriving
    `delay` continuation tokens late) against the decoder's own forward over context, the first
    `delay` continuation tokens, the latents, the rest."""
    from cacheaug_core.eval import score_requests

    dec = _decoder(name)
    cop = _coprocessor(dec)
    ids = _ids(9, 30)[0].tolist()
    reqs = [(ids[:14], ids[14:20]), (ids[3:13], ids[13:18]), (ids[:14], ids[20:26])]
    got = score_requests(dec, reqs, {"plain": None, "aug": cop}, async_delay=delay)
    emb = dec.get_input_embeddings()
    for i, (c, t) in enumerate(reqs):
        ctx = torch.tensor([c])
        z = cop(augment.prefill(dec, ctx)[0], torch.tensor([[len(c) - 1]]))[0, 0]        # (NL, d)
        full = torch.tensor([c + t])
        plain = torch.log_softmax(dec(input_ids=full).logits[0, len(c) - 1: -1], -1)
        want_plain = plain.gather(-1, torch.tensor(t)[:, None])[:, 0]
        x = torch.cat([emb(full[:, : len(c) + delay])[0], z, emb(full[:, len(c) + delay:])[0]])[None]
        lp = torch.log_softmax(dec(inputs_embeds=x).logits[0], -1)
        rows = list(range(len(c) - 1, len(c) - 1 + delay)) + [len(c) + delay - 1 + NL + j for j in range(len(t) - delay)]
        want_aug = lp[rows].gather(-1, torch.tensor(t)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got["plain"].token_logprobs[i]).double(), want_plain.double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(got["aug"].token_logprobs[i]).double(), want_aug.double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    dec = _decoder(name)
    cop = _coprocessor(dec, body="lora", lora_rank=2, latent_gate=True)
    info = families_info(dec)
    checkpoint.save_coprocessor(cop, tmp_path / "ck", info)
    back = checkpoint.load_coprocessor(tmp_path / "ck", dec, info).float()
    ids = _ids(7)
    cache, _ = augment.prefill(dec, ids)
    pts = torch.tensor([[5, 15]])
    torch.testing.assert_close(back(cache, pts), cop(cache, pts))


def families_info(dec):
    from cacheaug_core.decoder import decoder_info

    return decoder_info(dec, None, "tiny")


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_dense_or_refuses_by_name(name):
    dec = _decoder(name)
    cop = _coprocessor(dec, num_layers=1)
    why = fastpath.unsupported(dec, cop)
    if not families.FAMILIES[name].fast_path:
        assert why is not None and (dec.config.model_type in why or "window" in why), why
        return
    assert why is None, why
    ids = _ids(8)
    aug_f, base_f = fastpath.score_every(dec, cop, ids, positions=A, points_per_pass=8)
    aug_d, base_d = augment.score_after_every_token(dec, cop, ids, positions=A, fast=False)
    torch.testing.assert_close(aug_f, aug_d, atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(base_f, base_d, atol=1e-4, rtol=1e-4, equal_nan=True)
    pts = torch.tensor([[3, 11, 17]])
    loss_d, _ = augment.multi_point_loss(dec, cop, ids, pts, A)
    loss_f = fastpath.multi_point_loss(dec, cop, ids, pts, A, attention="dense")
    torch.testing.assert_close(loss_f, loss_d, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused_in_one_line():
    from transformers import AutoModelForCausalLM, BloomConfig

    dec = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="'bloom' is not supported") as e:
        Coprocessor(CoprocessorConfig(num_latents=NL), dec)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The matrix catches what it is there to catch.


def test_the_matrix_catches_a_dropped_softcap(monkeypatch):
    dec = _decoder("gemma2")
    cop = _coprocessor(dec)
    ids, pts = _ids(1), torch.tensor([[11, 17]])
    check_augmented_parity(dec, cop, ids, pts)
    monkeypatch.setattr(families, "logit_softcap", lambda config: None)
    with pytest.raises(AssertionError):
        check_augmented_parity(dec, cop, ids, pts)


def test_the_matrix_catches_a_dropped_embedding_scale(monkeypatch):
    import cacheaug_core.coprocessor as coprocessor_module

    monkeypatch.setattr(coprocessor_module, "embedding_rms",
                        lambda emb: emb.weight.float().pow(2).mean(-1).sqrt().mean())
    with pytest.raises(AssertionError):
        test_latents_enter_at_the_token_embedding_scale("gemma2")


@pytest.mark.parametrize("name", ["mistral-window", "gemma2"])
def test_the_matrix_catches_a_dropped_window(name, monkeypatch):
    dec = _decoder(name)
    cop = _coprocessor(dec)
    ids, pts = _ids(1), torch.tensor([[11, 17]])
    monkeypatch.setattr(families, "has_window", lambda config: False)
    dec2 = _decoder(name)                 # hooks attached with no windows
    monkeypatch.setattr(families, "layer_windows", lambda config: [None] * config.num_hidden_layers)
    cop2 = _coprocessor(dec2)
    with pytest.raises(AssertionError):
        check_augmented_parity(dec2, cop2, ids, pts)
    monkeypatch.undo()
    check_augmented_parity(dec, cop, ids, pts)


# ---------------------------------------------------------------------------------------------
# The command line on a saved tiny Gemma-2 (the paper's decoder family), and an unsupported one.


def test_cli_train_on_a_tiny_gemma2_folder(tmp_path, repeated_text_file, capsys):
    from cacheaug_core.checkpoint import read_config
    from cacheaug_core.cli import main
    from tests.conftest import save_tiny_decoder

    dec = save_tiny_decoder(tmp_path / "gemma2", "gemma2")
    rc = main(["train", "--decoder", dec, "--data", repeated_text_file, "--out-dir", str(tmp_path / "run"),
               "--seq-len", "40", "--points", "3", "--n-ahead", "3", "--batch-size", "2", "--steps", "2",
               "--eval-every", "0", "--device", "cpu", "--num-latents", "2", "--num-layers", "1", "--latent-gate"])
    assert rc == 0, capsys.readouterr().err
    cfg = read_config(tmp_path / "run" / "last")
    assert cfg["decoder"]["model_type"] == "gemma2"
    rc = main(["score", "--decoder", dec, "--coprocessor", str(tmp_path / "run" / "last"), "--text",
               "the quick brown fox jumps over the lazy dog", "--every", "--positions", "3"])
    assert rc == 0, capsys.readouterr().err


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path, repeated_text_file, capsys):
    from transformers import AutoModelForCausalLM, BloomConfig

    from cacheaug_core.cli import main
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer()
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)
                                     ).save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    capsys.readouterr()                   # the saving's progress bars
    rc = main(["train", "--decoder", str(tmp_path / "bloom"), "--data", repeated_text_file,
               "--out-dir", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'bloom' is not supported" in err[0], err
    assert not (tmp_path / "run").exists()


def test_cli_app_on_a_tiny_gemma2_serves_the_decoders_own_scores(tmp_path, repeated_text_file):
    """`cacheaug app --decoder <tiny Gemma-2> --coprocessor <trained on it>` as a user starts it (a
    separate process), called through gradio_client: the per-token export of mode (a) holds the
    NLLs the decoder's own forward gives (softcap and embedding scale included: `score_text` is
    checked against that forward in the parity matrix above)."""
    import csv
    import socket
    import subprocess
    import sys
    import time

    gradio_client = pytest.importorskip("gradio_client")
    from cacheaug_core.cli import main
    from cacheaug_core.workbench import Workbench
    from tests.conftest import save_tiny_decoder

    dec = save_tiny_decoder(tmp_path / "gemma2", "gemma2")
    assert main(["train", "--decoder", dec, "--data", repeated_text_file, "--out-dir", str(tmp_path / "run"),
                 "--seq-len", "40", "--points", "3", "--n-ahead", "3", "--batch-size", "2", "--steps", "2",
                 "--eval-every", "0", "--device", "cpu", "--num-latents", "2", "--num-layers", "1",
                 "--latent-gate"]) == 0
    cop = str(tmp_path / "run" / "last")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cacheaug_core.cli", "app", "--decoder", dec, "--coprocessor", cop,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        client, t0 = None, time.time()
        while client is None:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {proc.stdout.read()[-2000:]}")
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                if time.time() - t0 > 120:
                    raise
                time.sleep(1)
        text = "The cat sat on the mat. Then the cat slept all day long."
        out = client.predict(text, "once", 4, 8, 1, 5, api_name="/analyze")
        export = next(f for f in out[6:] if f and str(f).endswith("cacheaug-per-token.csv"))
        with open(export, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ref = Workbench.load(decoder=dec, coprocessor=cop).score_text(text, point=4, top_k=5, with_attention=False)
    assert len(rows) == len(ref["tokens"])
    for i in range(5, len(rows)):
        assert float(rows[i]["nll_aug"]) == pytest.approx(float(ref["nll_aug"][i]), abs=1e-5)
        assert float(rows[i]["nll_base"]) == pytest.approx(float(ref["nll_base"][i]), abs=1e-5)
