"""sentence-transformers' Pooling, every mode, on texts packed end to end or on padded rows.

A text's tokens that count are those of its `pool` mask (1: pooled; 0: padding, or a prompt's tokens
where the Pooling config says include_prompt: false), and each mode is what
sentence_transformers' Pooling computes on right-padded rows (its _forward_padded): cls is the first
token that counts (the first token where none does), lasttoken the last that counts (zeros where none
does), weightedmean weighs a token by its position + 1. Several modes are concatenated in the
config's order.
"""

from __future__ import annotations

import torch

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy config keys, in the order sentence-transformers concatenates their modes.
LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
               "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
               "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def modes_of(config: dict) -> tuple[list[str], bool]:
    """(modes, include_prompt) of a 1_Pooling/config.json, either format; ValueError for a mode we do not know."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [mode for key, mode in LEGACY_KEYS.items() if config.get(key)] or ["mean"]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"pooling modes {unknown} are not supported (supported: {list(MODES)})")
    return modes, bool(config.get("include_prompt", True))


def _first_last(index: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor):
    """Per row of `counts` [R, N] (0/1), the first and last index among those that count: the first falls
    back to `fallback` [R], the last to -1 where none counts."""
    big = torch.full_like(index, 2**62)
    first = torch.where(counts, index, big).amin(dim=-1)
    first = torch.where(first == 2**62, fallback, first)
    last = torch.where(counts, index, torch.full_like(index, -1)).amax(dim=-1)
    return first, last


def pool_packed(modes: list[str], tokens: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor,
                starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """tokens [T, H] of texts packed end to end (text r: tokens starts[r] .. ends[r] - 1), positions and
    pool [T] -> [R, len(modes) * H]."""
    index = torch.ones_like(positions).cumsum(0) - 1  # arange without a device baked into the graph
    member = (index.unsqueeze(0) >= starts.unsqueeze(1)) & (index.unsqueeze(0) < ends.unsqueeze(1))  # [R, T]
    counts = member & pool.bool().unsqueeze(0)
    weights = counts.to(tokens.dtype)
    last_row = tokens.size(0) - 1
    out = []
    for mode in modes:
        if mode in ("cls", "lasttoken"):
            first, last = _first_last(index.unsqueeze(0).expand_as(counts), counts, starts.clamp(max=last_row))
            if mode == "cls":
                out.append(tokens.index_select(0, first))
            else:
                out.append(tokens.index_select(0, last.clamp(min=0)) * (last >= 0).unsqueeze(1).to(tokens.dtype))
        elif mode == "max":
            out.append(tokens.unsqueeze(0).masked_fill(~counts.unsqueeze(-1), float("-inf")).amax(dim=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
            out.append((weights @ tokens) / (total if mode == "mean" else total.sqrt()))
        else:  # weightedmean
            w = weights * (positions + 1).to(tokens.dtype).unsqueeze(0)
            out.append((w @ tokens) / w.sum(dim=1, keepdim=True).clamp(min=1e-9))
    return torch.cat(out, dim=-1)


def pool_padded(modes: list[str], tokens: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """tokens [B, S, H] of right-padded rows, pool [B, S] -> [B, len(modes) * H]."""
    counts = pool.bool()
    weights = counts.to(tokens.dtype).unsqueeze(-1)
    index = (torch.ones_like(pool).cumsum(1) - 1).long()
    out = []
    for mode in modes:
        if mode in ("cls", "lasttoken"):
            first, last = _first_last(index, counts, torch.zeros_like(index[:, 0]))
            rows = torch.ones_like(first).cumsum(0) - 1
            if mode == "cls":
                out.append(tokens[rows, first])
            else:
                out.append(tokens[rows, last.clamp(min=0)] * (last >= 0).unsqueeze(1).to(tokens.dtype))
        elif mode == "max":
            out.append(tokens.masked_fill(~counts.unsqueeze(-1), float("-inf")).amax(dim=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = weights.sum(dim=1).clamp(min=1e-9)
            out.append((tokens * weights).sum(dim=1) / (total if mode == "mean" else total.sqrt()))
        else:  # weightedmean
            w = weights * (index + 1).to(tokens.dtype).unsqueeze(-1)
            out.append((tokens * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
    return torch.cat(out, dim=-1)
