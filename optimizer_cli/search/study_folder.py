"""A `--study` folder: what makes it one, and reading its files without trusting them.

A study folder identifies itself with a marker file written before anything else in it, so the tuner never
deletes trial folders, overwrites final.json or appends to an Optuna journal in a folder some other tool (or the
user) made. Every file of the study is read through `read_json`, which turns a corrupted, truncated or foreign
file into one UserInputError naming it (exit 2), never a KeyError or a JSONDecodeError.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from optimizer_cli.errors import UserInputError

MARKER_FILE = "optimize-tune-study.json"
MARKER_KIND = "optimize-tune-study"


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_study_folder(study: Path, resume: bool, clashes: dict[str, Path]) -> None:
    """Before the run creates anything: `study` must be a study to resume (resume) or a new or empty folder.
    `clashes` are the run's other paths by flag (the input model, -o and its sidecars, the data): none may be
    the study folder itself."""
    for flag, path in clashes.items():
        if _same(study, path):
            raise UserInputError(f"--study is the same path as {flag}: give the study its own folder", study)
    if study.exists() and not study.is_dir():
        raise UserInputError("--study must be a folder, and this is a file", study)
    blocking = next((p for p in study.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserInputError(f"--study cannot be a folder: {blocking} is a file", study)
    if resume:
        if not study.is_dir():
            raise UserInputError("--resume/--report-only: there is no study folder here", study)
        read_marker(study)
        return
    if not study.exists():
        return
    if (study / MARKER_FILE).exists():
        raise UserInputError(
            "a study already exists here: add --resume to continue it, or choose another --study", study
        )
    if any(study.iterdir()):
        raise UserInputError(
            "--study: this folder is not empty and is not a tune study (no "
            f"{MARKER_FILE}); give a new or empty folder so nothing in it is touched",
            study,
        )


def read_json(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A study file's JSON object, with `keys` present; anything else is the user's folder problem (exit 2)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"the study's {what} is missing", path) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserInputError(f"the study's {what} is unreadable or corrupted ({type(exc).__name__})", path) from None
    if not isinstance(data, dict):
        raise UserInputError(f"the study's {what} is not a JSON object (corrupted or not from optimize tune)", path)
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserInputError(f"the study's {what} lacks {', '.join(missing)} (corrupted or from another tool)", path)
    return data


def write_marker(study: Path) -> str:
    """Creates the folder (a new study) and marks it first; returns the study's id, which its journal carries too."""
    study_id = uuid.uuid4().hex
    try:
        study.mkdir(parents=True, exist_ok=True)
        (study / MARKER_FILE).write_text(json.dumps({"kind": MARKER_KIND, "study_id": study_id}) + "\n")
    except OSError as exc:  # permissions, a full disk: the user's to fix
        raise UserInputError(f"--study cannot be written ({type(exc).__name__}: {exc.strerror})", study) from None
    return study_id


def read_marker(study: Path) -> str:
    """The study's id from its marker; a folder without one is not a study."""
    path = study / MARKER_FILE
    if not path.exists():
        raise UserInputError(
            f"--study: this folder is not a tune study (no {MARKER_FILE}); nothing in it was touched", study
        )
    marker = read_json(path, "marker file", ("kind", "study_id"))
    if marker["kind"] != MARKER_KIND or not isinstance(marker["study_id"], str):
        raise UserInputError("the study's marker file is not from optimize tune", path)
    return marker["study_id"]
