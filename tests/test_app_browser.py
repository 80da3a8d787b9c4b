"""End-to-end: Debian's Chromium (through Playwright) drives the app on the real default model.

Goes through every tab: streamed generation in both arms, per-token Δloss spans with hover
titles, token click -> top-k tables, both analysis modes, plotly figures, downloads, latents,
the Model tab's error path; then pastes hostile input everywhere. Full-page screenshots are
saved under test-artifacts/ (look at them).

Needs `apt-get install chromium` (never `playwright install`). Marked `browser` and `integration`.
"""

from __future__ import annotations

import csv
import io
import re
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ART = Path(__file__).resolve().parent.parent / "test-artifacts"
SLOW = 120_000  # ms: a 2-core CPU shared with other work

HOSTILE_PARTS = ["<script>window.__pwned=1</script>", '"><img src=x onerror="window.__pwned=1">',
                 "javascript:alert(1)", "\u202eevil right-to-left\u202c", "zero\u200bwidth\u200djoin",
                 "e\u0301\u0302\u0303 combining", "<svg onload=window.__pwned=1>"]
HOSTILE = " ".join(HOSTILE_PARTS) + " "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60) -> None:
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read(100)
            return
        except OSError:
            if time.time() - t0 > timeout:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="module")
def url():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from cacheaug_core import app
    from cacheaug_core.workbench import Workbench

    wb = Workbench.load()                            # the embedded default decoder + shipped coprocessor
    global NOTICE
    NOTICE = wb.notice.split(":")[0][:40]             # the banner must show the loaded model's notice
    demo = app.build_demo(wb)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(),
                                  quiet=True)
    _wait_http(local_url)
    yield local_url
    demo.close()


NOTICE = ""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(url)
    expect(pg.locator("#cacheaug-notice")).to_contain_text(NOTICE, timeout=SLOW)
    yield pg
    ctx.close()


def _shot(page, name: str) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / name), full_page=True)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def _download(page, link, name: str) -> Path:
    with page.expect_download() as dl:
        link.click()
    out = ART / "downloads" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    dl.value.save_as(str(out))
    return out


def _plot_data(page, elem_id: str) -> list:
    loc = page.locator(f"#{elem_id} .js-plotly-plot").first
    expect(loc).to_be_visible(timeout=SLOW)
    # _fullData holds the decoded arrays (plotly 6 ships typed arrays as base64 in `data`).
    return loc.evaluate("el => el._fullData.map(t => ({type: t.type || 'scatter', name: t.name || '', "
                        "hover: t.hovertemplate || '', n: (t.x && t.x.length) || 0, "
                        "rows: (t.z && t.z.length) || 0}))")


def _wait_text(locator, timeout=SLOW) -> str:
    expect(locator).not_to_have_value("", timeout=timeout)
    return locator.input_value()


# ---------------------------------------------------------------------------------------------


