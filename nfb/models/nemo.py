"""NeMo / Megatron-core reward-model checkpoints -> Hugging Face `LlamaForSequenceClassification`.

`convert_nemo(src, out, tokenizer=TOK)` turns a NeMo-Aligner regression reward model (such as
nvidia/Llama3-70B-SteerLM-RM, published only as a NeMo checkpoint) into a directory vLLM and
transformers load, with what HF drops recorded in `config.json` under an `nfb` key: the head
bias and the prompt format (`nfb score` applies both).

What it reads, and where each fact comes from
---------------------------------------------
* A `.nemo` tar or its unpacked folder: `model_config.yaml` plus `model_weights/`, a Megatron-core
  distributed checkpoint whose `metadata.json` names its backend (`sharded_backend`).
* **zarr** backend (Megatron-LM `megatron/core/dist_checkpointing/strategies/zarr.py`, last present
  in commit faa6037b87^, removed by "fully remove zarr support (#2944)"): one directory per tensor
  key holding a zarr v2 `.zarray` and one raw file per chunk, named by chunk index joined with
  "." (`0.0`, `1.0`, ...). `_create_zarr_array` creates arrays with `compressor=None`,
  `chunks=sharded_tensor.max_allowed_chunks()` (one chunk per saved shard: one layer on dim 0
  times one tensor-parallel slice) and, for bf16, rewrites the dtype `<V2` to `bfloat16` in
  `.zarray`. Chunks are therefore uncompressed C-order bytes; edge chunks are stored whole
  (zarr v2). nfb reads them itself (no zarr, NeMo or Megatron), bf16 as uint16 bit patterns.
* **torch_dist** backend (PyTorch DCP `.distcp` files), read through
  `torch.distributed.checkpoint`, whose `.metadata` file is a pickle: nfb reads it with an
  allow-list unpickler (DCP's own metadata classes, torch dtypes and sizes only).
* `*._extra_state` entries (Transformer Engine FP8 state, pickled) and `common.pt` are skipped,
  never unpickled.

Tensor layout (mcore GPT with Transformer Engine's fused norms; layers stacked on dim 0):
* `decoder.layers.self_attention.linear_qkv.weight`: per query group, that group's query heads,
  then its key head, then its value head, head_dim rows each (Megatron-LM
  `megatron/core/transformer/attention.py`, `SelfAttention.get_query_key_value_tensors`:
  "[sq, b, ng * (np/ng + 2) * hn]" split into np/ng*hn, hn, hn).
  RoPE is mcore's default non-interleaved rotation, the same as HF Llama, so no permutation.
* `decoder.layers.mlp.linear_fc1.weight`: SwiGLU `[gate; up]` over the *whole* tensor. Megatron-LM
  `megatron/core/transformer/mlp.py` `apply_swiglu_sharded_factory` splits each TP rank's
  `[w; v]` and saves `w` at fragment `rank` and `v` at fragment `rank + tp` of `2 * tp`
  fragments, so the global tensor is all gate shards, then all up shards.
* `model.embedding.word_embeddings.weight`: vocab padded (to a multiple of
  make_vocab_size_divisible_by x TP); the tokenizer's rows are kept.
* `model.rm_head.weight` `[num_attributes, hidden]` and `model.rm_head.bias` `[num_attributes]`
  (NeMo-Aligner `nemo_aligner/models/nlp/gpt/gpt_reward_model.py`: `RewardModelHead` is a
  RowParallelLinear with `bias=True`, applied to the last token's hidden state after the final
  norm when `output_sequence` is false). HF/vLLM heads have no bias: nfb keeps it in the config.

Memory: tensors are read one layer slice at a time and written straight into pre-planned
safetensors shards (the header is computed from the shapes before any data is read), so the
peak is the largest single output tensor plus one chunk buffer plus a small constant.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import struct
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nfb.errors import ConvertError

EXIT_BEFORE, EXIT_READING = 2, 1
MAX_SHARD_BYTES = 5 * 10**9  # "shards of at most 5 GB" (HF's default max_shard_size is 5GB)

# zarr dtype string -> (numpy dtype used to hold the bytes, safetensors dtype)
_ZARR_DTYPES = {
    "bfloat16": (np.dtype("<u2"), "BF16"),  # Megatron's rewrite of "<V2" (see module doc)
    "<f2": (np.dtype("<f2"), "F16"),
    "<f4": (np.dtype("<f4"), "F32"),
    "<f8": (np.dtype("<f8"), "F64"),
}
_TORCH_DTYPES = {"torch.bfloat16": (np.dtype("<u2"), "BF16"),
                 "torch.float16": (np.dtype("<f2"), "F16"),
                 "torch.float32": (np.dtype("<f4"), "F32")}
_HF_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}

# Tensor keys (after the optional "model." prefix), Transformer Engine names first, then the
# local (non-TE) spec's names.
K_EMB = "embedding.word_embeddings.weight"
K_QKV = "decoder.layers.self_attention.linear_qkv.weight"
K_LN1 = ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
         "decoder.layers.input_layernorm.weight")
K_PROJ = "decoder.layers.self_attention.linear_proj.weight"
K_FC1 = "decoder.layers.mlp.linear_fc1.weight"
K_LN2 = ("decoder.layers.mlp.linear_fc1.layer_norm_weight",
         "decoder.layers.pre_mlp_layernorm.weight")
K_FC2 = "decoder.layers.mlp.linear_fc2.weight"
K_NORM = "decoder.final_layernorm.weight"
K_HEAD_W = "rm_head.weight"
K_HEAD_B = "rm_head.bias"
_IGNORED = ("output_layer.weight",)  # a language-model head, unused by a reward model


Progress = Callable[[int, int, str], None]  # (bytes just written, total bytes, tensor name)


@dataclass
class ConvertResult:
    """What `convert_nemo` wrote."""

    src: str
    out: str
    recipe: str
    attributes: list[str]
    head_bias: list[float]
    backend: str
    dtype: str
    vocab_size: int
    padded_vocab_size: int
    tensors: int
    total_bytes: int
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the source


class _Source:
    """A `.nemo` tar or an unpacked folder, read by relative path, never extracted."""

    def __init__(self, path: Path):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")
                for m in self.tar.getmembers():
                    if m.isfile():
                        name = m.name[2:] if m.name.startswith("./") else m.name
                        self.members[name] = m
            except (tarfile.TarError, OSError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConvertError(f"{path}: not a NeMo checkpoint (a .nemo tar or its unpacked "
                                   f"folder): {first.rstrip(':')}", EXIT_BEFORE) from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def is_file(self, rel: str) -> bool:
        if self.tar is not None:
            return rel in self.members
        return (self.path / rel).is_file()

    def size(self, rel: str) -> int:
        if self.tar is not None:
            return self.members[rel].size
        return (self.path / rel).stat().st_size

    def open(self, rel: str):
        if self.tar is not None:
            return self.tar.extractfile(self.members[rel])
        return open(self.path / rel, "rb")

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def subdirs(self, rel: str) -> list[str]:
        """Names of the directories directly under `rel`."""
        if self.tar is not None:
            prefix = rel.rstrip("/") + "/"
            return sorted({n[len(prefix):].split("/", 1)[0] for n in self.members
                           if n.startswith(prefix) and "/" in n[len(prefix):]})
        d = self.path / rel
        return sorted(e.name for e in os.scandir(d) if e.is_dir()) if d.is_dir() else []


# ----------------------------------------------------------------------------- zarr reading


@dataclass
class _Array:
    """One tensor of the checkpoint: its global shape, dtype, and how to read a slab of it."""

    key: str
    shape: tuple[int, ...]
    np_dtype: np.dtype
    st_dtype: str
    reader: Callable[[int | None], np.ndarray]  # index on dim 0 (a layer) or None (all)

    def read(self, index0: int | None = None) -> np.ndarray:
        return self.reader(index0)


class _ZarrArray:
    def __init__(self, src: _Source, rel: str, key: str):
        self.src, self.rel, self.key = src, rel, key
        try:
            meta = json.loads(src.read_bytes(f"{rel}/.zarray"))
        except (ValueError, OSError) as e:
            raise ConvertError(f"{rel}/.zarray: unreadable ({e})", EXIT_BEFORE) from None
        dtype = meta.get("dtype")
        if dtype not in _ZARR_DTYPES:
            raise ConvertError(f"{rel}/.zarray: dtype {dtype!r} is not one nfb reads "
                               f"({', '.join(_ZARR_DTYPES)})", EXIT_BEFORE)
        if meta.get("zarr_format") != 2 or meta.get("compressor") is not None \
                or meta.get("filters") or meta.get("order", "C") != "C":
            raise ConvertError(f"{rel}/.zarray: nfb reads uncompressed C-order zarr v2 arrays "
                               "as Megatron writes them (compressor null, no filters)",
                               EXIT_BEFORE)
        self.shape = tuple(int(x) for x in meta["shape"])
        self.chunks = tuple(int(x) for x in meta["chunks"])
        if len(self.chunks) != len(self.shape) or any(c <= 0 for c in self.chunks):
            raise ConvertError(f"{rel}/.zarray: chunks {self.chunks} do not fit shape "
                               f"{list(self.shape)}", EXIT_BEFORE)
        self.np_dtype, self.st_dtype = _ZARR_DTYPES[dtype]
        self.sep = meta.get("dimension_separator") or "."

    def array(self) -> _Array:
        return _Array(self.key, self.shape, self.np_dtype, self.st_dtype, self.read)

    def read(self, index0: int | None = None) -> np.ndarray:
        shape, chunks = self.shape, self.chunks
        grids = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
        if index0 is not None:
            grids[0] = range(index0 // chunks[0], index0 // chunks[0] + 1)
            out = np.empty(shape[1:], self.np_dtype)
        else:
            out = np.empty(shape, self.np_dtype)
        if out.size == 0:
            return out
        buf = np.empty(chunks, self.np_dtype)
        raw = memoryview(buf).cast("B")
        for idx in np.ndindex(*[len(g) for g in grids]):
            idx = tuple(g[i] for g, i in zip(grids, idx))
            name = f"{self.rel}/{self.sep.join(map(str, idx)) if idx else '0'}"
            self._read_chunk(name, raw)
            src_sl, dst_sl = [], []
            for d, (i, c, s) in enumerate(zip(idx, chunks, shape)):
                start, stop = i * c, min(i * c + c, s)
                if d == 0 and index0 is not None:
                    src_sl.append(index0 - start)
                    continue
                src_sl.append(slice(0, stop - start))
                dst_sl.append(slice(start, stop))
            out[tuple(dst_sl)] = buf[tuple(src_sl)]
        return out

    def _read_chunk(self, name: str, raw: memoryview) -> None:
        try:
            if not self.src.is_file(name):
                raise ConvertError(f"{name}: chunk file missing (an incomplete download?)",
                                   EXIT_READING)
            with self.src.open(name) as f:
                n = f.readinto(raw)
                extra = f.read(1)
        except OSError as e:
            raise ConvertError(f"{name}: {e}", EXIT_READING) from None
        if n != len(raw) or extra:
            raise ConvertError(f"{name}: chunk file has {self.src.size(name)} bytes, expected "
                               f"{len(raw)} (truncated or corrupt download?)", EXIT_READING)


def _zarr_arrays(src: _Source, wdir: str) -> dict[str, _Array]:
    arrays = {}
    for key in src.subdirs(wdir):
        if key.endswith("_extra_state") or not src.is_file(f"{wdir}/{key}/.zarray"):
            continue  # TE state pickles (never unpickled), sync dirs, sharded objects
        arrays[key] = _ZarrArray(src, f"{wdir}/{key}", key).array()
    return arrays


# ----------------------------------------------------------------------------- torch_dist


class _SafeUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: allow only DCP's metadata classes, torch dtypes/sizes and
    plain containers, so a crafted checkpoint cannot run code."""

    _BUILTINS = {"set", "frozenset", "slice", "dict", "list", "tuple", "int", "float", "str",
                 "bytes", "bool", "complex"}

    def find_class(self, module, name):
        import torch

        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # str -> torch.layout
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath",
                                            "PureWindowsPath", "Path"):
            return super().find_class(module, name)  # storage_meta.checkpoint_id
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if module in ("torch._utils",) and name == "_rebuild_tensor_v2":
            raise pickle.UnpicklingError("tensors inside DCP metadata are not expected")
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _dcp_arrays(src: _Source, wdir: str) -> dict[str, _Array]:
    if src.tar is not None:
        raise ConvertError(f"{src.path}: a torch_dist checkpoint inside a .nemo tar; unpack it "
                           "first (tar -xf FILE.nemo -C DIR) and convert DIR", EXIT_BEFORE)
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root = src.path / wdir

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):
            with open(root / ".metadata", "rb") as f:
                md = _SafeUnpickler(f).load()
            if getattr(md, "storage_meta", None) is not None:
                md.storage_meta.load_id = self.load_id
            return md

    try:
        md = Reader(str(root)).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise ConvertError(f"{root}/.metadata: unreadable torch_dist metadata ({e})",
                           EXIT_BEFORE) from None
    arrays = {}
    for key, meta in md.state_dict_metadata.items():
        if key.endswith("_extra_state") or not isinstance(meta, TensorStorageMetadata):
            continue
        tname = str(meta.properties.dtype)
        if tname not in _TORCH_DTYPES:
            raise ConvertError(f"{key}: dtype {tname} is not one nfb reads", EXIT_BEFORE)
        np_dtype, st = _TORCH_DTYPES[tname]
        shape = tuple(int(x) for x in meta.size)
        tdtype = meta.properties.dtype

        def read(index0, key=key, shape=shape, tdtype=tdtype, np_dtype=np_dtype):
            # DCP loads whole tensors: a stacked [layers, ...] tensor is read once and kept
            # (one-entry cache) while its layers are written.
            cached = _DCP_CACHE.get("key")
            if cached != key:
                _DCP_CACHE.clear()
                t = torch.empty(shape, dtype=tdtype)
                try:
                    dcp.load({key: t}, storage_reader=Reader(str(root)), no_dist=True)
                except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException et al.
                    raise ConvertError(f"{root}: reading {key} failed: "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                       EXIT_READING) from None
                arr = t.view(torch.int16).numpy().view(np_dtype) if tdtype == torch.bfloat16 \
                    else t.numpy()
                _DCP_CACHE.update(key=key, arr=arr)
            arr = _DCP_CACHE["arr"]
            return arr if index0 is None else arr[index0]
        arrays[key] = _Array(key, shape, np_dtype, st, read)
    return arrays


