"""Ray Data LLM: the same rows, prompts and parsing as in-process, run by vLLM replicas on a
Ray cluster (`ray.data.llm.vLLMEngineProcessorConfig` + `build_processor`).

nfb's pipeline stays the driver: it reads, validates, renders and length-checks rows exactly
as in-process, and writes its checkpoint parts, so resume and error rows behave the same.
Requests go to Ray in blocks of `ray_block_rows`; each block is one Ray Data job in which
Ray schedules `replicas` vLLM engines (each with its own tensor parallelism) and streams the
results back. Engines start once per block, so blocks should be large.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nfb.config import EngineConfig, SamplingConfig
from nfb.engines.base import Request
from nfb.engines.vllm import engine_kwargs, sampling_kwargs
from nfb.errors import UsageError

INSTALL = "pip install 'nfb[ray]'   (ray[data])"


def check_ray() -> None:
    """Fail fast (exit 2) when Ray Data LLM is not installed."""
    try:
        import ray  # noqa: F401
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data: {INSTALL}") from None


class RayEngine:
    """Engine protocol over Ray Data LLM processors."""

    def __init__(self, cfg: EngineConfig, runner: str):
        import ray
        from transformers import AutoTokenizer

        from nfb.models.modelinfo import read_model_info

        self.cfg = cfg
        self.runner = runner
        self._own_ray = not ray.is_initialized() and cfg.ray_address is None
        if not ray.is_initialized():
            import logging

            from nfb.logs import verbose
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True,
                     logging_level=logging.INFO if verbose() else logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # nfb draws its own
        from nfb.logs import verbose
        if not verbose():  # Ray Data's INFO lines (plans, "execution finished") are not nfb's
            import logging
            for name in ("ray", "ray.data", "ray._private"):
                logging.getLogger(name).setLevel(logging.ERROR)
            ctx.print_on_execution_start = False
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        info = read_model_info(cfg.model, cfg.revision, cfg.trust_remote_code)
        self.max_model_len: int = cfg.max_model_len or info.max_position_embeddings or 4096
        kwargs = engine_kwargs(cfg, runner)
        kwargs["max_model_len"] = self.max_model_len
        self.engine_kwargs = kwargs
        gpus = ray.cluster_resources().get("GPU", 0)
        # a cluster without GPUs (CPU vLLM): one CPU bundle per tensor-parallel worker
        self.placement = None if gpus else {
            "bundles": [{"CPU": 1} for _ in range(cfg.tensor_parallel_size)]}

    def _processor(self, task_type: str, preprocess: Callable, postprocess: Callable):
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        config = vLLMEngineProcessorConfig(
            model_source=self.cfg.model,
            task_type=task_type,
            engine_kwargs=self.engine_kwargs,
            concurrency=self.cfg.replicas,
            batch_size=min(256, max(1, self.cfg.max_in_flight)),
            placement_group_config=self.placement,
            log_engine_metrics=False,
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        )
        return build_processor(config, preprocess=preprocess, postprocess=postprocess)

    def _blocks(self, requests: Iterable[Request]) -> Iterator[list[Request]]:
        block: list[Request] = []
        for req in requests:
            block.append(req)
            if len(block) >= self.cfg.ray_block_rows:
                yield block
                block = []
        if block:
            yield block

    def _run(self, requests: Iterable[Request], processor) -> Iterator[tuple[Any, Any]]:
        import ray

        for block in self._blocks(requests):
            items = [{"nfb_i": i, "tokenized_prompt": list(ids)}
                     for i, (_, ids) in enumerate(block)]
            for row in processor(ray.data.from_items(items)).iter_rows():
                yield block[int(row["nfb_i"])][0], row["nfb_value"]

    def generate(self, requests: Iterable[Request], sampling: SamplingConfig,
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[str]]]:
        params = sampling_kwargs(sampling)
        if params.get("seed") is None:
            params.pop("seed")
        processor = self._processor(
            "generate",
            preprocess=lambda r: {"nfb_i": r["nfb_i"], "tokenized_prompt": r["tokenized_prompt"],
                                  "sampling_params": dict(params)},
            postprocess=lambda r: {"nfb_i": r["nfb_i"], "nfb_value": r["generated_text"]})
        for key, text in self._run(requests, processor):
            yield key, [text]

    def classify(self, requests: Iterable[Request],
                 can_feed: Callable[[], bool]) -> Iterator[tuple[Any, list[float]]]:
        processor = self._processor(
            "classify",
            preprocess=lambda r: {"nfb_i": r["nfb_i"], "tokenized_prompt": r["tokenized_prompt"],
                                  "pooling_params": {"use_activation": False}},
            postprocess=lambda r: {"nfb_i": r["nfb_i"],
                                   "nfb_value": [float(x) for x in r["embeddings"]]})
        for key, heads in self._run(requests, processor):
            yield key, list(heads)

    def close(self) -> None:
        import ray

        if self._own_ray and ray.is_initialized():  # a local instance this run started
            ray.shutdown()
