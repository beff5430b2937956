"""The benchmark's model: a random LLaVA built from configs (nothing downloaded), and its inputs as
``inputs_embeds`` (the vision tower bypassed: it costs the same in every mode)."""

from __future__ import annotations

import torch

from .cost import Shape
from .workloads import BOS_ID, EOS_ID, PAD_ID, Batch

EMBED_STD = 0.02  # LlamaConfig.initializer_range: the scale of the embedding rows at init


def build_model(shape: Shape, layers: int, max_positions: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A random LlavaForConditionalGeneration (tiny CLIP tower, never used), sdpa, train mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, max_positions),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_dropout=0.0,
        initializer_range=EMBED_STD,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=shape.vocab - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to(device)
    model.train()
    return model


def batch_embeddings(batch: Batch, embedding: torch.nn.Module, seed: int, index: int) -> torch.Tensor:
    """(B, L, h) inputs_embeds: embedding rows on text, random N(0, EMBED_STD) on visual positions."""
    weight = embedding.weight
    gen = torch.Generator(device=weight.device).manual_seed(seed * 1_000_003 + index)
    with torch.no_grad():
        text = embedding(batch.input_ids.to(weight.device))
        noise = torch.randn(text.shape, generator=gen, device=weight.device, dtype=torch.float32) * EMBED_STD
        visual = batch.visual_mask.to(weight.device).unsqueeze(-1)
        return torch.where(visual, noise.to(weight.dtype), text)
