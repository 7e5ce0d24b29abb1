"""filter, stats, merge: verbs over scored files (registered on nfb.cli.app)."""

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from nfb import api
from nfb.cli.app import app, err, fail, handle
from nfb.errors import EXIT_USAGE

Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output.", rich_help_panel="Output")]
Scored = Annotated[list[str], typer.Argument(
    help="nfb outputs (.parquet or .jsonl), globs or directories.", show_default=False)]


def _refuse_existing(output: str, overwrite: bool) -> None:
    if output != "-" and os.path.exists(output) and not overwrite:
        raise fail(f"{output} already exists; add --overwrite to replace it", EXIT_USAGE)


@app.command("filter", no_args_is_help=True)
@handle
def filter_cmd(
    inputs: Scored,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Kept rows: .parquet, .jsonl, .jsonl.gz, or '-' for JSONL on "
        "stdout.", show_default=False)],
    min_level: Annotated[Optional[str], typer.Option(
        help="Keep feedback_level >= this (1-5 or not/slightly/partially/mostly/perfectly)."
    )] = None,
    max_level: Annotated[Optional[str], typer.Option(help="Keep feedback_level <= this.")] = None,
    min_reward: Annotated[Optional[float], typer.Option(help="Keep reward >= this.")] = None,
    max_reward: Annotated[Optional[float], typer.Option(help="Keep reward <= this.")] = None,
    where: Annotated[Optional[list[str]], typer.Option(
        help="A SQL condition over the columns, e.g. \"helpfulness >= 3 AND source IN "
             "('web', 'forum')\" or 'length(response) < 2000' (repeatable; all must hold; "
             "the older 'helpfulness>=3' form still works).")] = None,
    best_of_n: Annotated[bool, typer.Option(
        "--best-of-n",
        help="Keep only the best row of each --group-by group (highest reward, else level; "
             "the first wins a tie; null or NaN scores never win). Same as --top-k 1.")
    ] = False,
    top_k: Annotated[Optional[int], typer.Option(
        help="Keep the K best rows of each --group-by group, e.g. --top-k 2 --group-by "
             "prompt.", show_default=False)] = None,
    group_by: Annotated[Optional[str], typer.Option(
        help="Column that groups rows for --best-of-n, --top-k and --add-rank, e.g. prompt "
             "(a row whose key is null is a group of its own).")] = None,
    add_rank: Annotated[bool, typer.Option(
        "--add-rank", help="Add nfb_rank (1 = best in its --group-by group) and nfb_z (the score's "
             "z-score within the group).")] = False,
    drop_errors: Annotated[bool, typer.Option(
        "--drop-errors", help="Drop rows with an nfb_error.")] = False,
    drop_nfb_columns: Annotated[bool, typer.Option(
        "--drop-nfb-columns",
        help="Drop the columns nfb added: give back the input's own schema.")] = False,
    prefix: Annotated[str, typer.Option(help="The --prefix the scoring run used.")] = "",
    overwrite: Overwrite = False,
) -> None:
    """Keep rows of scored files by a SQL condition, level, reward or attribute; the best
    responses per prompt.

    One DuckDB query over all inputs, streamed; conditions combine with AND, a null (or, for
    the shorthands, NaN) never passes a numeric condition, and rows keep their input order.
    """
    _refuse_existing(output, overwrite)
    read, kept = api.filter(inputs, output, min_level=min_level, max_level=max_level,
                            min_reward=min_reward, max_reward=max_reward, where=where or [],
                            best_of_n=best_of_n, top_k=top_k, group_by=group_by,
                            add_rank=add_rank, drop_errors=drop_errors,
                            drop_nfb_columns=drop_nfb_columns, prefix=prefix,
                            warn=lambda m: err.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
    if output != "-" or not sys.stdout.isatty():
        err.print(f"kept {kept:,} of {read:,} rows -> {output}")


@app.command(no_args_is_help=True)
@handle
def stats(
    inputs: Scored,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout for scripts.")
                        ] = False,
    prefix: Annotated[str, typer.Option(help="The --prefix the scoring run used.")] = "",
    group_by: Annotated[Optional[str], typer.Option(
        help="Also give rows, errors, means and quantiles per value of this column, e.g. "
             "source.")] = None,
) -> None:
    """Summarize scored files: rows, errors by reason, level histogram, reward and attribute
    quantiles (exact, out of core), per group with --group-by, and the model and settings
    from the metadata."""
    import orjson

    from nfb.cli.printers import print_stats

    s = api.stats(inputs, prefix=prefix, group_by=group_by)
    if json_out:
        sys.stdout.buffer.write(orjson.dumps(s, option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.flush()
    else:
        print_stats(Console(), s)


@app.command(no_args_is_help=True)
@handle
def merge(
    inputs: Scored,
    output: Annotated[str, typer.Option("--output", "-o", help="Merged output (.parquet, "
                                        ".jsonl, .jsonl.gz or '-').", show_default=False)],
    overwrite: Overwrite = False,
) -> None:
    """Join the outputs of `--shard I/N` runs into one output, in input order.

    Refuses outputs from different models or settings, and missing or repeated shards.
    """
    _refuse_existing(output, overwrite)
    files, rows = api.merge(inputs, output)
    err.print(f"merged {files} file(s): {rows:,} rows -> {output}")
