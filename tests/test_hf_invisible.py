"""hf.enable is invisible outside the packed training forward, and that forward keeps its contract.

Each test reproduces a failure of transformers' own modeling suites (or a silent wrong result) seen
with the earlier adapter, which set the text config's attention implementation to "regate" and ran
sdpa wherever the user had chosen eager.
"""

import copy
import pickle

import pytest
import torch

from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine, defaults, hookspecs
from regate_plugin.refcache import write_cache
from regate_plugin.units import find_units
from tiny_hf import KINDS, collate, tiny_config, tiny_model, tiny_samples

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("regate_plugin.patches.hf")
hf_attention = pytest.importorskip("regate_plugin.patches.hf_attention")

FP = Fingerprint(dataset="tiny", tokenizer="tiny", teacher="tiny", visual_tokens="tiny", max_length=64)
DENSE = ReGATEConfig(warmup=10)  # step 0 is dense


def packing_only(model):
    return hf.enable(model, ReGATEEngine(ReGATEConfig(), None))


def eager_model(kind, **text_overrides):
    """tiny_model(kind)'s weights, eager attention, and ``text_overrides`` on its text config."""
    cls, config = type(tiny_model(kind)), tiny_config(kind)
    for key, value in text_overrides.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="eager", dtype=torch.float32).train()


def loss_and_grads(model, batch, **extra):
    model.zero_grad()
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_config_reports_the_users_choice(kind):
    for chosen in ("sdpa", "eager"):
        model = tiny_model(kind)
        model.set_attn_implementation(chosen)
        packing_only(model)
        assert model.config.text_config._attn_implementation == chosen
        assert hf.adapter_for(model).text_model(model).config._attn_implementation == chosen


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_eval_attentions_are_upstreams(kind):
    batch = collate(kind, tiny_samples(kind, 2), "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference, model = eager_model(kind).eval(), packing_only(eager_model(kind)).eval()
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=True).attentions
        found = model(**inputs, output_attentions=True).attentions
    assert len(found) == len(expected) == reference.config.text_config.num_hidden_layers
    for got, want in zip(found, expected):
        assert got is not None
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_generation_with_attentions_and_assistant_is_upstreams():
    batch = collate("llava", tiny_samples("llava", 1), "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference, model = eager_model("llava").eval(), packing_only(eager_model("llava")).eval()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    expected = reference.generate(**inputs, **kwargs)
    found = model.generate(**inputs, **kwargs)
    assert torch.equal(found.sequences, expected.sequences)
    assert found.attentions[0][0] is not None
    torch.testing.assert_close(found.attentions[0][0], expected.attentions[0][0], atol=1e-6, rtol=0)
    assistant = packing_only(eager_model("llava")).eval()  # assisted decoding reads outputs.attentions[0]
    assisted = model.generate(**inputs, **kwargs, assistant_model=assistant)
    assert torch.equal(assisted.sequences, expected.sequences)


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_switching_to_eager_after_enable_still_trains_exactly(tmp_path, kind):
    batch = collate(kind, tiny_samples(kind, 3), "right")
    reference = eager_model(kind)
    ref_loss, ref_grads = loss_and_grads(reference, batch)

    model = tiny_model(kind)  # sdpa at enable time, eager afterwards
    counts = find_units(batch["labels"], batch["attention_mask"]).counts.tolist()
    cache = write_cache(tmp_path / "cache", FP, [torch.rand(n) for n in counts])
    hf.enable(model, ReGATEEngine(DENSE, cache))
    model.set_attn_implementation("eager")
    assert model.config.text_config._attn_implementation == "eager"
    loss, grads = loss_and_grads(model, batch, sample_index=torch.arange(3))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    model.eval()  # and eval is eager again: attentions come back
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
    assert all(a is not None for a in out.attentions)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_enabled_model_copies_and_pickles(tmp_path, clone):
    batch = collate("llava", tiny_samples("llava", 2), "right")
    counts = find_units(batch["labels"], batch["attention_mask"]).counts.tolist()
    cache = write_cache(tmp_path / "cache", FP, [torch.rand(n) * 4 for n in counts])
    model = hf.enable(tiny_model("llava"), ReGATEEngine(ReGATEConfig(warmup=0, cycle=2, dense_steps=1), cache))
    model._regate_engine.step = 1  # sparse
    twin = copy.deepcopy(model) if clone == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert twin._regate_engine is not model._regate_engine
    assert twin._regate_engine.refcache.path == cache.path
    assert twin._regate_engine.pm is model._regate_engine.pm  # the process-wide manager, not a copy
    with torch.no_grad():
        found = twin(**batch, sample_index=torch.arange(2))
        expected = model(**batch, sample_index=torch.arange(2))
    assert found.logits is None  # the copy is enabled: a packed, sparse forward
    assert found.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    assert twin._regate_engine.end_step().supervised_kept < sum(counts)


class KeepAll:
    """A strategy plugin object (not a module): always dense."""

    @hookspecs.hookimpl
    def regate_keep_ratio(self, step, config):
        return 1.0


def test_pickled_engine_keeps_a_scoped_plugin_manager():
    import pluggy

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="regate.defaults")
    pm.register(KeepAll(), name="keep-all")
    pm.register(KeepAll())  # unnamed: pluggy names it by its id
    engine = pickle.loads(pickle.dumps(ReGATEEngine(ReGATEConfig(warmup=0), None, pm=pm)))
    (_, defaults_copy), (_, named), (unnamed_name, unnamed) = engine.pm.list_name_plugin()
    assert engine.pm.get_name(defaults_copy) == "regate.defaults" and engine.pm.get_name(named) == "keep-all"
    assert isinstance(unnamed, KeepAll) and unnamed_name == str(id(unnamed))  # named anew, not by a stale id
    assert engine.pm.get_plugin("regate.defaults") is defaults
    assert engine.pm.hook.regate_keep_ratio(step=5, config=ReGATEConfig(warmup=0)) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_contract(kind):
    batch = collate(kind, tiny_samples(kind, 2), "right")
    model = packing_only(tiny_model(kind))
    out = model(**batch)
    assert out.loss is not None and out.loss.requires_grad
    assert out.logits is None and out.past_key_values is None
    assert out.hidden_states is None and out.attentions is None
    for kwargs, message in (
        ({"output_hidden_states": True}, "output_hidden_states=True: .* returns no hidden states"),
        ({"output_attentions": True}, "output_attentions=True: .* returns no attentions"),
        ({"use_cache": True}, "use_cache=True: .* builds no cache"),
    ):
        with pytest.raises(hf.TrainingForwardError, match=message):
            model(**batch, **kwargs)
    model.config.output_hidden_states = True
    with pytest.raises(hf.TrainingForwardError, match="config.output_hidden_states=True"):
        model(**batch)
    model.config.output_hidden_states = False
    with torch.no_grad():  # the upstream paths stay open: eval, or no labels
        unlabeled = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**unlabeled, output_hidden_states=True).hidden_states is not None


