"""cacheaug analysis app (Gradio 6): compare a frozen decoder with decoder + coprocessor.

The coprocessor reads the decoder's KV cache and appends latent embeddings to it
("Deliberation in Latent Space via Differentiable Cache Augmentation"). Five tabs:

* **Generate** - one prompt, decoder alone and decoder + coprocessor streamed side by side with
  identical sampling settings and seed (greedy by default); optional zero-shot chain-of-thought
  and pause-token arms; re-augmentation every k tokens; asynchronous (late) latents; a Stop
  button; time to first token and tokens/s per arm; run JSON export.
* **Per-token analysis** - (a) augment once at a point and score what follows, or (b) augment
  after every token and score the n-th token ahead; Δloss per token (hover for exact values,
  click for both arms' top-k next tokens and their KL), Δ by position ahead, summary table, a
  Δloss heatmap (mode (b): filled in as its batched passes finish), CSV / JSON / figure-HTML exports.
* **Latents** - PCA (2-D/3-D; on axes fitted once per model on fixed reference prompts, so runs
  compare; pause tokens overlaid when loaded) of the latents of one or many prompts, what each latent reads as
  through the decoder's LM head, and the attention a continuation pays to each latent.
* **Corpus** - mode (b) over many documents (upload, a path, or the bundled held-out Wikipedia
  sample): Δ by position with bootstrap intervals over documents (body vs document starts, pause
  arm too), documents and tokens sorted by Δloss, Δ by the decoder's surprisal and by token kind;
  click a row for that document's per-token view; CSV / JSON exports.
* **Model** - choose decoder and coprocessor for this browser session (other open pages keep theirs;
  sessions that load the same model share one copy); the checkpoint's card and evaluation; notices.

Run::

    python app.py                       # http://127.0.0.1:7860, embedded SmolLM2-135M + shipped coprocessor
    python app.py --port 7861 --coprocessor runs/x/checkpoint --decoder path/to/decoder
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py     # env vars are honoured
    python app.py --share                                                 # public link: opt-in only
    CACHEAUG_MAX_MODELS=3 python app.py     # models sessions loaded, kept besides the start-up one (default 2)

The app only wires widgets to `cacheaug_core.workbench.Workbench` methods and `viz` functions; every
event has a stable `api_name` (see "Use via API" in the footer, or `API_NAMES` below), so the same
results are reachable from `gradio_client`, the `cacheaug` CLI and notebooks. Tests build the UI on a
tiny model with `build_demo(workbench)`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import html
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline tool: no phoning home

import gradio as gr  # noqa: E402

import numpy as np  # noqa: E402

from cacheaug_core import viz  # noqa: E402
from cacheaug_core import corpus  # noqa: E402
from cacheaug_core.checkpoint import CheckpointError, model_card  # noqa: E402
from cacheaug_core.workbench import InputError, Workbench, clean_text  # noqa: E402
from cacheaug_core.viz import app_views as views  # noqa: E402
from cacheaug_core.viz import corpus as corpus_viz  # noqa: E402

log = logging.getLogger("cacheaug.app")

# Input caps: memory and time grow with tokens (full-vocabulary logits per scored token).
GEN_MAX_CHARS, GEN_MAX_TOKENS = 8_000, 1_024
ANALYSIS_MAX_CHARS, ANALYSIS_MAX_TOKENS = 8_000, 640
LATENT_MAX_CHARS, LATENT_MAX_TOKENS = 2_000, 256
ATTENTION_MAX_TOKENS = 256
MAX_PROMPTS = 16
DEFAULT_MAX_NEW_TOKENS = 48

API_NAMES = ("generate", "analyze", "token_detail", "use_generation", "latents", "corpus", "corpus_view", "load_model",
             "model_info")

CLI_EQUIVALENTS = """\
| endpoint | what it does | CLI / Python |
|---|---|---|
| `/generate` | both arms, streamed | `cacheaug generate --prompt "..." [--reaugment-every k] [--async-delay N] [--json]` |
| `/analyze` | per-token Δloss, mode (a) or (b) | `cacheaug score --text "..." [--point N] [--csv out.csv]`; mode (b): `cacheaug score --text "..." --every --positions 16` |
| `/token_detail` | top-k of both arms + KL at one token of this session's last `/analyze` | `Workbench.score_text(text, point)["topk_base"/"topk_aug"/"kl_aug_base"]` |
| `/use_generation` | this session's last generation (either arm's tokens, in its chat template) → analysis text and point, with a bias notice | `Workbench.generation_as_text(prompt, token_ids, chat)` |
| `/latents` | PCA, read-out, attention to latents | `cacheaug latents --prompt "..." [--prompt "..."] [--axes reference] [--continuation "..."] [--html pca.html]` |
| `/corpus` | mode (b) over documents: Δ by position with intervals, tables, buckets | `cacheaug corpus --text X.jsonl --json OUT [--csv tokens.csv] [--html curve.html]` |
| `/corpus_view` | the last `/corpus` run re-tabulated for another arm / n-th token ahead | `cacheaug_core.corpus.summarize(res, arm, n)` |
| `/load_model`, `/model_info` | choose / describe decoder + coprocessor | `cacheaug info --decoder D --coprocessor C [--pause P]` |
"""

CSS = """
#cacheaug-notice:empty, #model-error:empty, #ana-notice:empty, #cor-notice:empty { display: none; }
.cacheaug-tokens span.tok { cursor: pointer; }
.cacheaug-tokens span.tok.cacheaug-picked { outline: 2px solid #7c3aed; outline-offset: 1px; }
#gen-decoder textarea, #gen-augmented textarea, #gen-pause textarea, #gen-cot textarea {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
.cacheaug-small { font-size: 0.88em; opacity: 0.85; }
/* Phone: the title shrinks so the input and the verdict come first; narrower page margins and
   tab buttons so all five tabs fit in one row (Gradio folds tabs that do not fit into a "..." menu,
   measured from these same buttons); the Generate tab's settings go below its outputs. */
@media (max-width: 640px) {
  #cacheaug-title h2 { font-size: 1.0em; margin: 0; }
  #cacheaug-title .cacheaug-small, #cor-intro .cacheaug-small { display: none; }
  #cacheaug-notice .cacheaug-notice { font-size: 0.8em; padding: 0.25em 0.5em !important; line-height: 1.3 !important; }
  #tabs .tab-container button { padding: 0 7px !important; font-size: 13px !important; min-width: 0 !important; }
  .cacheaug-phone-last { order: 10; }
}
"""

# Gradio scopes `css` to the app's content (every selector is prefixed with `.gradio-container ... .contain`),
# so the page's own side margins (32 px a side on a phone: a sixth of the width) are set from <head>.
HEAD = """<style>
@media (max-width: 640px) { .gradio-container .main { padding-left: 6px !important; padding-right: 6px !important; } }
</style>"""

# Clicking a token span selects it (outline) and fires the component's click event with its index.
TOKEN_CLICK_JS = """
element.addEventListener('click', (e) => {
  const s = e.target && e.target.closest ? e.target.closest('span.tok') : null;
  if (!s || !element.contains(s)) return;
  element.querySelectorAll('span.tok.cacheaug-picked').forEach((x) => x.classList.remove('cacheaug-picked'));
  s.classList.add('cacheaug-picked');
  const i = parseInt(s.getAttribute('data-idx'), 10);
  if (Number.isFinite(i)) trigger('click', {index: i});
});
"""

# System fonts only: nothing is fetched from the network.
THEME = gr.themes.Default(
    primary_hue="violet",
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)

ARM_LABELS = {"decoder": "decoder alone", "coprocessor": "decoder + coprocessor", "pause": "pause tokens",
              "cot": "zero-shot chain-of-thought"}
MODES = [("(a) augment once at a point, score what follows", "once"),
         ("(b) augment after every token, score the n-th token ahead", "every")]

DEFAULT_PROMPT = "Why is the sky blue?"
DEFAULT_TEXT = ("The Eiffel Tower is in Paris. It was built for the 1889 World's Fair, and today it is one of "
                "the most visited monuments in the world.")
DEFAULT_PROMPTS = "Why is the sky blue?\nWhat is 17 + 25?\nWrite a haiku about the sea."
DEFAULT_CONTINUATION = " Sunlight is scattered by the air, and blue light is scattered the most."
EXAMPLES = ["Why is the sky blue?", "What is 17 + 25? Answer with a number.", "Write a haiku about the sea."]


# ---------------------------------------------------------------------------------------------
# The models: each browser session has its own (a gr.State holds its key); the Workbenches
# themselves live in a small cache shared by all sessions.


def model_key_of(decoder: str | None, coprocessor: str | None) -> tuple[str, str]:
    """What a session loaded, as the cache key: (decoder, coprocessor) as typed, stripped ('' = default).
    The weights stay float32 in every case (bf16 is an autocast option of one analysis), so the
    precision is not part of the key."""
    return ((decoder or "").strip(), (coprocessor or "").strip())


class Backend:
    """The start-up Workbench (given, or made by a factory on first use) and an LRU cache of the
    models sessions loaded from the Model tab.

    A session's model is a key held in that session's gr.State (None = the start-up model), so a
    load in one browser session never changes the model of another. The cache is keyed by what
    was loaded, so sessions that load the same decoder and coprocessor share one copy in memory;
    it keeps the `max_models` most recently used (env CACHEAUG_MAX_MODELS, default 2) besides the
    start-up model, which is never evicted. A session whose model was evicted gets it loaded again
    from the same folders on its next action (a few seconds), not another session's model."""

    def __init__(self, workbench_or_factory: Workbench | Callable[[], Workbench], pause: str | None = None,
                 startup_key: tuple[str, str] | None = None, max_models: int | None = None):
        self._lock = threading.RLock()     # guards the start-up model and the cache (loads run under it)
        self._wb: Workbench | None = None
        self._factory: Callable[[], Workbench] | None = None
        if isinstance(workbench_or_factory, Workbench) or not callable(workbench_or_factory):
            self._wb = workbench_or_factory
        else:
            self._factory = workbench_or_factory
        self.pause = pause or None  # `--pause` given at start-up: kept for every model loaded from the Model tab
        self.startup_key = startup_key  # what the start-up model was loaded from, when known: a session that
        #                                 loads the same gets it instead of a second copy
        if max_models is None:
            try:
                max_models = int(os.environ.get("CACHEAUG_MAX_MODELS", "2"))
            except ValueError:
                max_models = 2
        self.max_models = max(1, max_models)
        self._models: collections.OrderedDict[tuple[str, str], Workbench] = collections.OrderedDict()
        self.loads = 0   # how many models were loaded from disk by `load` (tests check sharing with it)
        self.error = ""  # the start-up (factory) failure: no model at all, so every session is told

    def startup(self) -> Workbench:
        with self._lock:
            if self._wb is None:
                if self._factory is None:
                    raise gr.Error(_msg(_join(self.error or "No model is loaded.", "Load one in the Model tab.")),
                                   title="Model", print_exception=False)
                try:
                    self._wb = self._factory()
                    self.error = ""
                except Exception as e:  # shown in the Model tab; actions say how to fix it
                    self.error = f"The model failed to load: {e}"
                    self._factory = None
                    raise gr.Error(_msg(self.error + " Choose another decoder / coprocessor in the Model tab."),
                                   title="Model", print_exception=False) from None
            return self._wb

    def get(self, key: tuple[str, str] | None = None) -> Workbench:
        """The model of a session holding `key` (None: the start-up model)."""
        if key is None or tuple(key) == self.startup_key:
            return self.startup()
        key = model_key_of(*key)
        with self._lock:
            wb = self._models.get(key)
            if wb is not None:
                self._models.move_to_end(key)
                return wb
        try:                    # evicted since this session loaded it: the same folders again
            return self.load(*key)
        except Exception as e:  # noqa: BLE001 - e.g. the folder was removed meanwhile
            raise gr.Error(_msg(f"This page's model ({key[0] or 'default decoder'} + {key[1] or 'default coprocessor'}) "
                                f"could not be loaded again: {e}. Load a model in the Model tab."),
                           title="Model", print_exception=False) from None

    def cached(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._models)

    def load(self, decoder: str | None, coprocessor: str | None) -> Workbench:
        """The model for (decoder, coprocessor): from the cache when a session loaded it already, else
        loaded (raises; no session's model changes). A start-up `--pause` checkpoint comes along when
        it fits the new decoder; otherwise the pause arm is dropped with a notice."""
        key = model_key_of(decoder, coprocessor)
        if key == self.startup_key:
            return self.startup()
        with self._lock:           # one load at a time: two sessions asking for one model load it once
            wb = self._models.get(key)
            if wb is not None:
                self._models.move_to_end(key)
                return wb
            dec, cop = key[0] or None, key[1] or None
            try:
                wb = Workbench.load(dec, cop, pause=self.pause)
            except Exception:
                if not self.pause:
                    raise
                wb = Workbench.load(dec, cop)  # its own failure is the one shown
                wb.notice = _join(wb.notice, f"The pause checkpoint {self.pause} does not fit this decoder: "
                                             "no pause arm.")
            self.loads += 1
            self._models[key] = wb
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)   # sessions still running on it keep their reference
            return wb


