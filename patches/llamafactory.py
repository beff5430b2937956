"""Target ``llamafactory``: hiyouga/LLaMA-Factory's SFT workflow (PyPI ``llamafactory`` 0.9.5) on
transformers' own multimodal classes (those of the hf target's adapter table).

``regate train --target llamafactory -- train.yaml [key=value ...]`` applies these patches and runs
LLaMA-Factory's own ``run_exp()`` in-process (what ``llamafactory-cli train`` runs; under ``torchrun``
or ``deepspeed`` too):

* ``get_train_args`` refuses what ReGATE cannot compose with (another stage than ``sft``, ``packing``,
  ``neat_packing``, streaming, a loss LLaMA-Factory computes itself: ``use_dft_loss``, ``use_eaft_loss``,
  ``use_asft_loss``, ``label_smoothing_factor``) before anything loads.
* ``get_dataset``, as the SFT workflow calls it (before the model loads), checks the reference cache
  against the dataset LLaMA-Factory just built; under ``regate train --ref-cache`` it hands over the
  dataset the pre-launch check built from the same arguments instead (tokenized once).
* ``CustomSeq2SeqTrainer.__init__``, after upstream's (``framework.trainer_init``): the training dataset
  and collator carry each sample's index (``trainer.IndexedDataset``/``IndexedCollator``; evaluation is
  upstream's), the model (inside its LoRA wrapper, if any) gets the hf target's packed training forward
  (``hf.enable``), and ReGATE's callback is attached.
* After ``run_exp``, a training run whose patched trainer never ran (it trained without ReGATE) is an error.

``regate score --target llamafactory -- train.yaml`` builds the samples with LLaMA-Factory's own
tokenizer loading, template, multimodal plugin and ``get_dataset``, so ``cutoff_len`` truncation and
the visual-token expansion are training's by construction; the text-only view replaces the expanded
visual placeholders with padding (``hf.HFScoringSource``).
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Any

from regate_plugin.config import ReGATEConfig
from regate_plugin.hookspecs import Target, TargetRefusal, hookimpl
from regate_plugin.refcache import sha256_file
from regate_plugin.versions import require

from . import framework, hf, upstream
from .framework import Invocation


def requirement() -> str | None:
    return require("llamafactory", ">=0.9.5,<0.10") or require("transformers", ">=4.55") or hf.requirement()


def apply(config: ReGATEConfig, ref_cache: str | None, *, resume_without_state: bool = False,
          invocation: Invocation | None = None) -> None:
    """Patch LLaMA-Factory's SFT workflow for ReGATE (``ref_cache=None``: packing only). Idempotent.
    ``resume_without_state``: a checkpoint without ReGATE's state (a baseline's) may be resumed."""
    from llamafactory.train import tuner
    from llamafactory.train.sft import trainer, workflow

    invocation = invocation or Invocation()
    invocation.applied = True
    upstream.wrap(tuner, "get_train_args", functools.partial(_checked_train_args, invocation=invocation))
    upstream.wrap(workflow, "get_dataset", _checked_get_dataset(ref_cache, invocation))
    upstream.wrap(trainer.CustomSeq2SeqTrainer, "__init__",
                  framework.trainer_init(config, ref_cache, resume_without_state, invocation))


def launch(args: list[str], attn_implementation: str | None = None, *, invocation: Invocation | None = None) -> None:
    """Run LLaMA-Factory's ``run_exp()`` on ``args`` (``train.yaml [key=value ...]``), in this process.
    The attention of unpacked forwards is the YAML's ``flash_attn`` (LLaMA-Factory's own setting).
    With ReGATE applied, a training run that never reached the patched trainer is an error."""
    from llamafactory.train.tuner import run_exp

    if attn_implementation is not None:
        raise TargetRefusal("--attn-implementation does not apply to LLaMA-Factory: set flash_attn in the YAML")
    invocation = invocation or Invocation()
    invocation.launch_args = tuple(args)
    run_exp(_read_args(args))
    framework.check_trainer_ran(invocation, "LLaMA-Factory", "CustomSeq2SeqTrainer",
                                "use_ray, or a LLaMA-Factory whose SFT workflow builds another trainer: set use_ray: "
                                "false and use llamafactory 0.9.5")


def _read_args(args: list[str]) -> Any:
    """LLaMA-Factory's own reading of ``llamafactory-cli train`` arguments (a YAML file and
    ``key=value`` overrides, or ``--key value`` flags)."""
    from llamafactory.hparams.parser import read_args

    argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        return read_args()
    finally:
        sys.argv = argv


# LLaMA-Factory's losses that set the Trainer's compute_loss_func: the Trainer then pops the labels
# before the forward, which falls back to the dense forward without them.
OWN_LOSSES = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")


def refusal(data_args: Any, training_args: Any, finetuning_args: Any) -> str | None:
    """Why ReGATE cannot train with these arguments, or None."""
    if finetuning_args.stage != "sft":
        return f"ReGATE trains LLaMA-Factory's sft stage, not {finetuning_args.stage!r}: set stage: sft"
    if getattr(finetuning_args, "use_mca", False) or getattr(finetuning_args, "use_hyper_parallel", False):
        return "ReGATE patches LLaMA-Factory's own SFT trainer: set use_mca: false and use_hyper_parallel: false"
    if data_args.packing or data_args.neat_packing:
        return ("packing/neat_packing concatenate several samples into one row, which then has no single sample "
                "index for the reference cache and the EMA table; ReGATE packs the kept tokens of a micro-batch itself "
                "(padding removed): set packing: false and neat_packing: false")
    if data_args.streaming:
        return "streaming datasets have no sample index: set streaming: false"
    for name in OWN_LOSSES:
        if getattr(finetuning_args, name):
            return (f"{name} makes LLaMA-Factory compute the loss itself (a compute_loss_func), without the labels "
                    f"ReGATE trains on, so it would silently train dense: set {name}: false")
    return framework.label_smoothing_refusal(training_args, "label_smoothing_factor: 0")


def _checked_train_args(args, original, invocation: Invocation):
    """``tuner.get_train_args`` replacement (``upstream.wrap`` passes its one argument first): upstream's
    parsing, then the refusals, before anything loads."""
    parsed = original(args)
    reason = refusal(parsed[1], parsed[2], parsed[3])
    if reason:
        raise TargetRefusal(reason)
    invocation.do_train = bool(parsed[2].do_train)
    return parsed


def _checked_get_dataset(ref_cache: str | None, invocation: Invocation):
    """``workflow.get_dataset`` replacement (``upstream.wrap`` passes the template first): the cache
    checked against the dataset LLaMA-Factory built, before ``load_model``. The dataset the pre-launch
    check built from this launch's arguments, already checked, is used instead of building it again."""

    def get_dataset(template, original, model_args, data_args, training_args, stage, **tokenizer_module):
        checked = invocation.take_checked() if stage == "sft" else None
        if checked is not None:
            return checked
        module = original(template, model_args, data_args, training_args, stage, **tokenizer_module)
        if ref_cache is not None and training_args.do_train:
            framework.check_cache(ref_cache, lambda: source(module["train_dataset"], model_args, data_args, ""))
        return module

    return get_dataset