_DCP_CACHE: dict = {}


# ----------------------------------------------------------------------------- config


@dataclass
class _Arch:
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    eps: float
    rope_theta: float
    max_pos: int
    num_attributes: int
    regression: dict


def _cfg_int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConvertError(f"model_config.yaml: {key} is {value!r}, expected a positive integer",
                           EXIT_BEFORE)
    return value


def _arch(cfg: dict) -> _Arch:
    norm = str(cfg.get("normalization", "")).lower()
    act = str(cfg.get("activation", "")).lower()
    if norm == "layernorm1p" or act in ("squared-relu", "squared_relu", "relu2"):
        raise ConvertError(
            "this is a Nemotron-4-style checkpoint (LayerNorm1p, squared ReLU), e.g. "
            "Nemotron-4-340B-Reward: nfb convert handles Llama-architecture reward models "
            "(RMSNorm, SwiGLU) such as Llama3-70B-SteerLM-RM only. Its HF counterpart "
            "(NemotronForSequenceClassification) would load in vLLM through its generic "
            "sequence-classification adapter, but nfb has no converter or parity test for the "
            "Nemotron layout (partial RoPE, zero-centred LayerNorm weights), so it refuses "
            "rather than produce unchecked weights", EXIT_BEFORE)
    problems = []
    if cfg.get("mcore_gpt") is False:
        problems.append("mcore_gpt is false (a legacy Megatron checkpoint)")
    if norm not in ("rmsnorm",):
        problems.append(f"normalization {norm or None!r} (needs rmsnorm)")
    if act not in ("swiglu", "fast-swiglu"):
        problems.append(f"activation {act or None!r} (needs swiglu)")
    if cfg.get("bias", False) or cfg.get("add_bias_linear", False) or cfg.get("add_qkv_bias"):
        problems.append("linear biases (bias: true)")
    if str(cfg.get("position_embedding_type", "rope")) != "rope":
        problems.append(f"position_embedding_type {cfg.get('position_embedding_type')!r}")
    if float(cfg.get("rotary_percentage", 1.0) or 1.0) != 1.0:
        problems.append(f"rotary_percentage {cfg.get('rotary_percentage')}")
    if cfg.get("seq_len_interpolation_factor") or cfg.get("scale_positional_embedding"):
        problems.append("RoPE scaling (seq_len_interpolation_factor / "
                        "scale_positional_embedding)")
    if cfg.get("num_moe_experts"):
        problems.append("mixture of experts")
    if cfg.get("rotary_interleaved"):
        problems.append("interleaved RoPE")
    if cfg.get("output_sequence"):
        problems.append("output_sequence: true (a critic, not a reward model)")
    if cfg.get("use_avg_pool"):
        problems.append("use_avg_pool: true (vLLM pools the last token)")
    if problems:
        raise ConvertError("model_config.yaml describes a model nfb cannot convert to "
                           "LlamaForSequenceClassification: " + "; ".join(problems), EXIT_BEFORE)
    if cfg.get("reward_model_type") not in (None, "regression"):
        raise ConvertError(f"model_config.yaml: reward_model_type {cfg['reward_model_type']!r}; "
                           "nfb converts regression reward models", EXIT_BEFORE)
    hidden = _cfg_int(cfg, "hidden_size")
    heads = _cfg_int(cfg, "num_attention_heads")
    groups = cfg.get("num_query_groups") or heads
    groups = _cfg_int({"num_query_groups": groups}, "num_query_groups")
    head_dim = cfg.get("kv_channels") or hidden // heads
    if heads % groups:
        raise ConvertError(f"model_config.yaml: {heads} heads do not divide into {groups} query "
                           "groups", EXIT_BEFORE)
    regression = cfg.get("regression") or {}
    num_attributes = regression.get("num_attributes", 1)
    max_pos = cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length") or 4096
    return _Arch(
        hidden=hidden, ffn=_cfg_int(cfg, "ffn_hidden_size"), layers=_cfg_int(cfg, "num_layers"),
        heads=heads, groups=groups, head_dim=_cfg_int({"kv_channels": head_dim}, "kv_channels"),
        eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        rope_theta=float(cfg.get("rotary_base", 10000)),
        max_pos=_cfg_int({"max_position_embeddings": max_pos}, "max_position_embeddings"),
        num_attributes=_cfg_int({"regression.num_attributes": num_attributes},
                                "regression.num_attributes"),
        regression=dict(regression))


