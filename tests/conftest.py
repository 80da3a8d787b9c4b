"""Shared fixtures: tiny random decoders built from configs (Llama-, Qwen2- and GPT-2-style, or any
family of `cacheaug_core.families.FAMILIES` by its name).

They run in milliseconds on CPU and need no download. Tests that need the real default decoder
are marked `integration`.
"""

import os

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ("llama", "qwen2", "gpt2")


def tiny_decoder(arch: str = "llama", vocab: int = 96, layers: int = 3, hidden: int = 32, seed: int = 0,
                 attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:   # any other family of the registry (tests/test_families.py runs them all)
        from cacheaug_core.families import FAMILIES

        if arch not in FAMILIES:
            raise ValueError(arch)
        cfg = FAMILIES[arch].make_config(vocab, layers, hidden, 8)
        attn = FAMILIES[arch].attn if attn == "sdpa" else attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    from cacheaug_core.decoder import freeze

    return freeze(model)


class TinyTokenizer:
    """A character-level stand-in for a HF tokenizer: enough for generation and the app."""

    def __init__(self, vocab: int = 96):
        self.vocab = vocab
        self.eos_token_id = 0
        self.pad_token_id = 0
        self.eos_token = "\x00"
        self.pad_token = "\x00"
        self.special_tokens_map = {"eos_token": "\x00"}

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) - 32) % (self.vocab - 1) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            ids = [ids]
        return "".join("" if (i == 0 and skip_special_tokens) else chr(32 + (int(i) - 1) % (self.vocab - 1))
                       for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [self.decode([i]) for i in ids]

    def get_vocab(self):
        return {chr(32 + i): i + 1 for i in range(self.vocab - 1)} | {"\x00": 0}

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


@pytest.fixture
def tiny_tokenizer():
    return TinyTokenizer()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def byte_tokenizer():
    """A real transformers tokenizer with a byte-level vocabulary (no merges), built offline."""
    from cacheaug_core.decoder import byte_level_tokenizer

    return byte_level_tokenizer()


def save_tiny_decoder(path, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 32):
    """A tiny random decoder + byte tokenizer saved as a transformers folder."""
    tok = byte_tokenizer()
    model = tiny_decoder(arch, vocab=len(tok), layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def repeated_text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(p)
