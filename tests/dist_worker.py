"""One HF Trainer run with ReGATE on a tiny Llava, for the multi-process tests (run alone or by torchrun).

Writes OUT/rank{R}.json: every selection (step, sample ids, kept units) and the SHA-256 of the EMA
and word-progress tables after each step, and OUT/ema{R}.pt: the final table.
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
from regate_plugin.words import WordProgress
from tiny_hf import collate, tiny_model, tiny_samples

# the learnable score keeps the word table, so every rank's copy is checked too
CONFIG = ReGATEConfig(warmup=2, cycle=4, dense_steps=1, keep_ratio=0.5, score="learnable")
# observations a word's progress averages over: short, so that within 8 steps words are known (the
# answers' eos above all) and the table changes selections
WORD_WINDOW = 4


class RecordingEngine(ReGATEEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selections, self.digests = [], []
        if self.words is not None:
            self.words = WordProgress(beta=1.0 - 1.0 / WORD_WINDOW)

    def plan(self, *args, **kwargs):
        plan = super().plan(*args, **kwargs)
        self.selections.append([self.step, plan.sample_ids.tolist(), plan.unit_keep.tolist()])
        return plan

    def end_step(self, group=None, **guard):
        stats = super().end_step(group, **guard)
        words = () if self.words is None else (self.words.student, self.words.teacher, self.words.count)
        tables = (self.ema.values, *words)
        self.digests.append([stats.step, hashlib.sha256(b"".join(t.numpy().tobytes() for t in tables)).hexdigest()])
        return stats


def write_rank_record(out, rank, engine, **facts):
    """What the test compares across runs: this rank's selections, digests and EMA table, plus ``facts``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"selections": engine.selections, "digests": engine.digests, **facts}))
    torch.save(engine.ema.values, out / f"ema{rank}.pt")


def by_step(records):
    """Every rank's (samples, kept units) per optimizer step, order-free."""
    steps = {}
    for record in records:
        for step, samples, keep in record["selections"]:
            steps.setdefault(step, []).append((samples, keep))
    return {step: sorted(selections) for step, selections in steps.items()}


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
    parser.add_argument("--score", default=CONFIG.score)
    parser.add_argument("--keep-ratio", default=CONFIG.keep_ratio, type=lambda v: v if v == "auto" else float(v))
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))

    model = tiny_model("llava", seed=0)
    if args.resume and not args.deepspeed:
        model = type(model).from_pretrained(args.resume, attn_implementation="sdpa").train()  # see test_hf_trainer
    engine = RecordingEngine(CONFIG.replace(loss_chunk_rows=args.loss_chunk_rows, score=args.score,
                                            keep_ratio=args.keep_ratio), RefCache.open(args.cache))
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
    partitioned = any(hasattr(p, "ds_id") for p in model.lm_head.parameters())  # ZeRO-3 shards the LM head
    write_rank_record(args.out, rank, engine, lm_head_partitioned=partitioned,
                      auto_decisions=None if engine.budget is None else engine.budget.decisions)
    close_process_group()


if __name__ == "__main__":
    main()
