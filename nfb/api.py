"""The one-call Python API. The CLI calls exactly these functions.

    import nfb
    result = nfb.feedback("data.jsonl", "out.parquet")   # Llama-3.3-Nemotron-70B-Feedback
    result = nfb.score("data.jsonl", "scored.parquet", model="nvidia/Llama-3.3-Nemotron-70B-Reward")
    result = nfb.judge("pairs.jsonl", "judged.parquet", response_field=["chosen", "rejected"])
    nfb.filter("scored.parquet", "kept.parquet", min_reward=0.5)

Options are keyword-only and named like the CLI flags (`--max-tokens` is `max_tokens=`).
Errors are `nfb.errors.NfbError` subclasses, each carrying the exit code the CLI ends with.
Engine choice and its defaults, tasks built from what the model is, context checks and
engine capability checks all happen here, before any model loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields

from nfb.config import EngineConfig, RunConfig, SamplingConfig, Shard
from nfb.errors import UsageError
from nfb.io.storage import is_url
from nfb.models.modelinfo import ModelFacts
from nfb.run.pipeline import Progress, RunResult, run
from nfb.tasks.feedback import CONSTRAINED_REGEX, DEFAULT_MODEL, FeedbackTask
from nfb.tasks.judge import DEFAULT_MODEL as JUDGE_MODEL
from nfb.tasks.judge import MAX_TOKENS as JUDGE_MAX_TOKENS
from nfb.tasks.judge import TEMPERATURE as JUDGE_TEMPERATURE
from nfb.tasks.judge import TOP_P as JUDGE_TOP_P
from nfb.verbs.filters import filter_rows as filter  # noqa: A001,F401
from nfb.verbs.merge import merge  # noqa: F401
from nfb.verbs.stats import stats  # noqa: F401

DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")


def _inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        return [str(inputs)]
    return [str(i) for i in inputs]


def _resolve_model(model: str, log: Callable[[str], None]) -> str:
    from nfb.models.modelinfo import check_model_path

    model = str(model)
    if model == "demo":
        from nfb.models.demo import prepare_demo
        return str(prepare_demo(log=log))
    check_model_path(model)
    return os.path.expanduser(model)


@dataclass(frozen=True)
class RunOptions:
    """The run settings `feedback`, `score` and `judge` share: their keyword arguments of the
    same names, gathered once (`RunOptions.of(locals())`) and turned into a RunConfig by
    `_run_config`."""

    model: str
    revision: str | None = None
    prompt_field: str = "prompt"
    response_field: str | Sequence[str] | None = "response"
    responses_field: str | None = None
    messages_field: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    enforce_eager: bool | None = None
    max_in_flight: int = 1024
    batch_rows: int = 256
    engine: str = "vllm"
    ray_address: str | None = None
    replicas: int = 1
    ray_block_rows: int | None = None
    engine_restarts: int = 0
    stall_timeout: float = 600.0
    data_parallel: int | str = "auto"
    limit: int | None = None
    shard: str | Shard | None = None
    prefix: str = ""
    overwrite: bool = False
    checkpoint_every: float = 30.0
    too_long: str = "error"
    max_line_bytes: int | None = None

    @classmethod
    def of(cls, arguments: dict) -> RunOptions:
        """The shared settings among a call's arguments (its `locals()` before anything else)."""
        return cls(**{f.name: arguments[f.name] for f in dataclass_fields(cls)
                      if f.name in arguments})


