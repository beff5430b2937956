"""Target ``swift``: modelscope/ms-swift's SFT (PyPI ``ms-swift`` 4.6) on transformers' own multimodal
classes (those of the hf target's adapter table; LLaVA-1.5-HF is model type ``llava1_5_hf``).

``regate train --target swift -- <swift sft arguments>`` applies these patches and runs ms-swift's own
``sft_main`` in-process (what ``swift sft`` runs in its worker process after its opt-in single-device
mode and its Unsloth and Ray set-up, which ReGATE refuses; under ``torchrun`` or ``deepspeed`` too):

* ``SwiftSft._parse_args`` refuses what ReGATE cannot compose with (another task than ``causal_lm``,
  ``--packing``, ``--padding_free``, sequence parallel, streaming, a cached or split dataset, a loss
  ms-swift computes itself: ``--loss_type``, ``--loss_scale`` other than ``default``, DFT or channel
  loss, label smoothing; ``--use_logits_to_keep true``, ``--group_by_length``, Ray, Unsloth) before
  anything loads. Megatron is ms-swift's other entry (``megatron sft``), which this target never runs.
* ``SwiftSft._prepare_model_tokenizer``, before the model loads: the reference cache is checked
  against ms-swift's own samples (its dataset loading and ``template.encode``: max_length truncation
  and the visual-token expansion); under ``regate train --ref-cache`` the run takes the arguments
  and datasets the pre-launch check built and checked (loaded once).
* ``Template.pre_forward_hook``: a ReGATE training forward gets the collated batch as it is, so the model
  merges the visual features itself (ms-swift's Qwen2-VL and InternVL-HF templates would merge them
  into ``inputs_embeds`` first and drop the input ids each sample is checked by).
* ``Seq2SeqTrainer.__init__``, after upstream's (``framework.trainer_init``): ``use_logits_to_keep``
  left to ms-swift's choice is off (ReGATE's loss evaluates kept rows only, and the labels must
  keep their shape), sample indices through the training dataset and collator, ``hf.enable`` on the
  student inside its LoRA wrapper, ReGATE's callback.
* After ``sft_main``, a training run whose patched trainer never ran is an error.

``regate score --target swift -- <swift sft arguments>`` encodes every sample with ms-swift's own
template, so truncation and visual tokens are training's by construction.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from regate_plugin.config import ReGATEConfig
from regate_plugin.hookspecs import Target, TargetRefusal, hookimpl
from regate_plugin.refcache import sha256_file
from regate_plugin.versions import require
from regate_plugin.wrappers import student

from . import framework, hf, upstream
from .framework import Invocation

__all__ = ["Invocation", "apply", "launch", "refusal", "scoring_source", "source"]


def requirement() -> str | None:
    return require("ms-swift", ">=4.6,<4.7") or require("transformers", ">=4.55") or hf.requirement()


def apply(config: ReGATEConfig, ref_cache: str | None, *, resume_without_state: bool = False,
          invocation: Invocation | None = None) -> None:
    """Patch ms-swift's SFT pipeline for ReGATE (``ref_cache=None``: packing only). Idempotent.
    ``resume_without_state``: a checkpoint without ReGATE's state (a baseline's) may be resumed."""
    from swift.pipelines.train.sft import SwiftSft
    from swift.template import Template
    from swift.trainers import Seq2SeqTrainer

    invocation = invocation or Invocation()
    invocation.applied = True
    upstream.wrap(SwiftSft, "_parse_args", functools.partial(_checked_args, invocation=invocation))
    upstream.wrap(SwiftSft, "_prepare_model_tokenizer", functools.partial(_checked_before_model, ref_cache=ref_cache,
                                                                          invocation=invocation))
    upstream.wrap(SwiftSft, "_get_dataset", functools.partial(_checked_datasets, invocation=invocation))
    upstream.wrap(Template, "pre_forward_hook", _merge_in_the_model)
    init = framework.trainer_init(config, ref_cache, resume_without_state, invocation, prepare=_resolve_settings)
    upstream.wrap(Seq2SeqTrainer, "__init__", init)


def launch(args: list[str], attn_implementation: str | None = None, *, invocation: Invocation | None = None) -> None:
    """Run ms-swift's ``sft_main`` on ``args`` (``swift sft``'s arguments) in this process. The attention of
    unpacked forwards is ms-swift's ``--attn_impl``. With ReGATE applied, a training run that never
    reached the patched trainer is an error."""
    from swift.pipelines import sft_main

    if attn_implementation is not None:
        raise TargetRefusal("--attn-implementation does not apply to ms-swift: pass --attn_impl among its arguments")
    invocation = invocation or Invocation()
    invocation.launch_args = tuple(args)
    checked = invocation.take_checked()  # (SftArguments, datasets) of the pre-launch check, for these arguments
    invocation.in_use = checked
    sft_main(list(args) if checked is None else checked[0])
    framework.check_trainer_ran(invocation, "ms-swift", "Seq2SeqTrainer.__init__",
                                "use_ray, or a --task_type whose trainer is another class: set --use_ray false "
                                "and --task_type causal_lm, with ms-swift 4.6")


def parse(args: list[str]) -> Any:
    """ms-swift's own parsing of ``swift sft`` arguments into ``SftArguments`` (what ``SwiftSft`` does),
    refused where ReGATE cannot train with them."""
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    parsed, remaining = parse_args(SftArguments, list(args))
    if remaining and not parsed.ignore_args_error:
        raise TargetRefusal(f"ms-swift's sft does not take {' '.join(remaining)}: remove them (see swift sft --help)")
    _refuse(parsed)
    return parsed


def refusal(args: Any) -> str | None:
    """Why ReGATE cannot train with these ``SftArguments``, or None."""
    if args.task_type != "causal_lm":
        return f"ReGATE trains ms-swift's causal_lm SFT, not task_type {args.task_type!r}: set --task_type causal_lm"
    if args.packing or args.padding_free:
        name = "packing" if args.packing else "padding_free"
        return (f"--{name} concatenates several samples into one row, which then has no single sample index for "
                "the reference cache and the EMA table; ReGATE packs the kept tokens of a micro-batch itself (padding "
                f"removed): set --{name} false")
    if args.sequence_parallel_size > 1:
        return (f"sequence_parallel_size {args.sequence_parallel_size} splits each sample across ranks, which ReGATE's "
                "packed forward does not: set --sequence_parallel_size 1")
    if args.streaming:
        return "streaming datasets have no sample index: set --streaming false"
    if args.cached_dataset:
        return ("--cached_dataset holds samples encoded before this run, which the teacher pass cannot rebuild with "
                "ms-swift's template: pass the raw data with --dataset")
    if args.truncation_strategy == "split":
        return ("truncation_strategy split cuts a sample into several, which then share no single sample index: set "
                "--truncation_strategy right (or left)")
    own_losses = {"loss_type": args.loss_type is not None, "enable_dft_loss": args.enable_dft_loss,
                  "enable_channel_loss": args.enable_channel_loss}
    for name, used in own_losses.items():
        if used:
            fix = "remove --loss_type" if name == "loss_type" else f"set --{name} false"
            return (f"--{name} makes ms-swift compute the loss itself from the logits, without the labels ReGATE "
                    f"trains on, so it would silently train dense: {fix}")
    if args.loss_scale != "default":
        return (f"loss_scale {args.loss_scale!r} weighs tokens in a loss ms-swift computes itself from the logits, "
                "without the labels ReGATE trains on, so it would silently train dense: set --loss_scale default")
    reason = framework.label_smoothing_refusal(args, "--label_smoothing_factor 0")
    if reason:
        return reason
    if args.use_logits_to_keep:
        return ("use_logits_to_keep cuts the labels to the supervised positions before the forward, where ReGATE's "
                "packed forward needs them whole (it evaluates kept rows only anyway): remove --use_logits_to_keep")
    if args.group_by_length:
        return ("group_by_length reads the lengths column of the training set, which ReGATE's indexed dataset "
                "does not expose: set --group_by_length false")
    if args.use_ray:
        return "use_ray trains in Ray workers that ReGATE's patches do not reach: set --use_ray false"
    if args.tuner_backend == "unsloth":
        return "tuner_backend unsloth replaces the model's forward with its own: set --tuner_backend peft"
    return None


def _refuse(args: Any) -> None:
    reason = refusal(args)
    if reason:
        raise TargetRefusal(reason)


def _checked_args(self, original, args=None, *, invocation: Invocation):
    """``SwiftSft._parse_args`` replacement: upstream's parsing, then the refusals, before anything loads."""
    parsed = original(self, args)
    _refuse(parsed)
    invocation.do_train = True  # ms-swift's sft always trains
    return parsed


