"""Error types that map to exit codes.

Exit codes: 0 ok, 1 a --fail-if gate was violated, 2 bad input (file, recipe, data, flags),
3 a pass produced a model that failed verification, 4 internal error.
"""

from __future__ import annotations

import errno
from pathlib import Path

# Errors of a full or read-only disk: the user's to fix (exit 2), never an internal error.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line (its type name if it has none), cut to `limit` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


class OptimizerError(Exception):
    """Base class for errors the CLI reports as one line."""

    exit_code = 4

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # What else the report of this failure should carry (e.g. a verified recipe patch), JSON-ready.
        self.details: dict[str, object] = {}


class UserInputError(OptimizerError):
    """Bad input the user can fix: missing file, bad recipe, unknown pass, missing data."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class VerificationError(OptimizerError):
    """A pass produced a model that fails the checker, shape inference or its numeric contract."""

    exit_code = 3


class GateFailure(OptimizerError):
    """A --fail-if condition was violated."""

    exit_code = 1


class InternalError(OptimizerError):
    """A bug: code of ours (or of a library a pass calls) raised where it should not; the message names where.
    Exit 4, like any unexpected exception, never 3: 3 means the output model broke its contract."""

    exit_code = 4
