"""`nfb convert`: a NeMo reward-model checkpoint -> a Hugging Face directory nfb score runs.

A face over `nfb.api.convert`; the progress bar (rich, on stderr) is the only thing
done here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nfb.cli.app import app, err, handle


@app.command(no_args_is_help=True)
@handle
def convert(
    nemo: Annotated[Path, typer.Argument(
        help="The NeMo checkpoint: a .nemo tar or its unpacked folder (model_config.yaml + "
             "model_weights/, zarr or torch_dist), e.g. nvidia/Llama3-70B-SteerLM-RM.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The Hugging Face directory to write (appears only when "
                               "complete).", show_default=False)],
    tokenizer: Annotated[str, typer.Option(
        help="The model's tokenizer, a local directory or hub id (none ships with NeMo "
             "checkpoints; Llama 3's for Llama3-70B-SteerLM-RM). Copied into the output.",
        show_default=False)],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert a NeMo-Aligner regression reward model (Llama architecture) into a Hugging Face
    LlamaForSequenceClassification directory for `nfb score --model DIR`.

    The head bias and the SteerLM prompt format, which Hugging Face and vLLM heads cannot hold,
    are recorded in config.json under "nfb"; `nfb score` applies both. Streams tensor by tensor
    (memory: the largest tensor plus a chunk). Exit 2: not convertible (checked before any
    weights are read); exit 1: the checkpoint's data is damaged (e.g. a truncated chunk).
    """
    from nfb import api

    bar = None  # started on the first tensor written, so errors found first print alone

    def advance(n: int, total: int, name: str) -> None:
        nonlocal bar, task
        if bar is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            bar = Progress(TextColumn("[bold]convert[/]"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[tensor]}"), console=err)
            bar.start()
            task = bar.add_task("convert", total=total, tensor="")
        bar.update(task, advance=n, tensor=name)

    task = None
    try:
        result = api.convert(nemo, output, tokenizer=tokenizer, overwrite=overwrite,
                              progress=None if quiet else advance)
    finally:
        if bar is not None:
            bar.stop()
    if not quiet:
        err.print(
            f"wrote {result.out}: {result.tensors} tensors, {result.total_bytes / 1e9:.2f} GB "
            f"{result.dtype} in {len(result.shards)} shard(s), {len(result.attributes)} heads "
            f"({', '.join(result.attributes)}), vocab {result.vocab_size} (checkpoint "
            f"{result.padded_vocab_size}), prompt format steerlm, head bias kept, "
            f"{result.seconds:.1f} s", soft_wrap=True)
