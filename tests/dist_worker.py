"""One HF Trainer run with ReGATE on a tiny Llava, for the multi-process tests (run alone or by torchrun).

Writes OUT/rank{R}.json: every selection (step, sample ids, kept units) and the SHA-256 of the EMA
table after each step, and OUT/ema{R}.pt: the final table.
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import transformers

from regate_plugin import ReGATEConfig, ReGATEEngine, RefCache
from regate_plugin.collectives import close_process_group
from regate_plugin.patches import hf
from regate_plugin.trainer import IndexedCollator, IndexedDataset, attach
from tiny_hf import collate, tiny_model, tiny_samples

CONFIG = ReGATEConfig(warmup=2, cycle=4, dense_steps=1, keep_ratio=0.5)


class RecordingEngine(ReGATEEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selections, self.digests = [], []

    def plan(self, labels, attention_mask, sample_ids, position_ids=None):
        plan = super().plan(labels, attention_mask, sample_ids, position_ids)
        self.selections.append([self.step, plan.sample_ids.tolist(), plan.unit_keep.tolist()])
        return plan

    def end_step(self, group=None):
        stats = super().end_step(group)
        self.digests.append([stats.step, hashlib.sha256(self.ema.values.numpy().tobytes()).hexdigest()])
        return stats


class Slow(transformers.TrainerCallback):
    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--deepspeed")
    parser.add_argument("--resume")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--loss-chunk-rows", type=int, default=4096)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))

    model = tiny_model("llava", seed=0)
    if args.resume and not args.deepspeed:
        model = type(model).from_pretrained(args.resume, attn_implementation="sdpa").train()  # see test_hf_trainer
    engine = RecordingEngine(CONFIG.replace(loss_chunk_rows=args.loss_chunk_rows), RefCache.open(args.cache))
    hf.enable(model, engine)
    training = transformers.TrainingArguments(
        output_dir=str(args.out / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation, learning_rate=2e-3, logging_steps=1, save_strategy="steps",
        save_steps=args.save_steps, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        lr_scheduler_type="constant", disable_tqdm=True, deepspeed=args.deepspeed,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=IndexedDataset(tiny_samples("llava", 16, seed=3)),
        data_collator=IndexedCollator(lambda features: collate("llava", features)),
    )
    attach(trainer, engine)
    if args.step_sleep:
        trainer.add_callback(Slow(args.step_sleep))
    trainer.train(resume_from_checkpoint=args.resume)
    args.out.mkdir(parents=True, exist_ok=True)
    partitioned = any(hasattr(p, "ds_id") for p in model.lm_head.parameters())  # ZeRO-3 shards the LM head
    record = {"selections": engine.selections, "digests": engine.digests, "lm_head_partitioned": partitioned}
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.save(engine.ema.values, args.out / f"ema{rank}.pt")
    close_process_group()


if __name__ == "__main__":
    main()
