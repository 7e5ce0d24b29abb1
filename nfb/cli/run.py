"""feedback, score and judge: flags -> `nfb.api.feedback/score/judge` -> summary and exit
code."""

from typing import Annotated, Optional

import typer

from nfb import api
from nfb.cli.app import app, err, handle, with_options
from nfb.errors import EXIT_ROW_ERRORS

_IN, _MODEL, _ENGINE, _OUT, _SAMPLING, _REWARD = (
    "Input", "Model", "Engine", "Output", "Sampling", "Reward")


def _opt(type_, help: str, panel: str, *decls: str, **kw):
    return Annotated[type_, typer.Option(*decls, help=help, rich_help_panel=panel, **kw)]


# --- option bundles, declared once ----------------------------------------------------------
INPUT_OPTIONS = {
    "prompt_field": (_opt(str, "Input field holding the prompt.", _IN), "prompt"),
    "response_field": (_opt(Optional[list[str]], "Input field holding the response "
                            "[default: response]. Repeat it for several responses per row "
                            "(--response-field chosen --response-field rejected): each is "
                            "judged on its own, columns chosen_*, rejected_*.", _IN), None),
    "responses_field": (_opt(Optional[str], "Input field holding a list of responses per row "
                             "(UltraFeedback-style); adds list columns FIELD_*, aligned with "
                             "it.", _IN), None),
    "messages_field": (_opt(Optional[str], "Input field holding a list of {role, content} "
                            "turns instead of prompt/response; the last turn must be the "
                            "assistant response being judged.", _IN), None),
    "limit": (_opt(Optional[int], "Only the first N input rows.", _IN, min=1), None),
    "shard": (_opt(Optional[str], "I/N: only rows whose number modulo N is I, for N machines; "
                   "join with `nfb merge`.", _IN), None),
    "too_long": (_opt(str, "A row over the model's context: 'error' (an error row, "
                      "prompt_too_long), 'drop-context' (drop the oldest turns before the final "
                      "prompt until it fits) or 'truncate' (then cut the final prompt's middle; "
                      "never the judged response). Shortened rows: column nfb_truncated.", _IN,
                      metavar="POLICY"),
                 "error"),
    "max_line_bytes": (_opt(Optional[int], "Longest JSONL input line read [default: 64 MiB]; "
                            "a longer line is one error row (line_too_long), skipped without "
                            "being held in memory.", _IN, min=1), None),
}
ENGINE_OPTIONS = {
    "revision": (_opt(Optional[str], "Model revision (branch, tag or commit).", _MODEL), None),
    "trust_remote_code": (_opt(bool, "Allow the model repository's own Python code to run "
                               "(off: never runs remote code).", _MODEL,
                               "--trust-remote-code"), False),
    "tensor_parallel_size": (_opt(int, "GPUs per model (tensor parallelism).", _ENGINE,
                                  "--tensor-parallel-size", "-tp", min=1), 1),
    "data_parallel": (_opt(str, "Engine replicas, each a process with -tp devices of its own "
                           "(a node's GPUs in groups of -tp; CPU cores in groups); 'auto': as "
                           "many as the visible GPUs hold, 1 on a CPU. Never changes the "
                           "output.", _ENGINE, "--data-parallel", "-dp",
                           metavar="N|auto"), "auto"),
    "max_model_len": (_opt(Optional[int], "Context length (prompt + output tokens); default: "
                           "the model's.", _ENGINE, min=16), None),
    "gpu_memory_utilization": (_opt(Optional[float], "Fraction of GPU memory vLLM may use "
                                    "[default: 0.9 on GPU, 0.2 on CPU, where it sizes the KV "
                                    "cache from RAM].", _ENGINE, min=0.01, max=1.0), None),
    "dtype": (_opt(str, "Weights dtype: auto, bfloat16, float16, float32.", _ENGINE), "auto"),
    "enforce_eager": (_opt(Optional[bool], "Run the model eagerly (no torch.compile, no CUDA "
                           "graphs) [default: eager on CPU, where compiling costs more than it "
                           "saves; compiled on GPU].", _ENGINE,
                           "--enforce-eager/--no-enforce-eager", show_default=False), None),
    "max_in_flight": (_opt(int, "Requests kept in flight in the engine (bounds memory; the "
                           "engine batches within it).", _ENGINE, min=1), 1024),
    "batch_rows": (_opt(int, "Rows read, validated and tokenized together (never changes the "
                        "output).", _ENGINE, min=1), 256),
    "engine": (_opt(str, "Where vLLM runs: 'vllm' in this process, or 'ray' (Ray Data LLM: "
                    "vLLM replicas on a Ray cluster; pip install 'nfb[ray]').", _ENGINE,
                    "--engine"), "vllm"),
    "ray_address": (_opt(Optional[str], "Ray cluster to join (e.g. ray://head:10001 or auto); "
                         "default: a local Ray.", _ENGINE), None),
    "replicas": (_opt(int, "With --engine ray: vLLM replicas, each with "
                      "--tensor-parallel-size GPUs.", _ENGINE, min=1), 1),
    "ray_block_rows": (_opt(Optional[int], "Gone: --engine ray runs one pipeline per run.",
                            _ENGINE, hidden=True), None),
    "engine_restarts": (_opt(int, "If the engine dies mid-run, restart it up to N times and "
                             "go on with the unfinished rows (0: stop, rows saved).", _ENGINE,
                             min=0), 0),
    "stall_timeout": (_opt(float, "Seconds without any finished request before the run is "
                           "stopped as stalled (rows saved).", _ENGINE, min=1.0), 600.0),
}
OUTPUT_OPTIONS = {
    "prefix": (_opt(str, "Prefix for every column nfb adds, e.g. 'rm_' when the input already "
                    "has them.", _OUT), ""),
    "overwrite": (_opt(bool, "Replace an existing output and discard an unfinished run's "
                       "checkpoint.", _OUT, "--overwrite"), False),
    "strict": (_opt(bool, "Exit 3 (instead of 0) when the run finished but some rows have "
                    "nfb_error (judge: or no readable judgement).", _OUT, "--strict"), False),
    "checkpoint_every": (_opt(float, "Seconds between checkpoints at most (also one per 50,000 "
                              "rows).", _OUT, min=0.0), 30.0),
    "quiet": (_opt(bool, "No progress bar or summary.", _OUT, "--quiet", "-q"), False),
    "card": (_opt(bool, "Write a dataset card (README.md with YAML metadata: model, recipe, "
                  "columns, counts, levels or score quantiles) beside the output, ready to "
                  "push to the Hugging Face Hub.", _OUT), False),
    "dry_run": (_opt(bool, "Plan the run, start no engine: read, validate, template and "
                     "tokenize every row as a run does, then report rows, requests, prompt "
                     "tokens, the error rows a run would write, and an engine-time estimate. "
                     "Needs the tokenizer and config only.", _OUT), False),
    "json": (_opt(bool, "With --dry-run: print the plan as one JSON object on stdout.", _OUT),
             False),
}
RUN_OPTIONS = (INPUT_OPTIONS, ENGINE_OPTIONS, OUTPUT_OPTIONS)
# judge: one response or two, compared in one prompt (no list field)
JUDGE_INPUT_OPTIONS = {
    **{k: v for k, v in INPUT_OPTIONS.items() if k != "responses_field"},
    "response_field": (_opt(Optional[list[str]], "Input field holding the judged response "
                            "[default: response]. Give it twice (--response-field a "
                            "--response-field b) to judge two responses together: each one's "
                            "helpfulness and a ranking.", _IN), None),
}

