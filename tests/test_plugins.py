"""Plugins: a misspelled hook is an error at start, every strategy answer is checked and a wrong one
names its plugin, the active plugins are logged and saved with the ReGATE state, and a strategy can
be given to one engine while the process-wide manager stays as it is."""

import logging

import pytest
import torch

import regate_plugin
from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.hookspecs import hookimpl
from regate_plugin.plugins import PluginError, build_plugin_manager, plugin_manager
from regate_plugin.refcache import write_cache
from regate_plugin.trainer import STATE_FILE, load_state, save_state
from regate_plugin.units import IGNORE_INDEX

SPARSE = ReGATEConfig(warmup=0, dense_steps=0)  # step 0 keeps half: the score and select hooks run
FP = Fingerprint(dataset="d", tokenizer="t", teacher="m", visual_tokens="4", max_length=8)
SAMPLE_IDS = torch.tensor([0, 1, 2])
N_UNITS = 11
OURS = f"(regate-plugin {regate_plugin.__version__})"
HOOKS = "regate_keep_ratio, regate_rearm, regate_score, regate_select, regate_step_end, regate_targets"
PLUGIN_LOG = "regate_plugin.plugins"


def toy_batch():
    """Three right-padded rows with 4, 2 and 5 supervised units (11 in all)."""
    mask = torch.tensor([[1] * 7 + [0], [1] * 4 + [0] * 4, [1] * 8])
    labels = torch.full((3, 8), IGNORE_INDEX)
    labels[0, 3:7], labels[1, 2:4], labels[2, 3:8] = 5, 6, 7
    return labels, mask


@pytest.fixture
def cache(tmp_path):
    gen = torch.Generator().manual_seed(0)
    return write_cache(tmp_path / "cache", FP, [torch.rand(n, generator=gen) * 5 for n in (4, 2, 5)])


