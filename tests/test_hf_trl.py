"""TRL's SFTTrainer with a vision-language model through ReGATE: TRL's collator and processor,
wrapped by IndexedDataset / IndexedCollator, the loss from the packed forward."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.engine import SAMPLE_INDEX_KEY
from regate_plugin.patches import hf
from regate_plugin.patches.hf_trl import ReGATESFTTrainer
from regate_plugin.refcache import write_cache
from regate_plugin.trainer import IndexedCollator, attach
from regate_plugin.units import find_units
from tiny_hf import LLAVA_IMAGE_ID, VOCAB_SIZE, tiny_model

FP = Fingerprint(dataset="trl", tokenizer="tiny", teacher="tiny", visual_tokens="16", max_length=64)
STEPS = 4


def processor():
    """LLaVA's processor over a whitespace word-level tokenizer (w3 ... w249) and CLIP's image processor."""
    names = {0: "<pad>", 1: "<s>", 2: "</s>", LLAVA_IMAGE_ID: "<image>"}
    core = Tokenizer(models.WordLevel({names.get(i, f"w{i}"): i for i in range(VOCAB_SIZE)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", image_token="<image>")


def words(gen, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 250, (n,), generator=gen))


def dataset(n=8):
    """Prompt-completion samples with one picture each, of unequal lengths (TRL's vision format)."""
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_list([
        {"images": [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))],
         "prompt": f"{words(gen, 2 + i % 3)} <image> {words(gen, 3 + i % 4)}",
         "completion": f"{words(gen, 3 + (5 * i) % 7)} </s>"}
        for i in range(n)
    ])


def trl_collator(proc):
    return DataCollatorForVisionLanguageModeling(proc, completion_only_loss=True)


def sft_config(out, learning_rate=0.05):
    # SGD: the weights after a few steps compare as exactly as the gradients (Adam amplifies 1e-7 noise)
    return SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=learning_rate, optim="sgd",
                     logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                     lr_scheduler_type="constant", completion_only_loss=True, max_length=None, bf16=False,
                     gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0)


def indexed(data):
    """A datasets.Dataset's IndexedDataset: the sample index as a column (TRL takes datasets only)."""
    return data.add_column(SAMPLE_INDEX_KEY, list(range(len(data))))


def regate_run(tmp_path, config, cache, learning_rate=0.05):
    proc, model = processor(), tiny_model("llava")
    engine = ReGATEEngine(config, cache)
    hf.enable(model, engine)
    trainer = ReGATESFTTrainer(model=model, args=sft_config(tmp_path / "regate", learning_rate), train_dataset=indexed(dataset()),
                               processing_class=proc, data_collator=IndexedCollator(trl_collator(proc)))
    attach(trainer, engine)
    trainer.train()
    return trainer, model, engine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    collate = trl_collator(processor())
    counts = []
    for sample in dataset():
        batch = collate([dict(sample)])
        counts.append(int(find_units(batch["labels"], batch["attention_mask"]).counts[0]))
    gen = torch.Generator().manual_seed(1)
    return write_cache(tmp_path_factory.mktemp("trl") / "cache", FP, [torch.rand(n, generator=gen) * 5 for n in counts])


def test_dense_sft_through_regate_equals_trls_own_training(tmp_path, cache):
    proc, reference = processor(), tiny_model("llava")
    upstream = SFTTrainer(model=reference, args=sft_config(tmp_path / "trl"), train_dataset=dataset(),
                          processing_class=proc, data_collator=trl_collator(proc))
    upstream.train()
    trainer, model, engine = regate_run(tmp_path, ReGATEConfig(warmup=100), cache)  # dense: packing only
    assert engine.step == STEPS
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (upstream, trainer)]
    assert len(losses[0]) == STEPS and losses[1] == pytest.approx(losses[0], abs=1e-5)
    initial, moved = tiny_model("llava"), 0
    for (name, want), (_, got) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
        moved += not torch.equal(want, initial.get_parameter(name))
    assert moved > 10  # four optimizer steps moved the weights, identically
    logs = [e for e in trainer.state.log_history if "regate/supervised_kept" in e]
    assert len(logs) == STEPS and all(e["regate/supervised_kept"] == e["regate/supervised_total"] for e in logs)
    assert all(e["regate/llm_tokens"] < e["regate/padded_tokens"] for e in logs)  # TRL's mid-row padding removed


def test_sparse_sft_trains_on_the_selected_tokens(tmp_path, cache):
    config = ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5)
    trainer, model, engine = regate_run(tmp_path, config, cache)
    logs = {e["step"]: e for e in trainer.state.log_history if "regate/supervised_kept" in e}
    assert sorted(logs) == list(range(1, STEPS + 1))
    for step, entry in logs.items():  # logged step s is optimizer step s-1: odd optimizer steps are sparse
        kept, total = entry["regate/supervised_kept"], entry["regate/supervised_total"]
        assert (kept < total) if (step - 1) % 2 else (kept == total), (step, kept, total)
        assert np.isfinite(entry["loss"])


def test_the_ema_takes_the_students_losses_of_the_trained_units(tmp_path, cache):
    """Weights frozen (learning rate 0) and elision ``loss`` (kept units see the whole context): every
    unit the run trained holds beta * reference + (1 - beta) * its loss under the unpatched model, alone
    and dense; one epoch, so each sample was trained once, half its units on a sparse step."""
    config = ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5, elision="loss")
    _, _, engine = regate_run(tmp_path, config, cache, learning_rate=0.0)
    reference_model, collate = tiny_model("llava"), trl_collator(processor())
    offsets, initial = cache.offsets_tensor(), cache.all_losses().float()
    trained_counts = []
    for i, sample in enumerate(dataset()):
        batch = collate([dict(sample)])
        with torch.no_grad():
            logits = reference_model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        targets = batch["labels"][0, 1:]
        supervised = (targets != -100).nonzero().flatten()
        losses = torch.nn.functional.cross_entropy(logits[supervised], targets[supervised], reduction="none")
        ema, ref = engine.ema.values[offsets[i]:offsets[i + 1]], initial[offsets[i]:offsets[i + 1]]
        trained = ema != ref
        torch.testing.assert_close(ema[trained], config.ema_beta * ref[trained] + (1 - config.ema_beta) * losses[trained],
                                   atol=1e-5, rtol=1e-5)
        trained_counts.append((int(trained.sum()), len(ref)))
    halves = sum(kept == -(-n // 2) < n for kept, n in trained_counts)
    assert halves == STEPS // 2 * 2 and all(kept in (n, -(-n // 2)) for kept, n in trained_counts)  # 2 sparse steps x 2 samples


def test_the_engine_is_found_under_any_nesting_of_wrappers():
    """Under DDP with LoRA the loss sees DDP(PeftModel(model)): unwrapped in the wrong order, the
    engine is not found and TRL's own (dense) loss runs silently."""
    import peft

    from regate_plugin.patches.upstream import student as _student

    class DDPLike(torch.nn.Module):  # DistributedDataParallel's shape: the model under .module, no get_base_model
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llava")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for wrapped in (model, DDPLike(model), lora, DDPLike(lora), DDPLike(DDPLike(lora))):
        assert _student(wrapped) is model
