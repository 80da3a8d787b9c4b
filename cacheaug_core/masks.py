"""Group layouts for augmentation points, and the attention masks built from them.

A sequence x_0..x_{T-1} is augmented at points p (0 <= p <= T-2). Point p's *group* is what the
decoder reads after x_p in place of the rest of the text:

    [z_1 .. z_NL] [x_p]? [x_{p+1} .. x_{p+A-1}]      (latents, optional re-fed token, ahead tokens)

and its last A positions predict the ahead tokens x_{p+1} .. x_{p+A}. A group sees the original
tokens x_0..x_p and, causally, its own earlier members; never later text or other groups. The
same layout with the soft tokens in place of latents drives the coprocessor.

Position ids continue from the point (the paper's "as if inserted at p"): latents take p+1..p+NL
("continue") or all share p+1 ("shared"); with `shift_ahead` the tokens after the latents are
shifted by the latents' span, otherwise they keep their original positions.

With `hide_point` (and `refeed_last`) the group does not see x_p's original entry: the re-fed copy
after the latents stands in for it. Without shift, a group that ignores its latents then computes
exactly the plain decoder's hidden states for x_p..x_{p+A-1}.

Masks are float and additive (0 = attend, finfo.min = blocked): a bool 4-D mask is silently wrong
with eager attention, and -inf turns fully masked rows into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupLayout:
    num_latents: int          # NL: latents (or soft tokens) at the head of each group
    n_ahead: int              # A: ahead tokens predicted per point
    refeed_last: bool = False  # re-feed x_p after the latents, so x_{p+1} is read off a real token
    latent_pos: str = "continue"  # "continue" (p+1..p+NL) or "shared" (all at p+1)
    shift_ahead: bool = True   # shift the positions after the latents by the latents' span
    hide_point: bool = False   # the group sees the re-fed x_p instead of x_p's original entry

    @property
    def n_tokens(self) -> int:
        """Token inputs per group after the latents: the re-fed x_p, then x_{p+1}..x_{p+A-1}."""
        return int(self.refeed_last) + self.n_ahead - 1

    @property
    def group_len(self) -> int:
        return self.num_latents + self.n_tokens

    @property
    def offset(self) -> int:
        """How far the text after an augmentation point is shifted in position ids."""
        if not self.shift_ahead:
            return 0
        span = self.num_latents if self.latent_pos == "continue" else 1
        return span + int(self.refeed_last)  # the re-fed x_p takes a position of its own


def latent_positions(points: torch.Tensor, layout: GroupLayout, n: int | None = None) -> torch.Tensor:
    """Position ids of n latents/soft tokens per point. points (B, P) -> (B, P, n)."""
    n = layout.num_latents if n is None else n
    i = torch.arange(n, device=points.device)
    if layout.latent_pos == "shared":
        i = torch.zeros_like(i)
    elif layout.latent_pos != "continue":
        raise ValueError(f"latent_pos must be 'continue' or 'shared', not {layout.latent_pos!r}")
    return points[..., None] + 1 + i


def group_positions(points: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Position ids of every group member. points (B, P) -> (B, P, G)."""
    lat = latent_positions(points, layout)
    # token j of the group after the latents is x_{p + j + (0 if refeed else 1)}
    first = 0 if layout.refeed_last else 1
    j = torch.arange(layout.n_tokens, device=points.device) + first
    tok = points[..., None] + j + layout.offset
    return torch.cat([lat, tok], dim=-1)


def group_tokens(input_ids: torch.Tensor, points: torch.Tensor, layout: GroupLayout, pad_id: int = 0):
    """Token inputs and targets of each group.

    input_ids (B, T), points (B, P) -> tokens (B, P, n_tokens), targets (B, P, A), valid (B, P, A).
    Ahead tokens past the end of the sequence get `pad_id` as input and are marked invalid.
    """
    T = input_ids.shape[1]
    first = 0 if layout.refeed_last else 1
    j = torch.arange(layout.n_tokens, device=points.device) + first
    idx = points[..., None] + j                                  # (B, P, n_tokens)
    tokens = torch.gather(input_ids, 1, idx.clamp(max=T - 1).flatten(1)).view_as(idx)
    tokens = torch.where(idx < T, tokens, torch.full_like(tokens, pad_id))
    k = torch.arange(1, layout.n_ahead + 1, device=points.device)
    tidx = points[..., None] + k                                 # (B, P, A)
    valid = tidx < T
    targets = torch.gather(input_ids, 1, tidx.clamp(max=T - 1).flatten(1)).view_as(tidx)
    return tokens, targets, valid


def group_allowed(T: int, points: torch.Tensor, group_len: int, hide_point: bool = False) -> torch.Tensor:
    """Bool (B, P*G, T + P*G): may group row attend to key? True = attend.

    Keys are the T original positions (the cache) followed by all groups laid out point-major.
    """
    B, P = points.shape
    dev = points.device
    g = torch.arange(group_len, device=dev)
    # original keys: t <= p of the row's point (t < p when the re-fed copy stands in for x_p)
    t = torch.arange(T, device=dev)
    last = points - int(hide_point)
    to_orig = t[None, None, None, :] <= last[:, :, None, None]              # (B, P, 1, T)
    to_orig = to_orig.expand(B, P, group_len, T)
    # group keys: same point, causal within the group
    same = torch.eye(P, dtype=torch.bool, device=dev)                        # (P, P)
    causal = g[None, :] <= g[:, None]                                        # (G, G)
    to_group = same[:, None, :, None] & causal[None, :, None, :]              # (P, G, P, G)
    to_group = to_group.reshape(1, P * group_len, P * group_len).expand(B, -1, -1)
    return torch.cat([to_orig.reshape(B, P * group_len, T), to_group], dim=-1)


