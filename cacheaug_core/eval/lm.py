"""The frozen decoder + coprocessor as an lm-evaluation-harness model, "cacheaug" (optional
dependency: pip install lm-eval). Importing `CacheAugLM` builds and registers the class.

    from cacheaug_core.eval import CacheAugLM        # registers "cacheaug"
    lm_eval.simple_evaluate(model="cacheaug", model_args="coprocessor=DIR,device=cuda", tasks=["arc_easy"])
    python -m cacheaug_core.eval.lm run --model cacheaug --model_args coprocessor=DIR --tasks arc_easy
"""

from __future__ import annotations

import torch

from .. import augment
from .bench import fit_context
from .provenance import load_models
from .scoring import encode_pair, generate_text, generate_texts, max_positions, prefix_token_id, score_requests


@torch.no_grad()
def rolling_logprob(decoder, coprocessor, window: list[int], n_pred: int, points_per_pass: int = 64) -> float:
    """Summed log-prob of the last n_pred tokens of `window`, each given every token before it in the
    window; with a coprocessor, latents are inserted after the previous token (a fresh call per
    token, the group dropped afterwards), i.e. the paper's first-token protocol."""
    x = torch.tensor([window], device=decoder.device)                                # (1, T)
    if coprocessor is None:
        _, logits = augment.prefill(decoder, x)
        nll = augment.plain_nll(logits, x)[0, 1:]                                     # (T-1,)
    else:
        nll, _ = augment.score_after_every_token(decoder, coprocessor, x, 1, points_per_pass)
        nll = nll[:, 0]                                                               # (T-1,)
    return -float(nll[-n_pred:].double().sum())


_LM_CLASS = None


def _make_lm_class():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm

    class CacheAugLM(LM):
        """The frozen decoder + coprocessor as an lm-eval model ("cacheaug").

        loglikelihood: the coprocessor is called once at the end of each context; requests are
        scored in batches across contexts (`score_requests`, `batch_tokens` padded tokens per pass).
        loglikelihood_rolling: lm-eval's disjoint rolling windows; inside a window every token is
        predicted with latents inserted after the token before it (the augmentation then dropped),
        a proper left-to-right factorisation whose per-token perplexity is the paper's first-token
        perplexity. generate_until: coprocessor once at the end of the prompt; greedy requests are
        decoded in batches (`generate_texts`), sampled ones one at a time.
        augment=False gives the plain decoder through the same code (the baseline).

            lm_eval.simple_evaluate(model="cacheaug", model_args="coprocessor=DIR,device=cuda", tasks=[...])
        """

        def __init__(self, decoder: str = "", coprocessor: str = "", device: str = "", dtype: str = "float32",
                     augment: bool = True, async_delay: int = 0, max_gen_toks: int = 256, max_length: int = 0,
                     batch_tokens: int = 16384, workbench=None, batch_size=None, max_batch_size=None, **kwargs):
            super().__init__()
            self.wb = workbench if workbench is not None else load_models(decoder, coprocessor, device=device,
                                                                           dtype=dtype)
            self.cop = self.wb.coprocessor if augment else None
            self.async_delay, self.max_gen_toks = int(async_delay), int(max_gen_toks)
            self.batch_tokens = int(batch_tokens)   # padded tokens per batched pass (`score_requests`)
            span = self.cop.layout(1).offset + self.cop.config.num_latents if self.cop is not None else 0
            self.max_length = int(max_length) or max_positions(self.wb.decoder) - span - 1
            self._device = self.wb.decoder.device
            self.prefix = prefix_token_id(self.wb.tokenizer)

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.wb.tokenizer, "name_or_path", "cacheaug").replace("/", "__")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            tok, dec = self.wb.tokenizer, self.wb.decoder
            pad = getattr(tok, "pad_token_id", None) or 0
            reqs = []
            for r in requests:
                c_ids, t_ids = encode_pair(tok, *r.args, self.prefix)
                reqs.append((fit_context(c_ids, [t_ids], self.max_length - self.async_delay), t_ids))
            out = [None] * len(requests)
            step = 1024   # requests per `score_requests` call: a progress tick, batches packed inside
            for s in tqdm(range(0, len(reqs), step), disable=disable_tqdm, desc="loglikelihood",
                          unit=f"x{step} requests"):
                sc = score_requests(dec, reqs[s: s + step], {"m": self.cop}, self.async_delay, pad,
                                    self.batch_tokens)["m"]
                for j, (lp, g) in enumerate(zip(sc.logprobs, sc.greedy)):
                    out[s + j] = (lp, g)
                    self.cache_hook.add_partial("loglikelihood", requests[s + j].args, (lp, g))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for r in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
                ids = self.wb.tokenizer.encode(r.args[0], add_special_tokens=False)
                total = 0.0
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix, max_seq_len=self.max_length, context_len=1))
                for ctx, pred in windows:
                    total += rolling_logprob(self.wb.decoder, self.cop, list(ctx) + list(pred), len(pred))
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            tok = self.wb.tokenizer
            out = [None] * len(requests)
            greedy: dict[int, list] = {}        # max_gen_toks -> [(index, ids, until)]: decoded in batches
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
            for i, r in enumerate(requests):
                ctx, kw = r.args
                kw = dict(kw or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if tok.eos_token_id is not None:  # lm-eval's HF model also stops at EOS text
                    until.append(tok.decode([tok.eos_token_id]))
                n = int(kw.get("max_gen_toks", self.max_gen_toks))
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                ids = tok.encode(ctx, add_special_tokens=False)[-max(self.max_length - n, 1):]
                if temp > 0:
                    out[i] = generate_text(self.wb.decoder, tok, self.cop, ids, n, until, self.async_delay, temp)
                    self.cache_hook.add_partial("generate_until", r.args, out[i])
                    bar.update(1)
                else:
                    greedy.setdefault(n, []).append((i, ids, tuple(until)))
            for n, group in greedy.items():
                texts = generate_texts(self.wb.decoder, tok, self.cop, [g[1] for g in group], n, [g[2] for g in group],
                                       self.async_delay, 4 * self.batch_tokens, bar)
                for (i, _, _), text in zip(group, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.close()
            return out

    CacheAugLM.__module__, CacheAugLM.__qualname__ = __name__, "CacheAugLM"
    try:
        register_model("cacheaug")(CacheAugLM)
    except ValueError:  # a class of an earlier import of this module holds the name; keep it
        pass
    return CacheAugLM


def lm_eval_class():
    """The `CacheAugLM` class (built and registered as "cacheaug" on first use; needs lm-eval)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        try:
            _LM_CLASS = _make_lm_class()
        except ImportError as e:
            raise ImportError(f"CacheAugLM needs lm-evaluation-harness: pip install lm-eval ({e})") from e
    return _LM_CLASS


def __getattr__(name):  # `from cacheaug_core.eval.lm import CacheAugLM` without importing lm_eval eagerly
    if name == "CacheAugLM":
        return lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # lm-eval's own CLI with "cacheaug" registered: python -m cacheaug_core.eval.lm run ...
    from cacheaug_core.eval import lm as _self

    _self.lm_eval_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
