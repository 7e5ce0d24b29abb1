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
  allow-list unpickler (exact (module, name) pairs: DCP's own metadata classes, torch dtypes
  and sizes; no dotted names, nothing else) and checks before any tensor is read.
* `*._extra_state` entries (Transformer Engine FP8 state, pickled) and `common.pt` are skipped,
  never unpickled.

What it trusts (a checkpoint is untrusted input; each refusal is one ConvertError line)
-----------------------------------------------------------------------------------------
* Nothing runs: no pickle but DCP's `.metadata` is opened, and that one through the
  allow-list; `model_config.yaml` is read with `yaml.safe_load`.
* Nothing outside the checkpoint is read: tar members that are links, devices, FIFOs or
  sparse, or whose names climb out, are refused; in a folder, files must be regular and
  really inside it (symlinks out are refused, except into the Hub cache's `blobs/` for a
  snapshot folder); zarr chunk names are integer indices joined by "." or "/" only; DCP data
  files are plain names in the folder.
* Memory is bounded by the model config, not by the bytes: small files are size-checked from
  the tar header or stat before reading (MAX_SMALL_FILE, MAX_DCP_METADATA, MAX_TAR_HEADER),
  `.zarray` shapes/chunks/dtype/compressor/separator are validated, every tensor's shape is
  checked against `model_config.yaml`, the embedding's padding is bounded, and every chunk or
  data file must have the size its metadata implies before any is read.

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
import lzma
import math
import os
import pickle
import shutil
import stat
import struct
import tarfile
import time
import zlib
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

# A checkpoint is untrusted input (people convert folders downloaded from the Hub): these
# bound what nfb reads before it has checked it, each a one-line ConvertError past it.
MAX_SMALL_FILE = 4 * 2**20       # model_config.yaml, metadata.json, a .zarray
MAX_DCP_METADATA = 64 * 2**20    # torch_dist's .metadata pickle
MAX_TAR_MEMBERS = 1_000_000      # members of a .nemo tar
MAX_TAR_HEADER = 2**20           # a GNU long name or pax header (tarfile reads it whole)
MAX_CHUNKS = 1_000_000           # chunk files of one zarr array
MAX_NDIM, MAX_DIM = 8, 2**48     # dimensions of a tensor, and the size of each
MAX_CONFIG_NODES = 100_000       # values in model_config.yaml once YAML aliases are expanded
MAX_VOCAB_PADDING = 2**16        # embedding rows past the tokenizer's (or as many as it has)
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return (text or type(e).__name__)[:200]


def _allowed_roots(path: Path) -> tuple[str, ...]:
    """Where the files of a checkpoint folder may really live: inside it, and, for a folder in
    a Hugging Face cache snapshot (`models--org--name/snapshots/REV/`, whose files are
    symlinks to `../../blobs/SHA`), that cache repository's `blobs/` folder."""
    roots = [os.path.realpath(path)]
    for p in (Path(os.path.abspath(path)), Path(roots[0])):
        for a in (p, *p.parents):
            if a.name == "snapshots" and (a.parent / "blobs").is_dir():
                roots.append(os.path.realpath(a.parent / "blobs"))
    return tuple(dict.fromkeys(roots))


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name or pax extended header into memory whole, at the size
    its header claims (16 GiB would be a MemoryError): bound it first."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_TAR_HEADER:
            raise _HugeTarHeader(f"a tar header (type {self.type!r}) of {self.size} bytes, "
                                 f"more than the {MAX_TAR_HEADER >> 20} MiB nfb reads")
        return super()._proc_member(tarfile_)


class _HugeTarHeader(Exception):
    pass


