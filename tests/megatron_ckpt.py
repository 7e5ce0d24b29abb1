"""Write tiny NeMo-Aligner reward-model checkpoints in the published layout, without NeMo.

The layout is nvidia/Llama3-70B-SteerLM-RM's: `model_config.yaml` plus `model_weights/`, a
Megatron-core distributed checkpoint. With the zarr backend (Megatron-LM
`megatron/core/dist_checkpointing/strategies/zarr.py`) each tensor key is a directory holding a
zarr v2 `.zarray` (compressor null, dtype "bfloat16" for bf16) and raw C-order chunk files named
by chunk index; chunks are the shards a tensor-parallel save writes (`max_allowed_chunks()`):
one layer on dim 0 times one TP slice. Here TP=2 by default, so the reader must assemble grids.

`weights()` makes random tensors in mcore's global layout (layers stacked on dim 0, fused QKV
interleaved per query group, fc1 = [gate; up], vocab padded); `write_zarr` / `write_torch_dist`
save them; the tests compute their reference forward pass straight from the same dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PREFIX = "model."


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 value (as float32), round half to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def config(*, hidden=128, ffn=256, layers=2, heads=2, groups=1, head_dim=64, attributes=9,
           tp=2, divisible_by=128, **extra) -> dict:
    cfg = {
        "mcore_gpt": True, "precision": "bf16",
        "target": "nemo_aligner.models.nlp.gpt.megatron_gpt_regression_reward_model."
                  "MegatronGPTRegressionRewardModel",
        "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": ffn,
        "num_attention_heads": heads, "num_query_groups": groups, "kv_channels": head_dim,
        "normalization": "rmsnorm", "layernorm_epsilon": 1e-5, "activation": "fast-swiglu",
        "bias": False, "position_embedding_type": "rope", "rotary_base": 500000,
        "rotary_percentage": 1.0, "seq_len_interpolation_factor": None,
        "max_position_embeddings": 8192, "encoder_seq_length": 8192,
        "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": divisible_by,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
        "reward_model_type": "regression", "output_sequence": False, "use_avg_pool": False,
        "regression": {"num_attributes": attributes, "merge_attributes": False,
                       "attribute_weights": None, "loss_func": "regression"},
    }
    cfg.update(extra)
    return cfg


def weights(cfg: dict, vocab: int, seed: int = 0, bf16: bool = True) -> dict[str, np.ndarray]:
    """Random float32 tensors in mcore's global layout (bf16-representable when bf16)."""
    rng = np.random.default_rng(seed)
    H, F, L = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]
    nq, ng, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    n = cfg["regression"]["num_attributes"]
    mult = cfg["make_vocab_size_divisible_by"] * cfg["tensor_model_parallel_size"]
    padded = -(-vocab // mult) * mult

    def r(*shape, scale=0.08):
        return rng.normal(0, scale, size=shape).astype(np.float32)

    w = {
        "embedding.word_embeddings.weight": r(padded, H, scale=1.0),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": 1 + r(L, H, scale=0.1),
        "decoder.layers.self_attention.linear_qkv.weight": r(L, (nq + 2 * ng) * hd, H),
        "decoder.layers.self_attention.linear_proj.weight": r(L, H, nq * hd),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": 1 + r(L, H, scale=0.1),
        "decoder.layers.mlp.linear_fc1.weight": r(L, 2 * F, H),
        "decoder.layers.mlp.linear_fc2.weight": r(L, H, F),
        "decoder.final_layernorm.weight": 1 + r(H, scale=0.1),
        "rm_head.weight": r(n, H, scale=1.0),
        "rm_head.bias": r(n, scale=1.0) + 2.0,  # clearly non-zero, as trained heads are
    }
    w["embedding.word_embeddings.weight"][vocab:] = 0  # padding rows, as Megatron inits them
    return {k: bf16_round(v) if bf16 else v for k, v in w.items()}


def tp_chunks(key: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The chunk shape a TP=`tp` save gives each tensor (one shard per chunk)."""
    s = list(shape)
    if key.startswith("decoder.layers."):
        s[0] = 1  # one layer per chunk
    if key in ("embedding.word_embeddings.weight",):
        s[0] //= tp  # VocabParallelEmbedding: rows
    elif key.endswith(("linear_qkv.weight", "linear_fc1.weight")):
        s[1] //= tp  # column parallel (fc1: 2*tp fragments of the swiglu factory, [gate; up])
        if key.endswith("linear_fc1.weight"):
            s[1] //= 2
    elif key.endswith(("linear_proj.weight", "linear_fc2.weight")) or key == "rm_head.weight":
        s[-1] //= tp  # row parallel
    return tuple(s)


def _bytes(a: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(a, "<f4").tobytes()


def write_zarr_array(folder: Path, a: np.ndarray, chunks: tuple[int, ...],
                     dtype: str = "bfloat16") -> None:
    """One zarr v2 array as Megatron writes it: raw, uncompressed, whole edge chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".zarray").write_text(json.dumps({
        "chunks": list(chunks), "compressor": None, "dtype": "bfloat16" if dtype == "bfloat16"
        else "<f4", "fill_value": None, "filters": None, "order": "C",
        "shape": list(a.shape), "zarr_format": 2}))
    grid = [-(-s // c) for s, c in zip(a.shape, chunks)]
    for idx in np.ndindex(*grid):
        block = np.zeros(chunks, np.float32)
        sl = tuple(slice(i * c, min(i * c + c, s)) for i, c, s in zip(idx, chunks, a.shape))
        part = a[sl]
        block[tuple(slice(0, n) for n in part.shape)] = part
        (folder / ".".join(map(str, idx))).write_bytes(_bytes(block, dtype))


def _common(out: Path, cfg: dict, backend: str) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    (out / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    wdir = out / "model_weights"
    wdir.mkdir()
    (wdir / "metadata.json").write_text(json.dumps(
        {"sharded_backend": backend, "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))
    # common.pt is a torch pickle in real checkpoints: nfb must never open it
    (wdir / "common.pt").write_bytes(b"not a pickle nfb may read")
    return wdir


def write_zarr(out: Path, cfg: dict, w: dict[str, np.ndarray], dtype: str = "bfloat16",
               tp: int | None = None) -> Path:
    tp = tp or cfg["tensor_model_parallel_size"]
    wdir = _common(Path(out), cfg, "zarr")
    for key, a in w.items():
        write_zarr_array(wdir / (PREFIX + key), a, tp_chunks(key, a.shape, tp), dtype)
    # Transformer Engine extra state: a pickle that would run code if ever unpickled
    extra = wdir / (PREFIX + "decoder.layers.self_attention.linear_qkv._extra_state")
    extra.mkdir()
    (extra / "shard_0_2.pt").write_bytes(b"cos\nsystem\n(S'exit 99'\ntR.")
    return Path(out)


def write_torch_dist(out: Path, cfg: dict, w: dict[str, np.ndarray]) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    wdir = _common(Path(out), cfg, "torch_dist")
    sd = {PREFIX + k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in w.items()}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(wdir)), no_dist=True)
    return Path(out)


def reference_heads(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """The reward heads for one token sequence, computed straight from the mcore tensors
    (float64): embedding, L x (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU), final norm,
    head at the last token, plus the bias (NeMo-Aligner RewardModelHead)."""
    import torch

    d = {k: torch.from_numpy(v).double() for k, v in w.items()}
    F, L = cfg["ffn_hidden_size"], cfg["num_layers"]
    nq, ng, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    eps, theta, pg = cfg["layernorm_epsilon"], float(cfg["rotary_base"]), nq // ng
    T = len(ids)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)  # [T, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # x [T, n, hd]; mcore non-interleaved: rotate halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = d["embedding.word_embeddings.weight"][torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(L):
        h = rms(x, d["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i])
        qkv = (h @ d["decoder.layers.self_attention.linear_qkv.weight"][i].T)
        qkv = qkv.view(T, ng, pg + 2, hd)
        q = rope(qkv[:, :, :pg].reshape(T, nq, hd))
        k = rope(qkv[:, :, pg])
        v = qkv[:, :, pg + 1]
        outs = []
        for j in range(nq):
            g = j // pg
            s = (q[:, j] @ k[:, g].T) / hd ** 0.5 + mask
            outs.append(torch.softmax(s, -1) @ v[:, g])
        x = x + torch.cat(outs, -1) @ d["decoder.layers.self_attention.linear_proj.weight"][i].T
        h = rms(x, d["decoder.layers.mlp.linear_fc1.layer_norm_weight"][i])
        a = h @ d["decoder.layers.mlp.linear_fc1.weight"][i].T
        gate, up = a[:, :F], a[:, F:]
        x = x + (torch.nn.functional.silu(gate) * up) @ \
            d["decoder.layers.mlp.linear_fc2.weight"][i].T
    x = rms(x, d["decoder.final_layernorm.weight"])
    return (x[-1] @ d["rm_head.weight"].T + d["rm_head.bias"]).numpy()
