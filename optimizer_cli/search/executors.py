"""Where `optimize tune` runs its trials: in this process, one after another, or on Ray.

The tuner hands an executor a top-level function and a list of jobs; both must pickle (a job is a
dataclass of paths, strings and dicts; a function is found by module and name, so Ray workers must be
able to import the module that defines it). The function catches its own errors and returns them in
its result; the executor also turns whatever still escapes (an exception, a worker killed by a
segfault or the OOM killer) into a `TaskError`, so one bad trial never ends the study.

- `local` (the default): in-process and sequential. Timing needs quiet cores, and this is the one
  executor that promises nothing else runs beside a timing job.
- `ray`: starts a Ray on this machine (or joins the cluster that `RAY_ADDRESS` names). Builds run
  `parallelism` at once; a timing job asks for `num_cpus` = the benchmark's thread count, so Ray runs it
  only while that many CPUs of one node are free and gives those CPUs to nothing else meanwhile (Ray's
  CPUs are reservations, not pinning: the job itself must keep to its thread count).
- `ray://HOST:PORT`: joins a running cluster through Ray Client (needs `ray[client]`, i.e. grpcio).

On a cluster the jobs carry file paths, not file contents: the study folder, the model and the data
must be on a filesystem that every node sees at the same path (NFS, a shared volume), and every node
needs the same Python environment, optimizer-cli included.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from optimizer_cli.errors import UserInputError, first_line

J = TypeVar("J")
R = TypeVar("R")

INSTALL_HINT = 'pip install -e ".[distributed]"'
CLIENT_PREFIX = "ray://"
CLIENT_DEFAULT_PORT = 10001
# How long the TCP check of a cluster's address may take before it counts as unreachable.
CONNECT_TIMEOUT_S = 10.0
# Past that check, Ray Client's handshake makes 3 attempts (ray.init offers no knob for their number),
# waiting 5, 10, then 15 s for the channel and as long again when the server answers but is not ready:
# 30 to 60 s against a port that is open but not Ray Client's. These variables cap each wait at 5 s
# (15 to 30 s in all). Ray reads them when ray.util.client.worker is first imported, so they only take
# effect if this process has not used Ray Client before (true for the CLI); a value already set wins.
CLIENT_HANDSHAKE_ENV = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "5", "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5"}
# Exceptions that mean the process running the task is gone, whatever the task did.
_DEATHS = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "LocalRayletDiedError")


@dataclass
class TaskError:
    """A job whose function raised, or whose worker died, instead of returning a result."""

    job_index: int
    message: str  # one line, e.g. "RayTaskError: ValueError: bad recipe" or "worker died: ..."


class Executor(Protocol):
    name: str  # "local", "ray" or "ray://host:port"
    parallelism: int  # how many build jobs are worth running at once

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], num_cpus: float = 1) -> list[R | TaskError]:
        """`fn(job)` for every job, results in job order; `num_cpus` reserved for each job while it runs."""
        ...

    def close(self) -> None: ...


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


class LocalExecutor:
    """Runs each job in this process, one after another; `num_cpus` is moot (nothing runs beside it)."""

    def __init__(self) -> None:
        self.name = "local"
        self.parallelism = 1

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], num_cpus: float = 1) -> list[R | TaskError]:
        results: list[R | TaskError] = []
        for index, job in enumerate(jobs):
            try:
                results.append(fn(job))
            except Exception as exc:  # the function should catch its own; whatever escapes is this job's
                results.append(TaskError(index, _describe(exc)))
        return results

    def close(self) -> None:
        pass


def _import_ray(kind: str) -> Any:
    """The ray module, imported only when a Ray executor is asked for (ray is an optional extra)."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise UserInputError(f"--executor {kind} needs the distributed extra: {INSTALL_HINT}") from exc


