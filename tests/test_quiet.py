"""Quiet, clean output (issue 23 item 6): warnings once with a count, library chatter captured, -q prints
only the result, help fits 80 columns and every option says what it does."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console

from tests.conftest import ROOT, run_cli


def _quickstart_recipe() -> Path:
    """The cnn-int8 recipe file, wherever this checkout ships it."""
    for place in (ROOT / "optimizer_cli" / "recipes", ROOT / "recipes"):
        if (place / "cnn-int8.yaml").exists():
            return place / "cnn-int8.yaml"
    raise AssertionError("cnn-int8.yaml not found")


def _quickstart(examples: Path, tmp_path: Path, *flags: str) -> list[str]:
    return [
        str(examples / "digits_cnn.onnx"),
        "--recipe",
        str(_quickstart_recipe()),
        "-o",
        str(tmp_path / "out.onnx"),
        "--calib",
        str(examples / "digits_calib.npz"),
        "--data",
        str(examples / "digits_eval.npz"),
        "--providers",
        "cpu",
        *flags,
    ]


def test_quickstart_with_q_prints_only_the_table_and_verdict(examples_dir: Path, tmp_path: Path) -> None:
    done = run_cli(*_quickstart(examples_dir, tmp_path, "-q"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= 12, done.stdout
    assert done.stderr == ""
    assert any(line.startswith("verdict: ") for line in lines), done.stdout
    assert any("optimized" in line and "x [" in line for line in lines), "the speedup row is the result"
    assert not any(word in done.stdout for word in ("Passes:", "Layers that cost", "note:")), done.stdout
    assert (tmp_path / "out.onnx").exists()


def test_a_repeated_pass_warning_prints_once_with_its_count(
    examples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an AVX2-only host sees: reduce_range is chosen at every quantize run (the run, then attribution's
    re-runs), and its warning was printed each time."""
    import optimizer_cli.passes.quantize as quantize
    from optimizer_cli.cli import main

    monkeypatch.setattr(quantize, "u8s8_saturates", lambda isa: True)
    with pytest.raises(SystemExit) as done:
        main(_quickstart(examples_dir, tmp_path, "--no-memory"))
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    said = [line for line in err.splitlines() if "7-bit weights (reduce_range)" in line]
    assert len(said) == 1, err
    assert said[0].startswith("warning: quantize:") and re.search(r"\(x\d+\)$", said[0]), said[0]
    assert "reduce_range" not in out.replace("reduce_range: on", "")


def test_warnings_and_logger_warnings_are_collected_once_each_with_a_count() -> None:
    from optimizer_cli.cli import _warnings_to

    buffer = io.StringIO()
    log = Console(file=buffer, width=200)
    logger = logging.getLogger("optimizer_cli.passes.quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # what the filters ignore stays ignored
        with _warnings_to(log):
            for _ in range(7):
                warnings.warn("calibration is small", UserWarning, stacklevel=1)
            for _ in range(5):
                logger.warning("quantize: 7-bit weights")
            warnings.warn("once only", UserWarning, stacklevel=1)
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
            assert buffer.getvalue() == "", "nothing is printed while the work (and its progress line) runs"
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "warning: calibration is small (x7)",
        "warning: quantize: 7-bit weights (x5)",
        "warning: once only",
    ]


def test_library_prints_are_captured_and_shown_only_with_v(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime.quantization's calibrators print() progress ('Collecting tensor data and making histogram
    ...') and native code writes to fd 1: neither reaches stdout or stderr unless -v asks."""
    import optimizer_cli.cli as cli

    def chatter() -> None:
        with cli._library_output_to_stderr():
            for _ in range(23):
                print("Collecting tensor data and making histogram ...")
            os.write(1, b"native printf\n")

    monkeypatch.setattr(cli, "_verbosity", 0)
    chatter()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    monkeypatch.setattr(cli, "_verbosity", 1)
    chatter()
    out, err = capfd.readouterr()
    assert out == ""
    assert "Collecting tensor data and making histogram ... (x23)" in err and "native printf" in err


def _commands() -> list[tuple[str, Any]]:
    """('', the root) and (name, command) for every command, as click (typer's own copy) sees them."""
    from optimizer_cli.cli import app

    group: Any = typer.main.get_command(app)
    return [("", group), *sorted(group.commands.items())]


def test_every_option_and_argument_has_a_help_text() -> None:
    missing = [
        f"{name or 'optimize'} {param.name}"
        for name, command in _commands()
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize("name", [name for name, _ in _commands()])
def test_help_fits_80_columns_and_cuts_no_description(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from optimizer_cli.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as done:
        main([name, "--help"] if name else ["--help"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    too_long = [line for line in out.splitlines() if len(line) > 80]
    assert too_long == []
    assert "…" not in out
    flat = _flat(out)
    command = dict(_commands())[name]
    for param in command.params:
        text = _flat(getattr(param, "help", None) or "")
        assert text in flat, f"{param.name}'s help is cut: {text!r}"
    if hasattr(command, "commands"):  # the command list: each command's first sentence, whole
        for sub in command.commands.values():
            assert _flat(sub.get_short_help_str(limit=10**6)) in flat, f"{sub.name}'s summary is cut"


def _flat(text: str) -> str:
    """Words joined by one space; a line broken after a hyphen ('per-' / 'sample') joined again."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def test_tune_with_q_prints_the_winner_alone(examples_dir: Path, tmp_path: Path) -> None:
    from tests.test_tune import _tune_args

    proc = run_cli("-q", *_tune_args(examples_dir, tmp_path, "--trials", "2", "-o", str(tmp_path / "best.onnx")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("winner: trial") and len(lines) <= 3, proc.stdout
    assert proc.stderr == ""
