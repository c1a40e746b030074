"""What opt-cli writes: paths checked before any work (never an input, never an existing file without
--force), files staged next to their places and moved there only when the whole command succeeded."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from graphopt.cli import CliError


def check_output_path(path, inputs, force, suffixes, what) -> str | None:
    """A file the command will write: never one of ``inputs`` (whatever path leads to it), never an
    existing file without --force, never something that is not a regular file."""
    if path is None:
        return None
    full = os.path.abspath(path)
    if not full.lower().endswith(suffixes):
        raise CliError(f"{what} file {path} must end in {' or '.join(suffixes)}")
    for source in inputs:
        if _same_file(full, source):
            raise CliError(f"refusing to overwrite the input file {source} with the {what}; choose another {what} file")
    if os.path.isdir(full):
        raise CliError(f"{what} path {path} is a directory")
    if not os.path.isdir(os.path.dirname(full)):
        raise CliError(f"{what} folder {os.path.dirname(full)} does not exist")
    if os.path.lexists(full) and not force:
        raise CliError(f"{what} file {path} already exists; pass --force to replace it")
    if os.path.exists(full) and not os.path.isfile(full):
        raise CliError(f"{what} path {path} is not a regular file")
    return full


def _same_file(a, b) -> bool:
    """The same file by any path (symbolic or hard links, relative or absolute spellings)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_same_target(paths) -> None:
    paths = [p for p in paths if p]
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if _same_file(a, b):
                raise CliError(f"two outputs of this command would both be written to {a}; choose different paths")


def refuse_input_overlap(paths, data_files) -> None:
    for path in paths:
        for data in data_files or ():
            if path and _same_file(path, data):
                raise CliError(f"refusing to write {path}: the input model reads its weights from that file")


class Staging:
    """Files the command writes go to temp files next to their final places and are moved there by
    ``commit()`` only; leaving the block in any other way removes them."""

    def __init__(self):
        self.moves: list[tuple[str, str]] = []  # (temp, final), in commit order
        self.folders: list[str] = []

    def __enter__(self):
        return self

    def stage(self, final: str) -> str:
        folder = tempfile.mkdtemp(prefix=".graphopt-", dir=os.path.dirname(os.path.abspath(final)))
        self.folders.append(folder)
        temp = os.path.join(folder, os.path.basename(final))
        self.moves.append((temp, final))
        return temp

    def adopt(self, final: str, temp: str) -> None:
        """A file written into a staged folder by someone else (a model's side data), moved before the model."""
        self.moves.insert(0, (temp, final))

    def commit(self) -> None:
        for temp, final in self.moves:
            os.replace(temp, final)
        self.moves = []

    def __exit__(self, *exc):
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        return False


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
