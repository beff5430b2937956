"""Signature-faithful CPU fakes of the CUDA varlen kernels, so CPU CI runs both kernel call paths.

Each fake has its entry point's parameter names, kinds and defaults, read from the released sources:
flash-attn 2.8.3 and 2.5.9.post1 ``flash_attn_varlen_func`` (2.5 has no ``softcap``), and
``torch.nn.attention.varlen.varlen_attn`` of torch 2.10.0 (``is_causal``, no scale, no window),
2.11.0 (keyword-only ``scale`` and ``window_size``; causal is ``window_size == (-1, 0)``) and
2.12.0/2.13.0 (adds ``enable_gqa`` and paged-cache arguments). torch 2.9 has no varlen module.
FlashAttention-4 4.0.0b40 (``flash_attn.cute.flash_attn_varlen_func``): ``qv`` is the fourth
positional parameter, window bounds may be None, no dropout, returns ``(out, lse)``; it requires
compute capability 9.x-12.x and head dims 8-256 (Hopper) or 8-128 / 256 (Blackwell).
A fake checks what the kernel requires (fp16/bf16, (T, H, D) with a contiguous last dimension, int32
cu_seqlens covering the row, max_seqlen the longest segment, the heads it accepts), records the call
in ``calls``, and computes the kernel's result with its own per-segment SDPA loop in float32,
windowing by packed position as the kernels do.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor | None,
           max_q: int, max_k: int, gqa: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in HALF or t.dtype != q.dtype:
            raise RuntimeError(f"{name}: only fp16 and bf16 are supported, and q/k/v must share one, got {t.dtype}")
        if t.dim() != 3 or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be (total, heads, head_dim) with a contiguous last dimension")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise RuntimeError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if (q.shape[1] % k.shape[1]) if gqa else (q.shape[1] != k.shape[1]):
        raise RuntimeError(f"{q.shape[1]} query heads and {k.shape[1]} key/value heads are not accepted here")
    if cu_k is not None and not torch.equal(cu_q, cu_k):
        raise RuntimeError("self-attention over a packed row has the same cu_seqlens for queries and keys")
    if cu_q.dtype != torch.int32 or cu_q.dim() != 1 or int(cu_q[0]) != 0 or int(cu_q[-1]) != q.shape[0]:
        raise RuntimeError(f"cu_seqlens must be 1-D int32 from 0 to {q.shape[0]}, got {cu_q.dtype} {cu_q.tolist()}")
    longest = int(cu_q.diff().max())
    if type(max_q) is not int or max_q != longest or max_k != max_q:
        raise RuntimeError(f"max_seqlen must be the host int {longest}, got {max_q!r}, {max_k!r}")


def _emulate(q, k, v, cu, scale, left, right, dropout_p=0.0, softcap=0.0) -> torch.Tensor:
    """Per segment: key j visible to query i when i - left <= j <= i + right (-1: unbounded)."""
    q32, k32, v32 = (t.float() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k32, v32 = k32.repeat_interleave(groups, dim=1), v32.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(end - start)
        visible = torch.ones(end - start, end - start, dtype=torch.bool)
        if left >= 0:
            visible &= i[None, :] >= i[:, None] - left
        if right >= 0:
            visible &= i[None, :] <= i[:, None] + right
        seg = [t[start:end].transpose(0, 1) for t in (q32, k32, v32)]
        if softcap:
            scores = seg[0] @ seg[1].transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
            scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~visible, float("-inf"))
            out = F.dropout(scores.softmax(-1), dropout_p) @ seg[2]
        else:
            out = F.scaled_dot_product_attention(*seg, attn_mask=visible, scale=scale, dropout_p=dropout_p)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def flash_attn_varlen_func_fake(calls: list[dict[str, Any]]) -> Callable[..., torch.Tensor]:
    """flash-attn 2.8.3's ``flash_attn_varlen_func``."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
        causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
        return_attn_probs=False, block_table=None,
    ):
        _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gqa=True)
        calls.append(dict(q=q, k=k, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size, softcap=softcap))
        left, right = window_size
        return _emulate(q, k, v, cu_seqlens_q, softmax_scale, left, 0 if causal else right, dropout_p, softcap)

    return flash_attn_varlen_func


