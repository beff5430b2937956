"""What the targets that patch a LLaVA-family training script share (``llava``, ``videollama2``):
wrapping upstream methods once, sample indices through dataset and collator, the trainer's
``__init__`` that opens the reference cache and puts the engine on the model, the in-process
launch, the packed training forward after upstream's own multimodal merge, and for the teacher
pass the token-id carrier, the fingerprint fields and the scoring source's common tail.

Run state lives on the model (``model._regate_engine``, as for the hf target) and a launch's
settings in the patch itself (``wrap`` with a replacement bound to them), never in module globals.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import sys
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import torch

from regate_plugin.attention import segment_gapped_span, segment_max_span
from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import SAMPLE_INDEX_KEY, ReGATEEngine
from regate_plugin.identity import mark_visual
from regate_plugin.once import computed_once
from regate_plugin.packing import pack
from regate_plugin.refcache import RefCache
from regate_plugin.scoring import FingerprintedSource, tokenizer_fingerprint
from regate_plugin.wrappers import student

from . import legacy_attention

logger = logging.getLogger(__name__)


def wrap(cls: type | ModuleType, name: str, replacement: Callable[..., Any]) -> None:
    """Route ``cls.name`` to ``replacement(self, original, ...)``. The method is wrapped once; wrapping
    it again swaps the replacement (a second launch in one process runs with its own settings)."""
    current = getattr(cls, name)
    if getattr(current, "_regate_original", None) is not None:
        current._regate_replacement = replacement
        return
    original = current

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return patched._regate_replacement(self, original, *args, **kwargs)

    patched._regate_original = original
    patched._regate_replacement = replacement
    setattr(cls, name, patched)
    owner = cls.__name__ if isinstance(cls, ModuleType) else f"{cls.__module__}.{cls.__qualname__}"
    logger.info("ReGATE patched %s.%s", owner, name)


def getitem_with_index(self, original, index):
    """Dataset ``__getitem__`` that records the index. If upstream falls back to another sample
    (a recursive ``__getitem__``), the inner call already recorded the index that produced it."""
    item = original(self, index)
    item.setdefault(SAMPLE_INDEX_KEY, index)
    return item


def collate_with_index(self, original, instances):
    """Collator ``__call__`` that strips the indices from the samples and stacks them into the batch."""
    indices = [int(instance[SAMPLE_INDEX_KEY]) for instance in instances]
    batch = original(self, [{k: v for k, v in i.items() if k != SAMPLE_INDEX_KEY} for i in instances])
    batch[SAMPLE_INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
    return batch


def shim_init(attn_backend: str) -> Callable[..., None]:
    """Model ``__init__`` replacement: upstream's, then the legacy attention shim on its decoder."""

    def init(self, original, *args, **kwargs):
        original(self, *args, **kwargs)
        legacy_attention.install(self.model, attn_backend)

    return init


def engine_of(model: torch.nn.Module) -> ReGATEEngine | None:
    """The engine the trainer put on ``model`` (None: upstream's forward)."""
    return model.__dict__.get("_regate_engine")


def trainer_init(config: ReGATEConfig, ref_cache: str | None, expected: Callable[[Any, Any], dict[str, Any]],
                 check: Callable[[Any], None] = lambda model: None,
                 resume_without_state: bool = False) -> Callable[..., None]:
    """Trainer ``__init__`` replacement: upstream's, then ``check(model)`` (refuses a model the target
    cannot train), the reference cache checked against this run (``expected(trainer, model)``: its
    fingerprint fields) before any step, the engine on the model, and ReGATE's callback
    (``resume_without_state``: resuming a checkpoint without ReGATE's state is allowed)."""

    def init(self, original, *args, **kwargs):
        from regate_plugin.trainer import attach

        original(self, *args, **kwargs)
        model = student(self.model)
        check(model)
        cache = None if ref_cache is None else computed_once(lambda: RefCache.open(ref_cache, expect=expected(self, model)))
        model._regate_engine = ReGATEEngine(config, cache)
        attach(self, model._regate_engine, resume_without_state=resume_without_state)

    return init


def launch_train(train: Callable[[str], None], args: list[str], attn_implementation: str | None) -> None:
    """Call upstream's ``train(attn_implementation)`` on its command-line ``args``, in this process."""
    allow_rng_state_load()
    sys.argv = [sys.argv[0], *args]
    train(resolved_attn_implementation(attn_implementation))


def resolved_attn_implementation(requested: str | None) -> str:
    """The attention of upstream's unpacked forwards: the one asked for, else flash_attention_2 (what
    upstream's scripts pass, which needs flash-attn) when flash-attn is installed, else sdpa."""
    return requested or ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")


def rng_state_globals() -> list[Any]:
    """What a pickled ``numpy.random.get_state()`` refers to, and nothing else: numpy's array
    rebuilder, the array and dtype classes, and the class of its uint32 dtype."""
    import numpy as np

    key = np.random.get_state()[1]
    return [key.__reduce__()[0], np.ndarray, np.dtype, type(key.dtype)]


def allow_rng_state_load() -> None:
    """Make resuming work on the pinned stacks (transformers 4.36-4.42) with torch >= 2.6: their
    ``Trainer._load_rng_state`` reads its own ``rng_state*.pth`` with ``torch.load``'s default
    ``weights_only=True``, which refuses the numpy RNG state in it. Only numpy's RNG-state types
    are allowed, only during that load (no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``); a no-op on torch
    without ``safe_globals``."""
    from transformers import Trainer

    if hasattr(torch.serialization, "safe_globals"):
        wrap(Trainer, "_load_rng_state", _load_rng_state)