class _Source:
    """A `.nemo` tar or an unpacked folder, read by relative path, never extracted.

    Only regular files are read. A tar's symlinks, hard links, devices, FIFOs, sparse members
    and names that climb out (absolute, `..`) are refused when it is opened (NeMo writes
    none). In a folder, a file that is not regular (a FIFO would block) or whose real path
    lies outside the checkpoint (a symlink out; the Hub cache's blobs excepted) is refused.
    Sizes are known (tar header, stat) before a byte is read."""

    def __init__(self, path: Path):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        self._roots: tuple[str, ...] = ()
        if not path.is_file():
            self._roots = _allowed_roots(path)
            return
        try:
            self.tar = tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)
            while (m := self.tar.next()) is not None:
                if len(self.tar.members) > MAX_TAR_MEMBERS:
                    raise ConvertError(f"{path}: more than {MAX_TAR_MEMBERS} tar members: not a "
                                       "NeMo checkpoint", EXIT_BEFORE)
                self._add(m)
        except ConvertError:
            self.close()
            raise
        except (*_READ_ERRORS, MemoryError, _HugeTarHeader) as e:
            self.close()
            raise ConvertError(f"{path}: not a NeMo checkpoint (a .nemo tar or its unpacked "
                               f"folder): {_first_line(e).rstrip(':')}", EXIT_BEFORE) from None

    def _add(self, m: tarfile.TarInfo) -> None:
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if m.name.startswith("/") or ".." in parts or "\\" in m.name or "\0" in m.name:
            raise ConvertError(f"{self.path}: tar member {m.name!r:.200} climbs out of the archive "
                               "(an absolute path or '..'): not a checkpoint nfb reads",
                               EXIT_BEFORE)
        if m.isdir():
            return
        kind = (f"a symlink (to {m.linkname!r:.100})" if m.issym()
                else f"a hard link (to {m.linkname!r:.100})" if m.islnk()
                else "a device or FIFO" if m.isdev()
                else "a sparse file" if m.issparse()
                else f"of tar type {m.type!r}" if not m.isreg() else None)
        if kind:
            raise ConvertError(f"{self.path}: tar member {'/'.join(parts):.200} is {kind}; nfb "
                               "reads only the regular files of a .nemo (NeMo writes no others)",
                               EXIT_BEFORE)
        self.members["/".join(parts)] = m

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def _local(self, rel: str) -> tuple[Path, int] | None:
        """A folder's regular file `rel` (its real path and size), or None when there is none."""
        if rel.startswith("/") or ".." in rel.split("/"):  # names nfb builds; never expected
            raise ConvertError(f"{rel}: a path outside the checkpoint", EXIT_BEFORE)
        p = self.path / rel
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:  # a symlink loop, no permission
            raise ConvertError(f"{p}: {e.strerror or _first_line(e)}", EXIT_BEFORE) from None
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise ConvertError(f"{p}: not a regular file (a FIFO, socket or device): not a "
                               "checkpoint file nfb reads", EXIT_BEFORE)
        real = os.path.realpath(p)
        if not any(os.path.commonpath([real, r]) == r for r in self._roots):
            raise ConvertError(f"{p}: a symlink to {real}, outside the checkpoint; nfb reads only "
                               "files inside it (copy them in, e.g. cp -rL, to convert)",
                               EXIT_BEFORE)
        return Path(real), st.st_size

    def is_file(self, rel: str) -> bool:
        if self.tar is not None:
            return rel in self.members
        return self._local(rel) is not None

    def size(self, rel: str) -> int | None:
        """The size of file `rel` from the tar header or stat, or None when there is none."""
        if self.tar is not None:
            m = self.members.get(rel)
            return None if m is None else m.size
        local = self._local(rel)
        return None if local is None else local[1]

    def open(self, rel: str):
        if self.tar is not None:
            return self.tar.extractfile(self.members[rel])
        local = self._local(rel)
        if local is None:
            raise FileNotFoundError(f"{rel}: no such file")
        return open(local[0], "rb")

    def read_bytes(self, rel: str, cap: int = MAX_SMALL_FILE) -> bytes:
        """A whole (small) file, refused from its size alone when over `cap`."""
        size = self.size(rel)
        if size is None:
            raise ConvertError(f"{rel}: missing", EXIT_BEFORE)
        if size > cap:
            raise ConvertError(f"{rel}: {size} bytes, more than the {cap >> 20} MiB nfb reads "
                               "for this file: not a NeMo checkpoint file", EXIT_BEFORE)
        try:
            with self.open(rel) as f:
                data = f.read(cap + 1)
        except _READ_ERRORS as e:
            raise ConvertError(f"{rel}: {_first_line(e)}", EXIT_READING) from None
        if len(data) > cap:
            raise ConvertError(f"{rel}: grew past {cap >> 20} MiB while read", EXIT_BEFORE)
        return data

    def subdirs(self, rel: str) -> list[str]:
        """Names of the directories directly under `rel`."""
        if self.tar is not None:
            prefix = rel.rstrip("/") + "/"
            return sorted({n[len(prefix):].split("/", 1)[0] for n in self.members
                           if n.startswith(prefix) and "/" in n[len(prefix):]})
        d = self.path / rel
        try:
            return sorted(e.name for e in os.scandir(d) if e.is_dir()) if d.is_dir() else []
        except OSError as e:
            raise ConvertError(f"{d}: {e.strerror or _first_line(e)}", EXIT_BEFORE) from None