def _msg(text: str) -> str:
    """Toast / modal messages are rendered as HTML by Gradio: escape them (they may quote paths)."""
    return html.escape(viz.clean_token(str(text)), quote=False)


@contextlib.contextmanager
def _friendly_errors():
    """User errors become a clear message (gr.Error), never a traceback page."""
    try:
        yield
    except gr.Error:
        raise
    except InputError as e:
        raise gr.Error(_msg(e), title="Input", print_exception=False) from None
    except CheckpointError as e:
        raise gr.Error(_msg(e), title="Checkpoint", print_exception=False) from None
    except Exception as e:  # noqa: BLE001 - anything else: logged with its traceback, shown as one line
        log.exception("unexpected error")
        raise gr.Error(_msg(f"{type(e).__name__}: {e}"), title="Error", print_exception=False) from None


def _join(*notes: str) -> str:
    return " ".join(n for n in notes if n)


_EXPORT_ROOT: Path | None = None
_KEEP_EXPORTS = 32


def _export_dir() -> Path:
    """A fresh folder per export under one temp root; only the newest few are kept (Gradio copies
    returned files into its own cache, which `delete_cache` cleans)."""
    global _EXPORT_ROOT
    if _EXPORT_ROOT is None:
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="cacheaug-exports-"))
    try:
        old = sorted(_EXPORT_ROOT.iterdir(), key=lambda p: p.stat().st_mtime)[:-_KEEP_EXPORTS]
    except OSError:  # a folder vanished meanwhile: prune next time
        old = []
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=_EXPORT_ROOT))


def _fit(fig, plot_height: int = 260):
    """Every figure the app shows: readable on a phone as on a desktop (see viz.fit_small_screens)."""
    return viz.fit_small_screens(fig, plot_height=plot_height)


def _write_html(fig, path: Path) -> str:
    path.write_text(viz.figure_to_html(fig), encoding="utf-8")
    return str(path)


def _reference(wb: Workbench):
    """(name, curve) of the checkpoint's first stored perplexity evaluation (the typical Δ by position),
    or ("", None) when it stores none (an untrained coprocessor has no reference)."""
    cfg = getattr(wb.coprocessor, "checkpoint_config", None) or {}
    curves = corpus.reference_curves(cfg.get("evaluation"))
    return next(iter(curves.items())) if curves else ("", None)


def _model_summary(wb: Workbench) -> dict:
    st = wb.status()
    return {"decoder": st["decoder"].get("name"), "coprocessor": st["coprocessor_source"],
            "num_latents": st["coprocessor"].get("num_latents"), "notice": st["notice"]}


# ---------------------------------------------------------------------------------------------
# Event handlers: each calls Workbench methods and viz functions only.