def test_every_tab_on_the_default_model(page):
    # -- Generate: both arms stream, stats and run JSON appear ------------------------------------
    _set_number(page, "gen-max-new-tokens", 8)
    page.locator("#gen-prompt textarea").fill("Why is the sky blue?")
    page.locator("#gen-run").click()
    dec, aug = page.locator("#gen-decoder textarea"), page.locator("#gen-augmented textarea")
    seen = set()
    t0 = time.time()
    status = page.locator("#gen-status")
    while time.time() - t0 < SLOW / 1000 and "Done" not in status.inner_text():
        seen.add((dec.input_value(), aug.input_value()))
        page.wait_for_timeout(100)
    expect(status).to_contain_text("Done", timeout=SLOW)
    final = (dec.input_value(), aug.input_value())
    assert final[0].strip() and final[1].strip()
    partial = {s for s in seen if s != final and s != ("", "")}
    assert partial, "no intermediate (streamed) state was observed"
    expect(page.locator("#gen-stats")).to_contain_text("coprocessor")
    expect(page.locator("#gen-settings")).to_contain_text("max_new_tokens")
    run = json.loads(_download(page, page.locator("#gen-json"), "generation.json").read_text("utf-8"))
    assert run["arms"]["decoder"]["text"] == final[0] and run["arms"]["coprocessor"]["text"] == final[1]
    assert run["arms"]["decoder"]["tokens"] == 8 or run["arms"]["decoder"]["tokens"] < 8
    assert run["arms"]["coprocessor"]["tokens_per_s"] is None or run["arms"]["coprocessor"]["tokens_per_s"] > 0
    _shot(page, "01-generate.png")

    # -- Per-token analysis, mode (a) on the last generation ---------------------------------------
    _tab(page, "Per-token")
    # The decoder arm's own text, in the chat template Generate used, with the bias stated.
    page.locator("#ana-use-generation").click()
    text_box = page.locator("#ana-text textarea")
    expect(text_box).to_have_value(re.compile(r"<\|im_start\|>user\nWhy is the sky blue\?<\|im_end\|>\n"
                                              r"<\|im_start\|>assistant\n"), timeout=SLOW)
    assert final[0].strip() in text_box.input_value()
    expect(page.locator("#ana-notice")).to_contain_text("biased toward it")
    expect(page.locator("#ana-notice")).to_contain_text("inside the chat template")
    point = int(page.locator("#ana-point input").first.input_value())
    assert point > 0
    page.locator("#ana-run").click()
    spans = page.locator("#ana-tokens .cacheaug-tokens span.tok[title]")
    expect(spans.first).to_be_visible(timeout=SLOW)
    titles = spans.evaluate_all("els => els.map(e => e.getAttribute('title'))")
    assert len(titles) > point + 2
    assert all("not scored" in t for t in titles[: point + 1])
    assert all(t.startswith("Δloss=") and "base" in t and "aug" in t for t in titles[point + 1:])
    expect(page.locator("#ana-notice")).to_contain_text(f"after token #{point}")
    expect(page.locator("#ana-notice")).to_contain_text("biased toward it")   # kept beside the verdict
    traces = _plot_data(page, "ana-by-position")
    assert {"relative change", "decoder", "decoder+coprocessor"} <= {t["name"] for t in traces}
    # Hover shows the exact value (native title tooltip); click shows top-k of both arms with KL.
    last = spans.last
    last.hover()
    last.click()
    expect(page.locator("#ana-detail")).to_contain_text("KL(", timeout=SLOW)
    expect(page.locator("#ana-topk-table")).to_contain_text("decoder+coprocessor token")
    assert page.locator("#ana-tokens span.tok.cacheaug-picked").count() == 1
    assert int(page.locator("#ana-index input").first.input_value()) == len(titles) - 1
    csv_path = _download(page, page.locator("#ana-csv"), "per-token.csv")
    rows = list(csv.reader(io.StringIO(csv_path.read_text("utf-8"))))   # tokens may hold newlines (chat template)
    assert rows[0] == ["index", "token", "nll_base", "nll_aug", "delta"] and len(rows) == len(titles) + 1
    html_fig = _download(page, page.locator("#ana-fig-by-position"),
                         "by-position.html")
    assert "plotly" in html_fig.read_text("utf-8")[:500_000].lower()
    _shot(page, "02-analysis-once.png")

    # -- mode (b): augment after every token ------------------------------------------------------
    page.locator("#ana-text textarea").fill("The Eiffel Tower is in Paris. It was built for the World's Fair.")
    page.get_by_label("(b) augment after every token, score the n-th token ahead").check()
    _set_number(page, "ana-positions", 4)
    _set_number(page, "ana-ahead", 2)
    page.locator("#ana-run").click()
    expect(page.locator("#ana-notice")).to_contain_text("2 tokens earlier", timeout=SLOW)
    heat = _plot_data(page, "ana-heatmap")
    assert heat[0]["type"] == "heatmap" and heat[0]["rows"] == 4
    rel = [t for t in _plot_data(page, "ana-by-position") if t["name"] == "relative change"]
    assert rel and rel[0]["n"] == 4
    titles = page.locator("#ana-tokens span.tok[title]").evaluate_all("els => els.map(e => e.title)")
    assert "not scored" in titles[1] and titles[2].startswith("Δloss=")
    page.locator("#ana-tokens span.tok").nth(5).click()
    expect(page.locator("#ana-detail")).to_contain_text("(2 ahead)", timeout=SLOW)
    _shot(page, "03-analysis-every.png")

    # -- Latents ------------------------------------------------------------------------------------
    _tab(page, "Latents")
    page.locator("#lat-run").click()
    pca = _plot_data(page, "lat-pca")
    pause = [t for t in pca if t["name"].startswith("pause")]        # the shipped pause arm's soft tokens
    pca = [t for t in pca if not t["name"].startswith("pause")]
    assert len(pca) == 3 and all("norm" in t["hover"] and "closest" in t["hover"] for t in pca)
    assert len(pause) == 1 and pause[0]["n"] > 0
    expect(page.locator("#lat-info")).to_contain_text("Explained variance: PC1")
    attn = _plot_data(page, "lat-attention")
    assert attn[0]["type"] == "heatmap" and attn[0]["rows"] == 16
    expect(page.locator("#lat-readout")).to_contain_text("p#1")
    _shot(page, "04-latents-2d.png")
    page.get_by_label("3-D").check()
    page.get_by_label("latent index").check()
    page.locator("#lat-run").click()
    page.wait_for_function("() => { const el = document.querySelector('#lat-pca .js-plotly-plot'); "
                           "return !!(el && el._fullData && el._fullData.length && "
                           "el._fullData[0].type === 'scatter3d'); }", timeout=SLOW)
    pca3 = _plot_data(page, "lat-pca")
    assert all(t["type"] == "scatter3d" for t in pca3)
    expect(page.locator("#lat-pca canvas").first).to_be_attached()
    _download(page, page.locator("#lat-csv"), "readout.csv")
    _shot(page, "05-latents-3d.png")

    # -- Model: card, status, and a bad checkpoint shown as a message -----------------------------
    _tab(page, "Model")
    expect(page.locator("#model-evaluation")).to_contain_text("position")      # the stored evaluation, shown
    page.get_by_text("Checkpoint card (training settings, data, licence)").click()   # one click away
    page.get_by_text("Status (JSON)").click()
    expect(page.locator("#model-card")).to_contain_text(re.compile("untrained|Coprocessor for"))
    expect(page.locator("#model-status")).to_contain_text("smollm2")
    page.locator("#model-coprocessor input, #model-coprocessor textarea").first.fill("/no/such/checkpoint")
    page.locator("#model-load").click()
    expect(page.locator("#model-error")).to_contain_text("no checkpoint folder at /no/such/checkpoint",
                                                         timeout=SLOW)
    expect(page.locator("#cacheaug-notice")).to_contain_text("Last load failed")
    expect(page.locator("#cacheaug-notice")).to_contain_text(NOTICE)    # the old model is still loaded
    assert "Traceback" not in page.content()
    _shot(page, "06-model.png")
    assert not page.errors, page.errors


