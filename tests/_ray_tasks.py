"""Task functions for tests/test_executors.py, in a module of their own because Ray workers import them.

A function travels to a Ray worker by module and name, so the worker imports `tests._ray_tasks`: the
test starts Ray with this checkout's root on the workers' PYTHONPATH (see `ray_executor` there).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def square(job: int) -> dict[str, int]:
    return {"job": job, "square": job * job}


def fail_on_three(job: int) -> dict[str, int]:
    if job == 3:
        raise ValueError(f"job {job} is bad\nsecond line of detail")
    return {"job": job}


def exit_on_one(job: int) -> dict[str, int]:
    if job == 1:
        os._exit(1)  # the worker process dies, as on a segfault
    return {"job": job}


def optimizer_cli_file(job: int) -> str:
    import optimizer_cli

    return str(optimizer_cli.__file__)


@dataclass
class HoldJob:
    seconds: float


def hold(job: HoldJob) -> dict[str, float]:
    """Occupies its CPUs for a while and says when (wall clock, comparable across processes)."""
    start = time.time()
    time.sleep(job.seconds)
    return {"start": start, "end": time.time()}


@dataclass
class MeetJob:
    folder: str
    name: str
    parties: int
    patience_s: float


def meet(job: MeetJob) -> dict[str, bool]:
    """Waits until `parties` jobs have arrived in `folder`: true only if they ran at the same time."""
    folder = Path(job.folder)
    (folder / job.name).touch()
    deadline = time.monotonic() + job.patience_s
    while time.monotonic() < deadline:
        if len(list(folder.iterdir())) >= job.parties:
            return {"met": True}
        time.sleep(0.05)
    return {"met": False}
