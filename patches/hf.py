"""Target ``hf``: transformers' own multimodal classes (transformers >= 4.53).

``enable(model, engine)`` patches the model's class once (idempotent) and attaches the engine to this
model. A training forward with labels then runs the model's own vision encoding and multimodal merge
unchanged; only the call into the text model is intercepted: there the engine selects units, the
kept positions are packed into one row (original position ids, ``use_cache=False``) and the text
model runs with our varlen attention. The loss is evaluated on kept supervised rows only. What
differs per class (where the text model is, side inputs to pack, what is refused) is the class's
entry in ``hf_models.ADAPTERS``.

The training-forward contract (docs/concepts/composing.md, "The packed training forward"): the output holds the loss,
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
import logging
import os
import sys
import types
from typing import Any, Callable, Iterator

import torch

from regate_plugin.attention import segment_gapped_span, segment_max_span
from regate_plugin.engine import SAMPLE_INDEX_KEY, ReGATEEngine, StepPlan
from regate_plugin.hookspecs import Target, TargetRefusal, hookimpl
from regate_plugin.identity import mark_visual
from regate_plugin.packing import Packed, pack
from regate_plugin.scoring import FingerprintedSource, dataset_probe, tokenizer_fingerprint
from regate_plugin.units import IGNORE_INDEX
from regate_plugin.versions import require

from . import hf_attention
from .hf_models import ADAPTERS, Adapter, adapter_for, never

SUPPORTED = tuple(adapter.cls for adapter in ADAPTERS if adapter.refuse is never)  # trainable, not refused
logger = logging.getLogger(__name__)
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


def enable(model: torch.nn.Module, engine: ReGATEEngine, *, allow_subclass_forward: bool = False) -> torch.nn.Module:
    """Switch ReGATE on for ``model`` (a class of the adapter table); calling it again replaces the engine.

    The adapter's class gets the dispatching forward (once, process-wide); a forward set on the model
    instance (Liger-Kernel's fused cross-entropy, accelerate's device hooks) is wrapped where it sits,
    so its own code still runs on every call the packed path does not take. A subclass with a
    ``forward`` of its own is refused unless ``allow_subclass_forward``: then its forward runs and
    reaches the packed path through ``super().forward(...)``.
    """
    missing = requirement()
    if missing:
        raise RuntimeError(missing)
    adapter = adapter_for(model)
    reason = adapter.refuse(model)
    if reason:
        raise hf_attention.UnsupportedAttention(reason)
    base = _adapter_class(model, adapter)
    own = _own_forward(model, base)
    if own is not None and not allow_subclass_forward:
        raise SubclassForward(
            f"{own.__name__} defines its own forward over {base.__name__}: ReGATE's packed training forward "
            f"would skip its code on every step. Make it call super().forward(...) for the language-model "
            f"loss and pass hf.enable(model, engine, allow_subclass_forward=True), or train without ReGATE"
        )
    attention = hf_attention.install(adapter.text_model(model))
    patched = _patch_forward(base)
    model._regate_engine = engine
    instance = _arm_instance(model, base)
    logger.info(
        "ReGATE on %s: adapter %s (%s); forward %s%s; packed attention in %s",
        type(model).__name__, adapter.cls, adapter.family, f"of {base.__name__} patched" if patched else
        f"of {base.__name__} already patched", f", instance forward {instance} wrapped" if instance else "",
        ", ".join(attention) or "no new class",
    )
    return model


def disable(model: torch.nn.Module) -> None:
    """Detach the engine: the model's forwards run upstream code again (the class stays patched)."""
    model.__dict__.pop("_regate_engine", None)


def rearm(model: torch.nn.Module) -> str | None:
    """Put the dispatching forward back wherever a library replaced it since ``enable`` (Liger-Kernel
    applied by the Trainer when training begins, at class or instance level). Returns what was
    wrapped again, None when nothing was. A model without an engine is left alone."""
    if "_regate_engine" not in model.__dict__:
        return None
    base = _adapter_class(model, adapter_for(model))
    done = [f"class {base.__name__}"] if _patch_forward(base) else []
    instance = _arm_instance(model, base)
    done += [f"instance forward {instance}"] if instance else []
    return ", ".join(done) or None


