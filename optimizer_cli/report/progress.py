"""What a command shows while a workflow runs: its events as step lines on stderr and, on a terminal, a spinner
naming the step that is running."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.markup import escape


class WorkflowEvent(Protocol):
    """What the display reads of a workflow's Event (workflows/events.py, a layer above this one)."""

    @property
    def kind(self) -> str: ...

    @property
    def text(self) -> str: ...


class StepProgress:
    """Step lines on stderr and, on a terminal, a spinner naming the step that is running (rich)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        show = console.is_terminal and not console.quiet
        self._status = console.status("starting", spinner="dots") if show else None

    def __enter__(self) -> StepProgress:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()

    def step(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)

    def line(self, text: str) -> None:
        self.console.print(f"  {text}")
        self.step(text)

    def listen(self, event: WorkflowEvent) -> None:
        """A workflow's listener: steps drive the spinner, lines print indented, messages print whole."""
        if event.kind == "step":
            self.step(event.text)
        elif event.kind == "line":
            self.line(event.text)
        elif event.kind == "warning":
            self.console.print(f"[yellow]warning:[/yellow] {escape(event.text)}", soft_wrap=True)
        else:
            self.console.print(escape(event.text), soft_wrap=True)