Inputs = Annotated[list[str], typer.Argument(
    help="Input files: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, globs ('data/*.jsonl'), "
         "directories, or '-' for JSONL on stdin.", show_default=False)]
Output = Annotated[str, typer.Option(
    "--output", "-o", help="Output file: .parquet, .jsonl or .jsonl.gz (by extension), or '-' "
    "for JSONL on stdout.", show_default=False)]


def _run(call, task: str, options: dict) -> None:
    """Call the library with a progress bar; print the summary; --strict's exit code."""
    from nfb.cli.progress import RichProgress, print_summary

    quiet, strict = options.pop("quiet"), options.pop("strict")
    as_json = options.pop("json")
    if as_json and not options.get("dry_run"):
        from nfb.errors import UsageError
        raise UsageError("--json goes with --dry-run (for a finished run: nfb stats --json)")
    log = (lambda _m: None) if quiet or as_json else (lambda m: err.print(m, soft_wrap=True))
    if options.get("dry_run"):
        from nfb.cli.progress import print_plan
        plan = call(**options, log=log)
        print_plan(plan, as_json)
        return
    result = call(**options, progress=RichProgress(err, enabled=not quiet), log=log)
    if not quiet:
        print_summary(err, result, task)
    if strict and (result.error_rows or result.unreadable):
        raise typer.Exit(EXIT_ROW_ERRORS)


