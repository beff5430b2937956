"""Target ``hf``: transformers' own multimodal classes (transformers >= 4.53).

``enable(model, engine)`` patches the model's class once (idempotent) and attaches the engine to this
model. A training forward with labels then runs the model's own vision encoding and multimodal merge
unchanged; only the call into the text model is intercepted: there the engine selects units, the
kept positions are packed into one row (original position ids, ``use_cache=False``) and the text
model runs with our varlen attention. The loss is evaluated on kept supervised rows only. What
differs per class (where the text model is, side inputs to pack, what is refused) is the class's
entry in ``hf_models.ADAPTERS``.

The training-forward contract (README, "The packed training forward"): the output holds the loss,
``logits`` is None and there is no cache; asking for hidden states, attentions or a cache in a
training forward with labels is an error (the packed row does not map back to the batch's shape).
Everything else (eval, generation, forwards without labels, the config, copies) is upstream's own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Iterator

import torch

from regate_plugin.attention import segment_gapped_span, segment_max_span
from regate_plugin.engine import SAMPLE_INDEX_KEY, ReGATEEngine, StepPlan
from regate_plugin.hookspecs import Target, hookimpl
from regate_plugin.packing import Packed, pack
from regate_plugin.scoring import FingerprintedSource, dataset_probe, tokenizer_fingerprint
from regate_plugin.units import IGNORE_INDEX
from regate_plugin.versions import require

from . import hf_attention
from .hf_models import ADAPTERS, Adapter, adapter_for, never

SUPPORTED = tuple(adapter.cls for adapter in ADAPTERS if adapter.refuse is never)  # trainable, not refused
_DROP_FOR_BASE_MODEL = ("labels", "num_items_in_batch", "logits_to_keep", "return_dict", "use_cache")
# Outputs a packed training forward cannot give, and what asks for each: (kwarg, config flag).
_UNAVAILABLE_OUTPUTS = {
    "hidden states": ("output_hidden_states", "output_hidden_states"),
    "attentions": ("output_attentions", "output_attentions"),
    "router logits (nor the MoE load-balancing loss they feed)": ("output_router_logits", "output_router_logits"),
}


class TrainingForwardError(ValueError):
    """A training forward with labels asked for something the packed forward does not produce."""


def requirement() -> str | None:
    return require("transformers", ">=4.53")


def enable(model: torch.nn.Module, engine: ReGATEEngine) -> torch.nn.Module:
    """Switch ReGATE on for ``model`` (a class of the adapter table); calling it again replaces the engine."""
    missing = requirement()
    if missing:
        raise RuntimeError(missing)
    adapter = adapter_for(model)
    reason = adapter.refuse(model)
    if reason:
        raise hf_attention.UnsupportedAttention(reason)
    hf_attention.install(adapter.text_model(model))
    _patch_forward(type(model))
    model._regate_engine = engine
    return model


def disable(model: torch.nn.Module) -> None:
    """Detach the engine: the model's forwards run upstream code again (the class stays patched)."""
    model.__dict__.pop("_regate_engine", None)


def _patch_forward(cls: type) -> None:
    if getattr(cls.forward, "_regate_original", None) is not None:
        return
    original = cls.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sample_index = kwargs.pop(SAMPLE_INDEX_KEY, None)
        engine: ReGATEEngine | None = self.__dict__.get("_regate_engine")
        if args:  # name positional arguments, so labels are found wherever they were passed
            bound = signature.bind(self, *args, **kwargs)
            extra = bound.arguments.pop(_var_keyword(signature), {})
            kwargs = {**{k: v for k, v in bound.arguments.items() if k != "self"}, **extra}
        if engine is None or not self.training or kwargs.get("labels") is None:
            return original(self, **kwargs)
        return _training_forward(self, engine, sample_index, kwargs)

    forward._regate_original = original
    # Show ``sample_index`` in the signature, so the Trainer's remove_unused_columns keeps it.
    index_param = inspect.Parameter(SAMPLE_INDEX_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    forward.__signature__ = signature.replace(parameters=params[:at] + [index_param] + params[at:])
    cls.forward = forward


def _var_keyword(signature: inspect.Signature) -> str | None:
    return next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)