def append_allowed(seen: torch.Tensor, new_visible: torch.Tensor) -> torch.Tensor:
    """Bool (B, n, K + n): which keys n inputs appended after K cached positions may attend to.

    seen (B, K): the cached keys the new inputs may see (not padding, not a hidden point entry);
    new_visible (B, n): which of the new inputs count as keys at all (padding does not). Among
    themselves the new inputs are causal.
    """
    B, n = new_visible.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=seen.device).tril()
    return torch.cat([seen[:, None, :].expand(B, n, -1), new_visible[:, None, :] & causal], dim=2)


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool -> float additive mask with a head axis: (B, Q, K) -> (B, 1, Q, K)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def dense_group_mask(T: int, points: torch.Tensor, group_len: int, dtype: torch.dtype,
                     hide_point: bool = False) -> torch.Tensor:
    """Float additive mask (B, 1, P*G, T + P*G) for groups read against a cache of T positions."""
    return to_additive(group_allowed(T, points, group_len, hide_point), dtype)


def key_positions(T: int, new_pos: torch.Tensor) -> torch.Tensor:
    """Position ids of every key of a pass that appends inputs at positions new_pos (B, n) to a
    cache of the T original tokens (positions 0..T-1). -> (B, T + n). Sliding-window layers use it
    to apply their window to an explicit mask (`families.attach`)."""
    B = new_pos.shape[0]
    orig = torch.arange(T, device=new_pos.device)[None].expand(B, T)
    return torch.cat([orig, new_pos], dim=1)


def latent_columns(T: int, n_points: int, layout: GroupLayout) -> torch.Tensor:
    """Bool (T + P*G,): which keys of a group pass are latents (the first NL of every group)."""
    G = layout.group_len
    k = torch.arange(T + n_points * G)
    return (k >= T) & ((k - T) % G < layout.num_latents)


def group_block_mask(T: int, points: torch.Tensor, group_len: int, hide_point: bool = False,
                     block_size: int | tuple[int, int] = 128):
    """The same mask as a FlexAttention BlockMask: whole blocks that no row may see are skipped,
    so groups cost attention only over their own prefix and their own block. (B, P) -> BlockMask
    for Q = P*G queries and K = T + P*G keys; block_size: one size, or (query block, key block)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, P = points.shape
    G = group_len
    pts = (points - int(hide_point)).contiguous()

    def mask_mod(b, h, q, k):
        grp = q // G
        kg = k - T
        to_orig = k <= pts[b, grp]
        to_group = ((kg // G) == grp) & ((kg % G) <= (q % G))
        return torch.where(k < T, to_orig, to_group)

    return create_block_mask(mask_mod, B, None, P * G, T + P * G, device=points.device, BLOCK_SIZE=block_size)


def without_prefix_key_grads(block_mask, T: int):
    """The same BlockMask for the forward and the query gradient, with no query block listed for
    the key blocks that lie wholly in the first T keys: FlexAttention's backward then skips those
    blocks' key and value gradients (it writes zeros there). For keys that need no gradient: the
    decoder's frozen cache of the original tokens, which every group row reads. Only the
    transposed (key-major) block lists change, which the forward and the query-gradient loop do
    not read; key blocks that straddle T keep theirs."""
    import copy

    n = T // block_mask.BLOCK_SIZE[1]
    out = copy.copy(block_mask)
    for name in ("q_num_blocks", "full_q_num_blocks"):
        t = getattr(block_mask, name)
        if t is not None:
            t = t.clone()
            t[..., :n] = 0
            setattr(out, name, t)
    return out


def group_mask(T: int, points: torch.Tensor, group_len: int, dtype: torch.dtype, attn_implementation: str | None,
               hide_point: bool = False):
    """The group mask in the form the attention implementation takes: a BlockMask for
    flex_attention, a dense float additive mask otherwise."""
    if attn_implementation == "flex_attention":
        return group_block_mask(T, points, group_len, hide_point)
    return dense_group_mask(T, points, group_len, dtype, hide_point)


def sample_points(T: int, n_points: int, batch: int, generator: torch.Generator | None = None,
                  min_point: int = 0) -> torch.Tensor:
    """Random distinct augmentation points per sequence, sorted. -> (B, P) long.

    Points are drawn from [min_point, T-2] so every point has at least one ahead token.
    """
    hi = T - 1  # exclusive upper bound: p <= T-2
    if n_points > hi - min_point:
        raise ValueError(f"cannot place {n_points} points in a sequence of {T} tokens")
    scores = torch.rand(batch, hi - min_point, generator=generator)
    pts = scores.topk(n_points, dim=1).indices + min_point
    return pts.sort(dim=1).values
