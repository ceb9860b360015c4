"""Typed errors. Each carries the process exit code the CLI uses for it.

Exit codes (documented in the README):
  0  success
  1  internal error (a bug: please report it)
  2  bad input (the message says what to change)
  3  verification failed (an exported artifact disagrees with PyTorch)
  4  numerical failure (NaN/Inf in weights or activations, named by layer)
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM); the message says where resume state is
"""

from __future__ import annotations


class SlimGPTError(Exception):
    """Base class for errors a user can act on."""

    exit_code = 1


class BadInputError(SlimGPTError):
    """The user asked for something we cannot do; the message says what to change."""

    exit_code = 2


class UnsupportedArchitectureError(BadInputError):
    pass


class ModelSourceError(BadInputError):
    pass


class CalibrationError(BadInputError):
    pass


class OutputExistsError(BadInputError):
    pass


class CheckpointError(BadInputError):
    """A checkpoint on disk is malformed: per-layer lists disagree with weights, etc."""


class ResourceError(BadInputError):
    """The job does not fit: not enough memory or disk (estimated up front, or a write hit ENOSPC)."""


class VerificationError(SlimGPTError):
    exit_code = 3


class NumericalError(SlimGPTError):
    """NaN/Inf found in weights or activations; the message names the layer."""

    exit_code = 4


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with a one-line message for the user (e.g. where the resume state is).

    A KeyboardInterrupt, so code that cleans up on interrupts treats it as one;
    the CLI prints the message and exits with `exit_code`.
    """

    def __init__(self, message: str = "interrupted; no output was written", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException | str) -> str:
    """The first line of an error's message (or of a text); an exception with no message gives its type's name."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return "" if isinstance(err, str) else type(err).__name__


def last_error_line(output: str) -> str:
    """The most telling line of a child process's output: its last exception line, else its last line."""
    import re

    exception = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = exception.match(ln)
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return lines[-1] if lines else "no output"
