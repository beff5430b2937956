"""The teacher pass: reference losses of every supervised unit, written to a cache once per dataset.

The teacher is the student's own language model before multimodal training, frozen and text-only.
A target supplies a ``ScoringSource`` whose ``text_only(i)`` is sample ``i`` exactly as the student's
language model will see it after the multimodal merge (same length, positions, truncation and chat
template) with every visual token replaced by the pad token; the target builds it with its own
preprocessing code, so the alignment holds by construction.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .loss import kept_token_loss
from .refcache import Fingerprint, RefCache, RefCacheWriter, Shard, sha256_json, to_fp16_losses
from .units import IGNORE_INDEX, find_units


class ScoringSource(Protocol):
    """What a target provides for the teacher pass."""

    fingerprint: Fingerprint
    pad_token_id: int
    tokenizer_fingerprint: str  # the student's, checked against the teacher's before any compute

    def __len__(self) -> int: ...

    def text_only(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of sample ``index`` as the student's LLM sees them, visual tokens -> pad."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text, with the student's tokenizer."""
        ...

    def load_tokenizer(self, path: str):
        """A tokenizer from ``path``, loaded as the target loads the student's (to compare the teacher's)."""
        ...


class TokenizerMismatch(ValueError):
    """The teacher's tokenizer differs from the student's: its losses would score other tokens."""


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, added tokens included: the token ids mean the same text exactly when
    it matches. (Which token serves as padding is a training-script choice, not part of it.)"""
    return sha256_json(sorted(tokenizer.get_vocab().items()))[:16]


def check_tokenizers(student_fingerprint: str, teacher_tokenizer, teacher: str) -> None:
    found = tokenizer_fingerprint(teacher_tokenizer)
    if found != student_fingerprint:
        raise TokenizerMismatch(
            f"the teacher at {teacher} has another tokenizer (fingerprint {found}) than the student "
            f"({student_fingerprint}): use the student's own language model before multimodal training "
            "as the teacher, or a model of the same family with the identical vocabulary"
        )


def dataset_probe(text_only, num_samples: int, probes: int = 64) -> str:
    """Hash of the text-only token ids and labels of up to ``probes`` evenly spaced samples.

    Cheap enough to recompute when training starts, and it changes with any edit that touches
    most samples (another chat template, tokenizer, truncation or visual-token count).
    """
    picks = sorted({round(i * (num_samples - 1) / max(probes - 1, 1)) for i in range(min(probes, num_samples))})
    return sha256_json([[t.tolist() for t in text_only(i)] for i in picks])[:16]


def teacher_fingerprint(teacher: str | os.PathLike) -> str:
    """Hash of the teacher's config and weight files (names and sizes): cheap, and changes with the weights."""
    path = Path(teacher)
    if not path.is_dir():
        return str(teacher)
    files = sorted(
        (p.name, p.stat().st_size) for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pt")
    )
    return sha256_json(files)[:16]


