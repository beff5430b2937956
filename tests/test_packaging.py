"""A non-editable install (`pip install .`, the README's quick start) ships every subpackage."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {"regate_plugin"} | {
        "regate_plugin." + p.parent.relative_to(ROOT / "regate_plugin").as_posix().replace("/", ".")
        for p in (ROOT / "regate_plugin").glob("*/**/__init__.py")
    }
    assert found | {"regate_plugin.patches"} == listed
    assert setuptools["package-dir"]["regate_plugin.patches"] == "patches" and (ROOT / "patches" / "__init__.py").is_file()