def check_training_request(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what the packed training forward cannot return, naming who asked and the way out.

    The config's ``use_cache`` default is ignored (training never uses a cache); an explicit
    ``use_cache=True`` or a passed cache is refused, as are hidden states and attentions, whether the
    call or the config asks for them.
    """
    fix = "call the model in eval mode or without labels, or hf.disable(model) for this forward"
    config = model.config
    for what, (kwarg, flag) in _UNAVAILABLE_OUTPUTS.items():
        asked = kwargs.get(kwarg)
        if asked or (asked is None and _config_flag(config, flag)):
            source = f"{kwarg}=True" if asked else f"config.{flag}=True"
            raise TrainingForwardError(f"{source}: ReGATE's packed training forward returns no {what}; {fix}")
    if kwargs.get("use_cache"):
        raise TrainingForwardError(f"use_cache=True: ReGATE's packed training forward builds no cache; {fix}")
    passed = [k for k in ("past_key_values", "cache") if kwargs.get(k) is not None]
    if passed:
        raise TrainingForwardError(f"{passed[0]} given: ReGATE's packed training forward cannot continue a cache; {fix}")


def _config_flag(config: Any, flag: str) -> bool:
    """``flag`` on the composite config or on its text config (MoE router flags live there)."""
    return bool(getattr(config, flag, False) or getattr(config.get_text_config(), flag, False))


def packed_attention(host: Packed, device_plan: Packed, backend: str) -> hf_attention.PackedAttention:
    """The attention side of a packing plan; the segments' column spans come from the host copy."""
    return hf_attention.PackedAttention(
        device_plan.cu_seqlens, device_plan.max_seqlen, device_plan.col, segment_max_span(host.col, host.cu_seqlens),
        segment_gapped_span(host.col, host.cu_seqlens), backend,
    )


@contextlib.contextmanager
def _intercept(module: torch.nn.Module, replacement: Callable[..., Any]) -> Iterator[None]:
    """Route calls of ``module`` to ``replacement`` for the duration (hooks still run around it)."""
    module.forward = replacement
    try:
        yield
    finally:
        del module.forward


def _training_forward(model: torch.nn.Module, engine: ReGATEEngine, sample_index: Any, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    check_training_request(model, kwargs)
    labels = kwargs["labels"]
    num_items_in_batch = kwargs.get("num_items_in_batch")
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_FOR_BASE_MODEL}
    adapter = adapter_for(model)
    text_model = adapter.text_model(model)
    text_forward = type(text_model).forward
    plans: list[StepPlan] = []

    def packed_text_model(**text_kwargs: Any) -> Any:
        embeds = text_kwargs.pop("inputs_embeds")
        if embeds.shape[:2] != labels.shape:
            raise ValueError(
                f"merged embeddings {tuple(embeds.shape[:2])} and labels {tuple(labels.shape)} differ in shape: "
                "labels must cover the expanded visual tokens (use the model's processor to build input_ids)"
            )
        plan = engine.plan(labels, text_kwargs.pop("attention_mask", None), sample_index, text_kwargs.pop("position_ids", None))
        plans.append(plan)
        _refuse_unpacked_inputs(text_kwargs, adapter, labels.shape)
        text_kwargs = adapter.side_inputs(text_kwargs, plan.packed)
        text_kwargs.update(
            inputs_embeds=pack(embeds, plan.packed),
            attention_mask=None,
            position_ids=plan.packed.position_ids,
            use_cache=False,
        )
        text_kwargs[hf_attention.PACKED_KEY] = packed_attention(plan.host, plan.packed, engine.config.attn_backend)
        with hf_attention.implementation(text_model.config, hf_attention.NAME):
            return text_forward(text_model, **text_kwargs)

    with _intercept(text_model, packed_text_model):
        outputs = model.model(**base_kwargs, use_cache=False)
    if len(plans) != 1:
        raise RuntimeError(f"expected one text-model call in {type(model).__name__}.forward, saw {len(plans)}")
    loss = engine.loss(plans[0], outputs.last_hidden_state, adapter.lm_head(model), num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _refuse_unpacked_inputs(text_kwargs: dict[str, Any], adapter: Adapter, batch_shape: torch.Size) -> None:
    """A text-model keyword laid out like the batch (B, L, ...) that the adapter does not pack would
    reach the packed row misaligned: refuse it, naming the class and the keyword."""
    for key, value in text_kwargs.items():
        if key in adapter.side_keys or not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        if value.shape[:2] == batch_shape:
            raise hf_attention.UnsupportedAttention(
                f"{adapter.cls} passes {key} {tuple(value.shape)} to its text model, laid out like the batch; "
                "the hf adapter table does not pack it: add it to the class's side inputs, or train without hf.enable"
            )


@hookimpl
def regate_targets() -> list[Target]:
    summary = "transformers' multimodal classes (see the table below): regate_plugin.patches.hf.enable(model, engine)"
    return [Target("hf", summary, requirement=requirement, scoring_source=scoring_source, details=class_table())]


def class_table() -> tuple[str, ...]:
    """One line per class of the adapter table: name, transformers range, family, how it is tested."""
    width = max(len(adapter.cls) for adapter in ADAPTERS)
    return tuple(f"{a.cls:{width}s} transformers{a.transformers:8s} {a.family}; tests: {a.tests}" for a in ADAPTERS)


# ---------------------------------------------------------------------------------------------
# Teacher pass: `regate score --target hf --teacher LM_DIR --out CACHE -- --dataset MOD:FN --student DIR`
# ---------------------------------------------------------------------------------------------

VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def _load_student(student: str) -> tuple[Any, Any, list[int]]:
    """The student's config, tokenizer and visual placeholder token ids."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(student)
    visual = sorted({getattr(config, key) for key in VISUAL_TOKEN_KEYS if getattr(config, key, None) is not None})
    return config, AutoTokenizer.from_pretrained(student), visual


class HFScoringSource(FingerprintedSource):
    """Text-only views of a dataset whose samples carry ``input_ids`` with the visual placeholders
    already expanded (what transformers' processors produce) and ``labels``.

    Training checks its cache with ``RefCache.open(path, expect=HFScoringSource(...).expected())``
    when it starts (a probe of 64 samples), and the engine checks every micro-batch's samples.
    """

    def __init__(
        self, dataset: Any, student: str, dataset_id: str, max_length: int | None = None, teacher: str | None = None
    ) -> None:
        config, tokenizer, visual = _load_student(student)
        self.dataset = dataset
        self.visual_ids = torch.tensor(visual, dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else getattr(config.get_text_config(), "pad_token_id", 0) or 0)
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.decode = tokenizer.decode
        self.teacher = teacher or ""
        self.fields = {
            "dataset": f"{dataset_id}|n={len(dataset)}|probe={dataset_probe(self.text_only, len(dataset))}",
            "tokenizer": self.tokenizer_fingerprint,
            "visual_tokens": "expanded in input_ids: " + ",".join(map(str, visual)),
            "max_length": int(max_length or min(tokenizer.model_max_length, 2**31 - 1)),
        }

    @staticmethod
    def load_tokenizer(path: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def text_only(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        input_ids = torch.as_tensor(item["input_ids"]).reshape(-1)
        labels = torch.as_tensor(item["labels"]).reshape(-1)
        visual = torch.isin(input_ids, self.visual_ids)
        if (labels[visual] != IGNORE_INDEX).any():
            raise ValueError(f"sample {index} has labels on visual placeholder tokens: mask them with {IGNORE_INDEX}")
        return input_ids.masked_fill(visual, self.pad_token_id), labels


def import_from_cwd(module_name: str) -> Any:
    """Import ``--dataset``'s module as ``python -m`` would, the current directory first: the ``regate``
    console script's ``sys.path`` starts at its own bin/ folder, where no user module lives."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def scoring_source(args: list[str], teacher: str) -> HFScoringSource:
    """Parse the target arguments after ``--`` and build the source."""
    parser = argparse.ArgumentParser(prog="regate score --target hf ... --", description=scoring_source.__doc__)
    parser.add_argument("--dataset", required=True, help="MODULE:CALLABLE returning the training dataset")
    parser.add_argument("--student", required=True, help="folder with the student's config and tokenizer")
    parser.add_argument("--dataset-id", help="names the dataset in the fingerprint [the --dataset value]")
    parser.add_argument("--max-length", type=int, help="truncation length [the tokenizer's model_max_length]")
    options = parser.parse_args(args)
    module_name, _, attr = options.dataset.partition(":")
    if not attr:
        parser.error(f"--dataset {options.dataset!r} must be MODULE:CALLABLE")
    dataset = getattr(import_from_cwd(module_name), attr)()
    return HFScoringSource(dataset, options.student, options.dataset_id or options.dataset, options.max_length, teacher)