def _read_json(src: _Source, rel: str):
    data = src.read_bytes(rel)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ConvertError(f"{rel}: unreadable ({_first_line(e)})", EXIT_BEFORE) from None


# ----------------------------------------------------------------------------- zarr reading


@dataclass
class _Array:
    """One tensor of the checkpoint: its global shape, dtype, and how to read a slab of it."""

    key: str
    shape: tuple[int, ...]
    np_dtype: np.dtype
    st_dtype: str
    reader: Callable[[int | None], np.ndarray]  # index on dim 0 (a layer) or None (all)
    verify: Callable[[], None] = lambda: None   # every data file there, of the right size

    def read(self, index0: int | None = None) -> np.ndarray:
        return self.reader(index0)


def _dims(value, what: str, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM or not all(
            isinstance(x, int) and not isinstance(x, bool) and low <= x <= MAX_DIM
            for x in value):
        raise ValueError(f"{what} {value!r:.80} is not a list of at most {MAX_NDIM} integers "
                         f"from {low} to 2**48")
    return tuple(value)


class _ZarrArray:
    """A zarr v2 array as Megatron writes it, its `.zarray` checked before any chunk is read:
    a dtype nfb reads, no compressor or filters, C order, integer shape and chunks with each
    chunk within its dimension (Megatron saves one shard per chunk), at most MAX_CHUNKS
    chunks, and a `dimension_separator` of "." or "/" (chunk names are then indices joined by
    it, inside the array's directory)."""

    def __init__(self, src: _Source, rel: str, key: str):
        self.src, self.rel, self.key = src, rel, key
        meta = _read_json(src, f"{rel}/.zarray")

        def bad(why: str):
            return ConvertError(f"{rel}/.zarray: {why}", EXIT_BEFORE)
        if not isinstance(meta, dict):
            raise bad("not a zarr array description")
        dtype = meta.get("dtype")
        if not isinstance(dtype, str) or dtype not in _ZARR_DTYPES:
            raise bad(f"dtype {dtype!r:.80} is not one nfb reads ({', '.join(_ZARR_DTYPES)})")
        if meta.get("zarr_format") != 2 or meta.get("compressor") is not None \
                or meta.get("filters") or meta.get("order", "C") != "C":
            raise bad("nfb reads uncompressed C-order zarr v2 arrays as Megatron writes them "
                      "(compressor null, no filters)")
        try:
            self.shape = _dims(meta.get("shape"), "shape", 0)
            self.chunks = _dims(meta.get("chunks"), "chunks", 1)
        except ValueError as e:
            raise bad(str(e)) from None
        if len(self.chunks) != len(self.shape) or any(
                c > max(s, 1) for c, s in zip(self.chunks, self.shape)):
            raise bad(f"chunks {list(self.chunks)} do not fit shape {list(self.shape)} (one "
                      "chunk per saved shard, each at most its dimension)")
        self.grid = tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks))
        if math.prod(self.grid) > MAX_CHUNKS:
            raise bad(f"{math.prod(self.grid)} chunks, more than the {MAX_CHUNKS} nfb reads")
        sep = meta.get("dimension_separator", ".")
        if sep not in (None, ".", "/"):
            raise bad(f"dimension_separator {sep!r:.40}: zarr v2 allows only '.' or '/'")
        self.sep = sep or "."
        self.np_dtype, self.st_dtype = _ZARR_DTYPES[dtype]
        self.chunk_bytes = math.prod(self.chunks) * self.np_dtype.itemsize

    def array(self) -> _Array:
        return _Array(self.key, self.shape, self.np_dtype, self.st_dtype, self.read, self.verify)

    def _name(self, idx: tuple[int, ...]) -> str:
        return f"{self.rel}/{self.sep.join(map(str, idx)) if idx else '0'}"

    def verify(self) -> None:
        """Every chunk file present with the size the `.zarray` implies, from the tar header
        or stat alone (nothing read): a short or huge (sparse) chunk stops the run here."""
        for idx in np.ndindex(*self.grid):
            self._check_size(self._name(idx), self.src.size(self._name(idx)))

    def _check_size(self, name: str, size: int | None) -> None:
        if size is None:
            raise ConvertError(f"{name}: chunk file missing (an incomplete download?)",
                               EXIT_READING)
        if size != self.chunk_bytes:
            raise ConvertError(f"{name}: chunk file has {size} bytes, expected "
                               f"{self.chunk_bytes} (truncated or corrupt download?)",
                               EXIT_READING)

    def read(self, index0: int | None = None) -> np.ndarray:
        shape, chunks = self.shape, self.chunks
        grids = [range(g) for g in self.grid]
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
            self._read_chunk(self._name(idx), raw)
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
        self._check_size(name, self.src.size(name))
        try:
            with self.src.open(name) as f:
                n = f.readinto(raw)
                extra = f.read(1)
        except _READ_ERRORS as e:
            raise ConvertError(f"{name}: {_first_line(e)}", EXIT_READING) from None
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