def _checked_before_model(self, original, *args, ref_cache: str | None, invocation: Invocation, **kwargs):
    """``SwiftSft._prepare_model_tokenizer`` replacement: the cache checked against ms-swift's own
    samples before upstream loads the model (unless the pre-launch check did, for these arguments)."""
    if ref_cache is not None and (invocation.in_use is None or invocation.in_use[0] is not self.args):
        datasets = self.args.load_dataset()  # what SwiftSft._get_dataset loads, handed to it below
        invocation.in_use = (self.args, datasets)
        framework.check_cache(ref_cache, lambda: source(self.args, datasets[0], ""))
    return original(self, *args, **kwargs)


def _checked_datasets(self, original, *, invocation: Invocation):
    """``SwiftSft._get_dataset`` replacement: the datasets the cache was checked against, loaded once."""
    if invocation.in_use is not None and invocation.in_use[0] is self.args:
        (_, datasets), invocation.in_use = invocation.in_use, None
        return datasets
    return original(self)


def _merge_in_the_model(self, original, model, args, kwargs):
    """``Template.pre_forward_hook`` replacement: for a ReGATE training forward (an enabled model in training,
    with labels) upstream's hook runs without the template's ``_post_encode``, so the model merges the visual
    features itself (transformers' own code, as for the hf target) and the input ids the cache checks each
    sample by reach it. ms-swift's ``_post_encode`` (Qwen2-VL and InternVL-HF templates) would merge them
    before the forward into ``inputs_embeds`` and drop the input ids. Every other forward is upstream's."""
    if not (model.training and kwargs.get("labels") is not None and "_regate_engine" in student(model).__dict__):
        return original(self, model, args, kwargs)
    self._post_encode = _as_collated  # this call only
    try:
        return original(self, model, args, kwargs)
    finally:
        del self._post_encode


