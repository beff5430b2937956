"""Varlen causal attention over a packed row: one function, the backend picked at run time.

Backends, in the order ``auto`` tries them:
  flash  flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16; optional extra ``flash``)
  torch  ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch >= 2.9)
  sdpa   one ``scaled_dot_product_attention`` call per segment (any device and dtype; the test oracle)
Force one with ``ReGATEConfig.attn_backend`` or the environment variable ``REGATE_ATTN_BACKEND``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F

BACKEND_ENV = "REGATE_ATTN_BACKEND"
HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (missing package, device or dtype)."""


@functools.cache
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def why_unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run for this device and dtype, else the reason and the fix."""
    if backend == "sdpa":
        return None
    if backend not in ("flash", "torch"):
        return f"unknown attention backend {backend!r}: choose auto, flash, torch or sdpa"
    if device.type != "cuda":
        return f"the {backend} backend needs a CUDA device, the tensors are on {device.type}: use sdpa"
    if dtype not in HALF_DTYPES:
        return f"the {backend} backend needs fp16 or bf16, the tensors are {dtype}: cast, or use sdpa"
    if backend == "flash" and _flash_varlen() is None:
        return "flash-attn is not installed: pip install 'regate-plugin[flash]' (needs CUDA to build), or use torch"
    if backend == "torch" and _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen: upgrade to torch >= 2.9, or use flash"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to use: the environment variable wins over ``requested``; ``auto`` picks the fastest."""
    choice = os.environ.get(BACKEND_ENV) or requested
    if choice == "auto":
        for candidate in ("flash", "torch"):
            if why_unavailable(candidate, device, dtype) is None:
                return candidate
        return "sdpa"
    reason = why_unavailable(choice, device, dtype)
    if reason is not None:
        source = f"${BACKEND_ENV}" if os.environ.get(BACKEND_ENV) else "attn_backend"
        raise BackendUnavailable(f"attention backend {choice!r} (from {source}) cannot run: {reason}")
    return choice


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within each segment of a packed row, none across segments.

    q: (T, Hq, D); k, v: (T, Hkv, D) with Hq a multiple of Hkv (GQA); cu_seqlens: (S+1,) int32.
    Returns (T, Hq, D).
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "flash":
        return _flash_varlen()(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=True
        )
    if name == "torch":
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    return sdpa_segment_attention(q, k, v, cu_seqlens, scale)


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    params = _torch_varlen_params()
    kwargs = {"scale": scale}
    if "is_causal" in params:  # torch 2.9-2.10
        kwargs["is_causal"] = True
    else:  # torch >= 2.11
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def sdpa_segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Reference backend: one causal SDPA call per segment. Runs anywhere, backward included."""
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1:]} must run from 0 to the packed row's {q.shape[0]} tokens")
    if q.shape[1] != k.shape[1]:  # SDPA's enable_gqa needs torch >= 2.5; LLaVA's stack has 2.1
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (H, len, D)
        outputs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)
