"""Target ``llava``: haotian-liu/LLaVA (PyPI ``llava-torch`` 1.2.2.post1; transformers 4.36-4.37).

``regate train --target llava -- <LLaVA's own training arguments>`` applies these patches and runs
``llava.train.train.train()`` in-process:

* ``LazySupervisedDataset.__getitem__`` adds the sample's index; the data collator stacks it.
* ``LLaVATrainer.__init__`` opens the reference cache against this run's data, tokenizer and
  visual-token count (refusing a mismatch before any step) and attaches ReGATE's callback.
* ``LlavaLlamaForCausalLM.forward``, on training forwards with labels, runs upstream's
  ``prepare_inputs_labels_for_multimodal``, then units -> selection -> packing -> the decoder
  layers through the legacy attention shim -> the loss on kept rows -> EMA. ``generate()`` and
  label-free forwards run upstream code.

``regate score --target llava`` builds each sample through LLaVA's own ``preprocess`` and runs
LLaVA's own ``prepare_inputs_labels_for_multimodal`` on stand-in embeddings that carry token ids,
so the text-only sequence matches the student's merged one by construction, truncation included.
Images are never decoded: the visual-token count comes from the vision tower's config.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import SAMPLE_INDEX_KEY
from regate_plugin.hookspecs import Target, hookimpl
from regate_plugin.scoring import dataset_probe
from regate_plugin.versions import require

from . import upstream


def requirement() -> str | None:
    if importlib.util.find_spec("llava") is None:
        return "LLaVA is not importable: pip install --no-deps llava-torch==1.2.2.post1, or run from a LLaVA checkout"
    return require("transformers", ">=4.36,<4.38")


def apply(config: ReGATEConfig, ref_cache: str | None, *, resume_without_state: bool = False) -> None:
    """Patch LLaVA's training code for ReGATE (``ref_cache=None``: packing only). Idempotent.
    ``resume_without_state``: a checkpoint without ReGATE's state (a baseline's) may be resumed."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.train import llava_trainer, train

    upstream.wrap(train.LazySupervisedDataset, "__getitem__", upstream.getitem_with_index)
    upstream.wrap(train.DataCollatorForSupervisedDataset, "__call__", upstream.collate_with_index)
    init = upstream.trainer_init(config, ref_cache, _expected, resume_without_state=resume_without_state)
    upstream.wrap(llava_trainer.LLaVATrainer, "__init__", init)
    upstream.wrap(LlavaLlamaForCausalLM, "__init__", upstream.shim_init(config.attn_backend))
    upstream.wrap(LlavaLlamaForCausalLM, "forward", _forward)


def launch(args: list[str], attn_implementation: str | None = None) -> None:
    """Run LLaVA's own ``train()`` on ``args`` (its command-line arguments), in this process."""
    from llava.train import train

    upstream.launch_train(lambda attn: train.train(attn_implementation=attn), args, attn_implementation)


def _expected(trainer: Any, model: Any) -> dict[str, Any]:
    """This run's fingerprint fields: its dataset, tokenizer and visual-token count."""
    dataset, num_visual = trainer.train_dataset, model.get_vision_tower().num_patches
    text_only = _TextOnly(dataset.tokenizer, dataset.data_args, num_visual)
    return _fingerprint_fields(
        dataset.list_data_dict, dataset.data_args.data_path, dataset.tokenizer, num_visual,
        dataset.data_args.image_aspect_ratio, lambda i: text_only.sample(dataset.list_data_dict[i]),
    )


def _forward(self, original, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
             images=None, image_sizes=None, return_dict=None, **kwargs):
    sample_index = kwargs.pop(SAMPLE_INDEX_KEY, None)
    engine = upstream.engine_of(self)
    if engine is None or not self.training or labels is None or inputs_embeds is not None:
        return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states, images=images,
                        image_sizes=image_sizes, return_dict=return_dict, **kwargs)
    context = (_merged_context_ids(self, input_ids, position_ids, attention_mask, labels, images, image_sizes)
               if engine.checks_contexts else None)
    _, position_ids, attention_mask, _, embeds, labels = self.prepare_inputs_labels_for_multimodal(
        input_ids, position_ids, attention_mask, None, labels, images, image_sizes
    )
    return upstream.packed_loss(self, engine, embeds, labels, attention_mask, sample_index, position_ids,
                                None if context is None else upstream.merged_context(*context, labels))


def _merged_context_ids(model, input_ids, position_ids, attention_mask, labels, images, image_sizes):
    """(context ids, labels) of the micro-batch as LLaVA's own merge lays it out, run on a
    ``TokenIdCarrier`` with the model's config (host-side, on CPU copies; the images only counted)."""
    from llava.model.llava_arch import LlavaMetaForCausalLM

    carrier = upstream.TokenIdCarrier(model.get_vision_tower().num_patches, 0)
    carrier.config = model.config
    cpu = [None if t is None else t.cpu() for t in (input_ids, position_ids, attention_mask, labels)]
    _, _, _, _, embeds, merged_labels = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
        carrier, cpu[0], cpu[1], cpu[2], None, cpu[3], images, image_sizes
    )
    return carrier.context_ids(embeds), merged_labels


