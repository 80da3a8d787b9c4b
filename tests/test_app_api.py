"""The app's API: every endpoint called through `gradio_client` on a tiny random decoder.

Each test checks the returned data against the Workbench / viz result computed directly, so
the UI wiring (argument order, modes, exports) is verified, not only "no error". Runs in
seconds; no network, no real model.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import socket
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from cacheaug_core import app  # noqa: E402
from cacheaug_core import viz  # noqa: E402
from cacheaug_core.workbench import Workbench  # noqa: E402
from cacheaug_core.viz import app_views  # noqa: E402

TEXT = "The cat sat on the mat. Then the cat slept all day long."
GEN = dict(extra=[], chat=True, max_new=6, temperature=0.0, top_p=1.0, top_k=0, seed=0, reaug=0, async_delay=0)
HOSTILE = ('<script>window.__pwned=1</script> "><img src=x onerror="window.__pwned=1"> javascript:alert(1) '
           "\u202eevil\u202c zero\u200bwidth e\u0301\u0301\u0301 ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wb(tiny_decoder_dir):
    return Workbench.load(decoder=tiny_decoder_dir)


@pytest.fixture(scope="module")
def server(wb):
    demo = app.build_demo(wb)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(),
                            quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def _gen_args(prompt, **kw):
    g = GEN | kw
    return (prompt, g["extra"], g["chat"], g["max_new"], g["temperature"], g["top_p"], g["top_k"], g["seed"],
            g["reaug"], g["async_delay"])


def _direct(wb, prompt, arms=("decoder", "coprocessor"), cot=False, **kw):
    g = GEN | kw
    final = None
    for final in wb.generate_pair(prompt, arms=list(arms), chat=g["chat"], cot=cot, max_new_tokens=g["max_new"],
                                  temperature=g["temperature"], top_p=g["top_p"], top_k=g["top_k"], seed=g["seed"],
                                  reaugment_every=g["reaug"], async_delay=g["async_delay"]):
        pass
    return final


def _frame(d):
    """A gr.Dataframe value from the client -> list of row dicts."""
    return [dict(zip(d["headers"], row)) for row in d["data"]]


def _plot(p):
    assert p["type"] == "plotly"
    return json.loads(p["plot"])


def _arr(v) -> np.ndarray:
    """A plotly JSON array: a list, or plotly 6's typed array {dtype, bdata (base64), shape}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if shape:
            a = a.reshape([int(x) for x in str(shape).split(",")] if isinstance(shape, str) else shape)
        return a
    return np.asarray(v, dtype=float)


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.spans.append(a)


def _spans(html_text):
    p = _Spans()
    p.feed(html_text)
    return p


# ---------------------------------------------------------------------------------------------


