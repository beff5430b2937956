"""The legacy attention shim on real transformers 4.40-4.42 Qwen2 and Mistral classes (VideoLLaMA2's
language models): packed == per sample, with and without gradient checkpointing, sliding windows
included; unpacked forwards and generation untouched. Needs no upstream source."""

import pytest
import torch
import transformers

from regate_plugin.packing import pack_plan
from regate_plugin.attention import UnsupportedAttention
from regate_plugin.patches import legacy_attention
from regate_plugin.selection import keep_mask_for
from regate_plugin.units import IGNORE_INDEX, find_units

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
MODELS = {
    # As Qwen2-7B-Instruct: a window in the config, switched off by use_sliding_window.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(sliding_window=64, use_sliding_window=False)),
    # As Mistral-7B-Instruct-v0.2 (no window) and v0.1 (4096, far beyond these rows).
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4096)),
    "mistral-v0.2": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}
# Windows shorter than the samples: Mistral's in every layer, Qwen2's in the layers below max_window_layers.
WINDOWED = {
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=3)),
    "qwen2-window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(sliding_window=3, use_sliding_window=True, max_window_layers=1)),
}


def tiny(kind, attn_implementation):
    config_cls, model_cls, extra = {**MODELS, **WINDOWED}[kind]
    torch.manual_seed(0)
    config = config_cls(**CONFIG, **extra)
    config._attn_implementation = attn_implementation
    return model_cls(config).float()


def batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [11, 6, 15]
    ids = torch.randint(3, 97, (3, 15), generator=gen)
    mask = torch.zeros(3, 15, dtype=torch.long)
    labels = torch.full((3, 15), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        labels[b, 3:n] = ids[b, 3:n]
    return ids, mask, labels


def check_packed_equals_each_sample_alone(kind, attn, reentrant):
    """Packed logits and gradients (every other unit elided: gaps in the position ids, as on a sparse
    step) against the unpatched model's own layers over the padded batch with an additive 4-D mask in
    which kept positions see only earlier kept positions of their own row within the layer's window
    (elided ones also see themselves, so no softmax row is empty). Upstream cannot run a row with gaps
    in its positions directly (4.40's rotary table is cut at the row's length), and the model-level
    4-D mask formats differ across 4.40-4.42 (Mistral's SDPA path in 4.40 takes none)."""
    ids, mask, labels = batch()
    reference, model = tiny(kind, attn), tiny(kind, attn)
    legacy_attention.install(model.model)
    assert type(model.model.layers[0].self_attn).__name__.startswith("Regate")
    for m in (reference, model):
        if reentrant is not None:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    units = find_units(labels, mask)
    keep = keep_mask_for(mask, units, torch.arange(len(units)) % 2 == 0)
    packed = pack_plan(keep, labels, units)
    embeds = model.model.embed_tokens(ids).flatten(0, 1)[packed.index][None]
    hidden = legacy_attention.packed_decoder(model.model, embeds, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    logits = model.lm_head(hidden)[0]

    length = ids.shape[1]
    col = torch.arange(length)
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    visible = visible & (keep[:, None, :] | torch.eye(length, dtype=torch.bool)) & mask.bool()[:, None, :]
    hidden = reference.model.embed_tokens(ids)
    positions = col.expand(3, length)
    windows = [legacy_attention.flash_window(reference.config, i) for i in range(len(reference.model.layers))]
    for layer, window in zip(reference.model.layers, windows):
        seen = visible if window is None else visible & (col[:, None] - col[None, :] < window)
        additive = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)[:, None]
        hidden = layer(hidden, attention_mask=additive, position_ids=positions)[0]
    ref_logits = reference.lm_head(reference.model.norm(hidden))[keep]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    (ref_logits * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    return windows, packed


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("reentrant", [None, True, False])
def test_packed_logits_and_gradients_equal_each_sample_alone(kind, attn, reentrant):
    windows, _ = check_packed_equals_each_sample_alone(kind, attn, reentrant)
    assert all(w is None or w > 15 for w in windows)  # no window reaches across these 15-token rows


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_unpacked_forwards_and_generation_are_untouched(kind, attn):
    ids, mask, _ = batch()
    reference, model = tiny(kind, attn).eval(), tiny(kind, attn).eval()
    legacy_attention.install(model.model)
    legacy_attention.install(model.model)  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits * mask[..., None],
                                   reference(input_ids=ids, attention_mask=mask).logits * mask[..., None], atol=1e-6, rtol=0)
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1, :11], **kwargs), reference.generate(ids[:1, :11], **kwargs))


def test_flash_window_per_model_and_layer():
    """The window of the models' own flash path: window_size=(W, W) with causal, W+1 keys."""
    assert legacy_attention.flash_window(transformers.MistralConfig(**CONFIG, sliding_window=14), 1) == 15
    assert legacy_attention.flash_window(transformers.MistralConfig(**CONFIG, sliding_window=None), 0) is None
    assert legacy_attention.flash_window(transformers.Qwen2Config(**CONFIG, sliding_window=4, use_sliding_window=False), 0) is None
    qwen2 = transformers.Qwen2Config(**CONFIG, sliding_window=4, use_sliding_window=True, max_window_layers=1)
    assert [legacy_attention.flash_window(qwen2, i) for i in range(2)] == [5, None]


@pytest.mark.parametrize("kind", sorted(WINDOWED))
@pytest.mark.parametrize("reentrant", [None, True])
def test_packed_sliding_window_equals_each_sample_alone(kind, reentrant):
    """Samples longer than the window, with elided units: each layer's window counts the tokens'
    original columns, as the model's flash path does for the sample alone."""
    windows, packed = check_packed_equals_each_sample_alone(kind, "eager", reentrant)
    assert windows[0] == 4 and max(packed.position_ids[0].tolist()) >= 4  # the window drops keys here


def test_the_window_changes_the_packed_output():
    """So the windowed test above would notice a dropped window."""
    ids, mask, labels = batch()
    model = tiny("mistral-window", "eager").eval()
    legacy_attention.install(model.model)
    units = find_units(labels, mask)
    packed = pack_plan(mask.bool(), labels, units)
    embeds = model.model.embed_tokens(ids).flatten(0, 1)[packed.index][None]
    with torch.no_grad():
        windowed = legacy_attention.packed_decoder(model.model, embeds, packed.position_ids, packed.cu_seqlens,
                                                   packed.max_seqlen)
        model.config.sliding_window = None
        whole = legacy_attention.packed_decoder(model.model, embeds, packed.position_ids, packed.cu_seqlens,
                                                packed.max_seqlen)
    assert not torch.allclose(windowed, whole, atol=1e-3)


def test_other_flash_keywords_are_refused():
    model = tiny("qwen2", "eager").train()
    legacy_attention.install(model.model)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 6, 4, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(UnsupportedAttention, match=r"passes \['softcap'\]"):
        attention._flash_attention_forward(q, q, q, cu, 6, softcap=30.0)
    out = attention._flash_attention_forward(q, q, q, cu, 6, use_sliding_windows=True)  # upstream's own flag
    assert out.shape == (1, 6, 4, 16)
