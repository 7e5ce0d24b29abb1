"""`nfb convert` on hostile checkpoints: no code runs, nothing outside the checkpoint is read,
memory stays bounded, and each refusal is one `error:` line with the exit code of
nfb/errors.py (2: refused before any work; 1: damaged data, e.g. a chunk of the wrong size).

The checkpoints are real ones (tests/megatron_ckpt.py: zarr as Megatron writes it, torch_dist
through torch.distributed.checkpoint itself), then damaged the way an attacker or an unlucky
download would."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import megatron_ckpt as mc
import numpy as np
import pytest
import tiny_models
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nasty import HOSTILE_GLOBALS, zarray_mutations
from typer.testing import CliRunner

from nfb.cli import app

WDIR = "model_weights"
NORM = "model.decoder.final_layernorm.weight"          # 1-D, one chunk "0"
FC2 = "model.decoder.layers.mlp.linear_fc2.weight"     # 3-D, chunks "i.0.j"
EMB = "model.embedding.word_embeddings.weight"
GIB16 = 16 * 2**30


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(r, code: int, *words: str) -> None:
    """One `error:` line and nothing else (all of these are found before any tensor is
    written), the exit code, no traceback, and the words that say what is wrong."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for w in words:
        assert w in r.output, (w, r.output)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tiny_models.build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    """(zarr checkpoint folder, config, weights): bf16, TP=2 chunks, padded vocab."""
    from transformers import AutoTokenizer

    cfg = mc.config(groups=1)
    w = mc.weights(cfg, len(AutoTokenizer.from_pretrained(tok_dir)), seed=7)
    return mc.write_zarr(tmp_path_factory.mktemp("ck") / "rm", cfg, w), cfg, w


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ckpt, tok_dir) -> dict[str, np.ndarray]:
    """The tensors nfb writes for the untouched checkpoint."""
    out = tmp_path_factory.mktemp("ref") / "hf"
    r = run("convert", ckpt[0], "-o", out, "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    return tensors(out)


@pytest.fixture(scope="module")
def dist(tmp_path_factory, ckpt) -> Path:
    """The same weights as a torch_dist checkpoint written by torch.distributed.checkpoint."""
    _, cfg, w = ckpt
    return mc.write_torch_dist(tmp_path_factory.mktemp("dist") / "rm", cfg, w)


def tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update({k: v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
                    for k, v in load_file(f).items()})
    return out


def same(out: Path, reference) -> bool:
    got = tensors(out)
    return got.keys() == reference.keys() and all(
        np.array_equal(got[k], reference[k]) for k in reference)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------ the DCP .metadata pickle


def pickled_call(module: str, name: str, arg, stack_global: bool = False,
                 proto: int = 4) -> bytes:
    """A pickle that looks `module`.`name` up and calls it with one argument."""
    def text(s: str) -> bytes:
        b = s.encode()
        return b"X" + len(b).to_bytes(4, "little") + b

    if isinstance(arg, bytes):
        a = b"B" + len(arg).to_bytes(4, "little") + arg
    else:
        a = text(arg)
    find = (text(module) + text(name) + b"\x93" if stack_global
            else b"c" + module.encode() + b"\n" + name.encode() + b"\n")
    return bytes([0x80, proto]) + find + b"(" + a + b"tR."


def argument_for(module: str, name: str, marker: Path):
    """What each hostile global is called with so that, if it ran, `marker` would appear."""
    if name.endswith("exec"):
        return f"open({str(marker)!r}, 'w').write('x')"
    if name.endswith("eval"):
        return f"__import__('os').system('touch {marker}')"
    if name.endswith("loads"):
        return pickled_call("os", "system", f"touch {marker}")
    return f"touch {marker}"


def with_metadata(dist: Path, dst: Path, data: bytes) -> Path:
    bad = copy(dist, dst)
    (bad / WDIR / ".metadata").write_bytes(data)
    return bad


@pytest.mark.parametrize("module,name,stack", [
    ("torch.distributed.checkpoint.filesystem", "os.system", False),  # the reported exploit
    ("torch.distributed.checkpoint.filesystem", "os.system", True),
    ("torch.distributed.checkpoint.metadata", "os.system", True),
    ("torch.distributed.checkpoint.filesystem", "pickle.loads", False),
    ("torch", "serialization.os.system", True),
    ("builtins", "exec", False),
    ("builtins", "eval", True),
    ("posix", "system", False),
])
def test_hostile_metadata_pickle_runs_nothing(tmp_path, dist, tok_dir, module, name, stack):
    marker = tmp_path / "PWNED"
    data = pickled_call(module, name, argument_for(module, name, marker), stack)
    bad = with_metadata(dist, tmp_path / "rm", data)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, ".metadata", "refusing to unpickle")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_hostile_global_inside_real_metadata_runs_nothing(tmp_path, dist, tok_dir):
    """The real Metadata object, with one field holding an object that reduces to os.system:
    the allow-list stops it, though everything around it is DCP's own classes."""
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    md = pickle.loads((dist / WDIR / ".metadata").read_bytes())  # our own file: trusted here
    md.planner_data = {"x": Evil()}
    bad = with_metadata(dist, tmp_path / "rm", pickle.dumps(md))
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "refusing to unpickle", "system")
    assert not marker.exists()