def flash_attn_varlen_func_2_5_fake(calls: list[dict[str, Any]]) -> Callable[..., torch.Tensor]:
    """flash-attn 2.5.9.post1's ``flash_attn_varlen_func``: no softcap."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
        causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
        block_table=None,
    ):
        _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gqa=True)
        calls.append(dict(q=q, k=k, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size))
        left, right = window_size
        return _emulate(q, k, v, cu_seqlens_q, softmax_scale, left, 0 if causal else right, dropout_p)

    return flash_attn_varlen_func


def varlen_attn_2_10_fake(calls: list[dict[str, Any]]) -> Callable[..., torch.Tensor]:
    """torch 2.10's ``varlen_attn``: the kernel's default scale 1/sqrt(D), equal head counts."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)
        calls.append(dict(query=query, key=key, is_causal=is_causal))
        return _emulate(query, key, value, cu_seq_q, None, -1, 0 if is_causal else -1)

    return varlen_attn


def _windowed(query, key, value, cu_seq_q, scale, window_size) -> torch.Tensor:
    if not isinstance(window_size, tuple) or len(window_size) != 2:
        raise TypeError(f"window_size must be a (left, right) tuple (torch compares it to (-1, 0)), got {window_size!r}")
    left, right = window_size
    return _emulate(query, key, value, cu_seq_q, scale, left, 0 if window_size == (-1, 0) else right)


def varlen_attn_2_11_fake(calls: list[dict[str, Any]]) -> Callable[..., torch.Tensor]:
    """torch 2.11's ``varlen_attn``: keyword-only scale and window_size, equal head counts."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)
        calls.append(dict(query=query, key=key, scale=scale, window_size=window_size))
        return _windowed(query, key, value, cu_seq_q, scale, window_size)

    return varlen_attn


def varlen_attn_2_12_fake(calls: list[dict[str, Any]]) -> Callable[..., torch.Tensor]:
    """torch 2.12/2.13's ``varlen_attn``: 2.11's plus enable_gqa (paged-cache arguments unused here)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=enable_gqa)
        calls.append(dict(query=query, key=key, scale=scale, window_size=window_size, enable_gqa=enable_gqa))
        return _windowed(query, key, value, cu_seq_q, scale, window_size)

    return varlen_attn


def flash_attn_4_varlen_func_fake(calls: list[dict[str, Any]], capability: int = 9) -> Callable[..., Any]:
    """FlashAttention-4 4.0.0b40's ``flash_attn.cute.flash_attn_varlen_func`` on a GPU of ``capability``
    (major): causal sets the right window bound to 0; a negative or None left bound is unbounded."""

    def flash_attn_varlen_func(
        q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
        min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
        softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
        pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None,
        block_sparse_tensors=None, aux_tensors=None, aux_scalars=None, return_lse=False, scheduler_metadata=None,
        seqlen_k_per_split=None, disable_scheduler_metadata=False, gather_bwd_recompute_p=False,
        gather_bwd_token_chunk=None, config=None, scales=None,
    ):
        if capability not in (9, 10, 11, 12):
            raise AssertionError("Unsupported compute capability. Supported: 9.x, 10.x, 11.x, 12.x")
        if qv is not None:
            raise RuntimeError("qv (MLA) is not what a packed row passes: cu_seqlens went in positionally?")
        head_dim = q.shape[-1]
        top = 256 if capability == 9 else 128
        if not (8 <= head_dim <= top or (capability in (10, 11) and head_dim == 256)) or head_dim % 8:
            raise AssertionError(f"(head_dim, head_dim_v)=({head_dim}, {head_dim}) is not supported on SM{capability}0")
        _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gqa=True)
        calls.append(dict(q=q, k=k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                          softcap=softcap))
        left, right = window_size
        left = -1 if left is None or left < 0 else left
        right = 0 if causal else (-1 if right is None or right < 0 else right)
        out = _emulate(q, k, v, cu_seqlens_q, softmax_scale, left, right, 0.0, softcap)
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
        return out, lse

    return flash_attn_varlen_func
