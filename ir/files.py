"""Writing a file atomically: a temporary file beside it, flushed, given the mode a plain ``open`` would
give, then renamed into place, so a reader never sees half a file and a failure leaves the old one."""
from __future__ import annotations

import os
import tempfile


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def plain_mode(path: str) -> None:
    """Give ``path`` the mode a plain ``open`` gives a new file (a temporary file is private: 0600)."""
    os.chmod(path, 0o644 & ~_UMASK)


def atomic_write(path: str, data: bytes, before_rename=None) -> None:
    """Write ``data`` to ``path``; ``before_rename`` runs just before the rename (e.g. to move a side file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".graphopt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        plain_mode(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
