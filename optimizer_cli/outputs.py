"""What a run writes, checked before any work and written last.

Every path a run will write (the model, its `.data` file, the reports) is resolved up front and must
differ from every path it reads (input model and its external data, recipe, data, baseline) and from
each other, and its folder must be writable. The optimized model is saved to a staging folder beside
the target; `commit` moves it into place only once everything that can fail has passed, so a failing
run leaves the previous output (and every input) as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from optimizer_cli.data import source_files
from optimizer_cli.errors import UserInputError
from optimizer_cli.model_io import data_file_of, external_data_files


def read_paths(model: Path, others: dict[str, str | Path | None]) -> dict[Path, str]:
    """Resolved path -> what it is, for the input model, its data files and every other input file."""
    reads: dict[Path, str] = {model.resolve(): "the input model"}
    for data in external_data_files(model):
        reads[data] = "the input model's external data"
    for label, value in others.items():
        if value is None or str(value) == "random":
            continue
        if isinstance(value, Path):
            reads[value.resolve()] = label
            continue
        # A data source: a file, a folder (every .npy/.npz in it is read) or a loader's .py file.
        for i, item in enumerate(source_files(value)):
            reads[item.resolve()] = label if i == 0 else f"{label} (in its folder)"
    return reads


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def _check_writable(flag: str, path: Path) -> None:
    if path.is_dir():
        raise UserInputError(f"{flag} names a folder, expected a file path", path)
    if path.exists() and not path.is_file():
        raise UserInputError(f"{flag} names something that is not a regular file", path)
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise UserInputError(f"{flag}: '{folder}' is a file, not a folder", path)
    try:  # a real probe: os.access says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".optimize-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(f"{flag}: cannot write in '{folder}' ({exc.strerror or exc})", path) from exc


@dataclass
class OutputPlan:
    """The files a run writes, by the flag that named them."""

    model: Path | None = None
    reports: dict[str, Path] = field(default_factory=dict)  # flag -> path
    _staging: Path | None = None

    def writes(self) -> dict[Path, str]:
        out: dict[Path, str] = {}
        named = [("-o", self.model), ("-o (its external data)", data_file_of(self.model) if self.model else None)]
        named += list(self.reports.items())
        for flag, path in named:
            if path is None:
                continue
            resolved = path.resolve()
            if resolved in out:
                raise UserInputError(f"{flag} and {out[resolved]} name the same file", path)
            out[resolved] = flag
        return out

    def check(self, reads: dict[Path, str]) -> None:
        """Refuse before any work: a write over an input, two writes to one file, an unwritable folder."""
        for resolved, flag in self.writes().items():
            if resolved in reads:
                raise UserInputError(f"refusing to overwrite {reads[resolved]} with {flag}", resolved)
        for flag, path in [("-o", self.model), *self.reports.items()]:
            if path is not None:
                _check_writable(flag, path)

    def staged_model(self) -> Path:
        """Where the pipeline saves the model until `commit` (same filesystem, so the move is atomic)."""
        assert self.model is not None
        if self._staging is None:
            self.model.parent.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=".optimize-staging-", dir=self.model.parent))
        return self._staging / self.model.name

    def commit_model(self) -> None:
        """Move the staged model (and its data file) into place: data first, so the model never points at a
        missing file."""
        assert self.model is not None
        staged = self.staged_model()
        staged_data = data_file_of(staged)
        if staged_data.exists():
            os.replace(staged_data, data_file_of(self.model))
        os.replace(staged, self.model)

    def discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path` and rename it into place (never a half-written report)."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """write_text_atomic for bytes (a picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