# ---------------------------------------------------------------------------------------------
# Teacher pass
# ---------------------------------------------------------------------------------------------


def data_digest(data_args: Any) -> str:
    """Hash of the datasets' dataset_info.json entries and of their local record files (a hub dataset
    counts by its entry; images by the token counts they give), so an edited sample changes the cache's
    dataset field even where the probe does not read it."""
    from llamafactory.data.parser import get_dataset_list

    digest = hashlib.sha256()
    for attr in get_dataset_list(data_args.dataset, data_args.dataset_dir):
        digest.update(repr(attr).encode())
        path = Path(data_args.dataset_dir) / attr.dataset_name
        if attr.load_from == "file" and path.exists():
            for file in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
                digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]


def source(dataset: Any, model_args: Any, data_args: Any, teacher: str) -> hf.HFScoringSource:
    """The text-only view of LLaMA-Factory's tokenized SFT dataset (visual placeholders already expanded
    by its multimodal plugin), named by its datasets, their contents and the template."""
    names = ",".join(data_args.dataset)
    dataset_id = f"llamafactory:{names}|template={data_args.template}|data={data_digest(data_args)}"
    return hf.HFScoringSource(dataset, model_args.model_name_or_path, dataset_id, data_args.cutoff_len, teacher)


def scoring_source(args: list[str], teacher: str, *, invocation: Invocation | None = None) -> hf.HFScoringSource:
    """The SFT training set of ``train.yaml [key=value ...]``, built by LLaMA-Factory's own pipeline;
    kept in ``invocation`` for the run's own ``get_dataset``."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(_read_args(args))
    reason = refusal(data_args, training_args, finetuning_args)
    if reason:
        raise TargetRefusal(reason)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    if invocation is not None:
        invocation.checked_args, invocation.checked = tuple(args), module
    return source(module["train_dataset"], model_args, data_args, teacher)


@hookimpl
def regate_targets() -> list[Target]:
    summary = "hiyouga/LLaMA-Factory 0.9.5 SFT (hf table classes): regate train --target llamafactory -- train.yaml"
    invocation = Invocation()  # one per `regate` command: the targets are built afresh for each
    return [Target("llamafactory", summary, requirement=requirement,
                   apply=functools.partial(apply, invocation=invocation),
                   launch=functools.partial(launch, invocation=invocation),
                   scoring_source=functools.partial(scoring_source, invocation=invocation))]
