"""How much of the teacher's loss the student has removed, per target word, over all samples.

A unit's own EMA cannot tell a word the student has not learned *yet* from one nobody can predict
(one of several interchangeable phrasings): both sit at the teacher's loss until the student learns,
and a sample comes back only once an epoch. The word itself can: ``red`` is trained in hundreds of
samples a step apart, so once the student reads colours from the picture its loss falls below the
teacher's on every ``red`` at once, while ``painted`` (free among painted/colored/drawn) stays at the
teacher's ln 3 on all of them, for good. ``WordProgress`` keeps, per target token id, decayed sums of
the student's and the teacher's losses over the units the student computed; the share of the
teacher's loss removed, 1 - student/teacher, is the word's learning progress. Identical on every
rank: each step's (word, loss, ref) triples are gathered in rank order, as the EMA's updates are.
"""

from __future__ import annotations

from typing import Any

import torch

from .collectives import is_multi_rank
from .ema import all_gather_updates


#: observations a word's estimate averages over (decay 1 - 1/WINDOW per observation): one sample's
#: loss on a free word ranges over nats, so a short window reads noise as learning. A word's share is
#: known once its decayed count reaches half a window: before, the student has not been trained on it
#: enough to call it stuck.
WINDOW = 100


class WordProgress:
    """Per target token id: S[v] <- beta^c S[v] + sum of c new student losses, T[v] likewise for the
    teacher's and N[v] for the count (float64, grown to the largest id seen)."""

    def __init__(self, beta: float = 1.0 - 1.0 / WINDOW) -> None:
        self.beta = float(beta)
        self.student = torch.zeros(0, dtype=torch.float64)
        self.teacher = torch.zeros(0, dtype=torch.float64)
        self.count = torch.zeros(0, dtype=torch.float64)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(self, targets: torch.Tensor, losses: torch.Tensor, refs: torch.Tensor) -> None:
        """Queue computed units' target ids, student losses and reference losses; ``commit`` applies them."""
        if not targets.shape == losses.shape == refs.shape:
            raise ValueError(f"{targets.numel()} targets, {losses.numel()} losses and {refs.numel()} refs: give one each per unit")
        self._pending.append((targets.detach().to("cpu", torch.int64), losses.detach().to("cpu", torch.float32),
                              refs.detach().to("cpu", torch.float32)))

    def commit(self, group: Any = None) -> None:
        """Gather the step's queued units from every rank (rank order) and apply them."""
        parts, self._pending = self._pending, []
        targets = torch.cat([t for t, _, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        losses = torch.cat([l for _, l, _ in parts]) if parts else torch.zeros(0)
        refs = torch.cat([r for _, _, r in parts]) if parts else torch.zeros(0)
        if is_multi_rank(group):
            targets, losses, refs = all_gather_updates(targets, losses, refs, group=group)
        self.apply(targets, losses, refs)

    def apply(self, targets: torch.Tensor, losses: torch.Tensor, refs: torch.Tensor) -> None:
        finite = torch.isfinite(losses) & torch.isfinite(refs) & (targets >= 0)
        targets, losses, refs = targets[finite], losses[finite].double(), refs[finite].double()
        if targets.numel() == 0:
            return
        size = int(targets.max()) + 1
        if size > self.student.numel():
            grow = size - self.student.numel()
            self.student = torch.cat([self.student, torch.zeros(grow, dtype=torch.float64)])
            self.teacher = torch.cat([self.teacher, torch.zeros(grow, dtype=torch.float64)])
            self.count = torch.cat([self.count, torch.zeros(grow, dtype=torch.float64)])
        words, slot = torch.unique(targets, return_inverse=True)  # only the words seen: vocabularies are 150k
        seen = torch.bincount(slot, minlength=words.numel()).double()
        decay = self.beta ** seen
        self.student[words] = decay * self.student[words] + torch.bincount(slot, losses, minlength=words.numel())
        self.teacher[words] = decay * self.teacher[words] + torch.bincount(slot, refs, minlength=words.numel())
        self.count[words] = decay * self.count[words] + seen

    def learned(self, targets: torch.Tensor) -> torch.Tensor:
        """(n,) float32: 1 - student/teacher loss on each target's word (1 = learned, 0 = still at the
        teacher's loss, below 0 = worse); NaN for a word seen less than half a window (decayed count
        0.5 / (1 - beta)) or one the teacher predicts exactly."""
        targets = targets.cpu().long()
        known = (targets >= 0) & (targets < self.student.numel())
        known[known.clone()] = self.count[targets[known]] >= 0.5 / (1.0 - self.beta) - 1e-9
        out = torch.full(targets.shape, float("nan"), dtype=torch.float32)
        student, teacher = self.student[targets[known]], self.teacher[targets[known]]
        out[known] = torch.where(teacher > 0, 1.0 - student / teacher.clamp(min=1e-12), float("nan")).float()
        return out

    def state_dict(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("WordProgress.state_dict() called with uncommitted updates: call commit() first")
        return {"student": self.student.clone(), "teacher": self.teacher.clone(), "count": self.count.clone(),
                "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student = torch.as_tensor(state["student"], dtype=torch.float64).clone()
        self.teacher = torch.as_tensor(state["teacher"], dtype=torch.float64).clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
        self.beta = float(state["beta"])
        self._pending.clear()
