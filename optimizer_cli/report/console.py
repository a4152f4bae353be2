"""What a command prints beside its report: each distinct warning once, with a count, after the progress
line is gone; the libraries' own chatter (print, native printf) captured and shown only when asked."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

from rich.console import Console
from rich.markup import escape

# Our passes log their advice here (ctx.logger); children (optimizer_cli.x) propagate to it.
LOGGER = "optimizer_cli"


def counted(lines: list[str]) -> list[str]:
    """Each distinct line once, in the order first seen, with '(xN)' where it came N > 1 times."""
    return [f"{line} (x{n})" if n > 1 else line for line, n in Counter(lines).items()]


class _Collect(logging.Handler):
    """Our logger's warnings go to the collection; its other records (info with -v, debug, errors) print
    through the console, which draws them above a spinner rather than into it."""

    def __init__(self, seen: list[str], console: Console) -> None:
        super().__init__()
        self.seen = seen
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in a library's call is not worth stopping the run for
            message = str(record.msg)
        if record.levelno == logging.WARNING:
            self.seen.append(message)
        else:
            self.console.print(escape(f"{record.levelname.lower()}: {message}"), soft_wrap=True)


@contextlib.contextmanager
def collected_warnings(console: Console) -> Iterator[list[str]]:
    """Python warnings and our logger's warnings raised inside are printed when it ends, each distinct message
    once with its count ('warning: X (x68)'), so none lands inside a progress line and a warning that every
    pipeline run repeats (tune, attribution) is one line. Exit the progress display before this."""
    seen: list[str] = []
    handler = _Collect(seen, console)
    logger = logging.getLogger(LOGGER)
    propagate = logger.propagate
    with warnings.catch_warnings():
        # Every occurrence reaches showwarning, to be counted; what the filters ignore stays ignored.
        filters = cast(list[Any], warnings.filters)  # a list at run time; typeshed calls it a Sequence
        filters[:] = [("always" if f[0] in ("default", "module", "once") else f[0], *f[1:]) for f in filters]
        warnings.simplefilter("always", append=True)  # Python's fallback is "default": once per location
        warnings.showwarning = lambda message, *_args, **_kw: seen.append(str(message))
        logger.addHandler(handler)
        logger.propagate = False  # the root's stderr handler would print each one, raw
        try:
            yield seen
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            for line in counted(seen):
                console.print(f"[yellow]warning:[/yellow] {escape(line)}", soft_wrap=True)


def _flush_c_stdio() -> None:
    """Native code's printf sits in the C library's buffer (full buffering on a file): flush it while fd 1
    still points at the capture, or it would reach stdout later."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured_library_output(console: Console, show: bool) -> Iterator[None]:
    """stdout carries only our report: what libraries print during the work (onnxruntime.quantization's
    calibrators: 'Collecting tensor data and making histogram ...'; native printf) is captured at the Python
    and the file-descriptor level, and printed on the console (stderr) only when `show` (-v), each
    distinct line once with its count. stderr is left alone: a library's error still shows."""
    sys.stdout.flush()
    python = io.StringIO()
    with tempfile.TemporaryFile() as native:
        saved = os.dup(1)
        try:
            os.dup2(native.fileno(), 1)
            with contextlib.redirect_stdout(python):
                yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
            native.seek(0)
            text = python.getvalue() + native.read().decode(errors="replace")
            lines = [line.rstrip() for line in text.splitlines() if line.strip()]
            if show and lines:  # also when the work failed: that is when the chatter may explain it
                console.print("library output:")
                for line in counted(lines):
                    console.print(f"  {escape(line)}", soft_wrap=True, highlight=False)