def test_hostile_pickle_in_a_subprocess(tmp_path, dist, tok_dir):
    """The exploit as reported, through `python -m nfb convert`: no file written, one line."""
    marker = tmp_path / "PWNED"
    bad = with_metadata(dist, tmp_path / "rm", pickled_call(
        "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"))
    p = subprocess.run([sys.executable, "-m", "nfb", "convert", str(bad), "-o",
                        str(tmp_path / "out"), "--tokenizer", str(tok_dir)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert not marker.exists()
    assert p.stdout == "" and p.stderr.strip().count("\n") == 0, p.stderr
    assert "refusing to unpickle torch.distributed.checkpoint.filesystem.os.system" in p.stderr


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(glob=HOSTILE_GLOBALS, stack=st.booleans(), proto=st.sampled_from([2, 4, 5]))
def test_property_no_hostile_global_is_ever_called(tmp_path_factory, dist, tok_dir, glob,
                                                   stack, proto):
    tmp = tmp_path_factory.mktemp("pk")
    marker = tmp / "PWNED"
    module, name = glob
    data = pickled_call(module, name, argument_for(module, name, marker), stack, proto)
    r = run("convert", with_metadata(dist, tmp / "rm", data), "-o", tmp / "out",
            "--tokenizer", tok_dir)
    refused(r, 2, "refusing to unpickle")
    assert not marker.exists()


def test_allow_list_reads_megatron_style_metadata(tmp_path, ckpt, tok_dir, reference):
    """Megatron's torch_dist checkpoints also hold sharded objects (BytesStorageMetadata) and
    an `mcore_data` dict on the Metadata: those unpickle, and the weights are the zarr's."""
    import torch.distributed.checkpoint as dcp

    _, cfg, w = ckpt
    out = tmp_path / "rm"
    wdir = mc._common(out, cfg, "torch_dist")
    sd = {mc.PREFIX + k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in w.items()}
    extra = io.BytesIO()
    torch.save([b"te fp8 state"], extra)
    sd[mc.PREFIX + "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_1"] = extra
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(wdir)), no_dist=True)
    md = pickle.loads((wdir / ".metadata").read_bytes())
    assert any(type(m).__name__ == "BytesStorageMetadata" for m in md.state_dict_metadata.values())
    md.mcore_data = {k: {} for k in md.state_dict_metadata}  # as MCoreSavePlanner adds it
    (wdir / ".metadata").write_bytes(pickle.dumps(md))
    r = run("convert", out, "-o", tmp_path / "hf", "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    assert same(tmp_path / "hf", reference)


def test_dcp_data_file_outside_the_checkpoint_is_never_read(tmp_path, dist, tok_dir):
    bad = copy(dist, tmp_path / "rm")
    md = pickle.loads((bad / WDIR / ".metadata").read_bytes())
    (tmp_path / "outside.distcp").write_bytes((bad / WDIR / "__0_0.distcp").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (bad / WDIR / ".metadata").write_bytes(pickle.dumps(md))
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "not a file name inside the checkpoint folder")

    linked = copy(dist, tmp_path / "linked")
    (linked / WDIR / "__0_0.distcp").unlink()
    (linked / WDIR / "__0_0.distcp").symlink_to(tmp_path / "outside.distcp")
    r = run("convert", linked, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "outside the checkpoint", "cp -rL")
    assert not (tmp_path / "out").exists()


def test_dcp_truncated_data_and_huge_metadata(tmp_path, dist, tok_dir):
    short = copy(dist, tmp_path / "short")
    data = short / WDIR / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    r = run("convert", short, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 1, "__0_0.distcp", "truncated")

    huge = copy(dist, tmp_path / "huge")
    os.truncate(huge / WDIR / ".metadata", GIB16)  # sparse: 16 GiB that take no disk
    r = run("convert", huge, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, ".metadata", "17179869184 bytes")


# ------------------------------------------------------------------ .nemo tar members


def tar_entries(folder: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    for p in sorted(folder.rglob("*")):
        ti = tarfile.TarInfo("./" + p.relative_to(folder).as_posix())
        if p.is_dir():
            ti.type = tarfile.DIRTYPE
            out.append((ti, b""))
        else:
            data = p.read_bytes()
            ti.size = len(data)
            out.append((ti, data))
    return out


def write_tar(path: Path, entries) -> Path:
    """A tar written header by header; data None leaves a hole of the member's size (a
    16 GiB member that takes no disk)."""
    with open(path, "wb") as f:
        for ti, data in entries:
            f.write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            if data is None:
                f.seek(ti.size + (-ti.size % 512), 1)
            else:
                f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, size, link
    return ti


def test_nemo_tar_written_by_hand_converts(tmp_path, ckpt, tok_dir, reference):
    """The tar writer below makes tars nfb reads: the refusals that follow are the members'."""
    nemo = write_tar(tmp_path / "rm.nemo", tar_entries(ckpt[0]))
    r = run("convert", nemo, "-o", tmp_path / "hf", "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    assert same(tmp_path / "hf", reference)


@pytest.mark.parametrize("extra,words", [
    (member(f"./{WDIR}/{NORM}/0", tarfile.SYMTYPE, link="/etc/passwd"), ["symlink",
                                                                         "/etc/passwd"]),
    (member("./model_config.yaml", tarfile.LNKTYPE, link="/etc/shadow"), ["hard link"]),
    (member("./dev", tarfile.CHRTYPE), ["device"]),
    (member("./fifo", tarfile.FIFOTYPE), ["device or FIFO"]),
    (member("../../evil.sh", size=3), ["climbs out"]),
    (member("/etc/cron.d/evil", size=3), ["climbs out"]),
    (member(f"./{WDIR}/../../evil", size=3), ["climbs out"]),
])
def test_hostile_tar_members_are_refused(tmp_path, ckpt, tok_dir, extra, words):
    entries = tar_entries(ckpt[0])
    if extra.type == tarfile.SYMTYPE:  # in place of the real chunk
        entries = [e for e in entries if e[0].name != extra.name]
    entries.append((extra, b"x" * extra.size))
    nemo = write_tar(tmp_path / "rm.nemo", entries)
    r = run("convert", nemo, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "tar member", *words)
    assert not (tmp_path / "out").exists()


def test_huge_tar_members_are_refused_from_the_header(tmp_path, ckpt, tok_dir):
    """A 16 GiB model_config.yaml (a hole in the tar) is refused by size; a 16 GiB chunk by the
    size its .zarray implies: nothing is read, so memory stays small."""
    entries = tar_entries(ckpt[0])
    yaml_at = next(i for i, (ti, _) in enumerate(entries) if ti.name == "./model_config.yaml")
    big = [(e if i != yaml_at else (member("./model_config.yaml", size=GIB16), None))
           for i, e in enumerate(entries)]
    r = run("convert", write_tar(tmp_path / "a.nemo", big), "-o", tmp_path / "out",
            "--tokenizer", tok_dir)
    refused(r, 2, "model_config.yaml", "17179869184 bytes", "4 MiB")

    chunk = f"./{WDIR}/{FC2}/1.0.1"
    big = [(e if e[0].name != chunk else (member(chunk, size=GIB16), None)) for e in entries]
    r = run("convert", write_tar(tmp_path / "b.nemo", big), "-o", tmp_path / "out",
            "--tokenizer", tok_dir)
    refused(r, 1, "1.0.1", "17179869184 bytes, expected")
    assert not (tmp_path / "out").exists()


def test_gnu_sparse_member_is_refused(tmp_path, ckpt, tok_dir):
    """GNU tar -S writes a 16 GiB chunk as a sparse member (the MemoryError of the report)."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = copy(ckpt[0], tmp_path / "rm")
    os.truncate(src / WDIR / FC2 / "1.0.1", GIB16)
    nemo = tmp_path / "rm.nemo"
    subprocess.run(["tar", "-S", "--format=gnu", "-cf", str(nemo), "-C", str(src), "."],
                   check=True, timeout=120)
    assert nemo.stat().st_size < 50 * 2**20
    r = run("convert", nemo, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "1.0.1", "sparse")


# ------------------------------------------------------------------ zarr arrays


def set_zarray(folder: Path, key: str, **fields) -> None:
    p = folder / WDIR / key / ".zarray"
    meta = json.loads(p.read_text())
    meta.update(fields)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("key,fields,words", [
    (EMB, {"shape": [2**40, 128], "chunks": [256, 128]}, ["chunks, more than"]),
    (EMB, {"shape": [2**40, 128], "chunks": [2**40, 128]}, ["embedding has 1099511627776 rows",
                                                          "not a real embedding"]),
    (FC2, {"shape": [2, 128, 10**14]}, ["chunks, more than the 1000000"]),
    (FC2, {"shape": [2, 128, 512]}, ["linear_fc2.weight: shape", "ffn_hidden_size"]),
    (FC2, {"shape": [2, 128, -256]}, ["shape [2, 128, -256] is not a list"]),
    (FC2, {"shape": ["2", 128, 256]}, ["is not a list"]),
    (FC2, {"shape": [2] * 9}, ["at most 8"]),
    (FC2, {"chunks": [10**12, 10**12, 10**12]}, ["do not fit shape"]),
    (FC2, {"chunks": [1, 0, 128]}, ["chunks [1, 0, 128] is not a list"]),
    (FC2, {"chunks": [1, 64]}, ["do not fit shape"]),
    (FC2, {"dimension_separator": "../"}, ["dimension_separator '../'"]),
    (FC2, {"dimension_separator": "/../../../../.."}, ["only '.' or '/'"]),
    (NORM, {"dimension_separator": ["."]}, ["dimension_separator"]),
    (FC2, {"dtype": "|O"}, ["dtype '|O' is not one nfb reads"]),
    (FC2, {"dtype": ["bfloat16"]}, ["dtype ['bfloat16']"]),
    (FC2, {"dtype": "<i8"}, ["dtype '<i8'"]),
    (FC2, {"compressor": {"id": "blosc"}}, ["uncompressed"]),
])
def test_hostile_zarray_is_refused_before_reading(tmp_path, ckpt, tok_dir, key, fields, words):
    bad = copy(ckpt[0], tmp_path / "rm")
    set_zarray(bad, key, **fields)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,words", [
    ("[]", ["not a zarr array description"]),
    ("{", ["unreadable"]),
    ("[" * 100_000 + "]" * 100_000, ["unreadable"]),
])
def test_unreadable_zarray(tmp_path, ckpt, tok_dir, text, words):
    bad = copy(ckpt[0], tmp_path / "rm")
    (bad / WDIR / FC2 / ".zarray").write_text(text)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, ".zarray", *words)


def test_separator_cannot_read_outside_the_array(tmp_path, ckpt, tok_dir):
    """Chunk names are indices joined by "." or "/" only: a separator that climbs out is
    refused, even when the file it would reach exists with the right size."""
    bad = copy(ckpt[0], tmp_path / "rm")
    secret = (bad / WDIR / FC2 / "0.0.0").read_bytes()
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "0").write_bytes(b"S" * len(secret))  # where "../../.." would lead
    set_zarray(bad, FC2, dimension_separator="/../../../")
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "dimension_separator")


def test_nested_separator_converts_exactly(tmp_path, ckpt, tok_dir, reference):
    """zarr's "/" separator (nested chunk folders) is read, to the same tensors."""
    src = copy(ckpt[0], tmp_path / "rm")
    d = src / WDIR / FC2
    for f in [p for p in d.iterdir() if p.name != ".zarray"]:
        nested = d.joinpath(*f.name.split("."))
        nested.parent.mkdir(parents=True, exist_ok=True)
        f.rename(nested)
    set_zarray(src, FC2, dimension_separator="/")
    r = run("convert", src, "-o", tmp_path / "hf", "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    assert same(tmp_path / "hf", reference)


def test_symlinked_chunk_outside_the_checkpoint_is_refused(tmp_path, ckpt, tok_dir):
    bad = copy(ckpt[0], tmp_path / "rm")
    chunk = bad / WDIR / NORM / "0"
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"K" * chunk.stat().st_size)  # the size the .zarray wants
    chunk.unlink()
    chunk.symlink_to(secret)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "outside the checkpoint", str(secret))
    assert not (tmp_path / "out").exists()


def test_symlinks_inside_and_into_the_hub_cache_blobs_are_read(tmp_path, ckpt, tok_dir,
                                                               reference):
    """A folder in the Hugging Face cache (snapshots/REV/ files -> ../../blobs/SHA) and a
    symlink to a file inside the checkpoint convert as the plain folder does."""
    repo = tmp_path / "hub" / "models--nvidia--rm"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    blobs.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in ckpt[0].rglob("*") if p.is_file())):
        link = snap / f.relative_to(ckpt[0])
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blobs / f"sha{i}")
        link.symlink_to(os.path.relpath(blobs / f"sha{i}", link.parent))
    r = run("convert", snap, "-o", tmp_path / "hf", "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    assert same(tmp_path / "hf", reference)

    inside = copy(ckpt[0], tmp_path / "rm")
    (inside / "spare").mkdir()
    (inside / WDIR / NORM / "0").rename(inside / "spare" / "0")
    (inside / WDIR / NORM / "0").symlink_to(inside / "spare" / "0")
    r = run("convert", inside, "-o", tmp_path / "hf2", "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    assert same(tmp_path / "hf2", reference)


def test_huge_sparse_files_in_a_folder_are_refused_from_their_size(tmp_path, ckpt, tok_dir):
    bad = copy(ckpt[0], tmp_path / "rm")
    os.truncate(bad / WDIR / FC2 / "1.0.1", GIB16)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 1, "1.0.1", "17179869184 bytes, expected")

    bad = copy(ckpt[0], tmp_path / "rm2")
    os.truncate(bad / WDIR / FC2 / ".zarray", GIB16)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, ".zarray", "4 MiB")


