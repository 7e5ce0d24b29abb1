"""The `nfb` command line. Parses options, builds a config, calls the library.

Exit codes: 0 done (also when the output is already complete), 1 the run failed,
2 bad usage (nothing loaded), 3 done but some rows have errors (only with --strict),
130 interrupted (progress is checkpointed; run the same command again to go on).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from nfb import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ROW_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

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


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    pass


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


# --- shared options -------------------------------------------------------------------------
Inputs = Annotated[list[str], typer.Argument(
    help="Input files: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, globs ('data/*.jsonl'), "
         "directories, or '-' for JSONL on stdin.", show_default=False)]
Output = Annotated[str, typer.Option(
    "--output", "-o", help="Output file: .parquet, .jsonl or .jsonl.gz (by extension), or '-' "
    "for JSONL on stdout.", show_default=False)]
PromptField = Annotated[str, typer.Option(help="Input field holding the prompt.",
                                          rich_help_panel="Input")]
ResponseField = Annotated[str, typer.Option(help="Input field holding the response.",
                                            rich_help_panel="Input")]
MessagesField = Annotated[Optional[str], typer.Option(
    help="Input field holding a list of {role, content} turns instead of prompt/response; "
         "the last turn must be the assistant response being judged.",
    rich_help_panel="Input")]
Limit = Annotated[Optional[int], typer.Option(
    min=1, help="Only the first N input rows.", rich_help_panel="Input")]
ShardOpt = Annotated[Optional[str], typer.Option(
    help="I/N: only rows whose number modulo N is I, for N machines; join with `nfb merge`.",
    rich_help_panel="Input")]
Revision = Annotated[Optional[str], typer.Option(help="Model revision (branch, tag or commit).",
                                                 rich_help_panel="Model")]
TP = Annotated[int, typer.Option("--tensor-parallel-size", "-tp", min=1,
                                 help="GPUs per model (tensor parallelism).",
                                 rich_help_panel="Engine")]
MaxModelLen = Annotated[Optional[int], typer.Option(
    min=16, help="Context length (prompt + output tokens); default: the model's.",
    rich_help_panel="Engine")]
GpuMem = Annotated[Optional[float], typer.Option(
    min=0.01, max=1.0, help="Fraction of GPU memory vLLM may use [default: 0.9 on GPU, 0.2 on "
    "CPU, where it sizes the KV cache from RAM].", rich_help_panel="Engine")]
Dtype = Annotated[str, typer.Option(help="Weights dtype: auto, bfloat16, float16, float32.",
                                    rich_help_panel="Engine")]
TrustRemote = Annotated[bool, typer.Option(
    help="Allow the model repository's own Python code to run (off: never runs remote code).",
    rich_help_panel="Engine")]
EnforceEager = Annotated[bool, typer.Option(help="Disable CUDA graphs / compilation.",
                                            rich_help_panel="Engine")]
MaxInFlight = Annotated[int, typer.Option(
    min=1, help="Requests kept in flight in the engine (bounds memory; the engine batches "
    "within it).", rich_help_panel="Engine")]
BatchRows = Annotated[int, typer.Option(
    min=1, help="Rows read, validated and tokenized together; also the smallest unit written "
    "to a checkpoint.", rich_help_panel="Engine")]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="Where vLLM runs: 'vllm' in this process, or 'ray' (Ray Data LLM: vLLM "
    "replicas on a Ray cluster; pip install 'nfb[ray]').", rich_help_panel="Engine")]
RayAddress = Annotated[Optional[str], typer.Option(
    help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray.",
    rich_help_panel="Engine")]
Replicas = Annotated[int, typer.Option(
    min=1, help="With --engine ray: vLLM replicas, each with --tensor-parallel-size GPUs.",
    rich_help_panel="Engine")]
RayBlockRows = Annotated[int, typer.Option(
    min=1, help="With --engine ray: rows per Ray Data job (engines start once per job).",
    rich_help_panel="Engine")]
Prefix = Annotated[str, typer.Option(
    help="Prefix for every column nfb adds, e.g. 'rm_' when the input already has them.",
    rich_help_panel="Output")]
Overwrite = Annotated[bool, typer.Option(
    help="Replace an existing output and discard an unfinished run's checkpoint.",
    rich_help_panel="Output")]
Strict = Annotated[bool, typer.Option(
    help="Exit 3 (instead of 0) when the run finished but some rows have nfb_error.",
    rich_help_panel="Output")]
CheckpointEvery = Annotated[float, typer.Option(
    min=0.0, help="Seconds between checkpoints at most (also one per 50,000 rows).",
    rich_help_panel="Output")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.",
                                     rich_help_panel="Output")]


# the options `feedback` and `score` share, passed on to _common_config by name
SHARED = ("inputs", "output", "model", "revision", "prompt_field", "response_field",
          "messages_field", "limit", "shard", "tensor_parallel_size", "max_model_len", "dtype",
          "trust_remote_code", "enforce_eager", "max_in_flight", "batch_rows", "engine",
          "ray_address", "replicas", "ray_block_rows", "prefix", "overwrite", "strict",
          "checkpoint_every")


def _shared(options: dict) -> dict:
    return {k: options[k] for k in SHARED}


def _common_config(task: str, inputs: list[str], output: str, *, model: str,
                   revision: str | None, prompt_field: str, response_field: str,
                   messages_field: str | None, limit: int | None, shard: str | None,
                   tensor_parallel_size: int, max_model_len: int | None, dtype: str,
                   trust_remote_code: bool, enforce_eager: bool, max_in_flight: int,
                   prefix: str, overwrite: bool, strict: bool, checkpoint_every: float,
                   batch_rows: int = 256, seed: int | None = None,
                   reward_token: str | None = None, engine: str = "vllm",
                   ray_address: str | None = None, replicas: int = 1,
                   ray_block_rows: int = 100_000, **extra):
    """Validate everything that needs no model; raise ConfigError/InputError."""
    from nfb.config import ConfigError, EngineConfig, RunConfig, Shard
    from nfb.io.readers import resolve_inputs
    from nfb.io.writers import output_format
    from nfb.modelinfo import check_model_path
    from nfb.records import FieldMap

    try:
        output_format(output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if prefix and not all(c.isalnum() or c in "_-." for c in prefix):
        raise ConfigError(f"--prefix {prefix!r}: use letters, digits, '_', '-' or '.'")
    if dtype not in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        raise ConfigError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    if engine not in ("vllm", "ray"):
        raise ConfigError(f"--engine {engine!r}: use vllm or ray")
    if engine == "ray":
        from nfb.engines.ray import check_ray
        check_ray()
    elif ray_address or replicas != 1:
        raise ConfigError("--ray-address and --replicas go with --engine ray")
    model = _resolve_model_alias(model)
    check_model_path(model)
    files = resolve_inputs(inputs)
    if output != "-" and any(os.path.abspath(f) == os.path.abspath(output) for f in files):
        raise ConfigError(f"the output {output} is also an input")
    engine_cfg = EngineConfig(
        model=model, revision=revision, tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len, dtype=dtype, trust_remote_code=trust_remote_code,
        enforce_eager=enforce_eager, seed=seed, reward_token=reward_token,
        max_in_flight=max_in_flight, backend=engine, ray_address=ray_address,
        replicas=replicas, ray_block_rows=ray_block_rows)
    return RunConfig(
        task=task, inputs=tuple(files), output=output, engine=engine_cfg,
        fields=FieldMap(prompt_field, response_field, messages_field),
        limit=limit, shard=Shard.parse(shard) if shard else None, prefix=prefix,
        overwrite=overwrite, strict=strict, checkpoint_seconds=checkpoint_every,
        batch_rows=batch_rows, **extra)


def _resolve_model_alias(model: str) -> str:
    if model == "demo":
        from nfb.demo import prepare_demo
        return str(prepare_demo(log=lambda m: err.print(m)))
    return model


def make_engine(engine_cfg, runner: str, gpu_memory_utilization: float | None):
    """Start the engine (the only place the CLI loads a model)."""
    from nfb.engines.vllm import VLLMEngine, on_cpu

    mem = gpu_memory_utilization
    if mem is None:
        mem = 0.2 if on_cpu() else 0.9
    if engine_cfg.backend == "ray":
        from nfb.engines.ray import RayEngine
        return RayEngine(engine_cfg, runner, mem)
    return VLLMEngine(engine_cfg, runner, mem)


def _execute(cfg, task, gpu_memory_utilization: float | None, quiet: bool) -> None:
    """Run the pipeline with a rich progress bar; map outcomes to exit codes."""
    from nfb.config import ConfigError
    from nfb.io.readers import InputError
    from nfb.modelinfo import ModelError
    from nfb.pipeline import Interrupted, RunError, run
    from nfb.progress import RichProgress, print_summary
    from nfb.workdir import ResumeError

    def factory():
        return make_engine(cfg.engine, "generate" if cfg.task == "feedback" else "pooling",
                           gpu_memory_utilization)

    progress = RichProgress(err, enabled=not quiet)
    try:
        result = run(cfg, task, factory, progress,
                     log=(lambda m: None) if quiet else (lambda m: err.print(m)))
    except (ConfigError, ResumeError) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except Interrupted as e:
        err.print(f"[yellow]{e}[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (InputError, ModelError, RunError, OSError) as e:
        raise _fail(str(e), EXIT_FAILED) from None
    if not quiet:
        print_summary(err, result, task.name)
    if cfg.strict and result.error_rows:
        raise typer.Exit(EXIT_ROW_ERRORS)


def _guard(fn):
    """Turn validation errors raised before the run into exit codes."""
    from nfb.config import ConfigError
    from nfb.io.readers import InputError
    from nfb.modelinfo import ModelError
    from nfb.tasks.reward import WeightsError

    try:
        return fn()
    except (ConfigError, WeightsError) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except (InputError, ModelError) as e:
        raise _fail(str(e), EXIT_FAILED) from None


# --- feedback -------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def feedback(
    inputs: Inputs,
    output: Output,
    model: Annotated[str, typer.Option(
        help="Feedback model: hub id, local directory, or 'demo' (SmolLM2-135M-Instruct, see "
             "`nfb demo`).", rich_help_panel="Model")] = "nvidia/Llama-3.3-Nemotron-70B-Feedback",
    revision: Revision = None,
    prompt_field: PromptField = "prompt",
    response_field: ResponseField = "response",
    messages_field: MessagesField = None,
    samples: Annotated[int, typer.Option(
        min=1, help="Feedback samples per row; adds per-sample lists and the mean level.",
        rich_help_panel="Sampling")] = 1,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="Sampling temperature (0: greedy).", rich_help_panel="Sampling")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.",
                                         rich_help_panel="Sampling")] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens generated per sample.",
                                            rich_help_panel="Sampling")] = 4096,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed every request: the same row gives the same text, resumed or not.",
        rich_help_panel="Sampling")] = None,
    constrain_level: Annotated[bool, typer.Option(
        help="Guide decoding so the text starts with 'The response is {level} helpful.' "
             "(for small models; the Nemotron model follows the format by itself).",
        rich_help_panel="Sampling")] = False,
    tensor_parallel_size: TP = 1,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: GpuMem = None,
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemote = False,
    enforce_eager: EnforceEager = False,
    max_in_flight: MaxInFlight = 1024,
    batch_rows: BatchRows = 256,
    engine: EngineOpt = "vllm",
    ray_address: RayAddress = None,
    replicas: Replicas = 1,
    ray_block_rows: RayBlockRows = 100_000,
    limit: Limit = None,
    shard: ShardOpt = None,
    prefix: Prefix = "",
    overwrite: Overwrite = False,
    strict: Strict = False,
    checkpoint_every: CheckpointEvery = 30.0,
    quiet: Quiet = False,
) -> None:
    """Judge each response with a generative feedback model (helpfulness level 1-5 + text).

    Adds nfb_row, nfb_error, feedback, feedback_level (1-5), feedback_label.
    """
    from nfb.config import SamplingConfig
    from nfb.tasks.feedback import FeedbackTask

    if top_p <= 0:
        raise _fail("--top-p must be above 0", EXIT_USAGE)
    if engine == "ray" and samples > 1:
        raise _fail("--samples > 1 is not available with --engine ray: Ray Data LLM returns one "
                    "sample per request", EXIT_USAGE)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                              seed=seed, samples=samples, constrain_level=constrain_level)
    opts = _shared(locals())
    cfg = _guard(lambda: _common_config("feedback", **opts, seed=seed, sampling=sampling))
    _guard(lambda: _check_context(cfg, max_tokens))
    _execute(cfg, FeedbackTask(sampling), gpu_memory_utilization, quiet)


def _check_context(cfg, max_tokens: int) -> None:
    """--max-tokens must leave room for a prompt (checked from the config, before loading)."""
    from nfb.config import ConfigError
    from nfb.modelinfo import read_model_info

    if not os.path.isdir(cfg.engine.model):
        return  # a hub id: the engine checks once it has the config
    info = read_model_info(cfg.engine.model, cfg.engine.revision, cfg.engine.trust_remote_code)
    ctx = cfg.engine.max_model_len or info.max_position_embeddings
    if ctx and max_tokens >= ctx:
        raise ConfigError(f"--max-tokens {max_tokens} leaves no room for a prompt in a "
                          f"{ctx}-token context: lower it, or raise --max-model-len")


# --- score ----------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def score(
    inputs: Inputs,
    output: Output,
    model: Annotated[str, typer.Option(
        help="Reward model in Hugging Face format: a *ForSequenceClassification model (one "
             "regression head per attribute, or one for a scalar reward), or a causal LM with "
             "--reward-token.", rich_help_panel="Model", show_default=False)],
    weights: Annotated[Optional[str], typer.Option(
        help="How attributes combine into `reward`: a preset (llama3-70b-steerlm, "
             "nemotron-4-340b), one weight per head ('0,0,0,0,0.65,0.8,0.45,0.55,-0.4'), or "
             "name=value pairs ('helpfulness=1,verbosity=-0.3'; unnamed heads weigh 0). "
             "Default for the 9 SteerLM heads: llama3-70b-steerlm.",
        rich_help_panel="Reward")] = None,
    attributes: Annotated[Optional[str], typer.Option(
        help="Comma list naming the heads, in order (default: the config's id2label, or the "
             "SteerLM names for 9 heads).", rich_help_panel="Reward")] = None,
    reward_token: Annotated[Optional[str], typer.Option(
        help="Score with a causal LM: the reward is the raw logit of this token (a token "
             "string, or a token id such as 0 for Llama-3.1-Nemotron-70B-Reward-HF) after the "
             "conversation (vLLM's classifier_from_token).", rich_help_panel="Reward")] = None,
    revision: Revision = None,
    prompt_field: PromptField = "prompt",
    response_field: ResponseField = "response",
    messages_field: MessagesField = None,
    tensor_parallel_size: TP = 1,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: GpuMem = None,
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemote = False,
    enforce_eager: EnforceEager = False,
    max_in_flight: MaxInFlight = 1024,
    batch_rows: BatchRows = 256,
    engine: EngineOpt = "vllm",
    ray_address: RayAddress = None,
    replicas: Replicas = 1,
    ray_block_rows: RayBlockRows = 100_000,
    limit: Limit = None,
    shard: ShardOpt = None,
    prefix: Prefix = "",
    overwrite: Overwrite = False,
    strict: Strict = False,
    checkpoint_every: CheckpointEvery = 30.0,
    quiet: Quiet = False,
) -> None:
    """Score each conversation with a reward model: one column per attribute, plus `reward`.

    Adds nfb_row, nfb_error, one float column per head (e.g. helpfulness ... verbosity) and
    reward (the weighted sum; for a scalar model, its output).
    """
    attrs = [a.strip() for a in attributes.split(",")] if attributes else None
    opts = _shared(locals())
    cfg = _guard(lambda: _common_config(
        "score", **opts, reward_token=reward_token, weights=weights,
        attributes=tuple(attrs) if attrs else None))
    task = _guard(lambda: build_score_task(cfg, weights, attrs))
    _execute(cfg, task, gpu_memory_utilization, quiet)


def build_score_task(cfg, weights: str | None, attrs: list[str] | None):
    """Read the model's heads from its config and fit --weights/--attributes to them."""
    from nfb.config import ConfigError
    from nfb.modelinfo import read_model_info
    from nfb.tasks.reward import (
        STEERLM_ATTRIBUTES,
        ScoreTask,
        attribute_names,
        parse_weights,
        resolve_weights,
    )

    parsed = parse_weights(weights) if weights else None
    info = read_model_info(cfg.engine.model, cfg.engine.revision, cfg.engine.trust_remote_code)
    if cfg.engine.reward_token is not None:
        if info.is_classifier:
            raise ConfigError("--reward-token is for causal LMs; this model already has a "
                              "classification head")
        heads = 1
    elif not info.is_classifier:
        raise ConfigError(
            f"{cfg.engine.model} is not a sequence-classification reward model "
            f"({', '.join(info.architectures) or 'unknown architecture'}). For a causal LM "
            "whose reward is one token's logit (e.g. Llama-3.1-Nemotron-70B-Reward-HF), pass "
            "--reward-token; for a feedback model use `nfb feedback`.")
    else:
        heads = info.num_heads
    if heads == 1:
        if parsed is not None or attrs:
            raise ConfigError("this model has a single output, which is the reward itself: "
                              "--weights and --attributes do not apply")
        return ScoreTask(None, None)
    names = attribute_names(heads, info.id2label, attrs)
    if parsed is None:
        if tuple(names) != STEERLM_ATTRIBUTES:
            raise ConfigError(f"this model has {heads} heads ({', '.join(names)}): say how they "
                              "combine into `reward` with --weights")
        parsed = parse_weights("llama3-70b-steerlm")
    return ScoreTask(names, resolve_weights(parsed, names))