# ----------------------------------------------------------------------------- plan


@dataclass
class _Out:
    name: str
    shape: tuple[int, ...]
    st_dtype: str
    itemsize: int
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class _LayerCache:
    """Holds the one layer slice being split (q/k/v or gate/up), then lets it go."""

    def __init__(self):
        self.key = None
        self.value = None

    def clear(self) -> None:
        self.key = self.value = None

    def get(self, arr: _Array, layer: int | None) -> np.ndarray:
        if self.key != (arr.key, layer):
            self.key = self.value = None
            self.value = arr.read(layer)
            self.key = (arr.key, layer)
        return self.value


def _find(arrays: dict[str, _Array], names, prefix: str) -> _Array:
    for name in (names,) if isinstance(names, str) else names:
        if prefix + name in arrays:
            return arrays[prefix + name]
    shown = names if isinstance(names, str) else " or ".join(names)
    raise ConvertError(f"model_weights/: tensor {prefix}{shown} is missing", EXIT_BEFORE)


def _check_shape(arr: _Array, expected: tuple[int, ...], why: str) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise ConvertError(f"model_weights/{arr.key}: shape {list(arr.shape)} does not fit "
                           f"model_config.yaml ({why}: expected {list(expected)})", EXIT_BEFORE)


def _plan(arrays: dict[str, _Array], a: _Arch, vocab: int) -> tuple[list[_Out], dict]:
    prefix = "model." if any(k.startswith("model.") for k in arrays) else ""
    H, F, L, hd = a.hidden, a.ffn, a.layers, a.head_dim
    nq, ng = a.heads, a.groups
    emb = _find(arrays, K_EMB, prefix)
    qkv, proj = _find(arrays, K_QKV, prefix), _find(arrays, K_PROJ, prefix)
    ln1, ln2 = _find(arrays, K_LN1, prefix), _find(arrays, K_LN2, prefix)
    fc1, fc2 = _find(arrays, K_FC1, prefix), _find(arrays, K_FC2, prefix)
    norm = _find(arrays, K_NORM, prefix)
    head_w, head_b = _find(arrays, K_HEAD_W, prefix), _find(arrays, K_HEAD_B, prefix)
    known = {x.key for x in (emb, qkv, proj, ln1, ln2, fc1, fc2, norm, head_w, head_b)}
    unknown = sorted(k for k in arrays if k not in known
                     and not any(k == prefix + i for i in _IGNORED))
    if unknown:
        raise ConvertError(f"model_weights/: unexpected tensor {unknown[0]}"
                           f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: "
                           "not the Llama-architecture reward model nfb converts", EXIT_BEFORE)
    if len(emb.shape) != 2 or emb.shape[1] != H:
        _check_shape(emb, (emb.shape[0] if emb.shape else 0, H), "hidden_size")
    padded = emb.shape[0]
    if vocab > padded:
        raise ConvertError(f"the tokenizer has {vocab} tokens but the checkpoint's embedding has "
                           f"{padded} rows: not this model's tokenizer", EXIT_BEFORE)
    _check_shape(qkv, (L, (nq + 2 * ng) * hd, H), "num_layers, (heads + 2*query groups) * "
                 "head_dim, hidden_size")
    _check_shape(proj, (L, H, nq * hd), "num_layers, hidden_size, heads * head_dim")
    _check_shape(fc1, (L, 2 * F, H), "num_layers, 2 * ffn_hidden_size, hidden_size")
    _check_shape(fc2, (L, H, F), "num_layers, hidden_size, ffn_hidden_size")
    _check_shape(ln1, (L, H), "num_layers, hidden_size")
    _check_shape(ln2, (L, H), "num_layers, hidden_size")
    _check_shape(norm, (H,), "hidden_size")
    _check_shape(head_w, (a.num_attributes, H), "regression.num_attributes, hidden_size")
    _check_shape(head_b, (a.num_attributes,), "regression.num_attributes")

    cache = _LayerCache()
    outs: list[_Out] = []

    def add(name, arr, shape, fn):
        outs.append(_Out(name, tuple(shape), arr.st_dtype, arr.np_dtype.itemsize, fn))

    def plain(arr, layer=None):  # a tensor read on its own: let the cached slice go first
        def read():
            cache.clear()
            return arr.read(layer)
        return read

    add("model.embed_tokens.weight", emb, (vocab, H), lambda: plain(emb)()[:vocab])
    per_group = nq // ng
    for i in range(L):
        p = f"model.layers.{i}."

        def qkv_part(part, i=i):
            x = cache.get(qkv, i).reshape(ng, per_group + 2, hd, H)
            sel = {"q": x[:, :per_group], "k": x[:, per_group], "v": x[:, per_group + 1]}[part]
            return sel.reshape(-1, H)
        add(p + "input_layernorm.weight", ln1, (H,), plain(ln1, i))
        add(p + "self_attn.q_proj.weight", qkv, (nq * hd, H), lambda f=qkv_part: f("q"))
        add(p + "self_attn.k_proj.weight", qkv, (ng * hd, H), lambda f=qkv_part: f("k"))
        add(p + "self_attn.v_proj.weight", qkv, (ng * hd, H), lambda f=qkv_part: f("v"))
        add(p + "self_attn.o_proj.weight", proj, (H, nq * hd), plain(proj, i))
        add(p + "post_attention_layernorm.weight", ln2, (H,), plain(ln2, i))
        add(p + "mlp.gate_proj.weight", fc1, (F, H), lambda i=i: cache.get(fc1, i)[:F])
        add(p + "mlp.up_proj.weight", fc1, (F, H), lambda i=i: cache.get(fc1, i)[F:])
        add(p + "mlp.down_proj.weight", fc2, (H, F), plain(fc2, i))
    add("model.norm.weight", norm, (H,), plain(norm))
    add("score.weight", head_w, (a.num_attributes, H), plain(head_w))
    info = {"padded_vocab": padded, "head_b": head_b, "dtype": _HF_DTYPE[qkv.st_dtype]}
    return outs, info


