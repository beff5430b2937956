"""The hf adapter table: every class it lists is built tiny and tested, the teacher pass lines up with
each class's own merge, and what the packed path cannot train is refused with the reason."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from regate_plugin import ReGATEConfig, ReGATEEngine, cli
from score_assets import tokenizer
from tiny_hf import CLASSES, KINDS, REFUSED_KINDS, collate, tiny_model, tiny_samples

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("regate_plugin.patches.hf")
hf_models = pytest.importorskip("regate_plugin.patches.hf_models")


def packing_only(model):
    return hf.enable(model, ReGATEEngine(ReGATEConfig(), None))


def test_every_class_of_the_table_has_a_tiny_model_and_is_listed():
    table = {adapter.cls: adapter for adapter in hf_models.ADAPTERS}
    assert sorted(table) == sorted(CLASSES.values())
    for kind, name in CLASSES.items():
        assert (table[name].refuse is not hf_models.never) == (kind in REFUSED_KINDS), kind
    output = CliRunner().invoke(cli.main, ["targets"]).output
    for adapter in hf_models.ADAPTERS:
        assert f"{adapter.cls} " in output and adapter.family in output


def merged_visual_positions(model, batch):
    """Where the model's own merge put visual features: merged embeddings that differ from the
    text embeddings of the input ids."""
    seen = {}
    text_model = hf.adapter_for(model).text_model(model)
    handle = text_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    text = text_model.embed_tokens(batch["input_ids"])
    return (seen["inputs_embeds"] != text).any(dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_pass_pads_exactly_what_the_model_fills_with_visual_features(tmp_path, kind):
    """HFScoringSource's text-only view: the pad id where the model's merge puts visual features,
    the sample's own ids elsewhere, image special tokens around the placeholders included."""
    model = tiny_model(kind)
    model.config.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    samples = tiny_samples(kind, 2, turns=2)
    source = hf.HFScoringSource(samples, str(tmp_path), "tiny")
    visual = merged_visual_positions(model, collate(kind, samples, "right"))
    for i, sample in enumerate(samples):
        ids, labels = source.text_only(i)
        length = sample["input_ids"].shape[0]
        assert torch.equal((ids != sample["input_ids"]), visual[i, :length]), kind
        assert (ids[visual[i, :length]] == source.pad_token_id).all()
        assert torch.equal(labels, sample["labels"])
        assert visual[i].sum() >= 4 and (ids == sample["input_ids"]).sum() > 10


def test_gemma3_is_refused_because_its_image_blocks_are_bidirectional():
    batch = collate("gemma3", tiny_samples("gemma3", 2), "right")
    model = tiny_model("gemma3").eval()
    with torch.no_grad():  # the reason is real: the image block attends to itself both ways
        blocks = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        causal = model(**{k: v for k, v in batch.items() if k not in ("labels", "token_type_ids")}).logits
    assert (blocks - causal).abs().max() > 1e-4
    with pytest.raises(hf.hf_attention.UnsupportedAttention, match="bidirectionally within each image block"):
        packing_only(model)
    assert getattr(type(model).forward, "_regate_original", None) is None  # nothing was patched


def test_moe_router_loss_is_refused_not_dropped():
    batch = collate("qwen3_vl_moe", tiny_samples("qwen3_vl_moe", 2), "right")
    model = packing_only(tiny_model("qwen3_vl_moe"))
    assert model(**batch).loss.requires_grad  # MoE without the router loss trains (dense == upstream in test_hf)
    with pytest.raises(hf.TrainingForwardError, match="output_router_logits=True: .* no router logits"):
        model(**batch, output_router_logits=True)
    model.config.text_config.output_router_logits = True
    with pytest.raises(hf.TrainingForwardError, match="config.output_router_logits=True"):
        model(**batch)


def test_a_batch_shaped_text_input_the_table_does_not_pack_is_refused(monkeypatch):
    """Without its deepstack entry, Qwen3-VL's visual_pos_masks would reach the packed row misaligned."""
    bare = tuple(
        dataclasses.replace(a, side_inputs=hf_models.no_side_inputs, side_keys=()) if a.cls == CLASSES["qwen3_vl"] else a
        for a in hf_models.ADAPTERS
    )
    monkeypatch.setattr(hf_models, "ADAPTERS", bare)
    batch = collate("qwen3_vl", tiny_samples("qwen3_vl", 2), "right")
    model = packing_only(tiny_model("qwen3_vl"))
    with pytest.raises(hf.hf_attention.UnsupportedAttention, match=r"passes visual_pos_masks \(2, \d+\) .* does not pack it"):
        model(**batch)
