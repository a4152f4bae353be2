"""Executors for `optimize tune`: local (in order, errors captured) and Ray (a local 2-CPU Ray, started once).

The Ray tests need the `distributed` extra (the `dev` extra brings it). Functions sent to Ray live in
tests/_ray_tasks.py: a worker imports them by module name, so `ray_executor` starts Ray with this
checkout's root on the workers' PYTHONPATH (runtime_env env_vars). Workers of a local Ray also inherit
the driver's environment and get its working directory on sys.path, but the explicit PYTHONPATH works
whatever the folder pytest was started from, and puts this checkout's optimizer_cli ahead of an editable
install pointing elsewhere (a git worktree).
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.search.executors import (
    CONNECT_TIMEOUT_S,
    Executor,
    LocalExecutor,
    TaskError,
    make_executor,
)

from . import _ray_tasks as tasks
from .conftest import ROOT


def test_local_executor_returns_results_in_job_order() -> None:
    executor = make_executor("local")
    assert isinstance(executor, LocalExecutor)
    assert (executor.name, executor.parallelism) == ("local", 1)
    assert executor.map(tasks.square, [3, 1, 2]) == [
        {"job": 3, "square": 9},
        {"job": 1, "square": 1},
        {"job": 2, "square": 4},
    ]
    executor.close()


def test_local_executor_turns_a_raising_job_into_a_task_error() -> None:
    results = LocalExecutor().map(tasks.fail_on_three, [1, 3, 5])
    assert results == [{"job": 1}, TaskError(1, "ValueError: job 3 is bad"), {"job": 5}]


def test_an_unknown_executor_is_a_usage_error() -> None:
    with pytest.raises(UserInputError, match="unknown --executor 'bogus': use local, ray or ray://HOST:PORT") as info:
        make_executor("bogus")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("spec", ["ray", "ray://10.0.0.1:10001"])
def test_ray_executor_without_ray_installed_is_a_one_line_usage_error(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where ray is not installed
    with pytest.raises(UserInputError) as info:
        make_executor(spec)
    assert str(info.value) == f'--executor {spec} needs the distributed extra: pip install -e ".[distributed]"'
    assert info.value.exit_code == 2


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("via", ["spec", "RAY_ADDRESS client", "RAY_ADDRESS cluster"])
def test_an_unreachable_ray_address_fails_fast_with_one_line(via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Client retries for ~30 s and ray.init on a cluster address for minutes; the executor checks first."""
    pytest.importorskip("ray")
    port = _unused_port()
    spec = "ray"
    if via == "spec":
        spec = f"ray://127.0.0.1:{port}"
    else:
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}" if "client" in via else f"127.0.0.1:{port}")
    began = time.monotonic()
    with pytest.raises(UserInputError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}") as info:
        make_executor(spec)
    assert time.monotonic() - began < CONNECT_TIMEOUT_S  # refused at once, not timed out
    assert "\n" not in str(info.value)


def test_ray_client_without_grpcio_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain `pip install ray` lacks Ray Client; the address answers, so only the missing grpcio is left."""
    pytest.importorskip("ray")
    monkeypatch.setitem(sys.modules, "grpc", None)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        spec = f"ray://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(UserInputError) as info:
            make_executor(spec)
    assert str(info.value) == f'--executor {spec} needs Ray Client (grpcio): pip install -e ".[distributed]"'


@pytest.mark.parametrize("spec", ["ray://", "ray://host:notaport", "ray://host:70000"])
def test_a_malformed_ray_client_address_is_a_usage_error(spec: str) -> None:
    pytest.importorskip("ray")
    with pytest.raises(UserInputError, match=r"expected ray://HOST:PORT"):
        make_executor(spec)


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[Executor]:
    """One local Ray with exactly 2 CPUs for every Ray test here; stopped (no raylet left) at the end."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    workers_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    executor = make_executor("ray", local_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": workers_path}})
    try:
        yield executor
    finally:
        executor.close()
    assert not ray.is_initialized()


def test_ray_executor_reports_its_cluster(ray_executor: Executor) -> None:
    assert (ray_executor.name, ray_executor.parallelism) == ("ray", 2)


def test_ray_workers_import_the_drivers_optimizer_cli(ray_executor: Executor) -> None:
    import optimizer_cli

    assert ray_executor.map(tasks.optimizer_cli_file, [0]) == [optimizer_cli.__file__]


def test_ray_results_come_back_in_job_order(ray_executor: Executor) -> None:
    jobs = [5, 0, 3, 1, 4, 2]
    assert ray_executor.map(tasks.square, jobs) == [{"job": j, "square": j * j} for j in jobs]


def test_a_raising_ray_task_is_a_task_error_and_the_others_still_return(ray_executor: Executor) -> None:
    results = ray_executor.map(tasks.fail_on_three, [1, 3, 5])
    assert results == [{"job": 1}, TaskError(1, "RayTaskError: ValueError: job 3 is bad"), {"job": 5}]


def test_a_dead_ray_worker_is_a_task_error_and_the_others_still_return(ray_executor: Executor) -> None:
    first, dead, last = ray_executor.map(tasks.exit_on_one, [0, 1, 2])
    assert (first, last) == ({"job": 0}, {"job": 2})
    assert isinstance(dead, TaskError)
    assert dead.job_index == 1
    assert dead.message.startswith("worker died: WorkerCrashedError:"), dead.message


def _meet_side_by_side(executor: Executor, folder: Path) -> list[object]:
    """Two 1-CPU tasks that each wait for the other: both meet only if Ray ran them side by side."""
    jobs = [tasks.MeetJob(str(folder), name, parties=2, patience_s=60) for name in ("a", "b")]
    return executor.map(tasks.meet, jobs, num_cpus=1)


def test_one_cpu_ray_tasks_run_two_at_once(ray_executor: Executor, tmp_path: Path) -> None:
    assert _meet_side_by_side(ray_executor, tmp_path) == [{"met": True}, {"met": True}]


def test_ray_tasks_needing_every_cpu_never_overlap(ray_executor: Executor, tmp_path: Path) -> None:
    """A timing task reserves num_cpus = its threads; with 2 CPUs, two such tasks must take turns.

    Two workers are first shown idle and ready (they just met), so only the reservation can keep the
    tasks apart: with num_cpus=1 the same tasks overlap.
    """
    assert _meet_side_by_side(ray_executor, tmp_path) == [{"met": True}, {"met": True}]
    results = ray_executor.map(tasks.hold, [tasks.HoldJob(0.5)] * 3, num_cpus=2)
    spans = sorted((r["start"], r["end"]) for r in results if isinstance(r, dict))
    assert len(spans) == 3
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= end, spans


def test_a_task_needing_more_cpus_than_any_node_is_refused_not_queued_forever(ray_executor: Executor) -> None:
    results = ray_executor.map(tasks.square, [1, 2], num_cpus=3)
    assert results == [TaskError(i, "needs 3 CPUs on one node; the largest Ray node has 2") for i in (0, 1)]


def test_an_executor_on_a_running_ray_leaves_it_running(ray_executor: Executor) -> None:
    """close() ends only what the executor began: here Ray was already up, so it stays up."""
    import ray

    joined = make_executor("ray", build_cpus=2)
    assert joined.parallelism == 1
    joined.close()
    assert ray.is_initialized()
    assert ray_executor.map(tasks.square, [2]) == [{"job": 2, "square": 4}]