# ---------------------------------------------------------------------------------------------
# Teacher pass
# ---------------------------------------------------------------------------------------------


class _TextOnly:
    """LLaVA's tokenization of one record, merged text-only by LLaVA's own merge code."""

    def __init__(self, tokenizer, data_args, num_visual: int) -> None:
        from llava.model.llava_arch import LlavaMetaForCausalLM

        self.tokenizer, self.data_args = tokenizer, data_args
        self.carrier = upstream.TokenIdCarrier(
            num_visual, tokenizer.pad_token_id, image_aspect_ratio="pad", mm_patch_merge_type="flat",
            tune_mm_mlp_adapter=False, tokenizer_model_max_length=tokenizer.model_max_length,
            tokenizer_padding_side=tokenizer.padding_side,
        )
        self.merge = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal

    def sample(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels) as the teacher reads them: the pad id at visual positions."""
        embeds, labels = self._merged(record)
        return self.carrier.token_ids(embeds), labels

    def context(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(canonical context ids, labels): visual positions marked (``identity.mark_visual``)."""
        embeds, labels = self._merged(record)
        return self.carrier.context_ids(embeds), labels

    def _merged(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from llava.train.train import preprocess, preprocess_multimodal

        has_image = "image" in record
        conversations = copy.deepcopy([record["conversations"]])
        if has_image:
            conversations = preprocess_multimodal(conversations, self.data_args)
        data = preprocess(conversations, self.tokenizer, has_image=has_image)
        input_ids, labels = data["input_ids"][0][None], data["labels"][0][None]
        _, _, _, _, embeds, merged_labels = self.merge(
            self.carrier, input_ids, None, torch.ones_like(input_ids, dtype=torch.bool), None, labels,
            torch.zeros(1, 1, 1, 1),
        )
        return embeds[0], merged_labels[0]


def _dataset_field(data_path: str, num_samples: int, probe: str) -> str:
    from llava import conversation

    digest = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:16]
    template = conversation.default_conversation
    return f"{Path(data_path).name}:{digest}|n={num_samples}|conv={template.version}/{template.sep_style.name}|probe={probe}"


def _fingerprint_fields(records, data_path, tokenizer, num_visual, aspect_ratio, text_only) -> dict[str, Any]:
    dataset = _dataset_field(data_path, len(records), dataset_probe(text_only, len(records)))
    return upstream.fingerprint_fields(dataset, tokenizer, f"{num_visual} per image (image_aspect_ratio={aspect_ratio})")


class LlavaScoringSource(upstream.RecordsSource):
    """Samples of a LLaVA training run, text-only, from the same arguments as the run itself
    (LLaVA's model and data arguments and --model_max_length; other training arguments, --output_dir
    included, are neither needed nor read)."""

    use_fast = False

    def __init__(self, args: list[str], teacher: str) -> None:
        import transformers
        from llava import conversation
        from llava.train.train import DataArguments, ModelArguments, TrainingArguments

        model_args, data_args, max_length = upstream.parse_sample_arguments(ModelArguments, DataArguments,
                                                                            TrainingArguments, args)
        if model_args.version in ("v0", "v0.5") or model_args.mm_use_im_start_end:
            raise ValueError("regate supports LLaVA's v1-style templates without image start/end tokens (LLaVA-1.5 recipes)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, model_max_length=max_length, padding_side="right", use_fast=False
        )
        # As train() does for v1-style versions.
        tokenizer.pad_token = tokenizer.unk_token
        conversation.default_conversation = conversation.conv_templates.get(
            model_args.version, conversation.conv_templates["vicuna_v1"]
        )
        data_args.is_multimodal = True
        data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
        vision = transformers.CLIPVisionConfig.from_pretrained(model_args.vision_tower)
        num_visual = (vision.image_size // vision.patch_size) ** 2
        records = json.loads(Path(data_args.data_path).read_text())
        fields = functools.partial(_fingerprint_fields, records, data_args.data_path, tokenizer, num_visual,
                                   data_args.image_aspect_ratio, self.text_only)
        self.finish(records, _TextOnly(tokenizer, data_args, num_visual).context, tokenizer, fields, teacher)


@hookimpl
def regate_targets() -> list[Target]:
    return [Target(
        "llava", "haotian-liu/LLaVA (llava-torch 1.2.2.post1, transformers 4.36-4.37): regate train --target llava -- ...",
        requirement=requirement, apply=apply, launch=launch, scoring_source=LlavaScoringSource,
    )]