def test_every_endpoint_has_a_stable_api_name(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(named) == {"/" + n for n in app.API_NAMES}
    params = [p["parameter_name"] for p in named["/generate"]["parameters"]]
    assert params == ["prompt", "extra_arms", "chat", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                      "reaugment_every", "async_delay"]


def test_theme_and_css_reach_the_page(server):
    import urllib.request

    config = json.loads(urllib.request.urlopen(server[1].rstrip("/") + "/config").read())
    assert ".cacheaug-tokens span.tok" in (config.get("css") or "")


def test_generate_streams_both_arms_identically_to_the_workbench(client, wb):
    job = client.submit(*_gen_args("Hello there"), api_name="/generate")
    partials = list(job)
    dec, aug, pause, cot, stats, settings, diverge, status, run_json = job.result()
    assert len(partials) >= 3                          # streamed: one update per generated token
    ref = _direct(wb, "Hello there")
    assert dec == ref["decoder"].text and aug == ref["coprocessor"].text
    assert pause == "" and cot == ""
    rows = {r["arm"]: r for r in _frame(stats)}
    assert set(rows) == {"decoder", "coprocessor"}
    for name in rows:
        assert rows[name]["tokens"] == len(ref[name].token_ids)
        assert rows[name]["time_to_first_token_s"] > 0
    assert settings["settings (identical for every arm)"]["max_new_tokens"] == 6
    assert settings["greedy"] is True
    assert status.startswith("Done:") and "Generating" in partials[0][7]
    run = json.loads(Path(run_json).read_text(encoding="utf-8"))
    assert run["arms"]["decoder"]["text"] == dec and run["arms"]["coprocessor"]["text"] == aug
    assert run["arms"]["decoder"]["token_ids"] == ref["decoder"].token_ids
    # Where the arms part, and each arm's text under both arms (the decoder's own forward for the decoder).
    a, b = ref["decoder"].token_ids, ref["coprocessor"].token_ids
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    comp = run["comparison"]
    assert (comp["first_divergence"] or {}).get("token_index") == at or (at is None and len(a) != len(b))
    assert ("part at generated token" in diverge) == (comp["first_divergence"] is not None)
    torch = pytest.importorskip("torch")
    pids = wb.encode("Hello there", chat=True)[0].tolist()
    x = torch.tensor([pids + a])
    with torch.no_grad():
        logp = torch.log_softmax(wb.decoder(x).logits.float(), -1)[0]
    nll = -logp[len(pids) - 1:-1].gather(-1, x[0, len(pids):, None]).mean().item()
    assert comp["cross_scores"]["decoder"]["nll_decoder"] == pytest.approx(nll, abs=1e-4)
    assert comp["cross_scores"]["coprocessor"]["tokens"] == len(b)
    # Partial updates grow token by token.
    lens = [len(p[0]) for p in partials if p and isinstance(p[0], str)]
    assert lens == sorted(lens)


def test_generate_options_reach_the_workbench(client, wb):
    opts = dict(reaug=2, async_delay=1, temperature=0.8, top_p=0.9, top_k=20, seed=3)
    dec, aug, pause, cot, stats, *_ = client.predict(*_gen_args("Hello", extra=["cot", "pause"], **opts),
                                                      api_name="/generate")
    ref = _direct(wb, "Hello", cot=True, **opts)
    assert dec == ref["decoder"].text and aug == ref["coprocessor"].text
    assert cot == ref["cot"].text and cot
    assert pause == ""                                 # no pause checkpoint: the arm is skipped with a warning
    assert [r["arm"] for r in _frame(stats)] == ["decoder", "coprocessor", "cot"]


def test_generate_rejects_empty_input_with_a_message(client):
    for bad in ("", "   \n\t "):
        with pytest.raises(AppError, match="empty"):
            client.predict(*_gen_args(bad), api_name="/generate")


def test_analyze_once_matches_score_text(client, wb):
    notice, html_text, summary, by_pos, heat, per_token, *files = client.predict(
        TEXT, "once", 4, 8, 1, 5, api_name="/analyze")
    res = wb.score_text(TEXT, point=4, top_k=5, with_attention=False)
    T = len(res["tokens"])
    # Token view: one span per token with Δloss in its title, unscored up to the point.
    spans = _spans(html_text).spans
    assert len(spans) == T
    for i, s in enumerate(spans):
        if i <= 4:
            assert "not scored" in s["title"]
        else:
            d = res["nll_aug"][i] - res["nll_base"][i]
            assert f"Δloss={d:+.3f}" in s["title"], s["title"]
    # Summary table equals viz.summary_table on the Workbench's arrays.
    exp = viz.summary_table(res["nll_base"], res["nll_aug"])
    got = _frame(summary)
    assert [r["arm"] for r in got] == list(exp["arm"])
    assert float(got[0]["mean NLL"]) == pytest.approx(exp["mean NLL"][0], abs=1e-4)       # shown to 4 decimals
    # the change row reads signed, in its own units: Δ mean NLL in nats, relative change in %
    d, rel = exp["mean NLL"][2], exp["relative change %"][2]
    assert got[2]["mean NLL"] == f"{d:+.4f} nats" and got[2]["relative change %"] == f"{rel:+.2f}%"
    assert got[2]["perplexity"] == "" and got[0]["relative change %"] == ""
    assert got[2]["95% interval %"] == exp["95% interval %"][2]
    assert got[0]["tokens scored"] == T - 5
    # Δ by position: relative change + both arms; position k = token point+k.
    fig = _plot(by_pos)
    names = [t.get("name") for t in fig["data"]]
    assert {"relative change", "decoder", "decoder+coprocessor"} <= set(names)
    rel = next(t for t in fig["data"] if t.get("name") == "relative change")
    assert _arr(rel["x"]).tolist() == list(range(1, T - 4))
    assert "Mode (b) only" in json.dumps(_plot(heat))
    assert "after token #4" in notice
    # Per-token table and exports.
    rows = _frame(per_token)
    assert len(rows) == T and rows[5]["nll_aug"] == pytest.approx(res["nll_aug"][5], abs=1e-4)
    assert files[3] is None                            # no heatmap in mode (a)
    names = {Path(f).name: f for f in files[:3]}
    assert list(names) == ["cacheaug-per-token.csv", "cacheaug-analysis.json", "cacheaug-by-position.html"]
    with open(names["cacheaug-per-token.csv"], encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == T                             # the export keeps full precision:
    assert float(table[-1]["nll_base"]) == pytest.approx(res["nll_base"][-1], rel=1e-9)
    run = json.loads(Path(names["cacheaug-analysis.json"]).read_text(encoding="utf-8"))
    assert run["mode"] == "once" and run["point"] == 4 and run["nll_base"][0] is None
    assert len(run["tokens"]) == T and run["summary"][2]["arm"] == "change"
    assert "plotly" in Path(names["cacheaug-by-position.html"]).read_text(encoding="utf-8")[:200_000].lower()


def test_analyze_default_point_is_the_workbench_default(client, wb):
    notice = client.predict(TEXT, "once", -1, 8, 1, 5, api_name="/analyze")[0]
    assert f"after token #{wb.score_text(TEXT)['point']}" in notice


def test_analyze_every_matches_score_every(client, wb):
    notice, html_text, summary, by_pos, heat, per_token, *files = client.predict(
        TEXT, "every", -1, 4, 2, 5, api_name="/analyze")
    res = wb.score_every(TEXT, positions=4)
    T = len(res["tokens"])
    base, aug = app_views.nth_ahead_per_token(res["nll_base"], res["nll_aug"], 2)
    spans = _spans(html_text).spans
    assert len(spans) == T
    assert "not scored" in spans[1]["title"] and f"Δloss={aug[5] - base[5]:+.3f}" in spans[5]["title"]
    assert float(_frame(summary)[1]["mean NLL"]) == pytest.approx(np.nanmean(aug), abs=1e-4)
    hm = _plot(heat)["data"][0]
    assert hm["type"] == "heatmap"
    z = _arr(hm["z"])
    assert z.shape == (4, T)                           # columns = scored tokens; token 0 is never scored
    assert np.isnan(z[:, 0]).all()
    np.testing.assert_allclose(z[0, 1], res["nll_aug"][0, 0] - res["nll_base"][0, 0], rtol=1e-5)
    np.testing.assert_allclose(z[1, 5], aug[5] - base[5], rtol=1e-5)
    rel = next(t for t in _plot(by_pos)["data"] if t.get("name") == "relative change")
    assert _arr(rel["x"]).tolist() == [1, 2, 3, 4]
    assert "2 tokens earlier" in notice
    assert [Path(f).name for f in files] == ["cacheaug-per-token.csv", "cacheaug-analysis.json",
                                             "cacheaug-by-position.html", "cacheaug-heatmap.html"]
    run = json.loads(Path(files[1]).read_text(encoding="utf-8"))
    assert run["mode"] == "every" and len(run["nll_aug_by_point"]) == T - 1 and len(run["nll_aug_by_point"][0]) == 4


def test_analyze_every_streams_partial_views_then_the_final_result(client, wb):
    text = " ".join(f"word{i} and {i % 7}." for i in range(40))        # well over one pass of points
    job = client.submit(text, "every", -1, 3, 1, 5, api_name="/analyze")
    final = job.result()
    outs = job.outputs()
    res = wb.score_every(text, positions=3)
    P = len(res["tokens"]) - 1
    partials = [o for o in outs if "augmentation points done" in o[0]]
    assert partials and final[0] == outs[-1][0] and "augmentation points done" not in final[0]
    full = _arr(_plot(final[4])["data"][0]["z"])
    diff = app_views.by_scored_token(res["nll_aug"] - res["nll_base"])
    np.testing.assert_allclose(full, diff, rtol=1e-5, equal_nan=True)        # the final = the workbench's result
    filled = []
    for o in partials:
        z = _arr(_plot(o[4])["data"][0]["z"])
        ok = np.isfinite(z)
        np.testing.assert_allclose(z[ok], full[ok], rtol=1e-5)                # partial cells = final cells
        filled.append(int(ok.sum()))
        assert all(f is None for f in o[6:10])                                # no downloads of a partial
    assert filled == sorted(filled) and filled[-1] < np.isfinite(full).sum()  # fills in, pass by pass
    assert f"of {P} augmentation points" in partials[0][0]
    assert all(f is not None for f in final[6:10])


def test_token_detail_both_modes(client, wb):
    res = wb.score_text(TEXT, point=4, top_k=5, with_attention=False)
    client.predict(TEXT, "once", 4, 8, 1, 5, api_name="/analyze")
    table, detail = client.predict(5, 10, api_name="/token_detail")
    rows = _frame(table)
    assert len(rows) == 5
    pb = [r["decoder p"] for r in rows]
    assert pb == sorted(pb, reverse=True)
    assert pb[0] == pytest.approx(float(res["topk_base"][1][10 - 5][0]), abs=1e-5)
    assert rows[0]["decoder token"] == viz.display_token(wb.token_strings([res["topk_base"][0][5][0]])[0])
    assert f"{float(res['kl_aug_base'][5]):.5f}" in detail and "#10" in detail
    # Before the augmentation point: a message, no table.
    table, detail = client.predict(5, 2, api_name="/token_detail")
    assert not any(any(str(c).strip() for c in row) for row in table["data"])
    assert "not scored" in detail
    # Mode (b): the n-th-ahead NLL agrees with the analysis' per-token view.
    every = wb.score_every(TEXT, positions=3)
    base, aug = app_views.nth_ahead_per_token(every["nll_base"], every["nll_aug"], 3)
    client.predict(TEXT, "every", -1, 3, 3, 5, api_name="/analyze")
    _, detail = client.predict(5, 9, api_name="/token_detail")
    m = re.search(r"decoder\+coprocessor ([0-9.]+)", detail)
    assert m and float(m.group(1)) == pytest.approx(aug[9], abs=2e-4)
    assert "after token #6 (3 ahead)" in detail
    _, detail = client.predict(5, 1, api_name="/token_detail")
    assert "no augmentation point" in detail


def test_use_generation_takes_the_chosen_arm_of_this_sessions_run(server, wb):
    client = Client(server[1], verbose=False)          # a session of its own: /use_generation reads its last run
    with pytest.raises(AppError, match="Generate first"):
        client.predict("decoder", api_name="/use_generation")
    *_, run_json = client.predict(*_gen_args("Why is it?", chat=False), api_name="/generate")
    run = json.loads(Path(run_json).read_text(encoding="utf-8"))
    for arm, label in (("decoder", "decoder alone"), ("coprocessor", "decoder + coprocessor")):
        text, point, mode, note = client.predict(arm, api_name="/use_generation")
        want, want_point, _ = wb.generation_as_text("Why is it?", run["arms"][arm]["token_ids"], chat=False)
        assert (text, point, mode) == (want, want_point, "once")
        assert point == len(wb.encode("Why is it?")[0]) - 1 and text.startswith("Why is it?")
        assert f"the {label} arm&#x27;s own greedy" in note and "biased toward it" in note
        assert "no chat template" in note


def test_use_generation_scores_in_the_chat_template_as_generated(wb):
    """With a chat template, the continuation is scored after the templated prompt (as it was generated),
    not after the bare prompt: the analysis' mean NLLs are the generation's own cross-scores."""
    import copy

    tok = copy.deepcopy(wb.tokenizer)
    tok.chat_template = "{% for m in messages %}[user] {{ m['content'] }}\n{% endfor %}[assistant] "
    chat_wb = Workbench(wb.decoder, tok, wb.info, wb.coprocessor, "test")
    h = app.make_handlers(app.Backend(chat_wb))
    prompt = "What <b>now</b>?"
    cont = chat_wb.encode("It is blue, as 2 + 2 = 4.")[0].tolist()    # ids that decode to themselves
    run = {"prompt": prompt, "settings (identical for every arm)": {"chat_template": True}, "greedy": True,
           "finished": True, "arms": {"coprocessor": {"token_ids": cont}}}
    text, point, mode, note, origin = h["use_generation"]("coprocessor", run)
    assert origin == {"text": text, "arm": "coprocessor", "note": origin["note"]} and "biased" in origin["note"]
    assert text == "[user] What <b>now</b>?\n[assistant] It is blue, as 2 + 2 = 4."
    pids = chat_wb.encode(prompt, chat=True)[0].tolist()
    assert chat_wb.encode(text)[0].tolist() == pids + cont and point == len(pids) - 1
    assert "inside the chat template" in note and "biased toward it" in note
    assert "<b>" not in note                              # the notice is escaped HTML
    origin = origin | {"note": origin["note"] + " <i>"}        # the stored notice, with markup to be escaped
    out = h["analyze"](text, mode, point, 8, 1, 5, origin=origin)
    notice, summary, run_json = out[0], out[2], out[7]
    assert "Biased comparison" in notice and "biased toward it" in notice and "&lt;i&gt;" in notice   # kept
    assert json.loads(Path(run_json).read_text(encoding="utf-8"))["bias_notice"] == origin["note"]
    assert "Biased" not in h["analyze"](text + " edited", mode, point, 8, 1, 5, origin=origin)[0]
    cross = chat_wb.cross_score(prompt, {"coprocessor": cont}, chat=True)["coprocessor"]   # what Generate reports
    assert [float(x) for x in summary["mean NLL"].tolist()[:2]] == pytest.approx(
        [cross["nll_decoder"], cross["nll_coprocessor"]], abs=1e-4)
    # The bare-prompt scoring this replaces gives other numbers (the template is part of the context).
    bare = chat_wb.score_text(prompt + " It is blue, as 2 + 2 = 4.", point=len(chat_wb.encode(prompt)[0]) - 1,
                              with_attention=False)
    assert abs(np.nanmean(bare["nll_aug"]) - cross["nll_coprocessor"]) > 1e-3
    # A stopped, sampled run of the other arm, cut inside a UTF-8 character: said, not hidden.
    run["arms"]["decoder"] = {"token_ids": chat_wb.encode("ok é")[0].tolist()[:-1]}
    run |= {"greedy": False, "finished": False}
    note = h["use_generation"]("decoder", run)[3]
    assert "own sampled output" in note and "stopped early" in note and "re-encodes to different tokens" in note
    with pytest.raises(Exception, match="Generate first"):
        h["use_generation"]("decoder", None)


def test_latents_pca_readout_attention(client, wb):
    prompts = "first prompt\nsecond one\n\nthird <b>x</b>"
    fig, info, readout, attn, *files, sim = client.predict(prompts, 2, "prompt", 3, " and more", api_name="/latents")
    nl = wb.coprocessor.config.num_latents
    f = _plot(fig)
    assert len(f["data"]) == 3 and all(t["type"] == "scatter" for t in f["data"])
    assert sum(len(_arr(t["x"])) for t in f["data"]) == 3 * nl
    assert "third &lt;b&gt;x&lt;/b&gt;" in json.dumps(f)            # hostile label escaped for plotly
    hover = f["data"][0]["hovertemplate"]
    assert "latent #" in hover and "norm" in hover and "closest" in hover
    ref = wb.latents(["first prompt", "second one", "third <b>x</b>"], top_k=3)
    _, evr = viz.latent_pca(ref["latents"], 2)
    assert app_views.explained_variance_text(evr) in info
    rows = _frame(readout)
    assert len(rows) == 3 * nl and rows[nl]["latent"] == 0 and rows[nl]["prompt"] == "second one"
    assert rows[0]["#1"] == viz.display_token(ref["top_tokens"][0][0])
    a = _plot(attn)["data"][0]
    assert a["type"] == "heatmap" and _arr(a["z"]).shape[0] == nl
    assert [Path(x).name for x in files] == ["cacheaug-latents-pca.html", "cacheaug-attention-to-latents.html",
                                             "cacheaug-latent-readout.csv"]
    with open(files[2], encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * nl
    cos = _arr(_plot(sim)["data"][0]["z"])
    lat = wb.latents(["first prompt", "second one", "third <b>x</b>"])["latents"]
    unit = lat / np.linalg.norm(lat, axis=1, keepdims=True)
    np.testing.assert_allclose(cos.reshape(3 * nl, 3 * nl), unit @ unit.T, atol=1e-4)
    # 3-D, coloured by latent index; no continuation -> no attention figure.
    fig, _, _, attn, *files, _sim = client.predict("one\ntwo", 3, "latent", 2, "", api_name="/latents")
    f = _plot(fig)
    assert f["data"][0]["type"] == "scatter3d" and f["data"][0]["marker"]["colorscale"]
    assert "Type a continuation" in json.dumps(_plot(attn))
    assert files[1] is None and files[0] and files[2]
    with pytest.raises(AppError, match="at least one prompt"):
        client.predict(" \n \n", 2, "prompt", 3, "", api_name="/latents")


def test_hostile_text_is_escaped_everywhere(client):
    notice, html_text, summary, *_ = client.predict(HOSTILE * 3, "once", -1, 8, 1, 5, api_name="/analyze")
    p = _spans(html_text)
    assert {t for t, _ in p.tags} <= {"div", "span", "br"}          # no script / img element
    assert all(not k.startswith("on") for _, a in p.tags for k in a)
    assert "<script" not in html_text and "<img" not in html_text
    assert "\u202e" not in html_text and "\u200b" not in html_text   # never raw: byte tokens or visible escapes
    assert len(p.spans) > 20
    client.predict(HOSTILE, "once", 2, 8, 1, 5, api_name="/analyze")
    table, detail = client.predict(5, 5, api_name="/token_detail")
    assert "<script" not in detail and "<img" not in detail
    dec, aug, *_ = client.predict(*_gen_args(HOSTILE), api_name="/generate")
    assert isinstance(dec, str) and isinstance(aug, str)


def test_lone_surrogates_and_long_input(client, wb):
    # httpx cannot send lone surrogates (a browser can), so the handlers are called directly here.
    h = app.make_handlers(app.Backend(wb))
    notice, html_text, *_ = h["analyze"]("abc \ud800 def \udfff ghi", "once", -1, 8, 1, 5)
    assert len(_spans(html_text).spans) > 5
    html_text.encode("utf-8")                                       # nothing unencodable reaches the page
    *_, final = h["generate"]("abc \ud800 def", [], True, 4, 0.0, 1.0, 0, 0, 0, 0)
    assert Path(final[8]).read_text(encoding="utf-8")                # the run JSON
    fig, *_ = h["latents"]("abc \udfff\nsecond", 2, "prompt", 3, "cont \ud800")
    fig.to_json().encode("utf-8")
    notice, html_text, summary, *_ = client.predict("word " * 20_000, "once", -1, 8, 1, 5, api_name="/analyze")
    assert "truncated" in notice.lower()
    assert _frame(summary)[0]["tokens scored"] > 0
    dec, *_rest, run_json = client.predict(*_gen_args("x" * 100_000), api_name="/generate")
    run = json.loads(Path(run_json).read_text(encoding="utf-8"))
    assert "truncated" in run["prompt_notice"].lower()
    assert len(run["prompt"]) <= app.GEN_MAX_CHARS


def test_model_info_and_bad_checkpoints(server, tmp_path, tiny_decoder_dir, wb):
    client = Client(server[1], verbose=False)          # its own session: the loads below are this session's
    banner, status, card, evaluation, err = client.predict(api_name="/model_info")
    assert "UNTRAINED" in banner and err == ""
    assert status["coprocessor_source"] == "untrained" and status["decoder"]["hidden_size"] == 32
    assert "untrained" in card and "No evaluation" in evaluation
    # A folder holding pickled weights: refused with a clear message; the old model stays loaded.
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04")
    banner, status, _, _, err = client.predict("", str(bad), api_name="/load_model")
    assert "pickled" in err and "Traceback" not in err
    assert "Last load failed" in banner and status["coprocessor_source"] == "untrained"
    # A checkpoint trained for another decoder.
    from cacheaug_core.checkpoint import save_coprocessor
    from cacheaug_core.config import CoprocessorConfig
    from cacheaug_core.coprocessor import Coprocessor
    from conftest import save_tiny_decoder

    other = Workbench.load(decoder=save_tiny_decoder(tmp_path / "gpt2", "gpt2"))
    cop = Coprocessor(CoprocessorConfig(num_latents=4, body="copy", num_layers=1), other.decoder)
    ck = save_coprocessor(cop, tmp_path / "ck", other.info, evaluation={"ppl": {"before": 3.0, "after": 2.5}},
                          status="trained on a toy corpus <b>")
    _, _, _, _, err = client.predict(tiny_decoder_dir, str(ck), api_name="/load_model")
    assert "trained for decoder" in err
    # The right decoder for it: card, evaluation table and status shown; '<b>' escaped in the banner.
    banner, status, card, evaluation, err = client.predict(str(tmp_path / "gpt2"), str(ck), api_name="/load_model")
    assert err == "" and "trained on a toy corpus &lt;b&gt;" in banner and "UNTRAINED" not in banner
    assert status["coprocessor"]["num_latents"] == 4 and "Coprocessor for" in card
    assert "| before | 3.0 |" in evaluation
    # Loading the decoder alone again gives an untrained coprocessor.
    banner, status, *_ = client.predict(tiny_decoder_dir, "", api_name="/load_model")
    assert status["coprocessor_source"] == "untrained" and "UNTRAINED" in banner
    assert "for this page only" in banner


def test_main_honours_env_and_defaults(monkeypatch):
    calls = {}

    class Fake:
        class cacheaug_backend:  # noqa: N801
            error = ""

            @staticmethod
            def get():
                return type("W", (), {"notice": ""})()

        def launch(self, **kw):
            calls.update(kw)

    monkeypatch.setattr(app, "build_demo", lambda factory, pause=None, startup_key=None: Fake())
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert app.main([]) == 0
    assert calls == {"server_name": "127.0.0.1", "server_port": 7860, "share": False}
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    assert app.main([]) == 0
    assert calls == {"server_name": "0.0.0.0", "server_port": 8123, "share": False}
    assert app.main(["--port", "9000", "--host", "localhost", "--share"]) == 0
    assert calls == {"server_name": "localhost", "server_port": 9000, "share": True}


def test_lazy_factory_failure_is_a_message_not_a_crash():
    def broken():
        from cacheaug_core.checkpoint import CheckpointError

        raise CheckpointError("no checkpoint folder at /nowhere")

    demo = app.build_demo(broken)
    with pytest.raises(Exception, match="no checkpoint folder"):
        demo.cacheaug_backend.get()
    assert "no checkpoint folder at /nowhere" in demo.cacheaug_backend.error


# --- regressions ----------------------------------------------------------------------------------


def test_token_detail_describes_the_analysis_shown_not_the_widgets(client, wb):
    # Mode (b), 4 positions, "colour by 8 ahead": the analysis clamps n to 4, and so does the detail.
    notice = client.predict(TEXT, "every", -1, 4, 8, 5, api_name="/analyze")[0]
    assert "4 tokens earlier" in notice
    every = wb.score_every(TEXT, positions=4)
    _, aug = app_views.nth_ahead_per_token(every["nll_base"], every["nll_aug"], 4)
    _, detail = client.predict(5, 9, api_name="/token_detail")
    assert "after token #5 (4 ahead)" in detail
    m = re.search(r"decoder\+coprocessor ([0-9.]+)", detail)
    assert m and float(m.group(1)) == pytest.approx(aug[9], abs=2e-4)
    # The stored analysis, whatever the widgets say now: the handler takes no text, mode or point.
    h = app.make_handlers(app.Backend(wb))
    shown = h["analyze"](TEXT, "once", 4, 8, 1, 5)[-1]
    assert shown == {"text": TEXT, "mode": "once", "point": 4}
    _, detail = h["token_detail"](shown, 5, 10)
    res = wb.score_text(TEXT, point=4, top_k=5, with_attention=False)
    assert f"{float(res['kl_aug_base'][5]):.5f}" in detail
    with pytest.raises(Exception, match="Analyse first"):
        h["token_detail"](None, 5, 3)


def test_latents_attention_keeps_the_continuation_of_a_long_prompt(client, wb):
    cont = " and then it rained"
    fig, info, _, attn, *_ = client.predict("word " * 3000, 2, "prompt", 3, cont, api_name="/latents")
    a = _plot(attn)["data"][0]
    assert a["type"] == "heatmap"
    n_cont = len(wb.encode(cont)[0])
    assert _arr(a["z"]).shape == (wb.coprocessor.config.num_latents, n_cont)   # every column a continuation token
    assert "shortened" in info
    text, point, note = wb.fit_prompt_continuation("word " * 3000, cont, app.ATTENTION_MAX_TOKENS)
    assert text.endswith("word " + cont) and point == len(wb.encode(text[: -len(cont)])[0]) - 1
    assert len(wb.encode(text)[0]) <= app.ATTENTION_MAX_TOKENS and "last" in note
    # A short prompt is left whole.
    assert wb.fit_prompt_continuation("Hi", "there", 64) == ("Hi there", 1, "")


def test_examples_run_generate_with_every_output(server):
    demo = server[0]
    gens = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "generate"]
    assert len(gens) == 2                                   # the button and the examples: one handler
    outs = {tuple(o._id for o in f.outputs) for f in gens}
    ins = {tuple(i._id for i in f.inputs) for f in gens}
    assert len(outs) == 1 and len(ins) == 1                 # same settings in, same status/downloads out


def test_token_strings_show_partial_utf8_as_byte_escapes(client, wb):
    ids = wb.encode("aé🙂")[0].tolist()
    toks = wb.token_strings(ids)
    assert toks[0] == "a" and "\ufffd" not in "".join(toks)
    assert toks[1:3] == ["\\xc3", "\\xa9"] and toks[3:] == ["\\xf0", "\\x9f", "\\x99", "\\x82"]
    assert wb.token_strings(wb.encode("<b>")[0]) == ["<", "b", ">"]
    _, html_text, *_ = client.predict("Smile 🙂 <b>ok</b> please", "once", 1, 8, 1, 5, api_name="/analyze")
    assert "\ufffd" not in html_text and "\\xf0" in html_text and "<b>" not in html_text


def test_stop_makes_the_partial_run_downloadable(wb):
    h = app.make_handlers(app.Backend(wb))
    gen = h["generate"]("Hello there", [], True, 6, 0.0, 1.0, 0, 0, 0, 0)
    first = next(gen)
    gen.close()
    assert first[8] is None                                   # no file while running
    status, path = h["stop_generation"](first[9])
    run = json.loads(Path(path).read_text(encoding="utf-8"))
    assert run["finished"] is False and run["arms"]["decoder"]["tokens"] == 1
    assert status == "Stopped."
    assert h["stop_generation"](None) == ("Stopped.", None)


def test_status_says_when_latents_never_arrived(client):
    *_, status, run_json = client.predict(*_gen_args("Hello", max_new=4, async_delay=4), api_name="/generate")
    assert "never arrived" in status
    assert json.loads(Path(run_json).read_text(encoding="utf-8"))["notes"]


def test_backend_keeps_the_startup_pause_and_load_errors_stay_in_their_session(monkeypatch, server, wb):
    import functools

    calls = []
    backend = app.Backend(functools.partial(Workbench.load, None, None, pause="my/pause"), pause="my/pause")
    assert backend.pause == "my/pause"
    monkeypatch.setattr(app.Workbench, "load", lambda *a, **kw: calls.append((a, kw)) or wb)
    backend.load("dec", "cop")
    assert calls == [(("dec", "cop"), {"pause": "my/pause"})]
    # A failed load is shown to the session that tried it, not to sessions opened later.
    monkeypatch.undo()
    url = server[1]
    mine = Client(url, verbose=False)
    _, _, _, _, err = mine.predict("", "/no/such/checkpoint", api_name="/load_model")
    assert err
    banner, _, _, _, err = Client(url, verbose=False).predict(api_name="/model_info")
    assert err == "" and "Last load failed" not in banner
    assert server[0].cacheaug_backend.error == ""


def test_shipped_coprocessor_by_relative_path_keeps_its_pause_arm(monkeypatch, tmp_path, tiny_decoder_dir, wb):
    from cacheaug_core import workbench as wbmod
    from cacheaug_core.checkpoint import save_coprocessor
    from cacheaug_core.config import CoprocessorConfig
    from cacheaug_core.coprocessor import Coprocessor

    assets = tmp_path / "assets"
    for name, body in (("coprocessor", "copy"), ("pause", "none")):
        cop = Coprocessor(CoprocessorConfig(num_latents=2, body=body, num_layers=1), wb.decoder)
        save_coprocessor(cop, assets / name, wb.info)
    monkeypatch.setattr(wbmod, "SHIPPED_COPROCESSOR", assets / "coprocessor")
    monkeypatch.setattr(wbmod, "SHIPPED_PAUSE", assets / "pause")
    monkeypatch.chdir(tmp_path)
    loaded = Workbench.load(tiny_decoder_dir, "assets/coprocessor")
    assert loaded.pause is not None and loaded.pause_source == str(assets / "pause")
    assert loaded.coprocessor_source == "assets/coprocessor"
    assert Workbench.load(tiny_decoder_dir, "assets/coprocessor", pause="").pause is None   # opting out still works


def test_stop_ends_a_mode_b_analysis_between_passes(wb):
    """Stop during a mode (b) analysis: the next pass raises "Stopped." so the model slot is freed
    (cancelling the event alone leaves the thread computing); the next Analyse of that session runs."""
    import gradio as gr

    h = app.make_handlers(app.Backend(wb))
    from types import SimpleNamespace

    session = SimpleNamespace(session_hash="s1")
    text = "a fairly long text to score, with several passes ahead of it. " * 3

    def press_stop(*_args, **_kw):       # the Stop button, pressed while the analysis reports progress
        h["stop_analysis"](session)

    with pytest.raises(gr.Error, match="Stopped"):
        h["analyze"](text, "every", -1, 4, 1, 5, progress=press_stop, request=session)
    notice, html_text, *_ = h["analyze"](text, "every", -1, 4, 1, 5, request=session)
    assert "Mode (b)" in notice and "span" in html_text


# ---------------------------------------------------------------------------------------------
# Corpus tab


CORPUS_DOCS = ["The cat sat on the mat. It was 42 years old.", "Dogs bark at night, and 7 owls hoot.",
               "A third text: numbers 1, 2, 3 and words."]


def _corpus_file(tmp_path) -> Path:
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS_DOCS), encoding="utf-8")
    return p


