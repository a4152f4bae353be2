"""What a command shows while a workflow runs: its events as step lines on stderr and, on a terminal, a spinner
naming the step that is running (tune: a progress bar over its trials)."""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape


class WorkflowEvent(Protocol):
    """What the display reads of a workflow's Event (workflows/events.py, a layer above this one)."""

    @property
    def kind(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def data(self) -> dict[str, Any]: ...


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


class TuneProgress(StepProgress):
    """tune's listener: a rich progress bar on a terminal (trials done, best so far, time left), a line per trial
    elsewhere; step lines, the files written and warnings on the log console."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._bar: Any = None
        self._task: Any = None
        self._by_time = False
        self._study: dict[str, Any] = {}  # the study under way: its model and folder (None: scratch)
        if self._status is not None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._status = None
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console)
            self._task = self._bar.add_task("tune: starting", total=None)

    def __enter__(self) -> TuneProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def event(self, event: WorkflowEvent) -> None:
        if event.kind == "trial":
            self._trial(event.text, event.data)
        elif event.kind in ("info", "warning"):
            self.console.print(escape(event.text), soft_wrap=True)
        elif event.kind == "step":
            self.step(event.text)
        else:
            if "model" in event.data:  # a model's study starts
                self._start(event.data)
            self.line(event.text)

    def _start(self, study: dict[str, Any]) -> None:
        self._study = study
        if self._bar is not None:
            trials, budget_s = study.get("trials"), study.get("budget_s")
            self._by_time = trials is None
            self._bar.reset(self._task, total=trials or (budget_s and int(budget_s)), description="tune: starting")

    def _trial(self, text: str, data: dict[str, Any]) -> None:
        self.console.print(escape(f"  {text}"), soft_wrap=True)
        if self._bar is not None:
            total = self._bar.tasks[0].total
            done = (total - (data["seconds_left"] or 0)) if self._by_time and total else data["done"]
            self._bar.update(self._task, completed=done, description=f"tune: {data['status']}")
        else:
            self.console.print(f"  [{data['status']}]")

    def interrupted(self) -> str:
        """What an interrupt says: how to resume the study under way, or that a scratch study was not kept."""
        if not self._study:  # before any study started
            return "interrupted"
        where = (
            f"resume with: optimize tune {self._study['model']} ... --study {self._study['study']} --resume"
            if self._study.get("study")
            else "nothing was kept: give --study DIR to make a study resumable"
        )
        return f"interrupted: {where}"
