"""The plugin manager: built-in defaults plus every plugin under the ``regate`` entry-point group."""

from __future__ import annotations

import functools

import pluggy

from . import defaults, hookspecs
from .hookspecs import Target


def build_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="regate.defaults")
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


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