def _run_config(inputs, output, o: RunOptions, *, enable_prefix_caching: bool | None = None,
                log: Callable[[str], None] = lambda _m: None) -> RunConfig:
    """Check everything that needs no model (exit 2 / 1 before loading) and build the config."""
    model, max_line_bytes, data_parallel = o.model, o.max_line_bytes, o.data_parallel
    from nfb.engines import check_engine
    from nfb.io.readers import resolve_inputs
    from nfb.io.writers import output_format
    output = str(output)
    fields = _fields(o.prompt_field, o.response_field, o.responses_field, o.messages_field)
    if enable_prefix_caching is None and (fields.responses or fields.responses_list):
        enable_prefix_caching = True   # the responses of a row share their prompt
    try:
        output_format(output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if o.prefix and not all(c.isalnum() or c in "_-." for c in o.prefix):
        raise UsageError(f"--prefix {o.prefix!r}: use letters, digits, '_', '-' or '.'")
    if o.dtype not in DTYPES:
        raise UsageError(f"--dtype {o.dtype!r}: use auto, bfloat16, float16 or float32")
    for name, value, low in (("--tensor-parallel-size", o.tensor_parallel_size, 1),
                             ("--max-in-flight", o.max_in_flight, 1),
                             ("--batch-rows", o.batch_rows, 1), ("--replicas", o.replicas, 1),
                             ("--engine-restarts", o.engine_restarts, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}")
    if o.gpu_memory_utilization is not None and not 0 < o.gpu_memory_utilization <= 1:
        raise UsageError("--gpu-memory-utilization must be in (0, 1]")
    if o.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be above 0 seconds")
    from nfb.io.jsonl import MAX_LINE_BYTES
    from nfb.run.fit import POLICIES
    if o.too_long not in POLICIES:
        raise UsageError(f"--too-long {o.too_long!r}: use {', '.join(POLICIES)}")
    max_line_bytes = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    if max_line_bytes < 1:
        raise UsageError("--max-line-bytes must be at least 1")
    check_engine(o.engine)
    if o.ray_block_rows is not None:
        raise UsageError("--ray-block-rows is gone: --engine ray runs one Ray Data pipeline "
                         "per run, whose engines load once; drop the option")
    if o.engine != "ray" and (o.ray_address or o.replicas != 1):
        raise UsageError("--ray-address and --replicas go with --engine ray")
    model = _resolve_model(model, log)
    files = resolve_inputs(_inputs(inputs), exclude=output)
    if o.engine_restarts and "-" in files:
        raise UsageError("--engine-restarts needs input files: stdin cannot be read again "
                         "after an engine restart")
    check_run_output(output, files)
    if is_url(output):
        from nfb.io.storage import check_output
        check_output(output)
    from nfb.engines.replicas import resolve_data_parallel
    data_parallel = resolve_data_parallel(data_parallel, o.tensor_parallel_size, o.engine)
    engine_cfg = EngineConfig(
        model=model, revision=o.revision, tensor_parallel_size=o.tensor_parallel_size,
        max_model_len=o.max_model_len, gpu_memory_utilization=o.gpu_memory_utilization,
        dtype=o.dtype, trust_remote_code=o.trust_remote_code, enforce_eager=o.enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        max_in_flight=o.max_in_flight, backend=o.engine, ray_address=o.ray_address,
        replicas=o.replicas, engine_restarts=o.engine_restarts,
        stall_timeout=o.stall_timeout, data_parallel=data_parallel)
    return RunConfig(
        inputs=tuple(files), output=output, engine=engine_cfg,
        fields=fields,
        limit=o.limit, shard=Shard.parse(o.shard) if isinstance(o.shard, str) else o.shard,
        prefix=o.prefix, overwrite=o.overwrite, checkpoint_seconds=o.checkpoint_every,
        batch_rows=o.batch_rows, too_long=o.too_long, max_line_bytes=max_line_bytes)


def check_run_output(output: str, files: list[str]) -> None:
    """The output is never an input, and no input lives in the output's work directory."""
    from nfb.io.outputs import check_not_input, inside
    from nfb.run.workdir import workdir_for

    check_not_input(output, files)
    if output != "-":
        wd = workdir_for(output)
        for f in files:
            if f != "-" and inside(f, wd):
                raise UsageError(f"the input {f} lies in {wd}, where nfb keeps the output's "
                                 "checkpoint: move it, or choose another output")


def _fields(prompt_field: str, response_field: str | Sequence[str] | None,
            responses_field: str | None, messages_field: str | None):
    """Which input fields hold the conversation: one response, several named ones, or a list."""
    from nfb.records import FieldMap

    names = _response_names(response_field)
    if len(set(names)) != len(names):
        raise UsageError("--response-field names a field twice")
    if responses_field and (len(names) > 1 or names != ["response"]):
        raise UsageError("use --response-field or --responses-field, not both")
    if messages_field and (responses_field or len(names) > 1):
        raise UsageError("--messages-field judges the conversation's last turn: it does not "
                         "go with several responses")
    if responses_field:
        return FieldMap(prompt_field, "response", None, (), responses_field)
    if len(names) > 1:
        return FieldMap(prompt_field, names[0], None, tuple(names), None)
    return FieldMap(prompt_field, names[0], messages_field)


def _response_names(response_field: str | Sequence[str] | None) -> list[str]:
    """--response-field as a list of field names (default: response)."""
    names = [response_field] if isinstance(response_field, str) else list(response_field or [])
    return names or ["response"]


def for_fields(task, cfg: RunConfig):
    """Wrap a one-response task when rows hold several responses."""
    from nfb.tasks.multi import MultiResponse

    f = cfg.fields
    if f.responses_list:
        return MultiResponse(task, list_field=f.responses_list)
    if f.responses:
        return MultiResponse(task, names=f.responses)
    return task


def _facts(cfg: RunConfig) -> ModelFacts:
    """The run's one setup pass over its model: each fact read once, handed to every check."""
    return ModelFacts(cfg.engine.model, cfg.engine.revision, cfg.engine.trust_remote_code)


def _check_context(cfg: RunConfig, max_tokens: int, facts: ModelFacts) -> None:
    """--max-tokens must leave room for a prompt (from the config, before loading)."""
    if not facts.local:
        return  # a hub id: checked once the engine has the config
    ctx = cfg.engine.max_model_len or facts.info.max_position_embeddings
    if ctx and max_tokens >= ctx:
        raise UsageError(f"--max-tokens {max_tokens} leaves no room for a prompt in a "
                         f"{ctx}-token context: lower it, or raise --max-model-len")


def _sampling(engine: str, **kw) -> SamplingConfig:
    """How a generative task samples; an impossible value exits 2 before loading."""
    if not 0 < kw["top_p"] <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if kw["temperature"] < 0:
        raise UsageError("--temperature must be 0 or more")
    if kw["samples"] < 1 or kw["max_tokens"] < 1:
        raise UsageError("--samples and --max-tokens must be at least 1")
    return SamplingConfig(**kw)


def feedback(
    inputs: str | Sequence[str], output: str, *,
    model: str = DEFAULT_MODEL, revision: str | None = None,
    prompt_field: str = "prompt", response_field: str | Sequence[str] = "response",
    responses_field: str | None = None, messages_field: str | None = None,
    samples: int = 1, temperature: float = 0.7, top_p: float = 1.0, max_tokens: int = 4096,
    seed: int | None = None, constrain_level: bool = False,
    tensor_parallel_size: int = 1, max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None, dtype: str = "auto",
    trust_remote_code: bool = False, enforce_eager: bool | None = None,
    max_in_flight: int = 1024, batch_rows: int = 256,
    engine: str = "vllm", ray_address: str | None = None, replicas: int = 1,
    ray_block_rows: int | None = None, engine_restarts: int = 0, stall_timeout: float = 600.0,
    data_parallel: int | str = "auto",
    limit: int | None = None, shard: str | Shard | None = None, prefix: str = "",
    overwrite: bool = False, checkpoint_every: float = 30.0,
    too_long: str = "error", max_line_bytes: int | None = None,
    dry_run: bool = False, card: bool = False,
    progress: Progress | None = None, log: Callable[[str], None] | None = None,
) -> RunResult:
    """Judge each response with a generative feedback model: `feedback` (text),
    `feedback_level` (1-5), `feedback_label`; with samples > 1 also the per-sample lists and
    the mean level. Resumes an interrupted run with the same settings."""
    opts = RunOptions.of(locals())
    log = log or (lambda _m: None)
    sampling = _sampling(engine, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                         seed=seed, samples=samples,
                         regex=CONSTRAINED_REGEX if constrain_level else None)
    cfg = _run_config(inputs, output, opts,
                      enable_prefix_caching=True if samples > 1 else None, log=log)
    facts = _facts(cfg)
    _check_context(cfg, max_tokens, facts)
    task = FeedbackTask(sampling, recipe=_recipe("feedback", facts, None, log))
    return _go(cfg, for_fields(task, cfg), dry_run, card, progress, log, facts)


def _go(cfg: RunConfig, task, dry_run: bool, card: bool, progress: Progress | None,
        log: Callable[[str], None], facts: ModelFacts):
    """Run the task (or, with dry_run, plan it: `nfb.run.dryrun.DryRunResult`, no engine);
    with card, write the dataset card beside the finished output."""
    if dry_run:
        from nfb.run.dryrun import dry_run as plan
        return plan(cfg, task, log=log, facts=facts)
    if card:
        from nfb.verbs.card import check_card
        check_card(cfg.output)
    result = run(cfg, task, progress=progress, log=log)
    if card:
        from nfb.verbs.card import write_card
        result.card = write_card(cfg.output)
        log(f"dataset card: {result.card}")
    return result


def _recipe(verb: str, facts: ModelFacts, recipe: str | None, log: Callable[[str], None]):
    """The model's recipe for `nfb VERB` (recorded in the provenance), or None."""
    from nfb.run.setup import resolve_recipe

    return resolve_recipe(facts, recipe, verb, log=log)


def judge(
    inputs: str | Sequence[str], output: str, *,
    model: str = JUDGE_MODEL, recipe: str | None = None,
    revision: str | None = None,
    prompt_field: str = "prompt", response_field: str | Sequence[str] | None = "response",
    messages_field: str | None = None,
    principle: str | None = None, principle_field: str | None = None,
    samples: int = 1, votes: str = "mean", temperature: float | None = None,
    top_p: float | None = None, max_tokens: int | None = None, seed: int | None = None,
    tensor_parallel_size: int = 1, max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None, dtype: str = "auto",
    trust_remote_code: bool = False, enforce_eager: bool | None = None,
    max_in_flight: int = 1024, batch_rows: int = 256,
    engine: str = "vllm", ray_address: str | None = None, replicas: int = 1,
    ray_block_rows: int | None = None, engine_restarts: int = 0, stall_timeout: float = 600.0,
    data_parallel: int | str = "auto",
    limit: int | None = None, shard: str | Shard | None = None, prefix: str = "",
    overwrite: bool = False, checkpoint_every: float = 30.0,
    too_long: str = "error", max_line_bytes: int | None = None,
    dry_run: bool = False, card: bool = False,
    progress: Progress | None = None, log: Callable[[str], None] | None = None,
) -> RunResult:
    """Judge each row with a generative reward model (GenRM): it reasons, then scores.

    One response (`response_field="response"`, or `messages_field`): `helpfulness` (1-5).
    Two responses (`response_field=["a", "b"]`): `helpfulness_1`, `helpfulness_2`, `ranking`
    (1-6, below 3.5 prefers the first) and `preferred` (1 or 2). Always `judgement` (the text
    after the reasoning) and `judge_error` (why a judgement could not be read, else null).
    With samples > 1 the scores combine by `votes`: "mean" (default: the mean over the samples
    that parsed, `judge_votes`; the columns stay on the model's scales and an unreadable row
    stays null) or "nvidia" (NeMo Gym's aggregate_scores: fallback values for unreadable
    samples, ties broken by the ranking, then the mean).

    The Principle GenRM (nvidia/Qwen3-Nemotron-32B-GenRM-Principle) takes `principle` (or
    `principle_field`) and writes `reward`; its sampling defaults are NeMo-RL's (greedy, 200
    tokens)."""
    opts = RunOptions.of(locals())
    from nfb.tasks.judge import VOTES, JudgeTask

    log = log or (lambda _m: None)
    names = _response_names(response_field)
    if len(names) > 2:
        raise UsageError("a GenRM judges one response or two: give --response-field once or "
                         "twice")
    if votes not in VOTES:
        raise UsageError(f"--votes {votes!r}: use {' or '.join(VOTES)}")
    if principle is not None and not str(principle).strip():
        raise UsageError("--principle is empty")
    # a GenRM template puts its long instructions before every conversation
    cfg = _run_config(inputs, output, replace(opts, response_field=names),
                      enable_prefix_caching=True, log=log)
    facts = _facts(cfg)
    found = _judge_recipe(model, facts, recipe, len(names), log)
    if found is not None and found.task == "judge_principle":
        return _judge_principle(cfg, found, facts, principle=principle,
                                principle_field=principle_field, names=names, samples=samples,
                                votes=votes, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens, seed=seed, engine=engine,
                                dry_run=dry_run, card=card, progress=progress, log=log)
    if principle is not None or principle_field is not None:
        raise UsageError("--principle and --principle-field are for the Principle GenRM "
                         "(nvidia/Qwen3-Nemotron-32B-GenRM-Principle); pass --recipe "
                         "qwen3-nemotron-32b-genrm-principle if the model is a copy of it")
    sampling = _sampling(engine, temperature=JUDGE_TEMPERATURE if temperature is None
                         else temperature, top_p=JUDGE_TOP_P if top_p is None else top_p,
                         max_tokens=JUDGE_MAX_TOKENS if max_tokens is None else max_tokens,
                         seed=seed, samples=samples)
    _check_context(cfg, sampling.max_tokens, facts)
    _check_judge_template(facts, len(names))
    task = JudgeTask(sampling, fields=tuple(names), recipe=found,
                     context_limit=found.context_limit if found else None, votes=votes)
    return _go(cfg, task, dry_run, card, progress, log, facts)


def _judge_principle(cfg: RunConfig, found, facts: ModelFacts, *, principle, principle_field,
                     names, samples, votes, temperature, top_p, max_tokens, seed, engine,
                     dry_run, card, progress, log):
    """`nfb judge` with the Principle GenRM: checks before loading, then the run."""
    from nfb.tasks.principle import (
        GENRM_MAX_TOKENS,
        GENRM_TEMPERATURE,
        TOP_LOGPROBS,
        PrincipleJudgeTask,
    )

    if len(names) != 1:
        raise UsageError(f"{found.hub_id} judges one response against a principle: give "
                         f"--response-field once (card: {found.card})")
    if not principle and not principle_field:
        raise UsageError(f"{found.hub_id} judges a response against a principle: give "
                         "--principle TEXT or --principle-field FIELD")
    sampling = _sampling(engine, temperature=GENRM_TEMPERATURE if temperature is None
                         else temperature, top_p=1.0 if top_p is None else top_p,
                         max_tokens=GENRM_MAX_TOKENS if max_tokens is None else max_tokens,
                         seed=seed, samples=samples)
    sampling = replace(sampling, logprobs=TOP_LOGPROBS)
    _check_context(cfg, sampling.max_tokens, facts)
    task = PrincipleJudgeTask(sampling, principle=principle, principle_field=principle_field,
                              recipe=found, context_limit=found.context_limit, votes=votes)
    if facts.local:   # a hub id: checked once the engine has its tokenizer
        if facts.tokenizer is not None:
            task.check_tokenizer(facts.tokenizer)
    return _go(cfg, task, dry_run, card, progress, log, facts)


def _judge_recipe(name: str, facts: ModelFacts, recipe: str | None, responses: int,
                  log: Callable[[str], None]):
    """The GenRM's recipe, or None (generic path); it must judge this many responses."""
    found = _recipe("judge", facts, recipe, log)
    if found is None:
        log(f"note: no nfb recipe for {name}: generic path (its chat template must know the "
            "roles response_1 and response_2); `nfb models` lists the GenRMs nfb knows")
    elif responses not in found.responses:
        raise UsageError(
            f"{found.hub_id} judges two responses at once: name them with --response-field A "
            f"--response-field B (card: {found.card})" if found.responses == (2,) else
            f"{found.hub_id} judges {' or '.join(map(str, found.responses))} response(s), "
            f"not {responses} (card: {found.card})")
    return found


def _check_judge_template(facts: ModelFacts, responses: int) -> None:
    """Before loading, for a local model: its chat template must render the response roles
    (a GenRM's does; another model's drops them or fails, which would judge nothing). A hub
    id's template is checked once the engine has its tokenizer (JudgeTask.check_tokenizer)."""
    from nfb.tasks.judge import check_template

    tok = facts.tokenizer if facts.local else None
    if tok is None:
        return
    why = check_template(tok, responses)
    if why:
        raise UsageError(f"{facts.model}: {why}: is this a generative reward model?")


def _card_context(cfg: RunConfig, limit: int | None, facts: ModelFacts,
                  log: Callable[[str], None]) -> RunConfig:
    """A local model whose config.json states no context length runs with its card's (the
    recipe's context_limit) unless --max-model-len is given: transformers would otherwise fill
    in its class default (2,048 for Llama), which would refuse rows the card allows."""
    model = cfg.engine.model
    if not limit or cfg.engine.max_model_len or not facts.local or facts.context is not None:
        return cfg
    log(f"note: {model}'s config states no context length: the card's {limit:,} tokens")
    return replace(cfg, engine=replace(cfg.engine, max_model_len=limit))


def score(
    inputs: str | Sequence[str], output: str, *,
    model: str, weights: str | Sequence[float] | dict | None = None,
    attributes: str | Sequence[str] | None = None, reward_token: str | int | None = None,
    prompt_format: str | None = None, recipe: str | None = None,
    principle: str | Sequence[str] | None = None, principle_field: str | None = None,
    revision: str | None = None,
    prompt_field: str = "prompt", response_field: str | Sequence[str] = "response",
    responses_field: str | None = None, messages_field: str | None = None,
    tensor_parallel_size: int = 1, max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None, dtype: str = "auto",
    trust_remote_code: bool = False, enforce_eager: bool | None = None,
    max_in_flight: int = 1024, batch_rows: int = 256,
    engine: str = "vllm", ray_address: str | None = None, replicas: int = 1,
    ray_block_rows: int | None = None, engine_restarts: int = 0, stall_timeout: float = 600.0,
    data_parallel: int | str = "auto",
    limit: int | None = None, shard: str | Shard | None = None, prefix: str = "",
    overwrite: bool = False, checkpoint_every: float = 30.0,
    too_long: str = "error", max_line_bytes: int | None = None,
    dry_run: bool = False, card: bool = False,
    progress: Progress | None = None, log: Callable[[str], None] | None = None,
) -> RunResult:
    """Score each conversation with a reward model: one float column per head (attribute)
    and `reward`, their weighted sum (a scalar model's output is `reward` itself)."""
    opts = RunOptions.of(locals())
    from nfb.run.setup import score_task

    log = log or (lambda _m: None)
    if isinstance(attributes, str):
        attributes = [a.strip() for a in attributes.split(",")]
    if weights is not None and not isinstance(weights, str):
        weights = ",".join(f"{k}={v}" for k, v in weights.items()) if isinstance(weights, dict) \
            else ",".join(str(w) for w in weights)
    cfg = _run_config(inputs, output, opts, log=log)
    if isinstance(principle, str):
        principle = [principle]
    principle = list(principle or [])
    if any(not p.strip() for p in principle):
        raise UsageError("--principle is empty")
    facts = _facts(cfg)
    task, hf_overrides = score_task(
        facts, weights=weights, attributes=list(attributes) if attributes else None,
        reward_token=None if reward_token is None else str(reward_token),
        prompt_format=prompt_format, recipe=recipe, principle=principle or None,
        principle_field=principle_field, log=log)
    if hf_overrides:
        cfg = replace(cfg, engine=replace(cfg.engine, hf_overrides=hf_overrides))
    cfg = _card_context(cfg, task.context_limit, facts, log)
    if task.shares_prefixes:       # e.g. every principle of a row repeats the conversation
        cfg = replace(cfg, engine=replace(cfg.engine, enable_prefix_caching=True))
    return _go(cfg, for_fields(task, cfg), dry_run, card, progress, log, facts)


_LAZY = {   # name -> (module, attribute): what needs more than pyarrow loads on first use
    "pairs": ("nfb.verbs.pairs", "pairs"),
    "evaluate": ("nfb.verbs.evaluate", "evaluate"),
    "report": ("nfb.verbs.report", "report"),
    "convert": ("nfb.models.nemo", "convert_nemo"),
    "prepare_demo": ("nfb.models.demo", "prepare_demo"),      # `nfb demo`, `--model demo`
    "RECIPES": ("nfb.models.recipes", "RECIPES"),              # the model table (`nfb models`)
    "recipe_table": ("nfb.models.recipes", "table"),
    "RECIPE_VERBS": ("nfb.run.setup", "VERBS"),                # recipe task -> nfb command
    "STATS_QUANTILES": ("nfb.verbs.stats", "QNAMES"),
    "FEEDBACK_LABELS": ("nfb.tasks.feedback", "LABELS"),    # level -> its word
}


def __getattr__(name: str):
    """The verbs, the model table and the constants the CLI shows, loaded on first use."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nfb.api' has no attribute {name!r}")
