"""The hf target's adapter table: what differs per transformers class, as data and small functions.

Every supported class runs its own vision encoding and multimodal merge, then calls its text model
once with the merged embeddings; ``patches.hf`` intercepts that call. What differs between classes
is where the text model and the LM head are, which text-model keywords carry per-position side inputs
that must be packed with the tokens (Qwen3-VL's deepstack features), and what the packed path cannot
train (a reason to refuse). Adding a class is one ``Adapter`` entry and its tests (``tests/tiny_hf.py``
builds each class tiny; ``tests/test_hf*.py`` are parametrized over ``KINDS`` there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from regate_plugin.packing import Packed, pack

SideInputs = Callable[[dict[str, Any], Packed], dict[str, Any]]


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.model.language_model``: where most multimodal classes keep their text model."""
    return model.model.language_model


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.model.text_model``: Idefics3's name for it."""
    return model.model.text_model


def no_side_inputs(kwargs: dict[str, Any], packed: Packed) -> dict[str, Any]:
    """Classes whose text model takes only embeddings, mask and positions."""
    return kwargs


def pack_deepstack(kwargs: dict[str, Any], packed: Packed) -> dict[str, Any]:
    """Qwen3-VL adds visual features to the first decoder layers' outputs at the visual positions
    (``visual_pos_masks`` (B, L), ``deepstack_visual_embeds``: per layer, one row per visual position
    in row-major order). Packed, the mask becomes (1, T) and each layer's rows follow the kept
    visual positions, so every feature still lands on its own token."""
    mask = kwargs.get("visual_pos_masks")
    if mask is None:
        return kwargs
    rank = mask.flatten().long().cumsum(0) - 1  # row of each visual position in the features
    kept = pack(mask, packed)[0]
    rows = rank[packed.index][kept]
    embeds = kwargs.get("deepstack_visual_embeds")
    return {
        **kwargs,
        "visual_pos_masks": kept[None],
        "deepstack_visual_embeds": None if embeds is None else [layer[rows] for layer in embeds],
    }


def never(model: torch.nn.Module) -> str | None:
    return None


def bidirectional_image_blocks(model: torch.nn.Module) -> str | None:
    """Gemma3 attends bidirectionally inside each image block (and through sliding windows around
    it); the packed varlen attention is causal per sample, so training it packed would silently
    change the model. Refused until the varlen path carries a block mask."""
    return (
        f"{type(model).__name__} attends bidirectionally within each image block (token_type_ids); ReGATE's "
        "packed varlen attention is causal only and would train a different model: train it without "
        "hf.enable (dense, upstream attention)"
    )


@dataclass(frozen=True)
class Adapter:
    """One supported class.

    cls: the class name, matched anywhere in the model's MRO; family: the docs' name for it;
    transformers: the range it is supported and tested on; text_model / lm_head: where they are;
    side_inputs: packs the text-model keywords that hold per-position inputs besides embeddings,
    mask and positions; refuse: a reason the packed path cannot train this model, or None;
    tests: how it is tested (``regate targets`` and the docs' class table print it).
    """

    cls: str
    family: str
    transformers: str = ">=4.53"
    text_model: Callable[[torch.nn.Module], torch.nn.Module] = language_model
    lm_head: Callable[[torch.nn.Module], torch.nn.Module] = field(default=lambda model: model.lm_head)
    side_inputs: SideInputs = no_side_inputs
    side_keys: tuple[str, ...] = ()
    refuse: Callable[[torch.nn.Module], str | None] = never
    tests: str = "dense==upstream (2 padding x checkpointing cases), sparse==deletion, teacher alignment, eval/generate"


FULL_GRID = "dense==upstream (6 padding x checkpointing cases), sparse==deletion, teacher alignment, eval/generate"
ADAPTERS: tuple[Adapter, ...] = (
    Adapter("LlavaForConditionalGeneration", "LLaVA-1.5 (HF)",
            tests=FULL_GRID + ", HF Trainer resume, TRL SFTTrainer, FSDP2 2 ranks == 1, ZeRO-2/3"),
    Adapter("LlavaNextVideoForConditionalGeneration", "LLaVA-NeXT-Video", tests=FULL_GRID),
    Adapter("LlavaOnevisionForConditionalGeneration", "LLaVA-OneVision (anyres, video)"),
    Adapter("Qwen2VLForConditionalGeneration", "Qwen2-VL (M-RoPE)"),
    Adapter("Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL (M-RoPE)", tests=FULL_GRID + ", sliding window"),
    Adapter(
        "Qwen3VLForConditionalGeneration", "Qwen3-VL (M-RoPE, deepstack)", transformers=">=4.57",
        side_inputs=pack_deepstack, side_keys=("visual_pos_masks", "deepstack_visual_embeds"),
        tests=Adapter.tests + ", unpacked deepstack refused",
    ),
    Adapter(
        "Qwen3VLMoeForConditionalGeneration", "Qwen3-VL-MoE (router aux loss refused)", transformers=">=4.57",
        side_inputs=pack_deepstack, side_keys=("visual_pos_masks", "deepstack_visual_embeds"),
        tests=Adapter.tests + ", router-loss refusal",
    ),
    Adapter("InternVLForConditionalGeneration", "InternVL3 / InternVL3.5 (HF format)"),
    Adapter("Idefics3ForConditionalGeneration", "Idefics3", text_model=text_model),
    Adapter("SmolVLMForConditionalGeneration", "SmolVLM / SmolVLM2", text_model=text_model),
    Adapter(
        "Gemma3ForConditionalGeneration", "Gemma 3 (refused: bidirectional image blocks)",
        refuse=bidirectional_image_blocks, tests="refusal with the reason",
    ),
)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The table's entry for ``model``'s class (or a base class of it); TypeError names the supported ones."""
    by_name = {adapter.cls: adapter for adapter in ADAPTERS}
    for base in type(model).__mro__:
        if base.__name__ in by_name:
            return by_name[base.__name__]
    names = ", ".join(adapter.cls for adapter in ADAPTERS if adapter.refuse is never)
    raise TypeError(f"{type(model).__name__} is not supported by the hf target; supported: {names}")