def test_cached_example_and_stop(page):
    page.locator("#gen-examples").get_by_text("What is 17 + 25? Answer with a number.").click()
    expect(page.locator("#gen-prompt textarea")).to_have_value("What is 17 + 25? Answer with a number.")
    _wait_text(page.locator("#gen-decoder textarea"), timeout=3 * SLOW)
    _wait_text(page.locator("#gen-augmented textarea"), timeout=3 * SLOW)
    # An example is Generate itself: streamed, then status, settings and the run JSON like the button.
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=3 * SLOW)
    expect(page.locator("#gen-settings")).to_contain_text("max_new_tokens")
    expect(page.locator("#gen-stats")).to_contain_text("coprocessor")
    _shot(page, "10-example.png")
    # Stop: a long generation is cancelled after its first tokens; the texts stop growing.
    _set_number(page, "gen-max-new-tokens", 256)
    page.locator("#gen-prompt textarea").fill("Tell me a long story about a dragon.")
    page.locator("#gen-run").click()
    dec = page.locator("#gen-decoder textarea")
    page.wait_for_function("() => { const t = document.querySelector('#gen-decoder textarea'); "
                           "return t && t.value.split(' ').length > 3; }", timeout=SLOW)
    page.locator("#gen-stop").click()
    page.wait_for_timeout(1500)
    stopped = dec.input_value()
    page.wait_for_timeout(2500)
    assert dec.input_value() == stopped and 0 < len(stopped.split()) < 200
    # the run never finished. (Now and then Gradio's front end also puts its "Error" badge on the
    # cancelled event's outputs, this one among them, when the cancellation races a streamed update;
    # the text is ours and is what is checked.)
    expect(page.locator("#gen-status p")).to_have_text("Stopped.")
    expect(page.locator("#gen-status")).not_to_contain_text("Done")


