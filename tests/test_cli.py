"""The `regate` command line and target registration."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from regate_plugin import cli, plugins
from regate_plugin.attention import BackendUnavailable, UnsupportedAttention
from regate_plugin.engine import BatchError
from regate_plugin.hookspecs import Target, hookimpl
from regate_plugin.plugins import PluginError, build_plugin_manager, targets
from regate_plugin.refcache import CacheMismatchError, Fingerprint, RefCache, write_cache


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "regate_plugin", "--help"], capture_output=True, text=True, check=True)
    assert "regate score" in out.stdout and "schedule" in out.stdout


def test_schedule_json_matches_closed_form():
    result = CliRunner().invoke(cli.main, ["schedule", "--steps", "5000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["dense_steps"], data["sparse_steps"]) == (724, 4276)
    assert data["token_share"] == pytest.approx(0.5724)
    assert data["config"]["keep_ratio"] == 0.5


def test_schedule_rejects_bad_config_with_field_name():
    result = CliRunner().invoke(cli.main, ["schedule", "--dense-steps", "200", "--cycle", "100"])
    assert result.exit_code == 2
    assert "ReGATEConfig.dense_steps = 200" in result.output and "[0, cycle=100]" in result.output


class FakeTargets:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def regate_targets(self):
        return [Target(n, f"the {n} codebase", requirement=lambda: "pip install it") for n in self.names]


def test_targets_listing_and_duplicates(monkeypatch):
    pm = build_plugin_manager(load_entrypoints=False)
    pm.register(FakeTargets("alpha", "beta"))
    monkeypatch.setattr(plugins, "plugin_manager", lambda: pm)
    assert sorted(targets()) == ["alpha", "beta"]
    result = CliRunner().invoke(cli.main, ["targets"])
    assert "alpha" in result.output and "unavailable: pip install it" in result.output
    pm.register(FakeTargets("beta"))
    with pytest.raises(RuntimeError, match="'beta'"):
        targets()


# --- regate train: the cache is checked before the launch; ReGATE's errors end as one line ------------

LAUNCH_FP = Fingerprint(dataset="data-a|n=2", tokenizer="tok", teacher="teacher-x", visual_tokens="4", max_length=32)


class ArgsSource:
    """The cheap fingerprint fields of a run whose upstream arguments name the data with --data."""

    def __init__(self, args, teacher):
        self.dataset = args[args.index("--data") + 1]

    def expected(self):
        return {"dataset": self.dataset, "tokenizer": "tok", "visual_tokens": "4", "max_length": 32}


class LaunchedTarget:
    """A target launched by `regate train`, recording the calls; its launch raises ``error`` if set."""

    def __init__(self):
        self.calls, self.error = [], None

    @hookimpl
    def regate_targets(self):
        return [Target("fake", "a launched codebase", apply=self.apply, launch=self.launch, scoring_source=ArgsSource)]

    def apply(self, config, ref_cache):
        self.calls.append(("apply", ref_cache))

    def launch(self, args, attn_implementation):
        self.calls.append(("launch", args))
        if self.error is not None:
            raise self.error


@pytest.fixture
def launched(monkeypatch):
    pm = build_plugin_manager(load_entrypoints=False)
    target = LaunchedTarget()
    pm.register(target)
    monkeypatch.setattr(plugins, "plugin_manager", lambda: pm)
    return target


def train(cache, *upstream):
    return CliRunner().invoke(cli.main, ["train", "--target", "fake", "--ref-cache", str(cache), "--", *upstream])


def test_train_refuses_a_bad_cache_before_the_launch_in_one_line(tmp_path, launched):
    cache = write_cache(tmp_path / "cache", LAUNCH_FP, [torch.rand(3), torch.rand(2)]).path
    result = train(tmp_path / "missing", "--data", "data-a|n=2")
    assert result.exit_code == 1 and result.output == f"Error: no reference cache at {tmp_path / 'missing'} (missing meta.json).\n"
    result = train(cache, "--data", "data-b|n=2")
    assert result.exit_code == 1 and result.output.startswith(f"Error: reference cache {cache} was built for a different setup:")
    assert "dataset: cache has 'data-a|n=2', this run has 'data-b|n=2'" in result.output
    assert launched.calls == []

    losses = cache / "losses.f16"
    good = losses.read_bytes()
    losses.write_bytes(good[:-2])
    result = train(cache, "--data", "data-a|n=2")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "is truncated" in result.output
    losses.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    result = train(cache, "--data", "data-a|n=2")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "SHA-256" in result.output
    assert launched.calls == []

    losses.write_bytes(good)
    result = train(cache, "--data", "data-a|n=2")
    assert result.exit_code == 0, result.output
    assert launched.calls == [("apply", str(cache)), ("launch", ["--data", "data-a|n=2"])]


@pytest.mark.parametrize("error", [BatchError("sample 7 has 3 supervised tokens in this batch but the reference cache holds 4"),
                                   CacheMismatchError("reference cache c was built for a different setup"),
                                   PluginError("regate_keep_ratio of plugin 'mine' returned 1.5 at step 3"),
                                   UnsupportedAttention("LlamaAttention passes ['s_aux'] to its attention"),
                                   BackendUnavailable("attention backend 'flash' cannot run: flash-attn is not installed")],
                         ids=["BatchError", "RefCacheError", "PluginError", "UnsupportedAttention", "BackendUnavailable"])
def test_errors_raised_inside_training_end_as_one_line(launched, error):
    launched.error = error
    result = CliRunner().invoke(cli.main, ["train", "--target", "fake", "--packing-only", "--", "--data", "d"])
    assert result.exit_code == 1 and result.output == f"Error: {error}\n"
    launched.error = RuntimeError("a bug")  # anything else keeps its traceback
    result = CliRunner().invoke(cli.main, ["train", "--target", "fake", "--packing-only", "--", "--data", "d"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


LAUNCH_SCRIPT = """
import sys
from regate_plugin import cli, plugins
from regate_plugin.engine import BatchError
from regate_plugin.hookspecs import Target, hookimpl

