"""The registry attention adapter (transformers >= 4.53): our varlen attention as ``"regate"``.

Registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` and set on the text
model only. A call that carries ``cu_seq_lens_q`` is a packed ReGATE forward and runs
``varlen_attention``; any other call (evaluation, generation) goes to the implementation the text
model had before, so those paths are untouched. The decision rides on the call's own kwargs, so it
holds when reentrant gradient checkpointing replays a layer in backward, outside our forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

from regate_plugin.attention import varlen_attention

NAME = "regate"
_packed_forward = contextvars.ContextVar("regate_packed_forward", default=False)
_fallback: dict[int, str] = {}  # id(text config) -> the attention implementation it had before
_backend = {"name": "auto"}


def _fallback_name(config: Any) -> str:
    name = _fallback.get(id(config), "sdpa")
    return "sdpa" if name == "eager" else name  # eager is model-local, not in the registry; sdpa matches it


def regate_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(1, H, T, D) packed q/k/v -> (1, T, H, D) over segments given by ``cu_seq_lens_q``."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fallback = ALL_ATTENTION_FUNCTIONS[_fallback_name(module.config)]
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens,
        kwargs["max_length_q"],
        scale=scaling,
        backend=_backend["name"],
    )
    return out.unsqueeze(0), None


def regate_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """No mask for a packed forward (segments come from cu_seqlens); the old one's mask otherwise."""
    if _packed_forward.get():
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[_fallback_name(config)](*args, config=config, **kwargs)


@contextlib.contextmanager
def packed_forward() -> Iterator[None]:
    """Marks the dynamic extent of a packed language-model call (mask creation reads it)."""
    token = _packed_forward.set(True)
    try:
        yield
    finally:
        _packed_forward.reset(token)


def install(text_model: torch.nn.Module, backend: str) -> None:
    """Register ``"regate"`` and make it the attention of ``text_model`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, regate_attention)
    AttentionMaskInterface.register(NAME, regate_mask)
    _backend["name"] = backend
    config = text_model.config
    if config._attn_implementation != NAME:
        _fallback[id(config)] = config._attn_implementation or "sdpa"
        config._attn_implementation = NAME
    for sub in text_model.modules():  # some versions cache the name on modules
        if getattr(sub, "_attn_implementation", NAME) != NAME:
            sub._attn_implementation = NAME
