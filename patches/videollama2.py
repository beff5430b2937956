"""Target ``videollama2``: DAMO-NLP-SG/VideoLLaMA2 (branch main, a checkout; transformers 4.40-4.42.3).

Upstream is not a package: it is cloned and launched as ``torchrun videollama2/train.py ...``, so
the script runs as ``__main__`` and patching ``videollama2.train`` from outside never reaches it.
``regate train --target videollama2 -- <upstream's own arguments>``, run from the checkout, imports
``videollama2.train``, applies these patches and calls its ``train()`` in-process:

* ``LazySupervisedDataset.__getitem__`` adds the sample's index. When a video or image cannot be
  read, upstream returns another, random sample instead (a recursive ``__getitem__``): the index
  recorded is the one of the sample actually returned, so its tokens match the reference cache.
* ``DataCollatorForSupervisedDataset.__call__`` stacks the indices into the batch.
* ``VideoLLaMA2Trainer.__init__`` opens the reference cache against this run's data, tokenizer,
  frame count and connector (refusing a mismatch before any step) and attaches ReGATE's callback.
* ``Videollama2Qwen2ForCausalLM`` and ``Videollama2MistralForCausalLM`` (model types
  ``videollama2_qwen2``, ``videollama2``/``videollama2_mistral``): their attention gets the legacy
  shim at construction (``legacy_attention``), and ``forward``, on training forwards with labels,
  runs upstream's ``prepare_inputs_labels_for_multimodal`` (its 5-tuple: no position ids, upstream
  uses 0..L-1 in every row), then units -> selection -> packing -> the decoder layers (the model's
  sliding window, if any, applied per sample by the shim) -> the loss on kept rows -> EMA. The collator's right padding stays inside each merged row, masked by the
  attention mask that the merge returns; packing keeps only unmasked positions. ``generate()``,
  evaluation and label-free forwards run upstream code.

``regate score --target videollama2 -- <upstream's arguments>`` builds each sample with upstream's
own ``preprocess_multimodal``/``preprocess`` and collator (its truncation included) and runs
upstream's own ``prepare_inputs_labels_for_multimodal`` on a stand-in whose one-dimensional
"embeddings" carry token ids. Videos and images are never decoded: the number of visual tokens
comes from the frame count and the vision tower's patch grid, run through upstream's connector
(``build_vision_projector`` + ``temporal_aggregator``) on the meta device.

Nothing from upstream is imported when this module loads (``regate targets`` and ``--dry-run``
work anywhere).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import SAMPLE_INDEX_KEY
from regate_plugin.hookspecs import Target, hookimpl
from regate_plugin.scoring import dataset_probe
from regate_plugin.versions import require

from . import upstream

TRANSFORMERS = ">=4.40,<4.43"
# --model_type -> the upstream class that regate patches (Qwen2 and Mistral language models).
MODEL_TYPES = {
    "videollama2": "Videollama2MistralForCausalLM",
    "videollama2_mistral": "Videollama2MistralForCausalLM",
    "videollama2_qwen2": "Videollama2Qwen2ForCausalLM",
}


def upstream_importable() -> bool:
    """True when ``videollama2`` imports; from a checkout's root, as upstream's own
    ``sys.path.append('./')`` in train.py does, the working directory is added to the path."""
    if importlib.util.find_spec("videollama2") is None and Path("videollama2", "train.py").is_file():
        sys.path.append(os.getcwd())
    return importlib.util.find_spec("videollama2") is not None


def requirement() -> str | None:
    if not upstream_importable():
        return ("VideoLLaMA2 is not importable: run from your VideoLLaMA2 checkout "
                "(git clone https://github.com/DAMO-NLP-SG/VideoLLaMA2; cd VideoLLaMA2)")
    return require("transformers", TRANSFORMERS)


def _model_classes() -> list[type]:
    from videollama2.model.videollama2_mistral import Videollama2MistralForCausalLM
    from videollama2.model.videollama2_qwen2 import Videollama2Qwen2ForCausalLM

    return [Videollama2MistralForCausalLM, Videollama2Qwen2ForCausalLM]


def apply(config: ReGATEConfig, ref_cache: str | None, *, resume_without_state: bool = False) -> None:
    """Patch VideoLLaMA2's training code for ReGATE (``ref_cache=None``: packing only). Idempotent.
    ``resume_without_state``: a checkpoint without ReGATE's state (a baseline's) may be resumed."""
    upstream_importable()
    from videollama2 import train
    from videollama2.videollama2_trainer import VideoLLaMA2Trainer

    upstream.wrap(train.LazySupervisedDataset, "__getitem__", upstream.getitem_with_index)
    upstream.wrap(train.DataCollatorForSupervisedDataset, "__call__", upstream.collate_with_index)
    init = upstream.trainer_init(config, ref_cache, _expected, _check_model, resume_without_state)
    upstream.wrap(VideoLLaMA2Trainer, "__init__", init)
    for cls in _model_classes():
        upstream.wrap(cls, "__init__", upstream.shim_init(config.attn_backend))
        upstream.wrap(cls, "forward", _forward)


def launch(args: list[str], attn_implementation: str | None = None) -> None:
    """Run VideoLLaMA2's own ``train()`` on ``args`` (its command-line arguments), in this process."""
    upstream_importable()
    from videollama2 import train

    upstream.launch_train(train.train, args, attn_implementation)