@torch.no_grad()
def teacher_unit_losses(
    teacher: torch.nn.Module, samples: list[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int, chunk_rows: int = 4096
) -> list[torch.Tensor]:
    """Per-sample reference losses (float32, one per supervised unit) from one right-padded batch.

    Only the supervised rows go through the LM head, so no (B, L, vocab) logits are ever built.
    """
    device = next(teacher.parameters()).device
    length = max(ids.numel() for ids, _ in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, (ids, lab) in enumerate(samples):
        input_ids[b, : ids.numel()], labels[b, : lab.numel()], mask[b, : ids.numel()] = ids, lab, 1
    units = find_units(labels, mask)
    base = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.base_model
    hidden = base(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    rows = (units.row * length + units.col).to(device)
    targets = labels[units.row, units.col + 1].to(device)
    _, per_unit = kept_token_loss(hidden, teacher.get_output_embeddings(), rows, targets, chunk_rows)
    return list(per_unit.cpu().split(units.counts.tolist()))


def _shard_batches(source: ScoringSource, shard: Shard, batch_size: int):
    """A shard's samples in batches of similar length (less padding), in a fixed order: the same
    shard always gives the same batches, whichever rank scores it, so the bytes match."""
    items = {i: source.text_only(i) for i in range(shard.start, shard.stop)}
    order = sorted(items, key=lambda i: (items[i][0].numel(), i))
    for k in range(0, len(order), batch_size):
        batch = order[k : k + batch_size]
        yield batch, [items[i] for i in batch]


def score_dataset(
    source: ScoringSource,
    teacher: torch.nn.Module,
    out: str | os.PathLike,
    batch_size: int = 8,
    shard_size: int = 1024,
    progress: bool = True,
) -> RefCache | None:
    """Build the cache at ``out``; under torch.distributed each rank scores shards rank, rank+W, ...

    Resumable: shards already on disk are skipped. Rank 0 merges once every rank is done and
    returns the cache (other ranks return None).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    writer = RefCacheWriter(out, source.fingerprint, len(source), shard_size)
    pending = writer.pending(rank, world)
    bar = tqdm(
        total=sum(s.stop - s.start for s in pending), unit="sample", disable=not progress or rank != 0,
        desc=f"teacher pass (rank {rank}/{world})" if world > 1 else "teacher pass",
    )
    start, tokens = time.perf_counter(), 0
    for shard in pending:
        losses: dict[int, torch.Tensor] = {}
        for batch, samples in _shard_batches(source, shard, batch_size):
            losses.update(zip(batch, teacher_unit_losses(teacher, samples, source.pad_token_id)))
            tokens += sum(ids.numel() for ids, _ in samples)
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):,.0f}", refresh=False)
        writer.write_shard(shard, [losses[i] for i in range(shard.start, shard.stop)])
    bar.close()
    if distributed:
        dist.barrier()
    return writer.finalize() if rank == 0 else None


def load_teacher(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher: a causal LM loaded from ``path`` (transformers' AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.requires_grad_(False)
    return model.eval().to(device)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun or deepspeed launchers; (0, 1, best device) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)


class OnlineRefCache:
    """Reference losses computed the first time training meets a sample, then kept in memory.

    For data that changes too often to precompute. Costs: the teacher's weights stay on the device
    (as large as the student's language model: ~14 GB in bf16 for 7B, per rank), one no-grad
    teacher forward per new sample, and 2 bytes per unit on the host. Unit counts come from a
    tokenization pass over the text-only samples when it is built. Drop-in for ``RefCache`` in
    ``ReGATEEngine``, which shares newly computed losses across ranks at each step's end.
    """

    def __init__(self, source: ScoringSource, teacher: torch.nn.Module, batch_size: int = 8, progress: bool = True) -> None:
        self.source = source
        self.teacher = teacher
        self.batch_size = batch_size
        self.fingerprint = source.fingerprint
        counts = [
            int(find_units(source.text_only(i)[1][None]).counts[0])
            for i in tqdm(range(len(source)), desc="counting supervised tokens", unit="sample", disable=not progress)
        ]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.losses = np.full(int(self.offsets[-1]), np.nan, dtype=np.float16)

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_units(self) -> int:
        return len(self.losses)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def offsets_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.offsets.copy())

    def all_losses(self) -> torch.Tensor:
        return torch.from_numpy(self.losses.astype(np.float32))

    def lookup(self, flat_index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.losses[flat_index.cpu().numpy()].astype(np.float32))

    def ensure(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the samples never seen before; returns their (flat index, loss) pairs."""
        new = [
            s for s in sorted(set(sample_ids.tolist()))
            if self.offsets[s + 1] > self.offsets[s] and np.isnan(self.losses[self.offsets[s]])
        ]
        for k in range(0, len(new), self.batch_size):
            batch = new[k : k + self.batch_size]
            per_sample = teacher_unit_losses(self.teacher, [self.source.text_only(s) for s in batch], self.source.pad_token_id)
            for s, values in zip(batch, per_sample):
                self.losses[self.offsets[s] : self.offsets[s + 1]] = to_fp16_losses(values, f"sample {s}")
        index = torch.cat([torch.arange(int(self.offsets[s]), int(self.offsets[s + 1])) for s in new]) if new else torch.zeros(0, dtype=torch.long)
        return index, self.lookup(index)

    def fill(self, flat_index: torch.Tensor, values: torch.Tensor) -> None:
        """Take losses another rank computed."""
        self.losses[flat_index.numpy()] = values.numpy().astype(np.float16)
