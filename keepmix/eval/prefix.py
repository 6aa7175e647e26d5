"""Forward passes that compute a shared prefix once: the KV cache of a prefix, reused by every row that
begins with it.

Contract: `forward_after_prefixes(model, prefixes, suffixes, owners, ...)` runs the `prefixes` (token
lists, right-padded together) once, copies each one's key/value cache to the rows it owns (`owners[r]`
is the prefix of suffix row r), and runs the `suffixes` (left-padded together) on top. A row then sees
exactly the tokens prefix + suffix at positions 0, 1, ... as if it had been run whole: the padding
between a prefix and its suffix is masked out, and positions are given explicitly. The result holds the
logits of the last `logits_to_keep` suffix columns — with left padding, the last real tokens of every
row — and what a decoding loop needs to go on (cache, attention mask, each row's next position).

`shared_prefix_length(rows, keep)` is the length of the longest common token prefix of `rows` that
leaves at least `keep[r]` tokens of row r to its suffix (so the positions whose logits are needed are in
the suffix). `reuses_prefix(model)` says whether a model can run this way: a decoder whose cache after a
forward pass is transformers' plain (full-attention) `DynamicCache`; a sliding-window or recurrent cache
keeps only part of the prefix, so those models take the plain path.

Outputs equal the plain full-sequence forward pass up to float rounding (the same sums in another
order): tested in tests/eval/test_prefix.py for greedy generation (same texts) and multiple-choice
log-likelihoods (within 1e-5).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

MIN_SHARED = 4  # shorter common prefixes are not worth a second forward pass


@dataclass
class PrefixedForward:
    logits: torch.Tensor  # (rows, logits_to_keep, vocab)
    cache: DynamicCache  # the rows' KV cache (filled in place by every forward pass), rows in suffix order
    attention_mask: torch.Tensor  # (rows, prefix width + suffix width)
    next_position: torch.Tensor  # (rows,): the position of each row's next token


def shared_prefix_length(rows: list[list[int]], keep: list[int] | None = None) -> int:
    """The common prefix of `rows`, shortened so that row r keeps `keep[r]` (default 1) tokens after it;
    0 when that is under MIN_SHARED tokens."""
    if not rows:
        return 0
    n = min(len(r) - (keep[i] if keep else 1) for i, r in enumerate(rows))
    first = rows[0]
    length = 0
    while length < n and all(r[length] == first[length] for r in rows):
        length += 1
    return length if length >= MIN_SHARED else 0


def reuses_prefix(model) -> bool:
    """Whether `model` keeps a full KV cache that `forward_after_prefixes` can copy between rows, and its
    forward takes what that needs (position ids, a cache, logits_to_keep)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    if not {"attention_mask", "position_ids", "logits_to_keep"} <= set(params) or not (
            "cache" in params or "past_key_values" in params):
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:  # the per-layer attention kinds, where the config lists them
        return all(t == "full_attention" for t in layer_types)
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    return not sliding and not getattr(text, "attention_chunk_size", None)


def forward_after_prefixes(
    model,
    prefixes: list[list[int]],
    suffixes: list[list[int]],
    owners: list[int],
    *,
    pad: int,
    device: torch.device | str,
    logits_to_keep: int,
) -> PrefixedForward:
    """Logits of the last `logits_to_keep` columns of the suffix rows, each run after its prefix (every
    prefix holds at least one token; `prefixes` empty: the suffixes run alone)."""
    device = torch.device(device)
    cache, owner = DynamicCache(), torch.tensor(owners, dtype=torch.long)
    widths = torch.tensor([len(p) for p in prefixes] or [0], dtype=torch.long)
    prefix_mask = torch.zeros((1, 0), dtype=torch.long)
    if prefixes:
        if min(len(p) for p in prefixes) == 0:
            raise ValueError("every prefix needs a token (a row of padding alone has nothing to attend to)")
        width = int(widths.max())
        ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
        prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            prefix_mask[i, : len(p)] = 1
        # Right padding after a prefix cannot change its real positions (causal); no logits are needed.
        model(input_ids=ids.to(device), attention_mask=prefix_mask.to(device), use_cache=True, logits_to_keep=1,
              **{cache_keyword(model): cache})
        cache.batch_select_indices(owner.to(device))  # one copy of its prefix's cache per row
    else:
        owner = torch.zeros(len(suffixes), dtype=torch.long)

    suffix_ids, suffix_mask = left_padded(suffixes, pad)
    lengths = suffix_mask.sum(1)
    # Position of a suffix token = its prefix's length + its index among the row's real tokens.
    positions = widths[owner][:, None] + (suffix_mask.cumsum(1) - 1).clamp(min=0)
    attention_mask = torch.cat([prefix_mask[owner], suffix_mask], dim=1).to(device)
    logits = model(input_ids=suffix_ids.to(device), attention_mask=attention_mask, position_ids=positions.to(device),
                   use_cache=True, logits_to_keep=logits_to_keep, **{cache_keyword(model): cache}).logits
    return PrefixedForward(logits, cache, attention_mask, (widths[owner] + lengths).to(device))


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows, padded on the left to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    return input_ids, attention_mask


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: `cache` in newer transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
