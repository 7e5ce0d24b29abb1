"""A clean terminal: by default stderr holds nfb's own lines only.

vLLM, torch, Triton and the engine's worker processes write warnings and INFO lines to stderr;
nfb sets their log levels through the environment (inherited by spawned workers) and silences
Python warnings. `NFB_VERBOSE=1` (or `nfb -v`) leaves everything as it is.
"""

from __future__ import annotations

import logging
import os
import warnings


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
