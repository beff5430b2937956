"""The legacy attention shim on real transformers 4.36/4.37 Llama classes: packed == per sample."""

import pytest
import torch
import transformers

from regate_plugin.attention import UnsupportedAttention
from regate_plugin.packing import pack_plan
from regate_plugin.selection import keep_mask_for
from regate_plugin.units import IGNORE_INDEX, find_units

from regate_plugin.patches import legacy_attention

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(attn_implementation, **extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, **extra)
    config._attn_implementation = attn_implementation
    return transformers.LlamaForCausalLM(config).float()


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("reentrant", [None, True, False])
def test_packed_logits_and_gradients_equal_each_sample_alone(attn, reentrant):
    ids, mask, labels = batch()
    reference, model = tiny_llama(attn), tiny_llama(attn)
    legacy_attention.install(model.model)
    assert type(model.model.layers[0].self_attn).__name__.startswith("Regate")
    for m in (reference, model):
        if reentrant is not None:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    units = find_units(labels, mask)
    # Elide every other unit: gaps in the position ids, as on a sparse step.
    keep = keep_mask_for(mask, units, torch.arange(len(units)) % 2 == 0)
    packed = pack_plan(keep, labels, units)
    embeds = model.model.embed_tokens(ids).flatten(0, 1)[packed.index][None]
    hidden = legacy_attention.packed_decoder(model.model, embeds, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    logits = model.lm_head(hidden)[0]

    # Reference: the unpatched model's own layers over the whole padded batch, with an additive 4-D
    # mask in which kept positions see only earlier kept positions of their own row (elided ones also
    # see themselves, so no softmax row is empty). Upstream cannot run a row with gaps in its positions
    # directly (its rotary table is cut at the row's length), and 4.36 takes no 4-D mask at the top.
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal & (keep[:, None, :] | torch.eye(length, dtype=torch.bool)) & mask.bool()[:, None, :]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]
    hidden = reference.model.embed_tokens(ids)
    positions = torch.arange(length).expand(3, length)
    for layer in reference.model.layers:
        hidden = layer(hidden, attention_mask=additive, position_ids=positions)[0]
    ref_logits = reference.lm_head(reference.model.norm(hidden))[keep]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    (ref_logits * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_unpacked_forwards_and_generation_are_untouched(attn):
    ids, mask, _ = batch()
    reference, model = tiny_llama(attn).eval(), tiny_llama(attn).eval()
    legacy_attention.install(model.model)
    legacy_attention.install(model.model)  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits * mask[..., None],
                                   reference(input_ids=ids, attention_mask=mask).logits * mask[..., None], atol=1e-6, rtol=0)
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1, :11], **kwargs), reference.generate(ids[:1, :11], **kwargs))


def test_attention_dropout_reaches_the_packed_attention(monkeypatch):
    """The model's attention_dropout is applied in training (0 in eval), as upstream's flash path does."""
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return varlen_attention(*args, **kwargs)

    varlen_attention = legacy_attention.varlen_attention
    monkeypatch.setattr(legacy_attention, "varlen_attention", recording)
    ids, mask, labels = batch()
    model = tiny_llama("eager", attention_dropout=0.4)
    legacy_attention.install(model.model)
    packed = pack_plan(mask.bool(), labels, find_units(labels, mask))
    embeds = model.model.embed_tokens(ids).flatten(0, 1)[packed.index][None]

    def run(seed):
        torch.manual_seed(seed)
        return legacy_attention.packed_decoder(model.model, embeds, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)

    model.train()
    first, again, other = run(0), run(0), run(1)
    assert seen == [0.4] * 6
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other, atol=1e-3)
    model.eval()
    run(0)
    assert seen[6:] == [0.0, 0.0]


def test_other_flash_keywords_are_refused():
    model = tiny_llama("eager").train()
    legacy_attention.install(model.model)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 6, 4, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert legacy_attention.flash_window(model.config, 0) is None
    with pytest.raises(UnsupportedAttention, match=r"passes \['softcap'\]"):
        attention._flash_attention_forward(q, q, q, cu, 6, softcap=30.0)
    assert attention._flash_attention_forward(q, q, q, cu, 6, dropout=0.0).shape == (1, 6, 4, 16)