def _as_collated(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    return inputs


def _resolve_settings(trainer: Any) -> None:
    """ms-swift's automatic ``use_logits_to_keep`` (None) is off with ReGATE: it would cut the labels to
    the supervised positions before the forward; ReGATE's loss evaluates only kept rows anyway."""
    if trainer.args.use_logits_to_keep is None:
        trainer.args.use_logits_to_keep = False


# ---------------------------------------------------------------------------------------------
# Teacher pass
# ---------------------------------------------------------------------------------------------


class EncodedSamples:
    """ms-swift's training samples as its ``LazyLLMDataset`` encodes them (``template.encode`` of each
    row), without its fallback to another row: a sample it would swap is an error here."""

    def __init__(self, rows: Any, template: Any, max_length: int | None) -> None:
        self.rows, self.template, self.max_length = rows, template, max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from swift.template import MaxLengthError

        try:
            return self.template.encode(self.rows[index])
        except MaxLengthError as err:
            raise TargetRefusal(
                f"sample {index} is longer than max_length {self.max_length}, and ms-swift's truncation_strategy "
                "delete would train another sample in its place: set --truncation_strategy right (or left), or a "
                f"larger --max_length ({err})"
            ) from err


def data_digest(args: Any) -> str:
    """Hash of the training datasets' arguments and of their local files (a hub dataset counts by its name),
    so an edited sample changes the cache's dataset field even where the probe does not read it."""
    digest = hashlib.sha256()
    for spec in args.dataset:
        digest.update(spec.encode())
        path = Path(spec.split("#", 1)[0])
        if path.exists():
            for file in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
                digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]


def source(args: Any, train_dataset: Any, teacher: str) -> hf.HFScoringSource:
    """The text-only view of ms-swift's training samples (visual placeholders expanded by its template),
    named by its datasets, their contents, the template and how rows are chosen and ordered."""
    processor = args.get_model_processor(load_model=False)[1]
    template = args.get_template(processor)
    template.set_mode("train")
    choice = (f"split={args.split_dataset_ratio}|shuffle={args.dataset_shuffle}|seed={args.data_seed}|"
              f"system={args.system!r}|truncation={args.truncation_strategy}")
    name = template.template_meta.template_type
    dataset_id = f"swift:{','.join(args.dataset)}|template={name}|{choice}|data={data_digest(args)}"
    samples = EncodedSamples(train_dataset, template, template.max_length)
    return hf.HFScoringSource(samples, args.model_dir, dataset_id, template.max_length, teacher)


def scoring_source(args: list[str], teacher: str, *, invocation: Invocation | None = None) -> hf.HFScoringSource:
    """The SFT training set of ``swift sft`` arguments, built by ms-swift's own loading and template. For
    ``regate train``'s check (no teacher) the parsed arguments and datasets are kept in ``invocation``
    for the run; the teacher pass parses them into a scratch output folder (ms-swift creates it)."""
    if teacher:
        with tempfile.TemporaryDirectory() as scratch:
            parsed = parse([*args, "--output_dir", os.path.join(scratch, "out"), "--add_version", "false"])
            return source(parsed, parsed.load_dataset()[0], teacher)
    parsed = parse(args)
    datasets = parsed.load_dataset()
    if invocation is not None:
        invocation.checked_args, invocation.checked = tuple(args), (parsed, datasets)
    return source(parsed, datasets[0], teacher)


@hookimpl
def regate_targets() -> list[Target]:
    summary = "modelscope/ms-swift 4.6 SFT (hf table classes): regate train --target swift -- <swift sft arguments>"
    invocation = Invocation()  # one per `regate` command: the targets are built afresh for each
    return [Target("swift", summary, requirement=requirement,
                   apply=functools.partial(apply, invocation=invocation),
                   launch=functools.partial(launch, invocation=invocation),
                   scoring_source=functools.partial(scoring_source, invocation=invocation))]