def make_handlers(backend: Backend) -> dict[str, Callable]:
    def generate(prompt, extra_arms, chat, max_new_tokens, temperature, top_p, top_k, seed, reaugment_every,
                 async_delay, model_key=None):
        """Stream both arms (and the optional extra arms) token by token with identical settings."""
        with _friendly_errors():
            wb = backend.get(model_key)
            text, notice = wb.fit_text(prompt, GEN_MAX_CHARS, GEN_MAX_TOKENS)
            if notice:
                gr.Warning(_msg(notice), title="Prompt truncated")
            extra = set(extra_arms or [])
            arms = ["decoder", "coprocessor"]
            if "pause" in extra:
                if wb.pause is not None:
                    arms.append("pause")
                else:
                    gr.Warning("No pause-token checkpoint is loaded, so the pause arm is skipped.")
            settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                        "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed),
                        "reaugment_every": int(reaugment_every), "async_delay": int(async_delay)}
            shown = {"settings (identical for every arm)": settings | {"chat_template": bool(chat)},
                     "arms": arms + (["cot"] if "cot" in extra else []), "greedy": settings["temperature"] <= 0,
                     "prompt_notice": notice or None}
            n_max = settings["max_new_tokens"]
            if settings["async_delay"] >= n_max and len(arms) > 1:
                gr.Warning(f"Asynchronous delay {settings['async_delay']} ≥ max new tokens {n_max}: the latents will "
                           "never arrive.", title="Asynchronous latents")
            state: dict = {}
            model = _model_summary(wb)
            eos = getattr(wb.tokenizer, "eos_token_id", None)

            def run_record(finished: bool) -> dict:
                """What the run JSON holds; kept in the session (gr.State) so Stop can export a partial run."""
                notes = views.generation_notes({k: a.token_ids for k, a in state.items()}, eos, ARM_LABELS, n_max,
                                               settings["async_delay"])
                return {"prompt": text, "model": model, **shown, "finished": finished, "notes": notes,
                        "arms": {k: {**a.stats(), "arm": k, "label": ARM_LABELS.get(k, k), "text": a.text,
                                     "token_ids": list(a.token_ids)} for k, a in state.items()}}

            def outputs(status: str, run: dict, path: str | None = None, diverge: str = ""):
                stats = views.arm_stats_frame([a.stats() | {"arm": k} for k, a in state.items()])
                # (status and run JSON stay last: clients read them from the end)
                return (_arm_text(state, "decoder"), _arm_text(state, "coprocessor"), _arm_text(state, "pause"),
                        _arm_text(state, "cot"), stats, shown, diverge, status, path, run)  # no file while running

            for state in wb.generate_pair(text, arms=arms, chat=bool(chat), cot="cot" in extra, **settings):
                done = max((len(a.token_ids) for a in state.values()), default=0)
                yield outputs(f"Generating… {done}/{n_max} tokens", run_record(False))
            run = run_record(True)
            comparison, cmp_text, cmp_html = _compare_arms(wb, text, state, bool(chat))
            run["comparison"] = comparison
            path = views.write_json(run, _export_dir() / "cacheaug-generation.json")
            counts = ", ".join(f"{ARM_LABELS.get(k, k)} {len(a.token_ids)}" for k, a in state.items())
            yield outputs(_join(f"Done: {counts} tokens.", *run["notes"], cmp_text), run, str(path), cmp_html)

    def stop_generation(run):
        """Stop: the run so far becomes downloadable (marked unfinished)."""
        if not run:
            return "Stopped.", None
        path = views.write_json(run, _export_dir() / "cacheaug-generation-partial.json")
        return "Stopped.", str(path)  # the run JSON (marked "finished": false) holds the counts

    stopped_sessions: set = set()   # sessions whose Stop was pressed during a mode (b) analysis

    def stop_analysis(request: gr.Request = None):
        """Stop a running analysis: mode (b) checks this between passes and gives up the model slot
        (cancelling the event alone would leave its thread computing)."""
        if request is not None:
            stopped_sessions.add(request.session_hash)
        return views.notice_html("Stopped.", "info")

    def _every_views(res, ahead):
        """Mode (b) views of a partial or final `score_every` result: per-token NLLs n ahead, the caption,
        the Δ by position and the Δloss heatmap (unscored rows stay blank)."""
        toks = res["tokens"]
        A = res["nll_aug"].shape[1]
        n = int(min(max(int(ahead), 1), A))
        nb, na = views.nth_ahead_per_token(res["nll_base"], res["nll_aug"], n)
        caption = (f"Background = Δloss of each token when the latents were inserted {n} token(s) earlier: "
                   "NLL(decoder+coprocessor) − NLL(decoder). Negative (blue) = augmentation helps; "
                   "positive (red) = hurts; no colour = not scored. Hover a token for exact values.")
        by_pos = views.by_position_every(res["nll_base"], res["nll_aug"])
        heat = _fit(viz.delta_heatmap_figure(toks, views.by_scored_token(res["nll_aug"] - res["nll_base"]),
                                        axis="token", title="Δloss of each token by how many tokens "
                                        "earlier the latents were inserted (blue = helps; blank = not scored)"))
        return toks, A, n, nb, na, caption, by_pos, heat

    def _by_position_figure(by_pos, ref, ref_name, units):
        return _fit(viz.delta_by_position_figure(by_pos, title="", reference=ref, units=units,
                                            reference_name=f"typical: {ref_name}" if ref_name else ""), plot_height=200)

    def analyze(text, mode, point, positions, ahead, top_k, bf16=False, model_key=None, origin=None,
                progress=gr.Progress(), request: gr.Request = None):
        """Per-token Δloss, the final result of `analyze_stream` (for callers that want no partials)."""
        final = None
        for final in analyze_stream(text, mode, point, positions, ahead, top_k, bf16, model_key, origin, progress,
                                    request):
            pass
        return final

    def analyze_stream(text, mode, point, positions, ahead, top_k, bf16=False, model_key=None, origin=None,
                       progress=gr.Progress(), request: gr.Request = None):
        """Per-token Δloss: mode 'once' (a) or 'every' (b). Mode (b) yields partial views after each
        batched pass (the heatmap and the curve fill in; no downloads until the end), then the result.
        `origin`: what 'Use last generation' put in the text box; while the text is still that, the
        verdict keeps its bias notice (an arm scoring its own output)."""
        biased = (origin or {}).get("note", "") if text == (origin or {}).get("text") else ""
        session = getattr(request, "session_hash", None)
        stopped_sessions.discard(session)

        def every_progress(f):
            if session is not None and session in stopped_sessions:
                stopped_sessions.discard(session)
                raise InputError("Stopped.")
            progress(float(f), desc="augmenting after every token")

        with _friendly_errors():
            wb = backend.get(model_key)
            text, notice = wb.fit_text(text, ANALYSIS_MAX_CHARS, ANALYSIS_MAX_TOKENS)
            if notice:
                gr.Warning(_msg(notice), title="Text truncated")
            mode = _mode(mode)
            out = _export_dir()
            heat_file = None
            if mode == "once":
                progress(0.1, desc="scoring with and without latents")
                res = wb.score_text(text, point=None if point is None or point < 0 else int(point),
                                    top_k=int(top_k), with_attention=False)
                p = res["point"]
                toks, nb, na = res["tokens"], res["nll_base"], res["nll_aug"]
                info = (f"Mode (a): latents inserted once after token #{p} "
                        f"({viz.display_token(toks[p])}); the {len(toks) - p - 1} tokens after it are scored. "
                        "Click a token for both arms' top-k next tokens.")
                caption = None
                by_pos = views.by_position_once(nb, na, p)
                heat = _fit(views.message_figure("Δloss heatmap", "Mode (b) only: augment after every token to see "
                                            "Δloss by augmentation point and position ahead."))
                run = {"mode": "once", "point": p}
                shown = {"text": text, "mode": "once", "point": p}
            else:
                progress(0.0, desc="augmenting after every token")
                ref_name, ref = _reference(wb)
                for res in wb.iter_score_every(text, positions=int(positions), progress=every_progress,
                                               bf16=bool(bf16)):
                    if res["points_done"] < res["points"]:     # a partial result: views only, no files
                        toks, _, _, nb, na, caption, by_pos, heat = _every_views(res, ahead)
                        note = views.notice_html(f"Scoring… {res['points_done']} of {res['points']} augmentation "
                                                 "points done; the views fill in as passes finish.", "info")
                        yield (note, viz.token_delta_html(toks, na - nb, nb, na, caption=caption),
                               views.summary_display(viz.summary_table(nb, na)),
                               _by_position_figure(by_pos, ref, ref_name, "pct"), heat,
                               views.round_frame(viz.per_token_frame(toks, nb, na)), None, None, None, None, None)
                if bf16:   # the numeric price, measured here on the text's first 48 tokens
                    head = wb.tokenizer.decode(wb.encode(text)[0, :48].tolist())
                    r32, r16 = (wb.score_every(head, positions=int(positions), bf16=b) for b in (False, True))
                    # the augmented arm only: bf16 keeps the plain arm in float32 (a mean over both arms
                    # would halve the error shown)
                    d = np.abs((r16["nll_aug"] - r32["nll_aug"]).ravel())
                    d = d[np.isfinite(d)]
                    notice = _join(notice, f"bf16 (coprocessor and group passes; the plain arm and the LM head stay "
                                           f"float32): on the first 48 tokens, mean |ΔNLL| to float32 {d.mean():.4f} "
                                           f"nats (max {d.max():.4f}).")
                toks, A, n, nb, na, caption, by_pos, heat = _every_views(res, ahead)
                p = None
                info = (f"Mode (b): latents inserted after every token; each token is scored with the latents "
                        f"inserted {n} token{'s' if n > 1 else ''} earlier (positions 1..{A} in the figures).")
                heat_file = _write_html(heat, out / "cacheaug-heatmap.html")
                shown = {"text": text, "mode": "every", "positions": A, "ahead": n, "tokens": toks,
                         "nll_base_by_point": res["nll_base"], "nll_aug_by_point": res["nll_aug"]}
                run = {"mode": "every", "positions": A, "ahead": n,
                       "nll_base_by_point": res["nll_base"], "nll_aug_by_point": res["nll_aug"]}
            tokens_html = viz.token_delta_html(toks, na - nb, nb, na, caption=caption)
            summary = viz.summary_table(nb, na)
            per_token = viz.per_token_frame(toks, nb, na)
            ref_name, ref = _reference(wb)
            at = int(shown.get("ahead") or max(1, (len(toks) - 1 - (p or 0)) // 2))
            verdict = views.verdict_text(na - nb, reference=corpus.reference_at(ref, at), ref_name=ref_name,
                                         where=f", {shown['ahead']} ahead" if mode == "every" else "")
            # Mode (a) has one token per position: Δloss in nats with a rolling mean (a percentage of one
            # token's perplexity explodes); mode (b) averages many tokens per position: relative change.
            by_fig = _by_position_figure(by_pos, ref, ref_name, "nats" if mode == "once" else "pct")
            csv_file = str(viz.frame_to_csv(per_token, out / "cacheaug-per-token.csv"))
            run |= {"text": text, "model": _model_summary(wb), "notice": _join(notice, res.get("notice", "")) or None,
                    "tokens": [viz.clean_token(t) for t in toks], "nll_base": nb, "nll_aug": na,
                    "summary": summary, "by_position": by_pos, "verdict": verdict, "bias_notice": biased or None}
            json_file = str(views.write_json(run, out / "cacheaug-analysis.json"))
            pos_file = _write_html(by_fig, out / "cacheaug-by-position.html")
            note = (views.notice_html(verdict, "info", "Verdict:") + views.notice_html(biased, "warning",
                                                                                      "Biased comparison:")
                    + views.notice_html(_join(info, notice), "warning" if notice else "info"))
            yield (note, tokens_html, views.summary_display(summary), by_fig, heat, views.round_frame(per_token), csv_file,
                    json_file, pos_file, heat_file, shown)

    def recolour(shown, ahead):
        """Mode (b): colour the tokens by another n-th token ahead from the stored matrices (no model call)."""
        if not shown or shown.get("mode") != "every":
            return gr.update(), gr.update(), gr.update(), shown
        with _friendly_errors():
            A = int(shown["positions"])
            n = int(min(max(int(ahead or 1), 1), A))
            toks = shown["tokens"]
            nb, na = views.nth_ahead_per_token(shown["nll_base_by_point"], shown["nll_aug_by_point"], n)
            caption = (f"Background = Δloss of each token when the latents were inserted {n} token(s) earlier: "
                       "NLL(decoder+coprocessor) − NLL(decoder). Negative (blue) = augmentation helps; "
                       "positive (red) = hurts; no colour = not scored. Hover a token for exact values.")
            return (viz.token_delta_html(toks, na - nb, nb, na, caption=caption), views.summary_display(
                viz.summary_table(nb, na)), views.round_frame(viz.per_token_frame(toks, nb, na)), shown | {"ahead": n})

    def token_detail(shown, top_k, index, model_key=None):
        """Both arms' top-k next-token distributions at one token of the analysis shown (the text,
        mode, point and n-th-ahead of the last Analyse in this session), and KL(aug ‖ base)."""
        with _friendly_errors():
            if not shown:
                raise InputError("Run Analyse first, then pick a token.")
            wb = backend.get(model_key)
            text, mode = shown["text"], shown["mode"]
            if index is None or (isinstance(index, float) and not math.isfinite(index)):
                raise InputError("Pick a token: click one in the Δloss view or type its number.")
            index = int(index)
            n = int(shown["ahead"]) if mode == "every" else None
            if mode == "every":
                at = index - n
                if at < 0:
                    return (views.round_frame(viz.topk_compare_frame([], [], [], [])),
                            views.notice_html(f"Token #{index} has no augmentation point {n} tokens earlier; "
                                              f"pick token #{n} or later.", "info"))
            else:
                at = int(shown["point"])
            res = wb.score_text(text, point=at, top_k=int(top_k), with_attention=False)
            p, toks = res["point"], res["tokens"]
            if not p < index < len(toks):
                return (views.round_frame(viz.topk_compare_frame([], [], [], [])),
                        views.notice_html(f"Token #{index} is not scored: pick a token after the augmentation "
                                          f"point #{p} (up to #{len(toks) - 1}).", "info"))
            r = index - p - 1
            (ib, pb), (ia, pa) = ((ids[r], probs[r]) for ids, probs in (res["topk_base"], res["topk_aug"]))
            table = views.round_frame(viz.topk_compare_frame(wb.token_strings(ib), pb, wb.token_strings(ia), pa), 5)
            detail = views.token_detail_html(toks[index], index, p, float(res["nll_base"][index]),
                                             float(res["nll_aug"][index]), float(res["kl_aug_base"][r]), n)
            return table, detail

    def pick_token(evt: gr.EventData):
        return int(evt.index)

    def pick_row(evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return int(row)

    def use_generation(arm="decoder", run=None, model_key=None):
        """This session's last generation (its prompt + one arm's generated tokens) as the text to
        analyse in mode (a), in the context it was generated in: the prompt inside the chat template
        when Generate used it, the latents after the prompt's last token. A notice says why scoring a
        model's own output is biased toward that arm."""
        with _friendly_errors():
            arm = arm if arm in ("decoder", "coprocessor") else "decoder"
            rec = ((run or {}).get("arms") or {}).get(arm) or {}
            if not rec.get("token_ids"):
                raise InputError(f"Nothing generated yet by the {ARM_LABELS[arm]} arm: run Generate first.")
            wb = backend.get(model_key)
            chat = bool((run.get("settings (identical for every arm)") or {}).get("chat_template"))
            text, point, retok = wb.generation_as_text(run["prompt"], rec["token_ids"], chat=chat)
            other = "coprocessor" if arm == "decoder" else "decoder"
            how = "greedy (each token its most likely one)" if run.get("greedy") else "sampled"
            note = (f"This is the {ARM_LABELS[arm]} arm's own {how} output. A model scoring text it generated "
                    f"itself is biased toward it: the {ARM_LABELS[arm]} arm looks better here than it would on "
                    f"text it did not write. Score the {ARM_LABELS[other]} arm's text too, and read the two "
                    "together. ")
            note += ("The prompt is scored inside the chat template, as Generate used it; the latents go after "
                     "its last token (the augmentation point), where generation inserted them." if chat else
                     "The prompt is scored as plain text, as Generate used it (no chat template); the latents go "
                     "after its last token, where generation inserted them.")
            if run.get("model") and run["model"] != _model_summary(wb):
                note += " This page's model changed since that generation: the scores are the current model's."
            if not run.get("finished", True):
                note += " The generation was stopped early: its tokens so far are scored."
            note = _join(note, retok)
            gr.Warning(_msg(note), title="Biased comparison")
            return (text, point, "once", views.notice_html(note, "warning", "Biased comparison:"),
                    {"text": text, "arm": arm, "note": note})

    def _pca_figure(res, dims, color_by, axes_choice):
        """The PCA scatter of stored latents: on the model's reference axes or their own PCA, with the
        pause arm's latents overlaid when a pause checkpoint was loaded."""
        ref = res.get("reference_axes") if axes_choice != "own" else None
        pause = res.get("pause_latents")
        return _fit(viz.latent_pca_figure(res["latents"], res["prompt_ids"], res["latent_index"], labels=res["labels"],
                                          color_by=color_by, dims=int(dims), hover_tokens=res["top_tokens"],
                                          norms=res["norms"], axes=ref, overlay=pause,
                                          overlay_name=res.get("pause_label") or "pause tokens"), plot_height=300)

    def latents(prompts_text, dims, color_by, top_k, continuation, axes_choice="reference", model_key=None,
                progress=gr.Progress()):
        """PCA of the latents of each prompt, their LM-head read-out, attention of a continuation to them."""
        with _friendly_errors():
            wb = backend.get(model_key)
            prompts, note = views.split_prompts(prompts_text, MAX_PROMPTS)
            if not prompts:
                raise InputError("Type at least one prompt (one per line).")
            notes = [note]
            fitted = []
            for q in prompts:
                t, n = wb.fit_text(q, LATENT_MAX_CHARS, LATENT_MAX_TOKENS)
                fitted.append(t)
                notes.append(n)
            notice = _join(*dict.fromkeys(x for x in notes if x))
            if notice:
                gr.Warning(_msg(notice), title="Prompts")
            progress(0.1, desc=f"latents of {len(fitted)} prompt(s)")
            res = wb.latents(fitted, top_k=int(top_k))
            progress(0.3, desc="reference axes")
            res["reference_axes"] = wb.reference_axes(3)   # fitted once per model, then cached
            if res.get("pause_latents") is not None:
                res["pause_label"] = ("pause tokens (same for every prompt)" if wb.pause.config.body == "none"
                                      else "pause arm (at prompt 1)")
            dims = int(dims)
            fig = _pca_figure(res, dims, color_by, axes_choice)
            _, evr = viz.latent_pca(res["latents"], n_components=dims)
            if axes_choice != "own":
                share = viz.project_latents(res["latents"], res["reference_axes"], dims)[1]
                axes_text = (f"Axes: PCA of the latents of {len(res['reference_axes']['prompts'])} fixed reference "
                             "prompts (the same for every run of this model); these latents' variance along them: "
                             + ", ".join(f"PC{i + 1} {100 * x:.1f}%" for i, x in enumerate(share))
                             + ". Their own PCA: ")
            else:
                axes_text = "Axes: these prompts' own PCA. "
            readout = views.latent_readout_with_prompts(viz.latent_readout_frame(res["top_tokens"], res["top_probs"]),
                                                        res["prompt_ids"], res["latent_index"], res["labels"])
            out = _export_dir()
            pca_file = _write_html(fig, out / "cacheaug-latents-pca.html")
            csv_file = str(viz.frame_to_csv(readout, out / "cacheaug-latent-readout.csv"))
            attn_file = None
            if (continuation or "").strip():
                progress(0.6, desc="attention to the latents")
                # The continuation keeps its room: a long prompt 1 is shortened from the left (its end stays).
                full, point, n2 = wb.fit_prompt_continuation(prompts[0][-ANALYSIS_MAX_CHARS:],
                                                             continuation[:ANALYSIS_MAX_CHARS], ATTENTION_MAX_TOKENS)
                sc = wb.score_text(full, point=point, top_k=1, with_attention=True)
                p = sc["point"]
                attn = _fit(viz.attention_to_latents_figure(
                    sc["tokens"][p + 1:], sc["attn_to_latents"],
                    title="Attention from the continuation to prompt 1's latents"))
                attn_file = _write_html(attn, out / "cacheaug-attention-to-latents.html")
                notice = _join(notice, n2)
            else:
                attn = _fit(views.message_figure("Attention to latents", "Type a continuation to see how much "
                                                 "attention each of its tokens pays to each latent."))
            per_prompt = int(res["latents"].shape[0]) // len(fitted)
            sim = viz.latent_similarity(res["latents"], res["prompt_ids"], res["latent_index"])
            info = (axes_text + views.explained_variance_text(evr) + f" · {len(fitted)} prompt(s) × {per_prompt} latents · mean "
                    f"cosine: same prompt {sim['within_prompt']:.2f}, same slot across prompts "
                    f"{sim['same_slot_across_prompts']:.2f}, other slots across prompts "
                    f"{sim['other_slot_across_prompts']:.2f}")
            sim_fig = _fit(viz.latent_similarity_figure(res["latents"], res["prompt_ids"], res["latent_index"],
                                                        labels=res["labels"]))
            return (fig, views.notice_html(_join(info, notice), "warning" if notice else "info"),
                    views.round_frame(readout), attn, pca_file, attn_file, csv_file, sim_fig, res)

    def latents_view(res, dims, color_by, axes_choice="reference"):
        """Re-draw the PCA of the stored latents (2-D/3-D, colour, axes) without a model call."""
        if not res:
            return gr.update()
        with _friendly_errors():
            return _pca_figure(res, dims, color_by, axes_choice)

    # -- Corpus ------------------------------------------------------------------------------

    def _corpus_tables(res, arm, ahead):
        """Everything the Corpus tab shows, from a (partial or finished) run: no model call."""
        arm = arm if arm in res.arms else res.arms[0]
        n = int(min(max(int(ahead or 1), 1), res.config.positions))
        tables = corpus.summarize(res, arm, n)
        done = len(res.docs)
        partial = ("" if res.finished else f"partial: {res.in_progress}" if res.in_progress
                   else f"partial: {done} document(s) so far")
        curve = _fit(corpus_viz.corpus_curve_figure(tables["by_position"], partial=partial))
        surpr = _fit(corpus_viz.bucket_figure(tables["by_surprisal"], "surprisal_nats",
                                              f"decoder surprisal (nats), {n} ahead"))
        kinds = _fit(corpus_viz.bucket_figure(tables["by_kind"], "kind", f"token kind, {n} ahead"))
        tokens = tables["tokens"].drop(columns=["title"]).sort_values("delta", kind="stable")
        tokens["token"] = tokens["token"].map(viz.display_token)
        docs = tables["documents"].sort_values("delta", kind="stable")
        return tables, curve, surpr, kinds, views.round_frame(docs), views.round_frame(tokens), arm, n

    def _corpus_exports(res, tables, arm, n):
        out = _export_dir()
        csv_file = str(viz.frame_to_csv(tables["tokens"], out / "cacheaug-corpus-tokens.csv"))
        json_file = str(views.write_json(corpus.result_json(res, tables, arm, n), out / "cacheaug-corpus.json"))
        return csv_file, json_file

    def corpus_run(upload, path, max_docs, max_tokens, positions, sink, arm, ahead, model_key=None,
                   progress=gr.Progress(), request: gr.Request = None):
        """Mode (b) over documents; yields the views after every document (progressive, Stop keeps them)."""
        session = getattr(request, "session_hash", None)
        stopped_sessions.discard(session)

        def tick(f, desc):
            if session is not None and session in stopped_sessions:
                stopped_sessions.discard(session)
                raise InputError("Stopped.")
            progress(float(f), desc=desc)

        with _friendly_errors():
            wb = backend.get(model_key)
            src = upload if upload else ((path or "").strip() or "wiki")
            if not upload and src not in corpus.BUNDLED:
                if Path(src).suffix not in (".jsonl", ".txt"):
                    raise InputError("Give a .jsonl (one {\"text\": ...} a line) or .txt file (form-feed-line "
                                     "separated), or 'wiki' for the bundled held-out sample.")
                # A path is read on the server: only under the folders it was started in (or listed in
                # CACHEAUG_CORPUS_DIRS), so a shared app does not hand out other files; upload the rest.
                roots = [Path.cwd(), Path(__file__).resolve().parent] + [
                    Path(d) for d in os.environ.get("CACHEAUG_CORPUS_DIRS", "").split(os.pathsep) if d]
                real = Path(src).expanduser().resolve()
                if not any(real.is_relative_to(r.resolve()) for r in roots):
                    raise InputError(f"Only files under {Path.cwd()} (or CACHEAUG_CORPUS_DIRS) are read by path; "
                                     "upload this one instead.")
            try:
                docs = corpus.read_corpus(src)
                cfg = corpus.CorpusConfig(positions=int(positions), max_docs=int(max_docs),
                                          max_tokens=int(max_tokens), sink=str(sink or "auto"),
                                          ahead=int(min(max(int(ahead or 1), 1), int(positions))))
                cfg.check()
            except corpus.CorpusError as e:
                raise InputError(str(e)) from None
            name = "bundled held-out Wikipedia sample" if src in corpus.BUNDLED else Path(str(src)).name
            total = min(len(docs), cfg.max_docs)
            res = None
            try:
                for res in corpus.score_corpus(wb, docs, cfg, progress=tick, source=name):
                    tables, curve, surpr, kinds, dtab, ttab, a, n = _corpus_tables(res, arm, ahead)
                    files = _corpus_exports(res, tables, a, n) if res.finished else (None, None)
                    scored = len(res.docs) - bool(res.in_progress)   # a partial first document is not counted
                    msg = (f"{name}: {scored}/{total} documents scored"
                           + (f", {res.in_progress} so far" if res.in_progress else "")
                           + f" (first {cfg.max_tokens} tokens each, "
                           f"{cfg.positions} positions ahead, sink {cfg.sink}"
                           f"{' = ' + repr(res.sink_token) if res.sink_token else ''}; arms: "
                           f"{', '.join(ARM_LABELS.get(x, x) for x in res.arms)}). "
                           + ("Click a document or token row for its per-token view." if res.finished
                              else "Scoring… figures fill in as documents finish."))
                    yield (views.notice_html(msg, "info"), curve, surpr, kinds, dtab, ttab, *files, res)
            except InputError:
                if res is None:
                    raise
                res.finished = True   # stopped: what was scored is kept, marked in the notice and the JSON
                tables, curve, surpr, kinds, dtab, ttab, a, n = _corpus_tables(res, arm, ahead)
                files = _corpus_exports(res, tables, a, n)
                yield (views.notice_html(f"Stopped after {len(res.docs)}/{total} documents; the views and exports "
                                         "hold those.", "warning"), curve, surpr, kinds, dtab, ttab, *files, res)

    def corpus_view(res, arm, ahead):
        """Re-tabulate the session's last corpus run for another arm / n-th token ahead (no model call)."""
        with _friendly_errors():
            if res is None:   # nothing computed yet: the controls only set the next run's view
                return (gr.update(),) * 7
            tables, curve, surpr, kinds, dtab, ttab, a, n = _corpus_tables(res, arm, ahead)
            files = _corpus_exports(res, tables, a, n)
            return curve, surpr, kinds, dtab, ttab, *files

    def corpus_doc(res, arm, ahead, evt: gr.SelectData):
        """A clicked document / token row -> that document's per-token Δloss view (from the stored run)."""
        with _friendly_errors():
            if res is None or evt is None:
                raise InputError("Run the corpus first.")
            row = evt.row_value or []
            doc = int(row[0])
            d = next((x for x in res.docs if x.index == doc), None)
            if d is None:
                raise InputError(f"Document {doc} is not in this run.")
            a = arm if arm in res.arms else res.arms[0]
            n = int(min(max(int(ahead or 1), 1), res.config.positions))
            nb, na = d.per_token(a, n)
            cap = (f"Document {doc} · {d.title} · {ARM_LABELS.get(a, a)}: each token scored with the latents "
                   f"inserted {n} token(s) earlier. Blue = helps, red = hurts, no colour = not scored.")
            head = views.notice_html(cap + (f" Cut to its first {len(d.tokens)} of {d.cut_from} tokens."
                                            if d.cut_from else ""), "info")
            return head + viz.token_delta_html(d.tokens, na - nb, nb, na, caption=""), d.text

    def corpus_to_analysis(text):
        """The clicked document into the Per-token analysis tab (mode (b))."""
        if not (text or "").strip():
            raise gr.Error("Click a document or token row first.", title="Corpus", print_exception=False)
        return text, "every", gr.Tabs(selected="analysis")

    def model_info(model_key=None, load_error: str = "", loaded: str = ""):
        """This session's decoder and coprocessor: notice banner, status, card, evaluation, and an error:
        the failed start-up load (every session on the start-up model), or this session's failed load
        (`load_error`). `loaded`: a line on a load this session just made."""
        err = load_error or (backend.error if model_key is None else "")
        try:
            wb = backend.get(model_key)
        except gr.Error as e:
            wb = None
            err = load_error or (backend.error if model_key is None else str(e))
        if wb is None:
            banner = views.notice_html(err or "No model is loaded.", "error")
            return banner, {}, "", "", views.notice_html(err, "error")
        st = wb.status()
        level = "warning" if st["coprocessor_source"] == "untrained" else "info"
        line = corpus.status_line(st.get("evaluation")) if level == "info" else ""
        banner = (views.notice_html(err, "error", "Last load failed:") + views.notice_html(loaded, "info", "Model:")
                  + views.status_html(line, st["notice"], level,
                                      "Coprocessor:" if level == "info" else "Untrained coprocessor:"))
        cfg = getattr(wb.coprocessor, "checkpoint_config", None)
        if cfg:
            try:
                card = "### Checkpoint card\n\n" + views.strip_front_matter(model_card(cfg))
            except (KeyError, TypeError) as e:
                card = f"_The checkpoint's card could not be built: {viz.clean_token(str(e))}_"
        else:
            card = ("### Checkpoint card\n\n_No checkpoint card: the coprocessor is **untrained** (randomly "
                    "initialised). Load a trained checkpoint folder above._")
        return (banner, st, card, "### Evaluation\n\n" + views.evaluation_markdown(st.get("evaluation")),
                views.notice_html(err, "error"))

    def load_model(decoder, coprocessor, model_key=None, progress=gr.Progress()):
        """Load a decoder (empty = embedded default) and a coprocessor (empty = shipped, else untrained)
        for this session only; returns the Model tab's views and the session's new model key (the old
        one when the load fails: this session keeps its model, other sessions never see the change)."""
        progress(0.1, desc="loading")
        key = model_key_of(decoder, coprocessor)
        try:
            wb = backend.load(*key)
        except Exception as e:  # noqa: BLE001 - any load failure is reported in the tab, the old model stays
            err = f"{type(e).__name__}: {e}" if not isinstance(e, CheckpointError) else str(e)
            gr.Warning(_msg(err), title="Model not loaded")
            return *model_info(model_key, err), model_key      # shown to this session only
        st = _model_summary(wb)
        loaded = (f"decoder {st['decoder']} with coprocessor {st['coprocessor']}, for this page only (other open "
                  "pages keep theirs). Results shown before this load were computed with the previous model.")
        return *model_info(key, loaded=loaded), key

    return {"generate": generate, "stop_generation": stop_generation,
            "analyze": analyze, "analyze_stream": analyze_stream, "stop_analysis": stop_analysis,
            "token_detail": token_detail,
            "pick_token": pick_token, "pick_row": pick_row, "recolour": recolour,
            "use_generation": use_generation, "latents": latents, "latents_view": latents_view, "corpus_run": corpus_run, "corpus_view": corpus_view,
            "corpus_doc": corpus_doc, "corpus_to_analysis": corpus_to_analysis, "model_info": model_info, "load_model": load_model}


def _compare_arms(wb: Workbench, prompt: str, state: dict, chat: bool) -> tuple[dict, str, str]:
    """Where the decoder and coprocessor arms part, and each arm's text scored under both arms."""
    if "decoder" not in state or "coprocessor" not in state:
        return {}, "", ""
    a, b = state["decoder"].token_ids, state["coprocessor"].token_ids
    at = views.first_divergence(a, b)
    ta, tb = wb.token_strings(a), wb.token_strings(b)
    cross = wb.cross_score(prompt, {"decoder": a, "coprocessor": b}, chat=chat)
    comp = {"first_divergence": None if at is None else {
        "token_index": at, "decoder_token": ta[at] if at < len(ta) else None,
        "coprocessor_token": tb[at] if at < len(tb) else None},
        "cross_scores": cross,
        "cross_scores_note": "mean NLL per generated token (nats) of each arm's text under the decoder alone and "
                             "under decoder + coprocessor (latents once at the end of the prompt)"}
    parts = []
    for arm, sc in cross.items():
        if sc["nll_decoder"] is not None:
            parts.append(f"{ARM_LABELS[arm]}'s text: {sc['nll_decoder']:.3f} under the decoder, "
                         f"{sc['nll_coprocessor']:.3f} with the coprocessor")
    text = ("Same tokens in both arms." if at is None else f"The arms part at generated token #{at}.") + (
        " Mean NLL per token (nats, lower = likelier): " + "; ".join(parts) + "." if parts else "")
    return comp, text, views.divergence_html(ta, tb, at)


def _arm_text(state: dict, name: str) -> str:
    a = state.get(name)
    return a.text if a is not None else ""


def _mode(mode) -> str:
    m = str(mode or "once").lower()
    return "every" if m.startswith(("every", "b", "(b")) else "once"


# ---------------------------------------------------------------------------------------------
# The UI


class CacheAugBlocks(gr.Blocks):
    """gr.Blocks whose launch() applies the app's theme and CSS (Gradio 6 takes them in launch)."""

    def launch(self, *args, **kwargs):
        kwargs.setdefault("theme", THEME)
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("head", HEAD)
        return super().launch(*args, **kwargs)


def build_demo(workbench_or_factory: Workbench | Callable[[], Workbench], pause: str | None = None,
               startup_key: tuple[str, str] | None = None) -> gr.Blocks:
    """The app on a Workbench (or a zero-argument factory that loads one on first use); `pause`: the
    pause-token checkpoint to bring along to models loaded from the Model tab; `startup_key`: the
    (decoder, coprocessor) the start-up model is, so a session loading the same shares it."""
    backend = Backend(workbench_or_factory, pause=pause, startup_key=startup_key)
    h = make_handlers(backend)
    model = {"concurrency_id": "model", "concurrency_limit": 1}

    with CacheAugBlocks(title="cacheaug: deliberation in latent space", delete_cache=(3600, 7200)) as demo:
        gr.Markdown("## cacheaug · deliberation in latent space via differentiable cache augmentation\n"
                    "<span class='cacheaug-small'>A frozen decoder, and the same decoder reading latents that a "
                    "coprocessor appended to its KV cache. Δloss = NLL(decoder+coprocessor) − NLL(decoder): "
                    "negative (blue) = the latents help.</span>", elem_id="cacheaug-title")
        notice = gr.HTML("", elem_id="cacheaug-notice")
        # This session's model: None = the start-up model, else the (decoder, coprocessor) it loaded in the
        # Model tab. Per session, so a load in one browser tab leaves every other tab's model as it was.
        session_model = gr.State(None)

        with gr.Tabs(elem_id="tabs") as tabs:
            # -- Generate ------------------------------------------------------------------------
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=3, max_lines=12, scale=5,
                                        elem_id="gen-prompt", info=f"At most {GEN_MAX_CHARS:,} characters / "
                                        f"{GEN_MAX_TOKENS:,} tokens are used.")
                    with gr.Column(scale=1, min_width=160):
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-run")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                # Outputs are created first (unrendered) so the examples can sit right under the prompt.
                out_dec = gr.Textbox(label="decoder alone", lines=10, max_lines=30, interactive=False,
                                     buttons=["copy"], elem_id="gen-decoder", render=False)
                out_aug = gr.Textbox(label="decoder + coprocessor", lines=10, max_lines=30, interactive=False,
                                     buttons=["copy"], elem_id="gen-augmented", render=False)
                stats = gr.Dataframe(views.arm_stats_frame([]), label="per arm: tokens, time to first token (s), "
                                     "tokens/s (each arm's own compute time)", interactive=False, elem_id="gen-stats",
                                     render=False)
                # Not Gradio's example cache: it would keep showing a previous model's outputs after a
                # model change. A click runs Generate itself (streamed, with status and downloads).
                examples = gr.Examples(EXAMPLES, inputs=[prompt], cache_examples=False, api_visibility="private",
                                       elem_id="gen-examples",
                                       label="Examples: one chat question, one arithmetic question, one creative prompt (a typical "
                                             "spread, not picked to flatter either arm); a click runs Generate with the "
                                             "settings below")
                with gr.Row(elem_classes=["cacheaug-phone-last"]):
                    max_new = gr.Slider(1, 256, DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens",
                                        elem_id="gen-max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="temperature (0 = greedy)",
                                            elem_id="gen-temperature")
                    seed = gr.Number(0, label="seed", precision=0, elem_id="gen-seed")
                with gr.Accordion("Sampling, augmentation and extra arms", open=False, elem_id="gen-options",
                                  elem_classes=["cacheaug-phone-last"]):
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="top-p", elem_id="gen-top-p")
                        top_k = gr.Slider(0, 200, 0, step=1, label="top-k (0 = off)", elem_id="gen-top-k")
                        chat = gr.Checkbox(True, label="wrap the prompt in the chat template", elem_id="gen-chat")
                    with gr.Row():
                        reaug = gr.Slider(0, 64, 0, step=1, label="re-augment every k generated tokens (0 = once)",
                                          elem_id="gen-reaugment-every")
                        async_delay = gr.Slider(0, 32, 0, step=1, label="asynchronous: latents arrive N tokens late "
                                                "(paper, Table 8)", elem_id="gen-async-delay")
                        extra_arms = gr.CheckboxGroup(
                            [("zero-shot chain-of-thought prompting", "cot"),
                             ("pause tokens (needs a pause checkpoint)", "pause")],
                            value=[], label="extra arms", elem_id="gen-arms")
                with gr.Row(equal_height=True):
                    out_dec.render()
                    out_aug.render()
                with gr.Row(equal_height=True):
                    out_pause = gr.Textbox(label="pause tokens", lines=6, interactive=False, visible=False,
                                           buttons=["copy"], elem_id="gen-pause")
                    out_cot = gr.Textbox(label="decoder alone, zero-shot chain-of-thought prompt", lines=6,
                                         interactive=False, visible=False, buttons=["copy"], elem_id="gen-cot")
                gen_diverge = gr.HTML("", elem_id="gen-diverge")
                with gr.Row():
                    with gr.Column(scale=3):
                        stats.render()
                        with gr.Row(equal_height=True):
                            gen_status = gr.Markdown("", elem_id="gen-status")
                            run_json = gr.DownloadButton("Download run JSON", elem_id="gen-json", size="md")
                            gen_run = gr.State(None)  # the run so far: Stop exports it
                    settings_json = gr.JSON(label="settings used (identical for every arm)", elem_id="gen-settings",
                                            scale=2, open=True, max_height=260)

            # -- Per-token analysis --------------------------------------------------------------
            with gr.Tab("Per-token", id="analysis", elem_id="tab-analysis"):   # short: phones fit every tab
                with gr.Row(equal_height=True):
                    ana_text = gr.Textbox(DEFAULT_TEXT, label="Text to score", lines=4, max_lines=12, scale=5,
                                          elem_id="ana-text", info=f"At most {ANALYSIS_MAX_CHARS:,} characters / "
                                          f"{ANALYSIS_MAX_TOKENS:,} tokens are scored.")
                    with gr.Column(scale=1, min_width=160):
                        ana_btn = gr.Button("Analyse", variant="primary", elem_id="ana-run")
                        ana_stop = gr.Button("Stop", variant="stop", elem_id="ana-stop")
                        use_gen_btn = gr.Button("Use last generation", elem_id="ana-use-generation")
                        use_arm = gr.Radio([("decoder's text", "decoder"), ("coprocessor's text", "coprocessor")],
                                           value="decoder", show_label=False, container=False,
                                           elem_id="ana-use-arm")
                # The verdict sits right under the Analyse button (on a phone too, on the first screen).
                ana_notice = gr.HTML("", elem_id="ana-notice")
                with gr.Row():
                    mode = gr.Radio(MODES, value="once", label="mode", elem_id="ana-mode", scale=3)
                    point = gr.Number(-1, label="(a) augment after token # (−1 = a quarter in; the end of the "
                                      "prompt after 'Use last generation')", precision=0, elem_id="ana-point")
                with gr.Row():
                    positions = gr.Slider(1, 32, 8, step=1, label="(b) positions ahead scored",
                                          elem_id="ana-positions")
                    ahead = gr.Slider(1, 32, 1, step=1, label="(b) colour tokens by the n-th token ahead",
                                      elem_id="ana-ahead")
                    ana_topk = gr.Slider(1, 50, 10, step=1, label="top-k in the token detail", elem_id="ana-topk")
                    ana_bf16 = gr.Checkbox(False, label="(b) bf16 matmuls (GPU, or CPU with AVX-512-bf16/AMX); the "
                                           "difference to float32 is measured and shown", elem_id="ana-bf16")
                ana_origin = gr.State(None)  # the text 'Use last generation' set, and its bias notice
                ana_shown = gr.State(None)  # text, mode, point / n ahead of the analysis shown: token detail uses it
                with gr.Row():
                    with gr.Column(scale=1):
                        tokens_html = gr.HTML("", js_on_load=TOKEN_CLICK_JS, max_height=520, elem_id="ana-tokens",
                                              label="per-token Δloss")
                    with gr.Column(scale=1):
                        with gr.Row(equal_height=True):
                            pick = gr.Number(None, label="selected token # (click a token)", precision=0,
                                             elem_id="ana-index", scale=2)
                            detail_btn = gr.Button("Show top-k", elem_id="ana-detail-run", scale=1)
                        detail_html = gr.HTML("", elem_id="ana-detail")
                        topk_table = gr.Dataframe(views.round_frame(viz.topk_compare_frame([], [], [], [])),
                                                  label="top-k next tokens, both arms", interactive=False,
                                                  max_height=420, elem_id="ana-topk-table")
                summary = gr.Dataframe(views.summary_display(viz.summary_table([], [])).iloc[:0],
                                       label="summary (tokens scored by both arms)", interactive=False,
                                       elem_id="ana-summary")
                by_pos_plot = gr.Plot(label="Δ by position ahead", elem_id="ana-by-position")
                heat_plot = gr.Plot(label="Δloss heatmap (mode b)", elem_id="ana-heatmap")
                per_token = gr.Dataframe(views.round_frame(viz.per_token_frame([], [], [])),
                                         label="per token (click a row for its top-k)", interactive=False,
                                         max_height=300, elem_id="ana-per-token")
                with gr.Row(elem_id="ana-exports"):
                    ana_csv = gr.DownloadButton("Per-token CSV", elem_id="ana-csv", size="md")
                    ana_json = gr.DownloadButton("Run JSON", elem_id="ana-json", size="md")
                    ana_fig_pos = gr.DownloadButton("Δ by position (HTML)", elem_id="ana-fig-by-position", size="md")
                    ana_fig_heat = gr.DownloadButton("Δloss heatmap (HTML, mode b)", elem_id="ana-fig-heatmap",
                                                     size="md")

            # -- Corpus --------------------------------------------------------------------------
            with gr.Tab("Corpus", id="corpus", elem_id="tab-corpus"):
                gr.Markdown("Mode (b) over many documents: where do the latents help? The curve pools every "
                            "document; the band is a 95% bootstrap interval over documents. <span class="
                            "'cacheaug-small'>doc_start = targets among a document's first 4 tokens; body = the "
                            "rest (as `cacheaug eval ppl`).</span>", elem_id="cor-intro")
                with gr.Row(equal_height=True):
                    cor_path = gr.Textbox("wiki", label="documents: 'wiki' (bundled held-out Wikipedia sample) or a "
                                          ".jsonl / .txt path", scale=3, elem_id="cor-path")
                    cor_file = gr.File(label="…or upload a .jsonl / .txt", file_types=[".jsonl", ".txt"], scale=2,
                                       height=120, elem_id="cor-upload")
                    with gr.Column(scale=1, min_width=160):
                        cor_btn = gr.Button("Run corpus", variant="primary", elem_id="cor-run")
                        cor_stop = gr.Button("Stop", variant="stop", elem_id="cor-stop")
                with gr.Row():
                    cor_docs = gr.Slider(1, corpus.MAX_DOCS, 12, step=1, label="documents", elem_id="cor-max-docs")
                    cor_tokens = gr.Slider(16, 512, 128, step=16, label="first tokens of each document",
                                           elem_id="cor-max-tokens")
                    cor_positions = gr.Slider(1, 32, 8, step=1, label="positions ahead scored",
                                              elem_id="cor-positions")
                    cor_sink = gr.Radio([("start-of-text sink", "auto"), ("none", "none")], value="auto",
                                        label="sink before each document", elem_id="cor-sink")
                with gr.Row():
                    cor_arm = gr.Radio([(ARM_LABELS["coprocessor"], "coprocessor"), (ARM_LABELS["pause"], "pause")],
                                       value="coprocessor", label="tables and buckets for arm", elem_id="cor-arm")
                    cor_ahead = gr.Slider(1, 32, 1, step=1, label="tables and buckets: the n-th token ahead "
                                          "(re-tabulates, no recompute)", elem_id="cor-ahead")
                cor_notice = gr.HTML("", elem_id="cor-notice")
                cor_state = gr.State(None)   # this session's last CorpusResult: views re-render from it
                cor_curve = gr.Plot(label="Δ by position ahead, over documents", elem_id="cor-curve")
                with gr.Row():
                    with gr.Column(min_width=340):
                        cor_surprisal = gr.Plot(label="Δ by the decoder's surprisal", elem_id="cor-surprisal")
                    with gr.Column(min_width=340):
                        cor_kind = gr.Plot(label="Δ by token kind", elem_id="cor-kind")
                with gr.Row():
                    with gr.Column(min_width=340):
                        cor_doc_table = gr.Dataframe(None, label="documents (sorted by Δ, helps most first; click a "
                                                     "row)", interactive=False, max_height=360, elem_id="cor-documents")
                    with gr.Column(min_width=340):
                        cor_tok_table = gr.Dataframe(None, label="tokens (sorted by Δ; click a row)", interactive=False,
                                                     max_height=360, elem_id="cor-tokens")
                cor_doc_view = gr.HTML("", js_on_load=None, max_height=420, elem_id="cor-doc-view")
                cor_doc_text = gr.State("")
                with gr.Row(elem_id="cor-exports"):
                    cor_open = gr.Button("Open this document in Per-token", elem_id="cor-open", size="md")
                    cor_csv = gr.DownloadButton("Tokens CSV", elem_id="cor-csv", size="md")
                    cor_json = gr.DownloadButton("Run JSON", elem_id="cor-json", size="md")

            # -- Latents -------------------------------------------------------------------------
            with gr.Tab("Latents", id="latents", elem_id="tab-latents"):
                with gr.Row(equal_height=True):
                    lat_prompts = gr.Textbox(DEFAULT_PROMPTS, label="Prompts (one per line)", lines=4, max_lines=16,
                                             scale=3, elem_id="lat-prompts",
                                             info=f"Up to {MAX_PROMPTS} prompts; latents at the end of each.")
                    lat_cont = gr.Textbox(DEFAULT_CONTINUATION, label="Continuation of prompt 1 (for attention to "
                                          "its latents; empty = skip)", lines=4, scale=3, elem_id="lat-continuation")
                    with gr.Column(scale=1, min_width=160):
                        lat_btn = gr.Button("Project latents", variant="primary", elem_id="lat-run")
                with gr.Row():
                    dims = gr.Radio([("2-D", 2), ("3-D", 3)], value=2, label="PCA dimensions", elem_id="lat-dims")
                    color_by = gr.Radio([("prompt", "prompt"), ("latent index", "latent")], value="prompt",
                                        label="colour by", elem_id="lat-color-by")
                    lat_topk = gr.Slider(1, 10, 5, step=1, label="closest tokens per latent (LM head)",
                                         elem_id="lat-topk")
                    lat_axes = gr.Radio([("reference prompts (comparable across runs)", "reference"),
                                         ("these prompts", "own")], value="reference", label="PCA axes",
                                        elem_id="lat-axes")
                lat_info = gr.HTML("", elem_id="lat-info")
                with gr.Row():
                    with gr.Column(min_width=340):
                        pca_plot = gr.Plot(label="latent PCA (hover: prompt, index, norm, closest tokens)",
                                           elem_id="lat-pca")
                    with gr.Column(min_width=340):
                        attn_plot = gr.Plot(label="attention to latents", elem_id="lat-attention")
                sim_plot = gr.Plot(label="cosine similarity of latents (within / across prompts) and norms by slot",
                                   elem_id="lat-similarity")
                lat_state = gr.State(None)   # the last latents: the PCA re-draws from them
                readout = gr.Dataframe(None, label="what each latent says (top-k through the LM head)",
                                       interactive=False, max_height=360, elem_id="lat-readout")
                with gr.Row(elem_id="lat-exports"):
                    lat_fig_pca = gr.DownloadButton("PCA figure (HTML)", elem_id="lat-fig-pca", size="md")
                    lat_fig_attn = gr.DownloadButton("Attention figure (HTML)", elem_id="lat-fig-attention",
                                                     size="md")
                    lat_csv = gr.DownloadButton("Read-out CSV", elem_id="lat-csv", size="md")

            # -- Model ---------------------------------------------------------------------------
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                with gr.Row(equal_height=True):
                    dec_in = gr.Textbox("", label="decoder", placeholder="empty = embedded SmolLM2-135M-Instruct; "
                                        "or a local transformers folder", elem_id="model-decoder", scale=3)
                    cop_in = gr.Textbox("", label="coprocessor checkpoint",
                                        placeholder="empty = the shipped one (else untrained); or a checkpoint folder",
                                        elem_id="model-coprocessor", scale=3)
                    load_btn = gr.Button("Load", variant="primary", elem_id="model-load", scale=1)
                gr.Markdown("<span class='cacheaug-small'>Loads for this browser tab only: other open pages keep "
                            "their model.</span>", elem_id="model-scope")
                model_err = gr.HTML("", elem_id="model-error")
                # Compact: the stored evaluation shown, the card and the raw status one click away.
                with gr.Accordion("Stored evaluation", open=True, elem_id="model-evaluation-box"):
                    evaluation = gr.Markdown("", elem_id="model-evaluation")
                with gr.Accordion("Checkpoint card (training settings, data, licence)", open=False,
                                  elem_id="model-card-box"):
                    card = gr.Markdown("", elem_id="model-card")
                with gr.Accordion("Status (JSON)", open=False, elem_id="model-status-box"):
                    status_json = gr.JSON(label="status", elem_id="model-status")
                with gr.Accordion("API and CLI equivalents", open=False, elem_id="model-api"):
                    gr.Markdown(CLI_EQUIVALENTS, elem_id="model-api-table")

        # -- Events ------------------------------------------------------------------------------
        gen_event = gen_btn.click(
            h["generate"], [prompt, extra_arms, chat, max_new, temperature, top_p, top_k, seed, reaug, async_delay, session_model],
            [out_dec, out_aug, out_pause, out_cot, stats, settings_json, gen_diverge, gen_status, run_json, gen_run],
            api_name="generate", **model)
        # An example is Generate on that prompt with the settings shown: streamed, status, settings, downloads.
        example_event = examples.load_input_event.then(
            h["generate"], [prompt, extra_arms, chat, max_new, temperature, top_p, top_k, seed, reaug, async_delay, session_model],
            [out_dec, out_aug, out_pause, out_cot, stats, settings_json, gen_diverge, gen_status, run_json, gen_run],
            api_visibility="private", **model)
        stop_btn.click(h["stop_generation"], gen_run, [gen_status, run_json], cancels=[gen_event, example_event],
                       api_visibility="private", queue=False)
        extra_arms.change(lambda arms: (gr.update(visible="pause" in (arms or [])),
                                        gr.update(visible="cot" in (arms or []))),
                          extra_arms, [out_pause, out_cot], api_visibility="private", queue=False)

        ana_inputs = [ana_text, mode, point, positions, ahead, ana_topk, ana_bf16, session_model, ana_origin]
        ana_outputs = [ana_notice, tokens_html, summary, by_pos_plot, heat_plot, per_token, ana_csv, ana_json,
                       ana_fig_pos, ana_fig_heat, ana_shown]
        ana_event = ana_btn.click(h["analyze_stream"], ana_inputs, ana_outputs, api_name="analyze", **model)
        ana_stop.click(h["stop_analysis"], None, ana_notice, cancels=[ana_event], api_visibility="private",
                       queue=False)
        # The n-ahead colour re-renders the stored mode (b) result; the token detail follows (stale otherwise).
        ahead.release(h["recolour"], [ana_shown, ahead], [tokens_html, summary, per_token, ana_shown],
                      api_visibility="private", queue=False).then(
            lambda: (views.round_frame(viz.topk_compare_frame([], [], [], [])), ""), None, [topk_table, detail_html],
            api_visibility="private", queue=False)
        # A new analysis clears the previous token detail at once (it described the old result).
        ana_btn.click(lambda: (views.round_frame(viz.topk_compare_frame([], [], [], [])), "", None), None,
                      [topk_table, detail_html, pick], api_visibility="private", queue=False)
        detail_inputs = [ana_shown, ana_topk, pick, session_model]  # the analysis shown, not the live widgets
        detail_btn.click(h["token_detail"], detail_inputs, [topk_table, detail_html], api_name="token_detail", **model)
        tokens_html.click(h["pick_token"], None, pick, api_visibility="private", queue=False).then(
            h["token_detail"], detail_inputs, [topk_table, detail_html], api_visibility="private", **model)
        per_token.select(h["pick_row"], None, pick, api_visibility="private", queue=False).then(
            h["token_detail"], detail_inputs, [topk_table, detail_html], api_visibility="private", **model)
        # The session's last run (its prompt, chat setting and token ids), not the live widgets.
        use_gen_btn.click(h["use_generation"], [use_arm, gen_run, session_model],
                          [ana_text, point, mode, ana_notice, ana_origin], api_name="use_generation", **model)

        lat_btn.click(h["latents"], [lat_prompts, dims, color_by, lat_topk, lat_cont, lat_axes, session_model],
                      [pca_plot, lat_info, readout, attn_plot, lat_fig_pca, lat_fig_attn, lat_csv, sim_plot, lat_state],
                      api_name="latents",
                      **model)

        cor_views = [cor_curve, cor_surprisal, cor_kind, cor_doc_table, cor_tok_table, cor_csv, cor_json]
        cor_btn.click(h["corpus_run"], [cor_file, cor_path, cor_docs, cor_tokens, cor_positions, cor_sink, cor_arm,
                                       cor_ahead, session_model], [cor_notice, *cor_views, cor_state], api_name="corpus", **model)
        # Stop sets a flag the run checks between passes: it ends itself and keeps what was scored.
        cor_stop.click(h["stop_analysis"], None, cor_notice, api_visibility="private", queue=False)
        gr.on([cor_arm.change, cor_ahead.release], h["corpus_view"], [cor_state, cor_arm, cor_ahead], cor_views,
              api_name="corpus_view", queue=False).then(
            lambda: ("", ""), None, [cor_doc_view, cor_doc_text], api_visibility="private", queue=False)  # stale
        for table in (cor_doc_table, cor_tok_table):
            table.select(h["corpus_doc"], [cor_state, cor_arm, cor_ahead], [cor_doc_view, cor_doc_text],
                         api_visibility="private", queue=False)
        cor_open.click(h["corpus_to_analysis"], cor_doc_text, [ana_text, mode, tabs], api_visibility="private",
                       queue=False)

        gr.on([dims.change, color_by.change, lat_axes.change], h["latents_view"],
              [lat_state, dims, color_by, lat_axes], pca_plot, api_visibility="private", queue=False)

        model_outputs = [notice, status_json, card, evaluation, model_err]
        load_btn.click(h["load_model"], [dec_in, cop_in, session_model], [*model_outputs, session_model],
                       api_name="load_model", **model)
        demo.load(h["model_info"], session_model, model_outputs, api_name="model_info", **model)

    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.cacheaug_backend = backend
    return demo


# ---------------------------------------------------------------------------------------------


def _env_port(default: int = 7860) -> int:
    try:
        return int(os.environ.get("GRADIO_SERVER_PORT", default))
    except ValueError:
        return default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    ap.add_argument("--port", type=int, default=_env_port(), help="port (default: $GRADIO_SERVER_PORT or 7860)")
    ap.add_argument("--share", action="store_true", help="also create a public gradio.live link (opt-in)")
    ap.add_argument("--decoder", default="", help="decoder folder or id (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--coprocessor", default="", help="coprocessor checkpoint folder (default: the shipped one)")
    ap.add_argument("--pause", default="", help="pause-token checkpoint folder (body 'none'): the pause arm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    factory = functools.partial(Workbench.load, args.decoder or None, args.coprocessor or None,
                                pause=args.pause or None)
    demo = build_demo(factory, pause=args.pause or None, startup_key=model_key_of(args.decoder, args.coprocessor))
    try:
        wb = demo.cacheaug_backend.get()
        if wb.notice:
            print(f"note: {wb.notice}", file=sys.stderr)
    except gr.Error:
        print(f"cacheaug: warning: {demo.cacheaug_backend.error}; the app starts anyway, choose a model in the "
              "Model tab.", file=sys.stderr)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