def _host_port(address: str) -> tuple[str, int] | None:
    """'ray://HOST[:PORT]' or 'HOST:PORT' -> (host, port); None for a GCS address without a port ("auto")."""
    client = address.startswith(CLIENT_PREFIX)
    rest = address.removeprefix(CLIENT_PREFIX).rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep or host.endswith(":"):  # no port, or a bare IPv6 address
        if not client:
            return None
        host, port_text = rest, str(CLIENT_DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        expected = "ray://HOST:PORT (Ray Client listens on port 10001)" if client else "HOST:PORT"
        raise UserInputError(f"--executor {address}: expected {expected}")
    return host, int(port_text)


def _check_reachable(address: str) -> None:
    """Fail in seconds, with one line, where ray.init would retry for half a minute to minutes."""
    host_port = _host_port(address)
    if host_port is None:
        return
    try:
        with socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = first_line(exc) if str(exc) else f"no answer in {CONNECT_TIMEOUT_S:g} s"
        raise UserInputError(
            f"--executor {address}: cannot reach a Ray cluster at {host_port[0]}:{host_port[1]} ({reason}); "
            "start one there with `ray start --head` (cluster port 6379, Ray Client port 10001)"
        ) from exc


def _init_arguments(address: str | None, local_cpus: int | None) -> tuple[str, dict[str, Any]]:
    """ray.init's address and keyword arguments: start a Ray here, join a cluster, or join through Ray Client."""
    if address and address.startswith(CLIENT_PREFIX):
        if importlib.util.find_spec("grpc") is None:
            raise UserInputError(f"--executor {address} needs Ray Client (grpcio): {INSTALL_HINT}")
        for name, value in CLIENT_HANDSHAKE_ENV.items():
            os.environ.setdefault(name, value)
        return address, {}
    if address:  # RAY_ADDRESS: a running cluster (HOST:PORT or "auto") has its own CPUs and logging
        return address, {"logging_level": logging.WARNING}
    # A local Ray reports usage to Ray's authors unless told not to; a CLI should not on its user's behalf.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"num_cpus": local_cpus, "include_dashboard": False, "log_to_driver": False}
    # "local" starts a Ray of our own even where `ray start` left one running on this machine.
    return "local", {**kwargs, "logging_level": logging.WARNING}


class RayExecutor:
    """Runs jobs as Ray tasks: all submitted at once, Ray queues them until their CPUs are free.

    `address` None starts a local Ray (with `local_cpus` CPUs; all of this machine's by default), or
    joins `RAY_ADDRESS` when that is set; "ray://HOST:PORT" joins a cluster through Ray Client. A Ray
    already initialized in this process is used as it is. `close()` ends only what this executor began:
    a Ray it started stops, a cluster it joined is left running (only this driver disconnects).

    A task is not retried when its worker dies (`max_retries=0`): a build that segfaults or runs out of
    memory would do it again, and the caller sees a `TaskError` at once.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        local_cpus: int | None = None,
        build_cpus: float = 1,
        runtime_env: dict[str, Any] | None = None,
        max_retries: int = 0,
    ) -> None:
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address == "local":
            address = None
        self.name = address if address and address.startswith(CLIENT_PREFIX) else "ray"
        self._ray = _import_ray(self.name)
        self._max_retries = max_retries
        self._owns = False  # whether close() has a connection of its own to end
        self._start_or_join(address, local_cpus, runtime_env)
        self.cluster_cpus, self.largest_node_cpus = self._cpus()
        self.parallelism = max(1, int(self.cluster_cpus // build_cpus))

    def _start_or_join(self, address: str | None, local_cpus: int | None, runtime_env: dict[str, Any] | None) -> None:
        if address:
            _check_reachable(address)
        if self._ray.is_initialized():
            return
        address, kwargs = _init_arguments(address, local_cpus)
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
        try:
            self._ray.init(address=address, **kwargs)
        except Exception as exc:
            where = "start a local Ray" if address == "local" else f"connect to Ray at {address}"
            raise UserInputError(f"--executor {self.name}: could not {where}: {_describe(exc)}") from exc
        self._owns = True

    def _cpus(self) -> tuple[float, float]:
        """The cluster's CPUs, and the most CPUs one node has (a task cannot span nodes)."""
        total = float(self._ray.cluster_resources().get("CPU", 0))
        nodes = [node for node in self._ray.nodes() if node.get("Alive")]
        largest = max((float(node.get("Resources", {}).get("CPU", 0)) for node in nodes), default=total)
        return total, largest

    def _error(self, index: int, exc: Exception) -> TaskError:
        exceptions = self._ray.exceptions
        deaths = tuple(getattr(exceptions, name) for name in _DEATHS if hasattr(exceptions, name))
        if isinstance(exc, deaths):
            return TaskError(index, f"worker died: {_describe(exc)}")
        cause = getattr(exc, "cause", None) if isinstance(exc, exceptions.RayTaskError) else None
        if isinstance(cause, BaseException):  # the task's own exception, without Ray's traceback text
            return TaskError(index, f"RayTaskError: {_describe(cause)}")
        return TaskError(index, _describe(exc))

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], num_cpus: float = 1) -> list[R | TaskError]:
        if num_cpus > self.largest_node_cpus:  # Ray would queue these forever, waiting for a bigger node
            message = f"needs {num_cpus:g} CPUs on one node; the largest Ray node has {self.largest_node_cpus:g}"
            return [TaskError(index, message) for index in range(len(jobs))]
        remote = self._ray.remote(num_cpus=num_cpus, max_retries=self._max_retries)(fn)
        pending: list[Any] = []
        for index, job in enumerate(jobs):
            try:
                pending.append(remote.remote(job))
            except Exception as exc:  # a job that does not pickle
                pending.append(self._error(index, exc))
        results: list[R | TaskError] = []
        for index, ref in enumerate(pending):
            if isinstance(ref, TaskError):
                results.append(ref)
                continue
            try:
                results.append(self._ray.get(ref))
            except Exception as exc:
                results.append(self._error(index, exc))
        return results

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


def make_executor(
    spec: str,
    *,
    local_cpus: int | None = None,
    build_cpus: float = 1,
    runtime_env: dict[str, Any] | None = None,
) -> Executor:
    """The executor `--executor SPEC` names: "local", "ray" or "ray://HOST:PORT".

    `local_cpus` caps a Ray started here; `build_cpus` is what one build job reserves (it sets
    `parallelism`); `runtime_env` goes to `ray.init` (e.g. env_vars for the workers).
    """
    if spec == "local":
        return LocalExecutor()
    if spec == "ray" or spec.startswith(CLIENT_PREFIX):
        address = spec if spec.startswith(CLIENT_PREFIX) else None
        return RayExecutor(address, local_cpus=local_cpus, build_cpus=build_cpus, runtime_env=runtime_env)
    raise UserInputError(f"unknown --executor {spec!r}: use local, ray or ray://HOST:PORT")
