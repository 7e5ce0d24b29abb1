"""Every error nfb reports to a user, each with the exit code it ends in.

The library raises these; the CLI turns them into one `error:` line and the code (one place:
`nfb.cli.app.handle`). Python users catch `NfbError` (or a subclass) and read `.exit_code`.

Exit codes: 0 done, 1 the run failed, 2 bad usage (nothing was loaded), 3 done with row errors
(only with --strict), 130 interrupted (progress saved: run the same command again).
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ROW_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class NfbError(Exception):
    """Base class: a message meant for the user, and an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(NfbError, ValueError):
    """A bad option or argument, found before any model loads (exit 2)."""

    exit_code = EXIT_USAGE


ConfigError = UsageError  # the name the first release used


class WeightsError(UsageError):
    """--weights or --attributes that do not fit the model's heads (exit 2)."""


class ResumeError(UsageError):
    """The output or its work directory belongs to another run (exit 2)."""


class MergeError(UsageError):
    """The inputs of `nfb merge` are not the shards of one run (exit 2)."""


class OutputBusy(UsageError):
    """Another nfb process is writing the same output (exit 2)."""


class OutputError(NfbError):
    """An output that cannot be written: no space, read-only, permission (exit 1)."""


class InputError(NfbError):
    """An input that cannot be used at all: missing, unreadable, unknown format (exit 1)."""


class ModelError(NfbError):
    """The model cannot be read or loaded (exit 1)."""


class ConvertError(NfbError):
    """A checkpoint that `nfb convert` cannot convert (exit 2 before work, 1 while reading)."""


class RunError(NfbError):
    """The run cannot go on (exit 1); finished rows are saved."""


class EngineDied(RunError):
    """The engine process died or stalled mid-run (exit 1); finished rows are saved."""


class Interrupted(NfbError):
    """Stopped by Ctrl-C or SIGTERM after checkpointing (exit 130)."""

    exit_code = EXIT_INTERRUPTED
