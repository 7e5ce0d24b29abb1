"""pairs, eval, report: preference data, agreement with human labels, and plots
(registered on nfb.cli.app)."""

import os
import sys
from typing import Annotated, Optional

import typer

from nfb.cli.app import app, err, fail, handle
from nfb.errors import EXIT_USAGE

Scored = Annotated[list[str], typer.Argument(
    help="nfb outputs (.parquet or .jsonl), globs or directories.", show_default=False)]
Prefix = Annotated[str, typer.Option(help="The --prefix the scoring run used.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.",
                                         rich_help_panel="Output")]


def _refuse_existing(output: str, overwrite: bool) -> None:
    if output != "-" and os.path.exists(output) and not overwrite:
        raise fail(f"{output} already exists; add --overwrite to replace it", EXIT_USAGE)


@app.command(no_args_is_help=True)
@handle
def pairs(
    inputs: Scored,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Pairs: .parquet, .jsonl, .jsonl.gz, or '-' for JSONL on stdout.",
        show_default=False)],
    group_by: Annotated[Optional[str], typer.Option(
        help="Column whose equal values answer the same prompt, e.g. prompt (required for one "
             "response per row; with several responses per row each row is a group).")] = None,
    strategy: Annotated[str, typer.Option(
        help="best-worst: the best response of a group against the worst; all-pairs: every "
             "pair of different scores.")] = "best-worst",
    min_margin: Annotated[float, typer.Option(
        help="Drop pairs whose score difference is below this.")] = 0.0,
    per_group: Annotated[Optional[int], typer.Option(
        help="At most K pairs per group (best-worst: k-th best against k-th worst, each "
             "response once; all-pairs: the K largest margins).")] = None,
    score: Annotated[Optional[str], typer.Option(
        help="Score to compare: reward, an attribute (helpfulness, ...), feedback_level, "
             "feedback_level_mean. Default: reward, else the mean level, else the level.")
    ] = None,
    prompt_field: Annotated[str, typer.Option(help="The prompt column.")] = "prompt",
    response_field: Annotated[Optional[list[str]], typer.Option(
        help="The response column (one response per row), or, repeated, the response fields "
             "of a multi-response row (default: found from the score columns).")] = None,
    responses_field: Annotated[Optional[str], typer.Option(
        help="A list column of responses scored with --responses-field.")] = None,
    prefix: Prefix = "",
    overwrite: Overwrite = False,
) -> None:
    """Chosen/rejected pairs for DPO (TRL's prompt, chosen, rejected, plus both scores and
    the margin), made within each prompt: rewards compare only between responses to the same
    prompt. Ties and null scores never make a pair; the summary counts them."""
    from nfb import api
    from nfb.cli.printers import pairs_summary

    _refuse_existing(output, overwrite)
    res = api.pairs(inputs, output, group_by=group_by, min_margin=min_margin,
                    per_group=per_group, strategy=strategy, score=score, prefix=prefix,
                    prompt_field=prompt_field, response_field=response_field,
                    responses_field=responses_field)
    for line in pairs_summary(res):
        err.print(line, soft_wrap=True, markup=False)


@app.command("eval", no_args_is_help=True)
@handle
def eval_cmd(
    inputs: Scored,
    human: Annotated[Optional[list[str]], typer.Option(
        help="A human label column whose model column is PREFIX+COLUMN (repeatable), e.g. "
             "--human helpfulness --prefix rm_.")] = None,
    pair: Annotated[Optional[list[str]], typer.Option(
        help="MODEL_COLUMN=HUMAN_COLUMN (repeatable).")] = None,
    human_level: Annotated[Optional[str], typer.Option(
        help="A human level column (1-5 or not ... perfectly) against feedback_level.")
    ] = None,
    chosen: Annotated[str, typer.Option(
        help="The chosen response field (pairwise accuracy on CHOSEN_reward > "
             "REJECTED_reward).")] = "chosen",
    rejected: Annotated[str, typer.Option(help="The rejected response field.")] = "rejected",
    subset: Annotated[Optional[str], typer.Option(
        help="A column whose values split the pairwise accuracy (e.g. subset).")] = None,
    score: Annotated[Optional[str], typer.Option(
        help="Score compared for pairwise accuracy (default reward, else the level).")] = None,
    bootstrap: Annotated[int, typer.Option(
        help="Bootstrap resamples for the intervals (0: none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    confidence: Annotated[float, typer.Option(help="Interval level.")] = 0.95,
    prefix: Prefix = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout for scripts.")
                        ] = False,
) -> None:
    """Agreement with human labels: MAE, Pearson, Spearman per attribute; feedback level
    against a human level; pairwise accuracy on chosen/rejected rows (per subset); each with
    a bootstrapped interval."""
    import orjson
    from rich.console import Console

    from nfb import api
    from nfb.cli.printers import print_eval

    d = api.evaluate(inputs, human=human or [], pair=pair or [], human_level=human_level,
                 chosen=chosen, rejected=rejected, subset=subset, score=score, prefix=prefix,
                 bootstrap=bootstrap, seed=seed, confidence=confidence)
    if json_out:
        sys.stdout.buffer.write(orjson.dumps(d, option=orjson.OPT_INDENT_2 |
                                             orjson.OPT_NON_STR_KEYS, default=str) + b"\n")
        sys.stdout.flush()
    else:
        print_eval(Console(), d)


@app.command(no_args_is_help=True)
@handle
def report(
    inputs: Scored,
    output: Annotated[str, typer.Option("--output", "-o", help="The page (.html).",
                                        show_default=False)],
    title: Annotated[Optional[str], typer.Option(help="The page's title.")] = None,
    prefix: Prefix = "",
    overwrite: Overwrite = False,
) -> None:
    """One self-contained HTML page of plots (opens with no network): distributions of the
    reward and attributes, level histogram, reward against length, attribute correlations,
    errors by reason, provenance."""
    from nfb import api

    _refuse_existing(output, overwrite)
    path = api.report(inputs, output, prefix=prefix, title=title)
    err.print(f"report -> {path}", soft_wrap=True, markup=False)
