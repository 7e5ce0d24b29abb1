"""The Typer app, the stderr console, and the one place that turns errors into exit codes.

Every command is `@app.command(...)` over `@handle`: the library raises `nfb.errors.NfbError`
subclasses, each carrying its exit code, and `handle` prints one `error:` line and exits
with it. Nothing else in the CLI maps exceptions.
"""

import functools
import inspect
import os
import sys
import typing
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from nfb._version import __version__
from nfb.errors import EXIT_INTERRUPTED, Interrupted, NfbError
from nfb.logs import verbose

# --- how the help reads -----------------------------------------------------------------------
# Every value names what it is (PATH, MODEL, N ...), never a Python type: a `metavar=` in the
# declaration wins, else the parameter's name says it (the same name reads the same in every
# command), else its type. Flags show nothing beside them.
METAVARS = {
    "inputs": "INPUT", "output": "PATH", "nemo": "CHECKPOINT", "model": "MODEL",
    "tokenizer": "TOKENIZER", "revision": "REV", "recipe": "RECIPE", "shard": "I/N",
    "dtype": "DTYPE", "engine": "vllm|ray", "ray_address": "ADDRESS", "prefix": "PREFIX",
    "weights": "WEIGHTS", "attributes": "NAMES", "reward_token": "TOKEN",
    "prompt_format": "chat|steerlm", "principle": "PRINCIPLE", "strategy": "best-worst|all-pairs",
    "where": "SQL", "min_level": "LEVEL", "max_level": "LEVEL", "min_reward": "X",
    "max_reward": "X", "min_margin": "X", "top_k": "K", "per_group": "K", "score": "COLUMN",
    "group_by": "COLUMN", "human": "COLUMN", "human_level": "COLUMN", "subset": "COLUMN",
    "pair": "MODEL_COL=HUMAN_COL", "chosen": "FIELD", "rejected": "FIELD", "title": "TEXT",
    "stall_timeout": "SECONDS", "checkpoint_every": "SECONDS", "confidence": "LEVEL",
}
_BY_SUFFIX = {"_field": "FIELD", "_path": "PATH", "_dir": "DIR", "_seconds": "SECONDS"}
_BY_TYPE = {"int": "N", "integer": "N", "float": "FLOAT", "path": "PATH"}


def _type_name(param) -> str:
    """The value's type, lower case ('int', 'float', 'str', 'path'), in Typer with or without
    Click underneath."""
    if getattr(param, "type", None) is not None:          # Click's ParamType
        return getattr(param.type, "name", "").split()[0].lower()
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    while typing.get_args(ann):                           # list[int] -> int
        ann = typing.get_args(ann)[0]
    return getattr(ann, "__name__", "").lower()


def metavar_for(param) -> str:
    """What a value is called in the help: the declared metavar, else by name, else by type."""
    if param.metavar is not None:
        return param.metavar
    name = param.name or ""
    if name in METAVARS:
        return METAVARS[name]
    for suffix, label in _BY_SUFFIX.items():
        if name.endswith(suffix):
            return label
    return _BY_TYPE.get(_type_name(param), "TEXT")


def _tidy(params: list) -> list:
    """Metavars instead of type names; no metavar on flags; help text taken as plain text
    (a '[default: x]' in it is text, not Rich markup)."""
    for p in params:
        if getattr(p, "_nfb_tidy", False):
            continue
        p._nfb_tidy = True
        if p.help:
            p.help = escape(p.help)
        if isinstance(p, TyperOption):
            p.metavar = "" if (p.is_flag or p.count) else metavar_for(p)
        elif isinstance(p, TyperArgument):
            p.metavar = metavar_for(p)
            # the name column already says it (INPUT, and `...` in the usage line for many):
            # no type column beside it
            p.display_type_rich = lambda ctx: None
    return params


def reflow(help_text: str) -> str:
    """A docstring as paragraphs of whole lines: the source's line breaks inside a paragraph
    go (the terminal wraps them); a paragraph that starts with \\b keeps its lines."""
    paragraphs = inspect.cleandoc(help_text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def summary(help_text: str | None) -> str | None:
    """A command's line in `nfb --help`: its docstring's first paragraph, reflowed."""
    if not help_text:
        return None
    return reflow(help_text).split("\n\n", 1)[0]


class NfbCommand(TyperCommand):
    """A command whose `nfb --help` line is its docstring's first paragraph, whole, and whose
    own --help has the rest; help text is plain text (no Rich markup)."""

    def __init__(self, *args, help=None, short_help=None, **kwargs):
        super().__init__(*args, help=escape(reflow(help)) if help else help,
                         short_help=escape(short_help or summary(help) or "") or None,
                         **kwargs)

    def get_params(self, ctx):
        return _tidy(super().get_params(ctx))


class NfbGroup(TyperGroup):
    def get_params(self, ctx):
        return _tidy(super().get_params(ctx))


class NfbTyper(typer.Typer):
    """Typer whose commands are NfbCommands (metavars, whole-sentence summaries)."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or NfbCommand, **kwargs)


app = NfbTyper(
    cls=NfbGroup,
    rich_markup_mode="rich",
    name="nfb",
    help="Score datasets of LLM conversations offline with NVIDIA Nemotron feedback and reward "
         "models on vLLM. Output keeps every input column and adds nfb's; runs resume where "
         "they stopped.\n\nExit codes: 0 done, 1 run failed, 2 bad usage, 3 done with row "
         "errors (--strict), 130 interrupted (run again to resume).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"nfb {__version__}")
        raise typer.Exit()


def _verbose(value: bool) -> None:
    if value:
        os.environ["NFB_VERBOSE"] = "1"


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose_: Annotated[bool, typer.Option(
        "--verbose", "-v", callback=_verbose, is_eager=True,
        help="Show the engine's own log lines and tracebacks (also NFB_VERBOSE=1).")
    ] = False,
) -> None:
    pass


def fail(message: str, code: int) -> typer.Exit:
    """Print the one `error:` line: the message as text (names from hostile input may hold
    rich markup, newlines or terminal escapes: shown escaped, never interpreted)."""
    from rich.markup import escape

    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    err.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
    return typer.Exit(code)


def handle(fn):
    """Run a command body; an NfbError becomes its one-line message and exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            err.print(f"[yellow]{e}[/]", soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except NfbError as e:
            if verbose():
                import traceback
                traceback.print_exc()
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:   # `nfb ... -o - | head`: end quietly, like other Unix tools
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
    return wrapper


def with_options(*groups: dict):
    """Add option bundles (name -> (Annotated type, default)) to a command's signature.

    The options are declared once in a bundle and reach the command body as keyword
    arguments, named like the library's keyword arguments, so a body passes them on as they
    are (`nfb.api.feedback(**options)`).
    """
    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = []
        for group in groups:
            for name, (annotation, default) in group.items():
                if name not in names:
                    names.add(name)
                    extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                   default=default, annotation=annotation))
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind ==
                  p.VAR_POSITIONAL else p for p in own] + extra

        @functools.wraps(fn)
        def wrapper(**kwargs):
            return fn(**kwargs)
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        return wrapper
    return deco


def main() -> None:
    from nfb.logs import quiet_engine_logs

    if "-v" in sys.argv[1:2] or "--verbose" in sys.argv[1:2]:
        os.environ["NFB_VERBOSE"] = "1"
    if not verbose():
        quiet_engine_logs()
    try:
        app()
    except BrokenPipeError:  # `nfb ... -o - | head`: end quietly, like other Unix tools
        try:
            sys.stdout = None
        finally:
            os._exit(0)
