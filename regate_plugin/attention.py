"""Varlen causal attention over a packed row: one function, the backend picked at run time.

Backends, in the order ``auto`` tries them:
  flash4 FlashAttention-4's ``flash_attn.cute.flash_attn_varlen_func`` (CUDA Hopper or Blackwell,
         compute capability 9.x-12.x, fp16/bf16; optional extra ``flash4``, a pure-Python wheel)
  flash  flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16; optional extra ``flash``)
  torch  ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch >= 2.10)
  sdpa   one ``scaled_dot_product_attention`` call per segment (any device and dtype; the test oracle)
Force one with ``ReGATEConfig.attn_backend`` or the environment variable ``REGATE_ATTN_BACKEND``.

Every attention semantic a caller passes (dropout, sliding window, logit softcap, anything else) is
either honoured exactly by the chosen backend or refused with ``UnsupportedAttention``: none is dropped.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

BACKEND_ENV = "REGATE_ATTN_BACKEND"
HALF_DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = ("install flash-attn-4 on Hopper/Blackwell (pip install 'regate-plugin[flash4]'), flash-attn "
                "(pip install 'regate-plugin[flash]') or torch >= 2.10 (torch.nn.attention.varlen)")
FLASH4_ARCHS = (9, 10, 11, 12)  # compute capability majors FlashAttention-4 runs forward and backward on
AUTO_ORDER = ("flash4", "flash", "torch")
logger = logging.getLogger(__name__)
_announced: set[tuple[str, str, str]] = set()  # (backend, source, device type) already logged in this process


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (missing package, device or dtype)."""


class UnsupportedAttention(ValueError):
    """The call asks for attention semantics that the chosen backend cannot honour exactly."""


@functools.cache
def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:  # flash-attn-4 alone leaves ``flash_attn`` a namespace package without this function
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash4_varlen() -> Callable[..., Any] | None:
    """FlashAttention-4's varlen entry point (it returns ``(out, lse)``), None when not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (the one other place tests fake a GPU)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def _torch_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _params(fn: Callable[..., Any]) -> frozenset[str]:
    """Parameter names of a kernel entry point: its version's signature decides how it is called."""
    return frozenset(inspect.signature(fn).parameters)


def _accelerated(device: torch.device) -> bool:
    """True on a device the varlen kernels run on (the one place tests fake a GPU)."""
    return device.type == "cuda"


def why_unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run for this device and dtype, else the reason and the fix."""
    if backend == "sdpa":
        return None
    if backend not in AUTO_ORDER:
        return f"unknown attention backend {backend!r}: choose auto, flash4, flash, torch or sdpa"
    if not _accelerated(device):
        return f"the {backend} backend needs a CUDA device, the tensors are on {device.type}: use sdpa"
    if dtype not in HALF_DTYPES:
        return f"the {backend} backend needs fp16 or bf16, the tensors are {dtype}: cast, or use sdpa"
    if backend == "flash4":  # the capability first: importing flash-attn-4 loads the CuTe DSL
        major, minor = _capability(device)
        if major not in FLASH4_ARCHS:
            return (f"flash-attn-4 runs on Hopper and Blackwell (compute capability 9.x-12.x), this GPU is "
                    f"{major}.{minor}: use flash or torch")
        if _flash4_varlen() is None:
            return "flash-attn-4 is not installed: pip install 'regate-plugin[flash4]' (Hopper or Blackwell), or use flash"
    if backend == "flash" and _flash_varlen() is None:
        return "flash-attn is not installed: pip install 'regate-plugin[flash]' (needs CUDA to build), or use torch"
    if backend == "torch" and _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen: upgrade to torch >= 2.10, or use flash"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to use: the environment variable wins over ``requested``; ``auto`` picks the fastest.
    The choice is logged once per process (INFO), a fall back to the SDPA loop on CUDA warns once."""
    choice = os.environ.get(BACKEND_ENV) or requested
    source = f"${BACKEND_ENV}" if os.environ.get(BACKEND_ENV) else "attn_backend"
    if choice == "auto":
        reasons = {}
        for candidate in AUTO_ORDER:
            reasons[candidate] = why_unavailable(candidate, device, dtype)
            if reasons[candidate] is None:
                _announce(candidate, f"{source}=auto", device)
                return candidate
        _announce("sdpa", f"{source}=auto", device, "; ".join(f"{b}: {r}" for b, r in reasons.items()))
        return "sdpa"
    reason = why_unavailable(choice, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"attention backend {choice!r} (from {source}) cannot run: {reason}")
    _announce(choice, f"{source}={choice}", device)
    return choice


