"""Frozen, resolved settings of a run, and the fingerprint of everything that changes its rows.

One owner per setting:
- `EngineConfig`: where and how the model runs. Only `result_key()` (model, revision, dtype,
  context length, head overrides) changes results; tensor and data parallelism, memory, the
  in-flight window, Ray placement and fault handling do not, so a resumed run may use another
  layout.
- the task (`nfb.tasks`): what the model sees and how outputs become columns; its
  `settings()` hold resolved values (the weight vector, not the spelling of `--weights`;
  the sampling parameters; the prompt), so two spellings of one run are one run.
- `RunConfig`: inputs, fields, row selection and output. `batch_rows`, `part_rows` and
  `checkpoint_seconds` only cut the work into pieces and never change the output, so they
  stay out of the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field, replace

import orjson

from nfb import __version__
from nfb.errors import (
    ConfigError,  # noqa: F401  (re-exported: the first release's name)
    UsageError,
)
from nfb.records import FieldMap


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None   # None: 0.9 on a GPU, 0.2 on a CPU
    dtype: str = "auto"
    trust_remote_code: bool = False
    enforce_eager: bool = False
    # vLLM hf_overrides, e.g. a causal LM read as a classifier on one token's logit
    hf_overrides: dict | None = field(default=None, hash=False)
    enable_prefix_caching: bool | None = None     # None: vLLM's default
    max_in_flight: int = 1024                     # requests kept in flight in the engine
    backend: str = "vllm"                         # "vllm" in-process, "ray", or a registered one
    ray_address: str | None = None
    replicas: int = 1
    data_parallel: int = 1                        # in-process vLLM replicas (resolved -dp)
    ray_block_rows: int = 100_000
    engine_restarts: int = 0                      # restarts after an engine death, per run
    stall_timeout: float = 600.0                  # seconds without progress = a stalled engine

    def result_key(self) -> dict:
        return {"model": self.model, "revision": self.revision, "dtype": self.dtype,
                "max_model_len": self.max_model_len, "hf_overrides": self.hf_overrides}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int | None = None
    samples: int = 1
    regex: str | None = None     # guided decoding: the text must match this regex


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise UsageError(f"--shard {text!r}: write it as I/N, e.g. 0/4 (I counts from 0)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or i >= n:
            raise UsageError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]         # resolved files, or ("-",)
    output: str                     # path, or "-" for JSONL on stdout
    engine: EngineConfig
    fields: FieldMap = field(default_factory=FieldMap)
    prefix: str = ""
    limit: int | None = None
    shard: Shard | None = None
    overwrite: bool = False
    batch_rows: int = 256           # rows read per chunk (never changes the output)
    part_rows: int = 50_000         # rows per checkpoint part, at most (never changes it)
    checkpoint_seconds: float = 30.0


def _input_identity(path: str) -> dict:
    if path == "-":
        return {"path": "-"}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def result_spec(cfg: RunConfig, task_name: str, task_settings: dict) -> dict:
    """Everything that changes the rows of the result (the fingerprint's input)."""
    return {
        "task": task_name,
        "engine": cfg.engine.result_key(),
        "fields": asdict(cfg.fields),
        "prefix": cfg.prefix,
        "limit": cfg.limit,
        "shard": str(cfg.shard) if cfg.shard else None,
        "settings": task_settings,
    }


def fingerprint(cfg: RunConfig, task_name: str, task_settings: dict) -> str:
    spec = result_spec(cfg, task_name, task_settings)
    spec["inputs"] = [_input_identity(p) for p in cfg.inputs]
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def provenance(cfg: RunConfig, task_name: str, task_settings: dict,
               extra: dict | None = None) -> dict:
    """What the output's footer says about how it was made."""
    out = {
        "nfb_version": __version__,
        "task": task_name,
        "model": cfg.engine.model,
        "revision": cfg.engine.revision,
        "dtype": cfg.engine.dtype,
        "max_model_len": cfg.engine.max_model_len,
        "hf_overrides": cfg.engine.hf_overrides,
        "tensor_parallel_size": cfg.engine.tensor_parallel_size,
        "data_parallel": cfg.engine.data_parallel,
        "fields": asdict(cfg.fields),
        "prefix": cfg.prefix,
        "inputs": list(cfg.inputs),
        "limit": cfg.limit,
        "shard": str(cfg.shard) if cfg.shard else None,
        "task_settings": task_settings,
        "prompt": task_settings.get("prompt"),
        "sampling": task_settings.get("sampling"),
        "weights": task_settings.get("weights"),
        "fingerprint": fingerprint(cfg, task_name, task_settings),
        # the same run without --shard: shards of one job share it, and their merge carries
        # it, so the unsharded command sees the merge as complete
        "settings_fingerprint": fingerprint(replace(cfg, shard=None), task_name, task_settings),
    }
    if extra:
        out.update(extra)
    return out