def fake_distribution(root, dist, version, module, source):
    """An installed distribution under ``root`` (put on sys.path) whose module is a ``regate`` entry point."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[regate]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(source)


class KeepFirst:
    """A strategy: keep the first unit of every sample."""

    @hookimpl
    def regate_select(self, scores, units, keep_ratio, config):
        return units.k == 0


class KeepLast:
    """A strategy: keep the last unit of every sample."""

    @hookimpl
    def regate_select(self, scores, units, keep_ratio, config):
        return units.k == units.counts[units.row] - 1


class Answers:
    """Answers each strategy hook with a fixed value (None: defer to the next plugin)."""

    def __init__(self, keep_ratio=None, score=None, select=None):
        self.keep_ratio, self.score, self.select = keep_ratio, score, select

    @hookimpl
    def regate_keep_ratio(self, step, config):
        return self.keep_ratio

    @hookimpl
    def regate_score(self, ema, ref, config):
        return self.score

    @hookimpl
    def regate_select(self, scores, units, keep_ratio, config):
        return self.select


class Typo:
    @hookimpl
    def regate_step_ends(self, stats):
        pass


class Timer:
    @hookimpl(wrapper=True)
    def regate_score(self, ema, ref, config):
        return (yield)


def engine_with(cache, config=SPARSE, **answers):
    """An engine whose 'broken' plugin gives ``answers``, under a later-registered plugin that defers."""
    pm = build_plugin_manager(load_entrypoints=False)
    pm.register(Answers(**answers), name="broken")
    pm.register(Answers(), name="deferring")  # asked first, answers nothing: the error must not name it
    return ReGATEEngine(config, cache, pm=pm)


# --- a misspelled hook is an error at start -------------------------------------------------------


def test_misspelled_hook_of_an_entry_point_plugin_is_an_error_at_start(tmp_path, monkeypatch):
    source = (
        "from regate_plugin.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef regate_selct(scores, units, keep_ratio, config):\n    return None\n"
    )
    fake_distribution(tmp_path, "typo-strategy", "1.2", "typo_strategy", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as error:
        build_plugin_manager()
    assert str(error.value) == (
        "plugin 'typo_strategy' (typo-strategy 1.2) implements 'regate_selct', which is not a regate hook "
        f"(did you mean 'regate_select'?); the hooks are {HOOKS}. Rename it, or mark it "
        "@hookimpl(optionalhook=True) if it is meant for another version of regate-plugin"
    )


def test_misspelled_hook_registered_in_code_is_an_error_at_engine_start(cache):
    expected = (
        "plugin {} implements 'regate_step_ends', which is not a regate hook (did you mean 'regate_step_end'?); "
        f"the hooks are {HOOKS}. Rename it, or mark it @hookimpl(optionalhook=True) if it is meant for another "
        "version of regate-plugin"
    )
    with pytest.raises(PluginError) as error:
        build_plugin_manager(load_entrypoints=False, extra=[Typo()])
    assert str(error.value) == expected.format("'test_plugins.Typo'")  # by class: pluggy's name is an id
    pm = build_plugin_manager(load_entrypoints=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(PluginError) as error:
        ReGATEEngine(SPARSE, cache, pm=pm)
    assert str(error.value) == expected.format("'typo'")


def test_wrapper_of_a_strategy_hook_is_refused_at_start(cache):
    with pytest.raises(PluginError) as error:
        build_plugin_manager(load_entrypoints=False, extra=[Timer()])
    assert str(error.value) == (
        "plugin 'test_plugins.Timer' wraps regate_score, which ReGATE calls one implementation at a time to "
        "check each answer: implement it plainly and return None to only observe a call"
    )


# --- hook answers are checked where the engine receives them -----------------------------------


def broken(hook, answer):
    return f"regate_{hook} of plugin 'broken' {answer}"


WANT_SCORES = f"it must be a float tensor of shape ({N_UNITS},), one score per unit"
WANT_SELECT = f"it must be a bool tensor of shape ({N_UNITS},), True for each unit to keep"
NAN_SCORES = torch.arange(N_UNITS, dtype=torch.float32).index_fill(0, torch.tensor([3, 7]), float("nan"))


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"keep_ratio": 1.5}, broken("keep_ratio", "returned 1.5 at step 0")),
        ({"keep_ratio": 0.0}, broken("keep_ratio", "returned 0.0 at step 0")),
        ({"keep_ratio": float("nan")}, broken("keep_ratio", "returned nan at step 0")),
        ({"keep_ratio": "0.5"}, broken("keep_ratio", "returned '0.5' at step 0")),
        ({"keep_ratio": True}, broken("keep_ratio", "returned True at step 0")),
        ({"keep_ratio": torch.tensor([0.5, 0.5])}, broken("keep_ratio", "returned tensor([0.5000, 0.5000]) at step 0")),
    ],
)
def test_wrong_keep_ratio_names_the_plugin(cache, answers, message):
    labels, mask = toy_batch()
    with pytest.raises(PluginError) as error:
        engine_with(cache, **answers).plan(labels, mask, SAMPLE_IDS)
    assert str(error.value) == f"{message}: a keep ratio must be a finite number in (0, 1] (1.0 = dense)"


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"score": [1.0] * N_UNITS}, broken("score", f"returned a list: {WANT_SCORES}")),
        ({"score": torch.arange(N_UNITS)},
         broken("score", f"returned a torch.int64 tensor of shape (11,): {WANT_SCORES}")),
        ({"score": torch.zeros(N_UNITS, 1)},
         broken("score", f"returned a torch.float32 tensor of shape (11, 1): {WANT_SCORES}")),
        ({"score": NAN_SCORES},
         broken("score", "returned NaN for 2 of 11 units (first: unit 3): scores must be numbers")),
        ({"select": "all"}, broken("select", f"returned a str: {WANT_SELECT}")),
        ({"select": torch.ones(N_UNITS)},
         broken("select", f"returned a torch.float32 tensor of shape (11,): {WANT_SELECT}")),
        ({"select": torch.ones(N_UNITS - 1, dtype=torch.bool)},
         broken("select", f"returned a torch.bool tensor of shape (10,): {WANT_SELECT}")),
        ({"select": torch.arange(N_UNITS) % 3},
         broken("select", f"returned torch.int64 values other than 0 and 1: {WANT_SELECT}")),
        ({"select": torch.tensor([True] * 4 + [False] * 2 + [True] * 5)},
         broken("select", "keeps none of the 2 units of batch row 1: per-sample selection keeps at least one unit "
                          "of every sample with units; keep one, or set selection='per_batch'")),
    ],
)
def test_wrong_scores_and_selections_name_the_plugin(cache, answers, message):
    labels, mask = toy_batch()
    with pytest.raises(PluginError) as error:
        engine_with(cache, **answers).plan(labels, mask, SAMPLE_IDS)
    assert str(error.value) == message


def test_default_answer_is_checked_and_named(cache):
    labels, mask = toy_batch()
    engine = engine_with(cache)
    engine.ema.values[2] = float("nan")  # a corrupt EMA entry: the built-in score turns it into NaN
    with pytest.raises(PluginError) as error:
        engine.plan(labels, mask, SAMPLE_IDS)
    assert str(error.value) == (
        f"regate_score of plugin 'regate.defaults' {OURS} returned NaN for 1 of 11 units (first: unit 2): "
        "scores must be numbers"
    )


@pytest.mark.parametrize(
    ("select", "config"),
    [
        (torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1]), SPARSE),  # 0/1 integers
        ([True, False, False, True, False, True, True, False, False, False, True], SPARSE),  # a list of bools
        (torch.tensor([True] * 4 + [False] * 2 + [True] * 5), SPARSE.replace(selection="per_batch")),
    ],
)
def test_convertible_selections_are_taken(cache, select, config):
    labels, mask = toy_batch()
    plan = engine_with(cache, config, keep_ratio=0.25, select=select).plan(labels, mask, SAMPLE_IDS)
    assert plan.keep_ratio == 0.25
    assert plan.unit_keep.dtype == torch.bool and plan.unit_keep.tolist() == [bool(v) for v in select]


# --- the active plugins: logged at start, saved with the state, compared on resume ----------------


def test_active_plugins_are_logged_once_and_saved_with_the_state(tmp_path, monkeypatch, caplog, cache):
    source = "from regate_plugin.hookspecs import hookimpl\n\n@hookimpl\ndef regate_step_end(stats):\n    pass\n"
    fake_distribution(tmp_path / "site", "step-logger", "2.0", "step_logger", source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pm = build_plugin_manager(extra=[KeepFirst()])
    labels, mask = toy_batch()
    with caplog.at_level(logging.INFO, logger=PLUGIN_LOG):
        engine = ReGATEEngine(SPARSE, cache, pm=pm)
        engine.plan(labels, mask, SAMPLE_IDS)
        engine.end_step()
    assert [r.getMessage() for r in caplog.records if r.name == PLUGIN_LOG] == [
        f"ReGATE plugins: regate.defaults {OURS}, step_logger (step-logger 2.0), hf {OURS}, llamafactory {OURS}, "
        f"llava {OURS}, swift {OURS}, videollama2 {OURS}, test_plugins.KeepFirst"
    ]

    path = save_state(engine, tmp_path / "checkpoint-1")
    assert path.name == STATE_FILE
    ours = {"distribution": "regate-plugin", "version": regate_plugin.__version__}
    assert torch.load(path, weights_only=True)["plugins"] == [
        {"name": "regate.defaults", **ours},
        {"name": "step_logger", "distribution": "step-logger", "version": "2.0"},
        {"name": "hf", **ours},
        {"name": "llamafactory", **ours},
        {"name": "llava", **ours},
        {"name": "swift", **ours},
        {"name": "videollama2", **ours},
        {"name": "test_plugins.KeepFirst", "distribution": None, "version": None},
    ]

    caplog.clear()
    same = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(extra=[KeepFirst()]))
    load_state(same, tmp_path / "checkpoint-1")
    assert same.step == 1 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_resume_with_other_plugins_warns_what_differs(tmp_path, caplog, cache):
    saved = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(load_entrypoints=False, extra=[KeepFirst()]))
    saved.end_step()
    path = save_state(saved, tmp_path / "checkpoint-1")
    other = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(load_entrypoints=False, extra=[KeepLast()]))
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOG):
        load_state(other, tmp_path / "checkpoint-1")
    assert other.step == 1  # a warning, not a refusal
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} was saved with other plugins (added test_plugins.KeepLast; removed test_plugins.KeepFirst): "
        "resuming with the plugins active now; if a strategy plugin changed, units are scored and selected "
        "differently from this step on"
    ]

    state = torch.load(path, weights_only=True)
    del state["plugins"]  # a state saved before plugins were recorded
    torch.save(state, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOG):
        load_state(other, tmp_path / "checkpoint-1")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} records no plugins (saved by an older regate-plugin): cannot compare them with now"
    ]


# --- a strategy scoped to one engine ----------------------------------------------------------------


def test_two_engines_with_their_own_strategies_leave_the_process_default_alone(cache):
    labels, mask = toy_batch()
    first = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(extra=[KeepFirst()]))
    last = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(extra=[KeepLast()]))
    default = ReGATEEngine(SPARSE, cache)
    first_plan, last_plan, default_plan = (e.plan(labels, mask, SAMPLE_IDS) for e in (first, last, default))
    assert first_plan.units.k[first_plan.unit_keep].tolist() == [0, 0, 0]
    assert last_plan.units.k[last_plan.unit_keep].tolist() == [3, 1, 4]
    defaults_only = ReGATEEngine(SPARSE, cache, pm=build_plugin_manager(load_entrypoints=False))
    assert default_plan.unit_keep.tolist() == defaults_only.plan(labels, mask, SAMPLE_IDS).unit_keep.tolist()
    assert default_plan.unit_keep.sum() == 2 + 1 + 3  # ceil(0.5 * n) of 4, 2 and 5 units
    assert default.pm is plugin_manager()
    assert [name for name, _ in plugin_manager().list_name_plugin()] == [
        "regate.defaults", "hf", "llamafactory", "llava", "swift", "videollama2"
    ]