def test_fifo_is_refused_not_waited_on(tmp_path, ckpt, tok_dir):
    """A FIFO named like a checkpoint file would block an open() for ever."""
    bad = copy(ckpt[0], tmp_path / "rm")
    (bad / WDIR / FC2 / ".zarray").unlink()
    os.mkfifo(bad / WDIR / FC2 / ".zarray")
    p = subprocess.run([sys.executable, "-m", "nfb", "convert", str(bad), "-o",
                        str(tmp_path / "out"), "--tokenizer", str(tok_dir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr
    assert p.stderr.strip().count("\n") == 0


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([EMB, FC2, NORM]), change=zarray_mutations())
@example(key=NORM, change=("zarr_format", 2.0))  # the same to zarr: converts exactly
@example(key=FC2, change=("dimension_separator", "/"))  # chunks not nested: exit 1
def test_property_any_zarray_converts_exactly_or_is_refused_in_one_line(
        tmp_path_factory, ckpt, tok_dir, reference, key, change):
    """Whatever a `.zarray` holds: either the weights are exactly the checkpoint's (a change
    zarr treats as the same, e.g. zarr_format 2.0), or one error line with exit 1 or 2."""
    tmp = tmp_path_factory.mktemp("za")
    bad = copy(ckpt[0], tmp / "rm")
    set_zarray(bad, key, **dict([change]))
    r = run("convert", bad, "-o", tmp / "out", "--tokenizer", tok_dir, "-q")
    if r.exit_code == 0:
        assert same(tmp / "out", reference)
    else:
        refused(r, r.exit_code)
        assert r.exit_code in (1, 2)
        assert not (tmp / "out").exists()


# ------------------------------------------------------------------ model_config.yaml & co.


@pytest.mark.parametrize("text,words", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)) + "normalization: *j\n", ["YAML aliases"]),
    ("x: &x [*x]\nnormalization: *x\n", ["YAML aliases"]),
    ("[" * 50_000, ["unreadable"]),
    ("!!python/object/apply:os.system ['touch PWNED']\n", ["unreadable"]),
])
def test_hostile_model_config(tmp_path, ckpt, tok_dir, text, words):
    bad = copy(ckpt[0], tmp_path / "rm")
    (bad / "model_config.yaml").write_text(text)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "model_config.yaml", *words)
    assert not Path("PWNED").exists()


