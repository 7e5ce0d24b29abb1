"""A clean terminal: by default stderr holds nfb's own lines only.

vLLM, torch, Triton and the engine's worker processes write warnings and INFO lines to stderr;
nfb sets their log levels through the environment (inherited by spawned workers) and silences
Python warnings. `NFB_VERBOSE=1` (or `nfb -v`) leaves everything as it is.
"""

from __future__ import annotations

import logging
import os
import warnings


def verbose() -> bool:
    """NFB_VERBOSE=1 (or `nfb -v`) shows vLLM's, torch's and the workers' own log lines."""
    return os.environ.get("NFB_VERBOSE", "") not in ("", "0")


def quiet_engine_logs() -> None:
    env = {
        "VLLM_LOGGING_LEVEL": "ERROR",
        "VLLM_CONFIGURE_LOGGING": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONWARNINGS": "ignore",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
        "GLOG_minloglevel": "2",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for k, v in env.items():
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore")
    for name in ("vllm", "torch", "transformers", "ray", "triton", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


class CapturedStderr:
    """Send file descriptor 2 to a log file while the engine starts.

    The engine's processes are spawned during the start and inherit fd 2 for their whole
    life, so their warnings and tracebacks (Triton, NUMA binding, tcmalloc, worker stack
    traces) land in the log, not on the user's terminal; nfb reads the log to name the
    cause of a failed start or an engine death. This process's own writes during the start
    (vLLM's loader in the main process) go there too; nfb prints nothing while a model loads,
    and fd 2 is the terminal again afterwards.
    """

    def __init__(self):
        import tempfile

        self.file = tempfile.NamedTemporaryFile(prefix="nfb-engine-", suffix=".log",
                                                delete=False)
        self.path = self.file.name
        self._saved: int | None = None

    def __enter__(self) -> CapturedStderr:
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        self._saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        import sys

        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None

    def text(self, limit: int = 200_000) -> str:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(max(0, size - limit))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        try:
            self.file.close()
            os.unlink(self.path)
        except OSError:
            pass
