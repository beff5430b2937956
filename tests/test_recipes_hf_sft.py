"""recipes/hf/sft_vlm.py end to end on a tiny LLaVA saved with its processor: the teacher pass through
`regate score` on the recipe's own dataset view, then TRL SFT with ReGATE, full and LoRA."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import LlamaForCausalLM

from regate_plugin import cli
from test_hf_trl import processor, words
from tiny_hf import tiny_model

RECIPES = Path(__file__).parents[1] / "recipes" / "hf"


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A student (tiny LLaVA + processor), its text-only teacher, 8 records with images on disk."""
    root = tmp_path_factory.mktemp("sft")
    student = tiny_model("llava")
    student.save_pretrained(root / "student")
    processor().save_pretrained(root / "student")
    teacher = LlamaForCausalLM(student.config.text_config)
    teacher.model.load_state_dict(student.model.language_model.state_dict())
    teacher.lm_head.load_state_dict(student.lm_head.state_dict())
    teacher.save_pretrained(root / "teacher")
    processor().tokenizer.save_pretrained(root / "teacher")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    (root / "img").mkdir()
    with open(root / "data.jsonl", "w") as out:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            record = {"images": [f"{i}.png"], "prompt": f"{words(gen, 2 + i % 3)} <image> {words(gen, 3)}",
                      "completion": f"{words(gen, 3 + (5 * i) % 7)} </s>"}
            out.write(json.dumps(record) + "\n")
    return root


def test_teacher_pass_then_regate_sft_full_and_lora(run_files, monkeypatch, tmp_path):
    root = run_files
    monkeypatch.chdir(RECIPES)  # `regate score --dataset sft_vlm:...` imports from the working directory
    monkeypatch.syspath_prepend(str(RECIPES))
    for key, value in (("REGATE_MODEL", root / "student"), ("REGATE_DATA", root / "data.jsonl"), ("REGATE_IMAGE_ROOT", root / "img")):
        monkeypatch.setenv(key, str(value))
    score = ["score", "--target", "hf", "--teacher", str(root / "teacher"), "--out", str(tmp_path / "cache"),
             "--dtype", "fp32", "--", "--dataset", "sft_vlm:scoring_dataset", "--student", str(root / "student")]
    result = CliRunner().invoke(cli.main, score)
    assert result.exit_code == 0, result.output
    sft_vlm = __import__("sft_vlm")
    common = ["--model", str(root / "student"), "--data", str(root / "data.jsonl"), "--image-root", str(root / "img"),
              "--ref-cache", str(tmp_path / "cache"), "--warmup", "1", "--cycle", "2", "--dense-steps", "1",
              "--per_device_train_batch_size", "2", "--max_steps", "4", "--logging_steps", "1", "--report_to", "none",
              "--use_cpu", "True", "--save_strategy", "no", "--gradient_checkpointing", "False", "--bf16", "False",
              "--disable_tqdm", "True"]
    for extra in ([], ["--lora-rank", "4"]):
        trainer = sft_vlm.main([*common, "--output_dir", str(tmp_path / f"run{len(extra)}"), *extra])
        logs = {e["step"]: e for e in trainer.state.log_history if "regate/supervised_kept" in e}
        assert sorted(logs) == [1, 2, 3, 4]
        assert [logs[s]["regate/supervised_kept"] < logs[s]["regate/supervised_total"] for s in logs] == [False, False, True, False]
        assert all(np.isfinite(logs[s]["loss"]) for s in logs)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # the LoRA run trained adapters only


def test_make_teacher_accepts_extra_student_tokens_and_refuses_moved_ones(tmp_path, monkeypatch):
    """The base LM with the student's tokenizer: extra tokens (a processor's image tokens) are fine,
    a base token whose id moved, or an id past the embeddings, is refused before anything is saved."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    monkeypatch.syspath_prepend(str(RECIPES))
    make_teacher = __import__("make_teacher")

    def save_tokenizer(vocab, folder):
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(folder)

    base_vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 12)}}
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "base")
    save_tokenizer(base_vocab, tmp_path / "base")
    save_tokenizer({**base_vocab, "<img>": 12, "<IMG_CONTEXT>": 13}, tmp_path / "student")
    make_teacher.make_teacher(str(tmp_path / "student"), str(tmp_path / "base"), tmp_path / "teacher", torch.float32)
    from regate_plugin.scoring import check_tokenizers, load_teacher, tokenizer_fingerprint
    from transformers import AutoTokenizer

    student_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "student"))
    check_tokenizers(student_fp, AutoTokenizer.from_pretrained(tmp_path / "teacher"), "teacher")  # accepted now
    teacher = load_teacher(str(tmp_path / "teacher"), torch.device("cpu"), torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), base.state_dict().values()))

    save_tokenizer({**{k: (v + 1) % 12 for k, v in base_vocab.items()}, "<img>": 12}, tmp_path / "moved")
    with pytest.raises(ValueError, match="12 base tokens have another id"):
        make_teacher.make_teacher(str(tmp_path / "moved"), str(tmp_path / "base"), tmp_path / "no1", torch.float32)
    save_tokenizer({**base_vocab, "<img>": 20}, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"1 student token ids exceed the base LM's 16 embedding rows \(e.g. \['<img>'\]\)"):
        make_teacher.make_teacher(str(tmp_path / "wide"), str(tmp_path / "base"), tmp_path / "no2", torch.float32)
    assert not (tmp_path / "no1").exists() and not (tmp_path / "no2").exists()
