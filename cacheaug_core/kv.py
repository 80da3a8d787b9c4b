"""The one module that touches transformers' cache classes.

Everything else in cacheaug handles a decoder's KV cache as an opaque object and calls these
functions, so version differences (DynamicCache's layer objects in 5.x, `crop` that only takes a
negative count, caches mutated in place by every forward) live here and are tested here
(`tests/test_core.py`, and for every supported family `tests/test_families.py`).

Shapes: per layer, keys and values are (B, H_kv, S, D_head) with RoPE already applied.

Passing a cache into a forward and reading it back also goes through here (`cache_kwargs`,
`returned`): transformers 5.25 deprecates the `past_key_values` argument name, so a rename is a
change to this module only. Tested with transformers 5.17 and 5.23.

Sliding-window decoders (Gemma-2/3, Mistral, Qwen2 with `use_sliding_window`): the cache their own
forward starts keeps only the last W-1 positions of a sliding layer, while an augmentation group
must read the whole prefix its mask allows, and `length` must mean the same on every layer. Every
cache here is therefore a plain `DynamicCache` (all layers keep everything); the window is applied
by the masks (transformers' own for plain decoding, cacheaug's `masks.window_allowed` for groups).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

Cache = DynamicCache
LayerKV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, H_kv, S, D_head)


def new_cache(config=None) -> DynamicCache:
    """An empty cache for a forward to fill: every layer keeps every position (also the sliding
    layers of a windowed decoder, see the module docstring). `config` is accepted and not used,
    for callers that hold one."""
    return DynamicCache()


def cache_kwargs(cache, start: bool = True) -> dict:
    """The keyword arguments that hand `cache` to a decoder's or body's forward. With no cache and
    `start`, a fresh full cache (`new_cache`) is passed, so a windowed decoder never builds its own
    truncating one."""
    if cache is None and start:
        cache = new_cache()
    return {"past_key_values": cache}


def returned(out):
    """The cache a forward returned (its output's past_key_values)."""
    return out.past_key_values


def to_layers(cache) -> list[LayerKV]:
    """The cache as a list of per-layer (keys, values) tensors; no copy."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # legacy tuple-of-tuples


def from_layers(layers: list[LayerKV]) -> DynamicCache:
    """A fresh cache holding these tensors.

    The tensors themselves are shared, not copied: DynamicCache grows a layer by `torch.cat`, which
    allocates a new tensor, so a forward through the returned cache never writes into the source.
    This is how one prefix cache serves many independent continuations (coprocessor passes,
    augmentation points, both arms of a comparison) without deep copies.
    """
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def fork(cache) -> DynamicCache:
    """An independent cache with the same contents (tensors shared, see `from_layers`)."""
    return from_layers(to_layers(cache))


def length(cache) -> int:
    """Number of cached positions."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def crop(cache, keep: int) -> None:
    """Keep the first `keep` positions, in place (5.x `crop` only accepts a negative count)."""
    n = length(cache)
    if keep < 0 or keep > n:
        raise ValueError(f"cannot crop a cache of {n} positions to {keep}")
    if keep < n:
        cache.crop(keep - n)


def prefix(cache, keep: int) -> DynamicCache:
    """A new cache with the first `keep` positions of `cache` (views; the source is untouched)."""
    return from_layers([(k[..., :keep, :], v[..., :keep, :]) for k, v in to_layers(cache)])


def select_layers(cache, layer_ids: list[int]) -> DynamicCache:
    """A new cache whose layer j holds layer `layer_ids[j]` of `cache`.

    A compact coprocessor of k layers reads k of the decoder's layers this way.
    """
    layers = to_layers(cache)
    return from_layers([layers[i] for i in layer_ids])


def select_rows(cache, index: torch.Tensor) -> DynamicCache:
    """A new cache whose batch row i is row index[i] of `cache` (copies; rows may repeat)."""
    return from_layers([(k.index_select(0, index), v.index_select(0, index)) for k, v in to_layers(cache)])


def detach(cache) -> DynamicCache:
    """A new cache whose tensors carry no autograd history."""
    return from_layers([(k.detach(), v.detach()) for k, v in to_layers(cache)])
