"""Every `regate ...` command line in README.md, docs/ and the recipes' READMEs (which docs/ includes) parses against the real click commands:
its command exists, every option it passes before `--` exists (and takes a value of its type's
choices), and in code blocks the required options and arguments are given. A renamed or removed
option breaks this test. Run by `nox -s docs` only (the tests session does not collect this folder)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from regate_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "recipes").glob("*/README.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", ")"}
PLACEHOLDER = "PLACEHOLDER"  # what a `<...>` placeholder of the docs becomes


@dataclass(frozen=True)
class CommandLine:
    """One `regate ...` invocation found in a page: where, the tokens after `regate`, and whether it
    stands in a code block (checked in full) or in prose (the options it names must exist)."""

    where: str
    tokens: tuple[str, ...]
    in_code_block: bool

    def __str__(self) -> str:
        return f"{self.where}: regate {shlex.join(self.tokens)}"


def _normalise(line: str) -> str:
    """Launcher spellings to plain `regate`, and `<placeholders>` (which may hold quotes) to one word."""
    line = line.replace("$(command -v regate)", "regate")
    line = re.sub(r"(?:\bpython3? )?-m regate_plugin\b", "regate", line)
    return re.sub(r"<[^<>]*>", PLACEHOLDER, line)


def _invocations(text: str, where: str, in_code_block: bool) -> list[CommandLine]:
    lexer = shlex.shlex(_normalise(text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#" if in_code_block else ""
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens):
        if token != "regate":
            continue
        rest = []
        for t in tokens[i + 1:]:
            if t in SHELL_OPERATORS:
                break
            rest.append(t)
        found.append(CommandLine(where, tuple(rest), in_code_block))
    return found


def _logical_lines(block: list[str], first_number: int) -> list[tuple[int, str]]:
    """A code block's lines with backslash continuations joined, each with the number of its first line."""
    logical, current, start = [], "", first_number
    for number, line in enumerate(block, first_number):
        if not current:
            start = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append((start, current + line))
        current = ""
    if current:
        logical.append((start, current))
    return logical


def command_lines(path: Path) -> list[CommandLine]:
    """The `regate` invocations of a Markdown page: in shell code blocks (continuation lines joined,
    comments dropped), and in inline code spans that start with `regate ` (`{a,b}`: alternatives)."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found: list[CommandLine] = []
    fence = None
    block: list[str] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block, start = stripped[3:].strip().split(" ")[0].lower(), [], number + 1
            else:
                if fence in SHELL_FENCES:
                    found += [c for first, logical in _logical_lines(block, start)
                              for c in _invocations(logical, f"{name}:{first}", True)]
                fence = None
            continue
        if fence is not None:
            block.append(line)
            continue
        for span in re.findall(r"`(regate [^`]+)`", line):
            found += _invocations(span, f"{name}:{number}", False)
    return found


def _option_table(command: click.Command) -> dict[str, click.Parameter]:
    table = {}
    for param in command.get_params(click.Context(command)):
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("-"):
                table[name] = param
    return table


def check(line: CommandLine) -> None:
    """Raise AssertionError naming what does not parse."""
    tokens = list(line.tokens)
    if not tokens or tokens[0] in ("--help", "-h", "--version"):
        return
    name = tokens.pop(0)
    assert name in main.commands, f"{line}: no command {name!r}; regate has {', '.join(sorted(main.commands))}"
    command = main.commands[name]
    options = _option_table(command)
    elided = "..." in tokens or PLACEHOLDER in tokens  # a sketch: what it shows must exist, not all of it
    given, positional = set(), []
    while tokens:
        token = tokens.pop(0)
        if token == "--":
            break
        if token == "..." or not token.startswith("-") or token == "-":
            positional.append(token)
            continue
        flag, _, inline_value = token.partition("=")
        assert flag in options, f"{line}: `regate {name}` has no option {flag}"
        param = options[flag]
        given.add(param.name)
        if isinstance(param, click.Option) and (param.is_flag or param.count):
            assert not inline_value, f"{line}: {flag} takes no value"
            continue
        value = inline_value or (tokens.pop(0) if tokens and tokens[0] != "--" else None)
        if value is None:  # prose may name an option without its value
            assert not line.in_code_block, f"{line}: {flag} needs a value"
            continue
        if isinstance(param.type, click.Choice) and not value.startswith("$") and value not in ("...", PLACEHOLDER):
            alternatives = value[1:-1].split(",") if value.startswith("{") and value.endswith("}") else [value]
            for choice in alternatives:
                assert choice in param.type.choices, f"{line}: {flag} {choice!r} is not one of {list(param.type.choices)}"
    if not line.in_code_block or elided:
        return
    missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and p.required and p.name not in given]
    assert not missing, f"{line}: `regate {name}` requires {', '.join(missing)}"
    required_arguments = [p for p in command.params if isinstance(p, click.Argument) and p.required and p.nargs == 1]
    assert len(positional) >= len(required_arguments), (
        f"{line}: `regate {name}` needs {' '.join(p.human_readable_name for p in required_arguments)}")


ALL_LINES = [line for page in PAGES for line in command_lines(page)]


def test_the_pages_hold_the_command_lines_of_every_command():
    assert len(PAGES) >= 10, "docs/ is missing"
    in_code = [line for line in ALL_LINES if line.in_code_block]
    assert len(in_code) >= 25
    used = {line.tokens[0] for line in in_code if line.tokens}
    assert {"score", "train", "inspect", "schedule", "demo", "report", "targets", "bench", "estimate"} <= used


@pytest.mark.parametrize("line", ALL_LINES, ids=str)
def test_command_line_parses_against_the_cli(line):
    check(line)


@pytest.mark.parametrize("text, problem", [
    ("regate train --target llava --ref-cach refcache/ -- --deepspeed z.json", "has no option --ref-cach"),
    ("regate score --target hf --out refcache/ -- --dataset d:f", "requires --teacher"),
    ("regate trian --target llava", "no command 'trian'"),
    ("regate train --target llava --selection per_token --ref-cache c/", "'per_token' is not one of"),
    ("regate inspect --top 3", "needs CACHE_DIR"),
    ("deepspeed $(command -v regate) train --target llava --keep 0.4 --ref-cache c/ -- x", "has no option --keep"),
    ("torchrun --nproc_per_node 8 -m regate_plugin score --target hf --teacher t --out c -- --bogus", None),
])
def test_the_checker_catches_what_a_rename_breaks(tmp_path, text, problem):
    page = tmp_path / "page.md"
    page.write_text(f"```bash\n{text}\n```\n")
    (line,) = command_lines(page)
    if problem is None:
        check(line)
        return
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check(line)


def test_prose_spans_check_options_but_not_required_ones(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `regate score` once, then `regate train --no-regate` and `regate train --keep 1`.\n")
    first, second, third = command_lines(page)
    check(first)
    check(second)
    with pytest.raises(AssertionError, match="has no option --keep"):
        check(third)


def test_renaming_a_real_option_breaks_the_pages(monkeypatch):
    """The pages' lines are checked against the live click objects: rename --ref-cache of `regate train`
    and the lines that use it no longer parse."""
    (param,) = [p for p in main.commands["train"].params if p.name == "ref_cache"]
    monkeypatch.setattr(param, "opts", ["--reference-cache"])
    broken = []
    for line in ALL_LINES:
        try:
            check(line)
        except AssertionError as err:
            broken.append(str(err))
    assert len(broken) >= 5 and all("has no option --ref-cache" in message for message in broken)