@app.command(no_args_is_help=True)
@handle
@with_options(*RUN_OPTIONS)
def feedback(
    inputs: Inputs,
    output: Output,
    model: _opt(str, "Feedback model: hub id, local directory, or 'demo' (SmolLM2-135M-Instruct, "
                "see `nfb demo`).", _MODEL) = "nvidia/Llama-3.3-Nemotron-70B-Feedback",
    samples: _opt(int, "Feedback samples per row; adds per-sample lists and the mean level.",
                  _SAMPLING, min=1) = 1,
    temperature: _opt(float, "Sampling temperature (0: greedy).", _SAMPLING, min=0.0) = 0.7,
    top_p: _opt(float, "Nucleus sampling mass.", _SAMPLING, min=0.0, max=1.0) = 1.0,
    max_tokens: _opt(int, "Most tokens generated per sample.", _SAMPLING, min=1) = 4096,
    seed: _opt(Optional[int], "Seed every request: the same row gives the same text, resumed "
               "or not.", _SAMPLING) = None,
    constrain_level: _opt(bool, "Guide decoding so the text starts with 'The response is "
                          "{level} helpful.' (for small models; the Nemotron model follows the "
                          "format by itself).", _SAMPLING, "--constrain-level") = False,
    **options,
) -> None:
    """Judge each response with a generative feedback model (helpfulness level 1-5 + text).

    Adds nfb_row, nfb_error, feedback, feedback_level (1-5), feedback_label.
    """

    _run(api.feedback, "feedback", dict(
        options, inputs=inputs, output=output, model=model, samples=samples,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        constrain_level=constrain_level))


@app.command(no_args_is_help=True)
@handle
@with_options(*RUN_OPTIONS)
def score(
    inputs: Inputs,
    output: Output,
    model: Annotated[str, typer.Option(
        help="Reward model in Hugging Face format: a *ForSequenceClassification model (one "
             "regression head per attribute, or one for a scalar reward), a directory made by "
             "`nfb convert`, or a causal LM with --reward-token.", rich_help_panel=_MODEL,
        show_default=False)],
    weights: _opt(Optional[str], "How attributes combine into `reward`: a preset "
                  "(llama3-70b-steerlm, nemotron-4-340b), one weight per head "
                  "('0,0,0,0,0.65,0.8,0.45,0.55,-0.4'), or name=value pairs "
                  "('helpfulness=1,verbosity=-0.3'; unnamed heads weigh 0). Default for the 9 "
                  "SteerLM heads: llama3-70b-steerlm.", _REWARD) = None,
    attributes: _opt(Optional[str], "Comma list naming the heads, in order (default: the "
                     "config's id2label, or the SteerLM names for 9 heads).", _REWARD) = None,
    reward_token: _opt(Optional[str], "Score with a causal LM: the reward is the raw logit of "
                       "this token (a token string, or a token id such as 0 for "
                       "Llama-3.1-Nemotron-70B-Reward-HF) after the conversation (vLLM's "
                       "classifier_from_token).", _REWARD) = None,
    prompt_format: _opt(Optional[str], "What the model sees: 'chat' (the tokenizer's chat "
                        "template) or 'steerlm' (NeMo-Aligner's SteerLM text). Default: "
                        "'steerlm' for a directory made by `nfb convert`, else 'chat'.",
                        _REWARD) = None,
    recipe: _opt(Optional[str], "Score the model as a known recipe says (a name from `nfb "
                 "models`, or its hub id), e.g. for a local copy nfb cannot recognise. Default: "
                 "found from the hub id, the config's name, or `nfb convert`'s key.",
                 _REWARD) = None,
    principle: _opt(Optional[list[str]], "With a principle model (Llama-3.3-Nemotron-70B-"
                    "Reward-Principle): a principle to score, e.g. 'correctness'. Repeat it for "
                    "several (one column each; combine them with --weights).", _REWARD) = None,
    principle_field: _opt(Optional[str], "With a principle model: the input field holding each "
                          "row's own principle.", _REWARD) = None,
    **options,
) -> None:
    """Score each conversation with a reward model: one column per attribute, plus `reward`.

    Adds nfb_row, nfb_error, one float column per head (e.g. helpfulness ... verbosity) and
    reward (the weighted sum; for a scalar model, its output).
    """

    _run(api.score, "score", dict(
        options, inputs=inputs, output=output, model=model, weights=weights,
        attributes=attributes, reward_token=reward_token, prompt_format=prompt_format,
        recipe=recipe, principle=principle or None, principle_field=principle_field))


