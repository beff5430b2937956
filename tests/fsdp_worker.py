"""A few ReGATE steps of a tiny Llava under torch FSDP2 (``fully_shard``: what accelerate's FSDP2
applies), on CPU with gloo; alone (no sharding) it runs the same samples with gradient accumulation.

Each optimizer step takes samples 4s..4s+3 (mod 16): rank r of 2 trains 4s+2r and 4s+2r+1; one process
trains both pairs as two accumulated micro-batches. Writes OUT/rank{R}.json (every selection and
whether the decoder layers were sharded) and OUT/ema{R}.pt.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from regate_plugin import ReGATEConfig, RefCache
from regate_plugin.collectives import close_process_group
from regate_plugin.patches import hf
from dist_worker import RecordingEngine, write_rank_record
from tiny_hf import collate, tiny_model, tiny_samples

CONFIG = ReGATEConfig(warmup=1, cycle=2, dense_steps=1, keep_ratio=0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = tiny_model("llava", seed=0)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
    engine = RecordingEngine(CONFIG, RefCache.open(args.cache))
    hf.enable(model, engine)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    samples = tiny_samples("llava", 16, seed=3)
    pairs = [[2 * rank, 2 * rank + 1]] if world > 1 else [[0, 1], [2, 3]]
    for step in range(args.steps):
        engine.step = step
        for pair in pairs:
            ids = [(4 * step + i) % len(samples) for i in pair]  # a second epoch from step 4
            batch = collate("llava", [samples[i] for i in ids])
            loss = model(**batch, sample_index=torch.tensor(ids)).loss / len(pairs)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.end_step()
    sharded = isinstance(model.model.language_model.layers[0], getattr(torch.distributed.fsdp, "FSDPModule", ()))
    write_rank_record(args.out, rank, engine, sharded=sharded)
    close_process_group()


if __name__ == "__main__":
    main()
