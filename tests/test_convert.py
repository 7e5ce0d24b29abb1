"""`nfb convert`: NeMo/Megatron reward-model checkpoints -> HF, checked against a reference
forward pass computed straight from the Megatron-layout tensors (tests/megatron_ckpt.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import megatron_ckpt as mc
import numpy as np
import orjson
import pytest
import tiny_models
import torch
from typer.testing import CliRunner

from nfb.cli import app
from nfb.models.steerlm import ALL_STEERLM_ATTRIBUTES, SYSTEM_PROMPT, steerlm_prompt
from nfb.tasks.reward import PRESETS

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Write a poem about the sea."},
     {"role": "assistant", "content": "The sea is wide."},
     {"role": "user", "content": "Explain photosynthesis to a child."},
     {"role": "assistant", "content": "Plants use sunlight to make sugar from water and air."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "0123456789"},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A Llama-3-style tokenizer whose length (494 + reserved specials) is not a multiple of
    256, so the TP=2 checkpoint's embedding is padded."""
    d = tmp_path_factory.mktemp("tok")
    tok = tiny_models.build_tokenizer(d)
    tok.add_special_tokens({"additional_special_tokens":
                            [f"<|reserved_special_token_{i}|>" for i in range(3)]})
    tok.save_pretrained(d)
    return d


def vocab_of(tok_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tok_dir))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    """(checkpoint dir, config, mcore weights): zarr, bf16, TP=2 chunks, padded vocab."""
    cfg = mc.config(groups=1)
    w = mc.weights(cfg, vocab_of(tok_dir), seed=3)
    assert w["embedding.word_embeddings.weight"].shape[0] > vocab_of(tok_dir)  # padded
    assert np.all(np.abs(w["rm_head.bias"]) > 0.1)
    path = mc.write_zarr(tmp_path_factory.mktemp("ck") / "rm", cfg, w)
    return path, cfg, w


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ckpt, tok_dir):
    path, cfg, w = ckpt
    out = tmp_path_factory.mktemp("hf") / "rm-hf"
    r = run("convert", path, "-o", out, "--tokenizer", tok_dir)
    assert r.exit_code == 0, r.output
    return out


