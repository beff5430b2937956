"""What users combine with ReGATE: every setting is honoured or refused by name before step 1, and a
training micro-batch that bypasses the packed forward anyway stops the run (``BypassError``).

Liger-Kernel's Triton kernels cannot run on a CPU: these tests apply its forward patches (its fused
cross-entropy forward, at class or instance level) without its layer kernels, and check which
forward runs; the GPU kit compares Liger's kernels with and without ReGATE (benchmarks/gpu).
"""

import functools
import logging
import types

import pytest
import torch

from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.engine import BypassError
from regate_plugin.hookspecs import TargetRefusal
from regate_plugin.refcache import write_cache
from regate_plugin.trainer import IndexedCollator, IndexedDataset, attach
from regate_plugin.units import find_units
from tiny_hf import collate, tiny_model, tiny_samples

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("regate_plugin.patches.hf")
liger = pytest.importorskip("liger_kernel.transformers.monkey_patch")

FP = Fingerprint(dataset="compose", tokenizer="tiny", teacher="tiny", visual_tokens="16", max_length=64)
SPARSE = ReGATEConfig(warmup=1, cycle=3, dense_steps=1, keep_ratio=0.5)  # sparse steps from step 2
NO_LAYER_KERNELS = {"rope": False, "rms_norm": False, "swiglu": False}  # Triton: GPU only
STEPS = 4


class CountingEngine(ReGATEEngine):
    """Counts the micro-batches it plans."""

    planned = 0

    def plan(self, *args, **kwargs):
        self.planned += 1
        return super().plan(*args, **kwargs)


@pytest.fixture(scope="module")
def samples():
    return tiny_samples("llava", 8, seed=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, samples):
    gen = torch.Generator().manual_seed(0)
    counts = [int(find_units(s["labels"][None]).counts[0]) for s in samples]
    return write_cache(tmp_path_factory.mktemp("compose") / "cache", FP, [torch.rand(n, generator=gen) * 5 for n in counts])


@pytest.fixture
def llava_forward(monkeypatch):
    """Restores LlavaForConditionalGeneration.forward (a class-level Liger patch replaces it)."""
    cls = transformers.LlavaForConditionalGeneration
    monkeypatch.setattr(cls, "forward", cls.forward)
    return cls


def training_args(out, **extra):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.05, optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant", disable_tqdm=True, **extra,
    )


def trainer_for(model, samples, out, **extra):
    return transformers.Trainer(
        model=model, args=training_args(out, **extra), train_dataset=IndexedDataset(samples),
        data_collator=IndexedCollator(lambda features: collate("llava", features)),
    )


def regate_trainer(samples, cache, out, model=None, config=SPARSE, **extra):
    model = model if model is not None else tiny_model("llava")
    engine = CountingEngine(config, cache)
    hf.enable(model, engine)
    trainer = trainer_for(model, samples, out, **extra)
    return trainer, engine


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# --- refused by name before step 1 ---------------------------------------------------------------


@pytest.mark.parametrize("setting,extra", [
    ("label_smoothing_factor=0.1", {"label_smoothing_factor": 0.1}),
    ("torch_compile=True", {"torch_compile": True}),
])
def test_trainer_settings_are_refused_at_attach(tmp_path, samples, cache, setting, extra):
    trainer, engine = regate_trainer(samples, cache, tmp_path, **extra)
    with pytest.raises(TargetRefusal, match=setting):
        attach(trainer, engine)


def test_compute_loss_func_is_refused_at_attach(tmp_path, samples, cache):
    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum()

    model = tiny_model("llava")
    engine = ReGATEEngine(SPARSE, cache)
    hf.enable(model, engine)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=IndexedDataset(samples),
                                   data_collator=IndexedCollator(lambda f: collate("llava", f)), compute_loss_func=my_loss)
    with pytest.raises(TargetRefusal, match="compute_loss_func=.*my_loss"):
        attach(trainer, engine)


