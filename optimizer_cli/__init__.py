"""optimizer-cli: optimize ONNX models with verified graph rewrites and benchmark the result.

The Python API (optimize, benchmark, tune, load_recipe, register_pass and the report types) is importable from
here; it loads on first use, so `import optimizer_cli` stays light (no onnxruntime, no numpy).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
# The version of every JSON document the tool writes (--json, --report, tune.json, error documents): raised when a
# field changes meaning or goes away, so a pipeline reading them can tell.
SCHEMA_VERSION = 1

__all__ = [
    "SCHEMA_VERSION",
    "BenchReport",
    "RunReport",
    "TuneReport",
    "__version__",
    "benchmark",
    "load_recipe",
    "optimize",
    "register_pass",
    "tune",
    "unregister_pass",
]
_API = frozenset(__all__) - {"SCHEMA_VERSION", "__version__"}


def __getattr__(name: str) -> Any:
    """PEP 562: the API's names load optimizer_cli.api when first asked for."""
    if name in _API:
        from optimizer_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'optimizer_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