class _SafeUnpickler(pickle._Unpickler):
    """DCP's `.metadata` is a pickle. It may name only the exact (module, name) pairs of
    `allowed()`: the metadata classes `torch.distributed.checkpoint` pickles (torch 2.13's
    `dcp.save` writes Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata,
    TensorProperties, ChunkStorageMetadata, _MEM_FORMAT_ENCODING and filesystem._StorageInfo;
    Megatron's sharded objects add BytesStorageMetadata), torch.Size, torch's dtypes, layouts
    (via torch.serialization._get_layout) and memory formats, pathlib paths
    (StorageMeta.checkpoint_id; `pathlib._local` is Python 3.13's module for them), and
    OrderedDict, set and frozenset. Each is taken from a table built here, never looked up
    through the pickled module path, so a dotted name (`os.system` under an allowed module)
    or any other global is refused, and so are persistent ids."""

    _TABLE: dict | None = None

    @classmethod
    def allowed(cls) -> dict[tuple[str, str], object]:
        if cls._TABLE is None:
            import collections
            import pathlib

            import torch
            import torch.distributed.checkpoint.filesystem as dcp_fs
            import torch.distributed.checkpoint.metadata as dcp_md

            table: dict[tuple[str, str], object] = {}
            for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                         "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
                         "_MEM_FORMAT_ENCODING"):
                if hasattr(dcp_md, name):
                    table["torch.distributed.checkpoint.metadata", name] = getattr(dcp_md, name)
            table["torch.distributed.checkpoint.filesystem", "_StorageInfo"] = \
                dcp_fs._StorageInfo
            table["torch", "Size"] = torch.Size
            for name, value in vars(torch).items():
                if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                    table["torch", name] = value
            table["torch.serialization", "_get_layout"] = torch.serialization._get_layout
            for module in ("pathlib", "pathlib._local"):
                for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                             "PureWindowsPath"):
                    table[module, name] = getattr(pathlib, name)
            table["collections", "OrderedDict"] = collections.OrderedDict
            table["builtins", "set"] = set
            table["builtins", "frozenset"] = frozenset
            cls._TABLE = table
        return cls._TABLE

    def find_class(self, module, name):
        try:
            return self.allowed()[module, name]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}"[:200]) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")

    # BUILD sets an object's state; on a class (an allowed global) it would set attributes
    # of that class for the whole process (e.g. PurePath.__fspath__): refused. The pure-Python
    # unpickler is used because the C one offers no hook for it (the metadata is small).
    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        if len(self.stack) >= 2 and isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError("refusing to set the state of a class")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def _read_dcp_metadata(src: _Source, wdir: str):
    """The `.metadata` of a torch_dist checkpoint, unpickled with `_SafeUnpickler` and checked
    (types, shapes, chunk bounds, data files named inside the folder and long enough)."""
    rel = f"{wdir}/.metadata"
    if not src.is_file(rel):
        raise ConvertError(f"{rel}: missing (an incomplete download?)", EXIT_BEFORE)
    data = src.read_bytes(rel, MAX_DCP_METADATA)
    try:
        md = _SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{rel}: {_first_line(e)}; a torch_dist .metadata holds only DCP's "
                           "metadata classes: not a checkpoint nfb reads", EXIT_BEFORE) from None
    except Exception as e:  # noqa: BLE001 - hostile bytes raise anything (RecursionError, ...)
        raise ConvertError(f"{rel}: unreadable torch_dist metadata ({type(e).__name__}: "
                           f"{_first_line(e)})", EXIT_BEFORE) from None
    _check_dcp_metadata(md, src, wdir)
    return md