def test_a_compiled_model_and_data_parallel_are_refused(tmp_path, samples, cache, monkeypatch):
    trainer, engine = regate_trainer(samples, cache, tmp_path)
    trainer.model = torch.compile(trainer.model)
    with pytest.raises(TargetRefusal, match="torch.compile'd model"):
        attach(trainer, engine)
    trainer, engine = regate_trainer(samples, cache, tmp_path)
    monkeypatch.setattr(transformers.TrainingArguments, "n_gpu", property(lambda self: 4))
    with pytest.raises(TargetRefusal, match="torchrun --nproc_per_node 4"):
        attach(trainer, engine)


def test_a_loss_type_other_than_cross_entropy_is_refused(tmp_path, samples, cache):
    trainer, engine = regate_trainer(samples, cache, tmp_path)
    trainer.args.loss_type = "dft"  # TRL's SFTConfig field: ReGATE's loss would silently replace it
    with pytest.raises(TargetRefusal, match="loss_type='dft'"):
        attach(trainer, engine)


def test_a_subclass_with_its_own_forward_is_refused_unless_allowed(tmp_path, samples, cache):
    class WithAuxLoss(transformers.LlavaForConditionalGeneration):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss + 0.25 * self.lm_head.weight.pow(2).mean()
            return out

    model = WithAuxLoss(tiny_model("llava").config)
    model.load_state_dict(tiny_model("llava").state_dict())
    engine = CountingEngine(SPARSE, cache)
    with pytest.raises(hf.SubclassForward, match="WithAuxLoss defines its own forward over LlavaForConditionalGeneration"):
        hf.enable(model, engine)
    hf.enable(model, engine, allow_subclass_forward=True)
    batch = collate("llava", samples[:2])
    out = model(**batch, sample_index=torch.tensor([0, 1]))
    plain = tiny_model("llava")
    expected = plain(**batch).loss + 0.25 * plain.lm_head.weight.pow(2).mean()
    assert engine.planned == 1  # the packed path ran inside the subclass's forward
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


# --- the guard: a micro-batch that bypasses the packed forward stops training ---------------------


class SetAfterStart(transformers.TrainerCallback):
    """Applies ``change(trainer)`` when step ``at`` begins: a setting changed after attach()."""

    def __init__(self, trainer, at, change):
        self.trainer, self.at, self.change = trainer, at, change

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.change(self.trainer)


@pytest.mark.parametrize("cause,change", [
    ("a label smoother", lambda t: setattr(t, "label_smoother", transformers.trainer_pt_utils.LabelSmoother(0.1))),
    ("a compute_loss_func", lambda t: setattr(t, "compute_loss_func", lambda out, labels, **kw: out.logits.float().mean())),
    # what any library that sets an instance forward does (Liger-Kernel's would, but its kernels need a GPU)
    ("a forward set on the model", lambda t: setattr(t.model, "forward", types.MethodType(
        type(t.model).forward._regate_original, t.model))),
])
def test_a_micro_batch_that_bypasses_the_packed_forward_stops_training(tmp_path, samples, cache, cause, change):
    trainer, engine = regate_trainer(samples, cache, tmp_path)
    attach(trainer, engine)
    trainer.add_callback(SetAfterStart(trainer, 2, change))
    with pytest.raises(BypassError, match=rf"of the 2 training micro-batches of step 2 did not run .*Likely: {cause}"):
        trainer.train()
    assert engine.planned == 4  # steps 0 and 1 ran packed


def test_every_micro_batch_is_planned_in_a_normal_run(tmp_path, samples, cache):
    trainer, engine = regate_trainer(samples, cache, tmp_path)
    attach(trainer, engine)
    trainer.train()
    assert engine.planned == STEPS * 2 and engine.step == STEPS


# --- Liger-Kernel composes, whatever the order ---------------------------------------------------