def test_corpus_upload_is_read(client, tmp_path):
    from gradio_client import handle_file

    notice, *_ = client.predict(handle_file(str(_corpus_file(tmp_path))), "", 2, 16, 2, "none", "coprocessor", 1,
                                api_name="/corpus")
    assert "2/2 documents scored" in notice and "sink none" in notice


def test_corpus_streams_per_document_and_matches_the_core(client, wb, tmp_path, monkeypatch):
    from cacheaug_core import corpus

    with pytest.raises(AppError, match="upload"):           # outside the allowed folders
        client.predict(None, str(_corpus_file(tmp_path)), 3, 32, 4, "auto", "coprocessor", 2, api_name="/corpus")
    monkeypatch.setenv("CACHEAUG_CORPUS_DIRS", str(tmp_path))

    path = _corpus_file(tmp_path)
    job = client.submit(None, str(path), 3, 32, 4, "auto", "coprocessor", 2, api_name="/corpus")
    partials = list(job)
    notice, curve, surpr, kind, docs, toks, csv_path, json_path = job.result()
    assert len(partials) >= 4                         # one update per document, then the finished run
    cfg = corpus.CorpusConfig(positions=4, max_docs=3, max_tokens=32, sink="auto", ahead=2)
    res = None
    for res in corpus.score_corpus(wb, corpus.read_corpus(path), cfg):
        pass
    ref = corpus.summarize(res, "coprocessor", 2)
    got = {r["doc"]: r for r in _frame(docs)}
    assert set(got) == {0, 1, 2}
    for _, r in ref["documents"].iterrows():
        assert got[r["doc"]]["scored"] == r["scored"]
        assert got[r["doc"]]["delta"] == pytest.approx(r["delta"], abs=1e-3)
    assert len(_frame(toks)) == len(ref["tokens"])
    fig = _plot(curve)
    line = next(t for t in fig["data"] if t.get("name") == "decoder+coprocessor, all targets")
    bp = ref["by_position"]
    want = bp[(bp["split"] == "all")].sort_values("position")["rel_ppl_change_pct"].to_numpy()
    assert np.allclose(_arr(line["y"]), want, atol=1e-6)
    run = json.loads(Path(json_path).read_text())
    assert run["finished"] and run["ahead"] == 2 and run["settings"]["sink"] == "auto"
    assert len(run["documents_scored"]) == 3 and run["sink_token"] is not None
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert len(rows) == len(ref["tokens"])
    assert "Scoring" in partials[0][0] and "1/3 documents" in partials[0][0]
    # Another n ahead re-tabulates this session's stored run (no model call): same as the core.
    curve2, surpr2, kind2, docs2, toks2, csv2, json2 = client.predict("coprocessor", 1, api_name="/corpus_view")
    ref1 = corpus.summarize(res, "coprocessor", 1)["documents"].set_index("doc")
    for r in _frame(docs2):
        assert r["scored"] == ref1.loc[r["doc"], "scored"]
        assert r["delta"] == pytest.approx(ref1.loc[r["doc"], "delta"], abs=1e-3)
    assert json.loads(Path(json2).read_text())["ahead"] == 1