def _check_dcp_metadata(md, src: _Source, wdir: str) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    def bad(why: str):
        return ConvertError(f"{wdir}/.metadata: {why}: not DCP metadata nfb reads", EXIT_BEFORE)

    def dims(value, what: str) -> tuple[int, ...]:
        if not isinstance(value, torch.Size) or len(value) > MAX_NDIM \
                or not all(0 <= x <= MAX_DIM for x in value):
            raise bad(f"{what} {value!r:.80} is not a torch.Size of at most {MAX_NDIM} sizes")
        return tuple(value)

    sdm, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if not isinstance(md, Metadata) or not isinstance(sdm, dict) \
            or not isinstance(storage, dict):
        raise bad(f"a {type(md).__name__} without state_dict_metadata and storage_data")
    for key, meta in sdm.items():
        if not isinstance(key, str):
            raise bad(f"key {key!r:.60} is not a string")
        if isinstance(meta, BytesStorageMetadata):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise bad(f"{key:.100}: a {type(meta).__name__}")
        props = getattr(meta, "properties", None)
        if not isinstance(props, TensorProperties) or not isinstance(
                getattr(props, "dtype", None), torch.dtype):
            raise bad(f"{key:.100}: no tensor dtype")
        size = dims(getattr(meta, "size", None), f"{key:.100}: size")
        chunks = getattr(meta, "chunks", None)
        if not isinstance(chunks, list):
            raise bad(f"{key:.100}: no chunk list")
        for c in chunks:
            if not isinstance(c, ChunkStorageMetadata):
                raise bad(f"{key:.100}: a chunk that is a {type(c).__name__}")
            off = dims(getattr(c, "offsets", None), f"{key:.100}: chunk offsets")
            n = dims(getattr(c, "sizes", None), f"{key:.100}: chunk sizes")
            if len(off) != len(size) or len(n) != len(size) or any(
                    o + k > s for o, k, s in zip(off, n, size)):
                raise bad(f"{key:.100}: chunk at {list(off)} of {list(n)} outside {list(size)}")
    ends: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad("storage_data that is not MetadataIndex -> _StorageInfo")
        path, off, length = (getattr(info, a, None) for a in ("relative_path", "offset",
                                                              "length"))
        if not isinstance(path, str) or path in ("", ".", "..") or any(
                c in path for c in "/\\\0"):
            raise bad(f"data file {path!r:.100} is not a file name inside the checkpoint folder")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 2**62
                   for x in (off, length)):
            raise bad(f"{path}: offset {off!r:.40} / length {length!r:.40} are not byte counts")
        if getattr(info, "transform_descriptors", None):
            raise bad(f"{path}: transformed (e.g. compressed) data, which nfb does not read")
        ends[path] = max(ends.get(path, 0), off + length)
    for path, end in sorted(ends.items()):
        size = src.size(f"{wdir}/{path}")
        if size is None:
            raise ConvertError(f"{wdir}/{path}: data file missing (an incomplete download?)",
                               EXIT_READING)
        if size < end:
            raise ConvertError(f"{wdir}/{path}: {size} bytes, the metadata reads up to byte "
                               f"{end} (truncated or corrupt download?)", EXIT_READING)


