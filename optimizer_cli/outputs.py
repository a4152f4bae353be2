"""What a run writes, checked before any work and written last.

Every path a run will write (the model, its `.data` file, the reports) is resolved up front and must
differ from every path it reads (input model and its external data, recipe, data, baseline) and from
each other, and its folder must be writable. The optimized model is saved to a staging folder beside
the target; `commit` moves it into place only once everything that can fail has passed, so a failing
run leaves the previous output (and every input) as it was. The model and its reports are one unit: the
reports are written beside their targets first, then everything is renamed into place, and a failure
part-way puts the previous files back.

Written files get the usual mode (0666 less the umask), not tempfile's 0600. A staging folder holds a
`pid` file, so a later run can remove one whose process is gone (killed by SIGKILL, a power cut).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from optimizer_cli.data import source_files
from optimizer_cli.errors import DISK_ERRNOS, UserInputError
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


STAGING_PREFIX = ".optimize-staging-"


@contextlib.contextmanager
def disk_errors(flag: str, path: Path | None) -> Iterator[None]:
    """A full (or read-only) disk while writing what `flag` names becomes a one-line UserInputError."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        message = f"{flag}: cannot write{where}: {exc.strerror or exc}; nothing was replaced"
        raise UserInputError(message, path) from exc


def _check_named(flag: str, path: Path) -> None:
    """'.', './', '/' and '..' name folders: refused before anything derives a file name from them."""
    if path.name in ("", ".", ".."):
        raise UserInputError(f"{flag} names a folder, expected a file path", path)


def _check_writable(flag: str, path: Path) -> None:
    _check_named(flag, path)
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
    # How messages name the model's path: the CLI's -o, the Python API's `output` parameter.
    model_flag: str = "-o"
    _staging: Path | None = None

    def writes(self) -> dict[Path, str]:
        for flag, path in [(self.model_flag, self.model), *self.reports.items()]:
            if path is not None:
                _check_named(flag, path)
        out: dict[Path, str] = {}
        named = [
            (self.model_flag, self.model),
            (f"{self.model_flag} (its external data)", data_file_of(self.model) if self.model else None),
        ]
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
        for flag, path in [(self.model_flag, self.model), *self.reports.items()]:
            if path is not None:
                _check_writable(flag, path)

    def staged_model(self) -> Path:
        """Where the pipeline saves the model until `commit` (same filesystem, so the move is atomic)."""
        assert self.model is not None
        if self._staging is None:
            self.model.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_staging(self.model.parent)
            self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.model.parent))
            (self._staging / "pid").write_text(f"{os.getpid()}\n{socket.gethostname()}\n")
        return self._staging / self.model.name

    def commit_model(self) -> None:
        """Move the staged model (and its data file) into place: data first, so the model never points at a
        missing file."""
        self.commit({})

    def commit(self, reports: dict[Path, str], *, model: bool = True) -> None:
        """The model (when `model` and planned) and every report into place as one unit: reports are written
        beside their targets first (where a full disk fails, before anything moved), then all are renamed;
        a failure part-way puts every previous file back."""
        moves: list[tuple[Path, Path]] = []  # (written, target)
        try:
            for path, text in reports.items():
                flag = next((f for f, p in self.reports.items() if p == path), str(path))
                with disk_errors(flag, path):
                    moves.append((_write_beside(path, text.encode()), path))
        except BaseException:
            for written, _ in moves:
                with contextlib.suppress(OSError):
                    os.unlink(written)
            raise
        if model and self.model is not None:
            staged = self.staged_model()
            staged_data = data_file_of(staged)
            # Data before the model, so the model never points at a missing file.
            head = [(staged_data, data_file_of(self.model))] if staged_data.exists() else []
            moves = [*head, (staged, self.model), *moves]
        with disk_errors(self.model_flag if self.model is not None else next(iter(self.reports), "output"), self.model):
            _replace_all(moves)

    def discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, owned by someone else
        return False
    return False


def remove_abandoned_staging(folder: Path) -> list[Path]:
    """Remove `.optimize-staging-*` folders in `folder` whose pid file names a process of this host that is
    gone; a folder without one (or of another host, or of a live process) may be in use and is kept."""
    removed = []
    for candidate in folder.glob(STAGING_PREFIX + "*"):
        try:
            pid_text, host = (candidate / "pid").read_text().split()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and 0 < pid != os.getpid() and _process_gone(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _file_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_beside(path: Path, data: bytes) -> Path:
    """`data` in a new hidden file beside `path` (same filesystem, so a rename puts it in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _replace_all(moves: list[tuple[Path, Path]]) -> None:
    """Rename every written file onto its target; on a failure, undo the renames done so far (each previous
    target was kept as a hard link, or moved aside where links are not possible) and remove what is left."""
    done: list[tuple[Path, Path | None]] = []  # (target, its previous version)
    try:
        for written, target in moves:
            backup = None
            if target.exists():
                backup = target.with_name(f".{target.name}.optimize-previous-{os.getpid()}")
                try:
                    os.link(target, backup)
                except OSError:
                    os.replace(target, backup)
            done.append((target, backup))
            os.replace(written, target)
    except BaseException:
        for target, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                    # rename() of two links to one file does nothing: the target is the previous file already.
                    os.unlink(backup)
                else:
                    os.unlink(target)
        for written, _ in moves:
            with contextlib.suppress(OSError):
                os.unlink(written)
        raise
    for _, backup in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(backup)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path` and rename it into place (never a half-written report)."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """write_text_atomic for bytes (a picture)."""
    _replace_all([(_write_beside(path, data), path)])
