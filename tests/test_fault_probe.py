"""Fault probes (issue 24): user mistakes and a full disk are exit 2 with one line naming the file or flag,
--json still prints one error document, and nothing is left half-written: the previous model and its reports
stay whole, and no staging folder or temporary file is left beside them."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from .builders import mlp

RECIPE = "passes: [{type: cleanup}]\nbenchmark: {rounds: 2, runs_per_round: 2, warmup: 1}\nverify: {samples: 2}\n"
PREVIOUS = {"out.onnx": b"previous model", "report.json": b"previous report", "report.md": b"previous markdown"}


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from optimizer_cli.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    return int(done.value.code or 0), captured.out, captured.err


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a good model, one with a too-new IR version, one with two nodes of one name, a recipe,
    and a previous run's model and reports; the current folder for the test."""
    from optimizer_cli.ir_compat import ort_max_ir_version

    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    new_ir = mlp()
    new_ir.ir_version = ort_max_ir_version() + 1
    onnx.save(new_ir, str(tmp_path / "new_ir.onnx"))
    dup = mlp()
    for node in dup.graph.node:
        node.name = "same"
    onnx.save(dup, str(tmp_path / "dup.onnx"))
    (tmp_path / "r.yaml").write_text(RECIPE)
    for name, data in PREVIOUS.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} | {
        p.name: b"<dir>" for p in folder.iterdir() if p.is_dir()
    }


def _full_disk_on_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's save into the staging folder runs out of space part-way."""
    from optimizer_cli import pipeline

    def save(model: Any, path: Path, **kwargs: Any) -> Path:
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_model", save)


