"""Every error m2f raises on purpose, the exit code each one ends the CLI with, and its one line.

Library code raises these and imports them from here (a few modules still re-export the ones they
raise); ``cli.py`` turns any of them into ``m2f: error: <one line>`` and its code (``exit_code_for``).
Per-image problems are never errors: they are ``records.Failure`` records and the run goes on.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional


class ExitCode(IntEnum):
    """Process exit codes (documented in the README)."""

    OK = 0               # every input written (or already complete and skipped)
    FATAL = 1            # the run could not go on: model, output folder, unexpected error
    USAGE = 2            # bad command line: option values, missing inputs, unknown class or device
    INPUTS_FAILED = 3    # the run finished but some inputs failed (listed in failures.jsonl)
    LOCKED = 4           # another m2f run is writing into the same --out
    NO_IMAGES = 5        # the inputs hold no image m2f reads (empty folder, only unsupported files)
    INTERRUPTED = 130    # SIGINT (Ctrl-C); 143 for SIGTERM (128 + signal number)
    STDOUT_CLOSED = 141  # the reader of --out - closed the pipe (m2f ... | head): 128 + SIGPIPE


# --- found before any work starts: exit 2 ------------------------------------------------------

class UsageError(ValueError):
    """A bad option value or input, found before any work starts."""


class InputError(ValueError):
    """An input argument that names nothing usable (missing path, empty glob)."""


class DeviceError(ValueError):
    """The requested device does not exist here."""


class RemoteError(OSError):
    """A remote path cannot be used: unknown protocol, missing backend, no credentials."""


class SettingsConflict(ValueError):
    """A rerun whose settings differ from those of the outputs already in the folder."""


class EvalError(ValueError):
    """Ground truth and predictions do not fit together; the message says how."""


class MergeError(ValueError):
    """Nothing to merge, or parts of different shard counts."""


class ReportError(ValueError):
    """Nothing to report on: OUT has no sidecars and no predictions.jsonl."""


class NoImagesError(ValueError):
    """The inputs hold no image m2f can read (an empty folder, only unsupported files): exit 5."""


# --- the output folder -------------------------------------------------------------------------

class OutputLockedError(RuntimeError):
    """Another m2f run is writing into the same output folder: exit 4."""


class OutputError(OSError):
    """An output cannot be written (disk full, permissions); names the path: exit 1."""


class LeaseLostError(OutputError):
    """This run's lease on a remote output location was taken over by another run
    (outputs/lease.py): it must not write there any more. Reported like OutputLockedError (exit 4); it is an
    OutputError so that it stops the writers as a failing disk does."""


class CacheLockError(OSError):
    """The cache folder's filesystem has no flock: one line naming it and the way out."""


# --- the run cannot go on: exit 1 --------------------------------------------------------------

class ModelLoadError(RuntimeError):
    """The model cannot be resolved or loaded; the message says what to do."""


class EngineError(RuntimeError):
    """The engine cannot run at all (no Ray cluster to connect to, no actor can load the model).
    Per-image problems are failures, never this."""


class WorkerError(RuntimeError):
    """A --devices worker could not run (model, device or output problem). code: the exit code
    its own error would have had (every worker failing to load the model is exit 1, a bad option 2)."""

    def __init__(self, message: str, code: int = ExitCode.FATAL):
        super().__init__(message)
        self.code = int(code)


class WriterError(RuntimeError):
    """A writer failed in a way m2f did not expect (not an I/O error on an output)."""


# --- not errors of the user's: how a stage says "stop" -------------------------------------------

class StdoutClosed(Exception):
    """The reader of stdout went away (``m2f ... --out - | head``): stop like a Unix filter."""


class DecodeError(Exception):
    """The file is not a readable image; the message is one line without the path (a Failure)."""


# Most specific first: LeaseLostError before OutputError.
_CODES: tuple[tuple[type, ExitCode], ...] = (
    (NoImagesError, ExitCode.NO_IMAGES),
    (LeaseLostError, ExitCode.LOCKED),
    (OutputLockedError, ExitCode.LOCKED),
    (UsageError, ExitCode.USAGE), (InputError, ExitCode.USAGE), (DeviceError, ExitCode.USAGE),
    (RemoteError, ExitCode.USAGE), (SettingsConflict, ExitCode.USAGE), (EvalError, ExitCode.USAGE),
    (MergeError, ExitCode.USAGE), (ReportError, ExitCode.USAGE),
    (OutputError, ExitCode.FATAL), (ModelLoadError, ExitCode.FATAL), (EngineError, ExitCode.FATAL),
    (WorkerError, ExitCode.FATAL), (WriterError, ExitCode.FATAL), (CacheLockError, ExitCode.FATAL),
)
KNOWN: tuple[type, ...] = tuple(cls for cls, _ in _CODES)


def exit_code_for(exc: BaseException) -> Optional[ExitCode]:
    """The exit code of one of m2f's errors, None for anything else (a bug: let it show)."""
    if isinstance(exc, WorkerError):
        return ExitCode(exc.code)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The message of an error as one line: an OutputError's message without its errno (it names
    the path already), the first line of anything else, or its type's name when it has none."""
    if isinstance(exc, OutputError) and len(exc.args) == 2 and isinstance(exc.args[-1], str):
        text = exc.args[-1]
    else:
        text = str(exc)
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__
