"""The Typer app, the stderr console, and the one place that turns errors into exit codes.

Every command is `@app.command(...)` over `@handle`: the library raises `nfb.errors.NfbError`
subclasses, each carrying its exit code, and `handle` prints one `error:` line and exits
with it. Nothing else in the CLI maps exceptions.
"""

import functools
import inspect
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from nfb import __version__
from nfb.errors import EXIT_INTERRUPTED, Interrupted, NfbError
from nfb.logs import verbose

app = typer.Typer(
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
