"""Object storage: inputs and outputs as URLs (`s3://bucket/key`, and any fsspec URL whose
package is installed: `gs://` with gcsfs, `hf://` with huggingface_hub, ...).

- Inputs are streamed (a read-ahead buffer of `BLOCK` bytes, never a copy of the file);
  a URL with `*`, `?` or `[` is a glob, and a URL that names a prefix ("directory") stands
  for every input file under it, as for local paths.
- Outputs are written locally and uploaded in one step when they are complete: an S3 PUT
  (or the completion of a multipart upload) makes an object visible whole or not at all, so
  the store never holds a half-written output. The run's work directory (checkpoint parts)
  stays on local disk, under `NFB_CACHE` (default `~/.cache/nfb`), keyed by the output URL:
  a run killed at any instant (even `kill -9`) resumes from it when the same command runs
  again on the same machine. Checkpoint parts on the store itself would need a rename that
  S3 does not have (copy + delete per part, and a listing that may lag), for no gain.
- Credentials and endpoint come from the store's usual environment (`AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...),
  read by the store's own library; nfb never prints them (messages are scrubbed of them).
- A missing bucket or key, a denied request, or a dropped connection is a `StorageError`:
  one line, exit 1 (an output bucket that does not exist is found before the model loads,
  exit 2).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from nfb.errors import InputError, UsageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
BLOCK = 8 << 20
_PACKAGES = {"s3": "s3fs (pip install 'nfb[s3]')", "s3a": "s3fs (pip install 'nfb[s3]')",
             "gs": "gcsfs (pip install gcsfs)", "gcs": "gcsfs (pip install gcsfs)",
             "hf": "huggingface_hub (pip install huggingface_hub)",
             "az": "adlfs (pip install adlfs)", "abfs": "adlfs (pip install adlfs)"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS")
_FS: dict[tuple, object] = {}


class StorageError(InputError):
    """The store refused or failed a request (exit 1)."""


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (any scheme but file://, which is a local path)."""
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _env_key() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.startswith(("AWS_", "FSSPEC_", "HF_", "GOOGLE_"))))


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`. A scheme whose package is missing,
    or unknown to fsspec, is a UsageError (exit 2)."""
    proto = scheme(url)
    try:
        import fsspec
    except ImportError:
        need = _PACKAGES.get(proto, f"fsspec and its package for {proto}://")
        raise UsageError(f"{url}: reading {proto}:// needs {need}") from None
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError:
        need = _PACKAGES.get(proto, f"the fsspec package for {proto}://")
        raise UsageError(f"{url}: reading {proto}:// needs {need}") from None
    except ValueError:
        raise UsageError(f"{url}: unknown storage scheme {proto}://") from None
    key = (proto, _env_key())
    fs = _FS.get(key)
    if fs is None:
        kw: dict = {"skip_instance_cache": True}
        if proto in ("s3", "s3a"):
            # fail in seconds on an unreachable endpoint rather than retry for minutes
            kw["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 120,
                                   "retries": {"max_attempts": 3, "mode": "standard"}}
        try:
            fs = cls(**kw)
        except TypeError:
            fs = cls()
        _FS[key] = fs
    return fs, cls._strip_protocol(url)


def _scrub(text: str) -> str:
    for k in _SECRET_ENV:
        v = os.environ.get(k)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


def describe(e: BaseException) -> str:
    """What went wrong with a store request, in a few words (no credentials)."""
    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    low = (name + " " + first).lower()
    if isinstance(e, FileNotFoundError) or "nosuchbucket" in low or "nosuchkey" in low:
        what = "no such bucket" if "bucket" in low else "no such key"
    elif isinstance(e, PermissionError) or "accessdenied" in low or "forbidden" in low \
            or "403" in first:
        what = "access denied (check the credentials in AWS_* or the bucket's policy)"
    elif "credential" in low:
        what = "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    elif any(w in low for w in ("connect", "timeout", "timed out", "connection",
                                "disconnect", "reset", "broken pipe", "incomplete")):
        what = f"the connection to the store failed ({name})"
    else:
        what = f"{name}: {first}" if first else name
    return _scrub(" ".join(what.split())[:300])


def fail(url: str, e: BaseException, then: str = "") -> StorageError:
    """A StorageError for `url` (the reason in one line)."""
    msg = f"{url}: {describe(e)}"
    return StorageError(msg + (f"; {then}" if then else ""))


def _join(url: str, path: str) -> str:
    """A path the filesystem returned, as a URL of `url`'s scheme."""
    proto = scheme(url)
    return path if _SCHEME.match(path) else f"{proto}://{path.lstrip('/')}"


# --- inputs -------------------------------------------------------------------------------

def expand(spec: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files a URL stands for: itself, the matches of a glob, or every file with one of
    `suffixes` under a prefix (sorted). Raises StorageError or InputError."""
    fs, path = filesystem(spec)
    try:
        if any(c in path for c in "*?["):
            found = sorted(p for p, info in fs.glob(path, detail=True).items()
                           if info.get("type") != "directory")
            if not found:
                raise InputError(f"{spec}: the pattern matches no file")
            return [_join(spec, p) for p in found]
        if fs.isfile(path):
            return [spec]
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path)
                           if p.lower().endswith(suffixes)
                           and not any(part.endswith(".nfb")
                                       for part in p[len(path):].split("/")[:-1]))
            if not found:
                raise InputError(f"{spec}: the prefix holds no .jsonl/.jsonl.gz/.parquet file")
            return [_join(spec, p) for p in found]
        bucket = path.split("/", 1)[0]
        if "/" in path and scheme(spec) in ("s3", "s3a", "gs", "gcs") \
                and not fs.exists(bucket):
            raise StorageError(f"{spec}: no such bucket {bucket!r}")
        raise InputError(f"{spec}: no such file")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - every store failure is one line
        raise fail(spec, e) from None


def check_file(url: str) -> None:
    """Raise StorageError now if `url` cannot be read (denied, gone, unreachable)."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb", block_size=1 << 16) as fh:
            fh.read(1)
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


class _Guarded:
    """A store file whose failures are StorageErrors (one line, exit 1): a read that fails
    mid-run stops the run with the finished rows saved."""

    def __init__(self, url: str, fh):
        self._url, self._fh = url, fh

    def _call(self, name: str, *a):
        try:
            return getattr(self._fh, name)(*a)
        except Exception as e:  # noqa: BLE001
            raise fail(self._url, e, "finished rows are saved: run the same command again "
                       "to go on") from None

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._call("seek", pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._fh.closed

    @property
    def size(self) -> int:
        return self._fh.size

    def close(self) -> None:
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001 - nothing was written
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_input(url: str) -> _Guarded:
    """`url` opened for streaming reads (read-ahead `BLOCK` bytes)."""
    fs, path = filesystem(url)
    try:
        return _Guarded(url, fs.open(path, "rb", block_size=BLOCK, cache_type="readahead"))
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


def source(path: str):
    """What a reader opens: a local path as it is, a URL as a guarded file object."""
    return open_input(path) if is_url(path) else path


def identity(url: str) -> dict:
    """What identifies the object's content for resume: URL, size and the store's version
    tag (S3's ETag, GCS's generation, the Hub's blob id)."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None
    tag = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash", "blob_id",
                                       "VersionId", "mtime") if info.get(k)), None)
    return {"path": url, "size": info.get("size"), "tag": tag}


def download(url: str, directory: str) -> str:
    """A local copy of `url` in `directory` (for the verbs that read a file several times)."""
    fs, path = filesystem(url)
    name = os.path.basename(path.rstrip("/")) or "input"
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    local = os.path.join(directory, f"{digest}-{name}")
    try:
        fs.get_file(path, local)
    except Exception as e:  # noqa: BLE001
        Path(local).unlink(missing_ok=True)
        raise fail(url, e) from None
    return local


# --- outputs ------------------------------------------------------------------------------

def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


def check_output(url: str) -> None:
    """Before anything loads: the output's bucket exists and can be reached (exit 2 when it
    does not exist, 1 when the store fails)."""
    fs, path = filesystem(url)
    if path.endswith("/") or not os.path.basename(path):
        raise UsageError(f"{url}: name an output file (e.g. {url.rstrip('/')}/out.parquet)")
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket) if "/" in path else True
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None
    if not ok:
        raise UsageError(f"{url}: no such bucket {bucket!r}: create it, or choose another "
                         "output")


def upload(local: str | os.PathLike, url: str) -> None:
    """Put a finished local file at `url` in one step (visible whole or not at all)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(str(local), path)
        fs.invalidate_cache(path)
    except Exception as e:  # noqa: BLE001
        raise fail(url, e, "the output is not written; run the same command again to "
                   "upload it") from None


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


def read_bytes(url: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


def remove(url: str) -> None:
    fs, path = filesystem(url)
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except Exception as e:  # noqa: BLE001
        raise fail(url, e) from None


def cache_root() -> Path:
    base = os.environ.get("NFB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nfb")
    return Path(base)


def local_home(url: str) -> Path:
    """The local directory that holds the work of the output `url`: one per URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_root() / "outputs" / digest


def staging_file(url: str) -> Path:
    """A local temporary file for the output `url` (same name, so formats follow it)."""
    home = local_home(url)
    home.mkdir(parents=True, exist_ok=True)
    name = os.path.basename(filesystem(url)[1]) or "output"
    _remove_stale(home)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.getpid()}-", suffix="-" + name, dir=home)
    os.close(fd)
    return Path(tmp)


def _remove_stale(home: Path) -> None:
    """Staging files of killed runs (their process is gone)."""
    import psutil

    for p in home.glob(".*-*"):
        pid = p.name[1:].split("-", 1)[0]
        if p.is_file() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            p.unlink(missing_ok=True)


def tidy_home(url: str) -> None:
    """Remove the local directory of `url` when nothing is left in it."""
    try:
        local_home(url).rmdir()
    except OSError:
        pass
