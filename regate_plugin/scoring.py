"""The teacher pass: reference losses of every supervised unit, written to a cache once per dataset.

The teacher is the student's own language model before multimodal training, frozen and text-only.
A target supplies a ``ScoringSource`` whose ``context(i)`` is sample ``i`` exactly as the student's
language model will see it after the multimodal merge (same length, positions, truncation and chat
template) with every visual position holding ``identity.VISUAL_MARKER``; the target builds it with
its own preprocessing code, so the alignment holds by construction. The teacher reads it with the
pad token at the visual positions (``text_only(i)``); the cache records each sample's digest of its
context and targets (``identity.sample_digests``), which training recomputes per micro-batch.
"""

from __future__ import annotations

import abc
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .identity import (
    VISUAL_MARKER,
    CacheMismatchError,
    CorruptCacheError,
    Fingerprint,
    RefCacheError,
    SampleDigests,
    sample_digests,
    sha256_json,
)
from .loss import kept_token_loss
from .once import computed_once
from .refcache import RefCache, RefCacheWriter, Shard, to_fp16_losses
from .teacher import teacher_fingerprint
from .units import IGNORE_INDEX, find_units


class ScoringSource(Protocol):
    """What a target provides for the teacher pass."""

    fingerprint: Fingerprint  # samples included: computing it scans the whole dataset
    samples: SampleDigests  # every sample's unit count and digest (context and targets)
    pad_token_id: int
    tokenizer_fingerprint: str  # the student's, checked against the teacher's before any compute

    def __len__(self) -> int: ...

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids, labels) of sample ``index`` as the student's LLM sees them, visual positions
        holding ``VISUAL_MARKER``: what the sample's digest covers."""
        ...

    def text_only(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of sample ``index`` as the teacher reads them: ``context`` with the
        visual positions -> pad."""
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


def sample_digest(context_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """``identity.sample_digests`` of one sample's 1-D context ids and labels (no padding)."""
    return int(sample_digests(context_ids[None], labels[None], find_units(labels[None]))[0])


def unmark_visual(context_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The teacher's input ids from context ids: the pad token at every visual position."""
    return context_ids.masked_fill(context_ids == VISUAL_MARKER, pad_token_id)


def scan_samples(context: Callable[[int], tuple[torch.Tensor, torch.Tensor]], num_samples: int) -> SampleDigests:
    """Unit count and digest (context and targets) of every sample: a tokenization pass, no teacher."""
    counts = np.zeros(num_samples, dtype=np.int64)
    digests = np.zeros(num_samples, dtype=np.uint64)
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"  # one bar per node under torchrun; on a terminal only
    for i in tqdm(range(num_samples), desc="checking samples", unit="sample", disable=True if quiet else None):
        ids, labels = context(i)
        units = find_units(labels[None])
        counts[i], digests[i] = int(units.counts[0]), sample_digests(ids[None], labels[None], units)[0]
    return SampleDigests(counts, digests)


class FingerprintedSource(abc.ABC):
    """What every target's ScoringSource shares: the full-dataset scan and the fingerprint covering
    it, both computed on first use, so a training run that checks only ``fields`` never pays for them.
    Under torchrun each is computed once per node and shared (``once.computed_once``): every rank
    must ask for it, in the same order.

    A subclass sets ``fields`` (dataset, tokenizer, visual_tokens, max_length: what training checks
    when it starts), ``teacher`` (the --teacher argument; "" where no teacher is involved) and
    ``pad_token_id``, and defines ``context`` and ``__len__``.
    """

    fields: dict[str, Any]
    teacher: str
    pad_token_id: int

    @abc.abstractmethod
    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids, labels) of sample ``index``: ``ScoringSource.context``."""

    def text_only(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = self.context(index)
        return unmark_visual(ids, self.pad_token_id), labels

    @functools.cached_property
    def samples(self) -> SampleDigests:
        return computed_once(lambda: scan_samples(self.context, len(self)))

    @functools.cached_property
    def fingerprint(self) -> Fingerprint:
        samples = self.samples.fingerprint
        teacher = computed_once(lambda: teacher_fingerprint(self.teacher)) if self.teacher else ""
        return Fingerprint(**self.fields, teacher=teacher, samples=samples)

    def expected(self) -> dict[str, Any]:
        """The fingerprint fields a training run checks when it starts, cheaply: all but the teacher
        and the samples (a full pass over the dataset; the engine checks each micro-batch instead)."""
        return dict(self.fields)


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
    items = {i: source.context(i) for i in range(shard.start, shard.stop)}
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
        digests: dict[int, int] = {}
        for batch, contexts in _shard_batches(source, shard, batch_size):
            samples = [(unmark_visual(ids, source.pad_token_id), labels) for ids, labels in contexts]
            losses.update(zip(batch, teacher_unit_losses(teacher, samples, source.pad_token_id)))
            digests.update((i, sample_digest(ids, labels)) for i, (ids, labels) in zip(batch, contexts))
            tokens += sum(ids.numel() for ids, _ in samples)
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):,.0f}", refresh=False)
        order = range(shard.start, shard.stop)
        _check_stable(source.samples, {i: digests[i] for i in order})
        writer.write_shard(shard, [losses[i] for i in order], [digests[i] for i in order])
    bar.close()
    if distributed:
        dist.barrier()
    return writer.finalize() if rank == 0 else None


def _check_stable(scan: SampleDigests, digests: dict[int, int]) -> None:
    """The teacher pass must score the samples the scan fingerprinted: a dataset that returns other
    tokens on a second read would leave a cache that matches no training run."""
    for index, digest in digests.items():
        if digest != int(scan.digests[index]):
            raise RefCacheError(
                f"sample {index} gave other tokens in the teacher pass than in the scan before it: the dataset "
                "must return the same tokens every time a sample is read (no random text augmentation)"
            )


def existing_cache(out: Path) -> RefCache | None:
    """The finished cache at ``out``, checked intact; None when there is none yet (a partial run
    or nothing). Anything else at ``out`` is refused before the dataset scan and the teacher."""
    if (out / "meta.json").is_file():
        try:
            return RefCache.open(out)
        except RefCacheError as err:
            raise CorruptCacheError(f"--out {out} holds a damaged or outdated cache ({err}); use a new --out or delete it") from err
    if out.exists():
        raise RefCacheError(f"--out {out} exists and is not a reference cache: use a new --out or delete it")
    return None


def check_complete(cache: RefCache, source: ScoringSource) -> None:
    """Refuse a finished cache that another setup (teacher included) or other samples produced."""
    differences = cache.differences(source.fingerprint, source.samples)
    if differences:
        raise CacheMismatchError(
            f"--out {cache.path} holds a cache for another setup ({'; '.join(differences)}): use a new --out or delete it"
        )


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
    teacher forward per new sample, and 2 bytes per unit on the host. Unit counts and sample
    digests come from the source's tokenization pass over the text-only samples when it is built,
    so the engine checks every micro-batch against them as it does for a cache on disk. Drop-in
    for ``RefCache`` in ``ReGATEEngine``, which shares newly computed losses across ranks at each
    step's end.
    """

    def __init__(self, source: ScoringSource, teacher: torch.nn.Module, batch_size: int = 8) -> None:
        self.source = source
        self.teacher = teacher
        self.batch_size = batch_size
        self.fingerprint = source.fingerprint
        self.digests = source.samples.digests
        self.offsets = np.concatenate([[0], np.cumsum(source.samples.counts)]).astype(np.int64)
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