def test_corpus_rejects_bad_input_in_one_line(client, tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEAUG_CORPUS_DIRS", str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(AppError, match="text"):
        client.predict(None, str(bad), 3, 32, 4, "auto", "coprocessor", 1, api_name="/corpus")
    with pytest.raises(AppError, match="jsonl"):
        client.predict(None, "/etc/passwd", 3, 32, 4, "auto", "coprocessor", 1, api_name="/corpus")


def test_recolour_rerenders_mode_b_from_the_stored_result(wb):
    h = app.make_handlers(app.Backend(wb))
    res = wb.score_every(TEXT, positions=3)
    shown = {"text": TEXT, "mode": "every", "positions": 3, "ahead": 1, "tokens": res["tokens"],
             "nll_base_by_point": res["nll_base"], "nll_aug_by_point": res["nll_aug"]}
    html_text, summary, per_token, shown2 = h["recolour"](shown, 3)
    base, aug = app_views.nth_ahead_per_token(res["nll_base"], res["nll_aug"], 3)
    spans = _spans(html_text).spans
    assert "not scored" in spans[2]["title"] and f"Δloss={aug[4] - base[4]:+.3f}" in spans[4]["title"]
    assert shown2["ahead"] == 3 and shown["ahead"] == 1          # the token detail now describes 3 ahead
    assert h["recolour"]({"mode": "once"}, 2)[3] == {"mode": "once"}   # mode (a): nothing to recolour


def test_latents_view_redraws_the_stored_latents(wb):
    h = app.make_handlers(app.Backend(wb))
    res = wb.latents(["one", "two"], top_k=2)
    fig = h["latents_view"](res, 3, "latent")
    assert fig.data[0].type == "scatter3d"
    ref = viz.latent_pca(res["latents"], n_components=3)[0]
    assert np.allclose(np.sort(np.abs(fig.data[0].x)), np.sort(np.abs(ref[:, 0])), atol=1e-5)
    assert h["latents_view"](None, 2, "prompt") == app.gr.update()


def test_latents_share_reference_axes_across_runs_and_overlay_pause_tokens(client, wb):
    from sklearn.decomposition import PCA

    from cacheaug_core import workbench as wbmod
    from cacheaug_core.config import CoprocessorConfig
    from cacheaug_core.coprocessor import Coprocessor

    # The reference axes: a PCA (sklearn's own) of the latents of the fixed reference prompts.
    pca = PCA(3).fit(wb.latents(list(wbmod.REFERENCE_PROMPTS))["latents"])
    assert wb.reference_axes(3) is wb.reference_axes(3)                       # fitted once per model

    def xs(fig):
        return {t["name"]: _arr(t["x"]) for t in _plot(fig)["data"]}

    one = xs(client.predict("first prompt", 2, "prompt", 3, "", api_name="/latents")[0])
    two = xs(client.predict("first prompt\nsecond one", 2, "prompt", 3, "", api_name="/latents")[0])
    np.testing.assert_allclose(one["first prompt"], two["first prompt"], atol=1e-4)   # comparable runs
    np.testing.assert_allclose(one["first prompt"], pca.transform(wb.latents(["first prompt"])["latents"])[:, 0],
                               atol=1e-3)
    fig, info, *_ = client.predict("first prompt\nsecond one", 2, "prompt", 3, "", "own", api_name="/latents")
    own = xs(fig)["first prompt"]
    ref = viz.latent_pca(wb.latents(["first prompt", "second one"])["latents"], 2)[0]
    np.testing.assert_allclose(np.sort(own), np.sort(ref[: len(own), 0]), atol=1e-4)
    assert "own PCA" in info

    # A pause checkpoint: its latents (soft tokens, read no cache) overlaid as one distinct trace.
    paused = Workbench(wb.decoder, wb.tokenizer, wb.info, wb.coprocessor, "test")
    paused.pause = Coprocessor(CoprocessorConfig(num_latents=3, body="none", num_layers=1), wb.decoder).eval()
    h = app.make_handlers(app.Backend(paused))
    fig, *_, res = h["latents"]("first prompt\nsecond one", 2, "prompt", 3, "")
    over = fig.data[-1]
    assert over.name.startswith("pause tokens") and len(over.x) == 3 and over.marker.symbol == "x"
    z = paused._latents_of(paused.pause, "a different text entirely").numpy()       # the pause arm's own forward
    np.testing.assert_allclose(res["pause_latents"], z, atol=1e-5)                  # same for every prompt
    np.testing.assert_allclose(over.x, pca.transform(z)[:, 0], atol=1e-3)
    assert h["latents_view"](res, 3, "latent", "own").data[-1].type == "scatter3d"


def test_offline_hub_id_fails_fast_with_one_line(monkeypatch, tmp_path):
    import time

    from cacheaug_core.decoder import DecoderLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))            # an empty Hub cache
    t0 = time.perf_counter()
    with pytest.raises(DecoderLoadError, match="HF_HUB_OFFLINE"):
        Workbench.load(decoder="some-org/some-model")
    assert time.perf_counter() - t0 < 10


