"""The demo's models: a tiny Llama (teacher and backbone), a CLIP tower pre-trained on the pictures'
attributes, and the Llava student built from both."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import demo_task as task

PRETRAIN_STEPS = 250
PRETRAIN_BATCH = 64
PRETRAIN_SAMPLES = 4096
PRETRAIN_LR = 3e-3

VISION_STEPS = 250
VISION_BATCH = 64
VISION_LR = 3e-3

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)


def _configs(vocab: dict[str, int]):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size, pad_id, bos_id, eos_id, image_id = (len(vocab), vocab[task.PAD], vocab[task.BOS], vocab[task.EOS],
                                                    vocab[task.IMAGE])

    text = LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False, **TEXT)
    vision = CLIPVisionConfig(image_size=task.IMAGE_SIZE, patch_size=task.PATCH, **VISION)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                        image_seq_length=task.VISUAL_TOKENS, vision_feature_layer=-1,
                        vision_feature_select_strategy="default")
    return text, llava


def model_facts() -> dict[str, Any]:
    return {"text": dict(TEXT), "vision": {**VISION, "image_size": task.IMAGE_SIZE, "patch_size": task.PATCH},
            "visual_tokens": task.VISUAL_TOKENS, "vocab_size": len(task.vocabulary())}


def _lr(step: int, total: int, peak: float) -> float:
    return peak * min(1.0, (step + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * step / total))


def _fit(parameters, batch_loss: Callable[[], torch.Tensor], steps: int, peak_lr: float, desc: str, progress: bool) -> None:
    """AdamW with warmup and cosine decay over ``steps`` steps of ``batch_loss()``."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, peak_lr)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def pretrain_backbone(corpus: task.VQADataset, text_config, steps: int, seed: int, progress: bool):
    """The language model trained text-only on the task's text: the teacher and the student's backbone."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config)
    model.train()
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        indices = torch.randint(0, len(corpus), (PRETRAIN_BATCH,), generator=gen).tolist()
        return model(**corpus.text_batch(indices)).loss

    _fit(model.parameters(), batch_loss, steps, PRETRAIN_LR, "text pre-training", progress)
    return model.eval()


def _attribute_labels(scene: task.Scene) -> dict[str, int]:
    return {"color": list(task.COLORS).index(scene.color), "shape": task.SHAPES.index(scene.shape),
            "count": scene.count - 1, "corner": 2 * task.VERTICAL.index(scene.vertical) + task.HORIZONTAL.index(scene.horizontal)}


def pretrain_vision(pictures: task.VQADataset, vision_config, steps: int, seed: int, progress: bool):
    """The vision tower, pre-trained on pictures with their attributes as labels (linear heads on the
    mean of its patch features): the stand-in for the pre-trained CLIP encoder LLaVA starts from."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed + 1)
    tower = CLIPVisionModel(vision_config)
    tower.train()
    hidden = vision_config.hidden_size
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(hidden, len(task.COLORS)),
                                 "shape": torch.nn.Linear(hidden, len(task.SHAPES)),
                                 "count": torch.nn.Linear(hidden, len(task.COUNTS)), "corner": torch.nn.Linear(hidden, 4)})
    labels = {name: torch.tensor([_attribute_labels(s)[name] for s in pictures.scenes]) for name in heads}
    gen = torch.Generator().manual_seed(seed + 1)

    def batch_loss() -> torch.Tensor:
        indices = torch.randint(0, len(pictures), (VISION_BATCH,), generator=gen)
        pixels = torch.stack([pictures.pixel_values(int(i)) for i in indices])
        pooled = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:].mean(1)
        return sum(torch.nn.functional.cross_entropy(head(pooled), labels[name][indices]) for name, head in heads.items())

    _fit([*tower.parameters(), *heads.parameters()], batch_loss, steps, VISION_LR, "vision pre-training", progress)
    return tower.eval()


def build_student(backbone, tower, llava_config, seed: int):
    """A Llava from the pre-trained backbone and vision tower, with a fresh projector."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed + 2)
    model = LlavaForConditionalGeneration(llava_config)
    model.model.language_model.load_state_dict(backbone.model.state_dict())
    model.lm_head.load_state_dict(backbone.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(tower.state_dict())
    return model