def _load_rng_state(self, original, checkpoint):
    with torch.serialization.safe_globals(rng_state_globals()):
        return original(self, checkpoint)


class TokenIdCarrier:
    """Stands in for the model in upstream's ``prepare_inputs_labels_for_multimodal``: two-channel
    'embeddings' (float64, exact): the token id, or the pad id for a visual feature, and 1 where the
    position is visual. ``config`` holds the model-config fields upstream's merge reads (LLaVA's)."""

    device = torch.device("cpu")

    def __init__(self, num_visual: int, pad_token_id: int, **config: Any) -> None:
        self.num_visual, self.pad_token_id = num_visual, pad_token_id
        self.config = SimpleNamespace(**config)

    def get_vision_tower(self):
        return self

    def get_model(self):
        return self

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([ids.double(), torch.zeros_like(ids, dtype=torch.float64)], dim=-1)

    def visual_features(self, count: int) -> torch.Tensor:
        features = torch.ones((count, self.num_visual, 2), dtype=torch.float64)
        features[..., 0] = self.pad_token_id
        return features

    @staticmethod
    def token_ids(embeds: torch.Tensor) -> torch.Tensor:
        """The merged token ids (the pad id at visual positions)."""
        return embeds[..., 0].long()

    @staticmethod
    def context_ids(embeds: torch.Tensor) -> torch.Tensor:
        """The merged canonical context ids (``identity.mark_visual``)."""
        return mark_visual(embeds[..., 0].long(), embeds[..., 1] > 0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:  # LLaVA's name
        return self.visual_features(images.shape[0])

    def encode_images_or_videos(self, images: list[Any]) -> torch.Tensor:  # VideoLLaMA2's name
        return self.visual_features(len(images))


def merged_context(context_ids: torch.Tensor, carrier_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The context ids of a merged micro-batch, from upstream's merge run again on a ``TokenIdCarrier``;
    refused unless that merge gave the labels the model's own merge gave (the two line up)."""
    if carrier_labels.shape != labels.shape or not torch.equal(carrier_labels.cpu(), labels.cpu()):
        raise RuntimeError(
            f"upstream's multimodal merge of the token ids gave labels {tuple(carrier_labels.shape)} unlike the model's "
            f"{tuple(labels.shape)}: ReGATE cannot check this micro-batch against the reference cache; report it with "
            "your upstream version"
        )
    return context_ids


def fingerprint_fields(dataset: str, tokenizer: Any, visual_tokens: str) -> dict[str, Any]:
    """The cache's fingerprint fields for a LLaVA-family run (the dataset field is the target's own)."""
    return {
        "dataset": dataset,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "visual_tokens": visual_tokens,
        "max_length": int(tokenizer.model_max_length),
    }


class RecordsSource(FingerprintedSource):
    """The common tail of a LLaVA-family scoring source: ``records`` turned text-only one by one by
    ``sample`` (upstream's own preprocessing and merge), with the tokenizer's facts."""

    use_fast = True

    def finish(self, records: list[Any], context: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
               tokenizer: Any, fields: Callable[[], dict[str, Any]], teacher: str) -> None:
        self.records, self._context = records, context
        self.pad_token_id = tokenizer.pad_token_id
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.decode = tokenizer.decode
        self.fields = fields()  # after records and sample: the dataset probe reads text_only
        self.teacher = teacher

    @classmethod
    def load_tokenizer(cls, path: str) -> Any:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(path, use_fast=cls.use_fast)

    def __len__(self) -> int:
        return len(self.records)

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._context(self.records[index])


def parse_sample_arguments(model_cls: type, data_cls: type, training_cls: type, args: list[str]) -> tuple[Any, Any, int]:
    """Upstream's model and data arguments from its command line, and the one training argument
    the samples depend on, ``--model_max_length`` (upstream's default when absent). The other
    training arguments are skipped, not parsed: none is required (``--output_dir``) and none acts
    (``--deepspeed`` starting a process group, ``--bf16`` refused on a CPU)."""
    import transformers

    default = next(f.default for f in dataclasses.fields(training_cls) if f.name == "model_max_length")
    lengths = dataclasses.make_dataclass("Lengths", [("model_max_length", int, dataclasses.field(default=default))])
    parser = transformers.HfArgumentParser((model_cls, data_cls, lengths), allow_abbrev=False)
    model_args, data_args, parsed, _ = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    return model_args, data_args, int(parsed.model_max_length)


def packed_loss(model: torch.nn.Module, engine: ReGATEEngine, embeds: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None, sample_index: Any, position_ids: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None) -> Any:
    """The training forward after upstream's merge: plan, pack, decoder layers through the shim, loss.
    ``context_ids``: the merged batch's canonical context (``merged_context``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plan = engine.plan(labels, attention_mask, sample_index, position_ids, context_ids=context_ids)
    packed, host = plan.packed, plan.host
    cols = host.position_ids[0]  # these stacks number a sample's tokens 0..n-1
    hidden = legacy_attention.packed_decoder(model.model, pack(embeds, packed), packed.position_ids, packed.cu_seqlens,
                                             packed.max_seqlen, segment_max_span(cols, host.cu_seqlens),
                                             segment_gapped_span(cols, host.cu_seqlens))
    return CausalLMOutputWithPast(loss=engine.loss(plan, hidden, model.lm_head))