def _as_float(arr: _Array, values: np.ndarray) -> list[float]:
    if arr.st_dtype == "BF16":  # bf16 bits are the top half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


# ----------------------------------------------------------------------------- writing


def _shards(outs: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def _write_safetensors(path: Path, outs: list[_Out], done: Callable[[int, str], None]) -> None:
    """A safetensors file written tensor by tensor: the header is known from the shapes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in outs:
        header[o.name] = {"dtype": o.st_dtype, "shape": list(o.shape),
                          "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for o in outs:
            data = o.produce()
            if tuple(data.shape) != o.shape:  # a planning bug, never user input
                raise AssertionError(f"{o.name}: produced {data.shape}, planned {o.shape}")
            data = np.ascontiguousarray(data)  # no copy when already contiguous
            f.write(memoryview(data).cast("B"))
            done(o.nbytes, o.name)
            del data


# ----------------------------------------------------------------------------- entry point


def _load_yaml(src: _Source, rel: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(src.read_bytes(rel))
    except (yaml.YAMLError, OSError) as e:
        raise ConvertError(f"{rel}: unreadable ({str(e).splitlines()[0]})", EXIT_BEFORE) from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{rel}: not a NeMo model config", EXIT_BEFORE)
    return cfg


def _recipe(a: _Arch) -> str:
    if (a.hidden, a.layers, a.heads, a.groups, a.ffn, a.num_attributes) == \
            (8192, 80, 64, 8, 28672, 9):
        return "llama3-70b-steerlm-rm"
    return "steerlm-rm" if a.num_attributes == 9 else "nemo-regression-rm"


def _load_tokenizer(tokenizer: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConvertError(f"--tokenizer {tokenizer}: cannot load a tokenizer from it "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                           EXIT_BEFORE) from None


def inspect_nemo(src: str | os.PathLike) -> dict:
    """Read a checkpoint's config and tensor list (no tensor data): for `nfb convert --check`
    style uses and tests."""
    source = _Source(Path(src))
    try:
        cfg, arrays, backend = _open_checkpoint(source)
        return {"config": cfg, "backend": backend,
                "tensors": {k: list(v.shape) for k, v in arrays.items()}}
    finally:
        source.close()


def _open_checkpoint(src: _Source) -> tuple[dict, dict[str, _Array], str]:
    if not src.path.exists():
        raise ConvertError(f"{src.path}: no such file or folder", EXIT_BEFORE)
    if not src.is_file("model_config.yaml"):
        raise ConvertError(f"{src.path}: not a NeMo checkpoint (no model_config.yaml; expected "
                           "a .nemo tar or its unpacked folder)", EXIT_BEFORE)
    cfg = _load_yaml(src, "model_config.yaml")
    wdir = "model_weights"
    if not src.is_file(f"{wdir}/metadata.json"):
        if src.is_file("model_weights.ckpt"):
            raise ConvertError(f"{src.path}: a legacy (pickled model_weights.ckpt) NeMo "
                               "checkpoint; nfb reads only Megatron-core distributed "
                               "checkpoints and never unpickles weights", EXIT_BEFORE)
        raise ConvertError(f"{src.path}: not a NeMo checkpoint (no model_weights/metadata.json)",
                           EXIT_BEFORE)
    try:
        meta = json.loads(src.read_bytes(f"{wdir}/metadata.json"))
    except (ValueError, OSError) as e:
        raise ConvertError(f"{wdir}/metadata.json: unreadable ({e})", EXIT_BEFORE) from None
    backend = meta.get("sharded_backend")
    if backend == "zarr":
        arrays = _zarr_arrays(src, wdir)
    elif backend == "torch_dist":
        arrays = _dcp_arrays(src, wdir)
    else:
        raise ConvertError(f"{wdir}/metadata.json: sharded_backend {backend!r}; nfb reads zarr "
                           "and torch_dist checkpoints", EXIT_BEFORE)
    if not arrays:
        raise ConvertError(f"{src.path}: {wdir}/ holds no tensors", EXIT_BEFORE)
    return cfg, arrays, backend


def convert_nemo(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str,
                 overwrite: bool = False, progress: Progress | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> ConvertResult:
    """Convert a NeMo-Aligner regression reward model (a `.nemo` tar or unpacked folder) into a
    Hugging Face `LlamaForSequenceClassification` directory at `out`.

    `tokenizer` is a local directory or hub id (Llama 3's for Llama3-70B-SteerLM-RM; none ships
    with the checkpoint); it is saved into `out`. Everything is checked before any tensor data
    is read (exit 2 on failure); reading errors such as a truncated chunk end with exit 1. The
    output appears only when complete (written beside it, then renamed). `progress` is called
    with (bytes just written, total bytes, tensor name).
    """
    t0 = time.monotonic()
    from nfb.io.outputs import OutputLock, check_not_source

    src_path, out_path = Path(src), Path(out)
    check_not_source(out_path, {"the checkpoint": src_path, "the tokenizer": tokenizer})
    if out_path.exists() and not overwrite:
        raise ConvertError(f"{out_path} exists (pass --overwrite to replace it)", EXIT_BEFORE)
    lock = OutputLock(out_path).acquire()   # one convert per output directory
    source = _Source(src_path)
    tmp: Path | None = None
    try:
        cfg, arrays, backend = _open_checkpoint(source)
        arch = _arch(cfg)
        tok = _load_tokenizer(tokenizer)
        vocab = len(tok)
        outs, info = _plan(arrays, arch, vocab)
        attributes = (list(_steerlm_names()) if arch.num_attributes == 9
                      else [f"head_{i}" for i in range(arch.num_attributes)])
        total = sum(o.nbytes for o in outs)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _check_space(out_path.parent, total)

        tmp = out_path.parent / f".{out_path.name}.nfb-convert-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        bias = _as_float(info["head_b"], info["head_b"].read())
        recipe = _recipe(arch)
        _write_config(tmp, arch, tok, vocab, attributes, bias, recipe, info["dtype"], src_path)
        tok.save_pretrained(tmp)

        written = 0

        def done(n: int, name: str) -> None:
            nonlocal written
            written += n
            if progress is not None:
                progress(n, total, name)

        groups = _shards(outs, max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                 for i in range(len(groups))]
        weight_map = {}
        for fname, group in zip(names, groups):
            _write_safetensors(tmp / fname, group, done)
            weight_map.update({o.name: fname for o in group})
        _DCP_CACHE.clear()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

        if out_path.exists():  # --overwrite: swap in the new directory, then drop the old
            old = out_path.parent / f".{out_path.name}.nfb-old-{os.getpid()}-{os.urandom(4).hex()}"
            os.replace(out_path, old)
            os.replace(tmp, out_path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out_path)
        tmp = None
        return ConvertResult(
            src=str(src_path), out=str(out_path), recipe=recipe, attributes=attributes,
            head_bias=bias, backend=backend, dtype=info["dtype"], vocab_size=vocab,
            padded_vocab_size=info["padded_vocab"], tensors=len(outs), total_bytes=total,
            shards=names, seconds=time.monotonic() - t0)
    except OSError as e:   # disk full, a folder made read-only: one line
        from nfb.io.outputs import write_error
        if tmp is None:
            raise
        raise write_error(e, str(out_path)) from None
    finally:
        _DCP_CACHE.clear()
        source.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.release()


def _steerlm_names() -> tuple[str, ...]:
    from nfb.models.steerlm import ALL_STEERLM_ATTRIBUTES

    return ALL_STEERLM_ATTRIBUTES


def _check_space(folder: Path, need: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need + 64 * 2**20:
        raise ConvertError(f"{folder}: {free / 1e9:.1f} GB free, the converted model needs "
                           f"{need / 1e9:.1f} GB", EXIT_BEFORE)


def _write_config(out: Path, a: _Arch, tok, vocab: int, attributes: list[str],
                  bias: list[float], recipe: str, dtype: str, src: Path) -> None:
    from transformers import LlamaConfig

    from nfb import __version__

    id2label = dict(enumerate(attributes))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.groups,
        head_dim=a.head_dim, rms_norm_eps=a.eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_pos, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False, torch_dtype=dtype,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, num_labels=len(attributes), id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, problem_type="regression",
        architectures=["LlamaForSequenceClassification"])
    data = config.to_dict()
    data["num_labels"] = len(attributes)  # transformers 5 derives it from id2label; vLLM and
    # older transformers read it
    data["nfb"] = {
        "recipe": recipe,
        "prompt_format": "steerlm",
        "head_bias": bias,
        "attributes": attributes,
        "converted_from": str(src.resolve()),
        "nfb_version": __version__,
        "regression": {k: v for k, v in a.regression.items()
                       if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    buf = io.StringIO()
    json.dump(data, buf, indent=2, sort_keys=True)
    (out / "config.json").write_text(buf.getvalue() + "\n")