def _full_disk_on(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Writing the file `name` (a report) runs out of space after half its bytes."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real = os.fdopen

        class Full(io.BufferedWriter):
            def write(self, data: Any) -> int:
                super().write(bytes(data)[: len(data) // 2])
                self.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "w" in mode and Path(target).name.startswith(f".{name}."):
                return Full(io.FileIO(fd, "w"))
            return real(fd, mode, *args, **kwargs)

        monkeypatch.setattr(os, "fdopen", fdopen)

    return patch


RUN = ["m.onnx", "-r", "r.yaml", "--json"]
BENCH_FLAGS = ["--rounds", "2", "--no-memory", "--json"]
BENCH = ["bench", "m.onnx", "m.onnx", *BENCH_FLAGS]
REPORTS = ["-o", "out.onnx", "--report", "report.json", "--markdown", "report.md", "--no-bench"]

# (case, arguments, what to break first, the flag or file and problem the one error line names)
CASES: list[tuple[str, list[str], Callable[[pytest.MonkeyPatch], None] | None, list[str]]] = [
    ("-o .", [*RUN, "-o", ".", "--no-bench"], None, ["-o names a folder"]),
    ("-o ./", [*RUN, "-o", "./", "--no-bench"], None, ["-o names a folder"]),
    ("-o /", [*RUN, "-o", "/", "--no-bench"], None, ["-o names a folder"]),
    ("--report .", [*RUN, "-o", "x.onnx", "--report", ".", "--no-bench"], None, ["--report names a folder"]),
    ("model is a folder", [".", "-r", "r.yaml", "--json"], None, ["is a directory"]),
    ("disk full saving the model", [*RUN, *REPORTS], _full_disk_on_save, ["out.onnx: -o", "No space left"]),
    ("disk full writing --report", [*RUN, *REPORTS], _full_disk_on("report.json"), ["--report", "No space left"]),
    ("disk full writing --markdown", [*RUN, *REPORTS], _full_disk_on("report.md"), ["--markdown", "No space left"]),
    (
        "bench: IR too new",
        ["bench", "new_ir.onnx", "m.onnx", *BENCH_FLAGS],
        None,
        ["new_ir.onnx: IR version", "ir_version="],
    ),
    ("bench: IR too new (2nd)", ["bench", "m.onnx", "new_ir.onnx", *BENCH_FLAGS], None, ["new_ir.onnx: IR version"]),
    (
        "bench: duplicate names",
        ["bench", "dup.onnx", "m.onnx", *BENCH_FLAGS],
        None,
        ["dup.onnx: two nodes are named 'same'"],
    ),
    ("bench --sweep batch=-1", [*BENCH, "--sweep", "batch=-1"], None, ["--sweep 'batch=-1'", "at least 1"]),
    ("bench --sweep batch=0", [*BENCH, "--sweep", "batch=0"], None, ["--sweep 'batch=0'", "at least 1"]),
    ("bench --sweep nosuchdim", [*BENCH, "--sweep", "nosuchdim=1,2"], None, ["no symbolic dim 'nosuchdim'"]),
    ("bench --sweep batch=", [*BENCH, "--sweep", "batch="], None, ["--sweep 'batch='"]),
    ("bench --dim batch=0", [*BENCH, "--dim", "batch=0"], None, ["--dim 'batch=0'"]),
    (
        "run --sweep batch=0 nosuchdim",
        [*RUN, "-o", "x.onnx", "--sweep", "batch=0", "--sweep", "nosuchdim=1,2"],
        None,
        ["--sweep 'batch=0'"],
    ),
    ("run --sweep nosuchdim", [*RUN, "-o", "x.onnx", "--sweep", "nosuchdim=1,2"], None, ["'nosuchdim'"]),
    ("run --threads 0", [*RUN, "-o", "x.onnx", "--threads", "0"], None, ["--threads"]),
    ("run --threads -3", [*RUN, "-o", "x.onnx", "--threads", "-3"], None, ["--threads"]),
    ("bench --threads 0", [*BENCH, "--threads", "0"], None, ["--threads"]),
]


@pytest.mark.parametrize(("args", "breaks", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fault_is_one_line_exit_2_and_leaves_nothing_half_written(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    breaks: Callable[[pytest.MonkeyPatch], None] | None,
    needles: list[str],
) -> None:
    before = _snapshot(folder)
    if breaks is not None:
        breaks(monkeypatch)
    code, out, err = _main(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    doc = json.loads(out)  # --json: the error is one JSON document on stdout
    assert doc["exit_code"] == 2 and doc["error"] == lines[0].removeprefix("error: ")
    assert _snapshot(folder) == before, "the previous model, its reports and the folder must be as they were"


def test_a_failed_rename_puts_the_previous_set_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model and its reports are one unit: a failure after the model moved restores the previous model."""
    from optimizer_cli.outputs import OutputPlan

    plan = OutputPlan(model=tmp_path / "out.onnx", reports={"--report": tmp_path / "r.json"})
    (tmp_path / "out.onnx").write_bytes(b"old model")
    (tmp_path / "r.json").write_bytes(b"old report")
    plan.staged_model().write_bytes(b"new model")
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "r.json" and not Path(src).name.endswith("optimize-previous-" + str(os.getpid())):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        plan.commit({tmp_path / "r.json": "new report"})
    monkeypatch.undo()
    plan.discard()
    assert (tmp_path / "out.onnx").read_bytes() == b"old model"
    assert (tmp_path / "r.json").read_bytes() == b"old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "r.json"]


def test_reports_and_model_follow_the_umask(tmp_path: Path) -> None:
    """Reports were written with tempfile's 0600 whatever the umask."""
    from optimizer_cli.outputs import OutputPlan, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "t.md", "x")
        assert stat.S_IMODE((tmp_path / "t.md").stat().st_mode) == 0o644
        plan = OutputPlan(model=tmp_path / "out.onnx", reports={"--report": tmp_path / "r.json"})
        onnx.save(mlp(), str(plan.staged_model()))
        plan.commit({tmp_path / "r.json": "{}"})
        plan.discard()
    finally:
        os.umask(old)
    for name in ("out.onnx", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_abandoned_staging_folders_are_removed_only_when_provably_abandoned(tmp_path: Path) -> None:
    import socket

    from optimizer_cli.outputs import OutputPlan

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead, alive, unknown = (tmp_path / f".optimize-staging-{n}" for n in ("dead", "alive", "unknown"))
    for path in (dead, alive, unknown):
        path.mkdir()
        (path / "model.onnx").write_bytes(b"a full-size copy")
    (dead / "pid").write_text(f"{gone.pid}\n{host}\n")
    (alive / "pid").write_text(f"{os.getppid()}\n{host}\n")
    plan = OutputPlan(model=tmp_path / "out.onnx")
    staged = plan.staged_model()
    assert not dead.exists() and alive.exists() and unknown.exists()
    assert (staged.parent / "pid").read_text().split() == [str(os.getpid()), host]
    plan.discard()


@pytest.mark.parametrize(
    ("signum", "code", "needle"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_during_the_benchmark_is_reported_and_cleans_up(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signum: int,
    code: int,
    needle: str,
) -> None:
    from optimizer_cli.workflows import run

    def benchmark(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(run, "benchmark_into", benchmark)  # the run workflow's benchmark step
    before = _snapshot(folder)
    previous = signal.getsignal(signal.SIGTERM)
    got, out, err = _main([*RUN, "-o", "out.onnx", "--no-memory", "--no-attribute"], capsys)
    assert got == code and f"error: {needle}" in err, (got, err)
    assert json.loads(out)["exit_code"] == code
    assert _snapshot(folder) == before, "no staging copy of the model is left behind"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_memory_child_does_not_import_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer_cli.bench.memory import command_peak, session_peak_memory

    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    for name in ("numpy", "json"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'a').write('{name}')\n")
    monkeypatch.chdir(tmp_path)
    peak = session_peak_memory(tmp_path / "m.onnx", {"x": np.ones((1, 32), np.float32)}, "cpu", 1)
    probe = command_peak([sys.executable, "-c", "pass"])
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()
    assert peak is not None and peak["peak_mb"] > 0 and probe["rc"] == 0


def test_unknown_option_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["m.onnx", "--recpie", "x"], capsys)
    assert code == 2 and "Did you mean --recipe?" in err and "--report" not in err


def test_dry_run_prints_recipe_values_and_each_problem_once(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["m.onnx", "-r", "r.yaml", "--dry-run", "--calib", "nope.npz"], capsys)
    assert code == 2
    assert "fold_constants=true" in out and "True" not in out and "{" not in out, out
    assert (out + err).count("calibration data not found: nope.npz") == 1, (out, err)
    assert err.startswith("error: ")


def test_threads_reach_the_report(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main([*RUN, "-o", "x.onnx", "--threads", "3", "--no-memory", "--no-attribute"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["recipe"]["benchmark"]["threads"] == 3 and report["benchmark"]["threads"] == 3


@pytest.mark.parametrize("name", ["new_ir.onnx", "dup.onnx"])
def test_run_benchmarks_a_model_the_passes_normalized(
    folder: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """The passes accept a too-new IR version and duplicate node names (they normalize both), so the benchmark
    times the original as normalized, and says so, instead of failing in onnxruntime after the work."""
    code, out, err = _main([name, "-r", "r.yaml", "-o", "x.onnx", "--json", "--no-memory", "--no-attribute"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert any("the original was timed as normalized" in n for n in report["notes"]), report["notes"]
    assert not list(folder.glob(".optimize-staging-*"))
