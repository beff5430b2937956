"""pytest plugin for transformers' own test suite: ``hf.enable`` on every model of the supported classes.

The hf target promises that ``enable`` is invisible outside the packed training forward, so
transformers' own modeling tests for those classes must pass with it applied. This plugin applies it
at packing-only (``ReGATEEngine(ReGATEConfig(), None)``: no reference cache) to every instance of
``hf.SUPPORTED`` right after construction (the end of ``post_init``, which every model's
``__init__`` calls last), and prints at the end how many models it enabled, so that a run which
enabled nothing cannot pass for a clean one. Not a test module of ours: load it into transformers'
suite with ``-p regate_everywhere`` and this folder on PYTHONPATH (README.md beside it).
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable

import pytest

from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import ReGATEEngine
from regate_plugin.patches import hf

OUTPUT_KEY = "regate_enabled"
enabled: Counter[str] = Counter()  # class name -> models enabled in this process
_TOTALS = pytest.StashKey[Counter]()  # the whole run's counts, on the controller


def supported_classes() -> tuple[type, ...]:
    """The classes of ``hf.SUPPORTED`` that the installed transformers has."""
    import transformers

    return tuple(getattr(transformers, name) for name in hf.SUPPORTED if hasattr(transformers, name))


def enable_after(post_init: Callable[..., Any], classes: tuple[type, ...]) -> Callable[..., Any]:
    """``post_init`` that then enables ReGATE on a model of ``classes`` not enabled yet."""

    @functools.wraps(post_init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = post_init(self, *args, **kwargs)
        if isinstance(self, classes) and "_regate_engine" not in vars(self):
            hf.enable(self, ReGATEEngine(ReGATEConfig(), None))
            enabled[type(self).__name__] += 1
        return result

    wrapper._regate_wrapped = post_init
    return wrapper


def pytest_configure(config: pytest.Config) -> None:
    from transformers import PreTrainedModel

    classes = supported_classes()
    if not classes:
        raise pytest.UsageError(f"regate_everywhere: the installed transformers has none of {hf.SUPPORTED}")
    if not hasattr(PreTrainedModel.post_init, "_regate_wrapped"):
        PreTrainedModel.post_init = enable_after(PreTrainedModel.post_init, classes)
    config.stash[_TOTALS] = Counter()



def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its counts to the controller; a plain run keeps them itself."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[OUTPUT_KEY] = dict(enabled)
    else:
        session.config.stash[_TOTALS].update(enabled)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    node.config.stash[_TOTALS].update(getattr(node, "workeroutput", {}).get(OUTPUT_KEY, {}))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    totals: Counter = config.stash[_TOTALS]
    detail = ", ".join(f"{name}: {count}" for name, count in sorted(totals.items())) or "none"
    line = f"regate_everywhere: hf.enable applied to {sum(totals.values())} models ({detail})"
    terminalreporter.write_sep("=", line, red=not totals, green=bool(totals))
