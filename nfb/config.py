"""Frozen configuration of a run and its fingerprint.

The fingerprint hashes everything that changes the result (task, model, prompt, sampling,
weights, fields, inputs, row selection) and nothing that does not (tensor parallel size,
memory fraction, batch sizes), so a resumed run may use a different GPU layout.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field, replace

import orjson

from nfb import __version__
from nfb.records import FieldMap


from nfb.errors import ConfigError  # noqa: E402,F401


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    trust_remote_code: bool = False
    enforce_eager: bool = False
    seed: int | None = None
    # score: turn a causal LM into a 1-head classifier on this token's logit (vLLM hf_overrides)
    reward_token: str | None = None
    # requests kept in flight in the engine
    max_in_flight: int = 1024
    # where the engine runs: "vllm" in-process, or "ray" (Ray Data LLM over a cluster)
    backend: str = "vllm"
    ray_address: str | None = None
    replicas: int = 1
    ray_block_rows: int = 100_000

    def result_key(self) -> dict:
        return {"model": self.model, "revision": self.revision, "dtype": self.dtype,
                "max_model_len": self.max_model_len, "reward_token": self.reward_token}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int | None = None
    samples: int = 1
    constrain_level: bool = False


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ConfigError(f"--shard {text!r}: write it as I/N, e.g. 0/4 (I counts from 0)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or i >= n:
            raise ConfigError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunConfig:
    task: str                       # "feedback" | "score"
    inputs: tuple[str, ...]         # resolved files, or ("-",)
    output: str                     # path, or "-" for JSONL on stdout
    engine: EngineConfig
    fields: FieldMap = field(default_factory=FieldMap)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    weights: str | None = None      # score: the --weights text
    attributes: tuple[str, ...] | None = None
    prefix: str = ""
    limit: int | None = None
    shard: Shard | None = None
    overwrite: bool = False
    batch_rows: int = 256           # rows read per chunk
    part_rows: int = 50_000         # rows per checkpoint part, at most
    checkpoint_seconds: float = 30.0
    strict: bool = False            # exit 3 when some rows ended with errors


def _input_identity(path: str) -> dict:
    if path == "-":
        return {"path": "-"}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def result_spec(cfg: RunConfig, prompt: str | None) -> dict:
    """Everything that changes the rows of the result (the fingerprint's input)."""
    spec = {
        "task": cfg.task,
        "engine": cfg.engine.result_key(),
        "fields": asdict(cfg.fields),
        "prefix": cfg.prefix,
        "limit": cfg.limit,
        "shard": str(cfg.shard) if cfg.shard else None,
        "prompt": prompt,
    }
    if cfg.task == "feedback":
        spec["sampling"] = asdict(cfg.sampling)
    else:
        spec["weights"] = cfg.weights
        spec["attributes"] = list(cfg.attributes) if cfg.attributes else None
    return spec


def fingerprint(cfg: RunConfig, prompt: str | None) -> str:
    spec = result_spec(cfg, prompt)
    spec["inputs"] = [_input_identity(p) for p in cfg.inputs]
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def settings_fingerprint(cfg: RunConfig, prompt: str | None) -> str:
    """The fingerprint of the same run without --shard: shards of one job share it, and a
    merge of all shards carries it, so the unsharded command sees the merge as complete."""
    return fingerprint(replace(cfg, shard=None), prompt)


def provenance(cfg: RunConfig, prompt: str | None, extra: dict | None = None) -> dict:
    out = {
        "nfb_version": __version__,
        "task": cfg.task,
        "model": cfg.engine.model,
        "revision": cfg.engine.revision,
        "dtype": cfg.engine.dtype,
        "max_model_len": cfg.engine.max_model_len,
        "tensor_parallel_size": cfg.engine.tensor_parallel_size,
        "prompt": prompt,
        "fields": asdict(cfg.fields),
        "prefix": cfg.prefix,
        "inputs": list(cfg.inputs),
        "limit": cfg.limit,
        "shard": str(cfg.shard) if cfg.shard else None,
        "fingerprint": fingerprint(cfg, prompt),
        "settings_fingerprint": settings_fingerprint(cfg, prompt),
    }
    if cfg.task == "feedback":
        out["sampling"] = asdict(cfg.sampling)
    else:
        out["weights"] = cfg.weights
        out["reward_token"] = cfg.engine.reward_token
    if extra:
        out.update(extra)
    return out