class SubclassForward(TargetRefusal):
    """The model's class overrides the supported class's forward; the packed path would skip it."""


def _adapter_class(model: torch.nn.Module, adapter: Adapter) -> type:
    return next(cls for cls in type(model).__mro__ if cls.__name__ == adapter.cls)


def _own_forward(model: torch.nn.Module, base: type) -> type | None:
    """The first class above ``base`` in the model's MRO that defines ``forward`` itself, if any."""
    for cls in type(model).__mro__:
        if cls is base:
            return None
        if "forward" in cls.__dict__:
            return cls
    return None


def _is_ours(forward: Any) -> bool:
    return getattr(getattr(forward, "__func__", forward), "_regate_original", None) is not None


def _forward_slot(module: torch.nn.Module) -> str:
    """Where the module's own forward is looked up: accelerate's hooks keep it in ``_old_forward``
    and put their wrapper in ``forward``; without hooks, ``forward``."""
    wrapper = module.__dict__.get("forward")
    hooked = isinstance(wrapper, functools.partial) and getattr(wrapper.func, "__module__", "").startswith("accelerate")
    return "_old_forward" if hooked and "_old_forward" in module.__dict__ else "forward"


def _dispatching(call_original: Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """A forward that takes the packed path for a training call with labels on an enabled model, and
    ``call_original(self, **kwargs)`` for every other call."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sample_index = kwargs.pop(SAMPLE_INDEX_KEY, None)
        engine: ReGATEEngine | None = self.__dict__.get("_regate_engine")
        if args:  # name positional arguments, so labels are found wherever they were passed
            bound = signature.bind(self, *args, **kwargs)
            extra = bound.arguments.pop(_var_keyword(signature), {})
            kwargs = {**{k: v for k, v in bound.arguments.items() if k != "self"}, **extra}
        if engine is None or not self.training or kwargs.get("labels") is None:
            return call_original(self, **kwargs)
        return _training_forward(self, engine, sample_index, kwargs)

    return forward


def _dispatching_around(current: Any, call_original: Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """The dispatching forward in place of ``current`` (marked with it as ``_regate_original``), which
    binds positional arguments by ``signature`` and shows ``sample_index`` in it."""
    forward = functools.wraps(current)(_dispatching(call_original, signature))
    forward._regate_original = current
    forward.__signature__ = _with_index_signature(signature)
    return forward


def _with_index_signature(signature: inspect.Signature) -> inspect.Signature:
    """``sample_index`` in the signature, so the Trainer's remove_unused_columns keeps it."""
    index_param = inspect.Parameter(SAMPLE_INDEX_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return signature.replace(parameters=params[:at] + [index_param] + params[at:])


def _patch_forward(cls: type) -> bool:
    """Give ``cls`` the dispatching forward around whatever forward it has now (upstream's, or one a
    library put there since, e.g. Liger-Kernel's class-level patch). False when it already has it."""
    current = cls.__dict__["forward"]
    if _is_ours(current):
        return False
    cls.forward = _dispatching_around(current, current, inspect.signature(current))
    return True


def _arm_instance(model: torch.nn.Module, base: type) -> str | None:
    """Wrap a forward set on the model instance (which hides the class's) in the dispatching forward,
    inside accelerate's hooks when there are any. Returns the wrapped forward's name, or None."""
    slot = _forward_slot(model)
    current = model.__dict__.get(slot)
    if current is None or _is_ours(current):
        return None
    signature = inspect.signature(base.__dict__["forward"]._regate_original)
    forward = _dispatching_around(current, lambda self, **kwargs: current(**kwargs), signature)
    model.__dict__[slot] = types.MethodType(forward, model)
    return getattr(current, "__qualname__", type(current).__name__)


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


_UNSET = object()


@contextlib.contextmanager
def _intercept(module: torch.nn.Module, replacement: Callable[..., Any]) -> Iterator[None]:
    """Route calls of ``module`` to ``replacement`` for the duration: in place of its own forward, so
    accelerate's hooks (device placement, offload) still run around it; whatever forward the module
    had on its instance is put back afterwards."""
    slot = _forward_slot(module)
    saved = module.__dict__.get(slot, _UNSET)
    module.__dict__[slot] = replacement
    try:
        yield
    finally:
        if saved is _UNSET:
            del module.__dict__[slot]
        else:
            module.__dict__[slot] = saved


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
        plan = engine.plan(labels, text_kwargs.pop("attention_mask", None), sample_index, text_kwargs.pop("position_ids", None),
                           context_ids=context_ids(model.config, kwargs.get("input_ids")) if engine.checks_contexts else None)
        plans.append(plan)
        _refuse_unpacked_inputs(text_kwargs, adapter, labels.shape)
        text_kwargs = adapter.side_inputs(text_kwargs, plan.packed)
        text_kwargs.update(
            inputs_embeds=pack(embeds, plan.packed),
            attention_mask=None,
            position_ids=plan.packed.position_ids,
            use_cache=False,
        )
        packed = text_kwargs[hf_attention.PACKED_KEY] = packed_attention(plan.host, plan.packed, engine.config.attn_backend)
        with hf_attention.packed_config(text_model, packed):
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
def regate_rearm(model: torch.nn.Module) -> str | None:
    try:
        adapter_for(model)
    except TypeError:  # another target's model
        return None
    return rearm(model)


@hookimpl
def regate_targets() -> list[Target]:
    summary = "transformers' multimodal classes (see the table below): regate_plugin.patches.hf.enable(model, engine)"
    return [Target("hf", summary, requirement=requirement, scoring_source=scoring_source, details=class_table())]


def class_table() -> tuple[str, ...]:
    """A legend and one line per class of the adapter table: name, the transformers range it trains on
    or ``refused`` (the packed path cannot train it), family; narrow enough for ``regate targets`` to
    fit 100 columns (how each class is tested: docs/targets/hf.md)."""
    width = max(len(adapter.cls) for adapter in ADAPTERS)
    rows = [f"{a.cls:{width}s} {a.transformers if a.refuse is never else 'refused':7s} {a.family}" for a in ADAPTERS]
    return ("class, the transformers range it trains on (or refused), family:", *rows)


# ---------------------------------------------------------------------------------------------
# Teacher pass: `regate score --target hf --teacher LM_DIR --out CACHE -- --dataset MOD:FN --student DIR`
# ---------------------------------------------------------------------------------------------

VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def visual_token_ids(config: Any) -> list[int]:
    """The config's visual placeholder token ids (what the processor expands per visual token)."""
    return sorted({getattr(config, key) for key in VISUAL_TOKEN_KEYS if getattr(config, key, None) is not None})


def context_ids(config: Any, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The canonical context of a batch (``identity.mark_visual``): ``input_ids`` with the config's
    visual placeholders marked, as ``HFScoringSource.context`` marks them; None without input ids."""
    if input_ids is None:
        return None
    visual = torch.tensor(visual_token_ids(config), dtype=input_ids.dtype, device=input_ids.device)
    return mark_visual(input_ids, torch.isin(input_ids, visual))


def _load_student(student: str) -> tuple[Any, Any, list[int]]:
    """The student's config, tokenizer and visual placeholder token ids."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(student)
    return config, AutoTokenizer.from_pretrained(student), visual_token_ids(config)


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

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids with the visual placeholders marked, labels); ``text_only`` pads them instead."""
        item = self.dataset[index]
        input_ids = torch.as_tensor(item["input_ids"]).reshape(-1)
        labels = torch.as_tensor(item["labels"]).reshape(-1)
        visual = torch.isin(input_ids, self.visual_ids)
        if (labels[visual] != IGNORE_INDEX).any():
            raise ValueError(f"sample {index} has labels on visual placeholder tokens: mask them with {IGNORE_INDEX}")
        return mark_visual(input_ids, visual), labels


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