def _announce(backend: str, source: str, device: torch.device, fell_back: str | None = None) -> None:
    """Say once per process which backend packed attention runs, and why auto did not pick a kernel."""
    key = (backend, source, device.type)
    if key in _announced:
        return
    _announced.add(key)
    if fell_back is None:
        logger.info("packed attention backend: %s (%s, %s)", backend, source, device.type)
        return
    logger.info("packed attention backend: %s, one SDPA call per sample (%s, %s; fell back: %s)",
                backend, source, device.type, fell_back)
    if _accelerated(device):
        logger.warning("packed attention on %s falls back to one SDPA call per sample, much slower than a varlen "
                       "kernel: %s. Why neither runs: %s", device.type, INSTALL_HINT, fell_back)


def segment_max_span(cols: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """The longest segment's span in original columns (last - first + 1), 0 for no segment: the host int
    ``varlen_attention`` takes as ``max_span``. Reads the values: call it on the host copy of the plan."""
    if cu_seqlens.numel() < 2 or cols.numel() == 0:
        return 0
    bounds = cu_seqlens.long()
    return int((cols[bounds[1:] - 1] - cols[bounds[:-1]]).max()) + 1


def segment_gapped_span(cols: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """The longest span among segments with elided columns (span > length), 0 for none: the host int
    ``varlen_attention`` takes as ``max_gapped_span``, so the kernels' window check needs no device
    read per layer. Reads the values: call it on the host copy of the plan, once per step."""
    if cu_seqlens.numel() < 2 or cols.numel() == 0:
        return 0
    bounds = cu_seqlens.long()
    spans = cols[bounds[1:] - 1] - cols[bounds[:-1]] + 1
    gapped = spans[spans != bounds[1:] - bounds[:-1]]
    return int(gapped.max()) if gapped.numel() else 0


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    window: int | None = None,
    cols: torch.Tensor | None = None,
    max_span: int | None = None,
    max_gapped_span: int | None = None,
    softcap: float | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Causal attention within each segment of a packed row, none across segments.

    q: (T, Hq, D); k, v: (T, Hkv, D) with Hq a multiple of Hkv (GQA); cu_seqlens: (S+1,) int32;
    max_seqlen: the longest segment (host int). Returns (T, Hq, D).
    dropout_p: attention dropout probability (pass 0 outside training).
    window: sliding window as transformers' ``sliding_window``: a query sees the ``window`` keys whose
        original column is within ``window - 1`` of its own, itself included. Counted in ``cols``:
        (T,) each token's column in its sample before elision (elided tokens leave gaps);
        ``max_span``: the longest segment's last - first column + 1 (host int, see ``segment_max_span``).
        Nothing is done when ``max_span <= window``: the window cannot drop any key then.
        ``max_gapped_span`` (host int, see ``segment_gapped_span``): the kernel backends window by
        packed position and refuse when it exceeds ``window``; without it they read that from the device.
    softcap: logit soft-capping ``softcap * tanh(scores / softcap)`` (flash-attn >= 2.6 only).
    extra: any other semantics of the caller's attention (``s_aux``, attention sinks, ...): each one
        that is not None is refused.
    Raises ``UnsupportedAttention`` when the backend cannot honour a requested semantic exactly.
    """
    _refuse_extra(extra)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (None: no soft-capping), got {softcap}")
    window = _active_window(window, cols, max_span, q.shape[0])
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "flash4":
        return _flash4_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, window, cols, softcap, max_gapped_span)
    if name == "flash":
        return _flash_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, window, cols, softcap, max_gapped_span)
    if name == "torch":
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, window, cols, softcap,
                                      max_gapped_span)
    if softcap is not None:
        raise UnsupportedAttention(
            f"the sdpa attention backend has no logit soft-capping (softcap={softcap}): run on CUDA with "
            "flash-attn >= 2.6 (attn_backend flash), or train this model without ReGATE packing"
        )
    return sdpa_segment_attention(q, k, v, cu_seqlens, scale, dropout_p=dropout_p, window=window, cols=cols)


def _refuse_extra(extra: dict[str, Any]) -> None:
    """The hook point for semantics no backend here implements: naming them beats dropping them."""
    given = sorted(name for name, value in extra.items() if value is not None)
    if given:
        raise UnsupportedAttention(
            f"packed ReGATE attention does not implement {', '.join(given)} (e.g. s_aux: attention sinks): "
            "train this model without ReGATE packing"
        )


def _active_window(window: int | None, cols: torch.Tensor | None, max_span: int | None, tokens: int) -> int | None:
    """``window`` when it can drop a key of some segment, else None; decided from host ints (no sync)."""
    if window is None:
        return None
    if window < 1:
        raise ValueError(f"sliding window must be at least 1 key, got {window}")
    if max_span is not None and max_span <= window:
        return None
    if cols is None:
        raise ValueError(
            f"a sliding window of {window} keys needs cols (each packed token's original column) and max_span"
        )
    if cols.shape != (tokens,):
        raise ValueError(f"cols must have shape ({tokens},), one column per packed token, got {tuple(cols.shape)}")
    return window


def _require_no_gaps(backend: str, window: int, cols: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_gapped_span: int | None) -> None:
    """Kernels window by packed position; that equals the window in columns unless a segment longer
    than the window has elided columns. Decided from the host int when the caller planned it, else
    from one flag read from the device."""
    if max_gapped_span is None:
        max_gapped_span = segment_gapped_span(cols, cu_seqlens)
    if max_gapped_span > window:
        raise UnsupportedAttention(
            f"the {backend} attention backend counts its sliding window ({window} keys) in packed positions, and a "
            f"sample longer than the window has elided tokens, so the window cannot be applied exactly: use "
            f"attn_backend sdpa (or ${BACKEND_ENV}=sdpa), which counts original columns, or keep samples within "
            f"{window} tokens"
        )


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None,
    dropout_p: float, window: int | None, cols: torch.Tensor | None, softcap: float | None,
    max_gapped_span: int | None = None,
) -> torch.Tensor:
    """flash-attn's varlen kernel; dropout, window and softcap go to its own parameters."""
    kernel = _flash_varlen()
    params = _params(kernel)
    kwargs: dict[str, Any] = {"dropout_p": dropout_p, "softmax_scale": scale, "causal": True}
    if window is not None:
        if "window_size" not in params:
            raise UnsupportedAttention(
                "this flash-attn has no sliding window (window_size): upgrade to flash-attn >= 2.3, or use sdpa"
            )
        _require_no_gaps("flash", window, cols, cu_seqlens, max_gapped_span)
        kwargs["window_size"] = (window - 1, 0)  # keys i-(window-1)..i: window keys, the query included
    if softcap is not None:
        if "softcap" not in params:
            raise UnsupportedAttention(
                f"this flash-attn has no softcap (model softcap={softcap}): upgrade to flash-attn >= 2.6"
            )
        kwargs["softcap"] = softcap
    return kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _flash4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None,
    dropout_p: float, window: int | None, cols: torch.Tensor | None, softcap: float | None,
    max_gapped_span: int | None = None,
) -> torch.Tensor:
    """FlashAttention-4's varlen kernel. Its fourth positional parameter is ``qv`` (MLA), so the
    segments go by keyword; GQA, window and softcap are its own parameters; it has no dropout.
    Head dims: 8-256 on Hopper, 8-128 (or 256) on Blackwell; the kernel names any other."""
    if dropout_p:
        raise UnsupportedAttention(f"flash-attn-4 has no attention dropout (dropout={dropout_p}): use attn_backend "
                                   "flash or sdpa, or set the model's attention_dropout to 0")
    kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": True}
    if window is not None:
        _require_no_gaps("flash4", window, cols, cu_seqlens, max_gapped_span)
        kwargs["window_size"] = (window - 1, 0)
    if softcap is not None:
        kwargs["softcap"] = softcap
    out, _lse = _flash4_varlen()(
        q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        **kwargs,
    )
    return out


def _torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None,
    dropout_p: float, window: int | None, cols: torch.Tensor | None, softcap: float | None,
    max_gapped_span: int | None = None,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` by its version's own signature:
    torch 2.10: (..., max_k, is_causal=False, return_aux=None): no scale, no window, no GQA;
    torch 2.11: (..., max_k, *, return_aux, scale, window_size): causal is window_size == (-1, 0);
    torch >= 2.12: 2.11's plus enable_gqa (and paged-cache arguments not used here).
    No version has dropout or softcap."""
    kernel = _torch_varlen()
    params = _params(kernel)
    version = f"torch {torch.__version__}'s varlen_attn"
    if dropout_p:
        raise UnsupportedAttention(f"{version} has no attention dropout (dropout={dropout_p}): install flash-attn, "
                                   "use attn_backend sdpa, or set the model's attention_dropout to 0")
    if softcap is not None:
        raise UnsupportedAttention(f"{version} has no logit soft-capping (softcap={softcap}): install flash-attn >= 2.6")
    kwargs: dict[str, Any] = {}
    if "window_size" in params:  # torch >= 2.11
        kwargs["scale"] = scale
        if window is not None:
            _require_no_gaps("torch", window, cols, cu_seqlens, max_gapped_span)
        kwargs["window_size"] = (-1, 0) if window is None else (window - 1, 0)  # a tuple: torch compares to (-1, 0)
    else:  # torch 2.10
        if window is not None:
            raise UnsupportedAttention(f"{version} has no sliding window: upgrade to torch >= 2.11, install flash-attn, "
                                       "or use attn_backend sdpa")
        kwargs["is_causal"] = True
        q = _fold_scale(q, scale)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _fold_scale(q: torch.Tensor, scale: float | None) -> torch.Tensor:
    """For a kernel without a scale parameter (it uses 1/sqrt(D)): q scaled so that q.k/sqrt(D) == q.k*scale."""
    default = q.shape[-1] ** -0.5
    if scale is None or math.isclose(scale, default, rel_tol=1e-12):
        return q
    return q * (scale / default)


def sdpa_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    *,
    dropout_p: float = 0.0,
    window: int | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference backend: one SDPA call per segment. Runs anywhere, backward included. A sliding
    ``window`` is a boolean mask over ``cols`` (original columns), so it is exact with elided tokens."""
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1:]} must run from 0 to the packed row's {q.shape[0]} tokens")
    if q.shape[1] != k.shape[1]:  # SDPA's enable_gqa needs torch >= 2.5; LLaVA's stack has 2.1
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if len(bounds) < 2:
        return q.new_zeros(q.shape)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # One split per tensor (its backward is one concatenation, where slicing would zero-fill a whole
    # row per segment), and 4-D (1, H, len, D) inputs: SDPA's fused kernels (flash on CPU and CUDA)
    # take only those; 3-D inputs fall back to the math kernel, which materializes every score.
    segments = zip(*(t.split(lengths) for t in (q, k, v)), (cols.split(lengths) if window is not None else lengths))
    outputs = []
    for qs, ks, vs, seg_cols in segments:
        seg = [t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs)]  # (1, H, len, D)
        if window is None:
            out = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, dropout_p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(*seg, attn_mask=_window_mask(seg_cols, window), scale=scale,
                                                 dropout_p=dropout_p)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _window_mask(cols: torch.Tensor, window: int) -> torch.Tensor:
    """(len, len) boolean mask of one segment: key j is visible to query i when j <= i and
    cols[i] - cols[j] < window (transformers' sliding window, counted in original columns)."""
    n = cols.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=cols.device).tril()
    return causal & (cols[:, None] - cols[None, :] < window)
