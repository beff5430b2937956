"""Version checks whose errors say what to install."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet


def require(distribution: str, specifier: str) -> str | None:
    """None if ``distribution`` is installed within ``specifier``, else what is wrong and the fix."""
    try:
        found = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return f"{distribution} is not installed: pip install '{distribution}{specifier}'"
    if found not in SpecifierSet(specifier, prereleases=True):
        return f"{distribution} {found} is installed, this needs {distribution}{specifier}: pip install '{distribution}{specifier}'"
    return None
