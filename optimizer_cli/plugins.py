"""User code named on the command line: 'package.module:function' or 'path/to/file.py:function'."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimizer_cli.errors import UserInputError, first_line


def import_function(spec: str, label: str) -> Callable[..., Any]:
    """The function `spec` names; any failure is one UserInputError starting with `label` (e.g. "--metric 'x:f'")."""
    target, _, func_name = spec.rpartition(":")
    try:
        module = _load_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
        func = getattr(module, func_name)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises at import
        raise UserInputError(f"{label}: cannot import ({type(exc).__name__}: {first_line(exc)})") from exc
    if not callable(func):
        raise UserInputError(f"{label}: {func_name} is not a function")
    return func


def _load_file(path: Path) -> Any:
    file = path.resolve()
    # A name of its own per file (two loader.py files do not collide), registered before it runs as an
    # import would be (dataclasses and pickling look their module up in sys.modules).
    name = f"_optimizer_plugin_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