def dense_reference(samples, out):
    """The unpatched model trained by the Trainer: the losses a dense ReGATE step must equal."""
    trainer = trainer_for(tiny_model("llava"), samples, out)
    trainer.train()
    return losses(trainer)


DENSE = ReGATEConfig(warmup=100)  # every step dense: packed, equal to upstream


@pytest.mark.parametrize("order", ["instance-before-enable", "class-after-enable", "trainer-use_liger_kernel"])
def test_liger_composes_training_runs_packed_and_eval_runs_ligers_forward(tmp_path, samples, cache, llava_forward,
                                                                         monkeypatch, order):
    calls = []

    @functools.wraps(liger.llava_lce_forward)
    def spy(self, *args, **kwargs):  # Liger's forward, which its Triton cross-entropy would follow on a GPU
        calls.append(self.training)
        return "liger"

    monkeypatch.setattr(liger, "llava_lce_forward", spy)
    expected = dense_reference(samples, tmp_path / "reference")

    model, extra = tiny_model("llava"), {}
    if order == "instance-before-enable":
        liger.apply_liger_kernel_to_llava(model=model, **NO_LAYER_KERNELS)
    elif order == "trainer-use_liger_kernel":  # the Trainer applies it in train(), after attach()
        extra = {"use_liger_kernel": True}
        # its instance path applies Llama's layer kernels whatever the config says (GPU only): left out here
        monkeypatch.setitem(liger.MODEL_TYPE_TO_APPLY_LIGER_FN, "llama", lambda **kwargs: None)
    engine = CountingEngine(DENSE, cache)
    hf.enable(model, engine)
    if order == "class-after-enable":
        liger.apply_liger_kernel_to_llava(**NO_LAYER_KERNELS)
        assert not hasattr(llava_forward.forward, "_regate_original")  # Liger's forward replaced ours
    trainer = trainer_for(model, samples, tmp_path / "regate", **extra)
    attach(trainer, engine)
    trainer.train()

    assert engine.planned == STEPS * 2  # every training micro-batch took the packed path
    assert not any(calls)  # Liger's forward never ran in training
    assert losses(trainer) == pytest.approx(expected, abs=1e-5)  # ... and the dense steps equal upstream's
    model.eval()
    assert model(**collate("llava", samples[:2])) == "liger" and calls == [False]  # evaluation is Liger's forward


# --- accelerate's hooks, the shared config, the INFO line -----------------------------------------


class CountingHook:
    def __new__(cls):
        from accelerate.hooks import ModelHook

        class Hook(ModelHook):
            calls = 0

            def pre_forward(self, module, *args, **kwargs):
                Hook.calls += 1
                return args, kwargs

        return Hook()


def test_accelerate_hooks_keep_running_and_are_restored(samples, cache):
    from accelerate.hooks import add_hook_to_module

    model = tiny_model("llava")
    top, text = CountingHook(), CountingHook()
    add_hook_to_module(model, top)  # before enable: its wrapper is the instance forward
    engine = CountingEngine(SPARSE, cache)
    hf.enable(model, engine)
    text_model = model.model.language_model
    add_hook_to_module(text_model, text)
    text_forward = text_model.forward
    batch = collate("llava", samples[:2])
    loss = model(**batch, sample_index=torch.tensor([0, 1])).loss
    loss.backward()
    assert engine.planned == 1
    assert type(top).calls == 1 and type(text).calls == 1  # both hooks ran around the packed call
    assert text_model.forward is text_forward and text_model._hf_hook is text  # put back as it was
    reference = tiny_model("llava")(**batch).loss
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)  # step 0 is dense


def test_the_shared_config_is_never_switched(samples, cache):
    model = tiny_model("llava")
    hf.enable(model, ReGATEEngine(SPARSE, cache))
    config = model.config.get_text_config()
    seen = []
    layer = model.model.language_model.layers[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append(config._attn_implementation))
    model(**collate("llava", samples[:2]), sample_index=torch.tensor([0, 1]))
    assert seen == ["sdpa"]  # the packed forward routed attention through a copy, not the shared config


