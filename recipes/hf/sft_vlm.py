"""Fine-tune a transformers VLM (any class `regate targets` lists under hf) with TRL's SFTTrainer and ReGATE.

Data: a JSON or JSONL file of TRL's vision prompt-completion records, image paths relative to
--image-root, e.g.
    {"images": ["coco/0001.jpg"],
     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]}],
     "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A red teapot."}]}]}
Loss on the completions only. The teacher pass sees each sample exactly as the trainer's collator
builds it (TRL's processor call), so the cache lines up with training by construction.

Run from the folder that holds this file (the teacher pass imports it as `sft_vlm`):

    # 1. teacher pass, once (the student's language model before multimodal training, text-only)
    REGATE_MODEL=$MODEL REGATE_DATA=$DATA REGATE_IMAGE_ROOT=$IMAGES \\
        regate score --target hf --teacher $TEACHER --out $CACHE -- --dataset sft_vlm:scoring_dataset --student $MODEL
    # 2. train (any accelerate / deepspeed launcher; the SFTConfig flags pass through)
    accelerate launch sft_vlm.py --model $MODEL --data $DATA --image-root $IMAGES --ref-cache $CACHE \\
        --output_dir runs/sft --bf16 True --per_device_train_batch_size 4 --learning_rate 1e-5 [--lora-rank 64]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from regate_plugin import ReGATEConfig, ReGATEEngine, RefCache
from regate_plugin.engine import SAMPLE_INDEX_KEY
from regate_plugin.patches import hf
from regate_plugin.patches.hf_trl import ReGATESFTTrainer
from regate_plugin.trainer import IndexedCollator, attach

SCORING_DATASET = "sft_vlm:scoring_dataset"  # what `regate score --dataset` names, and the cache's dataset id


@dataclass
class Options:
    model: str = field(metadata={"help": "the student: a folder or hub id with config, weights and processor"})
    data: str = field(metadata={"help": "JSON / JSONL of prompt-completion records with images"})
    image_root: str = field(default=".", metadata={"help": "folder the image paths are relative to"})
    ref_cache: str | None = field(default=None, metadata={"help": "the teacher pass's cache (none: packing only)"})
    keep_ratio: float = field(default=ReGATEConfig.keep_ratio, metadata={"help": "ReGATE: share kept on sparse steps"})
    warmup: int = field(default=ReGATEConfig.warmup, metadata={"help": "ReGATE: dense steps before the first cycle"})
    cycle: int = field(default=ReGATEConfig.cycle, metadata={"help": "ReGATE: steps per dense/sparse cycle"})
    dense_steps: int = field(default=ReGATEConfig.dense_steps, metadata={"help": "ReGATE: dense steps opening each cycle"})
    no_regate: bool = field(default=False, metadata={"help": "the dense baseline: TRL's own training, unchanged"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA on the language model's linear layers (0: full)"})


def load_records(data: str, image_root: str) -> datasets.Dataset:
    """The records, images decoded lazily (on access) from their paths under ``image_root``."""
    records = datasets.load_dataset("json", data_files=data, split="train")
    records = records.map(lambda r: {"images": [str(Path(image_root, p)) for p in r["images"]]})
    return records.cast_column("images", datasets.Sequence(datasets.Image()))


def collator(processor: Any) -> DataCollatorForVisionLanguageModeling:
    return DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)


class CollatedView:
    """Sample i as the trainer's collator builds it alone: 1-D ``input_ids`` and ``labels`` with the
    processor's visual placeholders expanded (what HFScoringSource needs)."""

    def __init__(self, records: datasets.Dataset, processor: Any) -> None:
        self.records, self.collate = records, collator(processor)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.collate([dict(self.records[index])])
        return {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}


def scoring_dataset() -> CollatedView:
    """For ``regate score --dataset sft_vlm:scoring_dataset``: REGATE_MODEL, REGATE_DATA, REGATE_IMAGE_ROOT."""
    missing = [k for k in ("REGATE_MODEL", "REGATE_DATA") if k not in os.environ]
    if missing:
        raise KeyError(f"set {' and '.join(missing)} (the student and the data of the training run)")
    records = load_records(os.environ["REGATE_DATA"], os.environ.get("REGATE_IMAGE_ROOT", "."))
    return CollatedView(records, AutoProcessor.from_pretrained(os.environ["REGATE_MODEL"]))


def lora(rank: int) -> Any:
    """LoRA on the language model's attention and MLP projections (the vision tower stays frozen)."""
    from peft import LoraConfig

    projections = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=rf".*(language_model|text_model).*\.({projections})")


def main(argv: list[str] | None = None) -> ReGATESFTTrainer:
    options, config = HfArgumentParser((Options, SFTConfig)).parse_args_into_dataclasses(args=argv)
    config.remove_unused_columns = False  # the sample index must reach the collator
    processor = AutoProcessor.from_pretrained(options.model)
    model = AutoModelForImageTextToText.from_pretrained(options.model, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    records = load_records(options.data, options.image_root)
    peft_config = lora(options.lora_rank) if options.lora_rank else None
    if options.no_regate:
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=config, train_dataset=records, processing_class=processor,
                             data_collator=collator(processor), peft_config=peft_config)
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        return trainer
    cache = None
    if options.ref_cache:  # refused here, before any step, if the data, processor or tokenizer changed
        source = hf.HFScoringSource(CollatedView(records, processor), options.model, SCORING_DATASET)
        cache = RefCache.open(options.ref_cache, expect=source.expected())
    schedule = ReGATEConfig(keep_ratio=options.keep_ratio, warmup=options.warmup, cycle=options.cycle,
                            dense_steps=options.dense_steps)
    engine = ReGATEEngine(schedule, cache)
    hf.enable(model, engine)  # before LoRA wraps it: the engine stays on the model underneath
    trainer = ReGATESFTTrainer(
        model=model, args=config, processing_class=processor, peft_config=peft_config,
        train_dataset=records.add_column(SAMPLE_INDEX_KEY, list(range(len(records)))),
        data_collator=IndexedCollator(collator(processor)),
    )
    attach(trainer, engine, resume_from=config.resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
