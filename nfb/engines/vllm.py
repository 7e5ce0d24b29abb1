"""vLLM in-process: tensor parallel, fed continuously with a bounded window in flight.

Requests go straight to `LLM.llm_engine` (add_request / step) as token ids that nfb
rendered and length-checked itself, so no row is tokenized twice and the engine never
waits for a batch boundary: as one request finishes, the next one is added.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nfb.config import EngineConfig, SamplingConfig
from nfb.engines.base import Request

# vLLM logs to stdout by default; nfb keeps stdout for data.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


class _DropRawPromptNotice(logging.Filter):
    """nfb hands vLLM token ids it rendered and length-checked itself, on purpose; vLLM 0.32
    warns that raw prompts are deprecated in favour of its Renderer, which would tokenize
    every row a second time. The notice says nothing to an nfb user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing raw prompts to InputProcessor" not in record.getMessage()


logging.getLogger("vllm.v1.engine.input_processor").addFilter(_DropRawPromptNotice())


def on_cpu() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def _cpu_thread_binding(tp: int) -> str:
    cores = list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // tp)
    groups = [cores[i * per:(i + 1) * per] or cores[-1:] for i in range(tp)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def token_classifier_overrides(model: str, token: str, trust_remote_code: bool,
                               revision: str | None = None) -> dict:
    """hf_overrides that make vLLM read one token's logit as a 1-head classifier.

    This is vLLM's own route for causal LMs used as scorers (`classifier_from_token` with
    method `no_post_processing`): the head's weight is that token's row of lm_head.
    """
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code,
                                     revision=revision)
    if token.isdigit():  # a token id, e.g. 0 for Llama-3.1-Nemotron-70B-Reward-HF
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code,
                                            revision=revision)
        token = tok.convert_ids_to_tokens(int(token))
    archs = [a.replace("ForCausalLM", "ForSequenceClassification")
             for a in (cfg.architectures or [])]
    if not archs or not all(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{model}: --reward-token needs a *ForCausalLM model "
                         f"(found {cfg.architectures})")
    return {"architectures": archs, "classifier_from_token": [token],
            "method": "no_post_processing", "num_labels": 1}


def render_chats(tokenizer, conversations: list[list[dict[str, str]]],
                 add_generation_prompt: bool) -> list[list[int]]:
    """Token ids of each conversation through the chat template, as `LLM.chat` renders them
    (template to text, then one batched encode without extra special tokens)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
             for c in conversations]
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """SamplingParams arguments for a feedback run (shared by the in-process and Ray engines)."""
    kwargs: dict[str, Any] = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_tokens, seed=sampling.seed)
    if sampling.constrain_level:
        from nfb.tasks.feedback import CONSTRAINED_REGEX
        kwargs["structured_outputs"] = {"regex": CONSTRAINED_REGEX}
    return kwargs


def engine_kwargs(cfg: EngineConfig, runner: str, gpu_memory_utilization: float) -> dict:
    """vLLM engine arguments for `cfg` (shared by the in-process and Ray engines)."""
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision, tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
        seed=cfg.seed if cfg.seed is not None else 0)
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if runner == "generate" and on_cpu():
        # vLLM's CPU worker cannot rewind a seeded request's generator when a prompt's
        # prefill is split over steps ("CPU Generator does not use offset"); whole
        # prefills avoid it. GPUs keep chunked prefill.
        kwargs["enable_chunked_prefill"] = False
    if cfg.reward_token is not None:
        kwargs["hf_overrides"] = token_classifier_overrides(
            cfg.model, cfg.reward_token, cfg.trust_remote_code, cfg.revision)
    return kwargs


class VLLMEngine:
    """One vLLM `LLM` for a run: 'generate' for feedback, 'pooling' for score."""

    def __init__(self, cfg: EngineConfig, runner: str, gpu_memory_utilization: float | None):
        if cfg.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ \
                and on_cpu():
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_thread_binding(cfg.tensor_parallel_size)
        from vllm import LLM

        self.cfg = cfg
        self.runner = runner
        self.llm = LLM(model=cfg.model, runner=runner,
                       **engine_kwargs(cfg, runner, gpu_memory_utilization))
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        mc = self.llm.llm_engine.model_config
        self.max_model_len: int = mc.max_model_len
        hf = mc.hf_config
        self.id2label = dict(getattr(hf, "id2label", None) or {}) or None
        self.num_heads = int(getattr(hf, "num_labels", 1) or 1) if runner == "pooling" else 0
        self._ids = itertools.count()

    # --- prompts -------------------------------------------------------------------------
    def encode_chats(self, conversations: list[list[dict[str, str]]],
                     add_generation_prompt: bool) -> list[list[int]]:
        return render_chats(self.tokenizer, conversations, add_generation_prompt)

    # --- streaming -----------------------------------------------------------------------
    def _stream(self, requests: Iterable[Request], params: Any,
                can_feed: Callable[[], bool]) -> Iterator[tuple[Any, Any]]:
        from vllm.inputs import TokensPrompt

        engine = self.engine
        window = max(1, self.cfg.max_in_flight)
        inflight: dict[str, Any] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < window and can_feed():
                    try:
                        key, ids = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    rid = f"nfb-{next(self._ids)}"
                    engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
                    inflight[rid] = key
                if not inflight:
                    if exhausted:
                        return
                    continue  # the caller drained its buffer; feed again
                for out in engine.step():
                    if out.finished:
                        yield inflight.pop(out.request_id), out
        finally:
            if inflight:  # interrupted: leave the engine clean
                try:
                    engine.abort_request(list(inflight))
                except Exception:  # noqa: BLE001 - best effort during shutdown
                    pass

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = sampling_kwargs(sampling)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        params = SamplingParams(n=sampling.samples, output_kind=RequestOutputKind.FINAL_ONLY,
                                **kwargs)
        for key, out in self._stream(requests, params, can_feed):
            yield key, [c.text for c in sorted(out.outputs, key=lambda c: c.index)]

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        from vllm import PoolingParams

        # raw head outputs: no softmax/sigmoid on regression heads
        params = PoolingParams(task="classify", use_activation=False)
        for key, out in self._stream(requests, params, can_feed):
            yield key, [float(x) for x in out.outputs.data.float().tolist()]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