def test_attention_dropout_reaches_the_varlen_call(monkeypatch):
    seen = []
    real = hf_attention.varlen_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **{**kwargs, "dropout_p": 0.0})

    monkeypatch.setattr(hf_attention, "varlen_attention", spy)
    batch = collate("llava", tiny_samples("llava", 2), "right")
    model = packing_only(eager_model("llava", attention_dropout=0.25))
    model(**batch)
    assert seen and set(seen) == {0.25}
    model.eval()
    seen.clear()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert seen == []  # eval never reaches the packed path


def test_semantics_the_packed_path_cannot_honour_are_refused():
    layer = torch.nn.Linear(2, 2)
    layer.is_causal = True
    q = torch.randn(1, 2, 5, 4)
    packed = hf_attention.PackedAttention(torch.tensor([0, 5], dtype=torch.int32), 5, torch.arange(5), 5, 0, "sdpa")
    out, weights = hf_attention.regate_attention(layer, q, q, q, None, regate_packed=packed, position_ids=None)
    assert out.shape == (1, 5, 2, 4) and weights is None
    with pytest.raises(hf_attention.UnsupportedAttention, match=r"passes \['s_aux'\] to its attention"):
        hf_attention.regate_attention(layer, q, q, q, None, regate_packed=packed, s_aux=torch.zeros(2))
    layer.is_causal = False
    with pytest.raises(hf_attention.UnsupportedAttention, match="is not causal"):
        hf_attention.regate_attention(layer, q, q, q, None, regate_packed=packed)


def test_sliding_window_is_honoured_in_training(tmp_path):
    """Qwen2.5-VL with a 4-token sliding window on every layer: the packed dense step equals upstream
    eager attention with its sliding-window mask (a plain causal varlen would differ)."""
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                  layer_types=["sliding_attention"] * tiny_config("qwen2_5_vl").text_config.num_hidden_layers)
    batch = collate("qwen2_5_vl", tiny_samples("qwen2_5_vl", 2), "right")
    ref_loss, _ = loss_and_grads(eager_model("qwen2_5_vl", **window), batch)
    plain_loss, _ = loss_and_grads(eager_model("qwen2_5_vl"), batch)
    assert abs(plain_loss.item() - ref_loss.item()) > 1e-4  # the window matters for these lengths
    counts = find_units(batch["labels"], batch["attention_mask"]).counts.tolist()
    cache = write_cache(tmp_path / "cache", FP, [torch.rand(n) for n in counts])
    model = hf.enable(eager_model("qwen2_5_vl", **window), ReGATEEngine(DENSE, cache))
    loss, _ = loss_and_grads(model, batch, sample_index=torch.arange(2))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
