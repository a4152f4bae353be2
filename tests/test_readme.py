"""README's first command block works as written (run in a temp dir, install step already done)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .conftest import ROOT, run_cli


def _first_bash_block() -> str:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0]


def test_readme_quick_start_runs(examples_dir: Path, tmp_path: Path) -> None:
    steps = [s.strip() for s in _first_bash_block().split("&&")]
    assert any(s.startswith("pip install") for s in steps)
    examples = next(s for s in steps if "optimizer_cli.examples" in s)
    optimize = next(s for s in steps if s.startswith("optimize "))
    out = examples_dir  # what `python -m optimizer_cli.examples --out examples` writes, built once per session
    assert "--out examples" in examples
    args = shlex.split(optimize)[1:]
    args = [a.replace("examples/", f"{out}/").replace("out/", f"{tmp_path}/out/") for a in args]
    proc = run_cli(*args, "--providers", "cpu", "--set", "benchmark.rounds=3")
    assert proc.returncode == 0, proc.stderr
    assert "optimized" in proc.stdout


def test_readme_test_command_is_what_ci_runs() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    test_command = blocks[1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
