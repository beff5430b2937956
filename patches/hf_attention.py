"""The registry attention adapter (transformers >= 4.53): varlen attention inside the packed forward only.

Outside the packed training forward nothing changes: the config keeps the attention implementation
the user chose and every other call (evaluation, generation, forwards without labels) runs it
unchanged, eager included. The packed forward passes a ``PackedAttention`` under the keyword
``regate_packed``; it rides the layers' kwargs down to each attention module, so it is still there
when reentrant gradient checkpointing replays a layer in backward, outside our forward. A call that
carries it reads, for the duration of that call only, a copy of its config that names ``"regate"``
(the shared config is never changed), and the registry routes it to ``regate_attention``. The same
switch around the text model's own forward makes mask creation return no mask (segments come from
``cu_seqlens``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from regate_plugin.attention import UnsupportedAttention, varlen_attention

NAME = "regate"
PACKED_KEY = "regate_packed"
# Keywords transformers' attention modules pass that carry no attention semantics of their own.
_NO_SEMANTICS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "layer_idx"})


@dataclass(frozen=True)
class PackedAttention:
    """How one packed row splits into segments, on the model's device (``max_*`` are host ints).

    cu_seqlens: (S+1,) int32 segment bounds; cols: (T,) each token's column in its sample before
    elision (a sliding window counts those); max_span: the longest segment's span in columns;
    max_gapped_span: the longest among segments with elided columns (kernels window by packed position);
    routed: the configs that name ``"regate"``, one per config object of the model, made once per
    packed forward (``packed_config``) and reused by every layer, in forward and in recomputation.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cols: torch.Tensor
    max_span: int
    max_gapped_span: int
    backend: str
    routed: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)

    def routed_config(self, config: Any) -> Any:
        """A copy of ``config`` that reports ``"regate"`` as its attention implementation."""
        copied = self.routed.get(id(config))
        if copied is None or copied[0] is not config:
            routed = copy.copy(config)
            name = "_attn_implementation_internal" if "_attn_implementation_internal" in vars(config) else "_attn_implementation"
            setattr(routed, name, NAME)
            copied = self.routed[id(config)] = (config, routed)
        return copied[1]


@contextlib.contextmanager
def packed_config(module: torch.nn.Module, packed: PackedAttention) -> Iterator[None]:
    """For the duration, ``module`` reads ``packed``'s routed copy of its config. The config object
    itself, shared by every module of the model (and by the replicas of threads), is never changed:
    only this module's reference to it is swapped."""
    config = module.__dict__["config"]
    module.__dict__["config"] = packed.routed_config(config)
    try:
        yield
    finally:
        module.__dict__["config"] = config


def regate_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(1, H, T, D) packed q/k/v -> (1, T, H, D), causal within each segment of the packed row."""
    packed: PackedAttention | None = kwargs.pop(PACKED_KEY, None)
    name = type(module).__name__
    if packed is None:
        raise RuntimeError(f"{name} was routed to packed attention without a packing plan: report this as a bug")
    unknown = sorted(k for k, v in kwargs.items() if k not in _NO_SEMANTICS and v is not None)
    if unknown:
        raise UnsupportedAttention(
            f"{name} passes {unknown} to its attention; packed ReGATE attention cannot honour "
            f"{'it' if len(unknown) == 1 else 'them'}: train this model with hf.disable (dense, upstream attention)"
        )
    if not getattr(module, "is_causal", True):
        raise UnsupportedAttention(f"{name} is not causal; packed ReGATE attention is causal only")
    if attention_mask is not None:
        raise UnsupportedAttention(f"{name} received an attention mask in a packed forward; segments come from cu_seqlens")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        packed.cu_seqlens,
        packed.max_seqlen,
        scale=scaling,
        backend=packed.backend,
        dropout_p=dropout,
        window=sliding_window,
        cols=packed.cols,
        max_span=packed.max_span,
        max_gapped_span=packed.max_gapped_span,
        softcap=softcap,
    )
    return out.unsqueeze(0), None


def regate_mask(*args: Any, **kwargs: Any) -> None:
    """No mask: only the packed forward's text model reports ``"regate"``, and it has cu_seqlens."""
    return None


def _patch_attention_class(cls: type) -> bool:
    """Wrap ``cls.forward`` once: a call carrying ``regate_packed`` runs with the config switched.
    False when it already was."""
    if getattr(cls.forward, "_regate_original", None) is not None:
        return False
    original = cls.forward

    @functools.wraps(original)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        packed = kwargs.get(PACKED_KEY)
        if packed is None:
            return original(self, *args, **kwargs)
        with packed_config(self, packed):
            return original(self, *args, **kwargs)

    forward._regate_original = original
    cls.forward = forward
    return True


def install(text_model: torch.nn.Module) -> list[str]:
    """Register ``"regate"`` and give the attention classes of ``text_model`` the packed switch
    (idempotent). Returns the attention classes patched by this call."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, regate_attention)
    AttentionMaskInterface.register(NAME, regate_mask)
    classes = {type(layer.self_attn) for layer in text_model.layers}
    return sorted(cls.__name__ for cls in classes if _patch_attention_class(cls))
