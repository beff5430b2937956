"""The legacy attention shim (transformers 4.36-4.47: Llama, Mistral, Qwen2 before AttentionInterface).

Those versions cannot be told about packing: LlamaModel drops a 2-D mask without zeros and calls
plain ``flash_attn_func`` over the whole row. So the packed path runs the decoder layers itself and
hands each layer ``cu_seqlens`` (int32, 1-D) in the attention-mask slot. A positional argument, it
survives reentrant gradient checkpointing, which replays layers in backward outside our forward.
Each attention module's class becomes a subclass of the model's own flash-attention class whose
``_flash_attention_forward`` runs our varlen attention on a packed call; every other call (eval,
generation) goes to the class the module had, unchanged.

A packed call honours what the model's flash path would do with each sample alone, or refuses:
attention dropout goes to the kernel; a sliding window (``flash_window``) is counted in the tokens'
original columns, so elided tokens do not widen it; any other keyword is refused by name.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from regate_plugin.attention import UnsupportedAttention, segment_max_span, varlen_attention


@dataclass(frozen=True)
class _Row:
    """What every layer's attention needs to know about the packed row beyond cu_seqlens."""

    max_seqlen: int
    cols: torch.Tensor | None  # (T,) each token's column in its sample
    max_span: int | None
    max_gapped_span: int | None


_rows: dict[int, _Row] = {}  # cu_seqlens storage address -> the packed row it bounds
_backend = {"name": "auto"}
_WINDOW_FLAG = "use_sliding_windows"  # upstream's per-call switch; the window itself comes from the config


def flash_window(config: Any, layer_idx: int | None) -> int | None:
    """Keys a query sees, itself included, on the model's own flash-attention path of transformers
    4.36-4.42, None for no window: those pass ``window_size=(W, W)`` with ``causal=True``, W+1 keys
    (Mistral: ``sliding_window``; Qwen2: only with ``use_sliding_window``, in layers below
    ``max_window_layers``). Their eager/SDPA masks differ by a key across versions; flash is what
    upstream's training scripts run."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    max_layers = getattr(config, "max_window_layers", None)
    if max_layers is not None and layer_idx is not None and layer_idx >= max_layers:
        return None
    return int(window) + 1


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
        # The window flag is decided per call from the padded row's length; the sample's own window is
        # flash_window's, applied below from the config.
        unknown = sorted(name for name, value in kwargs.items() if name != _WINDOW_FLAG and value is not None)
        if unknown:
            raise UnsupportedAttention(
                f"{type(self).__name__} passes {unknown} to its flash attention; packed ReGATE attention cannot "
                "honour it: run with --no-regate"
            )
        row = _rows.get(attention_mask.data_ptr()) or _Row(int(attention_mask.diff().max()), None, None, None)
        out = varlen_attention(query_states[0], key_states[0], value_states[0], attention_mask, row.max_seqlen,
                               scale=softmax_scale, backend=_backend["name"], dropout_p=dropout,
                               window=flash_window(self.config, getattr(self, "layer_idx", None)), cols=row.cols,
                               max_span=row.max_span, max_gapped_span=row.max_gapped_span)
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
                   cu_seqlens: torch.Tensor, max_seqlen: int, max_span: int | None = None,
                   max_gapped_span: int | None = None) -> torch.Tensor:
    """The decoder layers and final norm of ``text_model`` over one packed row (1, T, D).

    position_ids (1, T) are each token's column in its sample (these stacks number the tokens of a
    sample 0..n-1), which a sliding window counts; ``max_span``, the longest segment's span in them,
    is a host int: pass it from the host plan, or it is read from the device here; ``max_gapped_span``
    likewise (see ``segment_gapped_span``), or each windowed kernel layer reads it from the device.
    """
    cols = position_ids[0]
    if max_span is None:
        max_span = segment_max_span(cols, cu_seqlens)
    _rows.clear()
    _rows[cu_seqlens.data_ptr()] = _Row(max_seqlen, cols, max_span, max_gapped_span)
    checkpointing = getattr(text_model, "gradient_checkpointing", False) and text_model.training
    hidden = embeds
    for layer in text_model.layers:
        if checkpointing:  # the layer's positional arguments, as upstream's own loop passes them
            outputs = text_model._gradient_checkpointing_func(layer.__call__, hidden, cu_seqlens, position_ids, None, False, False)
        else:
            outputs = layer(hidden, attention_mask=cu_seqlens, position_ids=position_ids)
        hidden = outputs[0]
    return text_model.norm(hidden)