def test_enable_logs_what_it_patched(caplog, cache, llava_forward):
    model = tiny_model("llava")
    liger.apply_liger_kernel_to_llava(model=model, **NO_LAYER_KERNELS)
    with caplog.at_level(logging.INFO, logger="regate_plugin.patches.hf"):
        hf.enable(model, ReGATEEngine(SPARSE, cache))
    line = caplog.records[-1].getMessage()
    assert "LlavaForConditionalGeneration: adapter LlavaForConditionalGeneration (LLaVA-1.5 (HF))" in line
    assert "instance forward lce_forward wrapped" in line


# --- TRL's SFTTrainer -----------------------------------------------------------------------------


@pytest.mark.parametrize("setting,extra", [
    ("label_smoothing_factor=0.1", {"label_smoothing_factor": 0.1}),
    ("loss_type='dft'", {"loss_type": "dft"}),
])
def test_trl_settings_that_replace_the_loss_are_refused(tmp_path, setting, extra):
    trl = pytest.importorskip("test_hf_trl")
    proc, model = trl.processor(), tiny_model("llava")
    engine = ReGATEEngine(DENSE, None)
    hf.enable(model, engine)
    args = trl.sft_config(tmp_path)
    for key, value in extra.items():
        setattr(args, key, value)
    trainer = trl.ReGATESFTTrainer(model=model, args=args, train_dataset=trl.indexed(trl.dataset()),
                                   processing_class=proc, data_collator=IndexedCollator(trl.trl_collator(proc)))
    with pytest.raises(TargetRefusal, match=setting):
        attach(trainer, engine)


def test_trl_run_that_loses_its_labels_midway_stops(tmp_path):
    trl = pytest.importorskip("test_hf_trl")
    proc, model = trl.processor(), tiny_model("llava")
    engine = CountingEngine(DENSE, None)
    hf.enable(model, engine)
    trainer = trl.ReGATESFTTrainer(model=model, args=trl.sft_config(tmp_path), train_dataset=trl.indexed(trl.dataset()),
                                   processing_class=proc, data_collator=IndexedCollator(trl.trl_collator(proc)))
    attach(trainer, engine)
    trainer.add_callback(SetAfterStart(trainer, 1, lambda t: setattr(
        t, "label_smoother", transformers.trainer_pt_utils.LabelSmoother(0.1))))
    with pytest.raises(BypassError, match="of the 1 training micro-batches of step 1 .*Likely: a label smoother"):
        trainer.train()
    assert engine.planned == 1


def test_the_gpu_kits_liger_check_runs_the_packed_forward_under_ligers_forward(monkeypatch):
    """benchmarks/gpu/checks.py's Liger case on a CPU, its Triton parts (layer kernels, fused
    cross-entropy) stood in for by upstream's: the check's plumbing, and the packed path under an
    instance forward of Liger's."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks" / "gpu"))
    import checks
    from regate_plugin import bench

    monkeypatch.setitem(liger.MODEL_TYPE_TO_APPLY_LIGER_FN, "llama", lambda **kwargs: None)
    cls = transformers.LlavaForConditionalGeneration
    monkeypatch.setattr(cls, "forward", cls.forward)
    upstream_forward = getattr(cls.forward, "_regate_original", cls.forward)
    monkeypatch.setattr(liger, "llava_lce_forward", functools.wraps(liger.llava_lce_forward)(
        lambda self, *args, **kwargs: upstream_forward(self, *args, **kwargs)))
    results = checks.liger_dense_step(torch.device("cpu"), shape=bench.SHAPES["tiny"])
    assert [r.case for r in results[:2]] == ["packed forward ran", "loss"]
    assert all(r.passed for r in results), [r for r in results if not r.passed]
