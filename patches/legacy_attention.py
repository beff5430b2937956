"""The legacy attention shim (transformers 4.36-4.47: Llama, Mistral, Qwen2 before AttentionInterface).

Those versions cannot be told about packing: LlamaModel drops a 2-D mask without zeros and calls
plain ``flash_attn_func`` over the whole row. So the packed path runs the decoder layers itself and
hands each layer ``cu_seqlens`` (int32, 1-D) in the attention-mask slot. A positional argument, it
survives reentrant gradient checkpointing, which replays layers in backward outside our forward.
Each attention module's class becomes a subclass of the model's own flash-attention class whose
``_flash_attention_forward`` runs our varlen attention on a packed call; every other call (eval,
generation) goes to the class the module had, unchanged.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from regate_plugin.attention import varlen_attention

_max_seqlen: dict[int, int] = {}  # cu_seqlens storage address -> longest segment of the packed row
_backend = {"name": "auto"}


def is_packed(attention_mask: Any) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1 and attention_mask.dtype == torch.int32


class _PackedAttention:
    """Mixed in before the model's flash-attention class; see the module docstring."""

    _regate_shim = True
    _regate_flash_cls: type
    _regate_fallback_cls: type

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        cls = self._regate_flash_cls if is_packed(attention_mask) else self._regate_fallback_cls
        return cls.forward(self, hidden_states, attention_mask, *args, **kwargs)

    def _flash_attention_forward(self, query_states, key_states, value_states, attention_mask, query_length,
                                 dropout=0.0, softmax_scale=None, **kwargs):
        if not is_packed(attention_mask):
            return self._regate_flash_cls._flash_attention_forward(
                self, query_states, key_states, value_states, attention_mask, query_length,
                dropout=dropout, softmax_scale=softmax_scale, **kwargs,
            )
        if dropout:
            raise ValueError("packed ReGATE attention does not apply attention dropout: set attention_dropout=0")
        max_seqlen = _max_seqlen.get(attention_mask.data_ptr())
        if max_seqlen is None:
            max_seqlen = int(attention_mask.diff().max())
        out = varlen_attention(query_states[0], key_states[0], value_states[0], attention_mask, max_seqlen,
                               scale=softmax_scale, backend=_backend["name"])
        return out.unsqueeze(0)


class _FullTableRotary:
    """Old rotary modules return ``cos[:seq_len]`` with seq_len = the row's length; packed rows are
    shorter than their samples' original positions, so always return the whole cached table (it is
    indexed by position ids anyway)."""

    def forward(self, x, seq_len=None):
        return super().forward(x, seq_len=max(seq_len or 0, self.max_seq_len_cached))


def _flash_class(attention_cls: type) -> type:
    module = sys.modules[attention_cls.__module__]
    for name, value in vars(module).items():
        if name.endswith("_ATTENTION_CLASSES") and isinstance(value, dict) and "flash_attention_2" in value:
            return value["flash_attention_2"]
    raise TypeError(f"{attention_cls.__name__}: no flash-attention class in {module.__name__} to build on")


def install(text_model: torch.nn.Module, backend: str = "auto") -> None:
    """Give every attention module of ``text_model`` (a LlamaModel-like stack) the packed path. Idempotent."""
    _backend["name"] = backend
    for layer in text_model.layers:
        attention = layer.self_attn
        original = type(attention)
        if not getattr(original, "_regate_shim", False):
            flash = _flash_class(original)
            modeling = sys.modules[flash.__module__]
            if not hasattr(modeling, "_flash_supports_window_size"):  # set only when flash-attn imports
                modeling._flash_supports_window_size = False
            attention.__class__ = type(f"Regate{original.__name__}", (_PackedAttention, flash), {
                "_regate_flash_cls": flash, "_regate_fallback_cls": original,
            })
            if not hasattr(attention, "_flash_attn_uses_top_left_mask"):
                attention._flash_attn_uses_top_left_mask = False
        rotary = getattr(attention, "rotary_emb", None)
        if rotary is not None and "seq_len" in inspect.signature(rotary.forward).parameters and not isinstance(rotary, _FullTableRotary):
            rotary.__class__ = type(f"Regate{type(rotary).__name__}", (_FullTableRotary, type(rotary)), {})


def packed_decoder(text_model: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor,
                   cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """The decoder layers and final norm of ``text_model`` over one packed row (1, T, D)."""
    _max_seqlen.clear()
    _max_seqlen[cu_seqlens.data_ptr()] = max_seqlen
    checkpointing = getattr(text_model, "gradient_checkpointing", False) and text_model.training
    hidden = embeds
    for layer in text_model.layers:
        if checkpointing:  # the layer's positional arguments, as upstream's own loop passes them
            outputs = text_model._gradient_checkpointing_func(layer.__call__, hidden, cu_seqlens, position_ids, None, False, False)
        else:
            outputs = layer(hidden, attention_mask=cu_seqlens, position_ids=position_ids)
        hidden = outputs[0]
    return text_model.norm(hidden)
