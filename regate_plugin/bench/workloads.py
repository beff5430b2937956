"""Workload presets: synthetic LLaVA-style samples and padded micro-batches (see ``regate_plugin.bench``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..units import IGNORE_INDEX

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_TEXT_ID = 3

@dataclass(frozen=True)
class Preset:
    """Sequence composition of one workload, lengths in tokens at scale 1 (bounds included)."""

    name: str
    batch_size: int
    visual_tokens: int
    prefix_tokens: int
    turns: tuple[int, int]
    instruction: tuple[int, int]
    answer: tuple[int, int]
    answer_distribution: str  # "uniform" or "loguniform"
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llava-1.5", 16, 576, 35, (1, 4), (10, 40), (5, 150), "loguniform",
               "LLaVA-1.5 mix665k: 576 visual tokens, 1-4 turns, short and long answers"),
        Preset("videollama2-16f", 4, 1352, 6, (1, 1), (15, 40), (3, 30), "uniform",
               "VideoLLaMA2 16 frames: 1352 visual tokens, one short QA turn"),
        Preset("long-answer", 8, 576, 35, (1, 1), (8, 20), (150, 400), "uniform",
               "detailed captions: 576 visual tokens, one short prompt, a 150-400 token answer"),
    )
}


@dataclass(frozen=True)
class Sample:
    """One synthetic training sample: ``[prefix][visual][instr_1][answer_1]...`` as token ids."""

    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64: input ids on answer tokens, -100 elsewhere
    visual_start: int
    visual_tokens: int
    instruction_lengths: tuple[int, ...]
    answer_lengths: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.input_ids.numel()

    @property
    def supervised_tokens(self) -> int:
        return sum(self.answer_lengths)


@dataclass(frozen=True)
class Batch:
    """A right-padded micro-batch of samples ``sample_ids`` (their indices in the whole workload)."""

    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L) int64
    visual_mask: torch.Tensor  # (B, L) bool
    sample_ids: torch.Tensor  # (B,) int64
    lengths: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def scaled(n: int, scale: float) -> int:
    """A length at ``scale``: ``max(1, round(n / scale))``."""
    return max(1, round(n / scale))


def _draw(rng: np.random.Generator, bounds: tuple[int, int], distribution: str = "uniform") -> int:
    lo, hi = bounds
    if distribution == "loguniform":
        return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
    return int(rng.integers(lo, hi + 1))


def make_samples(preset: Preset, num_samples: int, seed: int = 0, scale: float = 1.0, vocab_size: int = 1024) -> list[Sample]:
    """``num_samples`` samples of ``preset``, reproducible for ``seed`` (see the module docstring)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if vocab_size < FIRST_TEXT_ID + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    lengths_rng = np.random.default_rng([seed, 0])
    ids_rng = np.random.default_rng([seed, 1])
    image_id = vocab_size - 1
    visual = scaled(preset.visual_tokens, scale)
    prefix = scaled(preset.prefix_tokens, scale)

    def text(n: int) -> list[int]:
        return ids_rng.integers(FIRST_TEXT_ID, image_id, size=n).tolist()

    samples = []
    for _ in range(num_samples):
        turns = _draw(lengths_rng, preset.turns)
        instructions, answers = [], []
        for _turn in range(turns):
            instructions.append(scaled(_draw(lengths_rng, preset.instruction), scale))
            answers.append(scaled(_draw(lengths_rng, preset.answer, preset.answer_distribution), scale))
        ids = [BOS_ID] + text(prefix - 1) + [image_id] * visual
        labels = [IGNORE_INDEX] * len(ids)
        for n_instr, n_answer in zip(instructions, answers):
            answer = text(n_answer - 1) + [EOS_ID]
            ids += text(n_instr) + answer
            labels += [IGNORE_INDEX] * n_instr + answer
        samples.append(
            Sample(
                torch.tensor(ids, dtype=torch.long),
                torch.tensor(labels, dtype=torch.long),
                visual_start=prefix,
                visual_tokens=visual,
                instruction_lengths=tuple(instructions),
                answer_lengths=tuple(answers),
            )
        )
    return samples


def collate(samples: Sequence[Sample], first_sample_id: int = 0) -> Batch:
    """Right-pad ``samples`` into a batch; sample ``i`` gets index ``first_sample_id + i``."""
    batch, length = len(samples), max(s.length for s in samples)
    input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    visual = torch.zeros((batch, length), dtype=torch.bool)
    for b, s in enumerate(samples):
        input_ids[b, : s.length] = s.input_ids
        labels[b, : s.length] = s.labels
        mask[b, : s.length] = 1
        visual[b, s.visual_start : s.visual_start + s.visual_tokens] = True
    ids = torch.arange(first_sample_id, first_sample_id + batch, dtype=torch.long)
    return Batch(input_ids, labels, mask, visual, ids, tuple(s.length for s in samples))


def make_batches(
    preset: Preset, batch_size: int, num_batches: int, seed: int = 0, scale: float = 1.0, vocab_size: int = 1024
) -> tuple[list[Sample], list[Batch]]:
    """The workload: ``num_batches * batch_size`` samples, and the batches in order."""
    samples = make_samples(preset, num_batches * batch_size, seed, scale, vocab_size)
    batches = [collate(samples[i : i + batch_size], i) for i in range(0, len(samples), batch_size)]
    return samples, batches


@dataclass(frozen=True)
class HostWorkload:
    """The engine's host-side load at a dataset's scale: ``samples`` in the reference cache with
    ``units`` supervised tokens each, micro-batches of ``batch`` rows padded to ``length``."""

    name: str
    samples: int
    units: int
    batch: int
    length: int


LLAVA_665K = HostWorkload("llava-665k", samples=665_000, units=160, batch=16, length=2048)


def host_batch(workload: HostWorkload, index: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of ``workload``: (labels, attention_mask, sample_ids). Each row is real
    for a drawn length (at least twice its units, at most ``length``) and holds four answer spans of
    ``units`` labelled tokens in all, each after an unlabelled gap (prompt, visual tokens or the next
    instruction), the last answer ending the row; its sample index is drawn from the whole dataset."""
    rng = np.random.default_rng([seed, 2, index])
    spans = 4
    sizes = [workload.units // spans] * (spans - 1)
    sizes.append(workload.units - sum(sizes))
    labels = torch.full((workload.batch, workload.length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((workload.batch, workload.length), dtype=torch.long)
    for b in range(workload.batch):
        real = int(rng.integers(max(2 * workload.units, workload.units + spans), workload.length + 1))
        mask[b, :real] = 1
        unlabelled = real - workload.units
        cuts = np.sort(rng.choice(np.arange(1, unlabelled), size=spans - 1, replace=False))
        gaps = np.diff(np.concatenate([[0], cuts, [unlabelled]]))
        at = 0
        for gap, n in zip(gaps.tolist(), sizes):
            at += gap
            labels[b, at : at + n] = torch.from_numpy(rng.integers(FIRST_TEXT_ID, 1000, size=n))
            at += n
    ids = torch.from_numpy(rng.choice(workload.samples, size=workload.batch, replace=False).astype(np.int64))
    return labels, mask, ids
