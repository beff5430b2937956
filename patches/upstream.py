"""What the targets that patch a LLaVA-family training script share (``llava``, ``videollama2``):
wrapping upstream methods once, sample indices through dataset and collator, the in-process
launch, and the packed training forward after upstream's own multimodal merge."""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any, Callable

import torch

from regate_plugin.engine import SAMPLE_INDEX_KEY, ReGATEEngine, StepPlan
from regate_plugin.packing import pack

from . import legacy_attention


def wrap(cls: type, name: str, replacement: Callable[..., Any]) -> None:
    """Replace ``cls.name`` by ``replacement(self, original, ...)``, once."""
    original = getattr(cls, name)
    if getattr(original, "_regate_original", None) is not None:
        return

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return replacement(self, original, *args, **kwargs)

    patched._regate_original = original
    setattr(cls, name, patched)


def getitem_with_index(self, original, index):
    """Dataset ``__getitem__`` that records the index. If upstream falls back to another sample
    (a recursive ``__getitem__``), the inner call already recorded the index that produced it."""
    item = original(self, index)
    item.setdefault(SAMPLE_INDEX_KEY, index)
    return item


def collate_with_index(self, original, instances):
    """Collator ``__call__`` that strips the indices from the samples and stacks them into the batch."""
    indices = [int(instance[SAMPLE_INDEX_KEY]) for instance in instances]
    batch = original(self, [{k: v for k, v in i.items() if k != SAMPLE_INDEX_KEY} for i in instances])
    batch[SAMPLE_INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
    return batch


def shim_init(run: dict[str, Any]) -> Callable[..., None]:
    """Model ``__init__`` replacement: upstream's, then the legacy attention shim on its decoder."""

    def init(self, original, *args, **kwargs):
        original(self, *args, **kwargs)
        legacy_attention.install(self.model, run["config"].attn_backend)

    return init


def launch_train(train: Callable[[str], None], args: list[str], attn_implementation: str | None) -> None:
    """Call upstream's ``train(attn_implementation)`` on its command-line ``args``, in this process."""
    if attn_implementation is None:  # upstream's scripts pass flash_attention_2, which needs flash-attn
        attn_implementation = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    sys.argv = [sys.argv[0], *args]
    train(attn_implementation)


def packed_loss(model: torch.nn.Module, engine: ReGATEEngine, embeds: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None, sample_index: Any, position_ids: torch.Tensor | None = None,
                check: Callable[[StepPlan], None] | None = None) -> Any:
    """The training forward after upstream's merge: plan, pack, decoder layers through the shim, loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plan = engine.plan(labels, attention_mask, sample_index, position_ids)
    if check is not None:
        check(plan)
    packed = plan.packed
    hidden = legacy_attention.packed_decoder(model.model, pack(embeds, packed), packed.position_ids, packed.cu_seqlens,
                                             packed.max_seqlen)
    return CausalLMOutputWithPast(loss=engine.loss(plan, hidden, model.lm_head))
