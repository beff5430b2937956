"""The hf target against the unpatched transformers models (tiny, random, fp32)."""

import math

import pytest
import torch
import torch.nn.functional as F

from regate_plugin import BatchError, Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.refcache import write_cache
from regate_plugin.units import IGNORE_INDEX, find_units
from tiny_hf import KINDS, collate, tiny_model, tiny_samples

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("regate_plugin.patches.hf")

FP = Fingerprint(dataset="tiny", tokenizer="tiny", teacher="tiny", visual_tokens="tiny", max_length=64)
SPARSE = ReGATEConfig(warmup=0, cycle=4, dense_steps=1, keep_ratio=0.5)


def unit_counts(batch):
    return find_units(batch["labels"], batch["attention_mask"]).counts.tolist()


def make_cache(tmp_path, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return write_cache(tmp_path / "cache", FP, [torch.rand(n, generator=gen) * 6 for n in counts])


def gradients(model):
    return {n: p.grad for n, p in model.named_parameters()}


def with_checkpointing(model, reentrant):
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


FIRST_KINDS = ("llava", "llava_next_video", "qwen2_5_vl")  # the full grid; later classes: two cases that cover it
GC_IDS = {None: "no-gc", True: "gc-reentrant", False: "gc-nonreentrant"}
DENSE_CASES = [
    *[(kind, gc, side) for kind in FIRST_KINDS for gc in (None, True, False) for side in ("right", "left")],
    *[case for kind in KINDS if kind not in FIRST_KINDS for case in ((kind, True, "left"), (kind, False, "right"))],
]


def text_model_of(model):
    return hf.adapter_for(model).text_model(model)


@pytest.mark.parametrize("kind,reentrant,padding_side", DENSE_CASES,
                         ids=[f"{k}-{GC_IDS[gc]}-{side}" for k, gc, side in DENSE_CASES])
def test_dense_step_equals_unpatched(tmp_path, kind, reentrant, padding_side):
    """Multi-turn samples of unequal lengths: loss and every gradient equal the unpatched model's."""
    batch = collate(kind, tiny_samples(kind, 3, turns=2), padding_side)
    reference = with_checkpointing(tiny_model(kind), reentrant)
    ref_loss = reference(**batch).loss
    ref_loss.backward()

    model = with_checkpointing(tiny_model(kind), reentrant)
    cache = make_cache(tmp_path, unit_counts(batch))
    engine = ReGATEEngine(ReGATEConfig(warmup=10), cache)  # step 0: dense
    hf.enable(model, engine)
    out = model(**batch, sample_index=torch.arange(3))
    assert out.logits is None  # the LM head never ran over the whole sequence
    out.loss.backward()

    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    ref_grads, grads = gradients(reference), gradients(model)
    compared, worst = 0, 0.0
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        torch.testing.assert_close(grads[name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)
        worst = max(worst, (grads[name] - ref_grad).abs().max().item())
        compared += 1
    assert compared > 10
    print(f"{kind} max |d loss| {abs(out.loss.item() - ref_loss.item()):.1e} max |d grad| {worst:.1e} over {compared} tensors")
    stats = engine.end_step()
    assert stats.supervised_kept == stats.supervised_total == sum(unit_counts(batch))
    units = find_units(batch["labels"], batch["attention_mask"])
    last = [int(units.col[units.row == b].max()) for b in range(3)]
    # padding removed, and each sample's tokens after its last supervised position (no loss row sees them)
    assert stats.llm_tokens == sum(int(batch["attention_mask"][b, : last[b] + 1].sum()) for b in range(3))
    assert stats.llm_tokens < int(batch["attention_mask"].sum())


def merged_inputs(model, batch):
    """The unpatched model's merged embeddings and position ids, as its text model receives them."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], position_ids=kwargs.get("position_ids"),
                    visual=kwargs.get("visual_pos_masks"), deepstack=kwargs.get("deepstack_visual_embeds"))

    handle = text_model_of(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return seen


def deepstack_of(merged, b, cols):
    """Qwen3-VL: sample b's deepstack features (its rows among all visual positions) and mask at cols."""
    if merged["visual"] is None:
        return {}
    visual = merged["visual"]
    start, count = int(visual[:b].sum()), int(visual[b].sum())
    assert int(visual[b, cols].sum()) == count  # visual tokens are never elided
    return {"visual_pos_masks": visual[b : b + 1, cols],
            "deepstack_visual_embeds": [layer[start : start + count] for layer in merged["deepstack"]]}


def deletion_reference(model, batch, keep_mask):
    """Delete elided positions from each merged sample, keep original positions, run it alone."""
    merged = merged_inputs(model, batch)
    embeds, position_ids = merged["embeds"], merged["position_ids"]
    labels, mask = batch["labels"], batch["attention_mask"]
    losses = []
    for b in range(labels.shape[0]):
        cols = keep_mask[b].nonzero().flatten()
        if position_ids is None:
            pos = cols[None]
        else:
            pos = position_ids[..., b : b + 1, cols] if position_ids.dim() == 3 else position_ids[b : b + 1, cols]
        hidden = text_model_of(model)(inputs_embeds=embeds[b : b + 1, cols], position_ids=pos,
                                      **deepstack_of(merged, b, cols)).last_hidden_state[0]
        logits = model.lm_head(hidden)
        for i, j in enumerate(cols.tolist()):
            if j + 1 < labels.shape[1] and mask[b, j + 1] and labels[b, j + 1] != IGNORE_INDEX:
                losses.append(F.cross_entropy(logits[i], labels[b, j + 1]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_step_equals_per_sample_deletion(tmp_path, kind):
    batch = collate(kind, tiny_samples(kind, 3, seed=1), "right")
    counts = unit_counts(batch)
    cache = make_cache(tmp_path, counts)
    engine = ReGATEEngine(SPARSE, cache)
    engine.step = 1  # phase 1 of the cycle: sparse
    expected_plan = engine.plan(batch["labels"], batch["attention_mask"], torch.arange(3))
    assert [int(expected_plan.unit_keep[expected_plan.units.row == b].sum()) for b in range(3)] == [
        math.ceil(n / 2) for n in counts
    ]

    model = tiny_model(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    hf.enable(model, engine)
    loss = model(**batch, sample_index=torch.arange(3)).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    hf.disable(model)
    reference = deletion_reference(model, batch, expected_plan.keep_mask)
    reference_grads = torch.autograd.grad(reference, params, allow_unused=True)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, param, got, want in zip(names, params, grads, reference_grads):
        zero = torch.zeros_like(param)
        torch.testing.assert_close(zero if got is None else got, zero if want is None else want, atol=1e-5, rtol=1e-4,
                                   msg=lambda message: f"{name}: {message}")
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2  # the gradient reached most weights
    stats = engine.end_step()
    assert stats.supervised_kept == 2 * sum(math.ceil(n / 2) for n in counts)  # planned twice: test + forward


@pytest.mark.parametrize("kind", KINDS)
def test_eval_generation_and_label_free_forwards_are_untouched(tmp_path, kind):
    batch = collate(kind, tiny_samples(kind, 2), "left")
    reference, model = tiny_model(kind), tiny_model(kind)
    engine = ReGATEEngine(SPARSE, make_cache(tmp_path, unit_counts(batch)))
    hf.enable(model, engine)
    with torch.no_grad():
        unlabeled = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(model(**unlabeled).logits, reference(**unlabeled).logits, atol=1e-6, rtol=0)
        model.eval(), reference.eval()
        torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, atol=1e-6, rtol=0)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**unlabeled, **kwargs), reference.generate(**unlabeled, **kwargs))
    assert engine.end_step().supervised_total == 0  # the engine never saw these forwards
    assert text_model_of(model).config._attn_implementation == "sdpa"  # what the user chose


def test_bad_input_names_the_sample(tmp_path):
    batch = collate("llava", tiny_samples("llava", 3), "right")
    counts = unit_counts(batch)
    model = tiny_model("llava")
    hf.enable(model, ReGATEEngine(SPARSE, make_cache(tmp_path, counts + [counts[0] + 1])))
    with pytest.raises(BatchError, match="no sample indices"):
        model(**batch)
    with pytest.raises(BatchError, match="sample 9 is outside the reference cache"):
        model(**batch, sample_index=torch.tensor([0, 9, 2]))
    with pytest.raises(BatchError, match=rf"sample 3 has {counts[0]} supervised tokens .* cache holds {counts[0] + 1}"):
        model(**batch, sample_index=torch.tensor([3, 1, 2]))


def test_enable_rejects_unsupported_models_and_shows_sample_index_in_signature():
    import inspect

    text_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ))
    with pytest.raises(TypeError, match="LlamaForCausalLM is not supported"):
        hf.enable(text_only, ReGATEEngine(SPARSE, None))
    model = tiny_model("llava")
    hf.enable(model, ReGATEEngine(SPARSE, None))
    hf.enable(model, ReGATEEngine(SPARSE, None))  # idempotent: the class is wrapped once
    forward = type(model).forward
    assert not hasattr(forward._regate_original, "_regate_original")
    assert "sample_index" in inspect.signature(model.forward).parameters


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_loss_only_elision_equals_upstream_with_the_elided_labels_ignored(tmp_path, kind):
    """elision="loss": every token stays as input, only the elided units' loss terms go, so the step
    is the unpatched model's with those labels set to IGNORE_INDEX (loss and every gradient)."""
    batch = collate(kind, tiny_samples(kind, 3, seed=1), "right")
    cache = make_cache(tmp_path, unit_counts(batch))
    engine = ReGATEEngine(SPARSE.replace(elision="loss"), cache)
    engine.step = 1  # sparse
    plan = engine.plan(batch["labels"], batch["attention_mask"], torch.arange(3))
    elided = ~plan.unit_keep
    assert elided.any() and plan.unit_keep.any()
    labels = batch["labels"].clone()
    labels[plan.units.row[elided], plan.units.col[elided] + 1] = IGNORE_INDEX
    reference = tiny_model(kind)
    ref_loss = reference(**{**batch, "labels": labels}).loss
    ref_loss.backward()

    model = tiny_model(kind)
    hf.enable(model, engine)
    out = model(**batch, sample_index=torch.arange(3))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    ref_grads, grads = gradients(reference), gradients(model)
    for name, ref_grad in ref_grads.items():
        if ref_grad is not None:
            torch.testing.assert_close(grads[name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)
    # the same units as input elision would keep, but every token up to the last kept one is fed
    input_plan = ReGATEEngine(SPARSE, cache)
    input_plan.step = 1
    elided_input = input_plan.plan(batch["labels"], batch["attention_mask"], torch.arange(3))
    assert torch.equal(elided_input.unit_keep, plan.unit_keep)
    assert plan.host.loss_rows.numel() == int(plan.unit_keep.sum())
    assert plan.host.num_tokens == elided_input.host.num_tokens + int(elided.sum()) - trimmed_after_last(plan)


def trimmed_after_last(plan):
    """Elided units after their sample's last kept unit: no kept loss row attends to them, so trimmed."""
    units = plan.units
    last_kept = torch.full((int(units.row.max()) + 1,), -1).scatter_reduce(
        0, units.row[plan.unit_keep], units.col[plan.unit_keep], reduce="amax")
    return int((~plan.unit_keep & (units.col > last_kept[units.row])).sum())