@app.command(no_args_is_help=True)
@handle
@with_options(JUDGE_INPUT_OPTIONS, ENGINE_OPTIONS, OUTPUT_OPTIONS)
def judge(
    inputs: Inputs,
    output: Output,
    model: _opt(str, "Generative reward model (GenRM): hub id or local directory (see `nfb "
                "models`).", _MODEL) = api.JUDGE_MODEL,
    recipe: _opt(Optional[str], "Run the model as a known GenRM recipe says (a name from `nfb "
                 "models`, or its hub id), e.g. for a local copy nfb cannot recognise.",
                 _MODEL) = None,
    principle: _opt(Optional[str], "With the Principle GenRM (Qwen3-Nemotron-32B-GenRM-"
                    "Principle): the principle the response is judged against, e.g. "
                    "'correctness'; adds reward.", _MODEL) = None,
    principle_field: _opt(Optional[str], "With the Principle GenRM: the input field holding "
                          "each row's own principle.", _MODEL) = None,
    samples: _opt(int, "Judgements per row, combined by --votes.", _SAMPLING, min=1) = 1,
    votes: _opt(str, "How the samples of a row combine: 'mean' (the mean of the ones that "
                "parse; an unreadable row stays null, the scores stay on the model's scales) "
                "or 'nvidia' (NeMo Gym's aggregate_scores: an unreadable sample counts as 3/3/"
                "3.5, equal scores are broken by the ranking, then the mean; Principle GenRM: "
                "NeMo-RL's 0.0).", _SAMPLING) = "mean",
    temperature: _opt(Optional[float], "Sampling temperature (0: greedy) [default: 0.6, "
                      "NVIDIA's GenRM setting; 0 for the Principle GenRM, as NeMo-RL].",
                      _SAMPLING, min=0.0) = None,
    top_p: _opt(Optional[float], f"Nucleus sampling mass [default: {api.JUDGE_TOP_P}; 1 for the "
                "Principle GenRM].", _SAMPLING, min=0.0, max=1.0) = None,
    max_tokens: _opt(Optional[int], "Most tokens generated per judgement (reasoning included) "
                     f"[default: {api.JUDGE_MAX_TOKENS}; 200 for the Principle GenRM, as "
                     "NeMo-RL].", _SAMPLING, min=1) = None,
    seed: _opt(Optional[int], "Seed every request: the same row gives the same judgement, "
               "resumed or not.", _SAMPLING) = None,
    **options,
) -> None:
    """Judge responses with a generative reward model: it reasons, then scores.

    One response: helpfulness (1-5). Two (--response-field a --response-field b):
    helpfulness_1, helpfulness_2, ranking (1-6: 1 = the first is much better, 6 = the second
    is much better) and preferred (1 or 2). Adds nfb_row, nfb_error, judgement (the text after
    the reasoning) and judge_error (why a judgement could not be read).
    """

    _run(api.judge, "judge", dict(
        options, inputs=inputs, output=output, model=model, recipe=recipe, samples=samples,
        votes=votes, principle=principle, principle_field=principle_field,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
