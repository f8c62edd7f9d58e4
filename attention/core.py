"""Attention arithmetic on ComfyUI's head-merged tensors (pure torch).

Shapes (house alphabet): R rows of the UNet batch, H heads, N queries, T keys, D head dim. ComfyUI hands replace
patches q `[R, N, H*D]`, k and v `[R, T, H*D]` after the projections and expects `[R, N, H*D]` back.
"""

from __future__ import annotations

import torch


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[R, N, H*D] -> [R, H, N, D]."""
    rows, n, inner = t.shape
    return t.view(rows, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[R, H, N, D] -> [R, N, H*D]."""
    rows, heads, n, dim = t.shape
    return t.transpose(1, 2).reshape(rows, n, heads * dim)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) in float32, [R, H, N, T] (Vaswani et al. 2017, Eq. 1).

    `key_mask` (bool, broadcastable to [R, H, N, T]) keeps the keys where it is True; a query whose keys are all
    masked gets all-zero probabilities instead of NaN.
    """
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    logits = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
    if key_mask is None:
        return logits.softmax(-1)
    logits = logits.masked_fill(~key_mask, float("-inf"))
    probs = logits.softmax(-1)
    return torch.nan_to_num(probs, nan=0.0)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs [R, H, N, T] @ V -> [R, N, H*D] in v's dtype."""
    vh = split_heads(v, heads)
    return merge_heads(probs.to(vh.dtype) @ vh)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [R, N, H*D] with keys restricted by `key_mask` (bool [R or 1, 1, N or 1, T]), without
    materialising the probabilities when the backend can avoid it (SDPA). Queries with no allowed key output 0."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if key_mask is None:
        return merge_heads(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
    any_key = key_mask.any(-1, keepdim=True)
    safe_mask = key_mask | ~any_key  # SDPA returns NaN for fully masked rows; zero them afterwards
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=safe_mask)
    return merge_heads(out * any_key.to(out.dtype))