def test_hostile_input_is_inert(page):
    long_text = (HOSTILE * (100_000 // len(HOSTILE) + 1))[:100_000]
    # Empty / whitespace-only input: a clear message, not a traceback.
    page.locator("#gen-prompt textarea").fill("   \n\t  ")
    page.locator("#gen-run").click()
    expect(page.locator(".toast-body").filter(has_text="empty").first).to_be_visible(timeout=SLOW)
    # 100k characters into the prompt: truncated with a visible notice; both arms still run.
    _set_number(page, "gen-max-new-tokens", 3)
    page.locator("#gen-prompt textarea").fill(long_text)
    page.locator("#gen-run").click()
    expect(page.locator(".toast-body").filter(has_text="truncated").first).to_be_visible(timeout=SLOW)
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=SLOW)
    expect(page.locator("#gen-settings")).to_contain_text("truncated")

    _tab(page, "Per-token")
    page.locator("#ana-text textarea").fill(long_text)
    page.locator("#ana-run").click()
    expect(page.locator("#ana-notice")).to_contain_text("truncated", timeout=SLOW)
    spans = page.locator("#ana-tokens span.tok[title]")
    expect(spans.first).to_be_visible(timeout=SLOW)
    assert spans.count() > 100
    spans.nth(spans.count() - 2).click()
    expect(page.locator("#ana-detail")).to_contain_text("KL(", timeout=SLOW)
    shown = page.locator("#ana-tokens").inner_text()
    assert "\u202e" not in shown and "\u200b" not in shown
    assert page.locator("#ana-tokens img, #ana-tokens script, #ana-tokens svg").count() == 0
    _shot(page, "07-hostile-analysis.png")

    _tab(page, "Latents")
    page.locator("#lat-prompts textarea").fill("\n".join(HOSTILE_PARTS[:4]))
    page.locator("#lat-continuation textarea").fill(HOSTILE_PARTS[1])
    page.locator("#lat-run").click()
    expect(page.locator("#lat-info")).to_contain_text("4 prompt(s)", timeout=SLOW)
    traces = _plot_data(page, "lat-pca")
    assert len(traces) == 5                                  # the 4 prompts + the shipped pause arm's soft tokens
    assert sum("pause" in str(t.get("name", "")).lower() for t in traces) == 1
    _plot_data(page, "lat-attention")
    _shot(page, "08-hostile-latents.png")

    _tab(page, "Model")
    page.locator("#model-coprocessor input, #model-coprocessor textarea").first.fill(HOSTILE_PARTS[1])
    page.locator("#model-load").click()
    expect(page.locator("#model-error")).to_contain_text('onerror="window.__pwned=1"', timeout=SLOW)
    page.wait_for_timeout(500)
    _shot(page, "09-hostile-model.png")

    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img[src='x'], svg[onload]").count() == 0
    assert not page.errors, page.errors
    # Still working after all that: a short text with lone surrogates (set from JavaScript, since
    # they cannot be typed) is analysed normally.
    _tab(page, "Per-token")
    page.locator("#ana-text textarea").evaluate(
        "el => { el.value = 'A short sentence \\ud800 with lone \\udfff surrogates.'; "
        "el.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.locator("#ana-run").click()
    expect(page.locator("#ana-notice")).not_to_contain_text("truncated", timeout=SLOW)
    expect(page.locator("#ana-tokens")).to_contain_text("surrogates", timeout=SLOW)
    assert page.locator("#ana-tokens span.tok[title]").count() > 5
    assert not page.errors, page.errors


def _set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def test_corpus_tab_on_the_bundled_held_out_set(page, browser, url):
    _tab(page, "Corpus")
    _set_slider(page, "cor-max-docs", 4)
    _set_slider(page, "cor-max-tokens", 64)
    _set_slider(page, "cor-positions", 4)
    page.locator("#cor-run").click()
    expect(page.locator("#cor-notice")).to_contain_text("4/4 documents scored", timeout=3 * SLOW)
    expect(page.locator("#cor-notice")).to_contain_text("Click a document", timeout=SLOW)
    traces = _plot_data(page, "cor-curve")
    names = {t["name"] for t in traces}
    assert "decoder+coprocessor, all targets" in names and "decoder+coprocessor, body" in names
    assert any(n.startswith("pause tokens") for n in names)          # the shipped pause arm comes along
    assert any(t["type"] == "bar" for t in _plot_data(page, "cor-kind"))
    titles = page.locator("#cor-documents [data-testid^='cell-'][data-testid$='-1']")   # column 1 (title) cells
    expect(titles.first).to_be_visible(timeout=SLOW)
    assert titles.count() == 4
    _shot(page, "20-corpus.png")
    # Click-through: a document row -> its per-token view, from the stored run.
    page.locator("#cor-documents [data-testid='cell-0-1']").click()
    spans = page.locator("#cor-doc-view span.tok[title]")
    expect(spans.first).to_be_visible(timeout=SLOW)
    assert spans.count() >= 10
    # Another n ahead re-tabulates without a model call (fast) and keeps the run.
    _set_slider(page, "cor-ahead", 2)
    page.locator("#cor-ahead input[type=number]").first.blur()   # a typed value is 'released' on blur
    expect(page.locator("#cor-doc-view span.tok")).to_have_count(0, timeout=SLOW)   # the stale view is cleared
    _plot_data(page, "cor-curve")
    page.wait_for_timeout(1500)
    _shot(page, "21-corpus-ahead-2.png")
    page.locator("#cor-tokens [data-testid='cell-0-2']").click()                    # a token row, 2 ahead now
    expect(page.locator("#cor-doc-view")).to_contain_text("inserted 2 token(s) earlier", timeout=SLOW)
    data = json.loads(_download(page, page.locator("#cor-json"), "corpus.json").read_text("utf-8"))
    assert data["finished"] and len(data["documents_scored"]) == 4
    _shot(page, "22-corpus-document.png")
    page.locator("#cor-open").click()
    expect(page.locator("#ana-text textarea")).not_to_have_value("", timeout=SLOW)
    assert page.errors == []
    # Phone viewport: the same tab on 390 px.
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    phone = ctx.new_page()
    phone.goto(url)
    expect(phone.locator("#cacheaug-notice")).to_contain_text(NOTICE, timeout=SLOW)
    first = phone.locator("#gen-prompt textarea").bounding_box()
    assert first and first["y"] < 844                         # the input is on the first screen
    _shot_page(phone, "23-phone-first.png", full=False)
    # Every tab in the tab row (Gradio folds the ones that do not fit into a "..." menu).
    for name in ("Generate", "Per-token", "Corpus", "Latents", "Model"):
        expect(phone.get_by_role("tab", name=name)).to_be_visible()
    assert not phone.get_by_label("More tabs").is_visible()
    # Per-token: the verdict of an analysis is on the first screen, and the plot is not squeezed.
    phone.get_by_role("tab", name="Per-token").click()
    phone.locator("#ana-run").click()
    verdict = phone.locator("#ana-notice").get_by_text("Verdict:")
    expect(verdict).to_be_visible(timeout=SLOW)
    phone.evaluate("window.scrollTo(0, 0)")
    box = verdict.bounding_box()
    assert box and box["y"] + box["height"] <= 844, box
    _shot_page(phone, "24-phone-verdict.png", full=False)
    area = phone.locator("#ana-by-position .nsewdrag").first
    expect(area).to_be_attached(timeout=SLOW)
    plot = area.bounding_box()
    assert plot and plot["width"] >= 250 and plot["height"] >= 120, plot      # was ~40 px wide on 390 px
    phone.get_by_role("tab", name="Corpus").click()
    expect(phone.locator("#cor-run")).to_be_visible(timeout=SLOW)
    _shot_page(phone, "25-corpus-phone.png")
    ctx.close()


def _shot_page(page, name: str, full: bool = True) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / name), full_page=full)