def _dcp_arrays(src: _Source, wdir: str) -> dict[str, _Array]:
    if src.tar is not None:
        raise ConvertError(f"{src.path}: a torch_dist checkpoint inside a .nemo tar; unpack it "
                           "first (tar -xf FILE.nemo -C DIR) and convert DIR", EXIT_BEFORE)
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root = src.path / wdir

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = _read_dcp_metadata(src, wdir)
            if getattr(md, "storage_meta", None) is not None:
                md.storage_meta.load_id = self.load_id
            return md

    md = _read_dcp_metadata(src, wdir)
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
                except ConvertError:
                    raise
                except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException et al.
                    raise ConvertError(f"{root}: reading {key} failed: {_first_line(e)}",
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
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**31:
        raise ConvertError(f"model_config.yaml: {key} is {value!r:.60}, expected a positive "
                           "integer", EXIT_BEFORE)
    return value


def _cfg_float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ConvertError(f"model_config.yaml: {key} is {value!r:.60}, expected a number",
                           EXIT_BEFORE)
    return float(value)


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
    if (_cfg_float(cfg, "rotary_percentage", 1.0) or 1.0) != 1.0:
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
        raise ConvertError(f"model_config.yaml: reward_model_type "
                           f"{cfg['reward_model_type']!r:.60}; "
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
    if not isinstance(regression, dict):
        raise ConvertError(f"model_config.yaml: regression is {regression!r:.60}, expected a "
                           "mapping (num_attributes: N, ...)", EXIT_BEFORE)
    num_attributes = regression.get("num_attributes", 1)
    max_pos = cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length") or 4096
    return _Arch(
        hidden=hidden, ffn=_cfg_int(cfg, "ffn_hidden_size"), layers=_cfg_int(cfg, "num_layers"),
        heads=heads, groups=groups, head_dim=_cfg_int({"kv_channels": head_dim}, "kv_channels"),
        eps=_cfg_float(cfg, "layernorm_epsilon", 1e-5),
        rope_theta=_cfg_float(cfg, "rotary_base", 10000.0),
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
    if padded - vocab > max(vocab, MAX_VOCAB_PADDING):  # bounds the rows read, then dropped
        raise ConvertError(f"the checkpoint's embedding has {padded} rows for a tokenizer of "
                           f"{vocab} tokens (vocab padding adds less than one multiple of "
                           "make_vocab_size_divisible_by x TP): not this model's tokenizer, or "
                           "not a real embedding", EXIT_BEFORE)
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
    info = {"padded_vocab": padded, "head_b": head_b, "dtype": _HF_DTYPE[qkv.st_dtype],
            "read": [emb, qkv, proj, ln1, ln2, fc1, fc2, norm, head_w, head_b]}
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

    data = src.read_bytes(rel)
    try:
        cfg = yaml.safe_load(data)
    except Exception as e:  # noqa: BLE001 - YAMLError, RecursionError, ValueError (dates)...
        raise ConvertError(f"{rel}: unreadable ({_first_line(e)})", EXIT_BEFORE) from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{rel}: not a NeMo model config", EXIT_BEFORE)
    # YAML aliases can make a small file a huge (or cyclic) tree: count its values as they
    # would be walked, without recursion, before anything walks it
    stack, nodes = [cfg], 0
    while stack:
        x = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConvertError(f"{rel}: more than {MAX_CONFIG_NODES} values once its YAML "
                               "aliases are expanded (or a cycle): not a NeMo model config",
                               EXIT_BEFORE)
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
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
    meta = _read_json(src, f"{wdir}/metadata.json")
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend == "zarr":
        arrays = _zarr_arrays(src, wdir)
    elif backend == "torch_dist":
        arrays = _dcp_arrays(src, wdir)
    else:
        raise ConvertError(f"{wdir}/metadata.json: sharded_backend {backend!r:.60}; nfb reads zarr "
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
    outs: list[_Out] = []
    try:
        cfg, arrays, backend = _open_checkpoint(source)
        arch = _arch(cfg)
        tok = _load_tokenizer(tokenizer)
        vocab = len(tok)
        outs, info = _plan(arrays, arch, vocab)
        for arr in info["read"]:
            arr.verify()  # every data file there, with the size its metadata implies
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
    except MemoryError:
        largest = max((o.nbytes for o in outs), default=0)
        raise ConvertError(f"out of memory while converting {src_path} (its largest tensor is "
                           f"{largest / 1e9:.1f} GB; nfb holds one tensor plus one chunk at a "
                           "time): free memory or use a larger machine", EXIT_READING) from None
    except OSError as e:   # disk full, a folder made read-only: one line
        from nfb.io.outputs import write_error
        if tmp is None:
            raise
        raise write_error(e, str(out_path)) from None
    else:
        return ConvertResult(
            src=str(src_path), out=str(out_path), recipe=recipe, attributes=attributes,
            head_bias=bias, backend=backend, dtype=info["dtype"], vocab_size=vocab,
            padded_vocab_size=info["padded_vocab"], tensors=len(outs), total_bytes=total,
            shards=names, seconds=time.monotonic() - t0)
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

    from nfb._version import __version__

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
