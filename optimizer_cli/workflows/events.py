"""How a workflow tells its caller what it is doing, and the report types it returns.

A workflow never prints: it calls the listener with events. The CLI turns them into a spinner, step lines or
a progress bar; a notebook may log them or ignore them (the default listener drops them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from optimizer_cli import SCHEMA_VERSION

EventKind = Literal["step", "line", "info", "trial", "warning"]


@dataclass(frozen=True)
class Event:
    """One thing a workflow reports while it works.

    kind: 'step' (what runs now; transient, a spinner's text), 'line' (a result worth a line of its own, e.g. a
    pass finished), 'info' (a message said once, apart from the progress: the recipe picked, the files written),
    'trial' (tune finished a trial; `data` holds the trial and the search's progress),
    'warning' (something the user should know; also in the report's notes where it matters).
    """

    kind: EventKind
    text: str
    data: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default listener: a library call is silent unless the caller asks for events."""


@dataclass
class Report:
    """A workflow's result: the same document the command prints with --json.

    `document` is the JSON document without its schema_version (added first by to_dict). `exit_code` is what the
    command exits with for this result (0 ok, 1 a gate or goal failed); the library never exits.
    """

    document: dict[str, Any]
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The command's --json document (schema_version first)."""
        return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in self.document.items() if k != "schema_version"}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @property
    def passed(self) -> bool:
        """True when no gate or goal failed (the command would exit 0)."""
        return self.exit_code == 0

    @property
    def notes(self) -> list[str]:
        return list(self.document.get("notes", []))


@dataclass
class RunReport(Report):
    """`optimize(...)` / `optimize run`: the passes, the saved model, and (when benchmarked) the comparison."""


@dataclass
class BenchReport(Report):
    """`benchmark(...)` / `optimize bench`: original vs optimized on every run target."""


@dataclass
class TuneReport(Report):
    """`tune(...)` / `optimize tune`: the trials, the finalists' timing and the winner (if any)."""

    @property
    def winner(self) -> dict[str, Any] | None:
        return self.document.get("winner")