def test_a_model_loaded_in_one_session_stays_in_that_session(server, wb, tmp_path):
    """Two browser sessions: B loads another model; A keeps the start-up model (its status and its
    generations), B gets the new one, and a third session loading the same shares B's copy."""
    from cacheaug_core.checkpoint import save_coprocessor
    from cacheaug_core.config import CoprocessorConfig
    from cacheaug_core.coprocessor import Coprocessor
    from conftest import save_tiny_decoder

    other_dir = save_tiny_decoder(tmp_path / "other", "gpt2", seed=3)
    other = Workbench.load(decoder=other_dir)
    ck = save_coprocessor(Coprocessor(CoprocessorConfig(num_latents=3, body="copy", num_layers=1), other.decoder),
                          tmp_path / "ck", other.info, status="session B's model")
    a, b, c = (Client(server[1], verbose=False) for _ in range(3))
    backend = server[0].cacheaug_backend
    loads = backend.loads
    _, st_b, *_ = b.predict(other_dir, str(ck), api_name="/load_model")
    assert st_b["coprocessor"]["num_latents"] == 3 and backend.loads == loads + 1
    # Session A: still the start-up model, in its status and in what it computes.
    _, st_a, *_ = a.predict(api_name="/model_info")
    assert st_a["coprocessor"]["num_latents"] == wb.coprocessor.config.num_latents
    assert st_a["decoder"] == wb.info.to_dict()
    dec_a, aug_a, *_ = a.predict(*_gen_args("Hello there"), api_name="/generate")
    ref = _direct(wb, "Hello there")
    assert (dec_a, aug_a) == (ref["decoder"].text, ref["coprocessor"].text)
    # Session B computes with its own model.
    banner_b, st_b2, *_ = b.predict(api_name="/model_info")
    assert st_b2 == st_b and "session B&#x27;s model" in banner_b
    dec_b, *_ = b.predict(*_gen_args("Hello there"), api_name="/generate")
    mine = Workbench(other.decoder, other.tokenizer, other.info, backend.get(app.model_key_of(other_dir, str(ck))).coprocessor)
    assert dec_b == _direct(mine, "Hello there")["decoder"].text
    nl = len(c.predict("one", 2, "prompt", 2, "", api_name="/latents")[2]["data"])
    assert nl == wb.coprocessor.config.num_latents                      # C: the start-up model, until it loads
    c.predict(f" {other_dir} ", str(ck), api_name="/load_model")          # the same model: shared, not loaded again
    assert backend.loads == loads + 1
    assert len(c.predict("one", 2, "prompt", 2, "", api_name="/latents")[2]["data"]) == 3


