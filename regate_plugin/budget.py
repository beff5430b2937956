"""``keep_ratio="auto"``: each cycle's keep ratio from what its dense steps measure.

The signal. A cycle's dense steps compute the loss of every unit, so for every unit whose last
visit was a sparse step they show what that visit did: a unit *kept* there was trained on, a unit
*elided* there was not. Its EMA ``m`` still holds what the student lost on it before that visit; its
loss now is ``loss``. Over each group, ``shed = sum(m - loss) / sum(max(m, loss))`` is the share of
its loss the group has lost since (in [-1, 1]; below 0 it slipped back). Units learned on both ends
(``m`` and ``loss`` under ``LEARNED`` nats) are left out: they hold, and a template word's move from
0.001 to 0.05 nats is no slip worth a token. When elision is safe, the elided units shed as much as
the kept ones: what they teach is learned from the kept occurrences elsewhere (the same word in
other samples), or they are learned already and hold. When it is not, the kept units shed loss and
the elided ones stay or slip back (forgetting). The *lag* ``shed(kept) - shed(elided)`` measures
that on the same steps, the same model and each unit's own history; it needs no extra forward pass
and no per-word bookkeeping. (Each unit is judged against its own last visit, so the signal needs
samples seen more than once: in a one-epoch run the ratio stays where it starts.)

The rule. Multiplicative, one step per cycle, within ``[keep_min, keep_max]``: a lag above
``LAG_TOLERANCE`` multiplies the next sparse phase's keep ratio by ``STEP``, a lag at or below it
divides it by ``STEP``. It starts in the middle of the range on this scale,
``sqrt(keep_min * keep_max)`` (0.22 with the defaults: before anything is measured it is as far
from either bound as it can be wrong), and moves from there; a slip costs one cycle at the lower
ratio before it is corrected. Elided units all learned and holding count as keeping up; kept units all learned give a
lag of ``-shed(elided)`` (only a slip raises the ratio). A dense phase that saw fewer than
``MIN_UNITS`` units elided at their last visit leaves the ratio as it was. Multiplicative steps
move as fast, relatively, at 0.1 as at 0.5; a cycle's decision sees only that cycle's dense steps,
so it follows the run.

Determinism: every quantity comes from the EMA's exchange (every rank's (unit, loss) pairs in rank
order, the same table) and the gathered indices of the units elided on sparse steps, summed in
float64 in that order: every rank decides the same ratio, and N ranks decide as one rank with
N-fold accumulation. The state (ratio, the last visit of every unit, the running sums, the
decisions) is saved with the engine's and resumed exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .collectives import is_multi_rank
from .config import ReGATEConfig
from .ema import all_gather_updates
from .schedule import is_dense_step

#: factor of one step of the keep ratio, up or down (five steps: 0.5 -> 0.16)
STEP = 1.25
#: the kept units may shed this much more of their loss than the elided ones before the ratio goes
#: up (a share of the loss; on the demo the lag swings by 0.1-0.5 between cycles once both groups
#: are learning, and the early slips of elided units are lags above 1)
LAG_TOLERANCE = 0.05
#: units on a side a dense phase needs: elided ones to move the ratio at all, and on either side to
#: count its shed
MIN_UNITS = 8
#: nats: a unit under this before and now is learned and holding (the student's probability of its
#: token above 0.9), left out of the sheds
LEARNED = 0.1

#: a unit's last visit: none seen yet since a dense step, kept on a sparse step, elided on one
UNSEEN, KEPT, ELIDED = 0, 1, 2


class KeepController:
    """The auto keep ratio: the last visit of every unit (int8, one byte a unit), running sums of
    the current dense phase, and the ratio of the sparse steps; see the module docstring."""

    def __init__(self, num_units: int, config: ReGATEConfig) -> None:
        self.config = config
        self.ratio = start_ratio(config)
        self.last_visit = torch.zeros(num_units, dtype=torch.int8)
        # [kept, elided] x [units, units not learned, sum max(m, loss), sum (m - loss)] (the last two: not learned)
        self.sums = torch.zeros(2, 4, dtype=torch.float64)
        self.decisions: list[dict[str, float | None]] = []  # per cycle: step, ratio chosen, both sheds
        self._elided: list[torch.Tensor] = []

    def ratio_at(self, step: int) -> float:
        """1.0 on dense steps, else the ratio chosen from the cycle's dense steps."""
        return 1.0 if is_dense_step(step, self.config) else self.ratio

    def elided(self, flat_index: torch.Tensor) -> None:
        """Queue the flat indices of units a sparse step's micro-batch elided (this rank's)."""
        self._elided.append(flat_index.detach().to("cpu", torch.int64))

    def observe(self, step: int, flat_index: torch.Tensor, losses: torch.Tensor, ema_before: torch.Tensor) -> None:
        """The step's losses of every rank (rank order), with the units' EMA before this step's update.

        Called once per optimizer step from the EMA exchange, on every rank. On a sparse step the
        units computed were kept; on a dense step their last visit sorts them into the sums."""
        if is_dense_step(step, self.config):
            finite = torch.isfinite(losses) & torch.isfinite(ema_before)
            visit = self.last_visit[flat_index].long()
            larger, shed = torch.maximum(ema_before, losses).double(), (ema_before - losses).double()
            at_stake = larger >= LEARNED
            for side, flag in enumerate((KEPT, ELIDED)):
                pick = finite & (visit == flag)
                open_ = pick & at_stake
                self.sums[side] += torch.stack([pick.sum().double(), open_.sum().double(), larger[open_].sum(),
                                                shed[open_].sum()])
            self.last_visit[flat_index] = UNSEEN
        else:
            self.last_visit[flat_index] = KEPT

    def end_step(self, step: int, group: Any = None) -> None:
        """Mark the step's elided units (gathered from every rank); after a cycle's last dense step,
        choose the ratio of its sparse steps."""
        elided = torch.cat(self._elided) if self._elided else torch.zeros(0, dtype=torch.int64)
        self._elided.clear()
        if not is_dense_step(step, self.config):
            if is_multi_rank(group):
                (elided,) = all_gather_updates(elided, group=group)
            self.last_visit[elided] = ELIDED
        elif step >= self.config.warmup and not is_dense_step(step + 1, self.config):
            self.decide(step)

    def decide(self, step: int) -> None:
        """One step of the rule from the dense phase's sums, which it then clears."""
        (_, *kept_sums), (elided_units, *elided_sums) = self.sums.tolist()
        self.sums.zero_()
        kept, elided = shed_share(*kept_sums), shed_share(*elided_sums)
        if elided_units >= MIN_UNITS:
            lag = (0.0 if kept is None else kept) - (0.0 if elided is None else elided)
            factor = STEP if elided is not None and lag > LAG_TOLERANCE else 1.0 / STEP
            self.ratio = next_ratio(self.ratio, factor, self.config.keep_min, self.config.keep_max)
        self.decisions.append({"step": step, "keep_ratio": self.ratio, "shed_kept": kept, "shed_elided": elided})

    def state_dict(self) -> dict[str, Any]:
        if self._elided:
            raise RuntimeError("KeepController.state_dict() called with elided units of an unfinished step: call end_step() first")
        return {"ratio": self.ratio, "last_visit": self.last_visit.clone(), "sums": self.sums.clone(),
                "decisions": [dict(d) for d in self.decisions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last_visit = torch.as_tensor(state["last_visit"], dtype=torch.int8)
        if last_visit.shape != self.last_visit.shape:
            raise ValueError(f"the saved auto keep ratio tracks {last_visit.numel()} units, this run's cache "
                             f"{self.last_visit.numel()}: resume with the same dataset and cache")
        self.ratio = float(state["ratio"])
        self.last_visit = last_visit.clone()
        self.sums = torch.as_tensor(state["sums"], dtype=torch.float64).clone()
        self.decisions = [dict(d) for d in state["decisions"]]
        self._elided.clear()


def start_ratio(config: ReGATEConfig) -> float:
    """The ratio before the first measurement: the geometric middle of [keep_min, keep_max]."""
    return round(math.sqrt(config.keep_min * config.keep_max), 12)


def shed_share(units: float, larger: float, shed: float) -> float | None:
    """Share of its loss a group's units not learned shed (sum(m - loss) / sum(max(m, loss))); None
    with fewer than MIN_UNITS of them."""
    if units < MIN_UNITS:
        return None
    return shed / larger


def next_ratio(ratio: float, factor: float, keep_min: float, keep_max: float) -> float:
    """``ratio * factor`` within [keep_min, keep_max], rounded to 12 digits (no drift from repeated
    multiplication: a ratio that returns to a value returns to it exactly)."""
    return round(min(keep_max, max(keep_min, ratio * factor)), 12)
