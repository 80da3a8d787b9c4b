"""A loaded decoder + coprocessor and the analyses the app and the CLI run on it.

Every method returns plain data (strings, numpy arrays, dicts); figures and HTML are made by `viz`
from these results. The Gradio app, the CLI and notebooks all call the same methods.

    wb = Workbench.load()                       # embedded decoder + shipped coprocessor
    for base, aug in wb.generate_pair("Why is the sky blue?", max_new_tokens=40): ...
    res = wb.score_text("The cat sat on the mat.", point=None)   # augment once, score the rest
    res = wb.score_every("Some text ...", positions=16)            # after every token
    for part in wb.iter_score_every("Some text ..."): ...          # the same, pass by pass (partial rows)
    lat = wb.latents(["prompt one", "prompt two"])
"""

from __future__ import annotations

import copy
import functools
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import augment, fastpath
from .checkpoint import CheckpointError, load_coprocessor, read_config, resolve_checkpoint
from .config import CoprocessorConfig
from .coprocessor import Coprocessor
from .decoder import DecoderLoadError, load_decoder, resolve_decoder

# cacheaug_core/assets: a link to the repository's assets/ in a checkout, the packaged files in a wheel
ASSETS = (Path(__file__).resolve().parent / "assets").resolve()
SHIPPED_COPROCESSOR = ASSETS / "coprocessor"
SHIPPED_PAUSE = ASSETS / "pause"  # the pause-token baseline trained beside the shipped coprocessor
MAX_PROMPT_CHARS = 20_000
# The fixed prompts whose latents define the Latents tab's reference PCA axes: every run is projected
# on them, so plots of different prompts (and sessions) share axes. Varied on purpose: questions,
# arithmetic, instructions, plain prose, code.
REFERENCE_PROMPTS = (
    "Why is the sky blue?", "What is 17 + 25?", "Write a haiku about the sea.",
    "The Eiffel Tower is in Paris. It was built for the 1889 World's Fair.",
    "Translate 'good morning' into French.", "def add(a, b):\n    return a + b",
    "List three causes of the French Revolution.", "If it rains, the ground gets wet. It rained, so",
)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def hub_precheck(name: str | None, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of retries, when a decoder given as a Hub id cannot load:
    not in the local Hub cache and the Hub offline (HF_HUB_OFFLINE) or unreachable. Local folders
    and the embedded default pass untouched."""
    import os
    import socket
    from urllib.parse import urlparse

    _, path = resolve_decoder(name)        # raises for a missing local folder
    if Path(path).exists():
        return
    try:
        from huggingface_hub import constants, snapshot_download

        snapshot_download(path, local_files_only=True)
        return                             # cached: from_pretrained finds it offline
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): check the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DecoderLoadError(f"decoder {name!r} is not a local folder nor in the Hub cache, and the Hub is off "
                               "(HF_HUB_OFFLINE=1): give a local transformers folder or leave it empty for the default")
    host = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise DecoderLoadError(f"decoder {name!r} is not a local folder nor in the Hub cache, and {host} cannot be "
                               f"reached ({e}): give a local transformers folder or leave it empty for the default") \
            from None


class InputError(ValueError):
    """Unusable user input (empty text, no tokens...); the message is shown to the user."""


def clean_text(text: str | None, max_chars: int = MAX_PROMPT_CHARS) -> tuple[str, str]:
    """Normalise user text; returns (text, notice). Lone surrogates are replaced, the length capped."""
    if text is None:
        text = ""
    notice = ""
    text = text.encode("utf-8", errors="replace").decode("utf-8", errors="replace") if _has_surrogates(text) else text
    if len(text) > max_chars:
        notice = f"Input truncated from {len(text):,} to {max_chars:,} characters."
        text = text[:max_chars]
    if not text.strip():
        raise InputError("The text is empty: type a prompt or some text first.")
    return unicodedata.normalize("NFC", text), notice


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


@torch.no_grad()
def compare_next_token(logp_base: torch.Tensor, logp_aug: torch.Tensor, top_k: int, rows_per_chunk: int = 8):
    """Both arms' next-token distributions, row by row: top-k and KL(aug || base).

    logp: (C, V) log-probabilities (`augment.score_continuation` returns them) ->
    ((ids_base, probs_base), (ids_aug, probs_aug), kl) with top-k (C, top_k) and kl (C,).
    The rows go a few at a time on CPU: with a 49k vocabulary a (C, V) float matrix is ~37 MB
    for C = 190, and every whole-matrix temporary (exp, difference, product) is a fresh allocation
    that is page-faulted in and streamed through memory, while a chunk's temporaries (8 rows:
    1.5 MB) stay in cache. Same values as whole-matrix ops, 2-3x faster on CPU.
    """
    C = logp_base.shape[0]
    dev = logp_base.device
    if dev.type != "cpu":
        rows_per_chunk = max(C, 1)  # on an accelerator one launch per op is the fast way
    ib = torch.empty(C, top_k, dtype=torch.long, device=dev)
    ia = torch.empty_like(ib)
    vb = torch.empty(C, top_k, dtype=torch.float32, device=dev)
    va = torch.empty_like(vb)
    kl = torch.empty(C, dtype=torch.float32, device=dev)
    for i in range(0, C, rows_per_chunk):
        s = slice(i, i + rows_per_chunk)
        lb, la = logp_base[s].float(), logp_aug[s].float()
        torch.topk(lb, top_k, -1, out=(vb[s], ib[s]))
        torch.topk(la, top_k, -1, out=(va[s], ia[s]))
        kl[s] = (la.exp() * (la - lb)).sum(-1)
    return (ib, vb.exp()), (ia, va.exp()), kl


@dataclass
class Arm:
    name: str
    text: str = ""
    token_ids: list = field(default_factory=list)
    ttft_s: float | None = None
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        n = len(self.token_ids)
        if n < 2 or self.ttft_s is None or self.total_s <= self.ttft_s:
            return None
        return (n - 1) / (self.total_s - self.ttft_s)

    def stats(self) -> dict:
        return {"arm": self.name, "tokens": len(self.token_ids),
                "time_to_first_token_s": None if self.ttft_s is None else round(self.ttft_s, 4),
                "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2)}


class Workbench:
    def __init__(self, decoder, tokenizer, info, coprocessor=None, coprocessor_source: str = "", notice: str = ""):
        self.decoder, self.tokenizer, self.info = decoder, tokenizer, info
        self.coprocessor = coprocessor
        self.coprocessor_source = coprocessor_source
        self.notice = notice
        self.pause = None  # optional pause-token checkpoint, an extra arm
        self.pause_source = ""
        self._last_score = None  # (key, result) of the last score_text: token clicks re-read it
        self._reference_axes = None  # (key, axes): fitted once per loaded model

    @classmethod
    def load(cls, decoder: str | None = None, coprocessor: str | None = None, num_latents: int = 16,
             pause: str | None = None):
        """Load a decoder and a coprocessor checkpoint (default: the shipped one, else untrained).

        `pause` is an optional second checkpoint, normally trained with body "none" (pause tokens:
        trained latents that never read the cache), loaded as the extra arm `wb.pause`; with the
        shipped coprocessor, the shipped pause-token baseline (assets/pause) unless pause=""."""
        # a folder or a Hub id ("user/repo[@revision]", downloaded once): a missing or damaged one
        # fails now, before the decoder loads
        local = {ckpt: resolve_checkpoint(ckpt) for ckpt in (coprocessor, pause) if ckpt}
        for path in local.values():
            read_config(path)
        if decoder:
            hub_precheck(decoder)  # an unreachable Hub id fails in seconds, not after retries
        dec, tok, info = load_decoder(decoder)
        notice = ""
        if coprocessor:                      # the user's choice: load it or fail with a clear error
            path = local[coprocessor].resolve()  # 'assets/coprocessor' is the shipped one too
        elif (SHIPPED_COPROCESSOR / "config.json").exists() and not decoder:
            path = SHIPPED_COPROCESSOR       # the shipped default fits the default decoder only
        else:
            path = None
        if path is not None:
            cop = load_coprocessor(path, dec, info)
            source = str(coprocessor) if coprocessor else str(path)  # as the user wrote it
            status = (cop.checkpoint_config or {}).get("status", "")
            if status:
                notice = status
        else:
            cop = Coprocessor(CoprocessorConfig(num_latents=num_latents, body="copy", num_layers=2), dec)
            source = "untrained"
            notice = ("No trained coprocessor is loaded: the coprocessor is UNTRAINED (randomly initialised "
                      "soft tokens on a copy of the decoder's first layers), so the augmented arm shows the "
                      "mechanism, not a benefit.")
        wb = cls(dec, tok, info, cop.eval(), source, notice)
        shipped = path is not None and path.resolve() == SHIPPED_COPROCESSOR.resolve()
        if pause is None and shipped and (SHIPPED_PAUSE / "config.json").exists():
            pause = str(SHIPPED_PAUSE)       # its baseline comes with it (pause="" opts out)
        if pause:
            wb.pause = load_coprocessor(local.get(pause) or Path(pause), dec, info).eval()
            wb.pause_source = str(pause)
            if wb.pause.config.body != "none":  # usable as an arm, but not what its label says
                wb.notice = " ".join(x for x in (wb.notice, f"The pause arm ({pause}) has body "
                                     f"{wb.pause.config.body!r}, not 'none' (pause tokens).") if x)
        return wb

    # -- text in -----------------------------------------------------------------------------

    def encode(self, text: str, chat: bool = False) -> torch.Tensor:
        """Token ids (1, n) of user text, optionally wrapped in the chat template."""
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 0:
            raise InputError("The text produced no tokens.")
        return torch.tensor([ids], device=self.decoder.device)

    def fit_text(self, text: str | None, max_chars: int = MAX_PROMPT_CHARS, max_tokens: int | None = None) -> tuple[str, str]:
        """clean_text, then cap the length in tokens too (memory grows with tokens); returns (text, notice)."""
        text, notice = clean_text(text, max_chars)
        if max_tokens is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > max_tokens:
                cut = self.tokenizer.decode(ids[:max_tokens])
                if cut.strip():
                    text = cut
                    notice = (notice + " " if notice else "") + (
                        f"Input truncated from {len(ids):,} to {max_tokens:,} tokens.")
        return text, notice

    def fit_prompt_continuation(self, prompt: str, continuation: str, max_tokens: int) -> tuple[str, int, str]:
        """A prompt and its continuation as one text of about `max_tokens` tokens or fewer, for scoring the
        continuation with latents at the end of the prompt; returns (text, point, notice), `point` being
        the prompt's last token. The continuation keeps its room: a long prompt is shortened from the
        left (its end, where the latents go, stays); a continuation longer than 3/4 of the budget is cut."""
        ptext, _ = clean_text(prompt)
        ctext, _ = clean_text(continuation)
        if not (ptext[-1].isspace() or ctext[0].isspace()):
            ctext = " " + ctext
        enc = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        pids, cids = enc(ptext), enc(ctext)
        max_tokens = max(int(max_tokens), 2)
        notes = []
        keep_c = min(len(cids), max_tokens - min(len(pids), max(1, max_tokens // 4)))
        if keep_c < len(cids):
            notes.append(f"The continuation was cut from {len(cids):,} to its first {keep_c:,} tokens.")
            cids = cids[:keep_c]
            ctext = self.tokenizer.decode(cids)
        keep_p = max_tokens - len(cids)
        if keep_p < len(pids):
            kept = pids[-keep_p:]
            while len(kept) > 1 and self.tokenizer.decode(kept).startswith("\ufffd"):  # a split character
                kept = kept[1:]
            notes.append(f"Prompt 1 was shortened to its last {len(kept):,} of {len(pids):,} tokens so the "
                         "continuation fits; the latents sit at its end.")
            ptext = self.tokenizer.decode(kept)
        point = len(enc(ptext)) - 1
        return ptext + ctext, point, " ".join(notes)

    def generation_as_text(self, prompt: str, token_ids, chat: bool = True) -> tuple[str, int, str]:
        """A generated continuation as a text to score in the context it was generated in.

        The prompt is encoded exactly as `generate_pair` encoded it (inside the chat template when
        `chat`), the generated token ids follow, and the whole is decoded with the template's special
        tokens kept, so that scoring the text (mode (a)) sees the same tokens as generation did, with
        the latents after the prompt's last token, where generation inserted them. Returns
        (text, point, notice); the notice says where the text does not re-encode to the same ids
        (a tokenizer that does not round-trip), '' when it does."""
        text, _ = clean_text(prompt)
        pids = self.encode(text, chat=chat)[0].tolist()
        ids = pids + [int(t) for t in token_ids]
        if len(ids) <= len(pids):
            raise InputError("The generation is empty: nothing to score.")
        try:   # no tidying of spaces: the decoded text must re-encode to the generated ids
            full = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        except TypeError:   # a minimal tokenizer without that option
            full = self.tokenizer.decode(ids)
        back = self.encode(full)[0].tolist()
        notice = ""
        if back != ids:
            at = next((i for i, (a, b) in enumerate(zip(back, ids)) if a != b), min(len(back), len(ids)))
            notice = (f"The text re-encodes to different tokens from token #{at} on ({len(back)} tokens instead of "
                      f"{len(ids)}): the scores there are for a slightly different tokenisation than was generated.")
        return full, len(pids) - 1, notice

    def token_strings(self, ids) -> list[str]:
        """Each token's text as it appears in the decoded string.

        A token holding only part of a UTF-8 character (byte-level BPE splits emoji and many
        non-Latin characters over several tokens) decodes alone to U+FFFD; such a token is shown
        by its bytes instead: what decodes as UTF-8 as text, the rest as escapes (``\\xf0\\x9f``)."""
        out = []
        for i in ids:
            s = self.tokenizer.decode([int(i)])
            if "\ufffd" in s:
                raw = self.token_bytes(int(i))
                if raw is not None:
                    s = raw.decode("utf-8", errors="backslashreplace")
            out.append(s)
        return out

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, where the vocabulary says so: byte-level BPE (GPT-2 style
        alphabet, e.g. 'Ġ' = space) or SentencePiece byte fallback ('<0xF0>'); else None."""
        conv = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if conv is None:
            return None
        try:
            piece = conv(int(token_id))
        except Exception:  # noqa: BLE001 - an odd tokenizer: keep the decoded text
            return None
        if isinstance(piece, (list, tuple)):
            piece = piece[0] if piece else None
        if not isinstance(piece, str) or not piece:
            return None
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        dec = _byte_decoder()
        if all(ch in dec for ch in piece):
            return bytes(dec[ch] for ch in piece)
        return None

    # -- generation ------------------------------------------------------------------------

    def generate_arm(self, ids: torch.Tensor, arm: str, **kw):
        """Yield the growing Arm for 'decoder', 'coprocessor' or 'pause'."""
        cop = {"decoder": None, "coprocessor": self.coprocessor, "pause": self.pause}[arm]
        a = Arm(arm)
        steps = augment.stream_generate(self.decoder, self.tokenizer, cop, ids, augment=cop is not None, **kw)
        busy = 0.0  # this arm's own compute time: arms advance in turn, so wall time would count the others too
        while True:
            t0 = time.perf_counter()
            try:
                step = next(steps)
            except StopIteration:
                return
            a.token_ids.append(step.token_id)
            a.text = self.tokenizer.decode(a.token_ids, skip_special_tokens=True)
            busy += time.perf_counter() - t0
            if a.ttft_s is None:
                a.ttft_s = busy
            a.total_s = busy
            yield a

    def generate_pair(self, prompt: str, arms=("decoder", "coprocessor"), chat: bool = True, cot: bool = False, **kw):
        """Yield a dict arm -> Arm, all arms advancing one token per step with identical settings."""
        text, _ = clean_text(prompt)
        ids = self.encode(text, chat=chat)
        streams = {a: self.generate_arm(ids, a, **kw) for a in arms}
        if cot:
            ids_cot = self.encode(text + "\nLet's think step by step.", chat=chat)
            streams["cot"] = self.generate_arm(ids_cot, "decoder", **kw)
        state = {}
        live = dict(streams)
        while live:
            for name in list(live):
                try:
                    state[name] = next(live[name])
                except StopIteration:
                    del live[name]
            if live or state:
                yield dict(state)
            if not live:
                break

    @torch.no_grad()
    def cross_score(self, prompt: str, continuations: dict[str, list[int]], chat: bool = True) -> dict:
        """Score each arm's generated tokens under both the decoder alone and decoder + coprocessor
        (latents once at the end of the prompt, as generation inserts them): who finds whose text
        likelier. continuations: arm -> token ids. Returns arm -> {"tokens", "nll_decoder",
        "nll_coprocessor"} (mean NLL per token, nats; None for an empty continuation)."""
        text, _ = clean_text(prompt)
        pids = self.encode(text, chat=chat)[0].tolist()
        out = {}
        for arm, cont in continuations.items():
            cont = [int(t) for t in cont]
            if not cont:
                out[arm] = {"tokens": 0, "nll_decoder": None, "nll_coprocessor": None}
                continue
            ids = torch.tensor([pids + cont], device=self.decoder.device)
            sc = augment.score_continuation(self.decoder, self.coprocessor, ids, len(pids) - 1)
            out[arm] = {"tokens": len(cont), "nll_decoder": float(sc.nll_base.float().mean()),
                        "nll_coprocessor": float(sc.nll_aug.float().mean())}
        return out

    # -- scoring ---------------------------------------------------------------------------

    def score_text(self, text: str, point: int | None = None, top_k: int = 10, with_attention: bool = True) -> dict:
        """Mode (a): augment once after token `point` (default: the end of the first sentence or
        a quarter of the text) and score every later token with and without the latents."""
        text, notice = clean_text(text)
        ids = self.encode(text)
        T = ids.shape[1]
        if T < 2:
            raise InputError("Need at least two tokens to score a continuation.")
        if point is None:
            point = max(0, min(T - 2, T // 4))
        point = int(min(max(point, 0), T - 2))
        # Clicking tokens of one analysis asks for the same scores again (about a second on CPU
        # each time): the last result is kept, keyed by everything it depends on.
        key = (tuple(ids[0].tolist()), point, int(top_k), id(self.decoder), id(self.coprocessor))
        last = self._last_score
        if last is not None and last[0] == key and (last[1]["attn_to_latents"] is not None or not with_attention):
            return copy.deepcopy(last[1]) | {"notice": notice}
        sc = augment.score_continuation(self.decoder, self.coprocessor, ids, point, with_attention=with_attention)
        (ib, pb), (ia, pa), kl = compare_next_token(sc.logits_base, sc.logits_aug, top_k)
        nb = np.full(T, np.nan)
        na = np.full(T, np.nan)
        nb[point + 1:] = sc.nll_base.cpu().numpy()
        na[point + 1:] = sc.nll_aug.cpu().numpy()
        res = {
            "tokens": self.token_strings(ids[0]), "point": point, "nll_base": nb, "nll_aug": na,
            "topk_base": (ib.cpu().numpy(), pb.cpu().numpy()), "topk_aug": (ia.cpu().numpy(), pa.cpu().numpy()),
            "kl_aug_base": kl.cpu().numpy(), "latents": sc.latents.float().cpu().numpy(),
            "attn_to_latents": None if sc.attn_to_latents is None else sc.attn_to_latents.cpu().numpy(),
            "notice": notice,
        }
        self._last_score = (key, res)
        return copy.deepcopy(res)

    def bf16_unsupported(self) -> str | None:
        """Why bf16 mode (b) is not offered here, or None: it needs a GPU with bf16, or a CPU with
        AVX-512-bf16 or AMX (elsewhere bf16 matmuls are emulated and slower than float32)."""
        dev = self.decoder.device
        if dev.type == "cuda":
            return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
        if dev.type != "cpu":
            return f"bf16 is not offered on {dev.type}"
        try:
            flags = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            flags = ""
        if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags):
            return None
        return "this CPU has neither AVX-512-bf16 nor AMX (or they cannot be detected): bf16 would be slower"

    def score_every(self, text: str, positions: int = 16, progress=None, bf16: bool = False) -> dict:
        """Mode (b): latents after every token; the n-th token ahead scored for n = 1..positions.
        bf16: matmuls in bfloat16 (torch.autocast; the weights stay float32), where supported."""
        for res in self.iter_score_every(text, positions, progress=progress, bf16=bf16):
            pass
        return res

    def iter_score_every(self, text: str, positions: int = 16, progress=None, bf16: bool = False):
        """`score_every`, pass by pass: yields its dict after each batched pass, with "points_done"
        and "points" (rows of nll_aug from points_done on are NaN: not scored yet); the last is final."""
        text, notice = clean_text(text)
        ids = self.encode(text)
        if ids.shape[1] < 2:
            raise InputError("Need at least two tokens.")
        if bf16 and (why := self.bf16_unsupported()):
            raise InputError(f"bf16 is not available: {why}.")
        tokens = self.token_strings(ids[0])
        # On CPU, passes of 32 points: the first partial result (what the app shows first) comes after
        # half the work of the default 64, at the same total time (256 tokens x 16 ahead on 2 cores:
        # 10.9 s at 32, 10.8-11.4 s at 64, 11.1 s at 128, 13.7 s at 255 points per pass).
        # (The transformers path, for coprocessors the fast path does not cover, keeps its own default;
        # this is augment.iter_score_after_every_token's own choice of path.)
        fast = ids.device.type == "cpu" and fastpath.unsupported(self.decoder, self.coprocessor) is None
        if fast:
            # bf16: only the coprocessor and the group passes in bf16 (they are ~90% of the work); the
            # plain arm's prefill and the LM head stay float32 (see fastpath.iter_score_every).
            passes = fastpath.iter_score_every(self.decoder, self.coprocessor, ids, positions, points_per_pass=32,
                                               progress=progress, fp32_outside_groups=bool(bf16))
        else:
            passes = augment.iter_score_after_every_token(self.decoder, self.coprocessor, ids, positions,
                                                          progress=progress)
        while True:
            # autocast per pass, not around the yield: its state is per thread, and a consumer (Gradio)
            # may resume this generator on another thread
            with torch.autocast(self.decoder.device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                step = next(passes, None)
            if step is None:
                return
            done, aug, base = step
            yield {"tokens": tokens, "nll_aug": aug.float().cpu().numpy().copy(),
                   "nll_base": base.float().cpu().numpy().copy(), "notice": notice,
                   "points_done": int(done), "points": int(ids.shape[1] - 1)}

    # -- latents ---------------------------------------------------------------------------

    @torch.no_grad()
    def _latents_of(self, coprocessor, text: str, chat: bool = False) -> torch.Tensor:
        """The latents (NL, d) a coprocessor emits at the end of one text."""
        ids = self.encode(text, chat=chat)
        cache, _ = augment.prefill(self.decoder, ids)
        return coprocessor(cache, torch.tensor([[ids.shape[1] - 1]], device=ids.device))[0, 0].float().cpu()

    def reference_axes(self, n_components: int = 3) -> dict:
        """PCA axes of the coprocessor's latents on REFERENCE_PROMPTS (`viz.fit_latent_axes`), fitted
        once per loaded model and kept: the Latents tab projects every run on them."""
        from .viz.latents import fit_latent_axes

        key = (id(self.decoder), id(self.coprocessor), int(n_components))
        if self._reference_axes is None or self._reference_axes[0] != key:
            z = torch.cat([self._latents_of(self.coprocessor, p) for p in REFERENCE_PROMPTS])   # (P*NL, d)
            axes = fit_latent_axes(z.numpy(), n_components) | {"prompts": list(REFERENCE_PROMPTS)}
            self._reference_axes = (key, axes)
        return self._reference_axes[1]

    @torch.no_grad()
    def latents(self, prompts: list[str], top_k: int = 5, chat: bool = False) -> dict:
        """Latents at the end of each prompt, with what each says through the decoder's LM head.
        With a pause checkpoint loaded, also its latents ("pause_latents", (NL', d); the pause
        tokens read no cache, so they are the same for every prompt: computed at the first prompt)."""
        lat, pid, idx, labels = [], [], [], []
        pause = None
        for i, p in enumerate(prompts):
            text, _ = clean_text(p)
            z = self._latents_of(self.coprocessor, text, chat=chat)
            if self.pause is not None and pause is None:
                pause = self._latents_of(self.pause, text, chat=chat).numpy()
            lat.append(z)
            pid += [i] * z.shape[0]
            idx += list(range(z.shape[0]))
            labels.append(text[:40])
        Z = torch.cat(lat)                                                          # (N, d)
        head = self.decoder.get_output_embeddings()
        probs = torch.softmax(augment.hidden_to_logits(self.decoder, Z.to(self.decoder.device, head.weight.dtype)).float(), -1)
        top = probs.topk(top_k, -1)
        top_tokens = [[self.tokenizer.decode([int(t)]) for t in row] for row in top.indices.cpu()]
        return {"latents": Z.numpy(), "prompt_ids": np.array(pid), "latent_index": np.array(idx), "labels": labels,
                "norms": Z.norm(dim=-1).numpy(), "top_tokens": top_tokens, "top_probs": top.values.cpu().numpy(),
                "pause_latents": pause}

    def status(self) -> dict:
        cfg = getattr(self.coprocessor, "checkpoint_config", None) or {}
        return {"decoder": self.info.to_dict(), "coprocessor": self.coprocessor.config.__dict__,
                "coprocessor_source": self.coprocessor_source, "notice": self.notice,
                "pause": None if self.pause is None else {"source": self.pause_source,
                                                          "config": self.pause.config.__dict__},
                "training": cfg.get("training", {}), "evaluation": cfg.get("evaluation", {})}


__all__ = ["Workbench", "InputError", "CheckpointError", "clean_text", "read_config"]