def test_a_model_loaded_in_one_page_leaves_the_other_page_alone(page, browser, url):
    """Two browser sessions: B loads the shipped pause checkpoint as its coprocessor; A (open before)
    keeps the shipped coprocessor, in its banner and its Model tab, and B shows its own."""
    pause_dir = str(Path(__file__).resolve().parent.parent / "assets" / "pause")
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    other = ctx.new_page()
    other.goto(url)
    expect(other.locator("#cacheaug-notice")).to_contain_text(NOTICE, timeout=SLOW)
    _tab(other, "Model")
    other.locator("#model-coprocessor input, #model-coprocessor textarea").first.fill(pause_dir)
    other.locator("#model-load").click()
    expect(other.locator("#cacheaug-notice")).to_contain_text("for this page only", timeout=SLOW)
    other.get_by_text("Status (JSON)").click()
    expect(other.locator("#model-status")).to_contain_text("assets/pause", timeout=SLOW)
    _shot_page(other, "30-session-b-pause.png", full=False)
    # Page A: still the shipped coprocessor, and nothing tells it otherwise (nothing changed for it).
    page.wait_for_timeout(1000)
    expect(page.locator("#cacheaug-notice")).to_contain_text(NOTICE)
    expect(page.locator("#cacheaug-notice")).not_to_contain_text("for this page only")
    _tab(page, "Model")
    page.get_by_text("Status (JSON)").click()
    expect(page.locator("#model-status")).to_contain_text("coprocessor", timeout=SLOW)
    assert "assets/pause\"" not in page.locator("#model-status").inner_text().split("coprocessor_source")[1][:200]
    _shot_page(page, "31-session-a-unchanged.png", full=False)
    ctx.close()
    assert not page.errors, page.errors