@pytest.mark.parametrize("change,words", [
    ({"rotary_percentage": "all"}, ["rotary_percentage is 'all', expected a number"]),
    ({"layernorm_epsilon": float("nan")}, ["layernorm_epsilon is nan"]),
    ({"regression": [1, 2]}, ["regression is [1, 2], expected a mapping"]),
    ({"hidden_size": 2**62}, ["hidden_size is 4611686018427387904"]),
])
def test_config_values_of_the_wrong_kind(tmp_path, ckpt, tok_dir, change, words):
    import yaml

    bad = copy(ckpt[0], tmp_path / "rm")
    cfg = yaml.safe_load((bad / "model_config.yaml").read_text())
    cfg.update(change)
    (bad / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, *words)


def test_metadata_json_that_is_not_an_object(tmp_path, ckpt, tok_dir):
    bad = copy(ckpt[0], tmp_path / "rm")
    (bad / WDIR / "metadata.json").write_text('["zarr"]')
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "metadata.json", "sharded_backend None")


# ------------------------------------------------------------------ a converted model's nfb key


@pytest.mark.parametrize("change,words", [
    ({"head_bias": "2.0"}, ["nfb.head_bias is '2.0', not a list of numbers"]),
    ({"head_bias": [1.0, None] + [0.0] * 7}, ["nfb.head_bias"]),
    ({"head_bias": 9}, ["nfb.head_bias is 9"]),
    ({"prompt_format": "{{ exec }}"}, ["nfb.prompt_format"]),
    ({"recipe": ["steerlm-rm"]}, ["nfb.recipe"]),
])
def test_hostile_nfb_key_in_a_converted_model(stub_cli, tmp_path, ckpt, tok_dir, change,
                                              words):
    """`nfb score` acts on the nfb key `nfb convert` writes (head bias, prompt format,
    recipe): one of the wrong kind is a one-line usage error, not a traceback mid-run."""
    model = tmp_path / "hf"
    r = run("convert", ckpt[0], "-o", model, "--tokenizer", tok_dir, "-q")
    assert r.exit_code == 0, r.output
    cfg = json.loads((model / "config.json").read_text())
    cfg["nfb"].update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n")
    r = stub_cli("score", src, "-o", tmp_path / "out.parquet", "--model", model,
                 "--messages-field", "messages")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()  # a `note:` on the recipe may come first
    assert [x for x in lines if "error:" in x] == lines[-1:], r.output
    for w in ("config.json", *words, "convert the checkpoint again"):
        assert w in lines[-1], (w, r.output)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_huge_long_name_or_pax_header_is_refused(tmp_path, ckpt, tok_dir, kind):
    """tarfile reads these headers whole: a 16 GiB one (a hole) is refused from its size."""
    entries = [(member("././@LongLink", kind, size=GIB16), None)] + tar_entries(ckpt[0])
    r = run("convert", write_tar(tmp_path / "rm.nemo", entries), "-o", tmp_path / "out",
            "--tokenizer", tok_dir)
    refused(r, 2, "not a NeMo checkpoint", "17179869184 bytes, more than the 1 MiB")