def test_backend_cache_is_shared_and_bounded(monkeypatch, wb):
    made = []

    def fake_load(decoder=None, coprocessor=None, **kw):
        made.append((decoder, coprocessor))
        return Workbench(wb.decoder, wb.tokenizer, wb.info, wb.coprocessor, f"{decoder}+{coprocessor}")

    monkeypatch.setattr(app.Workbench, "load", staticmethod(fake_load))
    backend = app.Backend(wb, startup_key=("", "start"), max_models=2)
    assert backend.load("", "start") is wb and backend.get(("", "start")) is wb and made == []
    one = backend.load("d", "one")
    assert backend.load(" d ", "one") is one and backend.get(("d", "one")) is one and made == [("d", "one")]
    backend.load("d", "two")
    backend.load("d", "three")                          # evicts the least recently used: "one"
    assert backend.cached() == [("d", "two"), ("d", "three")]
    again = backend.get(("d", "one"))                   # its session gets the same model again, loaded anew
    assert again is not one and again.coprocessor_source == "d+one" and made[-1] == ("d", "one")
    assert backend.get(None) is wb                      # the start-up model is never evicted


def test_analyze_every_bf16_is_measured_or_refused(client, wb):
    why = wb.bf16_unsupported()
    if why:
        with pytest.raises(AppError, match="bf16 is not available"):
            client.predict(TEXT, "every", -1, 3, 1, 5, True, api_name="/analyze")
        return
    notice, html_text, summary, *_ = client.predict(TEXT, "every", -1, 3, 1, 5, True, api_name="/analyze")
    assert "mean |ΔNLL| to float32" in notice
    res32, res16 = wb.score_every(TEXT, positions=3), wb.score_every(TEXT, positions=3, bf16=True)
    assert np.nanmax(np.abs(res16["nll_aug"] - res32["nll_aug"])) < 1.0       # bf16, not a different model
    assert not np.array_equal(res16["nll_aug"], res32["nll_aug"])            # and bf16 really ran
    # Only the coprocessor and the group passes run in bf16: the plain arm (prefill + LM head) is float32.
    np.testing.assert_allclose(res16["nll_base"], res32["nll_base"], rtol=1e-6, atol=1e-6, equal_nan=True)
    from cacheaug_core import fastpath

    ids = wb.encode(TEXT)
    with __import__("torch").autocast("cpu", dtype=__import__("torch").bfloat16):
        aug_all16, base_all16 = fastpath.score_every(wb.decoder, wb.coprocessor, ids, positions=3)   # all in bf16
    assert not np.allclose(base_all16.float().numpy(), res32["nll_base"], atol=1e-6, equal_nan=True)