def training_step(step):
    raise BatchError(f"sample {step} has 3 supervised tokens in this batch but the reference cache holds 4: rebuild the cache")

class Plugin:
    @hookimpl
    def regate_targets(self):
        return [Target("fake", "a launched codebase", apply=lambda config, cache: None,
                       launch=lambda args, attn: [training_step(step) for step in range(3, 9)])]

pm = plugins.build_plugin_manager(load_entrypoints=False)
pm.register(Plugin())
plugins.plugin_manager = lambda: pm
cli.main(sys.argv[1:], prog_name="regate")
"""


def test_a_batch_error_in_a_real_process_is_one_line_on_stderr():
    done = subprocess.run([sys.executable, "-c", LAUNCH_SCRIPT, "train", "--target", "fake", "--packing-only"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == "Error: sample 3 has 3 supervised tokens in this batch but the reference cache holds 4: rebuild the cache\n"


# --- regate demo --out, checked before training --------------------------------------------------------


def test_demo_refuses_an_unwritable_out_before_training(tmp_path, monkeypatch):
    from regate_plugin import demo

    def training_started(*args, **kwargs):
        raise AssertionError("the demo trained before checking --out")

    monkeypatch.setattr(demo, "run_demo", training_started)
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(cli.main, ["demo", "--steps", "10", "--out", str(tmp_path / "a-file" / "out")])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --out" in result.output and f"cannot write into {tmp_path / 'a-file' / 'out'}" in result.output


# --- --dataset MODULE:CALLABLE from the current directory, through the `regate` console script -----------


def test_score_imports_the_dataset_module_from_the_current_directory(tmp_path):
    from score_assets import write_student_and_teacher

    student, teacher = write_student_and_teacher(tmp_path / "assets")
    work = tmp_path / "project"
    work.mkdir()
    (work / "my_data.py").write_text("from score_assets import train_dataset\n\ndef build():\n    return train_dataset()\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))  # score_assets; my_data is only in the cwd
    done = subprocess.run([str(Path(sys.executable).with_name("regate")), "score", "--target", "hf", "--teacher", str(teacher),
                           "--out", "cache", "--no-progress", "--", "--dataset", "my_data:build", "--student", str(student)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote cache: 24 samples" in done.stdout and RefCache.open(work / "cache").num_samples == 24


# --- the README's `regate inspect` example on the demo's cache -------------------------------------------


class BlindTeacher(torch.nn.Module):
    """A perfect text-only teacher of the demo task: every next token is certain (loss ~0) except the
    image words, which the text cannot tell (uniform: loss log(vocabulary))."""

    def __init__(self, vocab_size, image_words):
        super().__init__()
        self.head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        self.head.weight.data = 30 * torch.eye(vocab_size)
        self.blind = torch.zeros(vocab_size, dtype=torch.bool)
        self.blind[image_words] = True

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        def decoder(input_ids, attention_mask, use_cache):
            following = torch.roll(input_ids, -1, dims=1)
            hidden = torch.nn.functional.one_hot(following, self.blind.numel()).float()
            hidden[self.blind[following]] = 0.0
            return SimpleNamespace(last_hidden_state=hidden)

        return decoder


def readme_command(prefix):
    """The first command line of README.md or docs/ that starts with ``prefix`` (backslash continuations joined)."""
    root = Path(__file__).parents[1]
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    text = "\n".join(page.read_text() for page in pages).replace("\\\n", " ")
    return shlex.split(next(line for line in text.splitlines() if line.strip().startswith(prefix)))


def test_readme_inspect_example_shows_the_image_words_first(tmp_path):
    from regate_plugin import demo
    from regate_plugin import demo_task as task
    from regate_plugin.patches import hf
    from regate_plugin.scoring import score_dataset

    demo_line = readme_command("regate demo --steps 40 --work ")  # docs/results/demo.md
    work = Path(demo_line[demo_line.index("--work") + 1])
    tokenizer = task.build_tokenizer()
    vocab = tokenizer.get_vocab()
    _, llava_config = demo._configs(vocab)
    llava_config.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    # what `regate demo --work` writes to WORK/refcache, with a teacher that is blind exactly to the image words
    source = hf.HFScoringSource(demo.train_dataset(), str(tmp_path / "student"), dataset_id="regate-demo-seed0")
    image_words = sorted({word for words in task.SLOTS.values() for word in words})
    score_dataset(source, BlindTeacher(len(vocab), [vocab[w] for w in image_words]), tmp_path / "refcache",
                  batch_size=512, shard_size=4096, progress=False)

    args = [arg.replace(str(work), str(tmp_path)) for arg in readme_command(f"regate inspect {work}/")[1:]]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    most = result.output.split("most vision-dependent")[1].split("least vision-dependent")[0]
    least = result.output.split("least vision-dependent")[1]
    tokens = [re.findall(r"-> '([^']*)'$", part, re.M) for part in (most, least)]
    assert len(tokens[0]) == len(tokens[1]) > 0
    assert set(tokens[0]) <= set(image_words) and not set(tokens[1]) & set(image_words)


# --- regate targets fits 100 columns; dry runs say what is missing and which attention runs -------------


def test_targets_fit_100_columns_and_mark_refused_classes():
    from regate_plugin.patches import hf
    from regate_plugin.patches.hf_models import ADAPTERS

    result = CliRunner().invoke(cli.main, ["targets"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    for adapter in ADAPTERS:
        row = next(line for line in lines if line.split()[:1] == [adapter.cls])
        status = row.split()[1]
        assert status == (adapter.transformers if adapter.cls in hf.SUPPORTED else "refused"), row
        assert row.endswith(adapter.family)
    assert next(line for line in lines if "Gemma3ForConditionalGeneration" in line).split()[1] == "refused"
    assert sum(line.split()[1:2] == ["refused"] for line in lines) == len(ADAPTERS) - len(hf.SUPPORTED) >= 1


class UninstalledTarget:
    @hookimpl
    def regate_targets(self):
        return [Target("fake", "a launched codebase", requirement=lambda: "fake is not installed: pip install fake",
                       apply=lambda config, cache: None, launch=lambda args, attn: pytest.fail("launched"))]


def dry_run(monkeypatch, *args, env=None):
    pm = build_plugin_manager(load_entrypoints=False)
    pm.register(UninstalledTarget())
    monkeypatch.setattr(plugins, "plugin_manager", lambda: pm)
    result = CliRunner().invoke(cli.main, ["train", "--target", "fake", "--dry-run", *args], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_dry_run_says_the_target_is_not_installed_and_which_attention_runs(monkeypatch):
    import importlib.util

    monkeypatch.delenv("REGATE_ATTN_BACKEND", raising=False)
    resolved, stderr = dry_run(monkeypatch, "--packing-only")
    assert resolved["target_installed"] == "no: fake is not installed: pip install fake"
    assert stderr == "note: the fake target is not installed here (fake is not installed: pip install fake); the real run would stop\n"
    default = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert resolved["attn_implementation"] == default != "default"
    if not torch.cuda.is_available():
        assert resolved["packed_attention"].startswith("auto: sdpa here (no CUDA device)")
    resolved, _ = dry_run(monkeypatch, "--packing-only", "--attn-implementation", "eager", "--attn-backend", "sdpa")
    assert resolved["attn_implementation"] == "eager" and resolved["packed_attention"] == "sdpa (from --attn-backend)"
    resolved, _ = dry_run(monkeypatch, "--packing-only", env={"REGATE_ATTN_BACKEND": "sdpa"})
    assert resolved["packed_attention"] == "sdpa (from $REGATE_ATTN_BACKEND)"
    if not torch.cuda.is_available():
        resolved, _ = dry_run(monkeypatch, "--packing-only", "--attn-backend", "flash")
        assert resolved["packed_attention"] == ("flash (from --attn-backend); cannot run here: the flash backend needs "
                                                "a CUDA device, the tensors are on cpu: use sdpa")
    resolved, _ = dry_run(monkeypatch, "--no-regate")
    assert resolved["packed_attention"] is None and resolved["mode"] == "upstream (no ReGATE)"
    assert cli.upstream_attention("llamafactory", None) == "flash_attn in the YAML (LLaMA-Factory's own setting)"
    assert cli.upstream_attention("llamafactory", "sdpa") == (
        "refused: --attn-implementation does not apply here, set flash_attn in the YAML")
    assert cli.upstream_attention("swift", None) == "--attn_impl among ms-swift's arguments"


def test_hf_train_names_the_page_to_read():
    result = CliRunner().invoke(cli.main, ["train", "--target", "hf", "--packing-only"])
    assert result.exit_code == 1
    assert "enabled from your own script (hf.enable and attach), not launched: see docs/targets/hf.md" in result.output
