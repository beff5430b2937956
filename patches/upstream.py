"""What the targets that patch a LLaVA-family training script share (``llava``, ``videollama2``):
wrapping upstream methods once, sample indices through dataset and collator, the in-process
launch, and the packed training forward after upstream's own multimodal merge."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from typing import Any, Callable

import torch

from regate_plugin.attention import segment_max_span
from regate_plugin.engine import SAMPLE_INDEX_KEY, ReGATEEngine
from regate_plugin.packing import pack

from . import legacy_attention


def wrap(cls: type, name: str, replacement: Callable[..., Any]) -> None:
    """Replace ``cls.name`` by ``replacement(self, original, ...)``, once."""
    original = getattr(cls, name)
    if getattr(original, "_regate_original", None) is not None:
        return

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return replacement(self, original, *args, **kwargs)

    patched._regate_original = original
    setattr(cls, name, patched)


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


def shim_init(run: dict[str, Any]) -> Callable[..., None]:
    """Model ``__init__`` replacement: upstream's, then the legacy attention shim on its decoder."""

    def init(self, original, *args, **kwargs):
        original(self, *args, **kwargs)
        legacy_attention.install(self.model, run["config"].attn_backend)

    return init


def launch_train(train: Callable[[str], None], args: list[str], attn_implementation: str | None) -> None:
    """Call upstream's ``train(attn_implementation)`` on its command-line ``args``, in this process."""
    if attn_implementation is None:  # upstream's scripts pass flash_attention_2, which needs flash-attn
        attn_implementation = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    allow_rng_state_load()
    sys.argv = [sys.argv[0], *args]
    train(attn_implementation)


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
                attention_mask: torch.Tensor | None, sample_index: Any, position_ids: torch.Tensor | None = None) -> Any:
    """The training forward after upstream's merge: plan, pack, decoder layers through the shim, loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plan = engine.plan(labels, attention_mask, sample_index, position_ids)
    packed, host = plan.packed, plan.host
    hidden = legacy_attention.packed_decoder(model.model, pack(embeds, packed), packed.position_ids, packed.cu_seqlens,
                                             packed.max_seqlen, segment_max_span(host.position_ids[0], host.cu_seqlens))
    return CausalLMOutputWithPast(loss=engine.loss(plan, hidden, model.lm_head))
