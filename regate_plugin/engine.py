"""ReGATEEngine: one micro-batch from labels to a packing plan, and losses back into the EMA.

The model-agnostic core a target plugin calls from its patched forward::

    plan = engine.plan(labels, attention_mask, sample_ids, context_ids=ids)  # units -> scores -> keep mask -> Packed
    ... run the language model on pack(embeds, plan.packed) ...
    loss = engine.loss(plan, hidden, lm_head)                   # kept rows; queues their losses
    engine.end_step()                                           # exchange across ranks, apply, observe

Planning runs on the host: the labels and mask come over once, every decision is made on small CPU
tensors, and only the packing plan goes to the model's device. No per-layer or per-unit syncs.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, NamedTuple

import numpy as np
import pluggy
import torch
import torch.distributed as dist

from .budget import KeepController
from .collectives import collective_device, is_multi_rank
from .config import ReGATEConfig
from .ema import EMATable
from . import hookspecs
from .hookspecs import StepStats
from .loss import chunk_count, kept_token_loss
from .packing import Packed, pack_plan, trim_to_loss
from .plugins import (
    PluginError,
    active_plugins,
    check_plugins,
    checked_keep_ratio,
    checked_scores,
    checked_selection,
    describe,
    first_result,
    log_active_plugins,
    plugin_manager,
)
from . import defaults
from .identity import sample_change, sample_digests
from .refcache import RefCache
from .selection import keep_mask_for
from .words import WordProgress
from .units import Units, find_units


SAMPLE_INDEX_KEY = "sample_index"  # the batch key that carries each sample's dataset index


class _ModuleRef(NamedTuple):
    """A module plugin in a pickled engine, by import name."""

    module: str


class BatchError(ValueError):
    """A batch does not fit the reference cache; the message names the sample and the likely cause."""


class BypassError(RuntimeError):
    """A training micro-batch of a run with ReGATE on did not go through ``plan()``: something
    between the Trainer and the model (a loss the Trainer computes itself, a replaced forward)
    routed it around the packed forward, and the step trained dense."""


@dataclass(frozen=True)
class StepPlan:
    """What one micro-batch keeps, and where it goes in the packed row.

    ``packed`` lives on the model's device; ``host`` is the same plan on the CPU; units, keep
    decisions and sample ids are CPU tensors. ``keep_mask`` marks the positions in the packed row:
    real, not elided (with ``elision="loss"`` elided units stay), and attended by some kept unit of
    their sample (``packing.trim_to_loss``).
    """

    units: Units
    unit_keep: torch.Tensor
    keep_mask: torch.Tensor
    packed: Packed
    host: Packed
    sample_ids: torch.Tensor | None
    keep_ratio: float


class ReGATEEngine:
    """Holds the schedule position, the EMA table and the reference cache of one training run.

    Without a reference cache it runs packing only: every unit kept, padding removed, no EMA
    (the A/B measurement of what packing alone is worth).

    ``pm`` is the plugin manager whose strategies and observers this engine calls: by default the
    process-wide one (built-in defaults and the installed ``regate`` entry-point plugins). To give
    one engine a strategy of its own, pass ``pm=build_plugin_manager(extra=[my_strategy])``; other
    engines are unaffected. The active plugins are logged at INFO here and recorded in
    ``state_dict()``; every strategy answer is checked and a wrong one names its plugin.
    """

    def __init__(
        self, config: ReGATEConfig, refcache: RefCache | None, pm: pluggy.PluginManager | None = None
    ) -> None:
        self.config = config
        self.refcache = refcache
        self.pm = pm or plugin_manager()
        check_plugins(self.pm)  # plugins registered after build_plugin_manager too
        log_active_plugins(self.pm)
        self.online = hasattr(refcache, "ensure")  # an OnlineRefCache scores samples as they come
        self.ema = None if refcache is None else EMATable(
            refcache.all_losses(), refcache.offsets_tensor(), config.ema_beta, exchange_inits=self.online, copy=False
        )
        # the word table costs a step's bookkeeping (and a collective on several ranks): kept only for the score reading it
        self.words = WordProgress() if refcache is not None and config.score == "learnable" else None
        self.budget = None if self.ema is None or not config.auto_keep else KeepController(self.ema.values.numel(), config)
        if self.budget is not None:
            _refuse_keep_ratio_plugins(self.pm)
        self.step = 0
        self._totals = [0, 0, 0, 0]  # supervised_total, supervised_kept, llm_tokens, padded_tokens
        self._planned = 0  # micro-batches planned in this optimizer step
        self._losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # flat index, targets (host), losses (device)

    @property
    def packing_only(self) -> bool:
        return self.ema is None

    @property
    def checks_contexts(self) -> bool:
        """Whether ``plan`` needs ``context_ids``: the cache records per-sample digests. Targets build
        the context only then (packing-only runs and digest-less caches skip that work)."""
        return self.refcache is not None and self.refcache.digests is not None

    def keep_ratio(self) -> float:
        if self.packing_only:
            return 1.0
        if self.budget is not None:
            return self.budget.ratio_at(self.step)
        answer = first_result(self.pm, "regate_keep_ratio", step=self.step, config=self.config)
        return checked_keep_ratio(*answer, step=self.step)

    def plan(
        self,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sample_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        *,
        context_ids: torch.Tensor | None = None,
    ) -> StepPlan:
        """Find, score and select this micro-batch's units and plan the packed row.

        ``context_ids`` (B, L), aligned with ``labels``: the micro-batch's input ids after the
        multimodal merge with every visual position set to ``identity.VISUAL_MARKER``
        (``identity.mark_visual``); padding is read from ``attention_mask``. Needed with a cache
        that records per-sample digests: each row's digest of its context and targets must be the
        one recorded when the sample was scored.
        """
        device = labels.device
        labels, attention_mask, position_ids, context_ids = (
            None if t is None else t.cpu() for t in (labels, attention_mask, position_ids, context_ids)
        )
        units = find_units(labels, attention_mask)
        ratio = self.keep_ratio()
        if not self.packing_only:
            sample_ids = self._check_samples(sample_ids, units, labels, attention_mask, context_ids)
            if self.online:
                self.ema.initialize(*self.refcache.ensure(sample_ids))
        if ratio >= 1.0:
            unit_keep = torch.ones(len(units), dtype=torch.bool)
        else:
            flat = self.ema.flat_index(sample_ids[units.row], units.k)
            ema, ref = self.ema.lookup(flat), self.refcache.lookup(flat)
            learned = (torch.full((len(units),), float("nan")) if self.words is None
                       else self.words.learned(labels[units.row, units.col + 1]))
            answer = first_result(self.pm, "regate_score", ema=ema, ref=ref, config=self.config, learned=learned)
            scores = checked_scores(*answer, n=len(units))
            answer = first_result(self.pm, "regate_select", scores=scores, units=units, keep_ratio=ratio, config=self.config)
            unit_keep = checked_selection(*answer, units=units, per_sample=self.config.selection != "per_batch")
            if self.budget is not None:
                self.budget.elided(flat[~unit_keep])
        scored = keep_mask_for(attention_mask, units, unit_keep)
        # elision "loss": elided units stay as input, only their loss terms go
        fed = scored if self.config.elision == "input" else keep_mask_for(attention_mask, units, torch.ones_like(unit_keep))
        keep_mask = trim_to_loss(fed, units, scored)
        host = pack_plan(keep_mask, labels, units, position_ids, scored)
        self._totals[0] += len(units)
        self._totals[1] += int(unit_keep.sum())
        self._totals[2] += host.num_tokens
        self._totals[3] += labels.numel()
        self._planned += 1
        return StepPlan(units, unit_keep, keep_mask, host.to(device), host, sample_ids, ratio)

    def loss(
        self,
        plan: StepPlan,
        hidden: torch.Tensor,
        lm_head: torch.nn.Module,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss of the packed row's kept supervised units; queues their losses for the EMA.

        Without ``num_items_in_batch`` it is the mean over kept units. With it (the HF Trainer's
        count of supervised tokens over all accumulated micro-batches) each micro-batch weighs in by
        its share of those tokens, as in dense training: sum / num_items * (units / kept units),
        which on a dense step is exactly the upstream ``sum / num_items_in_batch``.
        """
        rows = plan.packed.loss_rows
        chunks = chunk_count(rows.numel(), self.config.loss_chunk_rows)
        if _is_partitioned(lm_head):  # ZeRO-3: every rank calls the LM head equally often
            chunks = _max_across_ranks(chunks)
        mean, per_unit = kept_token_loss(
            hidden, lm_head, rows, plan.packed.targets[rows], self.config.loss_chunk_rows, min_chunks=max(chunks, 1)
        )
        self.record(plan, per_unit)
        if num_items_in_batch is None:
            return mean
        return mean * len(plan.units) / num_items_in_batch

    def record(self, plan: StepPlan, per_unit_losses: torch.Tensor) -> None:
        """Queue the student's losses of the kept units (in ``packed.loss_rows`` order) for the EMA.
        They stay on their device until ``end_step`` copies the step's losses over at once: no
        device sync per micro-batch."""
        if self.packing_only:
            return
        rows = plan.host.loss_rows
        flat = self.ema.flat_index(plan.sample_ids[plan.host.row[rows]], plan.host.unit_k[rows])
        if flat.shape != per_unit_losses.shape:
            raise ValueError(f"{flat.numel()} kept units but {per_unit_losses.numel()} losses: pass one loss per loss row")
        self._losses.append((flat, plan.host.targets[rows], per_unit_losses.detach()))

    def _queue_losses(self) -> None:
        """The step's recorded losses into the EMA's queue: one device-to-host copy per optimizer step."""
        if self._losses:
            losses = torch.cat([loss.to(self._losses[0][2].device, torch.float32) for _, _, loss in self._losses]).cpu()
            flat = torch.cat([flat for flat, _, _ in self._losses])
            self.ema.record(flat, losses)
            if self.words is not None:
                self.words.record(torch.cat([targets for _, targets, _ in self._losses]), losses, self.refcache.lookup(flat))
            self._losses.clear()

    def end_step(self, group: Any = None, micro_batches: int | None = None,
                 likely_causes: Callable[[], str] | None = None) -> StepStats:
        """Commit the step's EMA updates (all ranks), report the step's token counts, advance the step.

        ``micro_batches``: how many training micro-batches the step ran (the Trainer glue counts them).
        Fewer of them planned than that means some bypassed the packed forward: ``BypassError``,
        whose one line names ``likely_causes()`` (what the caller sees in the trainer and model).
        """
        if micro_batches is not None and self._planned < micro_batches:
            causes = likely_causes() if likely_causes is not None else ""
            raise BypassError(
                f"ReGATE is on, but {micro_batches - self._planned} of the {micro_batches} training micro-batches of "
                f"step {self.step} did not run its packed forward, so the step trained dense{causes}"
            )
        self._planned = 0
        if not self.packing_only:
            self._queue_losses()
            observe = None if self.budget is None else functools.partial(self.budget.observe, self.step)
            inits = self.ema.commit(group, observe=observe)
            if self.budget is not None:
                self.budget.end_step(self.step, group)
            if self.words is not None:
                self.words.commit(group)
            if self.online:
                self.refcache.fill(*inits)
        stats = StepStats(self.step, self.keep_ratio(), *self._totals)
        self.pm.hook.regate_step_end(stats=stats)
        self._totals = [0, 0, 0, 0]
        self.step += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        if self._losses:
            raise RuntimeError("ReGATEEngine.state_dict() called with losses of an unfinished step: call end_step() first")
        ema = None if self.packing_only else self.ema.state_dict()
        words = None if self.words is None else self.words.state_dict()
        budget = None if self.budget is None else self.budget.state_dict()
        return {"step": self.step, "ema": ema, "words": words, "budget": budget, "config": self.config.to_dict(),
                "plugins": active_plugins(self.pm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["ema"] is None) != self.packing_only:
            raise ValueError("the saved ReGATE state and this run disagree on packing-only mode (a reference cache)")
        if not self.packing_only:
            self.ema.load_state_dict(state["ema"])
        if self.words is not None:  # a state without words (another score, or saved before they existed) starts afresh
            self.words = WordProgress()
            if state.get("words") is not None:
                self.words.load_state_dict(state["words"])
        if self.budget is not None:  # likewise: a state saved without the auto keep ratio starts it afresh
            self.budget = KeepController(self.ema.values.numel(), self.config)
            if state.get("budget") is not None:
                self.budget.load_state_dict(state["budget"])
        self._losses.clear()
        self._planned = 0
        self.step = int(state["step"])

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles of an enabled model carry the engine; its plugin manager holds modules,
        so it travels as the names of its plugins (modules by import name) and is rebuilt on load."""
        state = self.__dict__.copy()
        state["pm"] = None if self.pm is plugin_manager() else [
            (None if name == str(id(plugin)) else name,  # pluggy's default name is the object's id: not portable
             _ModuleRef(plugin.__name__) if isinstance(plugin, ModuleType) else plugin)
            for name, plugin in self.pm.list_name_plugin()
        ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        plugins = state["pm"]
        if plugins is None:
            state["pm"] = plugin_manager()
        else:
            state["pm"] = pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, plugin in plugins:  # registration order is hook call order
                pm.register(importlib.import_module(plugin.module) if isinstance(plugin, _ModuleRef) else plugin, name=name)
        self.__dict__.update(state)

    def _check_samples(
        self,
        sample_ids: torch.Tensor | None,
        units: Units,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The batch's sample indices, checked against the cache before the step: in range, and every
        row the sample the cache scored (unit count, then the digest of its context and targets).
        Host-side, on the CPU tensors: no device sync."""
        batch = labels.shape[0]
        if sample_ids is None:
            raise BatchError(
                "ReGATE is on but the batch carries no sample indices: wrap the dataset and collator "
                "as the target's page in docs/targets/ shows, so every sample's dataset index reaches the model"
            )
        sample_ids = torch.as_tensor(sample_ids).reshape(-1).cpu().long()
        if sample_ids.numel() != batch:
            raise BatchError(f"the batch has {batch} rows but {sample_ids.numel()} sample indices")
        outside = (sample_ids < 0) | (sample_ids >= self.ema.num_samples)
        if outside.any():
            bad = int(sample_ids[outside][0])
            raise BatchError(
                f"sample {bad} is outside the reference cache, which holds samples 0..{self.ema.num_samples - 1}: "
                "the cache was built for another (smaller) dataset; rerun `regate score` on this one"
            )
        found = units.counts
        expected = self.ema.counts(sample_ids)
        differ = (found != expected).nonzero(as_tuple=True)[0].numpy()
        if not differ.size and self.refcache.digests is not None:
            if context_ids is None:
                raise BatchError(
                    "the reference cache records each sample's digest of its prompt and answer, but this micro-batch "
                    "came without its input ids (plan(..., context_ids=...)): call the model with input_ids, or train "
                    "through a target that passes them"
                )
            if context_ids.shape != labels.shape:
                raise BatchError(f"context ids {tuple(context_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
            cached = np.asarray(self.refcache.digests[sample_ids.numpy()])
            differ = np.flatnonzero(sample_digests(context_ids, labels, units, attention_mask) != cached)
        if differ.size:
            i = int(differ[0])
            raise BatchError(
                f"{sample_change(int(sample_ids[i]), int(found[i]), int(expected[i]))} in this micro-batch: the "
                "dataset, tokenizer, chat template or max length changed since `regate score`, or the sample index "
                "does not match the sample; rebuild the cache for this setup"
            )
        return sample_ids


def _refuse_keep_ratio_plugins(pm: pluggy.PluginManager) -> None:
    """``keep_ratio="auto"`` sets the keep ratio itself: a plugin's ``regate_keep_ratio`` would be unused."""
    others = [impl.plugin for impl in pm.hook.regate_keep_ratio.get_hookimpls() if impl.plugin is not defaults]
    if others:
        raise PluginError(
            f"plugin {describe(pm, others[0])} sets the keep ratio (regate_keep_ratio), and keep_ratio='auto' sets it "
            "too: give a fixed keep ratio, or run without that plugin"
        )


def _is_partitioned(module: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the module's weights (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _max_across_ranks(value: int) -> int:
    if not is_multi_rank():
        return value
    tensor = torch.tensor([value], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