@pytest.mark.parametrize("name", ["model.x\nerror: all is fine", "model.\x1b[2Jx",
                                  "model.[red]x"])
def test_hostile_tensor_names_print_as_one_line_of_text(tmp_path, ckpt, tok_dir, name):
    """A tensor directory named with a newline, a terminal escape or rich markup: the error
    that names it is still one line, shown as text (no fake second line, no escape, no
    style taken from the name)."""
    bad = copy(ckpt[0], tmp_path / "rm")
    shutil.copytree(bad / WDIR / NORM, bad / WDIR / name)
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "unexpected tensor")
    assert "\x1b" not in r.output
    if "[red]" in name:
        assert "model.[red]x" in r.output


def test_markup_in_a_dcp_key_is_text(tmp_path, dist, tok_dir):
    """A torch_dist key holding a rich closing tag ("[/]") would be a MarkupError traceback
    if printed as markup."""
    bad = copy(dist, tmp_path / "rm")
    md = pickle.loads((bad / WDIR / ".metadata").read_bytes())
    md.state_dict_metadata["model.[/]x"] = md.state_dict_metadata[NORM]
    (bad / WDIR / ".metadata").write_bytes(pickle.dumps(md))
    r = run("convert", bad, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    refused(r, 2, "unexpected tensor model.[/]x")
