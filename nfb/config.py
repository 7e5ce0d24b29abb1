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

from nfb._version import __version__
from nfb.errors import (
    ConfigError,  # noqa: F401  (re-exported: the first release's name)
    UsageError,
)
from nfb.io.jsonl import MAX_LINE_BYTES
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
    enforce_eager: bool | None = None             # None: eager on a CPU, compiled on a GPU
    # vLLM hf_overrides, e.g. a causal LM read as a classifier on one token's logit
    hf_overrides: dict | None = field(default=None, hash=False)
    enable_prefix_caching: bool | None = None     # None: vLLM's default
    max_in_flight: int = 1024                     # requests kept in flight in the engine
    backend: str = "vllm"                         # "vllm" in-process, "ray", or a registered one
    ray_address: str | None = None
    replicas: int = 1
    data_parallel: int = 1                        # in-process vLLM replicas (resolved -dp)
    engine_restarts: int = 0                      # restarts after an engine death, per run
    stall_timeout: float = 600.0                  # seconds without progress = a stalled engine

    def result_key(self) -> dict:
        """The settings that change results; a local model directory by its normalised path
        (`./models/rm9` and `models/rm9` are one model; what is in it is `model_identity`)."""
        return {"model": model_key(self.model), "revision": self.revision, "dtype": self.dtype,
                "max_model_len": self.max_model_len, "hf_overrides": self.hf_overrides}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int | None = None
    samples: int = 1
    regex: str | None = None     # guided decoding: the text must match this regex
    logprobs: int | None = None  # top-k log-probabilities of each generated token (Principle
    #                              GenRM); the engine then yields `Sample`s, not texts

    def settings(self) -> dict:
        """The fingerprinted values (logprobs only when set: older runs keep theirs)."""
        out = asdict(self)
        if out["logprobs"] is None:
            del out["logprobs"]
        return out


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
    too_long: str = "error"         # a row over the budget: error | drop-context | truncate
    max_line_bytes: int = MAX_LINE_BYTES   # a longer JSONL line is a line_too_long row


def model_key(model: str) -> str:
    """A local model directory's absolute, normalised path; a hub id as it is."""
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.isdir(path) else model


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                    ".onnx", ".npz", ".zarr")
# what the model is besides its weights: config, tokenizer, chat template, remote code
_HASHED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".py", ".tiktoken", ".yaml", ".yml")
_HASHED_MAX = 64 << 20     # files up to this size are hashed whole
_MODEL_FILES_MAX = 5000


def model_identity(model: str, times: bool = True) -> dict:
    """What a local model directory holds: a hash of every small file (config, tokenizer,
    chat template, generation config, code) and the names, sizes and modification times of
    the weight files, so changed weights or a changed template at the same path are another
    model. Other files (a README, an nfb output kept there) do not count. A hub id is its name
    (and --revision) only."""
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        return {"hub": model}
    contents = hashlib.sha256()
    weights = []
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".nfb"))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        if len(files) > _MODEL_FILES_MAX:
            break
    for f in files[:_MODEL_FILES_MAX]:
        rel = os.path.relpath(f, path)
        name = f.lower()
        is_weight = name.endswith(_WEIGHT_SUFFIXES)
        if not is_weight and (not name.endswith(_HASHED_SUFFIXES) or name.endswith(".nfb.json")):
            continue
        try:
            st = os.stat(f)
        except OSError:
            continue
        if is_weight or st.st_size > _HASHED_MAX:
            weights.append([rel, st.st_size, st.st_mtime_ns if times else None])
            continue
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError:
            weights.append([rel, st.st_size, st.st_mtime_ns if times else None])
            continue
        contents.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return {"files": contents.hexdigest()[:32], "weights": weights}


_BLOCK = 64 << 10
_SAMPLES = 8   # blocks read per input file: first, last and evenly spaced between


def _input_identity(path: str) -> dict:
    """An input by its path, size, modification time, and a hash of a few 64 KiB blocks
    (the first and last among them), so an edit in place that kept size and mtime is seen
    where it touches them; cheap whatever the file's size."""
    if path == "-":
        return {"path": "-"}
    from nfb.io import storage
    if storage.is_url(path):
        return storage.identity(path)
    st = os.stat(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            size = st.st_size
            if size <= _BLOCK * _SAMPLES:
                h.update(fh.read(_BLOCK * _SAMPLES))
            else:
                for k in range(_SAMPLES):
                    fh.seek((size - _BLOCK) * k // (_SAMPLES - 1))
                    h.update(fh.read(_BLOCK))
    except OSError:
        pass
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sample": h.hexdigest()[:32]}


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
    } | _row_policy(cfg)


def _row_policy(cfg: RunConfig) -> dict:
    """--too-long and --max-line-bytes, when not the defaults (so that older runs keep their
    fingerprint): both change which rows are scored and what they hold."""
    out: dict = {}
    if cfg.too_long != "error":
        out["too_long"] = cfg.too_long
    if cfg.max_line_bytes != MAX_LINE_BYTES:
        out["max_line_bytes"] = cfg.max_line_bytes
    return out


def _hash(obj) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def identity(cfg: RunConfig, task_name: str, task_settings: dict) -> dict:
    """The three things a fingerprint covers, each hashed on its own, so a refusal can say
    which changed: the settings, what the model is, and the inputs."""
    return {"settings": _hash(result_spec(cfg, task_name, task_settings)),
            "model": _hash(model_identity(cfg.engine.model)),
            "inputs": _hash([_input_identity(p) for p in cfg.inputs])}


def fingerprint(cfg: RunConfig, task_name: str, task_settings: dict,
                ident: dict | None = None) -> str:
    return _hash(ident or identity(cfg, task_name, task_settings))


def what_changed(old: dict | None, new: dict) -> str | None:
    """Why two runs differ, from their `identity()` (None: cannot tell; other settings)."""
    if not isinstance(old, dict):
        return None
    changed = [k for k in ("settings", "model", "inputs") if old.get(k) != new.get(k)]
    if changed == ["inputs"]:
        return ("on inputs that have changed since (size, time or contents); add "
                "--overwrite to start over on them, or restore them and run again")
    if changed == ["model"]:
        return ("with a model that has changed since at the same path (config, tokenizer, "
                "chat template or weights)")
    return None


def provenance(cfg: RunConfig, task_name: str, task_settings: dict,
               extra: dict | None = None) -> dict:
    """What the output's footer says about how it was made."""
    ident = identity(cfg, task_name, task_settings)
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
        "too_long": cfg.too_long,
        "max_line_bytes": cfg.max_line_bytes,
        "fingerprint": fingerprint(cfg, task_name, task_settings, ident),
        "identity": ident,
        # the same run without --shard: shards of one job share it, and their merge carries
        # it, so the unsharded command sees the merge as complete
        # (the weights by name and size, not time: each node of a sharded job may hold a
        # copy of the model of its own)
        "settings_fingerprint": fingerprint(cfg, task_name, task_settings, {
            **ident, "model": _hash(model_identity(cfg.engine.model, times=False)),
            "settings": _hash(result_spec(replace(cfg, shard=None), task_name,
                                          task_settings))}),
    }
    if extra:
        out.update(extra)
    return out
