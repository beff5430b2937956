"""A 30-step HF Trainer run with ReGATE on: schedule, logged counts, checkpoints, exact resume."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from regate_plugin import cli
from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine, RefCache
from regate_plugin.refcache import write_cache
from regate_plugin.budget import start_ratio
from regate_plugin.schedule import keep_ratio_at
from regate_plugin.selection import keep_quota
from regate_plugin.trainer import STATE_FILE, IndexedCollator, IndexedDataset, attach
from regate_plugin.units import find_units
from tiny_hf import collate, tiny_model, tiny_samples

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("regate_plugin.patches.hf")

CONFIG = ReGATEConfig(warmup=4, cycle=6, dense_steps=2, keep_ratio=0.5)
FP = Fingerprint(dataset="tiny16", tokenizer="tiny", teacher="tiny", visual_tokens="16", max_length=64)
STEPS, SAVE_AT = 30, 15


class RecordingEngine(ReGATEEngine):
    """Remembers every selection it makes, by optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selections = []

    def plan(self, labels, attention_mask, sample_ids, position_ids=None, **kwargs):
        plan = super().plan(labels, attention_mask, sample_ids, position_ids, **kwargs)
        self.selections.append((self.step, plan.sample_ids.tolist(), plan.unit_keep.tolist()))
        return plan


@pytest.fixture(scope="module")
def dataset():
    return tiny_samples("llava", 16, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset):
    gen = torch.Generator().manual_seed(0)
    counts = [int(find_units(s["labels"][None]).counts[0]) for s in dataset]
    return write_cache(tmp_path_factory.mktemp("ref") / "cache", FP, [torch.rand(n, generator=gen) * 5 for n in counts])


def run(output_dir, dataset, cache: RefCache, resume_from=None, config=CONFIG):
    model = tiny_model("llava", seed=0)
    if resume_from:
        # transformers 5.24's Trainer._load_from_checkpoint skips the key conversion that Llava's saved
        # names need (a warning, and stale weights); from_pretrained applies it.
        model = type(model).from_pretrained(resume_from, attn_implementation="sdpa").train()
    engine = RecordingEngine(config, cache)
    hf.enable(model, engine)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=2e-3,
        logging_steps=1, save_strategy="steps", save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant", disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=IndexedDataset(dataset),
        data_collator=IndexedCollator(lambda features: collate("llava", features)),
    )
    attach(trainer, engine)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, engine


