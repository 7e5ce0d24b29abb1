"""`--help` reads like a well-kept tool's: every value named (PATH, MODEL, N ...), no Python type
names, nothing beside a flag, and each command's line in `nfb --help` a whole sentence."""

import re

import pytest
import typer
from typer.testing import CliRunner

import nfb.cli

TYPE_NAMES = ("<str>", "<bool>", "<int>", "<float>", "<path>", "list[", "int range",
              "float range")
COMMANDS = sorted(typer.main.get_command(nfb.cli.app).commands)


@pytest.fixture
def helptext(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    # Typer caps the width at TERMINAL_WIDTH as read when it first renders help (another test
    # may have set it): the width here is COLUMNS alone
    import typer.rich_utils
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None, raising=False)
    runner = CliRunner()

    def render(*args: str, width: int = 100) -> str:
        monkeypatch.setenv("COLUMNS", str(width))
        r = runner.invoke(nfb.cli.app, [*args, "--help"])
        assert r.exit_code == 0, r.output
        return r.output
    return render


def flags_of(command: str | None) -> set[str]:
    """The options of a command (or of nfb itself) that take no value."""
    group = typer.main.get_command(nfb.cli.app)
    cmd = group.commands[command] if command else group
    ctx = cmd.make_context(command or "nfb", [], resilient_parsing=True)
    return {o for p in cmd.get_params(ctx) if getattr(p, "is_flag", False)
            for o in (*p.opts, *p.secondary_opts)}


def rows(text: str, panel: str) -> list[str]:
    """The rows of one rich panel, with the box drawn off ('│ ... │' -> '...')."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("╭─ " + panel):
            inside = True
        elif inside and line.startswith("╰"):
            break
        elif inside:
            out.append(line.strip().strip("│").rstrip())
    return out


def test_commands_cover_the_cli():
    assert {"feedback", "score", "judge", "convert", "filter", "stats", "merge", "pairs",
            "eval", "report", "models", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_names_values_and_shows_nothing_beside_flags(helptext, command):
    text = helptext(*([command] if command else []))
    for name in TYPE_NAMES:
        assert name not in text, (command, name)
    for line in text.splitlines():        # a --x/--no-x pair (a tri-state) on one line
        for neg in re.findall(r"--no-([\w-]+)", line):
            assert re.search(rf"--{neg}\s", line), (command, line)
    option_rows = [r for p in ("Options", "Model", "Engine", "Output", "Input", "Sampling",
                               "Reward") for r in rows(text, p)]
    assert option_rows
    for row in option_rows:
        m = re.match(r"^\s*\*?\s*(--[\w-]+)(?:\s+-\w+)?\s{2,}(\S+)", row)
        if not m:
            continue                       # a wrapped help line
        opt, after = m.groups()
        if after.startswith("--no-"):
            continue                       # a --x/--no-x pair: no metavar, help follows
        if opt in flags_of(command):
            # a flag: its help text follows at once, no metavar (starts with a capital)
            assert after[0].isupper() and not after.isupper(), (command, row)
        else:
            # a value: named in capitals (PATH, MODEL, N, FLOAT, I/N) or as its choices
            assert re.fullmatch(r"[A-Z][A-Z0-9_/=]*(\|[a-z-]+)*|[a-z-]+(\|[a-z-]+)+", after), \
                (command, row)
    if command in ("feedback", "score", "judge"):
        for value in ("PATH", "MODEL", "N", "FLOAT", "I/N", "FIELD"):
            assert re.search(rf"\s{re.escape(value)}(\s|$)", text), (command, value)
    if command == "feedback":
        assert "[default: response]" in text   # help text is plain text, not Rich markup


def summaries_of(text: str) -> dict[str, list[str]]:
    """command -> the rows its description takes in `nfb --help`."""
    out: dict[str, list[str]] = {}
    current = None
    for row in rows(text, "Commands"):
        m = re.match(r"^\s*([a-z]+)\s{2,}(.*)$", row)
        if m and m.group(1) in COMMANDS:
            current = m.group(1)
            out[current] = [m.group(2).strip()]
        elif current:
            out[current].append(row.strip())
    return out


def test_command_summaries_break_only_where_the_terminal_does(helptext):
    """On a terminal wide enough for every summary, each is one row: a second row would be
    a line end of the docstring breaking the sentence."""
    wide = summaries_of(helptext(width=400))
    assert set(wide) == set(COMMANDS)
    for command, lines in wide.items():
        assert len(lines) == 1, (command, lines)


def test_command_summaries_are_whole_sentences(helptext):
    text = helptext()
    summaries: dict[str, str] = {}
    current = None
    for row in rows(text, "Commands"):
        m = re.match(r"^\s*([a-z]+)\s{2,}(.*)$", row)
        if m and m.group(1) in COMMANDS:
            current = m.group(1)
            summaries[current] = m.group(2).strip()
        elif current:
            summaries[current] += " " + row.strip()
    assert set(summaries) == set(COMMANDS)
    for command, line in summaries.items():
        assert re.search(r"[.!?]$", line), (command, line)       # not cut mid-sentence
        own = " ".join(helptext(command).split())
        assert " ".join(line.split()) in own, (command, line)    # the command's own first
        # paragraph, whole; the details are in its own --help
