from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick-start example models and data, built once per test session."""
    from optimizer_cli.examples import write_examples

    out = tmp_path_factory.mktemp("examples")
    write_examples(out)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a user runs it (exit codes and stdout exactly as seen)."""
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "optimizer_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `openvino` need the OpenVINO EP plugin (extra `openvino`) with a device on this host: they
    skip, saying why, where it offers none (an AMD CPU) or is not installed."""
    marked = [item for item in items if item.get_closest_marker("openvino")]
    if not marked:
        return
    from optimizer_cli.runtime.providers import probe_provider

    status = probe_provider("openvino")
    if status.usable:
        return
    skip = pytest.mark.skip(reason=f"OpenVINO EP not usable here: {status.reason}")
    for item in marked:
        item.add_marker(skip)