def _check_model(model: Any) -> None:
    """Refuse a run whose model is not one of the patched classes (other language models)."""
    if not isinstance(model, tuple(_model_classes())):
        raise ValueError(
            f"regate supports VideoLLaMA2 with a Qwen2 or Mistral language model (--model_type "
            f"{', '.join(sorted(MODEL_TYPES))}); this run builds {type(model).__name__}: run it with --no-regate"
        )


def _expected(trainer: Any, model: Any) -> dict[str, Any]:
    """This run's fingerprint fields: its data, tokenizer, frame count and connector."""
    dataset = trainer.train_dataset
    tower = model.get_vision_tower()
    layout = VisualLayout(model.config.mm_projector_type, model.num_frames(), tower.config,
                          tower.select_feature, model.config.hidden_size)
    text_only = _TextOnly(dataset.tokenizer, dataset.data_args, layout.tokens)
    return _fingerprint_fields(
        dataset.list_data_dict, dataset.data_args, dataset.tokenizer, layout,
        lambda i: text_only.sample(dataset.list_data_dict[i]),
    )


def _forward(self, original, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
             images=None, return_dict=None, **kwargs):
    sample_index = kwargs.pop(SAMPLE_INDEX_KEY, None)
    engine = upstream.engine_of(self)
    if engine is None or not self.training or labels is None or inputs_embeds is not None or past_key_values is not None:
        return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states, images=images,
                        return_dict=return_dict, **kwargs)
    # Upstream's merge: (input_ids, attention_mask, past_key_values, inputs_embeds, labels); the
    # mask keeps the collator's right padding masked inside each row. No position ids: upstream's
    # forward drops them, so every row uses positions 0..L-1 (what the plan uses for None).
    context = _merged_context_ids(self, input_ids, attention_mask, labels, images) if engine.checks_contexts else None
    input_ids, attention_mask, _, embeds, labels = self.prepare_inputs_labels_for_multimodal(
        input_ids, attention_mask, None, labels, images
    )
    if embeds is None:  # upstream's text-only shortcut (no images in the batch)
        embeds = self.get_model().embed_tokens(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return upstream.packed_loss(self, engine, embeds, labels, attention_mask, sample_index,
                                context_ids=None if context is None else upstream.merged_context(*context, labels))


def _merged_context_ids(model, input_ids, attention_mask, labels, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids, labels) of the micro-batch as upstream's own merge lays it out, run on a
    ``TokenIdCarrier`` (host-side, on CPU copies; the images and videos only counted)."""
    from videollama2.model.videollama2_arch import Videollama2MetaForCausalLM

    tower = model.get_vision_tower()
    layout = VisualLayout(model.config.mm_projector_type, model.num_frames(), tower.config, tower.select_feature,
                          model.config.hidden_size)
    carrier = upstream.TokenIdCarrier(layout.tokens, 0)
    mask = None if attention_mask is None else attention_mask.cpu()
    ids, _, _, embeds, merged_labels = Videollama2MetaForCausalLM.prepare_inputs_labels_for_multimodal(
        carrier, input_ids.cpu(), mask, None, labels.cpu(), images
    )
    return (ids if embeds is None else carrier.context_ids(embeds)), merged_labels


# ---------------------------------------------------------------------------------------------
# Visual tokens per image or video
# ---------------------------------------------------------------------------------------------


class VisualLayout:
    """How many tokens one image or video becomes: upstream's connector run on the meta device over
    ``frames`` frames of the tower's patch grid (an image is repeated to ``frames`` frames upstream).

    For the 7B recipes: stc_connector, 8 frames, CLIP-L/14-336 (24x24) -> 5*13*13 = 845;
    stc_connector_v35, 16 frames, SigLIP-so400m/14-384 (27x27) -> 8*13*13 = 1352.
    """

    def __init__(self, projector_type: str, frames: int, vision_config: Any, select_feature: str, hidden_size: int) -> None:
        from videollama2.constants import MAX_FRAMES

        if frames > MAX_FRAMES:
            raise ValueError(f"--num_frames {frames} exceeds upstream's MAX_FRAMES ({MAX_FRAMES}): videos are cut to "
                             f"{MAX_FRAMES} frames while images are repeated {frames} times")
        side = vision_config.image_size // vision_config.patch_size
        # Upstream's CLIP tower drops the class token unless 'cls_patch'; SigLIP has none.
        with_cls = select_feature == "cls_patch" and "clip" in getattr(vision_config, "model_type", "")
        self.projector_type, self.frames, self.side = projector_type, int(frames), side
        self.per_frame = side * side + int(with_cls)
        self.tokens = connector_tokens(projector_type, self.frames, self.per_frame, vision_config.hidden_size, hidden_size)

    def describe(self) -> str:
        return (f"{self.frames}f:{self.tokens} per image or video ({self.projector_type}, "
                f"{self.side}x{self.side} patches per frame, {self.per_frame} tower tokens)")


@functools.cache
def connector_tokens(projector_type: str, frames: int, per_frame: int, mm_hidden_size: int, hidden_size: int) -> int:
    """Tokens out of upstream's ``temporal_aggregator`` for (1, frames, per_frame, mm_hidden_size)
    tower features: upstream's own connector, built and run on the meta device (no weights, no compute)."""
    from videollama2.model.projector import build_vision_projector
    from videollama2.model.videollama2_arch import Videollama2MetaForCausalLM

    config = SimpleNamespace(mm_projector_type=projector_type, mm_hidden_size=mm_hidden_size, hidden_size=hidden_size)
    with torch.device("meta"):
        projector = build_vision_projector(config)
        features = torch.empty(1, frames, per_frame, mm_hidden_size)
    model = SimpleNamespace(config=config, mm_projector=projector)
    model.get_model = lambda: model
    return int(Videollama2MetaForCausalLM.temporal_aggregator(model, features).shape[1])


# ---------------------------------------------------------------------------------------------
# Teacher pass
# ---------------------------------------------------------------------------------------------


_NO_PIXELS = torch.zeros(0)  # what the collator lists for an image or video: never decoded here


class _TextOnly:
    """VideoLLaMA2's tokenization and collation of one record, merged text-only by its own merge code."""

    def __init__(self, tokenizer, data_args, num_visual: int) -> None:
        from videollama2.model.videollama2_arch import Videollama2MetaForCausalLM
        from videollama2.train import DataCollatorForSupervisedDataset

        self.tokenizer, self.data_args = tokenizer, data_args
        call = DataCollatorForSupervisedDataset.__call__
        call = getattr(call, "_regate_original", call)  # upstream's own, also in a patched (training) process
        self.collate = functools.partial(call, DataCollatorForSupervisedDataset(tokenizer=tokenizer))
        self.carrier = upstream.TokenIdCarrier(num_visual, tokenizer.pad_token_id)
        self.merge = Videollama2MetaForCausalLM.prepare_inputs_labels_for_multimodal

    def sample(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels) as the teacher reads them: the pad id at visual positions."""
        ids, embeds, labels = self._merged(record)
        return (ids if embeds is None else self.carrier.token_ids(embeds)), labels

    def context(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(canonical context ids, labels): visual positions marked (``identity.mark_visual``)."""
        ids, embeds, labels = self._merged(record)
        return (ids if embeds is None else self.carrier.context_ids(embeds)), labels

    def _merged(self, record: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(ids, None, labels) for upstream's text-only shortcut, else (None, carrier embeddings, labels)."""
        from videollama2.train import preprocess, preprocess_multimodal, preprocess_plain

        # As LazySupervisedDataset.__getitem__ does, without reading the file.
        modal = "image" if "image" in record else "video" if "video" in record else None
        modal_token = f"<{modal}>" if modal else None
        sources = copy.deepcopy([record["conversations"]])
        if modal:
            sources = preprocess_multimodal(sources, self.data_args, modal_token)
        build = preprocess_plain if self.data_args.is_pretraining else preprocess
        data = build(sources, self.tokenizer, modal_token=modal_token)
        instance = {"input_ids": data["input_ids"][0], "labels": data["labels"][0]}
        if modal:
            instance[modal] = _NO_PIXELS
        elif self.data_args.is_multimodal:
            instance["image"] = _NO_PIXELS
        batch = self.collate([instance])
        input_ids, _, _, embeds, labels = self.merge(
            self.carrier, batch["input_ids"], batch["attention_mask"], None, batch["labels"], batch["images"]
        )
        if embeds is None:  # upstream's text-only shortcut returns the ids unmerged
            return input_ids[0], None, labels[0]
        return None, embeds[0], labels[0]


def _dataset_field(data_args, num_samples: int, tokenizer, probe: str) -> str:
    paths = [data_args.data_path] if isinstance(data_args.data_path, str) else list(data_args.data_path)
    files = ",".join(f"{Path(p).name}:{hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]}" for p in paths)
    template = hashlib.sha256(str(getattr(tokenizer, "chat_template", None)).encode()).hexdigest()[:12]
    style = "plain" if data_args.is_pretraining else "chat"
    return f"{files}|n={num_samples}|{style}-template={template}|probe={probe}"


def _fingerprint_fields(records, data_args, tokenizer, layout: VisualLayout, text_only) -> dict[str, Any]:
    dataset = _dataset_field(data_args, len(records), tokenizer, dataset_probe(text_only, len(records)))
    return upstream.fingerprint_fields(dataset, tokenizer, layout.describe())


class VideoLLaMA2ScoringSource(upstream.RecordsSource):
    """Samples of a VideoLLaMA2 training run, text-only, from the same arguments as the run itself
    (upstream's model and data arguments and --model_max_length; other training arguments are ignored)."""

    def __init__(self, args: list[str], teacher: str) -> None:
        if not upstream_importable():
            raise RuntimeError(requirement())
        import json

        import transformers
        from videollama2.constants import NUM_FRAMES
        from videollama2.model import VLLMConfigs
        from videollama2.train import DataArguments, ModelArguments, TrainingArguments

        model_args, data_args, max_length = upstream.parse_sample_arguments(ModelArguments, DataArguments,
                                                                            TrainingArguments, args)
        if model_args.model_type not in MODEL_TYPES:
            raise ValueError(f"regate supports --model_type {', '.join(sorted(MODEL_TYPES))} (Qwen2 and Mistral "
                             f"language models), not {model_args.model_type!r}")
        if model_args.vision_tower is None or not data_args.data_path:
            raise ValueError("regate score needs upstream's --vision_tower and --data_path (VideoLLaMA2's multimodal training)")
        # As train() does.
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_args.model_path, model_max_length=max_length, padding_side="right", use_fast=True
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token
        data_args.is_multimodal = True
        data_args.is_pretraining = bool(model_args.tune_mm_mlp_adapter)
        vision = transformers.AutoConfig.from_pretrained(model_args.vision_tower)
        vision = getattr(vision, "vision_config", vision)
        llm = VLLMConfigs[model_args.model_type].from_pretrained(model_args.model_path)
        frames = NUM_FRAMES if data_args.num_frames is None else data_args.num_frames
        self.layout = VisualLayout(model_args.mm_projector_type, frames, vision, model_args.mm_vision_select_feature,
                                   llm.hidden_size)
        records = []
        for path in data_args.data_path:
            records.extend(json.loads(Path(path).read_text()))
        fields = functools.partial(_fingerprint_fields, records, data_args, tokenizer, self.layout, self.text_only)
        self.finish(records, _TextOnly(tokenizer, data_args, self.layout.tokens).context, tokenizer, fields, teacher)


@hookimpl
def regate_targets() -> list[Target]:
    return [Target(
        "videollama2", "DAMO-NLP-SG/VideoLLaMA2 (checkout of main, transformers 4.40-4.42): "
        "regate train --target videollama2 -- ...",
        requirement=requirement, apply=apply, launch=launch, scoring_source=VideoLLaMA2ScoringSource,
    )]
