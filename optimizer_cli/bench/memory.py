"""Peak resident memory of one session (creation + one run), measured in a fresh child process.

The child reads its own high-water mark (VmHWM), not getrusage's ru_maxrss: Linux carries ru_maxrss
across fork+exec, so a child of a large parent reports the parent's peak before and after and the
difference is 0. psutil gives the resident size before the session is made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# `python -c` puts the current folder first on the import path: a numpy.py (or json.py) where `optimize`
# runs would be executed. Each child script drops that entry first (sys is built in, never looked up there);
# the folder this package was imported from goes last, so a run from a source checkout still finds it.
_SAFE_PATH = f"""
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
sys.path.append({str(Path(__file__).resolve().parent.parent.parent)!r})
"""

_CHILD = (
    _SAFE_PATH
    + r"""
import json, os
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import numpy as np
import onnxruntime as ort
import psutil
from optimizer_cli.runtime.session import SessionConfig, create_session

def peak_mb():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20  # Windows keeps a peak; elsewhere rss is a floor

model, feeds_path, provider, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = json.loads(sys.argv[5])
feeds = dict(np.load(feeds_path))
before = psutil.Process().memory_info().rss / 2**20
sess = create_session(model, SessionConfig(provider=provider, threads=threads).with_session(options))
sess.run(None, feeds)
peak = max(peak_mb(), psutil.Process().memory_info().rss / 2**20)
print(json.dumps({"peak_mb": peak, "delta_mb": max(0.0, peak - before)}))
"""
)


def session_peak_memory(
    model_path: str | Path,
    feeds: dict[str, np.ndarray],
    provider: str,
    threads: int,
    session: dict[str, Any] | None = None,
) -> dict | None:
    """{'peak_mb', 'delta_mb'} where delta excludes the interpreter and onnxruntime import; None on failure.

    `session`: other SessionConfig fields (JSON values), e.g. the recipe's mem_pattern, which changes the peak.
    """
    with tempfile.TemporaryDirectory(prefix="optimize-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)  # type: ignore[arg-type]  # numpy's stub types **kwds as its flags
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    str(model_path),
                    str(feeds_path),
                    provider,
                    str(threads),
                    json.dumps(session or {}),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


_PROBE = (
    _SAFE_PATH
    + r"""
import json, resource, subprocess, time
command, timeout = json.loads(sys.argv[1]), json.loads(sys.argv[2])
start = time.perf_counter()
try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    rc, lines = done.returncode, done.stderr.strip().splitlines()
except subprocess.TimeoutExpired:
    rc, lines = None, [f"did not finish in {timeout} s"]
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "last_line": (lines or [""])[-1][:300]}))
"""
)


def command_peak(command: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Exit code (None on timeout), wall seconds, peak RSS in bytes and last stderr line of a command, as
    /usr/bin/time measures it: from a fresh, small parent whose only child it is (ru_maxrss of
    RUSAGE_CHILDREN is the largest process of the tree, and a small parent carries no large mark into it)."""
    probe = [sys.executable, "-c", _PROBE, json.dumps(command), json.dumps(timeout)]
    out = subprocess.run(probe, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
