"""Peak resident memory of one session (creation + one run), measured in a fresh child process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, resource, sys, os
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import numpy as np
import onnxruntime as ort
from optimizer_cli.runtime.session import SessionConfig, create_session
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model, feeds_path, provider, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
feeds = dict(np.load(feeds_path))
sess = create_session(model, SessionConfig(provider=provider, threads=threads))
sess.run(None, feeds)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": after / 1024, "delta_mb": (after - before) / 1024}))
"""


def session_peak_memory(
    model_path: str | Path, feeds: dict[str, np.ndarray], provider: str, threads: int
) -> dict | None:
    """{'peak_mb', 'delta_mb'} where delta excludes the interpreter and onnxruntime import; None on failure."""
    with tempfile.TemporaryDirectory(prefix="optimize-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(model_path), str(feeds_path), provider, str(threads)],
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
