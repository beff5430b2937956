"""The `regate` command line and target registration."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from regate_plugin import cli, plugins
from regate_plugin.hookspecs import Target, hookimpl
from regate_plugin.plugins import build_plugin_manager, targets


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