def token_ids(hf_dir, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return tok(steerlm_prompt(messages), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ the prompt format


def test_steerlm_prompt_single_and_multi_turn():
    assert steerlm_prompt(CONVERSATIONS[0]) == (
        f"<extra_id_0>System\n{SYSTEM_PROMPT}\n"
        "<extra_id_1>User\nWhat is the capital of France?\n"
        "<extra_id_1>Assistant\nParis is the capital of France.\n<extra_id_2>")
    text = steerlm_prompt(CONVERSATIONS[1])
    assert text.count("<extra_id_2>") == 1 and text.endswith(
        "<extra_id_1>Assistant\nPlants use sunlight to make sugar from water and air.\n"
        "<extra_id_2>")
    assert "<extra_id_1>Assistant\nThe sea is wide.\n<extra_id_1>User\n" in text
    # a system turn is left out: NeMo-Aligner always renders its own SYSTEM_PROMPT
    assert steerlm_prompt(CONVERSATIONS[2]) == steerlm_prompt(CONVERSATIONS[2][1:])
    assert "You are terse." not in steerlm_prompt(CONVERSATIONS[2])
    assert "{value}" not in steerlm_prompt([{"role": "user", "content": "{value}"},
                                            {"role": "assistant", "content": "{}"}])[-30:]
    with pytest.raises(ValueError, match="last turn"):
        steerlm_prompt(CONVERSATIONS[0][:1])
    with pytest.raises(ValueError, match="role 'tool'"):
        steerlm_prompt([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_extra_id_tags_are_plain_text_for_a_llama3_tokenizer(converted):
    """Llama 3's tokenizer has no <extra_id_N> special tokens: they are split as text, and no
    BOS is added (add_special_tokens=False)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok("<extra_id_2>", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok.decode(ids) == "<extra_id_2>"
    assert token_ids(converted, CONVERSATIONS[0])[0] != tok.bos_token_id


# ------------------------------------------------------------------ the reader


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_zarr_reader_assembles_chunk_grids_with_edge_chunks(tmp_path, dtype):
    from nfb.models.nemo import _Source, _ZarrArray

    a = mc.bf16_round(np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32))
    mc.write_zarr_array(tmp_path / "x", a, (1, 2, 4), dtype)  # edge chunks on dims 1 and 2
    arr = _ZarrArray(_Source(tmp_path), "x", "x")

    def f32(v):
        return (v.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else v
    assert np.array_equal(f32(arr.read()), a)
    for layer in range(3):
        assert np.array_equal(f32(arr.read(layer)), a[layer])


# ------------------------------------------------------------------ conversion


def test_converted_config_carries_heads_bias_and_prompt_format(converted, ckpt, tok_dir):
    path, cfg, w = ckpt
    c = json.loads((converted / "config.json").read_text())
    assert c["architectures"] == ["LlamaForSequenceClassification"]
    assert c["num_labels"] == 9
    assert [c["id2label"][str(i)] for i in range(9)] == list(ALL_STEERLM_ATTRIBUTES)
    assert c["vocab_size"] == vocab_of(tok_dir) < w["embedding.word_embeddings.weight"].shape[0]
    assert c["num_key_value_heads"] == 1 and c["head_dim"] == 64
    nfb = c["nfb"]
    assert nfb["prompt_format"] == "steerlm" and nfb["attributes"] == list(ALL_STEERLM_ATTRIBUTES)
    assert nfb["head_bias"] == [float(x) for x in w["rm_head.bias"]]
    assert nfb["converted_from"] == str(path.resolve()) and nfb["nfb_version"]
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert "score.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    assert (converted / "tokenizer.json").exists()
    assert not list(converted.parent.glob(".*nfb-convert*"))  # no temporary left


def test_transformers_on_converted_model_matches_reference(converted, ckpt):
    """HF LlamaForSequenceClassification + SteerLM prompt + head bias == the reference forward
    computed from the Megatron tensors (GQA interleave, [gate; up], vocab trim, norms, RoPE)."""
    from transformers import LlamaForSequenceClassification

    _, cfg, w = ckpt
    bias = np.array(json.loads((converted / "config.json").read_text())["nfb"]["head_bias"])
    model = LlamaForSequenceClassification.from_pretrained(converted, dtype=torch.float32).eval()
    for messages in CONVERSATIONS:
        ids = token_ids(converted, messages)
        with torch.no_grad():
            heads = model(torch.tensor([ids])).logits[0].double().numpy() + bias
        ref = mc.reference_heads(w, cfg, ids)
        assert np.abs(ref).max() > 1  # the heads are far from zero: a real comparison
        np.testing.assert_allclose(heads, ref, atol=1e-3, rtol=0)


def _tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update({k: v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
                    for k, v in load_file(f).items()})
    return out


def test_gqa_with_two_groups_and_float32(tmp_path, tok_dir):
    """Two query groups of two heads each (head_dim 64) and a float32 checkpoint."""
    from transformers import LlamaForSequenceClassification

    cfg = mc.config(heads=4, groups=2, hidden=256, ffn=256)
    w = mc.weights(cfg, vocab_of(tok_dir), seed=5, bf16=False)
    path = mc.write_zarr(tmp_path / "rm", cfg, w, dtype="float32")
    out = tmp_path / "hf"
    r = run("convert", path, "-o", out, "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    bias = np.array(json.loads((out / "config.json").read_text())["nfb"]["head_bias"])
    model = LlamaForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(out, CONVERSATIONS[1])
    with torch.no_grad():
        heads = model(torch.tensor([ids])).logits[0].double().numpy() + bias
    np.testing.assert_allclose(heads, mc.reference_heads(w, cfg, ids), atol=1e-3, rtol=0)


def test_nemo_tar_small_shards_and_torch_dist_give_the_same_tensors(tmp_path, ckpt, converted,
                                                                    tok_dir):
    from nfb.models.nemo import convert_nemo

    path, cfg, w = ckpt
    reference = _tensors(converted)
    nemo = tmp_path / "rm.nemo"
    with tarfile.open(nemo, "w") as t:  # .nemo files are plain tars, members under ./
        t.add(path, arcname=".")
    seen = []
    res = convert_nemo(nemo, tmp_path / "from-tar", tokenizer=str(tok_dir),
                       max_shard_bytes=200_000, progress=lambda n, tot, name: seen.append(n))
    assert len(res.shards) > 1 and sum(seen) == res.total_bytes
    index = json.loads((tmp_path / "from-tar" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == res.shards
    for f in res.shards:
        assert (tmp_path / "from-tar" / f).stat().st_size <= 200_000 + 4096
    got = _tensors(tmp_path / "from-tar")
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[k], reference[k]) for k in reference)

    dist = mc.write_torch_dist(tmp_path / "dist", cfg, w)
    res = convert_nemo(dist, tmp_path / "from-dist", tokenizer=str(tok_dir))
    assert res.backend == "torch_dist"
    got = _tensors(tmp_path / "from-dist")
    assert all(np.array_equal(got[k], reference[k]) for k in reference)


# ------------------------------------------------------------------ bad input


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _one_line_error(r, code):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and r.output.strip().splitlines()[-1].startswith("error:")
    if code == 2:  # found before any work: the error is all there is
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_not_a_checkpoint(tmp_path, tok_dir):
    (tmp_path / "folder").mkdir()
    r = run("convert", tmp_path / "folder", "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 2)
    assert "not a NeMo checkpoint" in r.output and not (tmp_path / "out").exists()
    (tmp_path / "f.nemo").write_bytes(b"junk")
    r = run("convert", tmp_path / "f.nemo", "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 2)


def test_truncated_chunk_exits_1_and_leaves_nothing(tmp_path, ckpt, tok_dir):
    bad = _copy(ckpt[0], tmp_path / "rm")
    chunk = bad / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight" / "1.0.1"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 1)
    assert "1.0.1" in r.output and "truncated" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no output, no temp dir


def test_shape_that_disagrees_with_config(tmp_path, ckpt, tok_dir):
    bad = _copy(ckpt[0], tmp_path / "rm")
    zarray = bad / "model_weights" / "model.decoder.layers.mlp.linear_fc1.weight" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["shape"][1] = 384
    zarray.write_text(json.dumps(meta))
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 2)
    assert "linear_fc1.weight" in r.output and "ffn_hidden_size" in r.output


def test_missing_tensor_and_other_architectures(tmp_path, ckpt, tok_dir):
    import shutil

    import yaml

    bad = _copy(ckpt[0], tmp_path / "rm")
    shutil.rmtree(bad / "model_weights" / "model.rm_head.bias")
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 2)
    assert "rm_head.bias is missing" in r.output

    nemotron = _copy(ckpt[0], tmp_path / "nemotron")
    cfg = yaml.safe_load((nemotron / "model_config.yaml").read_text())
    cfg.update(normalization="layernorm1p", activation="squared-relu", rotary_percentage=0.5)
    (nemotron / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    r = run("convert", nemotron, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    _one_line_error(r, 2)
    assert "Nemotron-4" in r.output and "refuses" in r.output


def test_tokenizer_larger_than_embedding(tmp_path, ckpt, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens([f"word{i}" for i in range(40)])  # 497 + 40 > 512 rows
    tok.save_pretrained(tmp_path / "big")
    r = run("convert", ckpt[0], "-o", tmp_path / "out", "--tokenizer", tmp_path / "big")
    _one_line_error(r, 2)
    assert "embedding has 512 rows" in r.output


def test_existing_output_needs_overwrite(tmp_path, ckpt, tok_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = run("convert", ckpt[0], "-o", out, "--tokenizer", tok_dir)
    _one_line_error(r, 2)
    assert (out / "keep").exists()
    r = run("convert", ckpt[0], "-o", out, "--tokenizer", tok_dir, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert not (out / "keep").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# an nfb subprocess converting a checkpoint (about 7 s): not in the fast subset
@pytest.mark.slow
def test_subprocess_cli_shows_progress_on_stderr_only(tmp_path, ckpt, tok_dir):
    p = subprocess.run([sys.executable, "-m", "nfb", "convert", str(ckpt[0]), "-o",
                        str(tmp_path / "out"), "--tokenizer", str(tok_dir)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "convert" in p.stderr and "9 heads" in p.stderr


# ------------------------------------------------------------------ scoring through vLLM


@pytest.mark.slow
def test_score_converted_model_through_vllm_matches_reference(cli, converted, ckpt, tmp_path):
    """Convert (above, with the CLI), then `nfb score` through vLLM in float32: every row's 9
    heads equal the reference forward from the Megatron tensors (bias included), with the
    SteerLM prompt applied by nfb itself, and reward == preset weights . heads."""
    import pyarrow.parquet as pq

    _, cfg, w = ckpt
    rows = [{"id": i, "messages": m} for i, m in enumerate(CONVERSATIONS)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out.parquet"
    r = cli("score", src, "-o", out, "--model", converted, "--messages-field", "messages",
            "--dtype", "float32", "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0, r.output
    weights = PRESETS["llama3-70b-steerlm"][0]
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(rows)
    for row, messages in zip(table, CONVERSATIONS):
        assert row["nfb_error"] is None
        ref = mc.reference_heads(w, cfg, token_ids(converted, messages))
        got = np.array([row[a] for a in ALL_STEERLM_ATTRIBUTES])
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
        assert math.isclose(row["reward"], float(np.dot(weights, got)), abs_tol=1e-6)
        assert math.isclose(row["reward"], float(np.dot(weights, ref)), abs_tol=1e-3)


def test_note_says_what_nfb_applies_to_a_converted_model(stub_cli, converted, tmp_path):
    """A converted SteerLM RM of a shape no recipe knows: the note names the SteerLM prompt,
    the head bias and the weights nfb applies (and why), never a 'generic path' it does not
    take; the provenance agrees."""
    import pyarrow.parquet as pq

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"messages": m}) + b"\n" for m in CONVERSATIONS))
    out = tmp_path / "out.parquet"
    # no recipe names this shape, so no card gives its weights: they must be given
    r = stub_cli("score", src, "-o", out, "--model", converted, "--messages-field", "messages")
    assert r.exit_code == 2 and "--weights" in r.output
    r = stub_cli("score", src, "-o", out, "--model", converted, "--messages-field", "messages",
                 "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0, r.output
    note = " ".join(r.output.split())
    assert "made by `nfb convert`" in note and "SteerLM prompt format" in note
    assert "head bias (9 values" in note and "llama3-70b-steerlm" in note
    assert "generic path" not in note and "chat template" not in note and "raw heads" not in note
    meta = pq.read_schema(out).metadata
    prov = next(orjson.loads(v) for k, v in meta.items() if b"nfb" in k)
    assert "steerlm" in orjson.dumps(prov).decode().lower()


# NeMo-Aligner's SteerLM text, written out here from examples/nlp/data/steerlm/common.py and
# attribute_annotate.py (SYSTEM_PROMPT_TEMPLATE.format(value=SYSTEM_PROMPT), then each turn,
# then <extra_id_2>), independently of nfb.models.steerlm
NEMO_SYSTEM = ("<extra_id_0>System\nA chat between a curious user and an artificial intelligence "
               "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
               "questions.\n")


def nemo_text(turns: list[tuple[str, str]]) -> str:
    who = {"user": "User", "assistant": "Assistant"}
    return NEMO_SYSTEM + "".join(f"<extra_id_1>{who[r]}\n{c}\n" for r, c in turns) + \
        "<extra_id_2>"


@pytest.mark.slow
def test_system_turns_and_long_histories_score_as_nemo_aligner(cli, converted, ckpt, tmp_path):
    """Rows with a system turn and long multi-turn histories through vLLM == the reference
    forward from the Megatron tensors on NeMo-Aligner's own text (its system prompt, never the
    row's); the left-out system turns are counted, named once and recorded."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    _, cfg, w = ckpt
    history = [("user", "Write a poem about the sea."), ("assistant", "The sea is wide."),
               ("user", "Explain photosynthesis to a child."),
               ("assistant", "Plants use sunlight to make sugar from water and air."),
               ("user", "What is the capital of France?"),
               ("assistant", "Paris is the capital of France."),
               ("user", "0123456789"),
               ("assistant", "The quick brown fox jumps over the lazy dog.")]
    convs = [
        [("system", "You are terse."), ("user", "Hi"), ("assistant", "Héllo wörld")],
        history,
        [("system", "Answer in French."), *history],
        history[:2],
    ]
    rows = [{"id": i, "messages": [{"role": r, "content": c} for r, c in conv]}
            for i, conv in enumerate(convs)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out.parquet"
    r = cli("score", src, "-o", out, "--model", converted, "--messages-field", "messages",
            "--dtype", "float32", "--weights", "llama3-70b-steerlm")
    assert r.exit_code == 0, r.output
    assert r.output.count("system turn is left out") == 1            # named once
    assert "rows noted system_turn_left_out" in r.output
    tok = AutoTokenizer.from_pretrained(converted)
    table = pq.read_table(out)
    for row, conv in zip(table.to_pylist(), convs):
        assert row["nfb_error"] is None
        text = nemo_text([(r_, c) for r_, c in conv if r_ != "system"])
        ref = mc.reference_heads(w, cfg, tok(text, add_special_tokens=False)["input_ids"])
        got = np.array([row[a] for a in ALL_STEERLM_ATTRIBUTES])
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    meta = orjson.loads(table.schema.metadata[b"nfb"])
    assert meta["summary"]["notes"] == {"system_turn_left_out": 2}
    assert "SYSTEM_PROMPT" in meta["task_settings"]["system_turn"]
