"""The plugin manager: built-in defaults, every plugin under the ``regate`` entry-point group, and
the extra plugins of one engine; checked at start, and asked one implementation at a time so that
a bad answer names the plugin that gave it."""

from __future__ import annotations

import difflib
import functools
import logging
import math
import numbers
import types
from collections.abc import Iterable
from typing import Any

import pluggy
import torch

from . import defaults, hookspecs
from .hookspecs import Target
from .units import Units

DEFAULTS = "regate.defaults"
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
logger = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A plugin is broken: it implements a hook that does not exist, or answered a hook wrongly."""


def build_plugin_manager(load_entrypoints: bool = True, extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """A manager of the built-in defaults, the installed ``regate`` entry-point plugins and ``extra``.

    ``extra`` plugins register last, so their strategies answer before installed plugins and the
    defaults. Pass the manager as ``ReGATEEngine(config, cache, pm=...)`` to give one engine a
    strategy without touching the process-wide manager (``plugin_manager()``) other engines use.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name=DEFAULTS)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra:
        pm.register(plugin)
    check_plugins(pm)
    return pm


def check_plugins(pm: pluggy.PluginManager) -> None:
    """Refuse, before any work, a hook implementation whose name is no hook (a typo would otherwise
    leave the plugin silently unused), and wrappers of strategy hooks (see ``first_result``)."""
    for name in hook_names(pm):
        caller = getattr(pm.hook, name)
        if caller.spec.opts["firstresult"]:
            for impl in caller.get_hookimpls():
                _refuse_wrapper(pm, impl, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        hooks = hook_names(pm)
        unknown = [
            c.name
            for c in pm.get_hookcallers(error.plugin) or ()
            if not c.has_spec() and any(i.plugin is error.plugin and not i.optionalhook for i in c.get_hookimpls())
        ]
        near = [m for name in unknown for m in difflib.get_close_matches(name, hooks, n=1)]
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise PluginError(
            f"plugin {describe(pm, error.plugin)} implements {', '.join(map(repr, unknown))}, which is not a "
            f"regate hook{hint}; the hooks are {', '.join(hooks)}. Rename it, or mark it "
            "@hookimpl(optionalhook=True) if it is meant for another version of regate-plugin"
        ) from error


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """The hooks plugins may implement: every hook with a specification."""
    return sorted(name for name, caller in vars(pm.hook).items() if not name.startswith("_") and caller.has_spec())


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    return build_plugin_manager()


def targets(pm: pluggy.PluginManager | None = None) -> dict[str, Target]:
    """Every registered target by name; two plugins claiming one name is an error."""
    found: dict[str, Target] = {}
    for plugin_targets in (pm or plugin_manager()).hook.regate_targets():
        for target in plugin_targets:
            if target.name in found:
                raise RuntimeError(f"two plugins provide the target {target.name!r}; uninstall one of them")
            found[target.name] = target
    return found


def plugin_name(pm: pluggy.PluginManager, plugin: object) -> str:
    """The plugin's registered name; for an object registered without one (pluggy names it by its
    ``id``, which changes every run) its class, so the name can be compared across runs."""
    name = pm.get_name(plugin) or ""
    if name == str(id(plugin)):
        return f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    return name


def _distribution(pm: pluggy.PluginManager, plugin: object) -> tuple[str | None, str | None]:
    """The (distribution, version) that provides the plugin where known: entry-point plugins and
    this package's own modules; None for plugins registered from a script."""
    for loaded, dist in pm.list_plugin_distinfo():
        if loaded is plugin:
            return dist.project_name, dist.version
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    if module == "regate_plugin" or module.startswith("regate_plugin."):
        from . import __version__

        return "regate-plugin", __version__
    return None, None


def active_plugins(pm: pluggy.PluginManager) -> list[dict[str, str | None]]:
    """Every registered plugin as {name, distribution, version}, in registration order."""
    records = []
    for _, plugin in pm.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        dist, version = _distribution(pm, plugin)
        records.append({"name": plugin_name(pm, plugin), "distribution": dist, "version": version})
    return records


def format_plugin(record: dict[str, str | None]) -> str:
    """'name (distribution version)', or 'name' where the distribution is not known."""
    if record["distribution"] is None:
        return str(record["name"])
    return f"{record['name']} ({record['distribution']} {record['version']})"


def describe(pm: pluggy.PluginManager, plugin: object) -> str:
    """The plugin for an error message: its quoted name and, where known, distribution and version."""
    dist, version = _distribution(pm, plugin)
    name = repr(plugin_name(pm, plugin))
    return name if dist is None else f"{name} ({dist} {version})"


def log_active_plugins(pm: pluggy.PluginManager) -> None:
    """Say at the start of a run which plugins it runs with (INFO, logger ``regate_plugin.plugins``)."""
    logger.info("ReGATE plugins: %s", ", ".join(map(format_plugin, active_plugins(pm))))


def plugin_changes(saved: list[dict[str, str | None]], now: list[dict[str, str | None]]) -> str | None:
    """What differs between two ``active_plugins`` records (added, removed, other version); None if nothing."""
    before = {r["name"]: r for r in saved}
    after = {r["name"]: r for r in now}
    changes = [f"added {format_plugin(r)}" for name, r in after.items() if name not in before]
    changes += [f"removed {format_plugin(r)}" for name, r in before.items() if name not in after]
    changes += [
        f"{name}: {format_plugin(before[name])} -> {format_plugin(r)}"
        for name, r in after.items()
        if name in before and before[name] != r
    ]
    return "; ".join(changes) or None


def warn_on_plugin_change(saved: list[dict[str, str | None]] | None, pm: pluggy.PluginManager, source: str) -> None:
    """On resume, warn (not refuse) when the active plugins differ from the saved ones: observers and
    target plugins come and go harmlessly, but a changed strategy selects differently from here on."""
    if saved is None:
        logger.warning("%s records no plugins (saved by an older regate-plugin): cannot compare them with now", source)
        return
    changes = plugin_changes(saved, active_plugins(pm))
    if changes:
        logger.warning(
            "%s was saved with other plugins (%s): resuming with the plugins active now; if a strategy plugin "
            "changed, units are scored and selected differently from this step on",
            source,
            changes,
        )


def first_result(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> tuple[Any, str]:
    """Call a ``firstresult`` hook; return its answer and the plugin that gave it (see ``describe``).

    The implementations are called here, in pluggy's order (tryfirst, then the latest registered,
    the defaults last), so the engine knows whom to name when an answer is wrong. Wrappers are
    refused: they could change the answer unseen. pluggy's tracing and call monitoring do not see
    these calls.
    """
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        _refuse_wrapper(pm, impl, hook_name)
        value = impl.function(*(kwargs[name] for name in impl.argnames))
        if value is not None:
            return value, describe(pm, impl.plugin)
    raise PluginError(f"no plugin answered {hook_name}: register {DEFAULTS} (build_plugin_manager does)")


def _refuse_wrapper(pm: pluggy.PluginManager, impl: pluggy.HookImpl, hook_name: str) -> None:
    if impl.hookwrapper or getattr(impl, "wrapper", False):  # pluggy < 1.1 has no new-style wrappers
        raise PluginError(
            f"plugin {describe(pm, impl.plugin)} wraps {hook_name}, which ReGATE calls one implementation "
            "at a time to check each answer: implement it plainly and return None to only observe a call"
        )


def checked_keep_ratio(value: Any, source: str, step: int) -> float:
    """A keep ratio is a finite number in (0, 1]; anything else would silently train on nothing or everything."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ratio = float(value) if number or (isinstance(value, torch.Tensor) and value.numel() == 1) else math.nan
    if not 0.0 < ratio <= 1.0:  # NaN fails the comparison too
        raise PluginError(
            f"regate_keep_ratio of plugin {source} returned {value!r} at step {step}: "
            "a keep ratio must be a finite number in (0, 1] (1.0 = dense)"
        )
    return ratio


def checked_scores(value: Any, source: str, n: int) -> torch.Tensor:
    """Scores are one float per unit, never NaN (NaN has no place in a top-k order)."""
    want = f"a float tensor of shape ({n},), one score per unit"
    if not isinstance(value, torch.Tensor):
        raise PluginError(f"regate_score of plugin {source} returned a {type(value).__name__}: it must be {want}")
    if not value.is_floating_point() or value.shape != (n,):
        raise PluginError(
            f"regate_score of plugin {source} returned a {value.dtype} tensor of shape {tuple(value.shape)}: "
            f"it must be {want}"
        )
    nan = torch.isnan(value).nonzero().flatten()
    if nan.numel():
        raise PluginError(
            f"regate_score of plugin {source} returned NaN for {nan.numel()} of {n} units (first: unit "
            f"{int(nan[0])}): scores must be numbers"
        )
    return value


def checked_selection(value: Any, source: str, units: Units, per_sample: bool) -> torch.Tensor:
    """A selection is an (n,) bool on the host (0/1 integers are taken as bools); per-sample selection
    keeps at least one unit of every sample that has units, as the method does."""
    n = len(units)
    want = f"a bool tensor of shape ({n},), True for each unit to keep"
    try:
        keep = torch.as_tensor(value).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise PluginError(
            f"regate_select of plugin {source} returned a {type(value).__name__}: it must be {want}"
        ) from None
    if keep.dtype not in (torch.bool, *_INTEGER_DTYPES) or keep.shape != (n,):
        raise PluginError(
            f"regate_select of plugin {source} returned a {keep.dtype} tensor of shape {tuple(keep.shape)}: "
            f"it must be {want}"
        )
    if not bool(((keep == 0) | (keep == 1)).all()):
        raise PluginError(
            f"regate_select of plugin {source} returned {keep.dtype} values other than 0 and 1: it must be {want}"
        )
    keep = keep.bool()
    if per_sample:
        kept = torch.zeros_like(units.counts).index_add_(0, units.row, keep.long())
        empty = ((units.counts > 0) & (kept == 0)).nonzero().flatten()
        if empty.numel():
            row = int(empty[0])
            raise PluginError(
                f"regate_select of plugin {source} keeps none of the {int(units.counts[row])} units of batch row "
                f"{row}: per-sample selection keeps at least one unit of every sample with units; keep one, "
                "or set selection='per_batch'"
            )
    return keep