def step_logs(trainer, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def test_thirty_steps_schedule_logging_checkpoint_and_exact_resume(tmp_path, dataset, cache):
    trainer, engine = run(tmp_path / "full", dataset, cache)
    batches = [samples for _, samples, _ in engine.selections]
    counts = cache.counts()

    # Loss goes down.
    losses = step_logs(trainer, "loss")
    assert len(losses) == STEPS
    assert sum(losses[s] for s in range(26, 31)) < 0.8 * sum(losses[s] for s in range(1, 6))

    # Logged token counts follow the schedule: step s of the log is optimizer step s-1.
    kept, total, ratio = (step_logs(trainer, f"regate/{k}") for k in ("supervised_kept", "supervised_total", "keep_ratio"))
    assert len(batches) == STEPS
    sparse_steps = 0
    for step, samples in enumerate(batches):
        p = keep_ratio_at(step, CONFIG)
        sparse_steps += p < 1
        assert ratio[step + 1] == p
        assert total[step + 1] == sum(counts[s] for s in samples)
        assert kept[step + 1] == int(keep_quota(torch.tensor([counts[s] for s in samples]), p).sum())
    assert sparse_steps == 16  # steps 6-9, 12-15, 18-21, 24-27 (28 and 29 open the next cycle, dense)
    assert all(step_logs(trainer, "regate/llm_tokens")[s] < step_logs(trainer, "regate/padded_tokens")[s] for s in losses)

    # The checkpoint carries the ReGATE state once.
    state = torch.load(tmp_path / "full" / f"checkpoint-{SAVE_AT}" / STATE_FILE, weights_only=True)
    assert state["step"] == SAVE_AT and state["ema"]["values"].shape == (cache.num_units,)

    # Resume from step 15 in a fresh process-like setup: steps 16-30 repeat exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE_AT}", resumed_dir / f"checkpoint-{SAVE_AT}")
    trainer2, engine2 = run(resumed_dir, dataset, cache, resume_from=str(resumed_dir / f"checkpoint-{SAVE_AT}"))
    assert engine2.selections == [s for s in engine.selections if s[0] >= SAVE_AT]
    resumed_losses = {s: v for s, v in step_logs(trainer2, "loss").items() if s > SAVE_AT}  # 1-15: restored history
    assert sorted(resumed_losses) == list(range(SAVE_AT + 1, STEPS + 1))
    assert all(resumed_losses[s] == losses[s] for s in resumed_losses)
    assert engine2.ema.values.numpy().tobytes() == engine.ema.values.numpy().tobytes()
    assert engine2.step == engine.step == STEPS


def test_resume_without_regate_state_is_refused(tmp_path, dataset, cache):
    run(tmp_path / "a", dataset, cache)
    (tmp_path / "a" / f"checkpoint-{SAVE_AT}" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"holds no {STATE_FILE}"):
        run(tmp_path / "a", dataset, cache, resume_from=str(tmp_path / "a" / f"checkpoint-{SAVE_AT}"))


def test_report_summarises_the_run(tmp_path, dataset, cache):
    trainer, engine = run(tmp_path / "run", dataset, cache)
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    kept, total = step_logs(trainer, "regate/supervised_kept"), step_logs(trainer, "regate/supervised_total")
    assert facts["steps"] == STEPS
    assert facts["supervised_kept"] == sum(kept.values()) and facts["supervised_total"] == sum(total.values())
    assert facts["supervised_share"] == pytest.approx(sum(kept.values()) / sum(total.values()))
    assert facts["last_loss"] == step_logs(trainer, "loss")[STEPS]
    png = tmp_path / "run" / "regate_report.png"
    assert facts["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = CliRunner().invoke(cli.main, ["report", str(tmp_path / "run")]).output
    assert "supervised tokens" in text and f"{facts['supervised_share']:.1%}" in text


def test_auto_keep_ratio_is_logged_per_cycle_and_reported(tmp_path, dataset, cache):
    config = CONFIG.replace(keep_ratio="auto")
    trainer, engine = run(tmp_path / "run", dataset, cache, config=config)
    logged, mean = step_logs(trainer, "regate/auto_keep_ratio"), step_logs(trainer, "regate/keep_ratio")
    assert sorted(logged) == list(range(1, STEPS + 1))
    decided = {d["step"]: d["keep_ratio"] for d in engine.budget.decisions}
    assert sorted(decided) == [5, 11, 17, 23, 29]  # the last dense step of every cycle
    ratio = start_ratio(config)
    for step in range(STEPS):  # log entry step + 1 follows optimizer step ``step``
        dense = keep_ratio_at(step, config) == 1.0
        assert mean[step + 1] == (1.0 if dense else ratio)
        ratio = decided.get(step, ratio)
        assert logged[step + 1] == ratio
    assert any(d["shed_elided"] is not None for d in engine.budget.decisions)
    facts = json.loads(CliRunner().invoke(cli.main, ["report", str(tmp_path / "run"), "--json"]).output)
    chosen = list(logged.values())
    assert facts["auto_keep_ratio"] == {"first": chosen[0], "last": chosen[-1], "min": min(chosen), "max": max(chosen)}
    assert (tmp_path / "run" / "regate_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = CliRunner().invoke(cli.main, ["report", str(tmp_path / "run")]).output
    assert f"auto keep ratio       {chosen[0]:.3g} (first logged) -> {chosen[-1]:.3g} (last)" in text


def test_report_explains_a_folder_without_a_run(tmp_path):
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no trainer_state.json" in result.output


@pytest.mark.parametrize("on_each_node", [False, True], ids=["shared-filesystem", "save_on_each_node"])
def test_regate_state_is_written_where_the_trainer_writes_checkpoints(tmp_path, monkeypatch, cache, on_each_node):
    """Two nodes of two processes each: regate_state.pt goes where the Trainer writes its checkpoint
    files (TrainingArguments.should_save): process 0, or with save_on_each_node each node's first."""
    from regate_plugin.trainer import ReGATECallback

    written = {}
    for process, local in ((0, 0), (1, 1), (2, 0), (3, 1)):
        monkeypatch.setattr(transformers.TrainingArguments, "process_index", property(lambda self, i=process: i))
        monkeypatch.setattr(transformers.TrainingArguments, "local_process_index", property(lambda self, i=local: i))
        out = tmp_path / f"node{process // 2}-process{process}"
        args = transformers.TrainingArguments(output_dir=str(out), save_on_each_node=on_each_node, report_to=[])
        engine = ReGATEEngine(CONFIG, cache)
        engine.step = 7
        state = transformers.TrainerState(global_step=7, is_world_process_zero=process == 0)
        ReGATECallback(engine).on_save(args, state, transformers.TrainerControl())
        path = out / "checkpoint-7" / STATE_FILE
        written[process] = path.is_file() and torch.load(path, weights_only=True)["step"] == 7
    assert written == {0: True, 1: False, 2: on_each_node, 3: False}


def test_indexed_collator_passes_unindexed_batches_through():
    """The Trainer collates evaluation sets with the training collator: they carry no index."""
    from regate_plugin.trainer import IndexedCollator

    def inner(features):
        return {"x": torch.tensor([f["x"] for f in features])}

    collator = IndexedCollator(inner)
    batch = collator([{"x": 1, "sample_index": 7}, {"x": 2, "sample_index": 3}])
    assert batch["x"].tolist() == [1, 2] and batch["sample_index"].tolist() == [7, 3]
    plain = collator([{"x": 1}, {"x": 2}])
    assert plain.keys() == {"x"} and plain["x"].tolist() == [1, 2]
    with pytest.raises(KeyError, match=r"features \[1\] carry no 'sample_index'"):
        collator([{"x": 1, "sample_index": 0}, {"x": 2}])
