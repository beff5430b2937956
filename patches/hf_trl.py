"""TRL's ``SFTTrainer`` (trl >= 1.0) with ReGATE: the training loss comes from the packed forward.

TRL's own training loss does not call the model's forward with labels: it puts a fused LM head on
the model instance and runs the backbone directly, so the packed training forward would never run
(a silent dense run). ``ReGATESFTTrainer`` computes the training loss as transformers' ``Trainer``
does (the model called with its labels), which is ReGATE's packed forward once ``hf.enable`` is on.
Evaluation, and training without an engine, stay TRL's. TRL's per-step token metrics
(``entropy``, ``mean_token_accuracy``, ``num_tokens``) need full logits and are not logged on
ReGATE's training steps; ReGATE logs its own token counts.

    model = hf.enable(model, engine)
    trainer = ReGATESFTTrainer(model=model, args=SFTConfig(..., remove_unused_columns=False),
                               train_dataset=dataset.add_column("sample_index", list(range(len(dataset)))),
                               processing_class=processor,
                               data_collator=IndexedCollator(DataCollatorForVisionLanguageModeling(processor, ...)))
    attach(trainer, engine)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer
from trl import SFTTrainer

from regate_plugin.trainer import IndexedCollator

from .upstream import engine_of, student


class ReGATESFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose training loss is ReGATE's packed forward when ``hf.enable`` is on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("ReGATESFTTrainer needs SFTConfig(remove_unused_columns=False): the sample index must reach the collator")
        if not isinstance(self.data_collator, IndexedCollator):
            raise TypeError("wrap the collator in regate_plugin.trainer.IndexedCollator (and the dataset in IndexedDataset)")

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not model.training or engine_of(student(model)) is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
